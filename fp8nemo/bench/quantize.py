"""The quantize suite: `fp8nemo quantize`'s speed (MB/s of 16-bit linear weights converted)
and peak host memory per scheme and method, beside the floor a user compares it with: a plain
torch absmax per-channel conversion of the same tensors (read, amax, divide, saturating cast,
safetensors write), with no grid search.

Each case runs in its own process, timed inside it around the work alone (imports and start-up
excluded, for both), so each row's peak RSS is that case's own."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile

from .harness import Row, case_fields, fmt

SCHEMES = ("tensor", "channel", "block")
METHODS = ("absmax", "mse")
# The synthetic checkpoint: NeMo-12B's layer shapes, random bf16 weights, a small vocabulary
# (the embeddings are copied, not converted); layers per machine.
CPU_LAYERS, GPU_LAYERS = 1, 4

_CASE = r"""
import json, resource, sys, time
import torch
src, dst, impl, scheme, method = sys.argv[1:6]
torch.set_num_threads(torch.get_num_threads())
start = time.perf_counter()
if impl == "fp8nemo":
    from fp8nemo.quant.convert import quantize_checkpoint
    quantize_checkpoint(src, dst, scheme=scheme, method=method, progress=False)
else:  # the floor: absmax per channel, no grid search
    import os
    from safetensors.torch import save_file
    from fp8nemo.quant.convert import linear_weights
    from fp8nemo.quant.files import TensorSource
    source = TensorSource(src)
    modules, _ = linear_weights(source, ())
    out = {}
    for m in modules:
        w = source[m + ".weight"].float()
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 448
        out[m + ".weight"] = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        out[m + ".weight_scale"] = scale
    os.makedirs(dst, exist_ok=True)
    save_file(out, os.path.join(dst, "model.safetensors"))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "peak": peak}))
"""


def cases(on_gpu: bool, shapes=None, ms=None, model: str | None = None):
    """(checkpoint, impl, scheme, method): every scheme and method of fp8nemo, then the floor,
    on the synthetic NeMo-12B-shaped checkpoint, or on `model` (a checkpoint folder or a
    preset name for a synthetic one)."""
    work = Workload(model, on_gpu)
    for scheme in SCHEMES:
        for method in METHODS:
            yield work, "fp8nemo", scheme, method
    yield work, "torch absmax (floor)", "channel", "absmax"


class Workload:
    """The source checkpoint, written to a temporary folder when synthetic and first needed."""

    def __init__(self, model: str | None, on_gpu: bool):
        self.model = model or "nemo-12b"
        self.layers = GPU_LAYERS if on_gpu else CPU_LAYERS
        self._tmp = None
        self._path = model if model and os.path.isdir(model) else None

    @property
    def label(self) -> str:
        if self._path == self.model:
            return os.path.basename(os.path.normpath(self.model))
        return f"{self.model} x{self.layers} layers (random bf16)"

    def path(self) -> str:
        if self._path is None:
            import torch

            from fp8nemo.model import preset
            from fp8nemo.model.loader import write_random_checkpoint

            config = preset(self.model)
            layers = min(self.layers, config.num_hidden_layers)
            config = dataclasses.replace(config, num_hidden_layers=layers, vocab_size=1024)
            self._tmp = tempfile.TemporaryDirectory(prefix="fp8nemo-bench-quantize-")
            self._path = write_random_checkpoint(config, os.path.join(self._tmp.name, "src"),
                                                 torch.device("cpu"))  # fmt: skip
        return self._path

    def linear_bytes(self) -> int:
        from fp8nemo.quant.convert import linear_weights
        from fp8nemo.quant.files import TensorSource

        source = TensorSource(self.path())
        modules, _ = linear_weights(source, ())
        total = 0
        for m in modules:
            n = 2  # bytes per 16-bit element
            for d in source.shape(f"{m}.weight"):
                n *= d
            total += n
        return total


def run_case(env, device, work: Workload, impl: str, scheme: str, method: str) -> list[Row]:
    import fp8nemo

    src = work.path()
    root = os.path.dirname(os.path.dirname(fp8nemo.__file__))  # this fp8nemo, not another
    with tempfile.TemporaryDirectory(prefix="fp8nemo-bench-quantize-out-") as tmp:
        environ = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        proc = subprocess.run(
            [sys.executable, "-c", _CASE, src, os.path.join(tmp, "dst"), impl, scheme, method],
            capture_output=True, text=True, env=environ,
        )  # fmt: skip
    nbytes = work.linear_bytes()
    case = case_fields("quantize", work.label, {"MB": round(nbytes / 1e6)}, "float8_e4m3fn",
                       model=work.model)  # fmt: skip
    if proc.returncode != 0:
        if impl == "fp8nemo":
            raise RuntimeError(f"quantize failed: {proc.stderr.strip()[-2000:]}")
        note = f"unavailable: {proc.stderr.strip().splitlines()[-1][:120]}"
        return [Row(**case, impl=impl, scheme=f"{scheme}/{method}", median_ms=None, tflops=None,
                    gbps=None, roofline_pct=None, bound="-", rel_err=None, note=note,
                    env=dataclasses.asdict(env))]  # fmt: skip
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    mbps = nbytes / out["seconds"] / 1e6
    return [Row(**case, impl=impl, scheme=f"{scheme}/{method}", median_ms=out["seconds"] * 1e3,
                tflops=None, gbps=mbps / 1e3, roofline_pct=None, bound="-", rel_err=None,
                note=f"{mbps:.1f} MB/s, peak RSS {out['peak'] / 2**20:.0f} MiB",
                peak_mib=out["peak"] / 2**20, env=dataclasses.asdict(env))]  # fmt: skip


def passed(row: Row) -> bool:
    """No correctness figure: a row passes when it was measured (or is a missing baseline)."""
    return row.impl != "fp8nemo" or (row.gbps is not None and row.gbps > 0)


def _table(env, rows: list[Row]) -> tuple[str, list[tuple[str, ...]]]:
    """The heading and the rows of the side-by-side table: each case's MB/s beside the floor's."""
    head = (f"{env.device}, torch {env.torch}, fp8nemo {env.fp8nemo}, {env.date}: conversion "
            f"on the host CPU (real figures; no Triton kernel runs)")  # fmt: skip
    floor = next((r.gbps for r in rows if r.impl != "fp8nemo" and r.gbps), None)
    table = [("checkpoint", "impl", "scheme/method", "s", "MB/s", "x floor", "peak RSS MiB")]
    for r in rows:
        mbps = None if r.gbps is None else r.gbps * 1e3
        table.append((
            r.shape, r.impl, r.scheme, fmt(None if r.median_ms is None else r.median_ms / 1e3,
                                            ".2f"),
            fmt(mbps, ".1f"), fmt(r.gbps / floor if r.gbps and floor else None, ".2f"),
            fmt(r.peak_mib, ".0f") if r.median_ms is not None else r.note,
        ))  # fmt: skip
    return head, table


def format_table(env, rows: list[Row]) -> str:
    head, table = _table(env, rows)
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(t, widths, strict=True)) for t in table]
    return "\n".join([head, "", *lines])


def format_markdown(env, rows: list[Row]) -> str:
    head, table = _table(env, rows)
    lines = [head, "", "| " + " | ".join(table[0]) + " |", "|---|---|---|" + "---:|" * 4]
    lines += ["| " + " | ".join(t) + " |" for t in table[1:]]
    return "\n".join(lines) + "\n"
