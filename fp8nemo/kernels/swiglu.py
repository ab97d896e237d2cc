"""SwiGLU's SiLU(gate) * up fused with FP8 quantization of its output, the input of the down
projection: dynamic per-token or per-group (1xG) scales, or a static per-tensor one. Registered as
`torch.ops.fp8nemo.silu_mul_fp8`.

Shapes (leading dimensions are flattened into M rows):
    gate, up  [M, I]  fp32 / fp16 / bf16, one dtype, unit column stride, row strides stride_gm,
                      stride_um (so they can be the halves gu[:, :I], gu[:, I:] of one GEMM output)
    y         [M, I]  float8_e4m3fn, contiguous: silu(gate) * up in fp32
    scale     token [M, 1] | group [M, ceil(I / G)] | static [1], fp32 dequant multipliers
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


@triton.jit
def _silu_mul(gate_ptr, up_ptr, rows, cols, mask, stride_gm, stride_um):
    # -> silu(gate) * up [ROWS, GROUPS, GROUP] in fp32; silu(g) = g / (1 + exp(-g)) with an exact
    # division, as the torch reference computes it.
    offs = cols[None, :, :]
    g = tl.load(gate_ptr + rows[:, None, None] * stride_gm + offs, mask=mask, other=0.0)
    u = tl.load(up_ptr + rows[:, None, None] * stride_um + offs, mask=mask, other=0.0)
    g = g.to(tl.float32)
    return tl.math.div_rn(g, 1.0 + tl.exp(-g)) * u.to(tl.float32)


@triton.jit(do_not_specialize=["M"])
def _silu_mul_fp8_kernel(
    gate_ptr, up_ptr, y_ptr, scale_ptr,
    M, I,
    stride_gm, stride_um, stride_sm, stride_sg,
    SCALE_MODE: tl.constexpr, TWO_PASS: tl.constexpr,
    ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    # One [ROWS, GROUPS, GROUP] tile per program: the whole row for a per-token scale, or the
    # columns program_id(1) * GROUPS * GROUP onwards for group and static scales. TWO_PASS: a
    # per-token row too long for one tile, read twice (its amax, then its codes).
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    rows = rows.to(tl.int64)
    tile_groups = tl.arange(0, GROUPS)
    tile_cols = tile_groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [GROUPS, GROUP]
    if TWO_PASS:
        amax = tl.zeros([ROWS, GROUPS, GROUP], tl.int32)
        for k0 in range(0, I, GROUPS * GROUP):
            cols = k0 + tile_cols
            mask = row_mask[:, None, None] & (cols < I)[None, :, :]
            y = _silu_mul(gate_ptr, up_ptr, rows, cols, mask, stride_gm, stride_um)
            amax = tl.maximum(amax, _abs_bits(y))
        scale = _row_scales(amax, scale_ptr, rows, row_mask, stride_sm)
        for k0 in range(0, I, GROUPS * GROUP):
            cols = k0 + tile_cols
            mask = row_mask[:, None, None] & (cols < I)[None, :, :]
            y = _silu_mul(gate_ptr, up_ptr, rows, cols, mask, stride_gm, stride_um)
            tl.store(y_ptr + rows[:, None, None] * I + cols[None, :, :], _to_e4m3(y, scale),
                     mask=mask)  # fmt: skip
    else:
        groups = tl.program_id(1) * GROUPS + tile_groups
        cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = row_mask[:, None, None] & (cols < I)[None, :, :]
        y = _silu_mul(gate_ptr, up_ptr, rows, cols, mask, stride_gm, stride_um)
        if SCALE_MODE == SCALE_TOKEN:
            scale = _row_scales(_abs_bits(y), scale_ptr, rows, row_mask, stride_sm)
        elif SCALE_MODE == SCALE_GROUP:
            scale = _group_scales(y, scale_ptr, rows, row_mask, groups, I, stride_sm, stride_sg,
                                  GROUP)  # fmt: skip
        else:
            scale = tl.load(scale_ptr)
        tl.store(y_ptr + rows[:, None, None] * I + cols[None, :, :], _to_e4m3(y, scale),
                 mask=mask)  # fmt: skip


def _check_args(gate, up, scale, granularity, group_size):
    """Validate the op's arguments; returns the scale shape."""
    check_tensor("gate", gate, INPUT_DTYPES)
    check_tensor("up", up, (gate.dtype,))
    if gate.dim() == 0 or gate.shape[-1] == 0:
        raise ValueError(
            f"gate must have a non-empty last dimension I; got shape {list(gate.shape)}"
        )
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {list(gate.shape)}; got {list(up.shape)}")
    check_same_device(gate=gate, up=up)
    for name, t in (("gate", gate), ("up", up)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have unit stride in its last dimension; got strides "
                f"{list(t.stride())} (call .contiguous() first)"
            )
        as_rows(name, t)
    return check_fused_scale("gate", gate, granularity, scale, group_size)


def silu_mul_reference(gate, up):
    """Torch SiLU(gate) * up in fp32, silu(g) = g / (1 + exp(-g)) as the kernel computes it (the
    CPU path and the tests' reference)."""
    g = gate.float()
    return g / (1 + torch.exp(-g)) * up.float()


def _launches(gate2, up2, y2, scale, out_scale, granularity, group_size):
    """gate2, up2 [M, I] -> y2 [M, I] e4m3; writes out_scale, or reads the static `scale`."""
    M, I = gate2.shape
    rows, groups, group, one_tile = fused_tile(I, granularity, group_size)
    mode = fused_scale_mode(granularity, scale)
    # A per-token row is one program's; group and static tiles split it.
    col_tiles = 1 if mode == SCALE_TOKEN.value else triton.cdiv(I, groups * group)
    s = (scale if scale is not None else out_scale).reshape(M if scale is None else 1, -1)
    return [
        launch(
            _silu_mul_fp8_kernel, (triton.cdiv(M, rows), col_tiles),
            gate2, up2, y2, s,
            M, I,
            gate2.stride(0), up2.stride(0), s.stride(0), s.stride(1),
            SCALE_MODE=mode, TWO_PASS=mode == SCALE_TOKEN.value and not one_tile,
            ROWS=rows, GROUPS=groups, GROUP=group,
            num_warps=fused_num_warps(rows * groups * group),
        )
    ]  # fmt: skip


def _run(gate, up, scale, granularity, group_size, scale_shape):
    no_rows = gate.numel() == 0  # decided before the path choice, so both paths agree
    if not no_rows and not use_triton(gate.device, "silu_mul_fp8"):
        y = silu_mul_reference(gate, up)
        q, s = fp8_ref.quantize(y, "tensor" if scale is not None else granularity, scale,
                                group_size)  # fmt: skip
        return q, s.reshape(scale_shape).clone()
    q, out_scale = fused_outputs(gate, scale, scale_shape)
    if no_rows:
        return q, out_scale
    I = gate.shape[-1]
    for step in _launches(as_rows("gate", gate), as_rows("up", up), q.view(-1, I), scale, out_scale,
                          granularity, group_size):  # fmt: skip
        step()
    return q, out_scale


def _silu_mul_fp8_impl(gate, up, *, scale=None, granularity="token", group_size=128):
    scale_shape = _check_args(gate, up, scale, granularity, group_size)
    return _run(gate, up, scale, granularity, group_size, scale_shape)


def _silu_mul_fp8_fake(gate, up, *, scale=None, granularity="token", group_size=128):
    scale_shape = _check_args(gate, up, scale, granularity, group_size)
    q = torch.empty(gate.shape, dtype=fp8_ref.E4M3, device=gate.device)
    return q, torch.empty(scale_shape, dtype=torch.float32, device=gate.device)


register_op(
    'silu_mul_fp8(Tensor gate, Tensor up, *, Tensor? scale=None, str granularity="token", '
    "int group_size=128) -> (Tensor, Tensor)",
    _silu_mul_fp8_impl,
    _silu_mul_fp8_fake,
)


def silu_mul_fp8(
    gate: torch.Tensor,
    up: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    granularity: str = "token",
    group_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SiLU(gate) * up (gate, up `[..., I]`, one fp32/fp16/bf16 dtype, any row strides: e.g. the
    two halves of one `[M, 2I]` gate/up GEMM output) computed in fp32 and quantized to e4m3 as
    `quantize_fp8` quantizes: returns `(y_fp8, y_scale)`.

    granularity "token" (scale `[..., 1]`) or "group" (`[..., ceil(I/G)]`, G = group_size) for
    dynamic scales; a given fp32 one-element `scale` means static per-tensor quantization with it
    (granularity "token" or "tensor"), returned as `[1]`.
    """
    check_types(
        gate=(gate, torch.Tensor),
        up=(up, torch.Tensor),
        scale=(scale, (torch.Tensor, type(None))),
        granularity=(granularity, str),
        group_size=(group_size, int),
    )
    return torch.ops.fp8nemo.silu_mul_fp8(
        gate, up, scale=scale, granularity=granularity, group_size=group_size
    )


def aot_specs(cap: int):
    """The launcher's launches at NeMo's SwiGLU width (gate and up the bf16 halves of one
    [4096, 2 * 14336] GEMM output) for every scale kind, and a row too long for registers."""
    from ._triton import AotSpec

    specs = []
    for granularity, static, I in (("token", False, 14336), ("group", False, 14336),
                                   ("token", True, 14336), ("token", False, 28672)):  # fmt: skip
        gu = torch.empty(4096, 2 * I, dtype=torch.bfloat16, device="meta")
        gate, up = gu[:, :I], gu[:, I:]
        scale = torch.empty(1, device="meta") if static else None
        out_scale = torch.empty(check_fused_scale("gate", gate, granularity, scale, 128),
                                device="meta")  # fmt: skip
        y = torch.empty(4096, I, dtype=fp8_ref.E4M3, device="meta")
        label = f"{'static' if static else granularity} I={I}"
        for step in _launches(gate, up, y, scale, out_scale, granularity, 128):
            specs.append(AotSpec("silu_mul_fp8", label, step))
    return specs
