"""Attention over a KV cache (fp16/bf16 or e4m3) for new query tokens: one per sequence
(decode) or T_new >= 1 appended after the cached ones (chunked prefill, a second chat turn,
speculative decoding), split across programs along the cache so one long sequence fills the
GPU, then combined. Registered as `torch.ops.fp8nemo.decode_attention` and
`torch.ops.fp8nemo.append_attention`.

Shapes:
    q                 decode [B, Hq, D] (the new token, at position cache_seqlens - 1) or
                      append [B, T_new, Hq, D] (query t at position cache_seqlens + t);
                      fp16 / bf16, unit stride along D
    k_cache, v_cache  [B, S_max, Hk, D]  q's dtype or e4m3, unit stride along D; append: the new
                      tokens' keys already written at [cache_seqlens, cache_seqlens + T_new)
    cache_seqlens     [B] int32: decode, keys [0, L) with the new token's; append, the keys
                      cached before the new ones
    k/v_descale       [B, Hk] or one element fp32 (e4m3 cache only), positive and finite
    out               like q, in q's dtype

One program reads a chunk of one sequence's cache for one KV head and serves the query heads
that share it: its rows are (new token, head) pairs, T_new * G of them for G = Hq / Hk, tiled
BLOCK_M at a time (16 at least, as the MMA needs), each row with its own causal limit, so each
cache byte is read once per row tile. An e4m3 cache is widened to q's dtype in registers; its
descales fold into the softmax scale (k) and the output (v). With several splits each writes a
normalized partial output and its log-sum-exp; a second kernel combines them in a fixed order.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from fp8nemo import fp8 as fp8_ref

from ._triton import (
    Autotuner,
    KernelConfig,
    Launch,
    capability,
    check_in_range,
    check_same_device,
    check_scales,
    check_tensor,
    check_types,
    descale_strides,
    launch,
    m_bucket,
    num_sms,
    register_op,
    use_triton,
)
from .attention import (
    EXACT_BLOCK,
    LOG2E,
    _nonfinite,
    _store_exact,
    _visible,
    check_attention_params,
    expand_descale,
)

Q_DTYPES = (torch.float16, torch.bfloat16)
MIN_ROWS = 16  # tl.dot needs 16 rows: a program's (token, head) rows are padded up to it
MAX_SPLITS = 64
# A split should stream at least this many keys, or the combine costs more than it saves.
MIN_KEYS_PER_SPLIT = 256


def _config(prefix, rows, block_n, warps, stages):
    """BLOCK_M = the most (token, head) rows per program; BLOCK_N = keys per step."""
    name = f"{prefix}{rows}x{block_n}w{warps}s{stages}"
    return KernelConfig(name, dict(BLOCK_M=rows, BLOCK_N=block_n), warps, stages)


# Named lists per target: "decode" (T_new = 1: the G query heads in one tile), "append" (up to
# 16 rows with their own causal limits, and the exact pass for non-finite V beside the loop)
# and "append-64" (64-row tiles: wgmma on Hopper). Each keeps every config free of spills
# (fp8nemo inspect).
HOPPER_CONFIGS = {
    "decode": [_config("h", 16, 64, 4, 4), _config("h", 16, 128, 4, 3), _config("h", 16, 32, 4, 6)],
    "append": [_config("h", 16, 64, 4, 4), _config("h", 16, 128, 4, 2), _config("h", 16, 32, 4, 6)],
    "append-64": [_config("h", 64, 64, 8, 3), _config("h", 64, 32, 4, 4)],
}
ADA_16 = [_config("a", 16, 64, 4, 3), _config("a", 16, 32, 4, 4)]
ADA_CONFIGS = {
    "decode": ADA_16,
    "append": ADA_16,
    # 8 warps: with 4, ptxas holds these at 168 registers and spills at some T_new.
    "append-64": [_config("a", 64, 64, 8, 2), _config("a", 64, 32, 8, 3)],
}
INTERPRETER_CONFIGS = [_config("i", 64, 128, 4, 1)]
MAX_ROWS = 64  # the row tile of the "append-64" lists, which the split heuristic counts with


def configs_for(cap: tuple[int, int], T: int = 1, G: int = 1) -> list[KernelConfig]:
    """Configs for T new tokens of G query heads per KV head."""
    if cap == (0, 0):
        return INTERPRETER_CONFIGS
    kind = "decode" if T == 1 else "append" if T * G <= MIN_ROWS else "append-64"
    return (HOPPER_CONFIGS if cap >= (9, 0) else ADA_CONFIGS)[kind]


def block_m_for(T: int, G: int, most: int) -> int:
    """Rows per program. One token (decode): its G heads in one tile, as its rows share their
    keys. More: 16 rows (the MMA's least) when they fit, else `most`; 32-row tiles would spill
    where 64-row ones do not, and a memory-bound loop affords the padding."""
    if T == 1:
        return max(MIN_ROWS, triton.next_power_of_2(G))
    return MIN_ROWS if T * G <= MIN_ROWS else most


def num_splits_for(programs: int, s_max: int, sms: int) -> int:
    """Splits per (sequence, KV head, row tile) of the `programs` there are: enough programs for
    two waves over the SMs, each split streaming at least MIN_KEYS_PER_SPLIT keys of the
    cache's capacity."""
    want = triton.cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, MAX_SPLITS, s_max // MIN_KEYS_PER_SPLIT))


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, out_ptr, part_ptr, part_lse_ptr, k_desc_ptr, v_desc_ptr,
    T, G, lens_add, window, softmax_scale, chunk, S_max, num_m, stride_lens,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
    stride_vh, stride_ob, stride_ot, stride_oh, stride_kdb, stride_kdh, stride_vdb, stride_vdh,
    WINDOW: tl.constexpr, FP8_CACHE: tl.constexpr, SPLIT: tl.constexpr, OFFSET_64: tl.constexpr,
    ROW_LIMITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # program (b * num_m + tile, kvh, split): rows [tile * BLOCK_M, + BLOCK_M) of the T * G
    # (token t, head g) rows of KV head kvh, row r = t * G + g; keys [split * chunk, + chunk)
    # of sequence b. With ROW_LIMITS (T > 1) the rows see different keys.
    pid = tl.program_id(0)
    b = pid // num_m
    tile = pid % num_m
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Keys held after the new tokens; clamped so that a bad length (unchecked inside a CUDA
    # graph) cannot read past the cache. The new tokens are its last T: token t at p0 + t.
    L = min(max(tl.load(lens_ptr + b * stride_lens) + lens_add, 0), S_max)
    p0 = L - T

    r = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    t = r // G
    head = kvh * G + r % G
    row_ok = r < T * G
    qpos = p0 + t
    # Keys [lo, hi) are visible to some row of the tile: its first token's window start to its
    # last token.
    t_first = tile * BLOCK_M // G
    t_last = (min(tile * BLOCK_M + BLOCK_M, T * G) - 1) // G
    hi = p0 + t_last + 1
    lo = 0
    if WINDOW:
        lo = max(0, p0 + t_first - window + 1)
    n_start = max(split * chunk, lo // BLOCK_N * BLOCK_N)
    n_end = min((split + 1) * chunk, hi)

    d = tl.arange(0, BLOCK_D)
    d_ok = (d < HEAD_DIM)[None, :]
    q_rows = b.to(tl.int64) * stride_qb + t.to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
    scale = softmax_scale * LOG2E
    if FP8_CACHE:
        scale = scale * tl.load(k_desc_ptr + b * stride_kdb + kvh * stride_kdh)

    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        kj = n0 + offs_n
        key_ok = (kj >= lo) & (kj < n_end)
        kj_off = kj.to(tl.int64)[:, None] if OFFSET_64 else kj[:, None]
        k = tl.load(
            k_base + kj_off * stride_ks + d[None, :], mask=key_ok[:, None] & d_ok, other=0.0
        )
        v = tl.load(
            v_base + kj_off * stride_vs + d[None, :], mask=key_ok[:, None] & d_ok, other=0.0
        )
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale
        if ROW_LIMITS:
            s = tl.where(_visible(qpos[:, None], kj[None, :], n_end, window, True, WINDOW), s,
                         float("-inf"))  # fmt: skip
        else:  # one token: its keys are exactly the loaded ones
            s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m = m_new

    l_safe = tl.where(l == 0.0, 1.0, l)
    out_scale = 1.0
    if FP8_CACHE:
        out_scale = tl.load(v_desc_ptr + b * stride_vdb + kvh * stride_vdh)
    out = acc / l_safe[:, None] * out_scale
    if SPLIT:
        # Normalized partial output and its log2-sum-exp (-inf for an empty split), row
        # ((b, t, head), split) of [B, T, Hq, num_splits].
        rows = ((b.to(tl.int64) * T + t) * (tl.num_programs(1) * G) + head) * tl.num_programs(2)
        rows += split
        o_rows = part_ptr + rows * HEAD_DIM
        lse = tl.where(l == 0.0, float("-inf"), m + tl.math.log2(l_safe))
        tl.store(part_lse_ptr + rows, lse, mask=row_ok)
    else:
        o_rows = out_ptr + (b.to(tl.int64) * stride_ob + t.to(tl.int64) * stride_ot
                            + head * stride_oh)  # fmt: skip
    if ROW_LIMITS:
        # A key one row sees may be hidden from another, which the MMA still gives 0 * V: a NaN
        # or inf there spoils that row. Such a program forms its output again, exactly (as
        # flash_attention does), over its split's keys [n_lo, n_end).
        flag = tl.sum(tl.where(row_ok, tl.sum(acc * 0.0, 1), 0.0), 0)
        if flag != flag:
            n_lo = max(split * chunk, lo)
            _store_exact(
                o_rows, q_ptr + q_rows, row_ok, k_base + n_lo.to(tl.int64) * stride_ks,
                v_base + n_lo.to(tl.int64) * stride_vs, stride_ks, stride_vs, 1, qpos - n_lo,
                n_end - n_lo, window, scale, m, l_safe, out_scale, True, WINDOW, False,
                OFFSET_64, HEAD_DIM, BLOCK_D, EXACT_BLOCK,
                EXACT_BLOCK if BLOCK_D > EXACT_BLOCK else BLOCK_D,
            )  # fmt: skip
        else:
            tl.store(o_rows[:, None] + d[None, :], out.to(o_rows.dtype.element_ty),
                     mask=row_ok[:, None] & d_ok)  # fmt: skip
    else:
        # One token sees every key its program loads: a NaN or inf in V makes NaN in the columns
        # it reaches (inf too, as flash_attention and the T > 1 rows give).
        out = tl.where(_nonfinite(acc), float("nan"), out)
        tl.store(o_rows[:, None] + d[None, :], out.to(o_rows.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok)  # fmt: skip


@triton.jit
def _decode_combine_kernel(
    part_ptr, part_lse_ptr, out_ptr,
    T, HQ, NUM_SPLITS, stride_ob, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # program (b * T + t, h): out = sum_s w_s part_s / sum_s w_s with w_s = 2^(lse_s - max lse).
    bt = tl.program_id(0)
    h = tl.program_id(1)
    row = (bt.to(tl.int64) * HQ + h) * NUM_SPLITS
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(part_lse_ptr + row + s, mask=s < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.where(
        lse == float("-inf"), 0.0, tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    )
    mask = (s < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :]
    part = tl.load(part_ptr + (row + s)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    b = bt // T
    o = out_ptr + b.to(tl.int64) * stride_ob + (bt - b * T).to(tl.int64) * stride_ot
    tl.store(o + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# torch reference


def append_reference(
    q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None, window=None,
    k_descale=None, v_descale=None, acc_dtype=torch.float32, out_dtype=None,
):  # fmt: skip
    """Attention of each sequence's T_new new tokens, q [B, T_new, Hq, D], over its cache, in
    `acc_dtype` on dequantized values: token t sees keys [0, cache_seqlens + t] (within its
    window). Lengths are clamped as the kernel clamps them. out [B, T_new, Hq, D] in
    `out_dtype` (default q's)."""
    B, T, Hq, D = q.shape
    S_max, Hk = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = torch.zeros(B, T, Hq, D, dtype=acc_dtype)
    for b, n in enumerate(cache_seqlens.tolist()):
        end = min(max(n + T, 0), S_max)  # keys held after the new tokens
        k = k_cache[b, :end].to(acc_dtype)  # [end, Hk, D]
        v = v_cache[b, :end].to(acc_dtype)
        if k_cache.dtype == fp8_ref.E4M3:
            k = k * expand_descale(k_descale, b, Hk).to(acc_dtype)[:, None]
            v = v * expand_descale(v_descale, b, Hk).to(acc_dtype)[:, None]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # [end, Hq, D]
        for t in range(T):
            pos = end - T + t
            lo = max(0, pos + 1 - window) if window is not None else 0
            if pos < lo:  # a token before the cache's start sees nothing
                continue
            s = torch.einsum("hd,nhd->hn", q[b, t].to(acc_dtype), k[lo : pos + 1]) * scale
            # Every key here is seen: a NaN or inf in V makes NaN in its column (flash's rule).
            seen = v[lo : pos + 1]
            finite = seen.isfinite()
            o = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), seen.masked_fill(~finite, 0.0))
            out[b, t] = o.masked_fill(~finite.all(0), float("nan"))
    return out.to(out_dtype or q.dtype)


def decode_reference(q, k_cache, v_cache, cache_seqlens, **kwargs):
    """append_reference for one new token per sequence, q [B, Hq, D], counted in
    `cache_seqlens`; out [B, Hq, D]."""
    return append_reference(q[:, None], k_cache, v_cache, cache_seqlens - 1, **kwargs)[:, 0]


# ---------------------------------------------------------------------------------------------
# launcher


def _check_args(append, q, k_cache, v_cache, cache_seqlens, softmax_scale, window, k_descale,
                v_descale):  # fmt: skip
    """Checks for both ops: decode's q is [B, Hq, D], append's [B, T_new, Hq, D]."""
    layout = "[B, T_new, Hq, D]" if append else "[B, Hq, D]"
    check_tensor("q", q, Q_DTYPES, ndim=4 if append else 3)
    check_tensor("k_cache", k_cache, (q.dtype, fp8_ref.E4M3), ndim=4)
    check_tensor("v_cache", v_cache, (k_cache.dtype,), ndim=4)
    check_tensor("cache_seqlens", cache_seqlens, (torch.int32,), ndim=1)
    B, T, (Hq, D) = q.shape[0], (q.shape[1] if append else 1), q.shape[-2:]
    Bc, S_max, Hk, Dc = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {list(k_cache.shape)}; got {list(v_cache.shape)}"
        )
    if Bc != B or Dc != D:
        raise ValueError(
            f"k_cache must be [B, S_max, Hk, D] with B = {B} and D = {D} from q {layout}; "
            f"got {list(k_cache.shape)}"
        )
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"q's {Hq} heads must be a multiple of the cache's {Hk} heads (GQA)")
    check_attention_params(D, window, softmax_scale)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have unit stride along D; got strides {list(t.stride())}"
            )
    if cache_seqlens.shape[0] != B:
        raise ValueError(f"cache_seqlens must be [B] = [{B}]; got {list(cache_seqlens.shape)}")
    if append and B and S_max < T:
        raise ValueError(
            f"q's T_new = {T} new tokens cannot fit in a cache of S_max = {S_max} positions"
        )
    check_scales({"k_descale": k_descale, "v_descale": v_descale}, k_cache.dtype == fp8_ref.E4M3,
                 "an e4m3 cache", (B, Hk), f"[B, Hk] = [{B}, {Hk}]")  # fmt: skip
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                      k_descale=k_descale, v_descale=v_descale)  # fmt: skip
    if append:
        check_in_range("cache_seqlens", cache_seqlens, 0, S_max - T + 1,
                       f"keys cached before the T_new = {T} new ones, which must fit in "
                       f"S_max = {S_max} with them")  # fmt: skip
    else:
        check_in_range("cache_seqlens", cache_seqlens, 0, S_max + 1, "keys held in the cache")


def _launches(q, k_cache, v_cache, cache_seqlens, out, softmax_scale, window, k_descale,
              v_descale, config, num_splits) -> list[Launch]:  # fmt: skip
    """Launches for decode (q, out [B, Hq, D]; cache_seqlens counts the new token) or append
    (q, out [B, T_new, Hq, D]; cache_seqlens counts the keys before the new ones)."""
    append = q.dim() == 4
    if not append:
        q, out = q.unsqueeze(1), out.unsqueeze(1)
    B, T, Hq, D = q.shape
    S_max, Hk = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    block_m = block_m_for(T, G, config.meta["BLOCK_M"])
    num_m = triton.cdiv(T * G, block_m)
    block_n = config.meta["BLOCK_N"]
    chunk = triton.cdiv(triton.cdiv(S_max, num_splits), block_n) * block_n
    num_splits = triton.cdiv(S_max, chunk)  # no split left without keys to read
    fp8 = k_cache.dtype == fp8_ref.E4M3
    split = num_splits > 1
    part = part_lse = None
    if split:
        part = torch.empty(B, T, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, T, Hq, num_splits, dtype=torch.float32, device=q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    offset_64 = (S_max + block_n) * max(k_cache.stride(1), v_cache.stride(1)) >= 2**31
    steps = [
        launch(
            _decode_kernel, (B * num_m, Hk, num_splits),
            q, k_cache, v_cache, cache_seqlens, out, part, part_lse, k_descale, v_descale,
            T, G, T if append else 0, window if window is not None else 0, scale, chunk, S_max,
            num_m, cache_seqlens.stride(0), *q.stride()[:3], *k_cache.stride()[:3],
            *v_cache.stride()[:3], *out.stride()[:3], *descale_strides(k_descale),
            *descale_strides(v_descale),
            WINDOW=window is not None, FP8_CACHE=fp8, SPLIT=split, OFFSET_64=offset_64,
            ROW_LIMITS=T > 1, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=triton.next_power_of_2(D),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    ]  # fmt: skip
    if split:
        steps.append(
            launch(
                _decode_combine_kernel, (B * T, Hq),
                part, part_lse, out, T, Hq, num_splits, *out.stride()[:3],
                HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits),
                BLOCK_D=triton.next_power_of_2(D),
            )
        )  # fmt: skip
    return steps


_tuners = {op: Autotuner(op) for op in ("decode_attention", "append_attention")}


def _impl(append, q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None, window=None,
          k_descale=None, v_descale=None):  # fmt: skip
    """Both registered ops: decode (q [B, Hq, D]) and append (q [B, T_new, Hq, D])."""
    _check_args(append, q, k_cache, v_cache, cache_seqlens, softmax_scale, window, k_descale,
                v_descale)  # fmt: skip
    op = "append_attention" if append else "decode_attention"
    # Before the path choice, so both paths agree: no rows, or an empty cache (every length is
    # 0), which attends to nothing: zeros, as the kernel gives a sequence without keys.
    if q.numel() == 0 or k_cache.shape[1] == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    kw = dict(softmax_scale=softmax_scale, window=window, k_descale=k_descale, v_descale=v_descale)
    if not use_triton(q.device, op):
        return (append_reference if append else decode_reference)(
            q, k_cache, v_cache, cache_seqlens, **kw
        )
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    B, T, Hq = q.shape[0], (q.shape[1] if append else 1), q.shape[-2]
    S_max, Hk = k_cache.shape[1], k_cache.shape[2]
    rows = T * (Hq // Hk)
    programs = B * Hk * triton.cdiv(rows, block_m_for(T, Hq // Hk, MAX_ROWS))
    num_splits = num_splits_for(programs, S_max, num_sms(q.device))
    key = (q.device, q.dtype, k_cache.dtype, q.shape[-1], Hq // Hk, window is not None,
           m_bucket(B), m_bucket(T), m_bucket(S_max), num_splits)  # fmt: skip

    def run(config):
        for step in _launches(q, k_cache, v_cache, cache_seqlens, out, softmax_scale, window,
                              k_descale, v_descale, config, num_splits):  # fmt: skip
            step()

    candidates = lambda: configs_for(capability(q.device), T, Hq // Hk)  # noqa: E731
    run(_tuners[op].choose(key, candidates, run))
    return out


def _fake(append, q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None, window=None,
          k_descale=None, v_descale=None):  # fmt: skip
    _check_args(append, q, k_cache, v_cache, cache_seqlens, softmax_scale, window, k_descale,
                v_descale)  # fmt: skip
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


for _append, _name in ((False, "decode_attention"), (True, "append_attention")):
    register_op(
        f"{_name}(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, *, "
        "float? softmax_scale=None, int? window=None, Tensor? k_descale=None, "
        "Tensor? v_descale=None) -> Tensor",
        functools.partial(_impl, _append),
        functools.partial(_fake, _append),
    )


def _check_types(q, k_cache, v_cache, cache_seqlens, softmax_scale, window, k_descale,
                 v_descale):  # fmt: skip
    optional = (torch.Tensor, type(None))
    check_types(
        q=(q, torch.Tensor),
        k_cache=(k_cache, torch.Tensor),
        v_cache=(v_cache, torch.Tensor),
        cache_seqlens=(cache_seqlens, torch.Tensor),
        softmax_scale=(softmax_scale, (float, int, type(None))),
        window=(window, (int, type(None))),
        k_descale=(k_descale, optional),
        v_descale=(v_descale, optional),
    )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    window: int | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence, q `[B, Hq, D]`, over `k_cache`/`v_cache`
    `[B, S_max, Hk, D]` holding `cache_seqlens[b]` keys (the new token's included). `window`:
    the token sees itself and the `window - 1` keys before it. An e4m3 cache takes
    `k_descale`/`v_descale` (`[B, Hk]` or scalar). Returns `[B, Hq, D]` in q's dtype."""
    _check_types(q, k_cache, v_cache, cache_seqlens, softmax_scale, window, k_descale, v_descale)
    return torch.ops.fp8nemo.decode_attention(
        q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale, window=window,
        k_descale=k_descale, v_descale=v_descale,
    )  # fmt: skip


def append_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    window: int | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of T_new new tokens per sequence, q `[B, T_new, Hq, D]`, appended after the
    `cache_seqlens[b]` keys already in `k_cache`/`v_cache` `[B, S_max, Hk, D]`; the new
    tokens' keys are in the cache too, at `[cache_seqlens[b], cache_seqlens[b] + T_new)`.
    Token t sits at position `cache_seqlens[b] + t` and sees the keys up to it (causal,
    aligned bottom-right, as flash-attn's `flash_attn_with_kvcache`); `window`: itself and
    the `window - 1` keys before it, as in flash_attention, so appending equals prefilling.
    An e4m3 cache takes `k_descale`/`v_descale` (`[B, Hk]` or scalar). Returns
    `[B, T_new, Hq, D]` in q's dtype; with T_new = 1 it is decode_attention's result for
    `cache_seqlens + 1`."""
    _check_types(q, k_cache, v_cache, cache_seqlens, softmax_scale, window, k_descale, v_descale)
    return torch.ops.fp8nemo.append_attention(
        q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale, window=window,
        k_descale=k_descale, v_descale=v_descale,
    )  # fmt: skip


def aot_specs(cap: int):
    """Every config at NeMo's heads (32 q, 8 kv, head_dim 128) for a bf16 and an e4m3 cache, on
    meta tensors: decode over 32k positions at batch 16 (split into chunks) and batch 1 with a
    sliding window; append of T_new in {1, 4, 16, 33} tokens to a 4k cache at batch 4. The dots
    are bf16: up to 16 rows (decode's 4 query heads of a KV head, padded; appends of 4 tokens)
    take mma.sync (HMMA), which a memory-bound loop can afford; 64-row tiles (16 or 33 tokens)
    wgmma (HGMMA) on Hopper."""
    from ._triton import AotSpec

    hopper = cap >= 90
    specs = []
    # (op, B, S_max, T_new (None: decode's q), window)
    cases = [
        ("decode_attention", 16, 32768, None, None),
        ("decode_attention", 1, 32768, None, 4096),
    ]
    # 33: a T_new no power of two divides, which the JIT specializes otherwise
    cases += [("append_attention", 4, 4096, T, None) for T in (1, 4, 16, 33)]
    for op, B, S_max, T, window in cases:
        rows = (T or 1) * 4
        for config in configs_for((cap // 10, cap % 10), T or 1, 4):
            for cache_dtype in (torch.bfloat16, fp8_ref.E4M3):
                shape_q = (B, 32, 128) if T is None else (B, T, 32, 128)
                q = torch.empty(shape_q, dtype=torch.bfloat16, device="meta")
                cache = torch.empty(B, S_max, 8, 128, dtype=cache_dtype, device="meta")
                lens = torch.empty(B, dtype=torch.int32, device="meta")
                fp8 = cache_dtype == fp8_ref.E4M3
                desc = torch.empty(B, 8, device="meta") if fp8 else None
                block_m = block_m_for(T or 1, 4, config.meta["BLOCK_M"])
                splits = num_splits_for(B * 8 * triton.cdiv(rows, block_m), S_max, 132)
                label = f"{config.name} {str(cache_dtype).removeprefix('torch.')} cache B={B}"
                label += f" T_new={T} S_max={S_max}" if T is not None else ""
                label += f" window {window}" if window else ""
                mma = "HGMMA" if hopper and block_m >= 64 else "HMMA"
                for step in _launches(
                    q, cache, cache, lens, q, None, window, desc, desc, config, splits
                ):
                    expect = mma if step.kernel is _decode_kernel else None
                    specs.append(AotSpec(op, f"{label} splits={splits}", step, expect))
    return specs
