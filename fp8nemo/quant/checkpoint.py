"""FP8 checkpoints in the formats people already have: read AutoFP8 / vLLM "fp8", HF
FineGrainedFP8, compressed-tensors "float-quantized", NVIDIA ModelOpt FP8 and plain 16-bit
HF safetensors checkpoints; write compressed-tensors and AutoFP8 / vLLM ("fp8", or
FineGrainedFP8 for block scales) so that vLLM loads the output.

Every scale read or written is a dequant multiplier, fp32 in memory (x ~= x_fp8 * scale), as
everywhere in fp8nemo; `weight_scale_inv` is one too, despite its name. Writes go to a
temporary folder renamed into place, and never touch the source checkpoint.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import torch

from fp8nemo import fp8

from .files import (
    CheckpointError,
    CheckpointWriter,
    TensorSource,
    checkpoint_json,
    field,
    read_config,
)

WRITE_FORMATS = ("compressed-tensors", "fp8")
HF_QUANT_CONFIG = "hf_quant_config.json"  # ModelOpt


@dataclass
class FP8Weight:
    """The FP8 weight of one linear layer, as data (the module that runs it is another thing):
    e4m3 `weight` [N, K], its fp32 `weight_scale` ([1] per tensor, [N, 1] per channel,
    [ceil(N/128), ceil(K/128)] per block) and, for static activations, the fp32 `input_scale`
    [1]."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    granularity: str
    input_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        return fp8.dequantize(self.weight, self.weight_scale, self.granularity)


@dataclass
class Checkpoint:
    """A model checkpoint as fp8nemo sees it, whatever format it came in.

    `linears` maps module names ("model.layers.0.self_attn.q_proj") to their FP8 weights and
    scales, `kv_scales` attention modules ("model.layers.0.self_attn") to their k_scale and
    v_scale, and `tensors` holds every other tensor under its HF name (norms, embeddings,
    unquantized layers). Read from a folder, weights and `tensors` are views of its files'
    memory maps (see `read_checkpoint`)."""

    config: dict
    format: str
    activation_scheme: str | None = None  # "static" / "dynamic"; None when unquantized
    linears: dict[str, FP8Weight] = dataclass_field(default_factory=dict)
    kv_scales: dict[str, dict[str, torch.Tensor]] = dataclass_field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = dataclass_field(default_factory=dict)
    source: TensorSource | None = dataclass_field(default=None, repr=False)  # where it was read

    @property
    def schemes(self) -> dict[str, str]:
        """{module: "<weight granularity>/<activation scheme>"} per quantized linear."""
        return {
            name: f"{q.granularity}/{self.activation_scheme}" for name, q in self.linears.items()
        }

    def dequantize(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """HF-named float tensors, FP8 weights dequantized (scales are not HF tensors)."""
        out = {
            name: t.to(dtype) if t.is_floating_point() else t for name, t in self.tensors.items()
        }
        for name, q in self.linears.items():
            out[f"{name}.weight"] = q.dequantize().to(dtype)
        return out


# ---------------------------------------------------------------------------------------------
# reading


def detect_format(path: str, config: dict) -> tuple[str, dict]:
    """(format, its quantization settings) from config.json and hf_quant_config.json."""
    qc = field(config, "quantization_config", dict, "config.json")
    if qc is None and (modelopt := checkpoint_json(path, HF_QUANT_CONFIG)) is not None:
        where = os.path.join(path, HF_QUANT_CONFIG)
        qc = {"quant_method": "modelopt", **field(modelopt, "quantization", dict, where, {})}
    if qc is None:
        return "unquantized", {}
    where = "config.json quantization_config"
    method = field(qc, "quant_method", str, where)
    if method == "fp8":
        block = field(qc, "weight_block_size", list, where)
        return ("fine-grained-fp8" if block else "fp8"), qc
    if method == "compressed-tensors":
        fmt = field(qc, "format", str, where)
        if fmt not in ("float-quantized", None) and not _all_groups_float(qc):
            raise CheckpointError(
                f"compressed-tensors format {fmt!r} is not FP8 (need float-quantized)"
            )
        return "compressed-tensors", qc
    if method == "modelopt":
        if qc.get("quant_algo") != "FP8":
            raise CheckpointError(
                f"ModelOpt quant_algo {qc.get('quant_algo')!r} is not supported (FP8 is)"
            )
        return "modelopt", qc
    raise CheckpointError(
        f"unknown quant_method {method!r}; fp8nemo reads fp8 (AutoFP8 / vLLM, FineGrainedFP8), "
        f"compressed-tensors (float-quantized) and modelopt (FP8)"
    )


def _ct_groups(qc: dict) -> dict[str, dict]:
    where = "config.json quantization_config"
    groups = field(qc, "config_groups", dict, where, {})
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise CheckpointError(f"{where}: config_groups.{name} must be dict; got {group!r}")
    return groups


def _all_groups_float(qc):
    groups = _ct_groups(qc)
    return bool(groups) and all(
        g.get("format", "float-quantized") == "float-quantized" for g in groups.values()
    )


def _ct_scheme(qc: dict) -> tuple[str, str, list]:
    """(weight granularity, activation scheme, ignore) of a compressed-tensors config."""
    groups = _ct_groups(qc)
    if len(groups) != 1:
        raise CheckpointError(
            f"compressed-tensors: one config group is supported; got {len(groups)}"
        )
    ((group_name, group),) = groups.items()
    where = f"config.json quantization_config.config_groups.{group_name}"
    w = field(group, "weights", dict, where, {})
    a = field(group, "input_activations", dict, where)
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise CheckpointError(f"compressed-tensors weights must be 8-bit float; got {w}")
    strategy = w.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise CheckpointError(
            f"compressed-tensors weight strategy {strategy!r} is not supported "
            f"(tensor, channel, block)"
        )
    if strategy == "block" and w.get("block_structure") != [fp8.BLOCK, fp8.BLOCK]:
        raise CheckpointError(
            f"compressed-tensors block_structure must be [128, 128]; got {w.get('block_structure')}"
        )
    if a is None:
        raise CheckpointError(
            "compressed-tensors weight-only FP8 (no input_activations) is not supported"
        )
    if a.get("type") != "float" or a.get("num_bits") != 8:
        raise CheckpointError(f"compressed-tensors input activations must be 8-bit float; got {a}")
    if a.get("strategy") not in ("tensor", "token", "group"):
        raise CheckpointError(
            f"compressed-tensors activation strategy {a.get('strategy')!r} is not supported"
        )
    static = not field(a, "dynamic", bool, f"{where}.input_activations", False)
    if static and a.get("strategy") != "tensor":
        raise CheckpointError(
            f"static activations must be per tensor; got strategy {a.get('strategy')!r}"
        )
    ignore = field(qc, "ignore", list, "config.json quantization_config", [])
    return strategy, "static" if static else "dynamic", ignore


# Where each format keeps the KV-cache scales of attention module A: (k name, v name), in order.
_KV_NAMES = {
    "fp8": [("{A}.k_scale", "{A}.v_scale"), ("{A}.k_proj.output_scale", "{A}.v_proj.output_scale"),
            ("{A}.kv_scale", "{A}.kv_scale")],
    "compressed-tensors": [("{A}.k_scale", "{A}.v_scale"),
                           ("{A}.k_proj.output_scale", "{A}.v_proj.output_scale")],
    "modelopt": [("{A}.k_proj.k_scale", "{A}.v_proj.v_scale"), ("{A}.k_scale", "{A}.v_scale")],
}  # fmt: skip


def read_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint folder (config.json + safetensors, sharded or not) in any supported
    format; every tensor is checked against the names, shapes and dtypes its format
    prescribes, and a mismatch is a CheckpointError (a ValueError) that names it.

    Lazy: weights and other tensors are views of private memory maps of the shards (see
    `TensorSource`), read from disk when touched. Scales are copied into memory, as their
    values are checked; a weight's codes are read only where its scale holds a 0."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint folder")
    config = read_config(path)
    fmt, qc = detect_format(path, config)
    src = TensorSource(path)
    check_dtypes(src, fmt)
    names = set(src.keys())
    ckpt = Checkpoint(config=config, format=fmt, source=src)
    if fmt == "unquantized":
        ckpt.tensors = {n: src[n] for n in sorted(names)}
        return ckpt
    fp8_weights = sorted(n for n in names if n.endswith(".weight") and _is_fp8(src, n))

    if fmt == "fp8":
        granularity = "tensor"
        ckpt.activation_scheme = _activation_scheme(qc)
    elif fmt == "fine-grained-fp8":
        granularity = "block"
        if qc["weight_block_size"] != [fp8.BLOCK, fp8.BLOCK]:
            raise CheckpointError(
                f"weight_block_size must be [128, 128]; got {qc['weight_block_size']}"
            )
        ckpt.activation_scheme = _activation_scheme(qc)
        if ckpt.activation_scheme != "dynamic":
            raise CheckpointError("FineGrainedFP8 checkpoints use dynamic activations")
    elif fmt == "compressed-tensors":
        granularity, ckpt.activation_scheme, _ = _ct_scheme(qc)
    else:  # modelopt: per-tensor weights, static activations
        granularity, ckpt.activation_scheme = "tensor", "static"

    used = set()
    for wname in fp8_weights:
        module = wname[: -len(".weight")]
        weight = src[wname]
        if weight.dim() != 2:
            raise CheckpointError(
                f"{wname} must be a 2-D FP8 weight; got shape {list(weight.shape)}"
            )
        scale_name = (
            f"{module}.weight_scale_inv" if fmt == "fine-grained-fp8" else f"{module}.weight_scale"
        )
        scale = _required(src, scale_name, wname)
        _check_scale(scale_name, scale, weight, granularity)
        input_scale = None
        if ckpt.activation_scheme == "static":
            in_name = f"{module}.input_scale"
            if in_name not in names and fmt == "fp8" and f"{module}.act_scale" in names:
                in_name = f"{module}.act_scale"  # early AutoFP8 / vLLM
            input_scale = _required(src, in_name, wname)
            _check_scale(in_name, input_scale)
            used.add(in_name)
            input_scale = input_scale.float().reshape(1)
        used |= {wname, scale_name}
        ckpt.linears[module] = FP8Weight(weight, scale.float(), granularity, input_scale)

    # Attention modules with KV-cache scales, whether or not their projections are quantized.
    kv_names = _KV_NAMES["fp8" if fmt == "fine-grained-fp8" else fmt]
    attention = set()
    for k_pat, _ in kv_names:
        head, tail = k_pat.split("{A}")
        attention |= {n[len(head) : -len(tail)] for n in names if n.endswith(tail)}
    for attn in sorted(attention):
        for k_pat, v_pat in kv_names:
            k_name, v_name = k_pat.format(A=attn), v_pat.format(A=attn)
            if k_name in names and v_name in names:
                k, v = src[k_name].clone(), src[v_name].clone()
                for n, t in ((k_name, k), (v_name, v)):
                    _check_scale(n, t)
                ckpt.kv_scales[attn] = {
                    "k_scale": k.float().reshape(1),
                    "v_scale": v.float().reshape(1),
                }
                used |= {k_name, v_name}
                break

    for name in sorted(names - used):
        if _looks_like_scale(name):
            raise CheckpointError(
                f"unexpected tensor {name} in a {fmt} checkpoint (no FP8 weight or attention "
                f"uses it)"
            )
        tensor = src[name]
        if tensor.dtype in (fp8.E4M3, torch.float8_e5m2):
            raise CheckpointError(f"unexpected FP8 tensor {name}")
        ckpt.tensors[name] = tensor
    return ckpt


# The safetensors dtypes of a linear weight fp8nemo reads unquantized (and quantizes).
FLOAT_WEIGHTS = ("BF16", "F16", "F32", "F64")


def check_dtypes(src: TensorSource, fmt: str) -> None:
    """Refuse tensors a checkpoint of format `fmt` cannot hold, before anything reads their
    data: FP8 e5m2; in a 16-bit checkpoint FP8 tensors and quantization scales; linear weights
    of any dtype but float (or, in an FP8 checkpoint, e4m3)."""
    quantized = fmt != "unquantized"
    for name in src:
        dtype = src.dtype_name(name)
        if dtype == "F8_E5M2":
            raise CheckpointError(f"{name} is FP8 e5m2; fp8nemo's FP8 weights are e4m3")
        if not quantized and dtype == "F8_E4M3":
            raise CheckpointError(
                f"{src.path} has FP8 tensors ({name}, ...) but no quantization_config"
            )
        if not quantized and _looks_like_scale(name):
            raise CheckpointError(
                f"unexpected tensor {name} in a 16-bit checkpoint: a quantization scale, but "
                "config.json has no quantization_config"
            )
        allowed = FLOAT_WEIGHTS + (("F8_E4M3",) if quantized else ())
        if is_linear_weight(name, src.shape(name)) and dtype not in allowed:
            raise CheckpointError(
                f"{name} is a linear weight of dtype {dtype}; fp8nemo reads float weights "
                f"({', '.join(FLOAT_WEIGHTS)}){' and e4m3 ones with scales' if quantized else ''}"
            )


def _is_fp8(src: TensorSource, name: str) -> bool:
    return src.dtype_name(name) in ("F8_E4M3", "F8_E5M2")


def _looks_like_scale(name: str) -> bool:
    return bool(
        re.search(
            r"\.(weight_scale(_inv)?|input_scale|act_scale|output_scale|[kv]_scale|kv_scale|\w*zero_point)$",
            name,
        )
    )


def _activation_scheme(qc: dict) -> str:
    scheme = qc.get("activation_scheme")
    if scheme not in ("static", "dynamic"):
        raise CheckpointError(f"activation_scheme must be static or dynamic; got {scheme!r}")
    return scheme


def _required(src: TensorSource, name: str, owner: str) -> torch.Tensor:
    """The scale `name`, copied out of the file's map: the values checked are the ones used."""
    if name not in src:
        raise CheckpointError(f"missing tensor {name} (the scale of {owner})")
    return src[name].clone()


def _check_scale(name, scale, weight=None, granularity="tensor"):
    """A scale's dtype, shape and values: finite, and positive; a weight's scale (given the
    `weight`'s codes) may be 0 only where all of its group's codes are. Any one-element scale is
    a per-tensor scale."""
    if not scale.is_floating_point() or scale.dtype in (fp8.E4M3, torch.float8_e5m2):
        raise CheckpointError(f"{name} must be a float scale; got dtype {scale.dtype}")
    values = scale.float()
    low = (values < 0) if weight is not None else (values <= 0)
    bad = ~torch.isfinite(values) | low
    if bad.any():
        raise CheckpointError(
            f"{name} must be finite and positive; holds {values[bad].flatten()[0].item()}"
        )
    if granularity == "tensor":
        ok = fp8.is_per_tensor(scale)
        want = "of one element ([], [1], ...)"
    else:
        want_shape = fp8.scale_shape(weight.shape, granularity)
        ok = tuple(scale.shape) == want_shape
        want = str(list(want_shape))
    if not ok:
        raise CheckpointError(
            f"{name} must have shape {want} for a {granularity} scale; got {list(scale.shape)}"
        )
    if weight is not None and (values == 0).any():
        zero = values.reshape(fp8.scale_shape(weight.shape, granularity)) == 0
        if (fp8.amax(weight, granularity)[zero] != 0).any():  # NaN codes count too
            raise CheckpointError(
                f"{name} is 0 for a group whose codes are not all 0: it would erase them"
            )


# ---------------------------------------------------------------------------------------------
# writing


def quantization_config(fmt: str, granularity: str, activation_scheme: str, ignore: list[str],
                        kv_cache: bool) -> dict:  # fmt: skip
    """config.json's quantization_config for a checkpoint fp8nemo writes."""
    if fmt == "fp8":
        if granularity == "channel":
            raise CheckpointError(
                "per-channel weights need format compressed-tensors: the fp8 format (AutoFP8 / "
                "vLLM) has per-tensor and 128x128 block scales only"
            )
        qc = {
            "quant_method": "fp8",
            "activation_scheme": activation_scheme,
            "ignored_layers": list(ignore),
        }
        if granularity == "block":
            if activation_scheme != "dynamic":
                raise CheckpointError(
                    "block-scaled fp8 (FineGrainedFP8) checkpoints need dynamic activations"
                )
            qc["weight_block_size"] = [fp8.BLOCK, fp8.BLOCK]
        if kv_cache:
            qc["kv_cache_scheme"] = "static"
        return qc
    if fmt != "compressed-tensors":
        raise CheckpointError(f"format must be one of {WRITE_FORMATS}; got {fmt!r}")
    weights = {
        "num_bits": 8,
        "type": "float",
        "strategy": granularity,
        "symmetric": True,
        "dynamic": False,
        "group_size": None,
        "block_structure": [fp8.BLOCK, fp8.BLOCK] if granularity == "block" else None,
    }
    static = activation_scheme == "static"
    if static and granularity == "block":
        raise CheckpointError(
            "block-scaled weights take dynamic 1x128 activations; static is per tensor"
        )
    act_strategy = "tensor" if static else ("group" if granularity == "block" else "token")
    acts = {
        "num_bits": 8,
        "type": "float",
        "strategy": act_strategy,
        "symmetric": True,
        "dynamic": not static,
        "group_size": fp8.BLOCK if act_strategy == "group" else None,
    }
    qc = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": list(ignore),
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                      "input_activations": acts, "output_activations": None,
                                      "format": "float-quantized"}},
        "kv_cache_scheme": None,
    }  # fmt: skip
    if kv_cache:
        qc["kv_cache_scheme"] = {
            "num_bits": 8,
            "type": "float",
            "strategy": "tensor",
            "symmetric": True,
            "dynamic": False,
        }
    return qc


def format_tensors(fmt: str, module: str, q: FP8Weight) -> list[tuple[str, torch.Tensor]]:
    """The tensors one quantized linear takes in `fmt`, under their names."""
    if q.weight.dtype != fp8.E4M3 or q.weight.dim() != 2:
        raise CheckpointError(
            f"{module}.weight must be a 2-D e4m3 tensor; got {q.weight.dtype} "
            f"{list(q.weight.shape)}"
        )
    _check_scale(f"{module}.weight_scale", q.weight_scale, q.weight, q.granularity)
    if q.input_scale is not None:
        _check_scale(f"{module}.input_scale", q.input_scale)
    if fmt == "fp8" and q.granularity == "block":
        out = [
            (f"{module}.weight", q.weight),
            (f"{module}.weight_scale_inv", q.weight_scale.float().contiguous()),
        ]
    elif fmt == "fp8":
        out = [
            (f"{module}.weight", q.weight),
            (f"{module}.weight_scale", q.weight_scale.float().reshape(())),
        ]
    else:
        out = [
            (f"{module}.weight", q.weight),
            (f"{module}.weight_scale", q.weight_scale.float().contiguous()),
        ]
    if q.input_scale is not None:
        scale = q.input_scale.float()
        out.append(
            (f"{module}.input_scale", scale.reshape(()) if fmt == "fp8" else scale.reshape(1))
        )
    return out


def kv_tensors(
    fmt: str, attention: str, scales: dict[str, torch.Tensor]
) -> list[tuple[str, torch.Tensor]]:
    shape = () if fmt == "fp8" else (1,)
    for k in ("k_scale", "v_scale"):
        _check_scale(f"{attention}.{k}", scales[k])
    return [(f"{attention}.{k}", scales[k].float().reshape(shape)) for k in ("k_scale", "v_scale")]


def write_checkpoint(dst: str, ckpt: Checkpoint, *, format: str = "compressed-tensors",
                     overwrite: bool = False, source: str | None = None) -> str:  # fmt: skip
    """Write `ckpt` to the folder `dst` in compressed-tensors or AutoFP8 / vLLM ("fp8") form,
    atomically; refuses a destination that holds a checkpoint unless `overwrite`, and the
    source folder (`source`) always."""
    if format not in WRITE_FORMATS:
        raise CheckpointError(f"format must be one of {WRITE_FORMATS}; got {format!r}")
    granularities = {q.granularity for q in ckpt.linears.values()}
    if len(granularities) > 1:
        raise CheckpointError(f"one weight granularity per checkpoint; got {sorted(granularities)}")
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    if ckpt.linears:
        ignore = sorted(_linear_modules(ckpt.tensors))
        config["quantization_config"] = quantization_config(
            format,
            granularities.pop(),
            ckpt.activation_scheme or "dynamic",
            ignore,
            bool(ckpt.kv_scales),
        )
    with CheckpointWriter(dst, overwrite=overwrite, source=source) as out:
        for name, tensor in _items(format, ckpt):
            out.add(name, tensor)
        return out.finish(config)


def _items(fmt: str, ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    for module, q in ckpt.linears.items():
        yield from format_tensors(fmt, module, q)
    for attention, scales in ckpt.kv_scales.items():
        yield from kv_tensors(fmt, attention, scales)
    yield from ckpt.tensors.items()


def is_linear_weight(name: str, shape) -> bool:
    """Whether tensor `name` of `shape` is a linear layer's weight: 2-D, named `*.weight`, not
    an embedding (a lookup, never quantized)."""
    return name.endswith(".weight") and len(shape) == 2 and "embed" not in name


def _linear_modules(tensors: dict[str, torch.Tensor]) -> Iterable[str]:
    """Unquantized linear layers (lm_head, ...): the writers' ignore lists."""
    for name, t in tensors.items():
        if is_linear_weight(name, t.shape):
            yield name[: -len(".weight")]
