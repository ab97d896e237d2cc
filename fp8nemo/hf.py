"""fp8nemo as a backend for HF transformers models: `quantize_` swaps their `nn.Linear`s for
fp8nemo's `FP8Linear`, `unquantize_` reverts, and the "fp8nemo" attention
(`attn_implementation="fp8nemo"`) runs prefill on `flash_attention` and cached decode on the
append-to-cache attention.

    import fp8nemo.hf
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                                 attn_implementation="fp8nemo").cuda()
    fp8nemo.hf.quantize_(model)

transformers is imported only to register the attention; `quantize_` works on any module.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from fp8nemo import kernels as K
from fp8nemo.kernels._triton import MIN_CAPABILITY, use_triton
from fp8nemo.model.linear import FP8Linear, FP8Scheme
from fp8nemo.quant.calibrate import OBSERVERS, WEIGHT_METHODS, Calibrator, quantize_weight

logger = logging.getLogger("fp8nemo")

ATTENTION = "fp8nemo"  # the name models pass as attn_implementation
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MMA_K = 16  # fp8_gemm's K must be a multiple of the FP8 MMA's K step


@dataclass(frozen=True)
class FP8Config:
    """How `quantize_` quantizes each linear: `weights` per tensor, output channel or 128x128
    block; `activations` per token at run time ("dynamic") or one static scale per linear from
    calibration batches ("static", tensor/channel weights only); weights that lie on no FP8 grid
    take `method`'s scale (absmax or MSE-optimal); static scales come from `observer`."""

    weights: str = "channel"
    activations: str = "dynamic"
    method: str = "absmax"
    observer: str = "absmax"

    def __post_init__(self):
        FP8Scheme(self.weights, self.activations)  # validates both and their pairing
        if self.method not in WEIGHT_METHODS:
            raise ValueError(f"method must be one of {WEIGHT_METHODS}; got {self.method!r}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {OBSERVERS}; got {self.observer!r}")

    @property
    def scheme(self) -> FP8Scheme:
        return FP8Scheme(self.weights, self.activations)


@dataclass
class QuantizeReport:
    """Which linears `quantize_` swapped, and each one it left 16-bit with the reason."""

    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fp8nemo: {len(self.quantized)} linears quantized, {len(self.skipped)} kept"]
        lines += [f"  kept {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _skip_reason(name: str, module: nn.Linear, head: nn.Module | None, filter_fn) -> str | None:
    if module is head or name.rsplit(".", 1)[-1] == "lm_head":
        return "the output head stays 16-bit (the logits are the layer FP8 hurts most)"
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} subclasses nn.Linear; only plain nn.Linear is swapped"
    if filter_fn is not None and not filter_fn(module, name):
        return "filter_fn returned False"
    w = module.weight
    if w.device.type == "meta":
        return "its weight is on the meta device (offloaded or not loaded)"
    if w.dtype not in FLOAT_DTYPES:
        return f"weight dtype {w.dtype} (fp8nemo quantizes float16, bfloat16 and float32)"
    if module.in_features == 0 or module.out_features == 0:
        return f"empty weight {list(w.shape)}"
    if module.in_features % MMA_K:
        return f"in_features {module.in_features} is no multiple of {MMA_K} (the FP8 MMA's K step)"
    return None


def _check_device(device: torch.device) -> None:
    """The hardware check, when quantize_ is applied: FP8 tensor cores on CUDA (RuntimeError
    naming the capability found), the interpreter or the torch emulation on CPU."""
    if device.type not in ("cuda", "cpu"):
        raise ValueError(
            f"a linear is on {device}; fp8nemo runs on CUDA GPUs of compute capability "
            f"{'.'.join(map(str, MIN_CAPABILITY))}+ or on the CPU"
        )
    use_triton(device, "fp8nemo.hf.quantize_")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def _fp8_linear(linear: nn.Linear, config: FP8Config, input_scale) -> FP8Linear:
    w = linear.weight
    new = FP8Linear(linear.in_features, linear.out_features, config.scheme, out_dtype=w.dtype,
                    device=w.device, bias=linear.bias is not None)  # fmt: skip
    w_fp8, scale = quantize_weight(w.detach(), config.weights, config.method)
    new.weight.copy_(w_fp8)
    new.weight_scale.copy_(scale.reshape(new.weight_scale.shape))
    if linear.bias is not None:
        new.bias.copy_(linear.bias)
    if input_scale is not None:
        new.input_scale.copy_(input_scale.reshape(1))
    return new


def quantize_(
    model: nn.Module,
    config: FP8Config | None = None,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibration: Iterable | None = None,
) -> QuantizeReport:
    """Swap `model`'s `nn.Linear`s for `FP8Linear` in place (torchao's `quantize_`), keeping
    `lm_head`, subclasses of `nn.Linear`, layers whose K is no multiple of 16 and those
    `filter_fn(module, name)` rejects 16-bit. Static activations (`config.activations`)
    calibrate their scales first, running the 16-bit model over `calibration` (batches of
    input_ids, or dicts for `model(**batch)`). Returns (and logs) what was swapped and what was
    kept, and why. The hardware is checked here, not at the first forward."""
    config = FP8Config() if config is None else config
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(config, FP8Config):
        raise TypeError(f"config must be a fp8nemo.hf.FP8Config; got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn must be callable(module, name); got {type(filter_fn).__name__}")
    if config.scheme.static and calibration is None:
        raise ValueError("static activations need calibration batches (calibration=...)")
    if not config.scheme.static and calibration is not None:
        raise ValueError("calibration batches are for static activations; this config is dynamic")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    report, targets = QuantizeReport(), {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            reason = _skip_reason(name, module, head, filter_fn)
            if reason is None:
                targets[name] = module
            else:
                report.skipped[name] = reason
    for device in {m.weight.device for m in targets.values()}:
        _check_device(device)
    scales = {}
    if config.scheme.static and targets:
        calib = Calibrator(model, observer=config.observer, kv=False,
                           linear_filter=lambda name, _: name in targets)  # fmt: skip
        scales = calib.run(calibration).input_scales()
    for name, linear in targets.items():
        _set_module(model, name, _fp8_linear(linear, config, scales.get(name)))
        report.quantized.append(name)
    if not targets:
        logger.warning("fp8nemo: quantize_ found no linear it can quantize\n%s", report)
    else:
        logger.info("%s", report)
    return report


@torch.no_grad()
def unquantize_(model: nn.Module) -> list[str]:
    """Put back 16-bit `nn.Linear`s (in each layer's output dtype) holding the dequantized
    weights of every `FP8Linear` that `quantize_` put in `model`; returns their names."""
    from fp8nemo.model import Transformer

    if isinstance(model, Transformer):
        raise TypeError(
            "unquantize_ reverts quantize_ on transformers models; fp8nemo's own model has a "
            "16-bit backend: load_model(..., backend='reference')"
        )
    names = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    for name in names:
        fp8_linear = model.get_submodule(name)
        linear = nn.Linear(fp8_linear.in_features, fp8_linear.out_features,
                           bias=fp8_linear.bias is not None, dtype=fp8_linear.out_dtype,
                           device=fp8_linear.weight.device)  # fmt: skip
        linear.weight.copy_(fp8_linear.dequantize())
        if fp8_linear.bias is not None:
            linear.bias.copy_(fp8_linear.bias)
        _set_module(model, name, linear)
    return names


# ---------------------------------------------------------------------------------------------
# the "fp8nemo" attention


def _unpadded_prefill(q, k, v, valid, causal, scaling, window):
    """Attention of B padded sequences as one packed batch of their valid tokens (`valid`
    [B, S] bool, each row's valid tokens in order); pad rows of the output are 0."""
    B, S, Hq, D = q.shape
    index = valid.reshape(-1).nonzero().squeeze(1)
    lengths = valid.sum(1)
    cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    cu_seqlens[1:] = lengths.cumsum(0)
    pack = lambda t: t.reshape(B * S, *t.shape[2:])[index]  # noqa: E731
    out = K.flash_attention(pack(q), pack(k), pack(v), causal=causal, softmax_scale=scaling,
                            window=window, cu_seqlens=cu_seqlens,
                            max_seqlen=int(lengths.max()))  # fmt: skip
    full = q.new_zeros(B * S, Hq, D)
    full[index] = out
    return full.view(B, S, Hq, D)


def _valid_first(k, v, valid):
    """k, v `[B, Skv, Hk, D]` with each row's valid keys moved to its front (in order), and
    their counts: the cache layout the append-to-cache attention reads."""
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # [B, Skv]
    gather = lambda t: t.gather(1, order[:, :, None, None].expand(t.shape))  # noqa: E731
    return gather(k), gather(v), valid.sum(1, dtype=torch.int32)


def attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface on fp8nemo's kernels.

    query `[B, Hq, S, D]`, key/value `[B, Hk, Skv, D]` (a cache's keys, the S new ones last)
    -> `([B, S, Hq, D], None)`. S == Skv is a prefill (`flash_attention`), S < Skv attends after
    the cache (`append_attention`, causal aligned bottom-right). `attention_mask` is the 2-D
    padding mask [B, <= Skv] (transformers builds it for this attention as for flash-attn's) or
    None: a padded prefill runs packed over the valid tokens; after a cache the valid keys are
    gathered to the front, the S new tokens being each sequence's last valid ones (left
    padding, as transformers' generate pads; a pad query's output is undefined)."""
    if dropout:
        raise ValueError(
            f"the fp8nemo attention is for inference: dropout must be 0, not {dropout}"
        )
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"the fp8nemo attention does not implement {name}")
    if kwargs.get("output_attentions"):
        raise ValueError("the fp8nemo attention returns no attention weights (output_attentions)")
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"the fp8nemo attention runs float16/bfloat16; this model's attention is in "
            f"{query.dtype}: load it with dtype=torch.bfloat16"
        )
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    B, _, q_len, _ = query.shape
    kv_len = key.shape[2]
    # q: [B, S, Hq, D]; k, v: [B, Skv, Hk, D] (strided views: the kernels take any layout with
    # unit stride along D)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if q_len > kv_len or (q_len < kv_len and not causal):
        raise ValueError(
            f"the fp8nemo attention takes S <= Skv queries after a cache, causally; got "
            f"S = {q_len} queries over Skv = {kv_len} keys with is_causal={causal}"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"the fp8nemo attention takes a 2-D padding mask [B, Skv]; got shape "
            f"{list(attention_mask.shape)} (custom 4-D masks need attn_implementation='sdpa')"
        )
    seqlens = None
    if attention_mask is not None:
        valid = attention_mask.to(device=q.device, dtype=torch.bool)
        if valid.shape[1] < kv_len:  # a static cache: its slots past the mask are empty
            valid = torch.nn.functional.pad(valid, (0, kv_len - valid.shape[1]), value=False)
        if q_len == kv_len:
            return _unpadded_prefill(q, k, v, valid, causal, scaling, sliding_window), None
        k, v, counts = _valid_first(k, v, valid)
        seqlens = counts - q_len
    # The lengths come from shapes and the mask, not from the user: no host checks (a traced
    # forward has none to turn off, and dynamo does not trace the context variable).
    compiling = torch.compiler.is_compiling()
    with contextlib.nullcontext() if compiling else K.value_checks(False):
        if q_len == kv_len:
            out = K.flash_attention(q, k, v, causal=causal, softmax_scale=scaling,
                                    window=sliding_window)  # fmt: skip
        else:
            if seqlens is None:
                seqlens = torch.full((B,), kv_len - q_len, dtype=torch.int32, device=q.device)
            out = K.append_attention(q, k, v, seqlens, softmax_scale=scaling, window=sliding_window)
    return out, None


def register_attention() -> None:
    """Register "fp8nemo" with transformers' attention and mask interfaces (flash-attn's mask:
    None, or the 2-D padding mask). Done on import when transformers is installed."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, flash_attention_mask)


try:
    import transformers  # noqa: F401
except ImportError:
    pass
else:
    register_attention()
