"""Without TRITON_INTERPRET, CPU tensors take the torch emulation of the FP8 numerics (once
announced), and it computes exactly what the reference does."""

import os
import subprocess
import sys

SCRIPT = """
import logging
import torch
logging.basicConfig(level=logging.WARNING)
from fp8nemo.kernels import fp8_gemm, quantize_fp8
from fp8nemo.kernels._triton import INTERPRET
from fp8nemo.quant import fp8
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

from fp8nemo.kernels import decode_attention, flash_attention, rope_, rope_cache
from fp8nemo.kernels.attention import attention_reference
from fp8nemo.kernels.decode import decode_reference
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
print("torch path ok")
"""


def test_cpu_without_the_interpreter_runs_the_torch_emulation():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "torch path ok" in proc.stdout
    # One warning per op, not one per call.
    assert proc.stderr.count("quantize_fp8 on CPU runs the torch emulation") == 1, proc.stderr
    for op in ("fp8_gemm", "rope_", "flash_attention", "decode_attention"):
        assert proc.stderr.count(f"{op} on CPU runs the torch emulation") == 1, proc.stderr
