"""Kernel benchmarks at NeMo-12B shapes beside the baselines a user would pick, with TFLOP/s,
GB/s and % of roofline, written as CSV rows that name the device, versions and date.

Without a GPU the same suites run small shapes through the Triton interpreter; their figures are
labelled "correctness only".
"""

from __future__ import annotations

import csv
import datetime
import functools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch

import fp8nemo
from fp8nemo.quant import fp8 as fp8_ref

# NeMo-12B linear layers, (K, N): in features -> out features.
NEMO_GEMM_SHAPES = {
    "qkv": (5120, 6144),
    "o": (4096, 5120),
    "gate_up": (5120, 28672),
    "down": (14336, 5120),
}
GPU_M = (1, 16, 128, 4096, 16384)
# The interpreter runs the same layers shrunk 32x (multiples of 16) at a few token counts.
CPU_SHRINK = 32
CPU_M = (1, 16, 128)
# (a_scale, b_scale) granularities of each scheme.
GEMM_SCHEMES = {
    "tensor": ("tensor", "tensor"),
    "row": ("token", "channel"),
    "block": ("group", "block"),
}
# Dense tensor-core peaks from the vendors' datasheets, TFLOP/s (fp8, bf16): the roofline's
# compute ceiling. Memory bandwidth is measured at the start of each GPU run instead.
DATASHEET_PEAKS = {
    "H200": (1979.0, 989.0),
    "H100 80GB HBM3": (1979.0, 989.0),
    "H100 SXM": (1979.0, 989.0),
    "H100 NVL": (1671.0, 835.0),
    "H100 PCIe": (1513.0, 756.0),
    "L40S": (733.0, 362.0),
    "L4": (242.5, 121.0),
}
CORRECTNESS_ONLY = "correctness only (Triton interpreter on CPU)"


@dataclass
class Environment:
    date: str
    device: str
    capability: str
    torch: str
    triton: str
    fp8nemo: str
    python: str
    mode: str
    copy_gbps: float | None = None
    peak_fp8_tflops: float | None = None
    peak_bf16_tflops: float | None = None

    @property
    def on_gpu(self) -> bool:
        return self.mode == "gpu"


def environment(device: torch.device) -> Environment:
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        cap = f"{major}.{minor}"
        peaks = next((v for k, v in DATASHEET_PEAKS.items() if k in name), (None, None))
        mode = "gpu"
    else:
        name, cap, peaks, mode = platform.processor() or "cpu", "-", (None, None), CORRECTNESS_ONLY
    return Environment(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        device=name,
        capability=cap,
        torch=torch.__version__,
        triton=triton.__version__,
        fp8nemo=fp8nemo.__version__,
        python=platform.python_version(),
        mode=mode,
        peak_fp8_tflops=peaks[0],
        peak_bf16_tflops=peaks[1],
    )


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median milliseconds per call: CUDA events through do_bench on a GPU, wall clock of a few
    calls on the CPU (where the figure says nothing about speed)."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth, bytes read plus written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


@dataclass
class Row:
    suite: str
    shape: str
    M: int
    N: int
    K: int
    impl: str
    scheme: str
    out_dtype: str
    median_ms: float | None
    tflops: float | None
    gbps: float | None
    roofline_pct: float | None
    bound: str
    rel_err: float | None
    note: str = ""
    env: dict = field(default_factory=dict)


def roofline(env: Environment, flops: float, nbytes: float, ms: float, fp8: bool):
    """(TFLOP/s, GB/s, % of roofline, bound): roofline time = max(flops / peak, bytes / copy bw)."""
    tflops, gbps = flops / ms / 1e9, nbytes / ms / 1e6
    peak = env.peak_fp8_tflops if fp8 else env.peak_bf16_tflops
    if not env.on_gpu or peak is None or env.copy_gbps is None:
        return tflops, gbps, None, "-"
    t_compute, t_memory = flops / (peak * 1e9), nbytes / (env.copy_gbps * 1e6)
    bound = "compute" if t_compute >= t_memory else "memory"
    return tflops, gbps, 100.0 * max(t_compute, t_memory) / ms, bound


def gemm_cases(on_gpu: bool, shapes: Iterable[str] | None = None, ms: Iterable[int] | None = None):
    """(name, M, N, K) for the GEMM suite."""
    for name, (k, n) in NEMO_GEMM_SHAPES.items():
        if shapes and name not in shapes:
            continue
        if not on_gpu:
            k, n = (max(16, 16 * round(v / CPU_SHRINK / 16)) for v in (k, n))
        for m in ms or (GPU_M if on_gpu else CPU_M):
            yield name, m, n, k


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def bench_gemm_case(env, device, name, M, N, K, out_dtype=torch.bfloat16) -> list[Row]:
    """Our fp8_gemm with each scale scheme, torch._scaled_mm per-tensor and rowwise, and bf16
    torch.matmul, all on the same random bf16 activations and weights."""
    from fp8nemo.kernels import fp8_gemm

    gen = torch.Generator(device=device).manual_seed(M * 7 + N * 3 + K)
    x = torch.randn(M, K, device=device, generator=gen).to(torch.bfloat16)
    w = (torch.randn(N, K, device=device, generator=gen) / math.sqrt(K)).to(torch.bfloat16)
    flops = 2.0 * M * N * K
    out_bytes = M * N * out_dtype.itemsize
    rows = []

    def add(impl, scheme, fn, nbytes, fp8, ref=None, note=""):
        try:
            out = fn()
            err = _rel_err(out, ref) if ref is not None else None
            ms = time_ms(fn, device)
            tflops, gbps, pct, bound = roofline(env, flops, nbytes, ms, fp8)
        except (RuntimeError, ValueError, TypeError) as e:  # a baseline this torch/GPU lacks
            ms = tflops = gbps = pct = err = None
            bound, note = "-", f"unavailable: {str(e).splitlines()[0][:120]}"
        rows.append(
            Row("gemm", name, M, N, K, impl, scheme, str(out_dtype).removeprefix("torch."),
                ms, tflops, gbps, pct, bound, err, note)
        )  # fmt: skip

    for scheme, (a_kind, b_kind) in GEMM_SCHEMES.items():
        a, a_s = fp8_ref.quantize(x, a_kind)
        b, b_s = fp8_ref.quantize(w, b_kind)
        ref = fp8_ref.scaled_mm(a, a_s, a_kind, b, b_s, b_kind, out_dtype=torch.float32)
        nbytes = M * K + N * K + out_bytes + 4 * (a_s.numel() + b_s.numel())
        ours = functools.partial(fp8_gemm, a, a_s, b, b_s, out_dtype=out_dtype)
        add("fp8nemo", scheme, ours, nbytes, True, ref)
        if env.on_gpu and scheme in ("tensor", "row"):
            sa = a_s.reshape(()) if scheme == "tensor" else a_s
            sb = b_s.reshape(()) if scheme == "tensor" else b_s.reshape(1, N)
            theirs = functools.partial(
                torch._scaled_mm, a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype
            )
            add("torch._scaled_mm", scheme, theirs, nbytes, True, ref)
    ref = x.float() @ w.float().T
    add("torch.matmul bf16", "-", lambda: x @ w.T, 2 * (M * K + N * K) + out_bytes, False, ref)
    for r in rows:
        r.env = asdict(env)
    return rows


SUITES = {"gemm": (gemm_cases, bench_gemm_case)}
COLUMNS = [
    "date", "device", "capability", "torch", "triton", "fp8nemo", "python", "mode", "copy_gbps",
    "suite", "shape", "M", "N", "K", "impl", "scheme", "out_dtype", "median_ms", "tflops", "gbps",
    "roofline_pct", "bound", "rel_err", "note",
]  # fmt: skip


def _progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="case")


def run_suite(
    suite: str, device: torch.device | None = None, shapes=None, ms=None, on_rows=None
) -> tuple[Environment, list[Row]]:
    """Every case of `suite`; `on_rows(env, rows)` sees each case's rows as soon as they exist."""
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}; got {suite!r}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    if env.on_gpu:
        env.copy_gbps = copy_bandwidth_gbps(device)
    cases_fn, bench_fn = SUITES[suite]
    cases = list(cases_fn(env.on_gpu, shapes, ms))
    rows = []
    for case in _progress(cases, f"bench {suite}"):
        new = bench_fn(env, device, *case)
        if on_rows is not None:
            on_rows(env, new)
        rows += new
    return env, rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


class CsvSink:
    """Rows appended to `<stem>.csv.partial` as each case finishes, so a run that is killed keeps
    what it measured; renamed to `<stem>.csv` when the run completes."""

    def __init__(self, out_dir: str, suite: str):
        self.out_dir, self.suite = out_dir, suite
        self.path = self._file = self._writer = None

    def add(self, env: Environment, rows: list[Row]) -> None:
        if self._writer is None:
            self.path = os.path.join(self.out_dir, result_stem(env, self.suite) + ".csv")
            self._file = open(self.path + ".partial", "w", newline="")  # noqa: SIM115
            self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
            self._writer.writeheader()
        for r in rows:
            d = {**r.env, **{k: v for k, v in asdict(r).items() if k != "env"}}
            self._writer.writerow({k: d.get(k) for k in COLUMNS})
        self._file.flush()

    def __enter__(self) -> CsvSink:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._file is not None:
            self._file.close()
            if exc_type is None:
                os.replace(self.path + ".partial", self.path)


def format_table(env: Environment, rows: list[Row]) -> str:
    head = f"{env.device} (cc {env.capability}), torch {env.torch}, triton {env.triton}, {env.date}"
    if env.on_gpu:
        head += f", copy {env.copy_gbps:.0f} GB/s"
        if env.peak_fp8_tflops is None:
            head += " (no datasheet peak for this GPU: % of roofline left blank)"
    else:
        head = f"{CORRECTNESS_ONLY.upper()}: timings are the interpreter's, not a GPU's\n{head}"
    lines = [head, ""]
    cols = ("shape", "M", "N", "K", "impl", "scheme", "ms", "TFLOP/s", "GB/s", "%roof", "rel err")
    table = [cols]
    for r in rows:
        table.append((
            r.shape, str(r.M), str(r.N), str(r.K), r.impl, r.scheme, _fmt(r.median_ms, ".4f"),
            _fmt(r.tflops, ".1f"), _fmt(r.gbps, ".0f"), _fmt(r.roofline_pct, ".0f"),
            _fmt(r.rel_err, ".1e") if not r.note else r.note[:40],
        ))  # fmt: skip
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(t, widths, strict=True)) for t in table]
    return "\n".join(lines)


def format_markdown(env: Environment, rows: list[Row]) -> str:
    lines = [
        f"**{env.device}** (cc {env.capability}) · torch {env.torch} · triton {env.triton} · "
        f"fp8nemo {env.fp8nemo} · {env.date} · mode: {env.mode}"
        + (f" · measured copy bandwidth {env.copy_gbps:.0f} GB/s" if env.copy_gbps else ""),
        "",
        "| shape | M | N | K | impl | scheme | ms | TFLOP/s | GB/s | % roofline | rel err |",
        "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.M} | {r.N} | {r.K} | {r.impl} | {r.scheme} | "
            f"{_fmt(r.median_ms, '.4f')} | {_fmt(r.tflops, '.1f')} | {_fmt(r.gbps, '.0f')} | "
            f"{_fmt(r.roofline_pct, '.0f')} | {r.note or _fmt(r.rel_err, '.1e')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: str) -> None:
    """One bar group per (shape, M): TFLOP/s of each implementation and scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys((r.shape, r.M) for r in rows))
    impls = list(dict.fromkeys(f"{r.impl} {r.scheme}" for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.9), 5))
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        vals = []
        for case in cases:
            r = next(
                (r for r in rows if (r.shape, r.M) == case and f"{r.impl} {r.scheme}" == impl), None
            )
            vals.append(r.tflops if r is not None and r.tflops is not None else 0.0)
        ax.bar([c + i * width for c in range(len(cases))], vals, width, label=impl)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{s}\nM={m}" for s, m in cases], fontsize=8)
    ax.set_ylabel("TFLOP/s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def result_stem(env: Environment, suite: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in env.device).strip("-").lower() or "device"
    return f"bench_{suite}_{slug}_{env.date.replace(':', '')}"


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_compare(rows: list[dict]) -> str:
    """One line per (shape, M) of a bench CSV: TFLOP/s of each implementation and scheme, and
    our best over torch._scaled_mm's best."""
    impls = {}
    for r in rows:
        key = (r["shape"], int(r["M"]))
        label = f"{r['impl'].replace('torch.', '')} {r['scheme']}".replace(" -", "")
        impls.setdefault(key, {})[label] = float(r["tflops"]) if r["tflops"] else None
    labels = list(dict.fromkeys(label for v in impls.values() for label in v))
    head = ["shape", "M", *labels, "ours/_scaled_mm"]
    table = [head]
    for (shape, m), vals in impls.items():
        ours = [v for k, v in vals.items() if k.startswith("fp8nemo") and v]
        theirs = [v for k, v in vals.items() if k.startswith("_scaled_mm") and v]
        ratio = f"{max(ours) / max(theirs):.2f}" if ours and theirs else "-"
        table.append([shape, str(m), *(_fmt(vals.get(k), ".0f") for k in labels), ratio])
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = ["TFLOP/s (median)"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(t, widths, strict=True)) for t in table]
    return "\n".join(lines)
