"""Residual add + RMSNorm fused with FP8 quantization of its output, so the normed activations
are quantized without a second read: dynamic per-token or per-group (1xG) scales, or a static
per-tensor one. Registered as `torch.ops.fp8nemo.rmsnorm_fp8`.

Shapes (leading dimensions of x are flattened into M rows):
    x, residual  [M, K]  fp32 / fp16 / bf16, unit column stride, row strides stride_xm, stride_rm
    weight       [K]     fp32 / fp16 / bf16 / fp64, stride stride_w
    h            [M, K]  x's dtype, contiguous: x + residual, the new residual stream
    y            [M, K]  float8_e4m3fn, contiguous: h * rsqrt(mean(h^2) + eps) * weight in fp32
    scale        token [M, 1] | group [M, ceil(K / G)] | static [1], fp32 dequant multipliers
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8nemo import fp8 as fp8_ref

from ._triton import (
    check_same_device,
    check_tensor,
    check_types,
    launch,
    register_op,
    use_triton,
)
from .quantize import (
    INPUT_DTYPES,
    SCALE_GROUP,
    SCALE_STATIC,
    SCALE_TOKEN,
    _abs_bits,
    _group_scales,
    _row_scales,
    _to_e4m3,
    as_rows,
    check_fused_scale,
    fused_num_warps,
    fused_outputs,
    fused_scale_mode,
    fused_tile,
)

WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FP32 = torch.finfo(torch.float32)


@triton.jit
def _residual_add(x_ptr, res_ptr, h_ptr, rows, cols, mask, K, stride_xm, stride_rm,
                  HAS_RESIDUAL: tl.constexpr, STORE_H: tl.constexpr):  # fmt: skip
    # -> h = x + residual [ROWS, GROUPS, GROUP] as fp32, rounded to x's dtype first (HF's residual
    # stream is in the model dtype); written to h_ptr when STORE_H.
    x = tl.load(x_ptr + rows[:, None, None] * stride_xm + cols[None, :, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(
            res_ptr + rows[:, None, None] * stride_rm + cols[None, :, :], mask=mask, other=0.0
        )
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        if STORE_H:
            tl.store(h_ptr + rows[:, None, None] * K + cols[None, :, :], x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _rstd(sum_sq, K, eps):
    # Correctly rounded division and square root, as the torch reference computes them (K * 1.0:
    # K may arrive as the constant 1).
    return tl.math.div_rn(1.0, tl.sqrt_rn(tl.math.div_rn(sum_sq, K * 1.0) + eps))


@triton.jit
def _normed(h, rstd, w_ptr, cols, K, stride_w):
    w = tl.load(w_ptr + cols * stride_w, mask=cols < K, other=0.0).to(tl.float32)
    return h * rstd[:, None, None] * w[None, :, :]


@triton.jit(do_not_specialize=["M"])
def _rmsnorm_fp8_kernel(
    x_ptr, res_ptr, w_ptr, h_ptr, y_ptr, scale_ptr,
    M, K, eps,
    stride_xm, stride_rm, stride_w, stride_sm, stride_sg,
    HAS_RESIDUAL: tl.constexpr, SCALE_MODE: tl.constexpr,
    ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr, ONE_TILE: tl.constexpr,
):  # fmt: skip
    # ROWS rows per program in [ROWS, GROUPS, GROUP] tiles: the whole row at once (ONE_TILE), or
    # GROUPS * GROUP columns per step over the row two or three times (sum of squares, amax for
    # a per-token scale, codes), recomputing h from x and residual each time.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    rows = rows.to(tl.int64)
    BLOCK: tl.constexpr = GROUPS * GROUP
    tile_groups = tl.arange(0, GROUPS)
    tile_cols = tile_groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GROUPS, GROUP]
    if SCALE_MODE == SCALE_STATIC:
        scale = tl.load(scale_ptr)
    if ONE_TILE:
        mask = row_mask[:, None, None] & (tile_cols < K)[None, :, :]
        h = _residual_add(x_ptr, res_ptr, h_ptr, rows, tile_cols, mask, K, stride_xm, stride_rm,
                          HAS_RESIDUAL, True)  # fmt: skip
        rstd = _rstd(tl.sum(tl.sum(h * h, 2), 1), K, eps)
        y = _normed(h, rstd, w_ptr, tile_cols, K, stride_w)
        if SCALE_MODE == SCALE_TOKEN:
            scale = _row_scales(_abs_bits(y), scale_ptr, rows, row_mask, stride_sm)
        elif SCALE_MODE == SCALE_GROUP:
            scale = _group_scales(y, scale_ptr, rows, row_mask, tile_groups, K, stride_sm,
                                  stride_sg, GROUP)  # fmt: skip
        y_ptrs = y_ptr + rows[:, None, None] * K + tile_cols[None, :, :]
        tl.store(y_ptrs, _to_e4m3(y, scale), mask=mask)
    else:
        sum_sq = tl.zeros([ROWS, GROUPS, GROUP], tl.float32)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tile_cols
            mask = row_mask[:, None, None] & (cols < K)[None, :, :]
            h = _residual_add(x_ptr, res_ptr, h_ptr, rows, cols, mask, K, stride_xm, stride_rm,
                              HAS_RESIDUAL, True)  # fmt: skip
            sum_sq += h * h
        rstd = _rstd(tl.sum(tl.sum(sum_sq, 2), 1), K, eps)
        if SCALE_MODE == SCALE_TOKEN:
            amax = tl.zeros([ROWS, GROUPS, GROUP], tl.int32)
            for k0 in range(0, K, BLOCK):
                cols = k0 + tile_cols
                mask = row_mask[:, None, None] & (cols < K)[None, :, :]
                h = _residual_add(x_ptr, res_ptr, h_ptr, rows, cols, mask, K, stride_xm,
                                  stride_rm, HAS_RESIDUAL, False)  # fmt: skip
                amax = tl.maximum(amax, _abs_bits(_normed(h, rstd, w_ptr, cols, K, stride_w)))
            scale = _row_scales(amax, scale_ptr, rows, row_mask, stride_sm)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tile_cols
            mask = row_mask[:, None, None] & (cols < K)[None, :, :]
            h = _residual_add(x_ptr, res_ptr, h_ptr, rows, cols, mask, K, stride_xm, stride_rm,
                              HAS_RESIDUAL, False)  # fmt: skip
            y = _normed(h, rstd, w_ptr, cols, K, stride_w)
            if SCALE_MODE == SCALE_GROUP:
                scale = _group_scales(y, scale_ptr, rows, row_mask, k0 // GROUP + tile_groups,
                                      K, stride_sm, stride_sg, GROUP)  # fmt: skip
            tl.store(y_ptr + rows[:, None, None] * K + cols[None, :, :], _to_e4m3(y, scale),
                     mask=mask)  # fmt: skip


def _check_args(x, weight, eps, residual, scale, granularity, group_size):
    """Validate the op's arguments; returns the scale shape."""
    check_tensor("x", x, INPUT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension K; got shape {list(x.shape)}")
    K = x.shape[-1]
    check_tensor("weight", weight, WEIGHT_DTYPES, ndim=1)
    if weight.shape[0] != K:
        raise ValueError(
            f"weight must be [K] = [{K}] for x {list(x.shape)}; got {list(weight.shape)}"
        )
    if residual is not None:
        check_tensor("residual", residual, (x.dtype,))
        if residual.shape != x.shape:
            raise ValueError(
                f"residual must have x's shape {list(x.shape)}; got {list(residual.shape)}"
            )
    check_same_device(x=x, weight=weight, residual=residual)
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have unit stride in its last dimension; got strides "
                f"{list(t.stride())} (call .contiguous() first)"
            )
        if t is not None:
            as_rows(name, t)
    # eps goes to the kernel as fp32: it must stay positive and finite there.
    if not FP32.tiny <= eps <= FP32.max:
        raise ValueError(
            f"eps must be positive and finite in fp32 (in [{FP32.tiny:.3g}, {FP32.max:.3g}]); "
            f"got {eps}"
        )
    return check_fused_scale("x", x, granularity, scale, group_size)


def rmsnorm_reference(x, weight, eps=1e-5, residual=None):
    """Torch residual add + RMSNorm: `(y, h)`, h = x + residual in x's dtype (x itself without a
    residual), y = h * rsqrt(mean(h^2) + eps) * weight in fp32 (the CPU path and the tests'
    reference; rsqrt as 1 / sqrt, both correctly rounded, as the kernel computes it)."""
    h = x if residual is None else x + residual
    hf = h.float()
    var = (hf * hf).sum(-1, keepdim=True) / x.shape[-1] + eps
    # The root through fp64, rounded once to fp32: torch's vectorized fp32 sqrt on the CPU is
    # not always correctly rounded.
    rstd = 1 / var.double().sqrt().float()
    return hf * rstd * weight.float(), h


def _launches(x2, weight, res2, h2, y2, scale, out_scale, eps, granularity, group_size):
    """x2, res2 [M, K] -> h2 [M, K] (with a residual), y2 [M, K] e4m3; writes out_scale, or reads
    the static `scale`."""
    M, K = x2.shape
    rows, groups, group, one_tile = fused_tile(K, granularity, group_size)
    s = (scale if scale is not None else out_scale).reshape(M if scale is None else 1, -1)
    return [
        launch(
            _rmsnorm_fp8_kernel, (triton.cdiv(M, rows),),
            x2, res2, weight, h2, y2, s,
            M, K, eps,
            x2.stride(0), 0 if res2 is None else res2.stride(0), weight.stride(0),
            s.stride(0), s.stride(1),
            HAS_RESIDUAL=res2 is not None, SCALE_MODE=fused_scale_mode(granularity, scale),
            ROWS=rows, GROUPS=groups, GROUP=group, ONE_TILE=one_tile,
            num_warps=fused_num_warps(rows * groups * group),
        )
    ]  # fmt: skip


def _run(x, weight, eps, residual, scale, granularity, group_size, scale_shape):
    """(x_fp8, scale, h): h the new residual when one is given, else None."""
    no_rows = x.numel() == 0  # decided before the path choice, so both paths agree
    if not no_rows and not use_triton(x.device, "rmsnorm_fp8"):
        y, h = rmsnorm_reference(x, weight, eps, residual)
        static = scale is not None
        q, s = fp8_ref.quantize(y, "tensor" if static else granularity, scale, group_size)
        return q, s.reshape(scale_shape).clone(), None if residual is None else h.contiguous()
    q, out_scale = fused_outputs(x, scale, scale_shape)
    h = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if no_rows:
        return q, out_scale, h
    K = x.shape[-1]
    res2, h2 = (None, None) if residual is None else (as_rows("residual", residual), h.view(-1, K))
    for step in _launches(as_rows("x", x), weight, res2, h2, q.view(-1, K), scale, out_scale, eps,
                          granularity, group_size):  # fmt: skip
        step()
    return q, out_scale, h


def _rmsnorm_fp8_impl(x, weight, eps=1e-5, *, residual=None, scale=None, granularity="token",
                      group_size=128):  # fmt: skip
    scale_shape = _check_args(x, weight, eps, residual, scale, granularity, group_size)
    return _run(x, weight, eps, residual, scale, granularity, group_size, scale_shape)


def _rmsnorm_fp8_fake(x, weight, eps=1e-5, *, residual=None, scale=None, granularity="token",
                      group_size=128):  # fmt: skip
    scale_shape = _check_args(x, weight, eps, residual, scale, granularity, group_size)
    q = torch.empty(x.shape, dtype=fp8_ref.E4M3, device=x.device)
    h = None if residual is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return q, torch.empty(scale_shape, dtype=torch.float32, device=x.device), h


register_op(
    "rmsnorm_fp8(Tensor x, Tensor weight, float eps=1e-05, *, Tensor? residual=None, "
    'Tensor? scale=None, str granularity="token", int group_size=128) -> (Tensor, Tensor, Tensor?)',
    _rmsnorm_fp8_impl,
    _rmsnorm_fp8_fake,
)


def rmsnorm_fp8(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-5,
    *,
    residual: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    granularity: str = "token",
    group_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm of `x + residual` (x `[..., K]` fp32/fp16/bf16, weight `[K]`), quantized to e4m3:
    returns `(x_fp8, x_scale, residual_out)`.

    residual_out is `x + residual` in x's dtype (a new tensor), or x itself without a residual.
    The normed value `h * rsqrt(mean(h^2) + eps) * weight` is computed in fp32 and quantized as
    `quantize_fp8` quantizes: granularity "token" (scale `[..., 1]`) or "group" (`[..., ceil(K/G)]`,
    G = group_size) for dynamic scales; a given fp32 one-element `scale` means static per-tensor
    quantization with it (granularity "token" or "tensor"), returned as `[1]`.
    """
    check_types(
        x=(x, torch.Tensor),
        weight=(weight, torch.Tensor),
        eps=(eps, (float, int)),
        residual=(residual, (torch.Tensor, type(None))),
        scale=(scale, (torch.Tensor, type(None))),
        granularity=(granularity, str),
        group_size=(group_size, int),
    )
    q, s, h = torch.ops.fp8nemo.rmsnorm_fp8(
        x, weight, float(eps), residual=residual, scale=scale, granularity=granularity,
        group_size=group_size,
    )  # fmt: skip
    return q, s, x if h is None else h


def aot_specs(cap: int):
    """The launcher's launches at NeMo's hidden size (bf16 [4096, 5120], bf16 weight) with a
    residual for every scale kind, without one per token, and a row too long for registers."""
    from ._triton import AotSpec

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    specs = []
    cases = [("token", False, True, 5120), ("group", False, True, 5120),
             ("token", True, True, 5120), ("token", False, False, 5120),
             ("token", False, True, 32768), ("group", False, True, 32768)]  # fmt: skip
    for granularity, static, with_residual, K in cases:
        x, weight = meta(4096, K), meta(K)
        res = meta(4096, K) if with_residual else None
        scale = meta(1, dtype=torch.float32) if static else None
        scale_shape = check_fused_scale("x", x, granularity, scale, 128)
        out_scale = meta(*scale_shape, dtype=torch.float32)
        label = "static" if static else granularity
        label += f"{' residual' if with_residual else ''} K={K}"
        for step in _launches(x, weight, res, res, meta(4096, K, dtype=fp8_ref.E4M3), scale,
                              out_scale, 1e-5, granularity, 128):  # fmt: skip
            specs.append(AotSpec("rmsnorm_fp8", label, step))
    return specs
