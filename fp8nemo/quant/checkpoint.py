"""FP8 checkpoints in the formats people already have: read AutoFP8 / vLLM "fp8", HF
FineGrainedFP8, compressed-tensors "float-quantized", NVIDIA ModelOpt FP8 and plain 16-bit
HF safetensors checkpoints; write compressed-tensors and AutoFP8 / vLLM ("fp8", or
FineGrainedFP8 for block scales) so that vLLM loads the output.

Every scale read or written is a dequant multiplier, fp32 in memory (x ~= x_fp8 * scale), as
everywhere in fp8nemo; `weight_scale_inv` is one too, despite its name. Writes go to a
temporary folder renamed into place, and never touch the source checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from . import fp8

WRITE_FORMATS = ("compressed-tensors", "fp8")
HF_QUANT_CONFIG = "hf_quant_config.json"  # ModelOpt
SHARD_BYTES = 4 << 30
# Source files a written checkpoint does not carry over: the weights it replaces, their
# index, the config it rewrites, and Mistral's native config (it describes the native weights).
NOT_CARRIED = re.compile(
    r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.gguf|\.h5|\.msgpack|\.index\.json)$"
    r"|^(config\.json|params\.json|hf_quant_config\.json)$"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked."""


@dataclass
class QuantizedLinear:
    """One FP8 linear layer: e4m3 `weight` [N, K], its fp32 `weight_scale` ([1] per tensor,
    [N, 1] per channel, [ceil(N/128), ceil(K/128)] per block) and, for static activations, the
    fp32 `input_scale` [1]."""

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
    unquantized layers)."""

    config: dict
    format: str
    activation_scheme: str | None = None  # "static" / "dynamic"; None when unquantized
    linears: dict[str, QuantizedLinear] = field(default_factory=dict)
    kv_scales: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

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


def _read_json(file: str) -> dict:
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file} is not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} must hold a JSON object; got {type(data).__name__}")
    return data


class TensorSource:
    """The tensors of a (sharded) safetensors checkpoint folder, loaded on demand."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        weight_map = None
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path} holds no .safetensors weights")
        self._handles, self._where = {}, {}
        for name in files:
            file = os.path.join(path, name)
            if not os.path.exists(file):
                raise CheckpointError(f"{file} is listed in the index but missing")
            try:
                handle = safe_open(file, framework="pt")
                keys = list(handle.keys())
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from None
            self._handles[file] = handle
            for key in keys:
                if key in self._where:
                    raise CheckpointError(
                        f"tensor {key} appears in both {self._where[key]} and {file}"
                    )
                self._where[key] = file
        if weight_map is not None:  # the index and the shards must agree, tensor by tensor
            for key, name in sorted(weight_map.items()):
                if self._where.get(key) != os.path.join(path, name):
                    raise CheckpointError(f"{index} lists {key} in {name}, which does not hold it")
            extra = sorted(self._where.keys() - weight_map.keys())
            if extra:
                raise CheckpointError(
                    f"{self._where[extra[0]]} holds {extra[0]}, which {index} does not list"
                )

    def keys(self) -> list[str]:
        return list(self._where)

    def __iter__(self):
        return iter(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except KeyError:
            raise
        except Exception as err:
            raise CheckpointError(
                f"tensor {name} in {self._where[name]} cannot be read: {err}"
            ) from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """The safetensors dtype of `name` ("BF16", "F8_E4M3", ...), read from the header."""
        return self._handles[self._where[name]].get_slice(name).get_dtype()


def read_config(path: str) -> dict:
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} has no config.json")
    return _read_json(file)


def detect_format(path: str, config: dict) -> tuple[str, dict]:
    """(format, its quantization settings) from config.json and hf_quant_config.json."""
    qc = config.get("quantization_config")
    modelopt_file = os.path.join(path, HF_QUANT_CONFIG)
    if qc is None and os.path.exists(modelopt_file):
        qc = {"quant_method": "modelopt", **(_read_json(modelopt_file).get("quantization") or {})}
    if qc is None:
        return "unquantized", {}
    method = qc.get("quant_method")
    if method == "fp8":
        return ("fine-grained-fp8" if qc.get("weight_block_size") else "fp8"), qc
    if method == "compressed-tensors":
        if qc.get("format") not in ("float-quantized", None) and not _all_groups_float(qc):
            raise CheckpointError(
                f"compressed-tensors format {qc.get('format')!r} is not FP8 (need float-quantized)"
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


def _all_groups_float(qc):
    groups = qc.get("config_groups") or {}
    return bool(groups) and all(
        g.get("format", "float-quantized") == "float-quantized" for g in groups.values()
    )


def _ct_scheme(qc: dict) -> tuple[str, str, list]:
    """(weight granularity, activation scheme, ignore) of a compressed-tensors config."""
    groups = qc.get("config_groups") or {}
    if len(groups) != 1:
        raise CheckpointError(
            f"compressed-tensors: one config group is supported; got {len(groups)}"
        )
    (group,) = groups.values()
    w, a = group.get("weights") or {}, group.get("input_activations")
    if w.get("type") != "float" or w.get("num_bits") != 8:
        raise CheckpointError(f"compressed-tensors weights must be 8-bit float; got {w}")
    strategy = w.get("strategy")
    if strategy not in ("tensor", "channel", "block"):
        raise CheckpointError(
            f"compressed-tensors weight strategy {strategy!r} is not supported "
            f"(tensor, channel, block)"
        )
    if strategy == "block" and list(w.get("block_structure") or []) != [fp8.BLOCK, fp8.BLOCK]:
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
    static = not a.get("dynamic", False)
    if static and a.get("strategy") != "tensor":
        raise CheckpointError(
            f"static activations must be per tensor; got strategy {a.get('strategy')!r}"
        )
    return strategy, "static" if static else "dynamic", list(qc.get("ignore") or [])


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
    format into memory; every tensor is checked against the names, shapes and dtypes its
    format prescribes, and a mismatch is a CheckpointError (a ValueError) that names it."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a checkpoint folder")
    config = read_config(path)
    fmt, qc = detect_format(path, config)
    src = TensorSource(path)
    names = set(src.keys())
    ckpt = Checkpoint(config=config, format=fmt)
    fp8_weights = sorted(n for n in names if n.endswith(".weight") and _is_fp8(src, n))
    e5m2 = [n for n in fp8_weights if src.dtype_name(n) == "F8_E5M2"]
    if e5m2:
        raise CheckpointError(f"{e5m2[0]} is FP8 e5m2; fp8nemo's FP8 weights are e4m3")
    if fmt == "unquantized":
        if fp8_weights:
            raise CheckpointError(
                f"{path} has FP8 tensors ({fp8_weights[0]}, ...) but no quantization_config"
            )
        ckpt.tensors = {n: src[n] for n in sorted(names)}
        return ckpt

    if fmt == "fp8":
        granularity = "tensor"
        ckpt.activation_scheme = _activation_scheme(qc)
    elif fmt == "fine-grained-fp8":
        granularity = "block"
        if list(qc["weight_block_size"]) != [fp8.BLOCK, fp8.BLOCK]:
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
        _check_scale(scale_name, scale, weight.shape, granularity)
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
        ckpt.linears[module] = QuantizedLinear(weight, scale.float(), granularity, input_scale)

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
                k, v = src[k_name], src[v_name]
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
    if name not in src:
        raise CheckpointError(f"missing tensor {name} (the scale of {owner})")
    return src[name]


def _check_scale(name, scale, weight_shape=None, granularity="tensor"):
    """A scale's dtype, shape and values: finite, and positive (a weight's scale, the one given
    `weight_shape`, may be 0 where its whole group is)."""
    if not scale.is_floating_point() or scale.dtype in (fp8.E4M3, torch.float8_e5m2):
        raise CheckpointError(f"{name} must be a float scale; got dtype {scale.dtype}")
    values = scale.float()
    low = (values < 0) if weight_shape is not None else (values <= 0)
    bad = ~torch.isfinite(values) | low
    if bad.any():
        raise CheckpointError(
            f"{name} must be finite and positive; holds {values[bad].flatten()[0].item()}"
        )
    if granularity == "tensor":
        ok = scale.numel() == 1 and scale.dim() <= 1
        want = "[] or [1]"
    else:
        want_shape = fp8.scale_shape(weight_shape, granularity)
        ok = tuple(scale.shape) == want_shape
        want = str(list(want_shape))
    if not ok:
        raise CheckpointError(
            f"{name} must have shape {want} for a {granularity} scale; got {list(scale.shape)}"
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


def format_tensors(fmt: str, module: str, q: QuantizedLinear) -> list[tuple[str, torch.Tensor]]:
    """The tensors one quantized linear takes in `fmt`, under their names."""
    if q.weight.dtype != fp8.E4M3 or q.weight.dim() != 2:
        raise CheckpointError(
            f"{module}.weight must be a 2-D e4m3 tensor; got {q.weight.dtype} "
            f"{list(q.weight.shape)}"
        )
    _check_scale(f"{module}.weight_scale", q.weight_scale, q.weight.shape, q.granularity)
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


class CheckpointWriter:
    """Writes a checkpoint folder atomically: shards go to `<dst>.tmp-<pid>`, which replaces
    `dst` only when `finish` has written everything; on an error the temporary folder goes.
    `dst` must be new, empty, or (with `overwrite`) a checkpoint folder, and neither inside
    the source folder nor holding it.

        with CheckpointWriter(dst, source=src) as out:
            out.add(name, tensor) ...
            out.finish(config)
    """

    def __init__(self, dst: str, *, overwrite: bool = False, source: str | None = None,
                 shard_bytes: int = SHARD_BYTES):  # fmt: skip
        dst = os.path.abspath(dst)
        if source is not None:
            real_dst, real_src = os.path.realpath(dst), os.path.realpath(source)
            if os.path.commonpath([real_dst, real_src]) in (real_dst, real_src):
                raise CheckpointError(
                    f"the destination {dst} is, holds or lies inside the source checkpoint "
                    f"{source}; write elsewhere"
                )
        _recover_stale(dst)
        if os.path.exists(dst):
            if not os.path.isdir(dst):
                raise CheckpointError(f"the destination {dst} exists and is not a folder")
            files = sorted(os.listdir(dst))
            is_checkpoint = "config.json" in files or any(f.endswith(".safetensors") for f in files)
            if is_checkpoint and not overwrite:
                raise CheckpointError(
                    f"the destination {dst} already holds a checkpoint; pass overwrite"
                )
            if files and not is_checkpoint:
                raise CheckpointError(
                    f"the destination {dst} holds other files ({files[0]}, ...); overwrite "
                    "replaces only a checkpoint folder"
                )
        self.dst, self.source, self.shard_bytes = dst, source, shard_bytes
        self.tmp = f"{dst}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_size = 0
        self._files: list[dict[str, str]] = []
        self._names: set[str] = set()
        self._done = False

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise CheckpointError(f"tensor {name} written twice")
        self._names.add(name)
        size = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_size + size > self.shard_bytes:
            self._flush()
        self._shard[name] = tensor.detach().cpu().contiguous()
        self._shard_size += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = os.path.join(self.tmp, f"shard-{len(self._files):05d}.safetensors")
        save_file(self._shard, path, metadata={"format": "pt"})
        self._files.append({n: os.path.basename(path) for n in self._shard})
        self._shard, self._shard_size = {}, 0

    def finish(self, config: dict) -> str:
        """Write the last shard, the index and config.json, copy the source's other files
        (tokenizer, generation config, model card), and move the folder into place; returns its
        path."""
        if self._shard or not self._files:
            self._flush()
        n = len(self._files)
        weight_map = {}
        for i, names in enumerate(self._files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(
                os.path.join(self.tmp, f"shard-{i:05d}.safetensors"), os.path.join(self.tmp, final)
            )
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            with open(os.path.join(self.tmp, "model.safetensors.index.json"), "w") as f:
                json.dump(
                    {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2
                )
        with open(os.path.join(self.tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        if self.source is not None:
            for name in sorted(os.listdir(self.source)):
                if not NOT_CARRIED.search(name) and os.path.isfile(os.path.join(self.source, name)):
                    shutil.copy2(os.path.join(self.source, name), os.path.join(self.tmp, name))
        old = f"{self.dst}.old-{os.getpid()}" if os.path.exists(self.dst) else None
        try:
            if old:
                os.replace(self.dst, old)
            os.replace(self.tmp, self.dst)
        except BaseException:
            if old and os.path.exists(old) and not os.path.exists(self.dst):
                os.replace(old, self.dst)  # put the old checkpoint back
            raise
        self._done = True
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return self.dst

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _recover_stale(dst: str) -> None:
    """Clean up after a writer of `dst` that was killed: its temporary folder goes, and an old
    checkpoint it had moved aside comes back if nothing took its place."""
    parent, base = os.path.split(dst)
    if not os.path.isdir(parent):
        return
    pattern = re.compile(re.escape(base) + r"\.(tmp|old)-(\d+)$")
    for name in sorted(os.listdir(parent)):
        m = pattern.match(name)
        if not m or _alive(int(m.group(2))):
            continue
        path = os.path.join(parent, name)
        if m.group(1) == "old" and not os.path.exists(dst):
            os.replace(path, dst)
        else:
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, under another user
        pass
    return True


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
