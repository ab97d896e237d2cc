"""FP8 activation quantization: dynamic per-tensor, per-token and per-group (1xG) scales, or static
quantization with a given scale. Registered as `torch.ops.fp8nemo.quantize_fp8`.

Shapes (leading dimensions of x are flattened into M rows):
    x      [M, K]  fp32 / fp16 / bf16, unit column stride, row stride stride_xm
    y      [M, K]  float8_e4m3fn, contiguous
    scale  tensor [1] | token [M, 1] | group [M, ceil(K / G)], fp32 dequant multipliers (a given
           per-tensor scale may have any one-element shape)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fp8nemo import fp8 as fp8_ref

from ._triton import (
    INTERPRET,
    Launch,
    check_positive_finite,
    check_same_device,
    check_tensor,
    check_types,
    launch,
    register_op,
    use_triton,
)

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRANULARITIES = fp8_ref.ACTIVATION_GRANULARITIES
GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)

E4M3_MAX = tl.constexpr(fp8_ref.E4M3_MAX)
AMAX_FLOOR = tl.constexpr(fp8_ref.AMAX_FLOOR)

# Elements one program holds per step: enough bytes in flight per program on a GPU; the
# interpreter pays milliseconds per program and per helper call, so it gets far larger tiles.
TILE_ELEMS = 65536 if INTERPRET else 4096
MAX_ROWS = 1024 if INTERPRET else 16
BLOCK_K_MAX = 4096


@triton.jit
def _abs_bits(x):
    # |x| as int32 bits orders like the values, with NaN above +inf. Reducing the bits makes a
    # NaN reach the scale (tl.max on floats drops NaN on the GPU: max.f32 returns the other
    # operand) and keeps the interpreter on numpy (a custom combine_fn runs per element there).
    return tl.abs(x).to(tl.int32, bitcast=True)


@triton.jit
def _scale_of(amax_bits):
    amax = tl.maximum(amax_bits.to(tl.float32, bitcast=True), AMAX_FLOOR, tl.PropagateNan.ALL)
    return tl.math.div_rn(amax, E4M3_MAX)


@triton.jit
def _to_e4m3(x, scale):
    # Exact division, so the codes match the torch reference bit for bit; clamp keeps NaN.
    q = tl.math.div_rn(x, scale)
    q = tl.clamp(q, -E4M3_MAX, E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    return q.to(tl.float8e4nv)


@triton.jit
def _rows_amax_bits(x_rows, row_mask, K, BLOCK_K: tl.constexpr):
    # x_rows: [ROWS] row pointers -> [ROWS, BLOCK_K] running max of _abs_bits over the rows
    cols = tl.arange(0, BLOCK_K)
    amax = tl.zeros([x_rows.shape[0], BLOCK_K], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask[:, None] & (k0 + cols < K)[None, :]
        x = tl.load(x_rows[:, None] + (k0 + cols)[None, :], mask=mask, other=0.0)
        amax = tl.maximum(amax, _abs_bits(x.to(tl.float32)))
    return amax


@triton.jit(do_not_specialize=["M"])
def _absmax_kernel(
    x_ptr, amax_bits_ptr,
    M, K,
    stride_xm,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # amax over the whole tensor, as int32 bits (see _abs_bits) so an integer atomic max works.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    x_rows = x_ptr + rows.to(tl.int64) * stride_xm
    amax = _rows_amax_bits(x_rows, rows < M, K, BLOCK_K)
    tl.atomic_max(amax_bits_ptr, tl.max(tl.max(amax, 1), 0))


@triton.jit(do_not_specialize=["M"])
def _quantize_rows_kernel(
    x_ptr, y_ptr, scale_ptr, amax_bits_ptr,
    M, K,
    stride_xm, stride_sm,
    # 0: given scale (stride_sm 0 = per tensor), 1: each row's amax, 2: amax_bits_ptr (per tensor)
    SCALE_FROM: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows * stride_xm
    if SCALE_FROM == 1:
        scale = _scale_of(tl.max(_rows_amax_bits(x_rows, row_mask, K, BLOCK_K), 1))
        tl.store(scale_ptr + rows * stride_sm, scale, mask=row_mask)
    elif SCALE_FROM == 2:
        scale = _scale_of(tl.load(amax_bits_ptr + rows * 0))
        tl.store(scale_ptr + rows * 0, scale, mask=rows == 0)
    else:
        scale = tl.load(scale_ptr + rows * stride_sm, mask=row_mask, other=1.0)
    for k0 in range(0, K, BLOCK_K):
        mask = row_mask[:, None] & (k0 + cols < K)[None, :]
        x = tl.load(x_rows[:, None] + (k0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(
            y_ptr + rows[:, None] * K + (k0 + cols)[None, :], _to_e4m3(x, scale[:, None]), mask=mask
        )


@triton.jit(do_not_specialize=["M"])
def _quantize_groups_kernel(
    x_ptr, y_ptr, scale_ptr,
    M, K,
    stride_xm, stride_sm, stride_sg,
    STATIC: tl.constexpr,
    ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    # One [ROWS, GROUPS, GROUP] tile per program: GROUPS scale groups of GROUP columns in ROWS rows.
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    row_mask = rows < M
    rows = rows.to(tl.int64)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GROUPS, GROUP]
    mask = row_mask[:, None, None] & (cols < K)[None, :, :]
    x = tl.load(x_ptr + rows[:, None, None] * stride_xm + cols[None, :, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    scale_ptrs = scale_ptr + rows[:, None] * stride_sm + groups[None, :] * stride_sg
    scale_mask = row_mask[:, None] & (groups * GROUP < K)[None, :]
    if STATIC:
        scale = tl.load(scale_ptrs, mask=scale_mask, other=1.0)
    else:
        scale = _scale_of(tl.max(_abs_bits(x), 2))
        tl.store(scale_ptrs, scale, mask=scale_mask)
    y = _to_e4m3(x, scale[:, :, None])
    tl.store(y_ptr + rows[:, None, None] * K + cols[None, :, :], y, mask=mask)


# ---------------------------------------------------------------------------------------------
# The epilogue of the fused ops (norm.py, swiglu.py): an fp32 tile they computed is quantized as
# quantize_fp8 would quantize it, with a dynamic per-token or per-group scale or a static one.

SCALE_STATIC = tl.constexpr(0)  # one given per-tensor scale
SCALE_TOKEN = tl.constexpr(1)  # each row's amax
SCALE_GROUP = tl.constexpr(2)  # each 1 x GROUP group's amax
# A row up to this many elements stays in registers (NeMo: hidden 5120, SwiGLU 14336); a longer
# one is read again, CHUNK elements per step, once its amax (or RMS) is known.
ROW_TILE_MAX = 16384
CHUNK = 4096


@triton.jit
def _group_scales(
    y, scale_ptr, rows, row_mask, groups, K, stride_sm, stride_sg, GROUP: tl.constexpr
):
    # y: [ROWS, GROUPS, GROUP] fp32 -> each group's scale, stored and returned as [ROWS, GROUPS, 1]
    scale = _scale_of(tl.max(_abs_bits(y), 2))
    mask = row_mask[:, None] & (groups * GROUP < K)[None, :]
    tl.store(scale_ptr + rows[:, None] * stride_sm + groups[None, :] * stride_sg, scale, mask=mask)
    return scale[:, :, None]


@triton.jit
def _row_scales(amax_bits, scale_ptr, rows, row_mask, stride_sm):
    # amax_bits: [ROWS, GROUPS, GROUP] running max of _abs_bits -> each row's scale, stored and
    # returned as [ROWS, 1, 1]
    scale = _scale_of(tl.max(tl.max(amax_bits, 2), 1))
    tl.store(scale_ptr + rows * stride_sm, scale, mask=row_mask)
    return scale[:, None, None]


def as_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` `[..., K]` as `[M, K]` rows of one row stride, without a copy."""
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        raise ValueError(
            f"{name} with shape {list(t.shape)} and strides {list(t.stride())} cannot be viewed "
            f"as [M, K] rows; call .contiguous() first"
        ) from None


def fused_scale_mode(granularity: str, scale: torch.Tensor | None) -> int:
    """The SCALE_MODE constexpr a fused op's kernel gets."""
    return (SCALE_STATIC if scale is not None else
            SCALE_GROUP if granularity == "group" else SCALE_TOKEN).value  # fmt: skip


def check_fused_scale(name, x, granularity, scale, group_size) -> tuple:
    """Validate a fused op's quantization arguments for its output `[..., K]` (shaped like input
    `name`, `x`); returns the scale shape. Dynamic scales are per token or per group; a given
    `scale` (fp32, one element, positive and finite) means static per-tensor quantization."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    if scale is None:
        if granularity == "tensor":
            raise ValueError(
                "granularity='tensor' needs a static scale (a dynamic per-tensor scale needs "
                "the whole tensor's amax before any row is written); pass scale, or use "
                "granularity 'token' or 'group'"
            )
        if granularity == "group" and group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}; got {group_size!r}")
        return fp8_ref.scale_shape(x.shape, granularity, group_size)
    if granularity == "group":
        raise ValueError(
            "a given scale is one static per-tensor scale; granularity='group' takes no scale "
            "(use granularity 'token' or 'tensor' with a scale, or drop the scale)"
        )
    check_tensor("scale", scale, (torch.float32,))
    check_same_device(**{name: x, "scale": scale})
    if not fp8_ref.is_per_tensor(scale):
        raise ValueError(
            f"scale must have one element (a static per-tensor scale; any shape such as [], [1], "
            f"[1, 1]); got shape {list(scale.shape)}"
        )
    check_positive_finite("scale", scale)
    return (1,)


def fused_tile(K: int, granularity: str, group_size: int) -> tuple[int, int, int, bool]:
    """(ROWS, GROUPS, GROUP, ONE_TILE) of a fused op's [ROWS, GROUPS, GROUP] tiles over [M, K]:
    the whole (padded) row when it fits in ROW_TILE_MAX, else CHUNK columns per step."""
    group = group_size if granularity == "group" else min(128, triton.next_power_of_2(K))
    padded = max(triton.next_power_of_2(K), group)
    one_tile = padded <= ROW_TILE_MAX
    block = padded if one_tile else CHUNK
    return max(1, min(MAX_ROWS, TILE_ELEMS // block)), block // group, group, one_tile


def fused_num_warps(elems: int) -> int:
    # At most 32 values per thread and tensor: a whole 16384-wide row stays in registers.
    return 4 if elems < 2048 else 8 if elems < 8192 else 16


def fused_outputs(x, scale, scale_shape):
    """Codes shaped like x and the output scale: the given static scale as [1], else empty."""
    y = torch.empty(x.shape, dtype=fp8_ref.E4M3, device=x.device)
    if scale is not None:
        return y, scale.reshape(1).clone()
    return y, torch.empty(scale_shape, dtype=torch.float32, device=x.device)


def _check_args(x, granularity, scale, group_size):
    """Validate the op's arguments; returns the scale shape."""
    check_tensor("x", x, INPUT_DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension K; got shape {list(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError(
            f"x must have unit stride in its last dimension; got strides {list(x.stride())} "
            f"(call .contiguous() first)"
        )
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    if granularity == "group" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}; got {group_size!r}")
    expected = fp8_ref.scale_shape(x.shape, granularity, group_size)
    if scale is not None:
        check_tensor("scale", scale, (torch.float32,))
        check_same_device(x=x, scale=scale)
        per_tensor = granularity == "tensor" and fp8_ref.is_per_tensor(scale)
        if not per_tensor and tuple(scale.shape) != expected:
            raise ValueError(
                f"scale for granularity={granularity!r} of x {list(x.shape)} must have shape "
                f"{list(expected)}{' (or any one element)' if granularity == 'tensor' else ''}; "
                f"got {list(scale.shape)}"
            )
        check_positive_finite("scale", scale)
    else:
        check_same_device(x=x)
    return expected


def _rows_tile(k: int) -> tuple[int, int]:
    block_k = min(triton.next_power_of_2(k), BLOCK_K_MAX)
    return max(1, min(MAX_ROWS, TILE_ELEMS // block_k)), block_k


def _launches(x2, y, granularity, scale, out_scale, group_size) -> list[Launch]:
    """x2 [M, K] -> y [M, K]; writes out_scale, or reads the static `scale` when given."""
    M, K = x2.shape
    if granularity == "group":
        s = (scale if scale is not None else out_scale).reshape(M, -1)
        n_groups = triton.cdiv(K, group_size)
        groups = min(triton.next_power_of_2(n_groups), max(1, TILE_ELEMS // group_size))
        rows = max(1, min(MAX_ROWS, TILE_ELEMS // (groups * group_size)))
        grid = (triton.cdiv(M, rows), triton.cdiv(n_groups, groups))
        return [
            launch(
                _quantize_groups_kernel, grid,
                x2, y, s, M, K, x2.stride(0), s.stride(0), s.stride(1),
                STATIC=scale is not None, ROWS=rows, GROUPS=groups, GROUP=group_size,
            )
        ]  # fmt: skip
    rows, block_k = _rows_tile(K)
    grid = (triton.cdiv(M, rows),)
    steps, amax_bits = [], None
    s = (scale if scale is not None else out_scale).reshape(-1, 1)
    scale_from = 0 if scale is not None else (1 if granularity == "token" else 2)
    if scale_from == 2:
        amax_bits = torch.zeros(1, dtype=torch.int32, device=x2.device)
        steps.append(
            launch(
                _absmax_kernel, grid, x2, amax_bits, M, K, x2.stride(0), ROWS=rows, BLOCK_K=block_k
            )
        )
    stride_sm = s.stride(0) if s.shape[0] > 1 else 0
    steps.append(
        launch(
            _quantize_rows_kernel, grid,
            x2, y, s, amax_bits, M, K, x2.stride(0), stride_sm,
            SCALE_FROM=scale_from, ROWS=rows, BLOCK_K=block_k,
        )
    )  # fmt: skip
    return steps


def _launch(x2, y, granularity, scale, out_scale, group_size) -> None:
    for step in _launches(x2, y, granularity, scale, out_scale, group_size):
        step()


def _quantize_fp8_impl(x, granularity="token", *, scale=None, group_size=128):
    scale_shape = _check_args(x, granularity, scale, group_size)
    K = x.shape[-1]
    x2 = as_rows("x", x)
    no_rows = x2.shape[0] == 0  # decided before the path choice, so both paths agree
    if not no_rows and not use_triton(x.device, "quantize_fp8"):
        y, s = fp8_ref.quantize(x, granularity, scale, group_size)
        return y, s.reshape(scale_shape).clone()
    y = torch.empty(x.shape, dtype=fp8_ref.E4M3, device=x.device)
    if scale is not None:
        out_scale = scale.reshape(scale_shape).clone()
    else:
        out_scale = torch.empty(scale_shape, dtype=torch.float32, device=x.device)
    if no_rows:
        if scale is None and granularity == "tensor":  # an all-zero tensor's scale: the floor
            out_scale.copy_(fp8_ref.scale_from_amax(torch.zeros(1)))
        return y, out_scale
    _launch(x2, y.view(-1, K), granularity, scale, out_scale, group_size)
    return y, out_scale


def _quantize_fp8_fake(x, granularity="token", *, scale=None, group_size=128):
    scale_shape = _check_args(x, granularity, scale, group_size)
    y = torch.empty(x.shape, dtype=fp8_ref.E4M3, device=x.device)
    return y, torch.empty(scale_shape, dtype=torch.float32, device=x.device)


register_op(
    'quantize_fp8(Tensor x, str granularity="token", *, Tensor? scale=None, int group_size=128)'
    " -> (Tensor, Tensor)",
    _quantize_fp8_impl,
    _quantize_fp8_fake,
)


def quantize_fp8(
    x: torch.Tensor,
    granularity: str = "token",
    *,
    scale: torch.Tensor | None = None,
    group_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `x` `[..., K]` (fp32/fp16/bf16) to e4m3: returns `(x_fp8, scale)` with
    `x ~= x_fp8.float() * scale`, saturating at +-448 and keeping NaN.

    granularity: "tensor" (scale `[1]`), "token" (`[..., 1]`) or "group" (`[..., ceil(K/G)]`,
    G = group_size). A given fp32 `scale` of that shape means static quantization with it.
    """
    check_types(
        x=(x, torch.Tensor),
        granularity=(granularity, str),
        scale=(scale, (torch.Tensor, type(None))),
        group_size=(group_size, int),
    )
    return torch.ops.fp8nemo.quantize_fp8(x, granularity, scale=scale, group_size=group_size)


def aot_specs(cap: int):
    """The launcher's own launches for a bf16 [4096, 5120] input (NeMo's hidden size), for every
    granularity, dynamic and static, on meta tensors."""
    from ._triton import AotSpec

    x = torch.empty(4096, 5120, dtype=torch.bfloat16, device="meta")
    y = torch.empty(x.shape, dtype=fp8_ref.E4M3, device="meta")
    specs = []
    for granularity in GRANULARITIES:
        shape = fp8_ref.scale_shape(x.shape, granularity)
        for static in (False, True):
            scale = torch.empty(shape, device="meta") if static else None
            out_scale = torch.empty(shape, device="meta")
            label = f"{granularity} {'static' if static else 'dynamic'}"
            for step in _launches(x, y, granularity, scale, out_scale, 128):
                specs.append(AotSpec("quantize_fp8", label, step))
    return specs
