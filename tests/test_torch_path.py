"""Without TRITON_INTERPRET, CPU tensors take the torch emulation of the FP8 numerics (once
announced), and it computes exactly what the reference does."""

import subprocess
import sys

import torch
from helpers import torch_path_env

SCRIPT = """
import logging
import torch
logging.basicConfig(level=logging.WARNING)
from fp8nemo.kernels import fp8_gemm, quantize_fp8
from fp8nemo.kernels._triton import INTERPRET
from fp8nemo import fp8
assert not INTERPRET
g = torch.Generator().manual_seed(0)
x = torch.randn(5, 144, generator=g).to(torch.bfloat16)
for granularity in ("tensor", "token", "group"):
    q, s = quantize_fp8(x, granularity)
    want_q, want_s = fp8.quantize(x, granularity)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), granularity
    assert torch.equal(s.reshape(want_s.shape), want_s), granularity
w, w_s = fp8.quantize(torch.randn(48, 144, generator=g), "channel")
q, s = quantize_fp8(x, "token")
out = fp8_gemm(q, s, w, w_s, out_dtype=torch.float32)
assert torch.equal(out, fp8.scaled_mm(q, s, "token", w, w_s, "channel", out_dtype=torch.float32))

from fp8nemo.kernels import append_attention, decode_attention, flash_attention, rope_, rope_cache
from fp8nemo.kernels.attention import attention_reference
from fp8nemo.kernels.decode import append_reference, decode_reference
from fp8nemo.kernels.rope import rope_reference
qh, kh = torch.randn(6, 4, 64, generator=g), torch.randn(6, 2, 64, generator=g)
pos, table = torch.arange(6), rope_cache(64, 16, 1e4)
want = rope_reference(qh, kh, pos, table)
rope_(qh, kh, pos, table)
assert torch.equal(qh, want[0]) and torch.equal(kh, want[1])
qa, ka, va = (torch.randn(1, 9, h, 64, generator=g).bfloat16() for h in (4, 2, 2))
assert torch.equal(flash_attention(qa, ka, va), attention_reference(qa, ka, va)[0])
cache = torch.randn(2, 12, 2, 64, generator=g).bfloat16()
lens = torch.tensor([3, 12], dtype=torch.int32)
assert torch.equal(decode_attention(qa[0, :2], cache, cache, lens), decode_reference(qa[0, :2], cache, cache, lens))
qn, alens = qa[:, :4].expand(2, 4, 4, 64), torch.tensor([3, 8], dtype=torch.int32)
assert torch.equal(append_attention(qn, cache, cache, alens, window=3), append_reference(qn, cache, cache, alens, window=3))

import copy
import sys

# Zero-size inputs and NaN/inf at hidden keys: the inputs and the torch path's outputs go back
# to the test, which runs the same calls through the Triton kernels and compares.
E4M3 = torch.float8_e4m3fn
ops = {"quantize_fp8": quantize_fp8, "fp8_gemm": fp8_gemm, "flash_attention": flash_attention,
       "decode_attention": decode_attention, "append_attention": append_attention, "rope_": rope_}
from fp8nemo.kernels import rope_kv_cache_
ops["rope_kv_cache_"] = rope_kv_cache_
bf = lambda *shape: torch.randn(*shape, generator=g).bfloat16()
cases = {}
for granularity in ("tensor", "token", "group"):
    cases[f"quantize {granularity} [0, 64]"] = ("quantize_fp8", (torch.empty(0, 64), granularity), {})
cases["quantize group [2, 0, 300]"] = ("quantize_fp8", (torch.empty(2, 0, 300), "group"), {})
cases["quantize static tensor [0, 64]"] = ("quantize_fp8", (torch.empty(0, 64), "tensor"), {"scale": torch.full((1, 1), 0.02)})
a0, a0_s = fp8.quantize(torch.randn(0, 256, generator=g), "group")
w, w_s = fp8.quantize(torch.randn(40, 256, generator=g), "block")
cases["gemm M=0"] = ("fp8_gemm", (a0, a0_s, w, w_s), {})
a9, a9_s = fp8.quantize(torch.randn(9, 256, generator=g), "token")
w0, w0_s = fp8.quantize(torch.randn(0, 256, generator=g), "channel")
cases["gemm N=0"] = ("fp8_gemm", (a9, a9_s, w0, w0_s), {})
cases["flash S=0"] = ("flash_attention", (bf(2, 0, 4, 64), bf(2, 0, 2, 64), bf(2, 0, 2, 64)), {"return_lse": True})
cases["flash B=0"] = ("flash_attention", (bf(0, 5, 4, 64), bf(0, 5, 2, 64), bf(0, 5, 2, 64)), {"return_lse": True})
cu = lambda *c: torch.tensor(c, dtype=torch.int32)
cases["flash T=0"] = ("flash_attention", (bf(0, 4, 64), bf(0, 2, 64), bf(0, 2, 64)), {"cu_seqlens": cu(0, 0), "max_seqlen": 1})
cases["flash empty sequences"] = ("flash_attention", (bf(9, 4, 64), bf(9, 2, 64), bf(9, 2, 64)),
                                  {"cu_seqlens": cu(0, 0, 5, 5, 9), "max_seqlen": 5, "return_lse": True})
cases["decode S_max=0"] = ("decode_attention", (bf(3, 4, 64), bf(3, 0, 2, 64), bf(3, 0, 2, 64), torch.zeros(3, dtype=torch.int32)), {})
cases["decode B=0"] = ("decode_attention", (bf(0, 4, 64), bf(0, 8, 2, 64), bf(0, 8, 2, 64), torch.zeros(0, dtype=torch.int32)), {})
cases["append T_new=0"] = ("append_attention", (bf(3, 0, 4, 64), bf(3, 8, 2, 64), bf(3, 8, 2, 64), torch.zeros(3, dtype=torch.int32)), {})
cases["append B=0"] = ("append_attention", (bf(0, 2, 4, 64), bf(0, 8, 2, 64), bf(0, 8, 2, 64), torch.zeros(0, dtype=torch.int32)), {})
cases["rope T=0"] = ("rope_", (torch.empty(0, 4, 64), torch.empty(0, 2, 64), torch.arange(0), rope_cache(64, 16, 1e4)), {})
cases["rope_kv_cache_ T=0"] = ("rope_kv_cache_", (torch.empty(0, 4, 64), torch.empty(0, 2, 64), torch.empty(0, 2, 64), torch.arange(0),
                               rope_cache(64, 16, 1e4), bf(1, 4, 2, 64), bf(1, 4, 2, 64), torch.arange(0)), {})
q, k, v = bf(2, 150, 4, 64), bf(2, 150, 2, 64), bf(2, 150, 2, 64)
v[0, 100] = float("nan"); v[1, 120, 1, 7] = float("inf"); k[0, 130] = float("nan")
cases["flash NaN at causally hidden keys"] = ("flash_attention", (q, k, v), {"return_lse": True})
q, k, v = bf(1, 300, 4, 64), bf(1, 300, 2, 64), bf(1, 300, 2, 64)
v[0, 10] = float("nan"); k[0, 20, 1] = -float("inf")
cases["flash NaN before the window"] = ("flash_attention", (q, k, v), {"window": 37})
q, k, v = bf(302, 4, 64), bf(302, 2, 64), bf(302, 2, 64)
v[40] = float("nan"); v[241, 0, 2] = float("inf")
cases["flash NaN in packed sequences"] = ("flash_attention", (q, k, v), {"cu_seqlens": cu(0, 37, 237, 242, 302), "max_seqlen": 200})
q, k, v = (fp8.saturating_cast(torch.randn(1, 150, h, 64, generator=g) / 0.05) for h in (4, 2, 2))
v.view(torch.uint8)[0, 100] = 0x7F
cases["flash e4m3 NaN at causally hidden keys"] = ("flash_attention", (q, k, v),
    {n: torch.tensor(0.05) for n in ("q_descale", "k_descale", "v_descale")})
outputs = {}
for name, (op, args, kwargs) in cases.items():
    args, kwargs = copy.deepcopy((args, kwargs))  # rope_ writes its arguments
    result = ops[op](*args, **kwargs)
    outputs[name] = (result, args)  # rope_'s results are its (written) arguments
torch.save({"cases": cases, "outputs": outputs}, sys.argv[1])
print("torch path ok")
"""


def test_cpu_without_the_interpreter_runs_the_torch_emulation(tmp_path):
    env = torch_path_env()
    results = tmp_path / "torch_path.pt"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(results)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch path ok" in proc.stdout
    # One warning per op, not one per call.
    assert proc.stderr.count("quantize_fp8 on CPU runs the torch emulation") == 1, proc.stderr
    for op in ("fp8_gemm", "rope_", "flash_attention", "decode_attention", "append_attention"):
        assert proc.stderr.count(f"{op} on CPU runs the torch emulation") == 1, proc.stderr
    compare_with_the_kernels(torch.load(results, weights_only=False))


def compare_with_the_kernels(saved):
    """The same calls through the Triton kernels (the interpreter, in this process): zero-size
    inputs give the same (empty or zero) results on both paths; attention (with empty
    sequences, or NaN/inf at hidden keys) is non-finite in the same places on both paths as in
    the math, and both are within flash-attn's rule of the fp64 reference elsewhere."""
    import copy

    import fp8nemo.kernels as K
    from fp8nemo.kernels.attention import attention_reference

    for name, (op, args, kwargs) in saved["cases"].items():
        torch_result, torch_args = saved["outputs"][name]
        args, kwargs = copy.deepcopy((args, kwargs))
        result = getattr(K, op)(*args, **kwargs)
        if op.startswith("rope"):
            result, torch_result = args, torch_args
        flat = [result] if isinstance(result, torch.Tensor) else list(result)
        torch_flat = (
            [torch_result] if isinstance(torch_result, torch.Tensor) else list(torch_result)
        )
        for ours, theirs in zip(flat, torch_flat, strict=True):
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, name
        if op != "flash_attention" or flat[0].numel() == 0:
            for ours, theirs in zip(flat, torch_flat, strict=True):
                same = ours.view(torch.uint8) if ours.dtype.itemsize == 1 else ours
                other = theirs.view(torch.uint8) if theirs.dtype.itemsize == 1 else theirs
                assert torch.equal(same.nan_to_num(), other.nan_to_num()), name
            continue
        q, k, v = args
        ref_kw = {n: t for n, t in kwargs.items() if n not in ("max_seqlen", "return_lse")}
        want, want_lse = attention_reference(q, k, v, **ref_kw, quantize_p=False,
                                             acc_dtype=torch.float64)  # fmt: skip
        ref32, _ = attention_reference(q, k, v, **ref_kw, quantize_p=False, out_dtype=torch.float32)
        low, _ = attention_reference(q, k, v, **ref_kw,
                                     acc_dtype=torch.float32 if q.dtype == torch.float8_e4m3fn else q.dtype)  # fmt: skip
        bad = ~want.isfinite()
        assert bad.any() == ("NaN" in name) and (~bad).any(), name

        def err(x, want=want):
            return (x.double() - want).nan_to_num().abs().max().item()

        for path, out in (("kernel", flat[0]), ("torch path", torch_flat[0])):
            assert torch.equal(~out.isfinite(), bad), f"{name}: {path} non-finite unlike the math"
            assert err(out) <= 2 * err(low) + 2 * err(ref32), f"{name}: {path} error"
        if kwargs.get("return_lse"):
            assert torch.equal(flat[1].isnan(), want_lse.isnan()), name
            assert torch.equal(torch_flat[1].isnan(), want_lse.isnan()), name
