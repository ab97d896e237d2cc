"""Shared test helpers: poisoned outputs, error reports, round-off bounds."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

# Unit round-off (half an ulp at 1.0) of each output dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Within one K-tile an FP8 MMA chain accumulates in the tensor core: about 14 bits on Hopper
# (DeepSeek-V3 report), truncating, so 2^-13 per addition; the interpreter's dot is numpy fp32.
MMA_UNIT_ROUNDOFF = 2.0**-13 if DEVICE == "cuda" else 2.0**-24
E4M3_NAN_CODE = 0x7F


def randn(*shape, gen, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    """Fresh Gaussian data drawn on the CPU (so CPU and CUDA runs see the same values)."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so an element the kernel does not write cannot pass."""
    if dtype == torch.float8_e4m3fn:
        return torch.full(shape, E4M3_NAN_CODE, dtype=torch.uint8, device=device).view(dtype)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _fail(bad: torch.Tensor, what: str, summary: str, describe) -> None:
    """Raise naming how many elements are bad, `summary`, and the first five as `describe(i)`."""
    if bad.any():
        first = "\n".join(f"  {tuple(i)}: {describe(tuple(i))}" for i in bad.nonzero()[:5].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} {summary}; first:\n{first}"
        )


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Every |out - ref| <= bound elementwise (NaN where ref is NaN); on failure name the first
    mismatches and the worst error relative to its bound."""
    out, ref, bound = out.double().cpu(), ref.double().cpu(), bound.double().cpu().expand_as(ref)
    err = (out - ref).abs()
    bad = ~((err <= bound) | (out.isnan() & ref.isnan()))
    ratio = (err / bound.clamp_min(1e-300)).nan_to_num(math.inf).max().item()
    _fail(
        bad,
        what,
        f"elements beyond the round-off bound (worst error / bound = {ratio:.3g})",
        lambda i: f"out={out[i].item():.6g} ref={ref[i].item():.6g} bound={bound[i].item():.3g}",
    )


def assert_codes_equal(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """FP8 tensors with the same bytes (NaN codes included)."""
    out, ref = out.cpu(), ref.cpu()
    _fail(
        out.view(torch.uint8) != ref.view(torch.uint8),
        what,
        "FP8 codes differ",
        lambda i: f"out={out[i].float().item():g} ref={ref[i].float().item():g}",
    )


def assert_quantized_like(q, s, y_ref, rel, granularity, scale=None, group_size=128, what=""):
    """Codes `q` and scales `s` of an op that quantizes its own fp32 result y, against
    `fp8.quantize(y_ref)`, where the two fp32 computations may differ by rounding only:
    |y / y_ref - 1| <= rel elementwise (`rel` a float or a tensor shaped like y_ref). A given
    static `scale` means per-tensor quantization with it.

    Scales: a static one comes back as given. A dynamic one is amax / 448; amax moves by at most
    max(rel) of itself and each side divides once, so |s / s_ref - 1| <= rel_s =
    (1 + max(rel)) (1 + u) / (1 - u) - 1. Codes: NaN exactly where the reference's are; elsewhere
    equal, or the two e4m3 neighbours of a rounding boundary m that the op's quotient y / s and
    the reference's can fall either side of: then m lies within ((1 + rel) (1 + u) / (1 - rel_s)
    - 1) |t| of the exact reference quotient t = y_ref / s_ref.
    """
    from fp8nemo import fp8

    u = UNIT_ROUNDOFF[torch.float32]
    q, s, y_ref = q.cpu(), s.cpu(), y_ref.float().cpu()
    static = scale is not None
    granularity = "tensor" if static else granularity
    want_q, want_s = fp8.quantize(y_ref, granularity, scale.cpu().reshape(1) if static else None,
                                  group_size)  # fmt: skip
    want_s = want_s.reshape(s.shape)
    assert q.shape == y_ref.shape and q.dtype == torch.float8_e4m3fn, (q.shape, q.dtype)
    rel = torch.as_tensor(rel, dtype=torch.float64).expand(y_ref.shape)
    finite = y_ref.isfinite()
    rel_max = rel[finite].max().item() if finite.any() else 0.0
    rel_s = 0.0 if static else (1 + rel_max) * (1 + u) / (1 - u) - 1
    if static:
        assert torch.equal(s, want_s), f"{what}: the static scale did not come back as given"
    else:
        # NaN or inf (from a NaN or inf amax) exactly where the reference's scale is.
        keep = want_s.isfinite()
        same = (s == want_s) | (s.isnan() & want_s.isnan())
        _fail((s.isfinite() != keep) | (~keep & ~same), what,
              "scales non-finite where the reference's are not (or the reverse)",
              lambda i: f"out={s[i].item():g} ref={want_s[i].item():g}")  # fmt: skip
        assert_within(s[keep], want_s[keep], want_s[keep].abs() * rel_s, f"{what}: scales")
    qb, wb = q.view(torch.uint8).int(), want_q.view(torch.uint8).int()
    nan_q, nan_w = (qb & 0x7F) == E4M3_NAN_CODE, (wb & 0x7F) == E4M3_NAN_CODE
    _fail(nan_q != nan_w, what, "codes NaN where the reference's are not (or the reverse)",
          lambda i: f"out={q[i].float().item():g} ref={want_q[i].float().item():g}")  # fmt: skip
    t = y_ref.double() / fp8.expand_scale(want_s, y_ref.shape, granularity, group_size).double()
    m = (q.float().double() + want_q.float().double()) / 2
    near = (t - m).abs() <= ((1 + rel) * (1 + u) / (1 - rel_s) - 1) * t.abs()
    neighbours = ((qb ^ wb) & 0x80 == 0) & ((qb - wb).abs() == 1)
    _fail(
        (qb != wb) & ~nan_w & ~(neighbours & near),
        what,
        "FP8 codes differ beyond a rounding boundary the fp32 round-off can cross",
        lambda i: (
            f"out={q[i].float().item():g} ref={want_q[i].float().item():g} "
            f"y_ref / s_ref={t[i].item():.7g}"
        ),
    )


def check_bad_input(fn, kwargs, error, match) -> None:
    """`fn(**kwargs)` raises `error` matching `match`; with error None it must succeed."""
    if error is None:
        fn(**kwargs)
        return
    with pytest.raises(error, match=match):
        fn(**kwargs)


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of x against ref, in dB."""
    ref = ref.double()
    noise = (x.double() - ref).pow(2).sum()
    return 10 * math.log10(ref.pow(2).sum().item() / max(noise.item(), 1e-300))


# Rounding to e4m3 (3 mantissa bits) leaves a relative error uniform in +-2^-4 of each value:
# variance 2^-8 / 3, an SQNR of 10 log10(768) = 28.9 dB per quantized tensor. A forward through
# L blocks quantizes 7 weights and 4 activations (both norms' outputs, the attention output,
# SiLU * up) per block; if none of these noises is amplified they add up, and the logits' SQNR
# against the reference is at least 28.9 - 10 log10(11 L) dB (13.7 dB for 3 blocks).
E4M3_SQNR_DB = 10 * math.log10(3 * 2**8)


def fp8_floor_db(layers: int, per_block: int = 11) -> float:
    """The floor for `per_block` quantized tensors per block (13 with an e4m3 KV cache: K, V)."""
    return E4M3_SQNR_DB - 10 * math.log10(per_block * layers)


# A fresh interpreter's peak RSS above its baseline while it runs `body` (peak RSS is per
# process): the prologue imports torch and fp8nemo first, so the figures are the body's own.
_PEAK = """
import json, sys
import torch
import fp8nemo.model

def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) << 10 for l in f if l.startswith(key + ":"))

def peak():
    return status("VmHWM") - base

torch.ones(64).sum()  # torch's first op sets up what it keeps
# The first module built on the meta device imports torch's decompositions (~70 MB, once per
# process, whatever the model's size): a library's start-up, not what is measured here.
torch.nn.Embedding(8, 8, device="meta")
base = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (Linux 4.0+)
        f.write("5")
except OSError:
    pass  # then the peaks count the imports' too: the figures only grow
"""


def torch_path_env() -> dict:
    """This process's environment without TRITON_INTERPRET: a child process started with it
    runs CPU tensors on the torch path (and CUDA ones on the compiled kernels)."""
    import os

    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_on_torch_path(code: str) -> str:
    """Run `code` in a fresh interpreter on the torch path (see torch_path_env); its stdout,
    after asserting it exited cleanly."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=torch_path_env(), timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def peak_rss(body: str, *args: str) -> dict:
    """Run `body` after the prologue above in a subprocess with `args` as sys.argv[1:]; it
    prints one JSON object (using `peak()`), which is returned."""
    import json
    import os
    import subprocess
    import sys

    import fp8nemo

    root = os.path.dirname(os.path.dirname(fp8nemo.__file__))  # this fp8nemo, not another
    env = {
        **torch_path_env(),
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([sys.executable, "-c", _PEAK + body, *args], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
