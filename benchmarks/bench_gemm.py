"""pytest-benchmark suite for fp8_gemm at NeMo-12B shapes (GPU only):

    python -m pytest benchmarks/bench_gemm.py --benchmark-only

`fp8nemo bench --suite gemm` covers the same cases with baselines, TFLOP/s and % of roofline.
"""

import functools

import pytest
import torch

from fp8nemo import fp8
from fp8nemo.bench import gemm
from fp8nemo.kernels import fp8_gemm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="timings need a GPU")
CASES = list(gemm.cases(on_gpu=True))


@pytest.mark.parametrize("scheme", list(gemm.GEMM_SCHEMES))
@pytest.mark.parametrize("name, M, N, K", CASES, ids=[f"{c[0]}-M{c[1]}" for c in CASES])
def test_fp8_gemm(benchmark, name, M, N, K, scheme):
    a_kind, b_kind = gemm.GEMM_SCHEMES[scheme]
    a, a_s = fp8.quantize(torch.randn(M, K, device="cuda"), a_kind)
    b, b_s = fp8.quantize(torch.randn(N, K, device="cuda") / K**0.5, b_kind)
    fn = functools.partial(fp8_gemm, a, a_s, b, b_s)
    fn()  # tune and compile outside the timing

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.extra_info.update(flops=2 * M * N * K, scheme=scheme)
    benchmark.pedantic(run, rounds=50, warmup_rounds=5)
