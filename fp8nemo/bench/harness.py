"""The benchmark harness: the run's environment, timing, the roofline, one Row per measurement,
and `run_suite`, which runs a suite's cases within a time budget."""

from __future__ import annotations

import datetime
import importlib
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import fp8nemo
from fp8nemo.utils import progress

# Suites by name; each is the module fp8nemo.bench.<name> with `cases(on_gpu, shapes, ms)`,
# which lists its cases, and `run_case(env, device, *case)`, which returns one case's rows; it
# may define `passed(row)`, its own correctness rule.
SUITES = ("gemm", "attention", "decode", "rope", "e2e", "quantize")
MODEL_SUITES = ("e2e", "quantize")  # the suites that take a checkpoint or preset
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
MAX_REL_ERR = 0.1  # an fp8nemo op row's error against its fp32 reference: round-off is far below
NEMO_HEADS = (32, 8, 128)  # NeMo-12B's Hq, Hk, head_dim


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
    dims: str  # the case's sizes, for a person: "M=16 N=6144 K=5120", "B=4 S=4096 ..."
    M: int | None  # GEMM dims (None for other suites)
    N: int | None
    K: int | None
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
    model: str = ""  # e2e: the checkpoint or preset
    tokens_per_s: float | None = None  # e2e
    agreement: float | None = None  # e2e: share of tokens the fp32 reference picks too
    peak_mib: float | None = None  # e2e: peak memory above what was in use before loading
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


def measure(env, device, rows, case: dict, impl, scheme, fn, flops, nbytes, fp8, check=None, *,
            agreement=None, ms_of=None, tokens=None):  # fmt: skip
    """Run `fn` once (`check(out)` gives its relative error, `agreement(out)` the share of
    tokens it picked as the reference does), time it, and append a Row for `case` (suite,
    shape, dims, M, N, K, out_dtype). `ms_of(out)` takes the time from the checked call's own
    output instead (a call that times itself); with `tokens` per call the row has tokens/s.
    A baseline this torch or GPU lacks becomes a row that says why; fp8nemo's own errors
    propagate."""
    note = ""
    try:
        out = fn()
        err = check(out) if check is not None else None
        agree = agreement(out) if agreement is not None else None
        ms = ms_of(out) if ms_of is not None else time_ms(fn, device)
        tflops, gbps, pct, bound = roofline(env, flops, nbytes, ms, fp8)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        if impl.startswith("fp8nemo"):
            raise
        ms = tflops = gbps = pct = err = agree = None
        bound, note = "-", f"unavailable: {str(e).strip().splitlines()[0][:120]}"
    tokens_per_s = tokens / ms * 1e3 if tokens is not None and ms is not None else None
    rows.append(
        Row(**case, impl=impl, scheme=scheme, median_ms=ms, tflops=tflops, gbps=gbps,
            roofline_pct=pct, bound=bound, rel_err=err, note=note, tokens_per_s=tokens_per_s,
            agreement=agree, env=asdict(env))
    )  # fmt: skip


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def fmt(v, spec: str) -> str:
    """A figure for a table: "-" where there is none."""
    return "-" if v is None else format(v, spec)


def case_fields(suite, shape, dims, out_dtype, M=None, N=None, K=None, **more) -> dict:
    """The Row fields that name a case; `dims` a dict of its sizes, `more` other Row fields."""
    dims_text = " ".join(f"{k}={v}" for k, v in dims.items())
    return dict(suite=suite, shape=shape, dims=dims_text, M=M, N=N, K=K,
                out_dtype=str(out_dtype).removeprefix("torch."), **more)  # fmt: skip


def suite_module(suite: str):
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}; got {suite!r}")
    return importlib.import_module(f"{__package__}.{suite}")


def run_suite(
    suite: str, device: torch.device | None = None, shapes=None, ms=None, on_rows=None,
    budget_s: float | None = None, model: str | None = None,
) -> tuple[Environment, list[Row]]:  # fmt: skip
    """Every case of `suite`; `on_rows(env, rows)` sees each case's rows as soon as they exist.
    Cases that would start after `budget_s` seconds are not run; each gets a row saying so.
    `model` (a preset or checkpoint folder) is the e2e suite's."""
    from fp8nemo.kernels import value_checks

    module = suite_module(suite)
    if model is not None and suite not in MODEL_SUITES:
        raise ValueError(
            f"model applies to the {' and '.join(MODEL_SUITES)} suites only; got it for {suite!r}"
        )
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    if env.on_gpu:
        env.copy_gbps = copy_bandwidth_gbps(device)
    options = {} if model is None else {"model": model}
    cases = list(module.cases(env.on_gpu, shapes, ms, **options))
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    rows = []
    for case in progress(cases, f"bench {suite}", "case"):
        if deadline is not None and time.monotonic() >= deadline:
            new = [_not_run(env, suite, case, budget_s)]
        else:
            # Time the kernels, not the host-side value checks (a device sync each); the
            # inputs here are made valid.
            with value_checks(not env.on_gpu):
                new = module.run_case(env, device, *case)
        if on_rows is not None:
            on_rows(env, new)
        rows += new
    return env, rows


def _not_run(env, suite, case, budget_s) -> Row:
    return Row(
        suite=suite, shape=str(case[0]), dims=" ".join(map(str, case[1:])), M=None, N=None,
        K=None, impl="-", scheme="-", out_dtype="-", median_ms=None, tflops=None, gbps=None,
        roofline_pct=None, bound="-", rel_err=None,
        note=f"not run: the {budget_s:.0f} s budget ran out", env=asdict(env),
    )  # fmt: skip


def failed_checks(suite: str, rows: list[Row]) -> list[Row]:
    """The rows of `suite` whose correctness check failed: by the suite's own `passed(row)`,
    else every fp8nemo row needs a relative error below MAX_REL_ERR."""
    passed = getattr(suite_module(suite), "passed", None) or _passed
    return [r for r in rows if not passed(r)]


def _passed(row: Row) -> bool:
    return row.impl != "fp8nemo" or (row.rel_err is not None and row.rel_err < MAX_REL_ERR)
