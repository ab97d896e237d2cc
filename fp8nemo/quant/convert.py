"""Quantize a 16-bit HF checkpoint into an FP8 one: every linear weight but the kept ones gets
per-tensor, per-channel or 128x128-block scales (exact for weights already on an FP8 grid), and
static activation and KV-cache scales come from calibration batches. The weights stream tensor
by tensor (memory: a few times the largest weight, plus a shard being written); static
calibration runs the whole model, on the GPU when there is one."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from fp8nemo import fp8
from fp8nemo.utils import progress as show_progress

from .calibrate import WEIGHT_METHODS, calibrate_weight
from .checkpoint import (
    FLOAT_WEIGHTS,
    WRITE_FORMATS,
    CheckpointError,
    CheckpointWriter,
    FP8Weight,
    TensorSource,
    check_dtypes,
    detect_format,
    format_tensors,
    is_linear_weight,
    kv_tensors,
    quantization_config,
    read_config,
)
from .files import field

# Layers kept in 16 bits by default (embeddings are lookups, never quantized). vLLM keeps
# lm_head in 16 bits whatever the checkpoint says.
DEFAULT_KEEP = ("lm_head",)
# Layers vLLM fuses into one GEMM: all quantized or all kept, and block-scaled only when each
# one's output size is a multiple of 128.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# (src, input_ids, modules, observer, device) -> ({linear: input_scale}, {attention: k/v scales})
Calibrate = Callable[[str, torch.Tensor, set, str, torch.device], tuple[dict, dict]]
# config.json sizes that must be positive ints (and agree with the tensors where they show).
SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings")  # fmt: skip


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
        if not is_linear_weight(name, src.shape(name)) or src.dtype_name(name) not in FLOAT_WEIGHTS:
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


def check_sizes(config: dict, src: TensorSource) -> None:
    """config.json's sizes are positive ints within what the tensors present can hold (no more
    layers than tensors, no size above the largest tensor dimension; the layer count exactly
    where the names show it), so a hostile config cannot make calibration build a huge model.
    `config` may be a dict of a transformers config's resolved attributes."""
    n_tensors = len(src.keys())
    largest = max((d for n in src for d in src.shape(n)), default=0)
    for key in SIZES:
        value = field(config, key, int, "config.json")
        if value is None:
            continue
        if value <= 0:
            raise CheckpointError(f"config.json: {key} must be positive; got {value}")
        if key == "num_hidden_layers" and value > n_tensors:
            raise CheckpointError(
                f"config.json: num_hidden_layers = {value}, but the checkpoint holds only "
                f"{n_tensors} tensors"
            )
        if key not in ("num_hidden_layers", "max_position_embeddings") and value > largest:
            raise CheckpointError(
                f"config.json: {key} = {value} is larger than every tensor dimension of the "
                f"checkpoint (the largest is {largest})"
            )
    layers = {int(m.group(1)) for n in src if (m := re.search(r"(?:^|\.)layers\.(\d+)\.", n))}
    n_layers = config.get("num_hidden_layers")
    # Distinct ints >= 0: they are range(n) when there are n of them and the largest is n - 1.
    if n_layers is not None and layers and (len(layers), max(layers)) != (n_layers, n_layers - 1):
        held = f"layers 0..{max(layers)}" if max(layers) == len(layers) - 1 else "other layers"
        raise CheckpointError(
            f"config.json: num_hidden_layers = {n_layers}, but the checkpoint holds {held} "
            f"({len(layers)} in all)"
        )


def load_calibration(path: str, vocab_size: int | None = None) -> torch.Tensor:
    """Token ids `[sequences, length]` (int, each in [0, vocab_size)) from a .safetensors file
    ("input_ids") or a file torch.load reads (a tensor or a dict with "input_ids")."""
    if not os.path.isfile(path):
        what = "is not a regular file" if os.path.exists(path) else "does not exist"
        raise CheckpointError(f"calibration file {path} {what}")
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
    if ids.dtype == torch.bool or ids.is_complex() or ids.numel() == 0:
        raise CheckpointError(
            f"{path}: input_ids must be a non-empty integer [sequences, length]; got "
            f"{ids.dtype} {list(ids.shape)}"
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab_size is not None and hi >= vocab_size):
        raise CheckpointError(
            f"{path}: input_ids must lie in [0, vocab_size = {vocab_size}); got values in "
            f"[{lo}, {hi}]"
        )
    return ids.long()


def calibration_device(device: str | None) -> torch.device:
    """Where static calibration runs: `device`, checked, or the GPU if there is one."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CheckpointError(f"device {device!r} is not a device (cpu, cuda, cuda:1)") from None
    if dev.type not in ("cpu", "cuda"):
        raise CheckpointError(f"device must be cpu or cuda[:index]; got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(
                f"device {device!r}: torch {torch.__version__} sees no CUDA GPU on this machine"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CheckpointError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    return dev


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
    calibrate: Calibrate | None = None,
) -> list[LayerReport]:
    """Quantize the 16-bit checkpoint folder `src` into `dst` (see the module docstring);
    returns one report per quantized layer. Everything is checked before anything is
    written, and `dst` appears only when complete.

    Static activations need `calibrate(src, input_ids, modules, observer, device) ->
    (input_scales, kv_scales)`, which runs a model: `fp8nemo.model.calibrate_checkpoint`
    (this package sits below the model and never imports it)."""
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
    if not static and device is not None:
        raise CheckpointError("device applies to static activations (calibration) only")
    device = calibration_device(device) if static else None
    config = read_config(src)
    fmt, _ = detect_format(src, config)
    if fmt != "unquantized":
        raise CheckpointError(f"{src} is already quantized ({fmt}); quantize a 16-bit checkpoint")
    source = TensorSource(src)
    check_dtypes(source, fmt)  # what read_checkpoint would refuse in the output, refused here
    check_sizes(config, source)
    modules, kept = linear_weights(source, tuple(keep))
    if not modules:
        raise CheckpointError(f"{src} has no 16-bit linear weights to quantize")
    # Fails here, before any work, on a combination the format or vLLM cannot take.
    quantization_config(format, scheme, activations, kept, static)
    check_layers(modules, kept, {m: source.shape(f"{m}.weight") for m in modules}, scheme)
    weights = {f"{m}.weight": m for m in modules}

    ids = load_calibration(calib, config.get("vocab_size")) if static else None
    if static and calibrate is None:
        raise CheckpointError(
            "static activations need calibration runs of a model: pass "
            "calibrate=fp8nemo.model.calibrate_checkpoint"
        )

    reports = []
    names = source.keys()
    # The writer checks dst now, before calibration spends minutes on a run it would refuse.
    with CheckpointWriter(dst, overwrite=overwrite, source=src) as out:
        input_scales, kv_scales = {}, {}
        if static:
            input_scales, kv_scales = calibrate(src, ids, set(modules), observer, device)
            missing = sorted(set(modules) - input_scales.keys())
            if missing:
                raise CheckpointError(
                    f"calibration found no nn.Linear for {', '.join(missing[:4])}"
                    f"{' ...' if len(missing) > 4 else ''}: no static input scale for them"
                )
        for i, name in enumerate(show_progress(names, "quantize", "tensor", progress)):
            if i + 1 < len(names):  # the disk reads the next tensor while this one converts
                source.prefetch(names[i + 1])
            tensor = source[name]
            if name not in weights:
                out.add(name, tensor)
                continue
            module = weights[name]
            try:
                q = calibrate_weight(tensor, scheme, method)
            except ValueError as err:
                raise CheckpointError(f"{name}: {err}") from None
            del tensor
            source.release(name)  # its pages: the 16-bit weight is never held beside the rest
            layer = FP8Weight(q.w_fp8, q.scale, scheme, input_scales.get(module))
            for item in format_tensors(format, module, layer):
                out.add(*item)
            reports.append(LayerReport(module, tuple(q.w_fp8.shape), scheme, q.method, q.on_grid,
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
