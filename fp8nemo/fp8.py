"""FP8 numerics in plain torch: e4m3 constants, the saturating cast, scales for every granularity,
and the reference quantize / dequantize / scaled matmul that the tests and the CPU path use.

This module imports nothing else from fp8nemo, so the kernels' CPU path can share it.
"""

from __future__ import annotations

import math

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Scales are dequant multipliers, amax / 448; the floor keeps an all-zero block's scale finite
# and non-zero (its codes are then all zero).
AMAX_FLOOR = 1e-12
BLOCK = 128  # 1x128 activation groups and 128x128 weight blocks

ACTIVATION_GRANULARITIES = ("tensor", "token", "group")
WEIGHT_GRANULARITIES = ("tensor", "channel", "block")


def saturating_cast(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Round to the nearest FP8 value, clamping to the finite range first; NaN stays NaN
    (torch's own cast does not saturate)."""
    fmax = torch.finfo(dtype).max
    return x.float().clamp(-fmax, fmax).to(dtype)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """fp32 dequant scale `max(amax, AMAX_FLOOR) / 448`; a NaN amax gives a NaN scale."""
    return amax.float().clamp_min(AMAX_FLOOR) / E4M3_MAX


def is_per_tensor(scale: torch.Tensor) -> bool:
    """Any one-element scale is a per-tensor scale, whatever its shape (`[]`, `[1]`, `[1, 1]`:
    checkpoints and vLLM store all three)."""
    return scale.numel() == 1


def scale_shape(shape: torch.Size | tuple, granularity: str, block: int = BLOCK) -> tuple:
    """The scale shape DESIGN.md gives `granularity` for a tensor of `shape` `[..., K]`."""
    *lead, k = shape
    if granularity == "tensor":
        return (1,)
    if granularity in ("token", "channel"):
        return (*lead, 1)
    if granularity == "group":
        return (*lead, math.ceil(k / block))
    if granularity == "block":
        if len(lead) != 1:
            raise ValueError(f"block scales need a 2-D weight, got shape {tuple(shape)}")
        return (math.ceil(lead[0] / block), math.ceil(k / block))
    raise ValueError(f"unknown granularity {granularity!r}")


def groups(x: torch.Tensor, granularity: str, block: int = BLOCK) -> torch.Tensor:
    """`x` (zero-padded to whole groups) viewed as `scale_shape(x.shape) + (elements,)`: each
    scale's elements along the last axis."""
    if granularity == "tensor":
        return x.reshape(1, -1)
    if granularity in ("token", "channel"):
        return x.unsqueeze(-2)
    if granularity == "group":
        x = torch.nn.functional.pad(x, (0, -x.shape[-1] % block))
        # The group count spelled out: -1 cannot be inferred when x has no rows.
        return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    if granularity == "block":  # [N, K] -> [N/b, b, K/b, b] -> [N/b, K/b, b * b]
        scale_shape(x.shape, granularity, block)  # 2-D only
        n, k = x.shape
        x = torch.nn.functional.pad(x, (0, -k % block, 0, -n % block))
        x = x.reshape(x.shape[0] // block, block, x.shape[1] // block, block)
        return x.transpose(1, 2).flatten(-2)
    raise ValueError(f"unknown granularity {granularity!r}")


def amax(x: torch.Tensor, granularity: str, block: int = BLOCK) -> torch.Tensor:
    """Absolute maximum per scale, shaped like the scale; NaN propagates."""
    if granularity == "tensor" and x.numel() == 0:
        return x.new_zeros(1, dtype=torch.float32)
    return groups(x.float().abs(), granularity, block).amax(-1)


def expand_scale(
    scale: torch.Tensor, shape: torch.Size | tuple, granularity: str, block: int = BLOCK
) -> torch.Tensor:
    """Broadcast a scale of `granularity` to the full `shape` it scales."""
    scale = scale.float()
    if granularity == "tensor":
        return scale.reshape(()).expand(shape)
    if granularity in ("token", "channel"):
        return scale.expand(shape)
    k = shape[-1]
    if granularity == "group":
        return scale.repeat_interleave(block, dim=-1)[..., :k]
    n = shape[0]
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]


def quantize(
    x: torch.Tensor,
    granularity: str = "token",
    scale: torch.Tensor | None = None,
    block: int = BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference FP8 quantization: `(x_fp8, scale)` with `x ~= x_fp8.float() * scale`.

    A given `scale` (fp32, shaped per `scale_shape`) means static quantization with it.
    """
    if scale is None:
        scale = scale_from_amax(amax(x, granularity, block))
    x_fp8 = saturating_cast(x.float() / expand_scale(scale, x.shape, granularity, block))
    return x_fp8, scale.float()


def dequantize(
    x_fp8: torch.Tensor, scale: torch.Tensor, granularity: str, block: int = BLOCK
) -> torch.Tensor:
    """fp32 `x_fp8 * scale`."""
    return x_fp8.float() * expand_scale(scale, x_fp8.shape, granularity, block)


def scaled_mm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    a_granularity: str,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    b_granularity: str,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    acc_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference `(a * a_scale) @ (b * b_scale).T + bias` on dequantized inputs, accumulated in
    `acc_dtype` (fp32 for the CPU path, fp64 for the tests' reference)."""
    a_deq = dequantize(a, a_scale, a_granularity).to(acc_dtype)
    b_deq = dequantize(b, b_scale, b_granularity).to(acc_dtype)
    out = a_deq @ b_deq.T
    if bias is not None:
        out = out + bias.to(acc_dtype)
    return out.to(out_dtype)
