"""Where and how the Triton kernels run: interpreter detection, the hardware check, launch configs
and the autotuner every op shares."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
import triton
import triton.language as tl

import fp8nemo
from fp8nemo import fp8 as fp8_ref

logger = logging.getLogger("fp8nemo")


@triton.jit
def _probe_kernel():
    pass


# `triton.jit` returns an interpreted function when TRITON_INTERPRET was set at decoration time;
# asking a decorated function is the one answer that cannot disagree with the kernels below.
INTERPRET: bool = not isinstance(_probe_kernel, triton.runtime.JITFunction)

# FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer.
MIN_CAPABILITY = (8, 9)


def _fix_interpreter() -> None:
    """Make the interpreter's float conversions and bf16 dots compute what the GPU does.

    The interpreter converts between float formats with its own bit manipulation, which
    truncates fp32 -> bf16, rounds the carry of fp8 mantissas into the wrong exponent, flushes
    fp8 subnormals, turns NaN into 384 when narrowing to e4m3 and reads the e4m3 NaN code as 480.
    The GPU converts with round-to-nearest-even and, for FP8, `cvt.rn.satfinite` (saturate,
    NaN stays NaN). We route the conversions torch knows through torch with those semantics, so
    the interpreter computes what the compiled kernel computes.
    """
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_convert_float") or not hasattr(interpreter, "_ir"):
        logger.warning(
            "fp8nemo: this Triton's interpreter differs from 3.6-3.9; float casts unfixed"
        )
        return
    if getattr(interpreter._convert_float, "_fp8nemo", False):
        return
    original = interpreter._convert_float
    torch_dtypes = {
        tl.float32: torch.float32,
        tl.float16: torch.float16,
        tl.bfloat16: torch.bfloat16,
        tl.float8e4nv: torch.float8_e4m3fn,
        tl.float8e5: torch.float8_e5m2,
    }
    # Same-width integer views carry the bits between numpy and torch.
    np_int = {1: np.int8, 2: np.int16, 4: np.int32}
    torch_int = {1: torch.int8, 2: torch.int16, 4: torch.int32}
    rtz = interpreter._ir.ROUNDING_MODE.RTZ

    def convert(input, input_dtype, output_dtype, rounding_mode):
        src, dst = torch_dtypes.get(input_dtype), torch_dtypes.get(output_dtype)
        if src is None or dst is None or rounding_mode == rtz:
            return original(input, input_dtype, output_dtype, rounding_mode)
        arr = np.ascontiguousarray(input)
        x = torch.from_numpy(arr.view(np_int[src.itemsize]).copy()).view(src).float()
        if dst.itemsize == 1:
            x = x.clamp(-torch.finfo(dst).max, torch.finfo(dst).max)  # satfinite; NaN stays NaN
        out = x.to(dst).view(torch_int[dst.itemsize]).numpy()
        return out.view(np.dtype(f"uint{8 * dst.itemsize}")).reshape(arr.shape)

    convert._fp8nemo = True
    interpreter._convert_float = convert

    # tl.dot multiplies bf16 operands as the uint16 arrays the interpreter stores them in; the
    # tensor cores multiply their values (exactly, in fp32). Widen bf16 operands first.
    if not hasattr(interpreter, "TensorHandle") or not hasattr(
        interpreter.InterpreterBuilder, "create_dot"
    ):
        logger.warning(
            "fp8nemo: this Triton's interpreter has no create_dot to fix; bf16 dots may be wrong"
        )
        return
    original_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        def widen(x):
            if x.dtype.scalar != tl.bfloat16:
                return x
            data = convert(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
            return interpreter.TensorHandle(data, tl.float32)

        return original_dot(self, widen(a), widen(b), d, *args)

    interpreter.InterpreterBuilder.create_dot = create_dot


if INTERPRET:
    _fix_interpreter()


@functools.cache
def _check_capability(index: int) -> None:
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(index)
        raise RuntimeError(
            f"fp8nemo's FP8 kernels need FP8 tensor cores (compute capability 8.9 or 9.0+); "
            f"cuda:{index} is {name} with capability {major}.{minor}. Use the fp16 reference "
            f"backend on this GPU, or an Ada/Hopper GPU (L4, L40S, RTX 4090, H100, H200)."
        )
    logger.info("fp8nemo: cuda:%d has compute capability %d.%d", index, major, minor)


def use_triton(device: torch.device, op: str) -> bool:
    """True when `op` runs its Triton kernel on `device`, False for the torch reference path.

    CUDA always runs the compiled kernel (never a silent fallback); CPU runs the same kernel
    through the interpreter when TRITON_INTERPRET=1, otherwise the torch emulation.
    """
    if INTERPRET:
        return True
    if device.type == "cuda":
        _check_capability(device.index if device.index is not None else torch.cuda.current_device())
        return True
    _warn_torch_path(op)
    return False


@functools.cache
def _warn_torch_path(op: str) -> None:
    logger.warning(
        "fp8nemo: %s on CPU runs the torch emulation of the FP8 numerics; set TRITON_INTERPRET=1 "
        "before importing triton to run the Triton kernel through the interpreter instead",
        op,
    )


@functools.cache
def capability(device: torch.device) -> tuple[int, int]:
    """The compute capability configs are chosen for; the interpreter reports (0, 0)."""
    if INTERPRET or device.type != "cuda":
        return (0, 0)
    return torch.cuda.get_device_capability(device)


@functools.cache
def num_sms(device: torch.device) -> int:
    if INTERPRET or device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


@dataclass
class KernelConfig:
    """One launch configuration: named meta-parameters plus warps and pipeline stages."""

    name: str
    meta: dict[str, int] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3

    def __repr__(self) -> str:
        return self.name


def m_bucket(m: int) -> int:
    """The autotune key for a row count: the next power of two, so decode batches of 3 and 4
    share one tuning (torchao's M_BUCKET)."""
    return triton.next_power_of_2(max(m, 1))


def bench(fn: Callable[[], object]) -> float:
    """Median milliseconds of one call of `fn` on the GPU: the number the autotuner compares."""
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def timing_enabled() -> bool:
    """Whether the autotuner times candidates: not through the interpreter (no GPU to time),
    not with FP8NEMO_AUTOTUNE=0."""
    return not INTERPRET and os.environ.get("FP8NEMO_AUTOTUNE", "1") != "0"


def device_name(device: torch.device) -> str:
    """The GPU a tuning is valid for (configs are timed per GPU model, not per index)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def cache_dir() -> str:
    """$FP8NEMO_CACHE_DIR, else $XDG_CACHE_HOME/fp8nemo, else ~/.cache/fp8nemo."""
    if os.environ.get("FP8NEMO_CACHE_DIR"):
        return os.environ["FP8NEMO_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fp8nemo")


def tuning_header(device: torch.device) -> dict[str, str]:
    """What a tuning file's choices hold for: the GPU and the versions that compiled them."""
    return {
        "device": device_name(device),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "fp8nemo": fp8nemo.__version__,
    }


def tuning_path(device: torch.device) -> str:
    """The JSON file of tuned configs for `device`'s GPU and these versions."""
    h = tuning_header(device)
    slug = f"{h['device']}-triton{h['triton']}-torch{h['torch']}-fp8nemo{h['fp8nemo']}"
    return os.path.join(cache_dir(), f"tuning-{re.sub(r'[^A-Za-z0-9.]+', '-', slug)}.json")


def key_text(key: tuple) -> str:
    """A launcher's key as the tuning file spells it: devices by type (the file is per GPU),
    dtypes without "torch.", e.g. "cuda, token, channel, False, bfloat16, 16, 6144, 5120"."""
    parts = []
    for x in key:
        if isinstance(x, torch.device):
            parts.append(x.type)
        elif isinstance(x, torch.dtype):
            parts.append(str(x).removeprefix("torch."))
        elif x is None or isinstance(x, (bool, int, str)):
            parts.append(str(x))
        else:
            raise TypeError(f"autotune key holds {x!r} ({type(x).__name__}); keys hold "
                            f"devices, dtypes, ints, strings, bools and None")  # fmt: skip
    return ", ".join(parts)


def _key_device(key: tuple) -> torch.device:
    device = next((x for x in key if isinstance(x, torch.device)), None)
    if device is not None:
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_warned: set[tuple[str, str]] = set()


def _warn_once(path: str, kind: str, problem: str) -> None:
    """One warning per file and kind of trouble ("read", "write"), however often it recurs."""
    if (path, kind) not in _warned:
        _warned.add((path, kind))
        logger.warning("fp8nemo: tuning cache %s %s", path, problem)


def _read_tuning(path: str, header: dict[str, str]) -> dict[str, dict[str, str]]:
    """{op: {key text: config name}} from the file at `path`: empty when there is none, or when
    it cannot be read or is not a tuning file for `header` (one warning; the next write
    replaces it)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError):  # no file, or no folder to hold one
        return {}
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bytes that are not UTF-8
        _warn_once(path, "read", f"is ignored (cannot read it: {err}); the next tuned config "
                   "rewrites it")  # fmt: skip
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("configs"), dict):
        problem = 'is not {"device", "triton", "torch", "fp8nemo", "configs": {...}}'
    elif any(data.get(k) != v for k, v in header.items()):
        problem = f"was written for {[data.get(k) for k in header]}, not {list(header.values())}"
    elif not all(
        isinstance(table, dict) and all(isinstance(n, str) for n in table.values())
        for table in data["configs"].values()
    ):
        problem = "has configs that are not {op: {key: config name}}"
    else:
        return data["configs"]
    _warn_once(path, "read", f"is ignored: it {problem}; the next tuned config rewrites it")
    return {}


def _write_tuning(path: str, header: dict[str, str], op: str, key: str, name: str) -> None:
    """Add one choice to the file, merged with what another process may have written since it
    was read; atomically (a temp file in the same folder, then os.replace), so a reader never
    sees half a file. An unwritable folder leaves the choice in memory only (one warning)."""
    configs = _read_tuning(path, header)
    configs.setdefault(op, {})[key] = name
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({**header, "configs": configs}, f, indent=1, sort_keys=True)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as err:
        _warn_once(path, "write", f"cannot be written ({err}); tuned configs stay in this process "
                   "only")  # fmt: skip


@dataclass(frozen=True)
class Decision:
    """One config choice: `source` is "tuned" (timed now and written to the tuning file),
    "cached" (read from it), "single" (the only candidate) or "untimed" (the first candidate:
    interpreter, FP8NEMO_AUTOTUNE=0 or a capturing CUDA graph)."""

    op: str
    key: str
    config: str
    source: str


class Autotuner:
    """Times each candidate config once per key and remembers the fastest, in memory and in the
    JSON file `tuning_path` names, so that a second process reads it instead of re-tuning.

    Unlike `triton.autotune`, it times a whole launch (a split-K GEMM includes its reduction)
    and lets the launcher choose among configs that need different buffers. The interpreter
    and FP8NEMO_AUTOTUNE=0 take the first candidate without timing and leave the file alone; a
    capturing CUDA graph takes the stored choice, else the first candidate. A stored choice
    counts only while its config is still among the candidates.
    """

    # Every choice any tuner made in this process, in order (`fp8nemo tune` prints them).
    decisions: ClassVar[list[Decision]] = []

    def __init__(self, op: str):
        self.op = op
        self.cache: dict[tuple, KernelConfig] = {}

    def _decide(self, key: tuple, config: KernelConfig, source: str, keep=True) -> KernelConfig:
        Autotuner.decisions.append(Decision(self.op, key_text(key), config.name, source))
        if keep:
            self.cache[key] = config
        return config

    def choose(
        self,
        key: tuple,
        candidates: Callable[[], Sequence[KernelConfig]],
        launch: Callable[[KernelConfig], object],
    ) -> KernelConfig:
        """The config for `key`; `candidates()` is only built on a cache miss, so a tuned
        decode step pays no host time for pruning."""
        if key in self.cache:
            return self.cache[key]
        candidates = candidates()
        if not candidates:
            raise RuntimeError(f"{self.op}: no launch config fits key {key}")
        if len(candidates) == 1:
            return self._decide(key, candidates[0], "single")
        if not timing_enabled():
            return self._decide(key, candidates[0], "untimed")
        device = _key_device(key)
        path, header, text = tuning_path(device), tuning_header(device), key_text(key)
        stored = _read_tuning(path, header).get(self.op, {}).get(text)
        by_name = {c.name: c for c in candidates}
        if stored in by_name:
            logger.info("fp8nemo: %s %s -> %s (from %s)", self.op, text, stored, path)
            return self._decide(key, by_name[stored], "cached")
        if stored is not None:
            logger.info("fp8nemo: %s %s: stored config %s is no longer a candidate; re-tuning",
                        self.op, text, stored)  # fmt: skip
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            logger.warning(
                "fp8nemo: %s key %s was not tuned before CUDA graph capture; using %s",
                self.op,
                text,
                candidates[0],
            )
            return self._decide(key, candidates[0], "untimed", keep=False)  # tune after capture
        times = {}
        for config in candidates:
            try:
                times[config.name] = bench(lambda config=config: launch(config))
            except triton.runtime.errors.OutOfResources as err:
                logger.info("fp8nemo: %s config %s skipped: %s", self.op, config, err)
        if not times:
            raise RuntimeError(f"{self.op}: every launch config ran out of resources for {key}")
        best = min(candidates, key=lambda c: times.get(c.name, float("inf")))
        logger.info(
            "fp8nemo: %s tuned %s -> %s (%.1f us)", self.op, text, best, times[best.name] * 1e3
        )
        _write_tuning(path, header, self.op, text, best.name)
        return self._decide(key, best, "tuned")


# One library fragment per namespace; every op file registers into it.
LIBRARY = torch.library.Library("fp8nemo", "FRAGMENT")


def register_op(schema: str, impl: Callable, fake: Callable) -> None:
    """Define `fp8nemo::<schema>` with one implementation for CPU and CUDA and a fake for
    tracing. The implementation validates its inputs and picks the Triton or torch path."""
    name = schema.split("(", 1)[0]
    LIBRARY.define(schema)
    LIBRARY.impl(name, impl, "CPU")
    LIBRARY.impl(name, impl, "CUDA")
    torch.library.register_fake(f"fp8nemo::{name}", fake, lib=LIBRARY)


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_types(**named: tuple[object, type | tuple[type, ...]]) -> None:
    """TypeError naming the first argument whose value is not of its allowed type(s). A bool is
    not taken for an int or float (True is an int to Python, not a window or a scale)."""
    for name, (value, types) in named.items():
        types = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            allowed = " or ".join(
                "None"
                if t is type(None)
                else t.__qualname__
                if t.__module__ == "builtins"
                else f"{t.__module__}.{t.__qualname__}"
                for t in types
            )
            raise TypeError(f"{name} must be {allowed}; got {type(value).__name__}")


def check_tensor(
    name: str, t: object, dtypes: Sequence[torch.dtype] | None = None, ndim: int | None = None
) -> torch.Tensor:
    """TypeError/ValueError naming `name` unless `t` is a tensor of an allowed dtype and rank."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {dtype_names(dtypes)}; got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {list(t.shape)}")
    return t


_VALUE_CHECKS = contextvars.ContextVar("fp8nemo_value_checks", default=True)


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the ops' host-side checks of index values (positions, slots, lengths) on or off
    inside the block. Each check costs a device sync; a caller that validated its indices once
    (the model, per forward) runs its ops inside `value_checks(False)`, and the kernels then keep
    their memory accesses in bounds themselves."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool; got {type(enabled).__name__}")
    token = _VALUE_CHECKS.set(enabled)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def value_checks_enabled(t: torch.Tensor) -> bool:
    """Whether to read `t`'s values on the host for checks: not for meta/fake tensors, not while
    a CUDA graph captures, and not inside `value_checks(False)`."""
    if t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor):
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return _VALUE_CHECKS.get()


def check_in_range(name: str, t: torch.Tensor, low: int, high: int, what: str) -> None:
    """ValueError unless every value of the integer tensor `t` lies in [low, high)."""
    if t.numel() == 0 or not value_checks_enabled(t):
        return
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < low or hi >= high:
        raise ValueError(f"{name} must lie in [{low}, {high}) ({what}); got values in [{lo}, {hi}]")


def check_positive_finite(name: str, value: float | torch.Tensor | None) -> None:
    """ValueError unless `value` (a number, or every element of a tensor where value checks run)
    is positive and finite: a scale of 0, a negative, NaN or inf one turns finite input into
    NaN/inf without a word."""
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        if value.numel() == 0 or not value_checks_enabled(value):
            return
        bad = ~(value.isfinite() & (value > 0))
        if not bad.any():
            return
        seen = value[bad].flatten()[0].item()
        raise ValueError(
            f"{name} must be positive and finite; got {seen} "
            f"({int(bad.sum())} of {value.numel()} elements are not)"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite; got {value}")


def check_scales(scales: dict, fp8: bool, what: str, shape: tuple, shape_text: str) -> None:
    """fp32 dequant scales, given exactly when the data (`what`) is e4m3: each one element (per
    tensor, any shape) or of `shape`, and positive and finite."""
    names = list(scales)
    listed = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    for name, t in scales.items():
        if not fp8:
            if t is not None:
                raise ValueError(f"{name} applies to {what} only")
            continue
        if t is None:
            raise ValueError(f"{what} needs {listed}; {name} is None")
        check_tensor(name, t, (torch.float32,))
        if not fp8_ref.is_per_tensor(t) and tuple(t.shape) != tuple(shape):
            raise ValueError(
                f"{name} must be {shape_text} or one element (per tensor); got {list(t.shape)}"
            )
        check_positive_finite(name, t)


def descale_strides(descale: torch.Tensor | None) -> tuple[int, int]:
    """(batch, head) strides of a [B, Hk] descale as a kernel reads it; one element broadcasts."""
    if descale is None or fp8_ref.is_per_tensor(descale):
        return 0, 0
    return descale.stride(0), descale.stride(1)


def check_same_device(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors on one CUDA or CPU device (meta for shape propagation); returns it."""
    named = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = named[0]
    device = first.device
    if device.type not in ("cuda", "cpu", "meta"):
        raise ValueError(
            f"{first_name} is on {device}; fp8nemo runs on CUDA (compiled Triton kernels) or CPU "
            f"(Triton interpreter or torch emulation)"
        )
    for name, t in named[1:]:
        if t.device != device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {device}; "
                f"all tensors must be on one device"
            )
    return device


def _layout(t: torch.Tensor) -> tuple[int, list[tuple[int, int]]]:
    """(first byte in its storage, [(size, byte stride)] outermost first) of `t`: size-1 dims
    dropped, the element's own bytes as the innermost dim."""
    size = t.element_size()
    dims = sorted(
        ((n, s * size) for n, s in zip(t.shape, t.stride(), strict=True) if n > 1),
        key=lambda dim: -dim[1],
    )
    return t.storage_offset() * size, [*dims, (size, 1)]


def _extent(dims) -> int:
    return sum((n - 1) * s for n, s in dims)


def _self_overlaps(dims) -> bool:
    """Whether two elements share a byte: unless each stride clears everything the dims inside
    it reach (a stride-0 dim of size > 1 never does)."""
    reach = -1
    for n, s in reversed(dims):
        if s <= reach:
            return True
        reach += (n - 1) * s
    return False


def _may_meet(a0: int, a: list, b0: int, b: list) -> bool:
    """Whether byte sets {a0 + sum i_d s_d} and {b0 + ...} of two self-disjoint layouts meet.
    Exact where they share their outer stride (views of one buffer: q and k of a fused qkv) or
    few rows of one cross the other; otherwise it answers True (refusing, not guessing)."""
    if a0 + _extent(a) < b0 or b0 + _extent(b) < a0:
        return False
    if not a and not b:
        return True
    if a and b and a[0][1] == b[0][1]:
        # Rows of one pitch s: row i of a meets row j of b only where i - j = k puts them less
        # than a row apart (every inner extent is below s), which leaves two values of k.
        (na, s), (nb, _) = a[0], b[0]
        delta = b0 - a0
        return any(
            -(nb - 1) <= k <= na - 1 and _may_meet(0, a[1:], delta - k * s, b[1:])
            for k in {delta // s, -(-delta // s)}
        )
    if not a or (b and b[0][1] > a[0][1]):
        a0, a, b0, b = b0, b, a0, a
    # Split the layout with the wider outer stride into its rows that cross the other's range.
    (n, s), inner = a[0], a[1:]
    first = max(0, -(-(b0 - _extent(inner) - a0) // s))
    last = min(n - 1, (b0 + _extent(b) - a0) // s)
    if last - first >= 64:
        return True
    return any(_may_meet(a0 + i * s, inner, b0, b) for i in range(first, last + 1))


def check_no_overlap(written: dict, read: dict) -> None:
    """ValueError unless every tensor in `written` (written in place by the op) has no two
    elements in one place and shares no byte with another argument. Reads shapes, strides and
    storages only: no device sync, valid under CUDA graphs and on fake tensors."""
    named = {n: t for n, t in {**written, **read}.items() if t is not None and t.numel() > 0}
    for name in written:
        t = named.get(name)
        if t is not None and not t.is_contiguous() and _self_overlaps(_layout(t)[1]):
            raise ValueError(
                f"{name} is written in place but several of its elements share memory (shape "
                f"{list(t.shape)}, strides {list(t.stride())}: a stride-0 dim of size > 1, e.g. "
                f"from expand); pass a tensor with its own memory (.contiguous())"
            )
    storages = {n: (t.device, t.untyped_storage()._cdata) for n, t in named.items()}
    layouts = {}
    names = list(named)
    for i, name in enumerate(names):
        for other in names[i + 1 :]:
            if (name not in written and other not in written) or storages[name] != storages[other]:
                continue
            for n in (name, other):
                layouts.setdefault(n, _layout(named[n]))
            (a0, a), (b0, b) = layouts[name], layouts[other]
            if _may_meet(a0, a, b0, b):
                which = (
                    "both are" if name in written and other in written
                    else f"{name if name in written else other} is"
                )  # fmt: skip
                raise ValueError(
                    f"{name} and {other} share memory and {which} written in place; pass "
                    f"tensors that do not overlap"
                )


# Passed to every launch: FMA contraction stays on whatever Triton's default becomes (3.9 warns
# that 3.10 turns it off), so compiled numerics don't change under a Triton upgrade.
COMPILE_OPTIONS = {"enable_fp_fusion": True}


@dataclass
class Launch:
    """One kernel launch, `kernel[grid](*args, **kwargs)`, kept as data so that `fp8nemo inspect`
    compiles exactly the specializations the launchers run."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def launch(kernel, grid, *args, num_warps=4, num_stages=3, **constexprs) -> Launch:
    return Launch(
        kernel,
        grid,
        args,
        dict(constexprs, num_warps=num_warps, num_stages=num_stages, **COMPILE_OPTIONS),
    )


@dataclass
class AotSpec:
    """One launch to compile ahead of time: the launcher's own `Launch` (built on meta tensors),
    with the MMA kind its SASS must contain, if any."""

    op: str
    config: str
    launch: Launch
    expect_mma: str | None = None

    @property
    def name(self) -> str:
        return self.launch.kernel.__name__
