"""Shared test helpers: poisoned outputs, error reports, round-off bounds."""

from __future__ import annotations

import math

import torch

# Unit round-off (half an ulp at 1.0) of each output dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
E4M3_NAN_CODE = 0x7F


def randn(*shape, gen, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    """Fresh Gaussian data drawn on the CPU (so CPU and CUDA runs see the same values)."""
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN, so an element the kernel does not write cannot pass."""
    if dtype == torch.float8_e4m3fn:
        return torch.full(shape, E4M3_NAN_CODE, dtype=torch.uint8, device=device).view(dtype)
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_within(out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """Every |out - ref| <= bound elementwise (NaN where ref is NaN); on failure name the first
    mismatches and the worst error relative to its bound."""
    out, ref, bound = out.double().cpu(), ref.double().cpu(), bound.double().cpu().expand_as(ref)
    both_nan = out.isnan() & ref.isnan()
    err = (out - ref).abs()
    bad = ~((err <= bound) | both_nan)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        lines = [
            f"  {tuple(i)}: out={out[tuple(i)].item():.6g} ref={ref[tuple(i)].item():.6g} "
            f"bound={bound[tuple(i)].item():.3g}"
            for i in idx
        ]
        ratio = (err / bound.clamp_min(1e-300)).nan_to_num(math.inf).max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements beyond the round-off bound "
            f"(worst error / bound = {ratio:.3g}); first:\n" + "\n".join(lines)
        )


def assert_codes_equal(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """FP8 tensors with the same bytes (NaN codes included)."""
    o, r = out.cpu().view(torch.uint8), ref.cpu().view(torch.uint8)
    bad = o != r
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        lines = [
            f"  {tuple(i)}: out={out.cpu()[tuple(i)].float().item():g} "
            f"ref={ref.cpu()[tuple(i)].float().item():g}"
            for i in idx
        ]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} FP8 codes differ; first:\n"
            + "\n".join(lines)
        )


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of x against ref, in dB."""
    ref = ref.double()
    noise = (x.double() - ref).pow(2).sum()
    return 10 * math.log10(ref.pow(2).sum().item() / max(noise.item(), 1e-300))
