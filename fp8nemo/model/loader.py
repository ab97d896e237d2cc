"""`load_model`: an HF checkpoint folder (16-bit, or FP8 in any format `quant` reads) or a named
preset with seeded random weights, built on the meta device and filled tensor by tensor from
the memory-mapped safetensors, so the host never holds two copies of the weights."""

from __future__ import annotations

import logging
import os

import torch

from fp8nemo import fp8
from fp8nemo.quant.calibrate import calibrate_weight
from fp8nemo.quant.checkpoint import read_checkpoint
from fp8nemo.quant.files import CheckpointError, CheckpointWriter
from fp8nemo.utils import progress as show_progress

from .cache import CACHE_DTYPES
from .config import PRESETS, ModelConfig, preset
from .linear import FP8Linear, FP8Scheme
from .transformer import RMSNorm, Transformer, build_model

log = logging.getLogger(__name__)

DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
# Buffers the model derives itself rather than reads: the fused quantizations' static scale
# is the largest of their readers' (Transformer.tie_input_scales).
DERIVED = ("input_layernorm.input_scale", "post_attention_layernorm.input_scale")
IGNORED = ("rotary_emb.inv_freq",)  # older HF checkpoints store the RoPE frequencies


def _dtype(name: str, value, table: dict) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in table:
        raise ValueError(f"{name} must be a torch dtype or one of {sorted(table)}; got {value!r}")
    return table[value]


def load_model(
    path_or_preset: str,
    *,
    backend: str = "fp8",
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str | None = None,
    scheme: FP8Scheme | str | None = None,
    kv_cache_dtype: torch.dtype | str | None = None,
    method: str = "absmax",
    max_seq_len: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Transformer:
    """The model of a checkpoint folder or preset ("nemo-12b", "mistral-7b", "llama-3-8b",
    "tiny") on `backend` ("fp8" or "reference").

    A 16-bit checkpoint on the fp8 backend is quantized on load with `scheme` (an FP8Scheme or
    a weight granularity: "tensor", "channel", "block"; default channel weights with dynamic
    activations) and `method`, exactly as `fp8nemo quantize` would; an FP8 checkpoint runs on
    its own scheme (the reference backend gets its weights dequantized). `kv_cache_dtype`:
    "fp8" for an e4m3 cache with the checkpoint's k/v scales, default the model dtype.
    Errors name the file and the tensor."""
    dtype = _dtype("dtype", dtype, DTYPES)
    if kv_cache_dtype is not None:
        kv_cache_dtype = _dtype("kv_cache_dtype", kv_cache_dtype, CACHE_DTYPES)
    if isinstance(scheme, str):
        scheme = FP8Scheme(weights=scheme)
    if scheme is not None and not isinstance(scheme, FP8Scheme):
        raise TypeError(
            f"scheme must be an FP8Scheme, a weight granularity or None; got {scheme!r}"
        )
    device = torch.device(device) if device is not None else torch.device("cpu")
    if not isinstance(path_or_preset, str):
        raise TypeError(f"path_or_preset must be a str; got {type(path_or_preset).__name__}")
    if not os.path.isdir(path_or_preset):
        if path_or_preset in PRESETS:
            return _random_model(preset(path_or_preset), backend, dtype, device, scheme,
                                 kv_cache_dtype, max_seq_len, seed)  # fmt: skip
        raise ValueError(
            f"{path_or_preset} is neither a checkpoint folder nor a preset "
            f"({', '.join(sorted(PRESETS))})"
        )
    return _checkpoint_model(path_or_preset, backend, dtype, device, scheme, kv_cache_dtype,
                             method, max_seq_len, progress)  # fmt: skip


def _checkpoint_model(path, backend, dtype, device, scheme, kv_cache_dtype, method, max_seq_len,
                      progress) -> Transformer:  # fmt: skip
    config = ModelConfig.from_pretrained(path)
    ckpt = read_checkpoint(path)
    quantized = ckpt.format != "unquantized"
    if quantized:
        granularities = {q.granularity for q in ckpt.linears.values()}
        own = FP8Scheme(weights=granularities.pop() if granularities else "channel",
                        activations=ckpt.activation_scheme or "dynamic")  # fmt: skip
        if backend == "fp8" and scheme is not None and scheme != own:
            raise ValueError(
                f"{path} is an FP8 checkpoint with {own.weights} weights and "
                f"{own.activations} activations; it runs on its own scheme, not {scheme}"
            )
        scheme = own
    elif backend == "fp8" and scheme is not None and scheme.static:
        raise ValueError(
            f"{path} is a 16-bit checkpoint: static activation scales come from calibration; "
            f"convert it with `fp8nemo quantize --activations static --calib ...` and load that"
        )
    model = build_model(config, backend, dtype=dtype, device="meta", scheme=scheme,
                        kv_cache_dtype=kv_cache_dtype, max_seq_len=max_seq_len)  # fmt: skip
    tensors = ckpt.tensors  # HF name -> tensor (16-bit ones; FP8 weights live in .linears)
    where = _sources(path, ckpt)
    state = {}
    expected = model.state_dict(keep_vars=True)
    names = [n for n in expected if not n.endswith(DERIVED)]
    if config.tie_word_embeddings:
        names.remove("lm_head.weight")  # embed_tokens' (a tied checkpoint may store it too)
    # Every tensor the model reads, named before any is: a missing or extra one fails fast.
    needed = {n for n in names if not n.endswith(("weight_scale", "input_scale", "k_scale",
                                                  "v_scale"))}  # fmt: skip
    have = set(tensors) | {f"{m}.weight" for m in ckpt.linears}
    missing = sorted(needed - have)
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]} (no shard holds it)")
    extra = sorted(n for n in have - needed - {"lm_head.weight"} if not n.endswith(IGNORED))
    if extra:
        raise CheckpointError(
            f"{where.get(extra[0], path)}: tensor {extra[0]} is not part of a "
            f"{config.model_type} model of this config ({len(extra)} such tensors)"
        )
    for name in show_progress(names, f"loading {os.path.basename(os.path.normpath(path))}",
                              "tensor", enabled=progress):  # fmt: skip
        want = expected[name]
        module_name, _, leaf = name.rpartition(".")
        if name in state:
            continue
        module = model.get_submodule(module_name)
        if isinstance(module, FP8Linear):
            values = _fp8_linear(path, ckpt, where, module_name, module, device, method)
            state.update({f"{module_name}.{k}": v for k, v in values.items()})
            continue
        if leaf in ("k_scale", "v_scale"):
            state[name] = _kv_scale(ckpt, module_name, leaf, device)
            continue
        # An FP8 checkpoint's weight on the reference backend: dequantized.
        t = tensors[name] if name in tensors else ckpt.linears[module_name].dequantize()
        state[name] = _checked(t, want, name, where, path).to(device=device, dtype=want.dtype)
        if name not in tensors:  # dequantized FP8 codes: the model holds none of them
            ckpt.source.release(name)
        else:
            _release_if_copied(ckpt, name, t, state[name])
    for name in (n for n in expected if n.endswith(DERIVED)):
        state[name] = torch.ones(1, device=device)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.init_rope()
    model.tie_input_scales()
    return model


def _sources(path: str, ckpt) -> dict[str, str]:
    """Tensor name -> the shard file that holds it, for error messages."""
    return {n: os.path.join(path, ckpt.source.shard_of(n)) for n in ckpt.source}


def _check_shape(t: torch.Tensor, shape, name: str, where: dict, path: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointError(
            f"{where.get(name, path)}: tensor {name} has shape {list(t.shape)}; the config "
            f"(config.json) makes it {list(shape)}"
        )


def _checked(t: torch.Tensor, want: torch.Tensor, name: str, where: dict, path: str):
    _check_shape(t, want.shape, name, where, path)
    if not t.is_floating_point():
        raise CheckpointError(
            f"{where.get(name, path)}: tensor {name} has dtype {t.dtype}, not a float"
        )
    return t


def _release_if_copied(ckpt, name: str, source: torch.Tensor, loaded: torch.Tensor) -> None:
    """The model holds a converted copy of checkpoint tensor `name`, not its view: drop the
    file pages the copy was read from, so loading never holds the checkpoint twice."""
    if name in ckpt.source and (
        loaded.device != source.device or loaded.data_ptr() != source.data_ptr()
    ):
        ckpt.source.release(name)


def _kv_scale(ckpt, attn: str, leaf: str, device) -> torch.Tensor:
    scales = ckpt.kv_scales.get(attn)
    if scales is None:
        if not getattr(_kv_scale, "warned", False):
            log.warning(
                "the checkpoint has no KV-cache scales: the FP8 cache uses 1.0 (as vLLM does); "
                "calibrate them with `fp8nemo quantize --activations static`"
            )
            _kv_scale.warned = True
        return torch.ones(1, device=device)
    return scales[leaf].float().reshape(1).to(device)


def _fp8_linear(path, ckpt, where, module_name, module: FP8Linear, device, method) -> dict:
    """weight, weight_scale (and input_scale) of one FP8Linear: the checkpoint's own, or its
    16-bit weight quantized here with calibrate_weight (as `fp8nemo quantize` does)."""
    name = f"{module_name}.weight"
    shape = (module.out_features, module.in_features)
    q = ckpt.linears.get(module_name)
    if q is not None:
        _check_shape(q.weight, shape, name, where, path)
        if q.granularity != module.scheme.weights:
            raise CheckpointError(
                f"{where.get(name, path)}: {module_name} has {q.granularity} weight scales; the "
                f"checkpoint's other layers have {module.scheme.weights}"
            )
        scale = q.weight_scale.float().reshape(module.weight_scale.shape)
        out = {"weight": q.weight.to(device), "weight_scale": scale.to(device)}
        _release_if_copied(ckpt, name, q.weight, out["weight"])
        if module.scheme.static:
            out["input_scale"] = q.input_scale.float().reshape(1).to(device)
        return out
    w = ckpt.tensors[name]
    if module.scheme.static:
        raise CheckpointError(
            f"{where.get(name, path)}: {name} is 16-bit in a checkpoint with static activations: "
            f"it has no input_scale"
        )
    _check_shape(w, shape, name, where, path)
    wq = calibrate_weight(w.to(device), module.scheme.weights, method)
    ckpt.source.release(name)
    return {"weight": wq.w_fp8, "weight_scale": wq.scale.reshape(module.weight_scale.shape)}


def _random_model(config, backend, dtype, device, scheme, kv_cache_dtype, max_seq_len, seed):
    """A preset with seeded random weights, made on `device` (never written to disk): linears
    and embeddings N(0, 0.02) as HF initializes them, norms one; FP8 linears quantize theirs
    with plain absmax scales, one layer at a time."""
    if scheme is not None and scheme.static:
        raise ValueError(
            "a preset has random weights and no calibration data: static activation scales "
            "need a calibrated checkpoint; use dynamic activations"
        )
    model = build_model(config, backend, dtype=dtype, device=device, scheme=scheme,
                        kv_cache_dtype=kv_cache_dtype, max_seq_len=max_seq_len)  # fmt: skip
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, FP8Linear):
                w = torch.empty(module.out_features, module.in_features, dtype=dtype, device=device)
                w.normal_(0.0, 0.02, generator=gen)
                w_fp8, scale = fp8.quantize(w, module.scheme.weights)
                module.weight.copy_(w_fp8)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            elif isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                if name == "lm_head" and config.tie_word_embeddings:
                    continue
                module.weight.normal_(0.0, 0.02, generator=gen)
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
    return model


def write_random_checkpoint(config, dst: str, device: torch.device, seed: int = 0) -> str:
    """`config` written to `dst` as a bf16 HF checkpoint with seeded random weights, made on
    `device` one tensor at a time (NeMo-12B's take seconds on a GPU). Linears and a tied
    embedding N(0, 1/fan_in), an untied embedding N(0, 1), norms 1 + N(0, 0.1^2): lively logits;
    HF's N(0, 0.02) makes them nearly uniform, where greedy tokens tie."""
    shapes = build_model(config, "reference", dtype=torch.bfloat16, device="meta").state_dict()
    tied = config.tie_word_embeddings
    gen = torch.Generator(device=device).manual_seed(seed)
    with CheckpointWriter(dst) as out:
        for name, meta in shapes.items():
            if name == "lm_head.weight" and tied:
                continue
            t = torch.empty(meta.shape, device=device)
            if name.endswith("norm.weight"):
                t.normal_(1.0, 0.1, generator=gen)
            elif name.endswith("embed_tokens.weight") and not tied:
                t.normal_(0.0, 1.0, generator=gen)
            else:
                t.normal_(0.0, meta.shape[1] ** -0.5, generator=gen)
            out.add(name, t.to(torch.bfloat16))
            del t
        return out.finish(config.to_hf())
