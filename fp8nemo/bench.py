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
from fp8nemo import fp8 as fp8_ref
from fp8nemo.utils import progress

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


def measure(env, device, rows, case: dict, impl, scheme, fn, flops, nbytes, fp8, check=None):
    """Run `fn` once (`check(out)` gives its relative error), time it, and append a Row for
    `case` (suite, shape, dims, M, N, K, out_dtype). A baseline this torch or GPU lacks becomes
    a row that says why."""
    note = ""
    try:
        out = fn()
        err = check(out) if check is not None else None
        ms = time_ms(fn, device)
        tflops, gbps, pct, bound = roofline(env, flops, nbytes, ms, fp8)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:
        if impl == "fp8nemo":
            raise
        ms = tflops = gbps = pct = err = None
        bound, note = "-", f"unavailable: {str(e).strip().splitlines()[0][:120]}"
    rows.append(
        Row(**case, impl=impl, scheme=scheme, median_ms=ms, tflops=tflops, gbps=gbps,
            roofline_pct=pct, bound=bound, rel_err=err, note=note, env=asdict(env))
    )  # fmt: skip


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def _case(suite, shape, dims, out_dtype, M=None, N=None, K=None) -> dict:
    dims_text = " ".join(f"{k}={v}" for k, v in dims.items())
    return dict(suite=suite, shape=shape, dims=dims_text, M=M, N=N, K=K,
                out_dtype=str(out_dtype).removeprefix("torch."))  # fmt: skip


# --- gemm -------------------------------------------------------------------------------------


def gemm_cases(on_gpu: bool, shapes: Iterable[str] | None = None, ms: Iterable[int] | None = None):
    """(name, M, N, K) for the GEMM suite."""
    for name, (k, n) in NEMO_GEMM_SHAPES.items():
        if shapes and name not in shapes:
            continue
        if not on_gpu:
            k, n = (max(16, 16 * round(v / CPU_SHRINK / 16)) for v in (k, n))
        for m in ms or (GPU_M if on_gpu else CPU_M):
            yield name, m, n, k


def bench_gemm_case(env, device, name, M, N, K, out_dtype=torch.bfloat16) -> list[Row]:
    """Our fp8_gemm with each scale scheme, torch._scaled_mm per-tensor and rowwise, and bf16
    torch.matmul, all on the same random bf16 activations and weights."""
    from fp8nemo.kernels import fp8_gemm

    gen = torch.Generator(device=device).manual_seed(M * 7 + N * 3 + K)
    x = torch.randn(M, K, device=device, generator=gen).to(torch.bfloat16)
    w = (torch.randn(N, K, device=device, generator=gen) / math.sqrt(K)).to(torch.bfloat16)
    flops = 2.0 * M * N * K
    out_bytes = M * N * out_dtype.itemsize
    case = _case("gemm", name, dict(M=M, N=N, K=K), out_dtype, M, N, K)
    rows = []
    for scheme, (a_kind, b_kind) in GEMM_SCHEMES.items():
        a, a_s = fp8_ref.quantize(x, a_kind)
        b, b_s = fp8_ref.quantize(w, b_kind)
        ref = fp8_ref.scaled_mm(a, a_s, a_kind, b, b_s, b_kind, out_dtype=torch.float32)
        check = functools.partial(_rel_err, ref=ref)
        nbytes = M * K + N * K + out_bytes + 4 * (a_s.numel() + b_s.numel())
        ours = functools.partial(fp8_gemm, a, a_s, b, b_s, out_dtype=out_dtype)
        measure(env, device, rows, case, "fp8nemo", scheme, ours, flops, nbytes, True, check)
        if env.on_gpu and scheme in ("tensor", "row"):
            sa = a_s.reshape(()) if scheme == "tensor" else a_s
            sb = b_s.reshape(()) if scheme == "tensor" else b_s.reshape(1, N)
            theirs = functools.partial(
                torch._scaled_mm, a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype
            )
            measure(
                env,
                device,
                rows,
                case,
                "torch._scaled_mm",
                scheme,
                theirs,
                flops,
                nbytes,
                True,
                check,
            )
    check = functools.partial(_rel_err, ref=x.float() @ w.float().T)
    nbytes = 2 * (M * K + N * K) + out_bytes
    measure(
        env,
        device,
        rows,
        case,
        "torch.matmul bf16",
        "-",
        lambda: x @ w.T,
        flops,
        nbytes,
        False,
        check,
    )
    return rows


# --- attention --------------------------------------------------------------------------------

NEMO_HEADS = (32, 8, 128)  # Hq, Hk, head_dim
PREFILL_S = (1024, 4096, 16384)
PREFILL_TOKENS = 16384  # batch = tokens // S, so every row moves a similar amount of work
CPU_HEADS = (4, 1, 64)


def attention_cases(on_gpu: bool, shapes=None, ms=None):
    """(name, B, S, Hq, Hk, D): causal prefill at NeMo's heads."""
    Hq, Hk, D = NEMO_HEADS if on_gpu else CPU_HEADS
    for S in ms or (PREFILL_S if on_gpu else (128, 256)):
        yield "prefill causal", max(1, PREFILL_TOKENS // S) if on_gpu else 1, S, Hq, Hk, D


def _sdpa(q, k, v, causal):
    """torch's flash SDPA on [B, S, H, D] tensors, GQA through enable_gqa."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=causal,
            enable_gqa=True,
        )
    return out.transpose(1, 2)


def bench_attention_case(env, device, name, B, S, Hq, Hk, D) -> list[Row]:
    """flash_attention in bf16 and FP8 (per-tensor descales) beside torch's flash SDPA; the
    check compares the first 256 queries of sequence 0 (causal: they see only each other)
    with the fp32 reference."""
    from fp8nemo.kernels import flash_attention
    from fp8nemo.kernels.attention import attention_reference

    gen = torch.Generator(device=device).manual_seed(S * 31 + B)
    q, k, v = (
        torch.randn(B, S, h, D, device=device, generator=gen).to(torch.bfloat16)
        for h in (Hq, Hk, Hk)
    )
    flops = 4.0 * B * Hq * D * S * (S + 1) / 2
    n = min(S, 256)
    rows = []
    case = _case("attention", name, dict(B=B, S=S, Hq=Hq, Hk=Hk, D=D), torch.bfloat16)
    ref = attention_reference(
        *(t[:1, :n].cpu() for t in (q, k, v)), causal=True, out_dtype=torch.float32
    )[0]

    def check(out):
        return _rel_err(out[:1, :n].cpu(), ref)

    half_bytes = 2 * B * S * D * (2 * Hq + 2 * Hk)
    ours = functools.partial(flash_attention, q, k, v, causal=True)
    measure(env, device, rows, case, "fp8nemo", "bf16", ours, flops, half_bytes, False, check)
    (q8, qs), (k8, ks), (v8, vs) = (fp8_ref.quantize(t, "tensor") for t in (q, k, v))
    ours8 = functools.partial(flash_attention, q8, k8, v8, causal=True, q_descale=qs.reshape(()),
                              k_descale=ks.reshape(()), v_descale=vs.reshape(()))  # fmt: skip
    fp8_bytes = B * S * D * (Hq + 2 * Hk) + 2 * B * S * Hq * D
    measure(env, device, rows, case, "fp8nemo", "fp8", ours8, flops, fp8_bytes, True, check)
    if env.on_gpu:
        sdpa = functools.partial(_sdpa, q, k, v, True)
        measure(
            env,
            device,
            rows,
            case,
            "torch SDPA flash",
            "bf16",
            sdpa,
            flops,
            half_bytes,
            False,
            check,
        )
    return rows


# --- decode -----------------------------------------------------------------------------------

DECODE_CONTEXT = (4096, 32768, 131072)
DECODE_BATCH = (1, 16)


def decode_cases(on_gpu: bool, shapes=None, ms=None):
    """(name, B, L, Hq, Hk, D, cache dtype): one token per sequence over L cached keys."""
    Hq, Hk, D = NEMO_HEADS if on_gpu else (8, 2, 64)
    for L in ms or (DECODE_CONTEXT if on_gpu else (256, 1024)):
        for B in DECODE_BATCH if on_gpu else (1, 2):
            for cache in ("bf16", "fp8"):
                yield "decode", B, L, Hq, Hk, D, cache


def bench_decode_case(env, device, name, B, L, Hq, Hk, D, cache) -> list[Row]:
    """decode_attention over a full bf16 or e4m3 cache of L keys, in GB/s of cache read,
    beside torch SDPA (bf16 cache only); the check compares sequence 0 with fp32."""
    from fp8nemo.kernels import decode_attention
    from fp8nemo.kernels.decode import decode_reference

    gen = torch.Generator(device=device).manual_seed(L + B)
    q = torch.randn(B, Hq, D, device=device, generator=gen).to(torch.bfloat16)
    k, v = (
        torch.randn(B, L, Hk, D, device=device, generator=gen).to(torch.bfloat16) for _ in range(2)
    )
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    kw = {}
    if cache == "fp8":
        (k, ks), (v, vs) = fp8_ref.quantize(k, "tensor"), fp8_ref.quantize(v, "tensor")
        kw = {"k_descale": ks.reshape(()), "v_descale": vs.reshape(())}
    first = (t[:1].cpu() for t in (q, k, v, lens))
    descales = {n: t.cpu() for n, t in kw.items()}
    ref = decode_reference(*first, out_dtype=torch.float32, **descales)

    def check(out):
        return _rel_err(out[:1].cpu(), ref)

    flops = 4.0 * B * Hq * L * D
    nbytes = 2 * B * L * Hk * D * k.element_size() + 2 * 2 * B * Hq * D
    rows = []
    case = _case("decode", name, dict(B=B, L=L, Hq=Hq, Hk=Hk, D=D, cache=cache), torch.bfloat16)
    ours = functools.partial(decode_attention, q, k, v, lens, **kw)
    measure(env, device, rows, case, "fp8nemo", f"{cache} cache", ours, flops, nbytes, False, check)
    if env.on_gpu and cache == "bf16":
        sdpa = functools.partial(_sdpa_decode, q, k, v)
        measure(
            env, device, rows, case, "torch SDPA", "bf16 cache", sdpa, flops, nbytes, False, check
        )
    return rows


def _sdpa_decode(q, k, v):
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
    )
    return out[:, :, 0]


# --- rope -------------------------------------------------------------------------------------

ROPE_TOKENS = (16, 4096, 16384)


def rope_cases(on_gpu: bool, shapes=None, ms=None):
    """(name, T, Hq, Hk, D): rope_ alone, and fused with a bf16 or e4m3 cache write."""
    Hq, Hk, D = NEMO_HEADS if on_gpu else (8, 2, 64)
    for T in ms or (ROPE_TOKENS if on_gpu else (16, 256)):
        for name in ("rope_", "rope_kv_cache_ bf16", "rope_kv_cache_ fp8"):
            yield name, T, Hq, Hk, D


def bench_rope_case(env, device, name, T, Hq, Hk, D) -> list[Row]:
    """The fused kernel beside the unfused torch version (rotate q and k, then write the cache),
    in GB/s of the bytes the op must move."""
    from fp8nemo.kernels import rope_, rope_cache, rope_kv_cache_
    from fp8nemo.kernels.rope import kv_cache_write_reference, rope_reference

    gen = torch.Generator(device=device).manual_seed(T)
    q = torch.randn(T, Hq, D, device=device, generator=gen).to(torch.bfloat16)
    k, v = (
        torch.randn(T, Hk, D, device=device, generator=gen).to(torch.bfloat16) for _ in range(2)
    )
    positions = torch.randint(0, 131072, (T,), device=device, generator=gen)
    cos_sin = rope_cache(D, 131072, 1e6, device=device)
    want_q, want_k = rope_reference(q, k, positions, cos_sin)

    def check(out):
        return max(_rel_err(out[0], want_q), _rel_err(out[1], want_k))

    qk_bytes = 2 * 2 * T * (Hq + Hk) * D + T * D * 4
    rows = []
    case = _case("rope", name, dict(T=T, Hq=Hq, Hk=Hk, D=D), torch.bfloat16)
    # The timed op rotates scratch copies in place: the first call (the one checked) sees the
    # original values, later ones rotate further, at the same cost.
    q_work, k_work = q.clone(), k.clone()
    if name == "rope_":
        ours = functools.partial(rope_, q_work, k_work, positions, cos_sin)
        theirs = functools.partial(rope_reference, q, k, positions, cos_sin)
        nbytes = qk_bytes
    else:
        fp8 = name.endswith("fp8")
        cache_dtype = fp8_ref.E4M3 if fp8 else torch.bfloat16
        k_cache = torch.zeros(1, T, Hk, D, device=device).to(cache_dtype)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.arange(T, device=device)
        scale = torch.full((1,), 0.02, device=device) if fp8 else None
        ours = functools.partial(rope_kv_cache_, q_work, k_work, v, positions, cos_sin, k_cache,
                                 v_cache, slots, k_scale=scale, v_scale=scale)  # fmt: skip

        def theirs():
            q_rot, k_rot = rope_reference(q, k, positions, cos_sin)
            kv_cache_write_reference(k_rot, v, k_cache, v_cache, slots, scale, scale)
            return q_rot, k_rot

        nbytes = qk_bytes + 2 * T * Hk * D + 2 * T * Hk * D * k_cache.element_size()
    scheme = "-" if name == "rope_" else f"{name.split()[-1]} cache"
    measure(env, device, rows, case, "fp8nemo", scheme, ours, 0.0, nbytes, False, check)
    if env.on_gpu:
        measure(env, device, rows, case, "torch unfused", scheme, theirs, 0.0, nbytes, False, check)
    return rows


SUITES = {
    "gemm": (gemm_cases, bench_gemm_case),
    "attention": (attention_cases, bench_attention_case),
    "decode": (decode_cases, bench_decode_case),
    "rope": (rope_cases, bench_rope_case),
}
COLUMNS = [
    "date", "device", "capability", "torch", "triton", "fp8nemo", "python", "mode", "copy_gbps",
    "suite", "shape", "dims", "M", "N", "K", "impl", "scheme", "out_dtype", "median_ms",
    "tflops", "gbps", "roofline_pct", "bound", "rel_err", "note",
]  # fmt: skip


def run_suite(
    suite: str, device: torch.device | None = None, shapes=None, ms=None, on_rows=None,
    budget_s: float | None = None,
) -> tuple[Environment, list[Row]]:  # fmt: skip
    """Every case of `suite`; `on_rows(env, rows)` sees each case's rows as soon as they exist.
    Cases that would start after `budget_s` seconds are not run; each gets a row saying so."""
    from fp8nemo.kernels import value_checks

    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}; got {suite!r}")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    if env.on_gpu:
        env.copy_gbps = copy_bandwidth_gbps(device)
    cases_fn, bench_fn = SUITES[suite]
    cases = list(cases_fn(env.on_gpu, shapes, ms))
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    rows = []
    for case in progress(cases, f"bench {suite}", "case"):
        if deadline is not None and time.monotonic() >= deadline:
            new = [_not_run(env, suite, case, budget_s)]
        else:
            # Time the kernels, not the host-side value checks (a device sync each); the
            # inputs here are made valid.
            with value_checks(not env.on_gpu):
                new = bench_fn(env, device, *case)
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


def _metric(suite: str) -> str:
    """The figure a suite is judged by: TFLOP/s for matrix work, GB/s for memory-bound ops."""
    return "gbps" if suite in ("decode", "rope") else "tflops"


def format_table(env: Environment, rows: list[Row]) -> str:
    head = f"{env.device} (cc {env.capability}), torch {env.torch}, triton {env.triton}, {env.date}"
    if env.on_gpu:
        head += f", copy {env.copy_gbps:.0f} GB/s"
        if env.peak_fp8_tflops is None:
            head += " (no datasheet peak for this GPU: % of roofline left blank)"
    else:
        head = f"{CORRECTNESS_ONLY.upper()}: timings are the interpreter's, not a GPU's\n{head}"
    cols = ("shape", "dims", "impl", "scheme", "ms", "TFLOP/s", "GB/s", "%roof", "rel err")
    table = [cols]
    for r in rows:
        table.append((
            r.shape, r.dims, r.impl, r.scheme, _fmt(r.median_ms, ".4f"), _fmt(r.tflops, ".1f"),
            _fmt(r.gbps, ".0f"), _fmt(r.roofline_pct, ".0f"),
            _fmt(r.rel_err, ".1e") if not r.note else r.note[:40],
        ))  # fmt: skip
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    lines = [head, ""] + [
        "  ".join(c.rjust(w) for c, w in zip(t, widths, strict=True)) for t in table
    ]
    return "\n".join(lines)


def format_markdown(env: Environment, rows: list[Row]) -> str:
    lines = [
        f"**{env.device}** (cc {env.capability}) · torch {env.torch} · triton {env.triton} · "
        f"fp8nemo {env.fp8nemo} · {env.date} · mode: {env.mode}"
        + (f" · measured copy bandwidth {env.copy_gbps:.0f} GB/s" if env.copy_gbps else ""),
        "",
        "| shape | dims | impl | scheme | ms | TFLOP/s | GB/s | % roofline | rel err |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.dims} | {r.impl} | {r.scheme} | {_fmt(r.median_ms, '.4f')} | "
            f"{_fmt(r.tflops, '.1f')} | {_fmt(r.gbps, '.0f')} | {_fmt(r.roofline_pct, '.0f')} | "
            f"{r.note or _fmt(r.rel_err, '.1e')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: str) -> None:
    """One bar group per case: TFLOP/s (or GB/s for memory-bound suites) of each implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _metric(rows[0].suite) if rows else "tflops"
    cases = list(dict.fromkeys((r.shape, r.dims) for r in rows))
    impls = list(dict.fromkeys(f"{r.impl} {r.scheme}" for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 1.2), 5))
    width = 0.8 / max(len(impls), 1)
    values = {((r.shape, r.dims), f"{r.impl} {r.scheme}"): getattr(r, metric) for r in rows}
    for i, impl in enumerate(impls):
        vals = [values.get((case, impl)) or 0.0 for case in cases]
        ax.bar([c + i * width for c in range(len(cases))], vals, width, label=impl)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{s}\n{d}".replace(" ", "\n") for s, d in cases], fontsize=6)
    ax.set_ylabel("TFLOP/s" if metric == "tflops" else "GB/s")
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
    """One line per case of a bench CSV: the suite's figure (TFLOP/s, or GB/s for decode and
    rope) for each implementation and scheme, and our best over the best baseline's."""
    if not rows:
        return "(no rows)"
    metric = _metric(rows[0]["suite"])
    cases = {}
    for r in rows:
        label = f"{r['impl'].replace('torch.', '')} {r['scheme']}".replace(" -", "")
        cases.setdefault((r["shape"], r["dims"]), {})[label] = (
            float(r[metric]) if r[metric] else None
        )
    labels = list(dict.fromkeys(label for v in cases.values() for label in v))
    head = ["shape", "dims", *labels, "ours/baseline"]
    table = [head]
    for (shape, dims), vals in cases.items():
        ours = [v for k, v in vals.items() if k.startswith("fp8nemo") and v]
        theirs = [v for k, v in vals.items() if not k.startswith("fp8nemo") and v]
        ratio = f"{max(ours) / max(theirs):.2f}" if ours and theirs else "-"
        table.append([shape, dims, *(_fmt(vals.get(k), ".0f") for k in labels), ratio])
    widths = [max(len(t[i]) for t in table) for i in range(len(head))]
    lines = [f"{rows[0]['suite']}: {'TFLOP/s' if metric == 'tflops' else 'GB/s'} (median)"]
    lines += ["  ".join(c.rjust(w) for c, w in zip(t, widths, strict=True)) for t in table]
    return "\n".join(lines)
