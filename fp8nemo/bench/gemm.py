"""The GEMM suite: fp8_gemm with each scale scheme at NeMo-12B's linear layers, beside
torch._scaled_mm and bf16 torch.matmul, in TFLOP/s."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable

import torch

from fp8nemo import fp8 as fp8_ref

from .harness import case_fields, measure, rel_err

# NeMo-12B linear layers, (K, N): in features -> out features.
NEMO_GEMM_SHAPES = {
    "qkv": (5120, 6144),
    "o": (4096, 5120),
    "gate_up": (5120, 28672),
    "down": (14336, 5120),
}
# Prefill first: a budgeted run (gpu_check.sh) stops starting cases when its time is up, and
# M = 4096 at every layer is where the loop variants are compared.
GPU_M = (4096, 16384, 1, 16, 128)
# The interpreter runs the same layers shrunk 32x (multiples of 16) at a few token counts.
CPU_SHRINK = 32
CPU_M = (1, 16, 128)
# (a_scale, b_scale) granularities of each scheme.
GEMM_SCHEMES = {
    "tensor": ("tensor", "tensor"),
    "row": ("token", "channel"),
    "block": ("group", "block"),
}


def cases(on_gpu: bool, shapes: Iterable[str] | None = None, ms: Iterable[int] | None = None):
    """(name, M, N, K) for the GEMM suite, every layer at one M before the next M."""
    for m in ms or (GPU_M if on_gpu else CPU_M):
        for name, (k, n) in NEMO_GEMM_SHAPES.items():
            if shapes and name not in shapes:
                continue
            if not on_gpu:
                k, n = (max(16, 16 * round(v / CPU_SHRINK / 16)) for v in (k, n))
            yield name, m, n, k


def run_case(env, device, name, M, N, K, out_dtype=torch.bfloat16) -> list:
    """Our fp8_gemm with each scale scheme, torch._scaled_mm per-tensor and rowwise (with and
    without fast accumulation), and bf16 torch.matmul, all on the same random bf16 activations
    and weights. Where a device has more than one main-loop family for the shape (Hopper at
    M > 64: pointer, overlap, TMA, TMA + overlap), each is also timed alone, and with
    fast_accum, so one GPU run says which loop to keep."""
    from fp8nemo.kernels import fp8_gemm
    from fp8nemo.kernels.fp8_gemm import FAMILIES, candidate_configs, fp8_gemm_family

    gen = torch.Generator(device=device).manual_seed(M * 7 + N * 3 + K)
    x = torch.randn(M, K, device=device, generator=gen).to(torch.bfloat16)
    w = (torch.randn(N, K, device=device, generator=gen) / math.sqrt(K)).to(torch.bfloat16)
    flops = 2.0 * M * N * K
    out_bytes = M * N * out_dtype.itemsize
    case = case_fields("gemm", name, dict(M=M, N=N, K=K), out_dtype, M, N, K)
    rows = []
    for scheme, (a_kind, b_kind) in GEMM_SCHEMES.items():
        a, a_s = fp8_ref.quantize(x, a_kind)
        b, b_s = fp8_ref.quantize(w, b_kind)
        ref = fp8_ref.scaled_mm(a, a_s, a_kind, b, b_s, b_kind, out_dtype=torch.float32)
        check = functools.partial(rel_err, ref=ref)
        nbytes = M * K + N * K + out_bytes + 4 * (a_s.numel() + b_s.numel())
        ours = functools.partial(fp8_gemm, a, a_s, b, b_s, out_dtype=out_dtype)
        measure(env, device, rows, case, "fp8nemo", scheme, ours, flops, nbytes, True, check)
        block = scheme == "block"
        families = [f for f in FAMILIES if candidate_configs(a, b, block, f)]
        for family in families if len(families) > 1 else ():
            # an overlap loop with fast_accum is its plain twin's: nothing to promote
            for fast in (False,) if block or FAMILIES[family][1] else (False, True):
                impl = f"fp8nemo {family}" + (" fast_accum" if fast else "")
                fn = functools.partial(
                    fp8_gemm_family, a, a_s, b, b_s, family, fast, out_dtype=out_dtype
                )
                measure(env, device, rows, case, impl, scheme, fn, flops, nbytes, True, check)
        if env.on_gpu and not block:
            sa = a_s.reshape(()) if scheme == "tensor" else a_s
            sb = b_s.reshape(()) if scheme == "tensor" else b_s.reshape(1, N)
            for fast in (False, True):
                theirs = functools.partial(
                    torch._scaled_mm, a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype,
                    use_fast_accum=fast,
                )  # fmt: skip
                impl = "torch._scaled_mm" + (" fast_accum" if fast else "")
                measure(env, device, rows, case, impl, scheme, theirs, flops, nbytes, True, check)
    check = functools.partial(rel_err, ref=x.float() @ w.float().T)
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
