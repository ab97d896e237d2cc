"""FP8 GEMM `(a * a_scale) @ (b * b_scale).T + bias` with per-tensor, per-token x per-channel and
1x128 x 128x128 block scales, fp32 accumulation. Registered as `torch.ops.fp8nemo.fp8_gemm`.

Shapes (the kernel computes C[m, n] = sum_k A[m, k] B[n, k]):
    a        [M, K]  e4m3, unit stride along K       b        [N, K]  e4m3 (nn.Linear weight)
    a_scale  one element (any shape) tensor, [M, 1] token, [M, ceil(K/128)] group
    b_scale  one element (any shape) tensor, [N, 1] channel, [ceil(N/128), ceil(K/128)] block
    bias     [N]     out  [M, N] bf16 / fp16 / fp32

Every 128-wide K-tile is promoted into an fp32 accumulator: Hopper's FP8 MMA accumulates in
about 14 bits, and Triton would otherwise chain the whole K loop through it (what fast_accum
asks for). Decode (M <= 64) swaps the operands: the weight fills the MMA's 64-row side, the few
tokens its narrow side, and the kernel writes C transposed (swap-AB). Split-K programs write
fp32 partials that one small kernel sums in a fixed order (deterministic), adding the bias.
On Hopper the autotuner also times overlap configs, which keep one half-tile's MMA in flight
through the other's promotion, and TMA configs (_fp8_gemm_tma_kernel: tensor-descriptor loads
on a persistent grid); _gemm_tile is the K loop all of them share.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fp8nemo import fp8 as fp8_ref

from ._triton import (
    Autotuner,
    KernelConfig,
    Launch,
    capability,
    check_same_device,
    check_tensor,
    check_types,
    launch,
    m_bucket,
    num_sms,
    register_op,
    use_triton,
)

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # also the bias dtypes
SCALE_BLOCK = fp8_ref.BLOCK
SMALL_M = 64  # at or below: swap-AB configs
# (a_scale kind, b_scale kind) pairs, in the order an ambiguous shape is resolved.
SCALE_PAIRS = (
    ("tensor", "tensor"),
    ("tensor", "channel"),
    ("token", "tensor"),
    ("token", "channel"),
    ("group", "block"),
)


def _config(prefix, bm, bn, bk, warps, stages, split=1, swap=False, tma=False, overlap=False):
    """A named config; swap-AB configs tile the weight's rows with BLOCK_M and the tokens with
    BLOCK_N, which is M's bucket (at least 16), hence 'M' in the name and bn=0 here. TMA
    configs load through tensor descriptors on a persistent grid (_fp8_gemm_tma_kernel);
    overlap configs split each tile in two halves along N and keep one half's MMA in flight
    while the other is promoted."""
    name = f"{prefix}{bm}x{'M' if swap else bn}x{bk}w{warps}s{stages}"
    name += f"k{split}" if split > 1 else ""
    name += "".join(tag for tag, on in (("swap", swap), ("tma", tma), ("ov", overlap)) if on)
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=8, SWAP=swap)
    meta.update(TMA=tma, OVERLAP=overlap)
    return KernelConfig(name, meta, warps, stages)


# Every config holds two fp32 tiles (accumulator + the K-tile's partial) in at most 128
# registers per thread: BLOCK_M * BLOCK_N * 2 <= 128 * 32 * num_warps. 16 warps would allow
# 128x256 tiles but cap a thread at 128 registers, and those configs spill.
HOPPER_CONFIGS = [
    _config("h", 128, 128, 128, 8, 4),
    _config("h", 64, 256, 128, 8, 4),
    _config("h", 128, 64, 128, 4, 5),
    _config("h", 64, 128, 128, 4, 5),
    _config("h", 128, 128, 128, 8, 4, split=2),
    _config("h", 64, 128, 128, 4, 5, split=4),
    # promotion overlapped with the other half-tile's MMA; the autotuner picks per shape
    _config("h", 128, 128, 128, 8, 4, overlap=True),
    _config("h", 64, 256, 128, 8, 4, overlap=True),
    _config("h", 128, 128, 128, 8, 4, split=2, overlap=True),
    # through TMA on a persistent grid, promoted per tile or overlapped
    _config("h", 128, 128, 128, 8, 4, tma=True),
    _config("h", 64, 256, 128, 8, 4, tma=True),
    _config("h", 128, 64, 128, 4, 5, tma=True),
    _config("h", 128, 128, 128, 8, 4, tma=True, overlap=True),
    _config("h", 64, 256, 128, 8, 4, tma=True, overlap=True),
    # decode, swap-AB
    _config("h", 128, 0, 128, 4, 6, swap=True),
    _config("h", 64, 0, 128, 4, 8, swap=True),
    _config("h", 64, 0, 128, 4, 8, split=2, swap=True),
    _config("h", 64, 0, 128, 4, 8, split=4, swap=True),
    _config("h", 128, 0, 128, 4, 6, split=4, swap=True),
    _config("h", 64, 0, 128, 4, 8, split=8, swap=True),
]
# Ada has ~100 KB of shared memory per SM and no wgmma: smaller tiles, fewer stages.
ADA_CONFIGS = [
    _config("a", 128, 128, 128, 8, 2),
    _config("a", 128, 64, 128, 4, 3),
    _config("a", 64, 128, 128, 4, 3),
    _config("a", 64, 64, 128, 4, 4),
    _config("a", 64, 64, 128, 4, 4, split=4),
    _config("a", 64, 0, 128, 4, 4, swap=True),
    _config("a", 64, 0, 128, 4, 4, split=4, swap=True),
]
# The interpreter pays per program, so its default tiles are large; tests pick others explicitly.
INTERPRETER_CONFIGS = [
    _config("i", 64, 64, 128, 4, 1),
    _config("i", 64, 0, 128, 4, 1, split=2, swap=True),
    _config("i", 64, 0, 128, 4, 1, swap=True),
]


def configs_for(cap: tuple[int, int]) -> list[KernelConfig]:
    if cap == (0, 0):
        return INTERPRETER_CONFIGS
    return HOPPER_CONFIGS if cap >= (9, 0) else ADA_CONFIGS


def fits(config: KernelConfig, block_scaled: bool, block_n: int) -> bool:
    """Whether `config` can run at all: two fp32 tiles in 128 registers per thread, and for
    block scales BLOCK_K = 128, the scale block."""
    bm, bk = config.meta["BLOCK_M"], config.meta["BLOCK_K"]
    regs_ok = 2 * bm * block_n <= 128 * 32 * config.num_warps
    return regs_ok and (not block_scaled or bk == SCALE_BLOCK)


def with_token_tile(config: KernelConfig, M: int) -> KernelConfig:
    """Swap-AB configs take M's bucket (at least 16) as their token tile."""
    if not config.meta["SWAP"]:
        return config
    bn = max(16, m_bucket(M))
    return KernelConfig(
        config.name, {**config.meta, "BLOCK_N": bn}, config.num_warps, config.num_stages
    )


def tma_ready(*operands: torch.Tensor) -> bool:
    """Whether TMA can load these operands: 16-byte aligned bases and row strides."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in operands)


def prune_configs(configs, M, N, K, block_scaled, sms, tma=True):
    """The configs worth timing for this problem, in preference order: swap-AB exactly when
    M <= 64, split-K only while the output tiles leave SMs idle and each split keeps at least
    two K-tiles, TMA only where `tma` says the operands allow it."""
    kept = []
    for c in configs:
        if c.meta["SWAP"] != (M <= SMALL_M) or (c.meta["TMA"] and not tma):
            continue
        c = with_token_tile(c, M)
        bm, bn, bk, split = (c.meta[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K"))
        rows, cols = (N, M) if c.meta["SWAP"] else (M, N)
        tiles = triton.cdiv(rows, bm) * triton.cdiv(cols, bn)
        if not fits(c, block_scaled, bn):
            continue
        if split > 1 and (tiles >= sms or triton.cdiv(K, bk) < 2 * split):
            continue
        kept.append(c)
    return kept


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile `tile` in grouped order: GROUP_M row tiles in a row reuse
    each B tile from L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (tile // width) * GROUP_M
    group_rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % group_rows
    pid_n = (tile % width) // group_rows
    return pid_m, pid_n


@triton.jit
def _scale_block(
    part, kt, row0_a, row0_b, a_scale_ptr, b_scale_ptr, rows_a, rows_b,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    A_SCALE_ROWS: tl.constexpr, B_SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """K-tile kt's partial product times its group x block scales; the tile's rows start at
    row0_a and row0_b."""
    # A tile no taller than a 128-row scale block lies inside one: a single scale, which saves
    # the registers of a per-row vector.
    a_scale_ptr += kt * stride_ask
    b_scale_ptr += kt * stride_bsk
    if A_SCALE_ROWS % BLOCK_M == 0:
        a_s = tl.load(a_scale_ptr + (row0_a // A_SCALE_ROWS) * stride_asm)
    else:
        a_s = tl.load(a_scale_ptr + (rows_a // A_SCALE_ROWS) * stride_asm)[:, None]
    if B_SCALE_ROWS % BLOCK_N == 0:
        b_s = tl.load(b_scale_ptr + (row0_b // B_SCALE_ROWS) * stride_bsn)
    else:
        b_s = tl.load(b_scale_ptr + (rows_b // B_SCALE_ROWS) * stride_bsn)[None, :]
    return part * a_s * b_s


@triton.jit
def _accumulate(
    acc, a, b, kt, row0_a, row0_b, a_scale_ptr, b_scale_ptr, rows_a, rows_b,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    BLOCK_SCALED: tl.constexpr, FAST_ACCUM: tl.constexpr,
    A_SCALE_ROWS: tl.constexpr, B_SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """acc + a @ b.T for one K-tile: a fresh MMA chain promoted into the fp32 accumulator (see
    the module doc), or with FAST_ACCUM the MMA's own accumulator chained across K."""
    if FAST_ACCUM:
        acc = tl.dot(a, tl.trans(b), acc)
    else:
        acc = _promote(
            acc, tl.dot(a, tl.trans(b)), kt, row0_a, row0_b, a_scale_ptr, b_scale_ptr,
            rows_a, rows_b, stride_asm, stride_ask, stride_bsn, stride_bsk,
            BLOCK_SCALED, A_SCALE_ROWS, B_SCALE_ROWS, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    return acc


@triton.jit
def _promote(
    acc, part, kt, row0_a, row0_b, a_scale_ptr, b_scale_ptr, rows_a, rows_b,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    BLOCK_SCALED: tl.constexpr, A_SCALE_ROWS: tl.constexpr, B_SCALE_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """acc + K-tile kt's partial product (times its block scales, if any) in fp32."""
    if BLOCK_SCALED:
        part = _scale_block(
            part, kt, row0_a, row0_b, a_scale_ptr, b_scale_ptr, rows_a, rows_b,
            stride_asm, stride_ask, stride_bsn, stride_bsk,
            A_SCALE_ROWS, B_SCALE_ROWS, BLOCK_M, BLOCK_N,
        )  # fmt: skip
    return acc + part


@triton.jit
def _load_k_tile(
    src, rows, row0, kt, K, stride, offs_k,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """K-tile kt of an operand's tile whose rows are `rows` (from row0): through its tensor
    descriptor (TMA zero-fills past the edges), or by pointer, reading zeros past a ragged K."""
    if TMA:
        tile = src.load([row0, kt * BLOCK_K])
    else:
        ptrs = src + rows[:, None] * stride + (kt * BLOCK_K + offs_k)[None, :]
        if EVEN_K:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=(offs_k < K - kt * BLOCK_K)[None, :], other=0.0)
    return tile


@triton.jit
def _store_tile(
    acc, c_ptr, bias_ptr, a_scale_ptr, b_scale_ptr, rows_a, rows_b, offs_m, offs_n, pid_k,
    M, N, stride_cm, stride_cn, stride_cs, stride_asm, stride_bsn,
    BLOCK_SCALED: tl.constexpr, A_SCALE_ROWS: tl.constexpr, B_SCALE_ROWS: tl.constexpr,
    BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """Row scales, bias and the masked store of one output tile (fp32 partials under split-K)."""
    if not BLOCK_SCALED:
        a_s = tl.load(a_scale_ptr + (rows_a // A_SCALE_ROWS) * stride_asm)
        b_s = tl.load(b_scale_ptr + (rows_b // B_SCALE_ROWS) * stride_bsn)
        acc *= a_s[:, None] * b_s[None, :]
    offs_m = offs_m.to(tl.int64)
    offs_n = offs_n.to(tl.int64)
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    if SPLIT_K > 1:
        tl.store(c_ptrs + pid_k.to(tl.int64) * stride_cs, acc, mask=c_mask)
    else:
        if BIAS == 1:
            acc += tl.load(bias_ptr + rows_a).to(tl.float32)[:, None]
        elif BIAS == 2:
            acc += tl.load(bias_ptr + rows_b).to(tl.float32)[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _gemm_tile(
    a_src, b_src, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, pid_m, pid_n, pid_k,
    M, N, K,
    stride_am, stride_bn, stride_cm, stride_cn, stride_cs,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    BLOCK_SCALED: tl.constexpr, FAST_ACCUM: tl.constexpr, OVERLAP: tl.constexpr,
    A_SCALE_ROWS: tl.constexpr, B_SCALE_ROWS: tl.constexpr, BIAS: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Output tile (pid_m, pid_n), K-slice pid_k of SPLIT_K: the K loop and the store."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past the edge wrap onto valid rows: the loads need no mask, the store has one.
    rows_a = (offs_m % M).to(tl.int64)
    rows_b = (offs_n % N).to(tl.int64)
    row0_a = pid_m * BLOCK_M
    row0_b = pid_n * BLOCK_N
    k_tiles = tl.cdiv(K, BLOCK_K)
    split_tiles = tl.cdiv(k_tiles, SPLIT_K)
    kt_start = pid_k * split_tiles
    kt_end = min(kt_start + split_tiles, k_tiles)
    offs_k = tl.arange(0, BLOCK_K)
    if OVERLAP:
        # Each K-tile as two [BLOCK_M, BLOCK_N / 2] products. The first is waited for at once
        # (that wait also drains the previous tile's second half); the second is issued next,
        # and its result is only read after that wait in the next iteration: Triton keeps
        # such a dot asynchronous, so one wgmma group stays in flight through the loop's
        # loads and part of the promotions. (A promoted full tile cannot do this: the
        # pipeliner waits for any dot whose result an add reads in the same iteration.)
        HALF: tl.constexpr = BLOCK_N // 2
        offs_n0 = row0_b + tl.arange(0, HALF)
        offs_n1 = offs_n0 + HALF
        rows_b0 = (offs_n0 % N).to(tl.int64)
        rows_b1 = (offs_n1 % N).to(tl.int64)
        acc0 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        acc1 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)
        prev1 = tl.zeros((BLOCK_M, HALF), dtype=tl.float32)  # the last tile's second half
        for kt in range(kt_start, kt_end):
            a = _load_k_tile(a_src, rows_a, row0_a, kt, K, stride_am, offs_k, BLOCK_K, EVEN_K, TMA)
            b0 = _load_k_tile(
                b_src, rows_b0, row0_b, kt, K, stride_bn, offs_k, BLOCK_K, EVEN_K, TMA
            )
            b1 = _load_k_tile(
                b_src, rows_b1, row0_b + HALF, kt, K, stride_bn, offs_k, BLOCK_K, EVEN_K, TMA
            )
            part0 = tl.dot(a, tl.trans(b0))
            # No branch here (ptxas serializes wgmma across one): the first step adds the
            # zeros prev1 starts as, and block scales are selected away rather than multiplied
            # into them (0 x inf would be NaN).
            if BLOCK_SCALED:
                last = _scale_block(
                    prev1, tl.maximum(kt - 1, kt_start), row0_a, row0_b + HALF,
                    a_scale_ptr, b_scale_ptr, rows_a, rows_b1,
                    stride_asm, stride_ask, stride_bsn, stride_bsk,
                    A_SCALE_ROWS, B_SCALE_ROWS, BLOCK_M, HALF,
                )  # fmt: skip
                acc1 += tl.where(kt > kt_start, last, 0.0)
            else:
                acc1 += prev1
            prev1 = tl.dot(a, tl.trans(b1))
            acc0 = _promote(
                acc0, part0, kt, row0_a, row0_b, a_scale_ptr, b_scale_ptr, rows_a, rows_b0,
                stride_asm, stride_ask, stride_bsn, stride_bsk,
                BLOCK_SCALED, A_SCALE_ROWS, B_SCALE_ROWS, BLOCK_M, HALF,
            )  # fmt: skip
        if kt_end > kt_start:  # an empty split-K slice has no last tile
            acc1 = _promote(
                acc1, prev1, kt_end - 1, row0_a, row0_b + HALF, a_scale_ptr, b_scale_ptr,
                rows_a, rows_b1, stride_asm, stride_ask, stride_bsn, stride_bsk,
                BLOCK_SCALED, A_SCALE_ROWS, B_SCALE_ROWS, BLOCK_M, HALF,
            )  # fmt: skip
        _store_tile(
            acc0, c_ptr, bias_ptr, a_scale_ptr, b_scale_ptr, rows_a, rows_b0, offs_m, offs_n0,
            pid_k, M, N, stride_cm, stride_cn, stride_cs, stride_asm, stride_bsn,
            BLOCK_SCALED, A_SCALE_ROWS, B_SCALE_ROWS, BIAS, SPLIT_K,
        )  # fmt: skip
        _store_tile(
            acc1, c_ptr, bias_ptr, a_scale_ptr, b_scale_ptr, rows_a, rows_b1, offs_m, offs_n1,
            pid_k, M, N, stride_cm, stride_cn, stride_cs, stride_asm, stride_bsn,
            BLOCK_SCALED, A_SCALE_ROWS, B_SCALE_ROWS, BIAS, SPLIT_K,
        )  # fmt: skip
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(kt_start, kt_end):
            a = _load_k_tile(a_src, rows_a, row0_a, kt, K, stride_am, offs_k, BLOCK_K, EVEN_K, TMA)
            b = _load_k_tile(b_src, rows_b, row0_b, kt, K, stride_bn, offs_k, BLOCK_K, EVEN_K, TMA)
            acc = _accumulate(
                acc, a, b, kt, row0_a, row0_b, a_scale_ptr, b_scale_ptr, rows_a, rows_b,
                stride_asm, stride_ask, stride_bsn, stride_bsk,
                BLOCK_SCALED, FAST_ACCUM, A_SCALE_ROWS, B_SCALE_ROWS, BLOCK_M, BLOCK_N,
            )  # fmt: skip
        _store_tile(
            acc, c_ptr, bias_ptr, a_scale_ptr, b_scale_ptr, rows_a, rows_b, offs_m, offs_n, pid_k,
            M, N, stride_cm, stride_cn, stride_cs, stride_asm, stride_bsn,
            BLOCK_SCALED, A_SCALE_ROWS, B_SCALE_ROWS, BIAS, SPLIT_K,
        )  # fmt: skip


@triton.jit(do_not_specialize=["M", "N"])  # M is the token count, N too under swap-AB
def _fp8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_bn, stride_cm, stride_cn, stride_cs,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    BLOCK_SCALED: tl.constexpr,  # group x block scales, applied per K-tile; else row scales
    FAST_ACCUM: tl.constexpr,  # chain the whole K loop through the MMA accumulator
    OVERLAP: tl.constexpr,  # promote one half-tile while the other's MMA runs (_gemm_tile)
    A_SCALE_ROWS: tl.constexpr, B_SCALE_ROWS: tl.constexpr,  # rows sharing one scale row: 1 or 128
    BIAS: tl.constexpr,  # 0: none, 1: along M (swap-AB), 2: along N
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # a: [M, K] e4m3, b: [N, K] e4m3, both unit stride along K.
    # c: [M, N] at (stride_cm, stride_cn), or fp32 partials [SPLIT_K, M, N] when SPLIT_K > 1.
    # Row scales: a_scale[m // A_SCALE_ROWS * stride_asm] (stride 0 = per tensor).
    # Block scales: a_scale[m, kt] and b_scale[n // 128, kt] for K-tile kt (BLOCK_K = 128).
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _gemm_tile(
        a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, pid_m, pid_n, tl.program_id(1),
        M, N, K, stride_am, stride_bn, stride_cm, stride_cn, stride_cs,
        stride_asm, stride_ask, stride_bsn, stride_bsk,
        BLOCK_SCALED, FAST_ACCUM, OVERLAP, A_SCALE_ROWS, B_SCALE_ROWS, BIAS, SPLIT_K, EVEN_K,
        False, BLOCK_M, BLOCK_N, BLOCK_K,
    )  # fmt: skip


@triton.jit(do_not_specialize=["M", "N"])
def _fp8_gemm_tma_kernel(
    a_desc, b_desc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K,
    stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    BLOCK_SCALED: tl.constexpr, FAST_ACCUM: tl.constexpr, OVERLAP: tl.constexpr,
    A_SCALE_ROWS: tl.constexpr, B_SCALE_ROWS: tl.constexpr, BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # _fp8_gemm_kernel's product, loading both operands through tensor descriptors (TMA on
    # Hopper: one thread issues each tile's copy, which zero-fills past the edges) on a
    # persistent grid: at most one program per SM walks the output tiles in grouped order.
    # a_desc: [M, K] e4m3 in [BLOCK_M, BLOCK_K] blocks; b_desc: [N, K] in [BLOCK_N, BLOCK_K]
    # blocks, [BLOCK_N / 2, BLOCK_K] under OVERLAP.
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _gemm_tile(
            a_desc, b_desc, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, pid_m, pid_n, 0,
            M, N, K, 0, 0, stride_cm, stride_cn, 0,
            stride_asm, stride_ask, stride_bsn, stride_bsk,
            BLOCK_SCALED, FAST_ACCUM, OVERLAP, A_SCALE_ROWS, B_SCALE_ROWS, BIAS,
            1, True, True, BLOCK_M, BLOCK_N, BLOCK_K,  # one K-slice; TMA zero-fills a ragged K
        )  # fmt: skip


@triton.jit
def _split_k_reduce_kernel(
    partial_ptr, c_ptr, bias_ptr,
    numel, N,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # partial: [SPLIT_K, M, N] fp32 contiguous; c: [M, N] contiguous; bias: [N]
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(partial_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(partial_ptr + s * numel.to(tl.int64) + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


REDUCE_BLOCK = 1024


def _scale_kinds(scale, rows, K, row_kind, block_kind, block_rows):
    """The scale granularities whose shape `scale` has, for an operand of `rows` x K."""
    shape = tuple(scale.shape)
    kinds = []
    if fp8_ref.is_per_tensor(scale):
        kinds.append("tensor")
    if shape == (rows, 1):
        kinds.append(row_kind)
    if shape == (math.ceil(rows / block_rows), math.ceil(K / SCALE_BLOCK)):
        kinds.append(block_kind)
    return kinds


def _check_args(a, a_scale, b, b_scale, bias, out_dtype, fast_accum=False):
    """Validate the op's arguments; returns (a_kind, b_kind) of the scales."""
    e4m3 = (fp8_ref.E4M3,)
    check_tensor("a", a, e4m3, ndim=2)
    check_tensor("b", b, e4m3, ndim=2)
    check_tensor("a_scale", a_scale, (torch.float32,))
    check_tensor("b_scale", b_scale, (torch.float32,))
    if bias is not None:
        check_tensor("bias", bias, OUT_DTYPES, ndim=1)
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of bfloat16, float16, float32; got {out_dtype}")
    check_same_device(a=a, b=b, a_scale=a_scale, b_scale=b_scale, bias=bias)
    M, K = a.shape
    N = b.shape[0]
    if b.shape[1] != K:
        raise ValueError(
            f"a is [M, K] = {list(a.shape)} and b is [N, K] = {list(b.shape)} (the nn.Linear "
            f"weight layout): their K must match"
        )
    if K == 0 or K % 16:
        raise ValueError(f"K must be a positive multiple of 16 (the FP8 MMA's K step); got {K}")
    for name, t in (("a", a), ("b", b)):
        if t.stride(1) != 1 and t.shape[0] * t.shape[1] > 0:
            raise ValueError(
                f"{name} must have unit stride along K; got strides {list(t.stride())} "
                f"(call .contiguous() first)"
            )
    if bias is not None and (bias.shape[0] != N or (N > 1 and bias.stride(0) != 1)):
        raise ValueError(
            f"bias must be a contiguous [N] = [{N}] tensor; got shape {list(bias.shape)} "
            f"and strides {list(bias.stride())}"
        )
    a_kinds = _scale_kinds(a_scale, M, K, "token", "group", 1)
    b_kinds = _scale_kinds(b_scale, N, K, "channel", "block", SCALE_BLOCK)
    for a_kind, b_kind in SCALE_PAIRS:
        if a_kind in a_kinds and b_kind in b_kinds:
            if fast_accum and a_kind == "group":
                raise ValueError(
                    "fast_accum needs per-tensor/per-token x per-tensor/per-channel scales: "
                    "group x block scales apply per K-tile, so every tile is promoted"
                )
            return a_kind, b_kind
    kb, nb = math.ceil(K / SCALE_BLOCK), math.ceil(N / SCALE_BLOCK)
    raise ValueError(
        f"a_scale of shape {list(a_scale.shape)} and b_scale of shape {list(b_scale.shape)} are "
        f"not a supported pair for a {list(a.shape)} and b {list(b.shape)}; use a_scale of one "
        f"element (tensor) or [{M}, 1] (token) with b_scale of one element (tensor) or [{N}, 1] "
        f"(channel), or "
        f"a_scale [{M}, {kb}] (1x128 groups) with b_scale [{nb}, {kb}] (128x128 blocks)"
    )


def _scale_strides(scale, kind):
    """(row stride, K-tile stride) of a scale as the kernel reads it; 0 broadcasts."""
    if kind == "tensor":
        return 0, 0
    if kind in ("token", "channel"):
        return (scale.stride(0) if scale.shape[0] > 1 else 0), 0
    return scale.stride(0), scale.stride(1)


def _launches(
    a, a_scale, a_kind, b, b_scale, b_kind, bias, out, config, fast_accum=False
) -> list[Launch]:
    """The launches that compute out = a @ b.T with `config`; under SWAP they compute
    out.T = b @ a.T, writing out through transposed strides."""
    M, K = a.shape
    N = b.shape[0]
    meta = dict(config.meta)
    swap, tma, split = meta.pop("SWAP"), meta.pop("TMA"), meta["SPLIT_K"]
    # fast_accum chains K through the MMA: there is no promotion to overlap
    meta["OVERLAP"] = meta["OVERLAP"] and not fast_accum
    block_scaled = a_kind == "group"
    sa, sb = _scale_strides(a_scale, a_kind), _scale_strides(b_scale, b_kind)
    rows_a, rows_b = 1, (SCALE_BLOCK if block_scaled else 1)
    stride_cm, stride_cn = N, 1
    if swap:  # out.T[n, m] = sum_k b[n, k] a[m, k]
        a, b, M, N = b, a, N, M
        a_scale, b_scale, sa, sb, rows_a, rows_b = b_scale, a_scale, sb, sa, rows_b, rows_a
        stride_cm, stride_cn = 1, M
    bias_dim = 0 if bias is None or split > 1 else (1 if swap else 2)
    c = (
        out
        if split == 1
        else torch.empty((split, *out.shape), dtype=torch.float32, device=a.device)
    )
    tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
    flags = dict(
        BLOCK_SCALED=block_scaled, FAST_ACCUM=fast_accum, A_SCALE_ROWS=rows_a,
        B_SCALE_ROWS=rows_b, BIAS=bias_dim,
    )  # fmt: skip
    if tma:
        bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
        a_desc = TensorDescriptor(a, [M, K], [a.stride(0), 1], [bm, bk])
        b_rows = bn // 2 if meta["OVERLAP"] else bn
        b_desc = TensorDescriptor(b, [N, K], [b.stride(0), 1], [b_rows, bk])
        del meta["SPLIT_K"]
        gemm = launch(
            _fp8_gemm_tma_kernel, (min(tiles, num_sms(a.device)),),
            a_desc, b_desc, out, a_scale, b_scale, bias,
            M, N, K,
            stride_cm, stride_cn, *sa, *sb,
            **flags, **meta,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
        return [gemm]
    gemm = launch(
        _fp8_gemm_kernel, (tiles, split),
        a, b, c, a_scale, b_scale, bias,
        M, N, K,
        a.stride(0), b.stride(0), stride_cm, stride_cn, out.numel() if split > 1 else 0,
        *sa, *sb,
        **flags, EVEN_K=K % meta["BLOCK_K"] == 0, **meta,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    if split == 1:
        return [gemm]
    reduce = launch(
        _split_k_reduce_kernel, (triton.cdiv(out.numel(), REDUCE_BLOCK),),
        c, out, bias, out.numel(), out.shape[1],
        SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK,
    )  # fmt: skip
    return [gemm, reduce]


def _launch(a, a_scale, a_kind, b, b_scale, b_kind, bias, out, config, fast_accum=False):
    for step in _launches(a, a_scale, a_kind, b, b_scale, b_kind, bias, out, config, fast_accum):
        step()


_tuner = Autotuner("fp8_gemm")


# The main-loop families (README, "The GEMM's main loops on Hopper"): (TMA, OVERLAP) meta.
FAMILIES = {
    "pointer": (False, False),
    "overlap": (False, True),
    "tma": (True, False),
    "tma-overlap": (True, True),
}


def candidate_configs(a, b, block_scaled, family=None):
    """The pruned configs for this device and problem, in preference order; `family` (a name
    in FAMILIES), if given, keeps only that main loop's."""
    M, K = a.shape
    configs = configs_for(capability(a.device))
    if family is not None:
        configs = [c for c in configs if (c.meta["TMA"], c.meta["OVERLAP"]) == FAMILIES[family]]
    sms = num_sms(a.device)
    return prune_configs(configs, M, b.shape[0], K, block_scaled, sms, tma_ready(a, b))


def _fp8_gemm_impl(
    a, a_scale, b, b_scale, bias=None, out_dtype=torch.bfloat16, fast_accum=False, family=None
):
    a_kind, b_kind = _check_args(a, a_scale, b, b_scale, bias, out_dtype, fast_accum)
    M, N = a.shape[0], b.shape[0]
    out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:  # before the path choice, so both paths agree
        return out
    if not use_triton(a.device, "fp8_gemm"):
        # The reference accumulates in fp32 with or without fast_accum.
        return fp8_ref.scaled_mm(a, a_scale, a_kind, b, b_scale, b_kind, bias, out_dtype)
    key = (a.device, a_kind, b_kind, bias is not None, out_dtype, m_bucket(M), N, a.shape[1])
    # Marked only where they differ from the common case, so most keys read as before.
    key += ("fast_accum",) * fast_accum + ("unaligned",) * (not tma_ready(a, b))
    key += (family,) if family else ()

    def run(config):
        _launch(a, a_scale, a_kind, b, b_scale, b_kind, bias, out, config, fast_accum)

    run(_tuner.choose(key, lambda: candidate_configs(a, b, a_kind == "group", family), run))
    return out


def _fp8_gemm_fake(a, a_scale, b, b_scale, bias=None, out_dtype=torch.bfloat16, fast_accum=False):
    _check_args(a, a_scale, b, b_scale, bias, out_dtype, fast_accum)
    return torch.empty((a.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)


register_op(
    "fp8_gemm(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, Tensor? bias=None, "
    "ScalarType out_dtype=bfloat16, bool fast_accum=False) -> Tensor",
    _fp8_gemm_impl,
    _fp8_gemm_fake,
)


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    fast_accum: bool = False,
) -> torch.Tensor:
    """`(a * a_scale) @ (b * b_scale).T + bias` -> `[M, N]` in `out_dtype`.

    a `[M, K]` and b `[N, K]` are float8_e4m3fn with K a multiple of 16; the scale pair is
    per-tensor/per-token x per-tensor/per-channel, or 1x128 groups x 128x128 blocks (see the
    module docstring for shapes). Accumulates in fp32, promoting every 128-wide K-tile.

    fast_accum=True (row scales only) chains the whole K loop through the MMA's accumulator,
    as `torch._scaled_mm(use_fast_accum=True)` does: faster on Hopper, whose FP8 MMA adds in
    about 14 bits, at an error that grows with K (README, "fast_accum").
    """
    # Types the op's schema would reject with a dispatcher RuntimeError; the rest is checked
    # where the op runs, so torch.ops.fp8nemo.fp8_gemm checks it too.
    check_types(
        a=(a, torch.Tensor),
        a_scale=(a_scale, torch.Tensor),
        b=(b, torch.Tensor),
        b_scale=(b_scale, torch.Tensor),
        bias=(bias, (torch.Tensor, type(None))),
        out_dtype=(out_dtype, torch.dtype),
        fast_accum=(fast_accum, bool),
    )
    return torch.ops.fp8nemo.fp8_gemm(a, a_scale, b, b_scale, bias, out_dtype, fast_accum)


def fp8_gemm_family(a, a_scale, b, b_scale, family, fast_accum=False, out_dtype=torch.bfloat16):
    """fp8_gemm tuned among one main-loop family's configs (FAMILIES): the benchmark's way to
    time each loop alone at one shape."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {list(FAMILIES)}; got {family!r}")
    return _fp8_gemm_impl(a, a_scale, b, b_scale, None, out_dtype, fast_accum, family)


def aot_specs(cap: int):
    """Every config for compute capability `cap` at NeMo's qkv shape (K 5120 -> N 6144), with row
    scales and, where the config fits them, block scales; decode configs at 16 and 64 tokens.
    The launches are the launcher's own, on meta tensors; each FP8 main loop must compile to
    QGMMA on Hopper and QMMA on Ada."""
    from ._triton import AotSpec

    N, K = 6144, 5120
    mma = "QGMMA" if cap >= 90 else "QMMA"
    specs = []
    for config in configs_for((cap // 10, cap % 10)):
        for M in (16, 64) if config.meta["SWAP"] else (4096,):
            c = with_token_tile(config, M)
            name = c.name.replace("xM", f"x{c.meta['BLOCK_N']}")
            # fast_accum where it matters: the prefill tiles, with or without TMA
            # (an overlap config's fast_accum launch is its plain twin's)
            plain = c.meta["SPLIT_K"] == 1 and not c.meta["SWAP"] and not c.meta["OVERLAP"]
            fast = (False, True) if plain else (False,)
            for a_kind, b_kind, fast_accum in (
                *(("token", "channel", f) for f in fast),
                ("group", "block", False),
            ):
                if not fits(c, a_kind == "group", c.meta["BLOCK_N"]):
                    continue
                a = torch.empty(M, K, dtype=fp8_ref.E4M3, device="meta")
                b = torch.empty(N, K, dtype=fp8_ref.E4M3, device="meta")
                a_s = torch.empty(fp8_ref.scale_shape(a.shape, a_kind), device="meta")
                b_s = torch.empty(fp8_ref.scale_shape(b.shape, b_kind), device="meta")
                out = torch.empty(M, N, dtype=torch.bfloat16, device="meta")
                label = f"{name} {a_kind}/{b_kind}" + (" fast_accum" if fast_accum else "")
                for step in _launches(a, a_s, a_kind, b, b_s, b_kind, None, out, c, fast_accum):
                    expect = mma if step.kernel is not _split_k_reduce_kernel else None
                    specs.append(AotSpec("fp8_gemm", label, step, expect))
    return specs
