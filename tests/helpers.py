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
base = status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (Linux 4.0+)
        f.write("5")
except OSError:
    pass  # then the peaks count the imports' too: the figures only grow
"""


def peak_rss(body: str, *args: str) -> dict:
    """Run `body` after the prologue above in a subprocess with `args` as sys.argv[1:]; it
    prints one JSON object (using `peak()`), which is returned."""
    import json
    import os
    import subprocess
    import sys

    import fp8nemo

    root = os.path.dirname(os.path.dirname(fp8nemo.__file__))  # this fp8nemo, not another
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _PEAK + body, *args], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])
