"""Quantize a 16-bit HF checkpoint into an FP8 one: every linear weight but the kept ones gets
per-tensor, per-channel or 128x128-block scales (exact for weights already on an FP8 grid), and
static activation and KV-cache scales come from calibration batches. The weights stream tensor
by tensor (memory: a few times the largest weight, plus a shard being written); static
calibration runs the whole model, on the GPU when there is one."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fp8nemo.utils import progress as show_progress

from . import fp8
from .calibrate import WEIGHT_METHODS, Calibrator, calibrate_weight
from .checkpoint import (
    WRITE_FORMATS,
    CheckpointError,
    CheckpointWriter,
    QuantizedLinear,
    TensorSource,
    detect_format,
    format_tensors,
    is_linear_weight,
    kv_tensors,
    quantization_config,
    read_config,
)

# Layers kept in 16 bits by default (embeddings are lookups, never quantized). vLLM keeps
# lm_head in 16 bits whatever the checkpoint says.
DEFAULT_KEEP = ("lm_head",)
# Layers vLLM fuses into one GEMM: all quantized or all kept, and block-scaled only when each
# one's output size is a multiple of 128.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
CALIB_BATCH = 4  # sequences per calibration forward
FLOATS = ("BF16", "F16", "F32")  # the safetensors dtypes of weights to quantize


@dataclass
class LayerReport:
    """What quantizing one linear weight did."""

    name: str
    shape: tuple[int, ...]
    granularity: str
    method: str  # "grid" when the weight already lay on an FP8 grid
    on_grid: bool
    grid_fraction: float
    sqnr_db: float
    max_abs_err: float


def linear_weights(src: TensorSource, keep: Iterable[str]) -> tuple[list[str], list[str]]:
    """The 16-bit linear layers of a checkpoint: (those to quantize, those kept 16-bit because
    their name matches a regex in `keep`)."""
    patterns = []
    for pattern in keep:
        try:
            patterns.append(re.compile(pattern))
        except re.error as err:
            raise CheckpointError(f"keep pattern {pattern!r} is not a regex: {err}") from None
    quantize, kept = [], []
    for name in src:
        if not is_linear_weight(name, src.shape(name)) or src.dtype_name(name) not in FLOATS:
            continue
        is_kept = any(p.search(name) for p in patterns)
        (kept if is_kept else quantize).append(name[: -len(".weight")])
    return quantize, kept


def check_layers(quantized: list[str], kept: list[str], shapes: dict, scheme: str) -> None:
    """Refuse what vLLM would refuse to load; warn where it would not use what we write."""
    quantized, linears = set(quantized), set(quantized) | set(kept)
    for module in sorted(linears):
        prefix, _, last = module.rpartition(".")
        group = next((g for g in FUSED if g[0] == last), ())
        members = [f"{prefix}.{m}" for m in group if f"{prefix}.{m}" in linears]
        if quantized.isdisjoint(members):
            continue
        if not quantized.issuperset(members):
            raise CheckpointError(
                f"{', '.join(members)} are one fused GEMM in vLLM: quantize all of them or "
                "keep all of them (--keep)"
            )
        odd = [m for m in members if shapes[m][0] % fp8.BLOCK]
        if scheme == "block" and odd:
            warnings.warn(
                f"{', '.join(odd)}: output size not a multiple of {fp8.BLOCK}; vLLM loads "
                "block-scaled fused layers only in whole blocks",
                stacklevel=3,
            )
    if any(m == "lm_head" or m.endswith(".lm_head") for m in quantized):
        warnings.warn(
            "lm_head is quantized: transformers reads it, but vLLM keeps lm_head in 16 bits "
            "and will not load this checkpoint",
            stacklevel=3,
        )


def load_calibration(path: str) -> torch.Tensor:
    """Token ids `[sequences, length]` (int) from a .safetensors file ("input_ids") or a file
    torch.load reads (a tensor or a dict with "input_ids")."""
    if not os.path.isfile(path):
        raise CheckpointError(f"calibration file {path} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and pickle raise their own types
        raise CheckpointError(f"calibration file {path} cannot be read: {err}") from None
    ids = data.get("input_ids") if isinstance(data, dict) else data
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise CheckpointError(
            f"{path} must hold integer input_ids [sequences, length]; got {type(ids).__name__}"
        )
    return ids.long()


def calibrate_checkpoint(
    src: str,
    input_ids: torch.Tensor,
    modules: set[str],
    observer: str = "absmax",
    device: str | None = None,
):
    """Static input scales of `modules` and KV-cache scales, from running the checkpoint on
    `input_ids` on `device` (default: the GPU if there is one). The model runs through HF
    transformers until fp8nemo's own model lands."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise CheckpointError(
            "static activations need calibration runs of the model, which need HF transformers "
            "(pip install transformers) until fp8nemo's model wrapper exists"
        ) from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto").to(device)
    calib = Calibrator(model, observer, linear_filter=lambda name, _: name in modules)
    batches = [input_ids[i : i + CALIB_BATCH] for i in range(0, input_ids.shape[0], CALIB_BATCH)]
    calib.run(batches, forward=lambda model, ids: model(ids.to(device)))
    return calib.input_scales(), calib.kv_scales()


def quantize_checkpoint(
    src: str,
    dst: str,
    *,
    scheme: str = "channel",
    activations: str = "dynamic",
    calib: str | None = None,
    format: str = "compressed-tensors",
    method: str = "absmax",
    observer: str = "absmax",
    keep: Iterable[str] = DEFAULT_KEEP,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = None,
) -> list[LayerReport]:
    """Quantize the 16-bit checkpoint folder `src` into `dst` (see the module docstring);
    returns one report per quantized layer. Everything is checked before anything is
    written, and `dst` appears only when complete."""
    if scheme not in fp8.WEIGHT_GRANULARITIES:
        raise CheckpointError(f"scheme must be one of {fp8.WEIGHT_GRANULARITIES}; got {scheme!r}")
    if activations not in ("dynamic", "static"):
        raise CheckpointError(f"activations must be dynamic or static; got {activations!r}")
    if method not in WEIGHT_METHODS:
        raise CheckpointError(f"method must be one of {WEIGHT_METHODS}; got {method!r}")
    if format not in WRITE_FORMATS:
        raise CheckpointError(f"format must be one of {WRITE_FORMATS}; got {format!r}")
    static = activations == "static"
    if static and calib is None:
        raise CheckpointError(
            "static activations need calibration data: pass calib (a file of input_ids)"
        )
    if not static and calib is not None:
        raise CheckpointError("calibration data applies to static activations only")
    config = read_config(src)
    fmt, _ = detect_format(src, config)
    if fmt != "unquantized":
        raise CheckpointError(f"{src} is already quantized ({fmt}); quantize a 16-bit checkpoint")
    source = TensorSource(src)
    modules, kept = linear_weights(source, tuple(keep))
    if not modules:
        raise CheckpointError(f"{src} has no 16-bit linear weights to quantize")
    # Fails here, before any work, on a combination the format or vLLM cannot take.
    quantization_config(format, scheme, activations, kept, static)
    check_layers(modules, kept, {m: source.shape(f"{m}.weight") for m in modules}, scheme)
    weights = {f"{m}.weight": m for m in modules}

    input_scales, kv_scales = {}, {}
    if static:
        input_scales, kv_scales = calibrate_checkpoint(
            src, load_calibration(calib), set(modules), observer, device
        )
        missing = sorted(set(modules) - input_scales.keys())
        if missing:
            raise CheckpointError(
                f"calibration found no nn.Linear for {', '.join(missing[:4])}"
                f"{' ...' if len(missing) > 4 else ''}: no static input scale for them"
            )

    reports = []
    names = source.keys()
    with CheckpointWriter(dst, overwrite=overwrite, source=src) as out:
        for name in show_progress(names, "quantize", "tensor", progress):
            tensor = source[name]
            if name not in weights:
                out.add(name, tensor)
                continue
            module = weights[name]
            try:
                q = calibrate_weight(tensor, scheme, method)
            except ValueError as err:
                raise CheckpointError(f"{name}: {err}") from None
            layer = QuantizedLinear(q.w_fp8, q.scale, scheme, input_scales.get(module))
            for item in format_tensors(format, module, layer):
                out.add(*item)
            reports.append(LayerReport(module, tuple(tensor.shape), scheme, q.method, q.on_grid,
                                       q.grid_fraction, q.sqnr_db, q.max_abs_err))  # fmt: skip
        for attention, scales in kv_scales.items():
            for item in kv_tensors(format, attention, scales):
                out.add(*item)
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        config["quantization_config"] = quantization_config(
            format, scheme, activations, kept, bool(kv_scales)
        )
        out.finish(config)
    return reports
