"""Prefill flash attention: causal or not, GQA/MQA, sliding window (Mistral's), packed variable
length batches, optional LSE; fp16/bf16, or e4m3 Q/K/V with descales. Registered as
`torch.ops.fp8nemo.flash_attention`.

Shapes:
    q      [B, S, Hq, D]  or packed [T, Hq, D] with cu_seqlens [B + 1] int32 and max_seqlen
    k, v   [B, S, Hk, D]  or packed [T, Hk, D];  Hq % Hk == 0;  D <= 256, a multiple of 16;
           unit stride along D, or for an e4m3 v along keys (key-major, from v_key_major)
    out    like q (bf16 for e4m3 input);  lse [B, Hq, S] or [Hq, T] fp32, natural log
    q/k/v_descale  [B, Hk] or one element fp32 (e4m3 only), positive: x ~= x_fp8 * descale

One program owns BLOCK_Q queries of one sequence for all G = Hq / Hk query heads of one KV
head: its rows are (query, head) pairs, so each K/V tile is loaded once for the whole group.
Softmax runs in base 2 on fp32 scores. On the FP8 path P is cast to e4m3 as P * 256 (a fixed
power of two that puts its [0, 1] range high in e4m3's) and the output divides it out.
"""

from __future__ import annotations

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
    check_positive_finite,
    check_same_device,
    check_scales,
    check_tensor,
    check_types,
    descale_strides,
    launch,
    m_bucket,
    register_op,
    use_triton,
    value_checks_enabled,
)

HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
# P goes to e4m3 as P * P_SCALE: a power of two, so the scaling is exact, that puts P's [0, 1]
# high in e4m3's range (max 448) without saturating.
P_SCALE = tl.constexpr(256.0)
LOG2E = tl.constexpr(math.log2(math.e))  # softmax runs in base 2 (exp2)
# Keys and columns per step of the exact pass (_store_exact): small tiles, for its registers.
EXACT_BLOCK = tl.constexpr(32)
# Key tiles of a key-major V start on multiples of this many tokens (16 bytes of e4m3).
KEY_ALIGN = tl.constexpr(16)
LN2 = tl.constexpr(math.log(2.0))


def _config(prefix, rows, block_n, warps, stages):
    """BLOCK_M = rows of (query, head) pairs; BLOCK_N = keys per step."""
    name = f"{prefix}{rows}x{block_n}w{warps}s{stages}"
    return KernelConfig(name, dict(BLOCK_M=rows, BLOCK_N=block_n), warps, stages)


# Each list keeps every config free of spills (fp8nemo inspect): the FP8 path holds more
# registers (its V tile is transposed for the MMA), so it has its own lists.
HOPPER_CONFIGS = {
    "half": [_config("h", 128, 128, 8, 3), _config("h", 128, 64, 8, 4), _config("h", 64, 64, 4, 3)],
    "fp8": [_config("h", 128, 64, 8, 3), _config("h", 64, 64, 4, 3)],
    # head_dim > 128: the accumulator and Q tile double, so fewer rows or keys per step.
    "half-wide": [_config("h", 64, 64, 8, 2), _config("h", 128, 32, 8, 2)],
    "fp8-wide": [_config("h", 64, 64, 8, 2)],
}
ADA_CONFIGS = {
    "half": [_config("a", 128, 64, 8, 2), _config("a", 64, 64, 4, 2)],
    "fp8": [_config("a", 128, 64, 8, 2), _config("a", 64, 64, 4, 2)],
    # 8 warps: with 4, the [64, 256] accumulator alone takes 128 registers a thread and the
    # exact pass for non-finite V (_store_exact) no longer fits beside the main loop.
    "half-wide": [_config("a", 64, 32, 8, 2)],
    "fp8-wide": [_config("a", 64, 32, 8, 2)],
}
# Big tiles for the interpreter, which pays per program and per block.
INTERPRETER_CONFIGS = [_config("i", 256, 128, 4, 1)]


def configs_for(cap: tuple[int, int], head_dim: int, fp8: bool) -> list[KernelConfig]:
    if cap == (0, 0):
        return INTERPRETER_CONFIGS
    kind = ("fp8" if fp8 else "half") + ("-wide" if head_dim > 128 else "")
    return (HOPPER_CONFIGS if cap >= (9, 0) else ADA_CONFIGS)[kind]


@triton.jit
def _visible(qi, kj, seqlen, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    # Whether the query at position qi sees the key at kj (broadcasting): a key of its sequence,
    # not after it (causal), inside its window.
    ok = kj < seqlen
    if CAUSAL:
        ok = ok & (kj <= qi)
    if WINDOW:
        ok = ok & (kj > qi - window)
    return ok


@triton.jit
def _nonfinite(x):
    x = x.to(tl.float32)
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _attn_range(
    acc, l, m, q, k_base, v_base, stride_ks, stride_vs, stride_vd,
    qi, seqlen, window, scale, lo, hi, full_lo, full_hi, first,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, FP8: tl.constexpr, V_KEY_MAJOR: tl.constexpr,
    OFFSET_64: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Online softmax over keys [lo, hi). Blocks outside [full_lo, full_hi) hold some key past
    # the sequence, after a query (causal) or before its window, and are masked; the branch is
    # uniform per block, so the blocks in between skip the mask's arithmetic. (Two loops would
    # do the same without a branch, but the second copy of the loop costs ~70 registers.)
    # A key-major V (V_KEY_MAJOR) is loaded in whole groups of KEY_ALIGN keys, so that its mask
    # is constant over each 16-byte vector (the launcher checks its storage holds them), and
    # the keys before `first` precede the sequence and are hidden too.
    offs_n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < HEAD_DIM)[None, :]
    # V's D stride: 1 (D-contiguous, the common case) is a constant to Triton; a key-major V
    # (stride_vs == 1) has a large one that can overflow int32 offsets.
    d_off = d.to(tl.int64) if OFFSET_64 else d
    v_end = tl.cdiv(seqlen, KEY_ALIGN) * KEY_ALIGN if V_KEY_MAJOR else seqlen
    for n0 in range(lo, hi, BLOCK_N):
        kj = n0 + offs_n
        # int32 offsets within a sequence (the launcher checks they fit): int64 ones would hold
        # a 64-bit register pair per K/V element.
        kj_off = kj.to(tl.int64)[:, None] if OFFSET_64 else kj[:, None]
        kv_mask = d_ok & (kj < seqlen)[:, None]
        k = tl.load(k_base + kj_off * stride_ks + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale
        if (n0 < full_lo) | (n0 >= full_hi):
            ok = _visible(qi[:, None], kj[None, :], seqlen, window, CAUSAL, WINDOW)
            if V_KEY_MAJOR:
                ok = ok & (kj >= first)[None, :]
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtract 0 there, not -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        v_mask = d_ok & (kj < v_end)[:, None] if V_KEY_MAJOR else kv_mask
        v = tl.load(v_base + kj_off * stride_vs + d_off[None, :] * stride_vd, mask=v_mask,
                    other=0.0)  # fmt: skip
        if FP8:
            pv = tl.dot((p * P_SCALE).to(tl.float8e4nv), v)
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    return acc, l, m


@triton.jit
def _store_exact(
    o_rows, q_rows, row_ok, k_base, v_base, stride_ks, stride_vs, stride_vd,
    qi, seqlen, window, scale, m, l, out_scale,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, FP8: tl.constexpr, OFFSET_64: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, COLS: tl.constexpr,
):  # fmt: skip
    # The output formed again over the sequence's keys from the final row max m and sum l (K
    # alone sets them), for a program whose acc came out non-finite: a NaN or inf in V may sit
    # at a key some row does not see, which the MMA still gave that row as 0 * NaN = NaN. Here V
    # goes to the MMA with its non-finite entries as 0, and a count of each row's visible
    # non-finite entries (a second MMA) makes NaN exactly where the math has one. BLOCK_N keys
    # and COLS columns at a time with q and k read again: with small tiles it fits beside what
    # the main loop holds (keeping P or a copy of acc there would spill). Slow, but only such
    # input takes it. Decode passes one split's keys as a sequence of its own, and K and V in
    # its e4m3 cache widen to q's dtype.
    offs_n = tl.arange(0, BLOCK_N)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    for c in range(0, BLOCK_D, COLS):
        dc = c + tl.arange(0, COLS)
        dc_ok = (dc < HEAD_DIM)[None, :]
        acc = tl.zeros([q_rows.shape[0], COLS], tl.float32)
        seen_bad = tl.zeros([q_rows.shape[0], COLS], tl.float32)
        for n0 in range(0, seqlen, BLOCK_N):
            kj = n0 + offs_n
            kj_off = kj.to(tl.int64)[:, None] if OFFSET_64 else kj[:, None]
            in_seq = (kj < seqlen)[:, None]
            s = tl.zeros([q_rows.shape[0], BLOCK_N], tl.float32)
            for e in range(0, BLOCK_D, COLS):
                de = e + tl.arange(0, COLS)
                de_ok = (de < HEAD_DIM)[None, :]
                q = tl.load(q_rows[:, None] + de[None, :], mask=row_ok[:, None] & de_ok, other=0.0)
                k = tl.load(k_base + kj_off * stride_ks + de[None, :], mask=de_ok & in_seq,
                            other=0.0)  # fmt: skip
                s += tl.dot(q, tl.trans(k.to(q.dtype)))
            seen = _visible(qi[:, None], kj[None, :], seqlen, window, CAUSAL, WINDOW)
            p = tl.where(seen, tl.math.exp2(s * scale - m_safe[:, None]), 0.0)
            dc_off = dc.to(tl.int64) if OFFSET_64 else dc
            v = tl.load(v_base + kj_off * stride_vs + dc_off[None, :] * stride_vd,
                        mask=dc_ok & in_seq, other=0.0)  # fmt: skip
            bad = _nonfinite(v)
            if FP8:
                v = tl.where(bad, 0.0, v.to(tl.float32)).to(v.dtype)
                p = (p * P_SCALE).to(tl.float8e4nv)
            else:  # fp16/bf16 P and V; an e4m3 cache under fp16/bf16 queries widens (decode)
                v = tl.where(bad, 0.0, v.to(tl.float32)).to(q_rows.dtype.element_ty)
                p = p.to(v.dtype)
            acc += tl.dot(p, v)
            seen_bad += tl.dot(seen.to(tl.float32).to(v.dtype), bad.to(tl.float32).to(v.dtype))
        out = tl.where(seen_bad > 0, float("nan"), acc / l[:, None] * out_scale)
        tl.store(o_rows[:, None] + dc[None, :], out.to(o_rows.dtype.element_ty),
                 mask=row_ok[:, None] & dc_ok)  # fmt: skip


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, cu_ptr, q_desc_ptr, k_desc_ptr, v_desc_ptr,
    S, T, G, window, softmax_scale, stride_cu,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh, stride_vd, stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    stride_qdb, stride_qdh, stride_kdb, stride_kdh, stride_vdb, stride_vdh,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr, FP8: tl.constexpr,
    V_KEY_MAJOR: tl.constexpr, STORE_LSE: tl.constexpr, OFFSET_64: tl.constexpr,
    HEAD_DIM: tl.constexpr, GP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = BLOCK_Q * GP
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    if VARLEN:
        # Clamped into [0, T] so that bad offsets (unchecked inside a CUDA graph) stay in bounds.
        start = min(max(tl.load(cu_ptr + b * stride_cu), 0), T)
        seqlen = min(max(tl.load(cu_ptr + (b + 1) * stride_cu), start), T) - start
    else:
        start = 0
        seqlen = S
    pid_q = tl.program_id(0)
    if CAUSAL:  # programs with late queries do the most work: start them first
        pid_q = tl.num_programs(0) - 1 - pid_q
    q0 = pid_q * BLOCK_Q
    if q0 >= seqlen:
        return
    rows = tl.arange(0, BLOCK_M)
    qi = q0 + rows // GP  # query position in its sequence
    g = rows % GP  # head within the group (GP = G padded to a power of two)
    row_ok = (qi < seqlen) & (g < G)
    head = kvh * G + g
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < HEAD_DIM)[None, :]
    tok = (start + qi).to(tl.int64)
    q_rows = b.to(tl.int64) * stride_qb + tok * stride_qs + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)

    scale = softmax_scale * LOG2E
    if FP8:
        q_desc = tl.load(q_desc_ptr + b * stride_qdb + kvh * stride_qdh)
        scale = scale * q_desc * tl.load(k_desc_ptr + b * stride_kdb + kvh * stride_kdh)

    # The key loop counts keys from token key0. A key-major V is read along keys, and a packed
    # sequence may start at any token: with V_KEY_MAJOR the key tiles start at the KEY_ALIGN
    # boundary before it, so V's loads stay 16-byte aligned (async copies into shared memory in
    # the layout the MMA reads), and the `pad` keys before the sequence are masked. Key j of the
    # sequence is then key j + pad of the loop, and its query i is at i + pad.
    key0 = start
    pad = 0
    if V_KEY_MAJOR:
        key0 = start // KEY_ALIGN * KEY_ALIGN
        pad = start - key0
    q0k = q0 + pad
    nk = seqlen + pad
    # Keys [lo, hi) are visible to some row; inside [full_lo, full_hi) to every row.
    hi = nk
    full_hi = nk // BLOCK_N * BLOCK_N
    if CAUSAL:
        hi = min(nk, q0k + BLOCK_Q)
        full_hi = min(full_hi, (q0k + 1) // BLOCK_N * BLOCK_N)
    lo = 0
    full_lo = 0
    if WINDOW:
        lo = max(0, q0k - window + 1) // BLOCK_N * BLOCK_N
        full_lo = tl.cdiv(max(0, q0k + BLOCK_Q - window), BLOCK_N) * BLOCK_N
    if V_KEY_MAJOR:  # a first tile with pad keys is masked
        full_lo = max(full_lo, tl.cdiv(pad, BLOCK_N) * BLOCK_N)
    full_lo = min(max(full_lo, lo), hi)
    full_hi = max(full_hi, full_lo)

    k_base = k_ptr + b.to(tl.int64) * stride_kb + key0.to(tl.int64) * stride_ks + kvh * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + key0.to(tl.int64) * stride_vs + kvh * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc, l, m = _attn_range(
        acc, l, m, q, k_base, v_base, stride_ks, stride_vs, stride_vd, qi + pad, nk, window, scale,
        lo, hi, full_lo, full_hi, pad, CAUSAL, WINDOW, FP8, V_KEY_MAJOR, OFFSET_64, HEAD_DIM,
        BLOCK_N, BLOCK_D,
    )  # fmt: skip

    l_safe = tl.where(l == 0.0, 1.0, l)
    out_scale = 1.0
    if FP8:
        out_scale = tl.load(v_desc_ptr + b * stride_vdb + kvh * stride_vdh) / P_SCALE
    o_rows = o_ptr + b.to(tl.int64) * stride_ob + tok * stride_os + head * stride_oh
    # A hidden key must count for nothing whatever its K and V hold. Its score is -inf, so P is
    # 0 there, but the MMA forms 0 * NaN = NaN: a NaN or inf in V turns its column of acc
    # non-finite in every row. One check per program after the loop (acc * 0 is NaN exactly
    # where acc is not finite; sums carry it), and such a program forms its output again; one
    # whose non-finite values are all visible gets the same again. The loop pays nothing.
    flag = tl.sum(tl.where(row_ok, tl.sum(acc * 0.0, 1), 0.0), 0)
    if flag != flag:
        _store_exact(
            o_rows, q_ptr + (b.to(tl.int64) * stride_qb + head * stride_qh) + tok * stride_qs,
            row_ok, k_base + pad * stride_ks, v_base + pad * stride_vs, stride_ks, stride_vs,
            stride_vd, qi, seqlen, window, scale,
            m, l_safe, out_scale, CAUSAL, WINDOW, FP8, OFFSET_64, HEAD_DIM, BLOCK_D,
            EXACT_BLOCK, EXACT_BLOCK if BLOCK_D > EXACT_BLOCK else BLOCK_D,
        )  # fmt: skip
    else:
        out = acc / l_safe[:, None] * out_scale
        tl.store(o_rows[:, None] + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok)  # fmt: skip
    if STORE_LSE:
        lse = tl.where(l == 0.0, float("-inf"), (m + tl.math.log2(l_safe)) * LN2)
        lse_rows = b.to(tl.int64) * stride_lb + head * stride_lh + tok * stride_ls
        tl.store(lse_ptr + lse_rows, lse, mask=row_ok)


# ---------------------------------------------------------------------------------------------
# torch reference


def attention_reference(
    q, k, v, *, causal=True, softmax_scale=None, window=None, cu_seqlens=None,
    q_descale=None, k_descale=None, v_descale=None, quantize_p=None, acc_dtype=torch.float32,
    out_dtype=None,
):  # fmt: skip
    """Attention computed in `acc_dtype` on (dequantized) inputs, with the kernel's layouts.

    Returns (out, lse): out in `out_dtype` (default: the kernel's), lse in fp32 (fp64 for an
    fp64 `acc_dtype`). `quantize_p` (default: for e4m3 input) casts P to e4m3 as P * 256
    before P @ V, as the kernel does, relative to the row max."""
    fp8 = q.dtype == fp8_ref.E4M3
    quantize_p = fp8 if quantize_p is None else quantize_p
    out_dtype = out_dtype or (torch.bfloat16 if fp8 else q.dtype)
    packed = cu_seqlens is not None
    if not packed:
        B, S = q.shape[:2]
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
        cu_seqlens = torch.arange(B + 1) * S
    cu = cu_seqlens.tolist()
    Hq, D = q.shape[1], q.shape[2]
    G = Hq // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = torch.empty(q.shape, dtype=acc_dtype)
    lse = torch.empty(Hq, q.shape[0], dtype=acc_dtype)
    for b in range(len(cu) - 1):
        rows = slice(cu[b], cu[b + 1])
        n = cu[b + 1] - cu[b]
        if n == 0:  # an empty sequence has no rows to fill
            continue
        qb, kb, vb = (t[rows].to(acc_dtype).transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        if fp8:
            Hk = k.shape[1]
            qb = qb * expand_descale(q_descale, b, Hk).repeat_interleave(G)[:, None, None]
            kb = kb * expand_descale(k_descale, b, Hk)[:, None, None]
            vb = vb * expand_descale(v_descale, b, Hk)[:, None, None]
        kb, vb = kb.repeat_interleave(G, 0), vb.repeat_interleave(G, 0)
        s = qb @ kb.transpose(1, 2) * scale
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        visible = torch.ones(n, n, dtype=torch.bool)
        if causal:
            visible &= j <= i
        if window is not None:
            visible &= j > i - window
        s = s.masked_fill(~visible, float("-inf"))
        m = s.amax(-1, keepdim=True)
        m = m.masked_fill(m == float("-inf"), 0.0)
        p = torch.exp(s - m)  # in [0, 1]: relative to the row max, like the kernel's P
        l = p.sum(-1, keepdim=True)
        lse[:, rows] = (m + l.log()).squeeze(-1)
        if quantize_p:  # P * 256 rounded to e4m3; the row sum stays unquantized
            p = fp8_ref.saturating_cast(p * P_SCALE.value).to(acc_dtype) / P_SCALE.value
        # A hidden key has P = 0, but 0 * NaN = NaN: V's non-finite entries are left out of
        # P @ V, and make NaN in the rows that see their key, as the math says.
        finite = vb.isfinite()
        pv = p @ vb.masked_fill(~finite, 0.0)
        seen_bad = visible.to(acc_dtype) @ (~finite).to(acc_dtype) > 0
        pv = pv.masked_fill(seen_bad, float("nan"))
        out[rows] = (pv / l.masked_fill(l == 0, 1.0)).transpose(0, 1)
    out = out.to(out_dtype)
    if not packed:
        out = out.unflatten(0, (B, S))
        lse = lse.unflatten(1, (B, S)).transpose(0, 1).contiguous()
    return out, (lse if acc_dtype == torch.float64 else lse.float())


def expand_descale(descale, b, heads):
    """Sequence b's per-KV-head multipliers [heads] from a [B, Hk] or scalar descale."""
    d = descale.float().cpu()
    return d.reshape(()).expand(heads) if fp8_ref.is_per_tensor(d) else d[b]


# ---------------------------------------------------------------------------------------------
# launcher


def _check_cu_seqlens(cu_seqlens, T, max_seqlen):
    """cu_seqlens starts at 0, never decreases, ends at T, and no sequence exceeds max_seqlen
    (values are read where value checks run; see value_checks_enabled)."""
    if not value_checks_enabled(cu_seqlens):
        return
    cu = cu_seqlens.cpu()
    lens = cu[1:] - cu[:-1]
    if cu[0] != 0 or cu[-1] != T or (lens < 0).any():
        shown = cu.tolist()[:8]
        raise ValueError(
            f"cu_seqlens must start at 0, never decrease and end at T = {T}; got {shown}"
            f"{'...' if cu.numel() > 8 else ''} ending at {int(cu[-1])}"
        )
    if int(lens.max()) > max_seqlen:
        raise ValueError(
            f"max_seqlen = {max_seqlen} is below the longest sequence, {int(lens.max())}"
        )


def _longest(max_seqlen, q):
    """The longest a packed sequence can be: max_seqlen, but never past the T tokens there are
    (no device sync, so it holds under CUDA graphs too). It sizes the grid and the tuning key."""
    return min(max_seqlen, q.shape[0])


def check_attention_params(head_dim, window, softmax_scale, causal=True):
    """The head_dim, window and softmax_scale rules flash and decode attention share."""
    if head_dim % 16 or not 16 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be a multiple of 16 up to {MAX_HEAD_DIM}; got {head_dim}")
    if window is not None:
        if window < 1:
            raise ValueError(
                f"window must be >= 1 (a query sees itself and the window - 1 keys before it); "
                f"got {window}"
            )
        if not causal:
            raise ValueError("window is Mistral's causal sliding window: it needs causal=True")
    check_positive_finite("softmax_scale", softmax_scale)


def _check_args(q, k, v, causal, softmax_scale, window, cu_seqlens, max_seqlen,
                q_descale, k_descale, v_descale):  # fmt: skip
    """Validate the op's arguments; returns the batch size."""
    check_tensor("q", q, (*HALF_DTYPES, fp8_ref.E4M3))
    check_tensor("k", k, (q.dtype,))
    check_tensor("v", v, (q.dtype,))
    packed = cu_seqlens is not None
    layout = "[T, H, D] with cu_seqlens" if packed else "[B, S, H, D]"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != (3 if packed else 4):
            raise ValueError(f"{name} must be {layout}; got shape {list(t.shape)}")
        if name == "v" and q.dtype == fp8_ref.E4M3:
            if t.stride(-1) != 1 and t.stride(-3) != 1:
                raise ValueError(
                    f"v must have unit stride along D, or along keys (key-major, as "
                    f"v_key_major gives it); got strides {list(t.stride())}"
                )
            if _key_major(t):
                _check_key_major_room(t)
        elif t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have unit stride along D; got strides {list(t.stride())}"
            )
    if v.shape != k.shape or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q {list(q.shape)}, k {list(k.shape)} and v {list(v.shape)} must share the "
            f"{'token' if packed else 'batch and sequence'} dims and D, and k and v their shape"
        )
    Hq, Hk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"q's {Hq} heads must be a multiple of k's {Hk} heads (GQA)")
    check_attention_params(D, window, softmax_scale, causal)
    if packed:
        check_tensor("cu_seqlens", cu_seqlens, (torch.int32,), ndim=1)
        if cu_seqlens.shape[0] < 2:
            raise ValueError(
                f"cu_seqlens must be [B + 1] with B >= 1; got shape {list(cu_seqlens.shape)}"
            )
        if max_seqlen is None or max_seqlen < 1:
            raise ValueError(
                f"packed input needs max_seqlen >= 1, the longest sequence; got {max_seqlen}"
            )
        _check_cu_seqlens(cu_seqlens, q.shape[0], max_seqlen)
        B = cu_seqlens.shape[0] - 1
    else:
        if max_seqlen is not None:
            raise ValueError("max_seqlen applies to packed input (with cu_seqlens) only")
        B = q.shape[0]
    descales = {"q_descale": q_descale, "k_descale": k_descale, "v_descale": v_descale}
    check_scales(descales, q.dtype == fp8_ref.E4M3, "e4m3 input", (B, Hk), f"[B, Hk] = [{B}, {Hk}]")
    check_same_device(q=q, k=k, v=v, cu_seqlens=cu_seqlens, **descales)
    return B


def _key_major(v):
    """Whether v's keys are contiguous and its D is not: the layout v_key_major gives."""
    return v.stride(-3) == 1 and v.stride(-1) != 1


def _check_key_major_room(v):
    """The kernel reads a key-major v in whole groups of KEY_ALIGN keys (its mask then stays
    constant over each 16-byte vector): its storage must reach the keys rounded up to that."""
    keys, align = v.shape[-3], KEY_ALIGN.value
    extra = -keys % align
    if extra == 0 or v.numel() == 0:
        return
    last = v.storage_offset() + sum((n - 1) * st for n, st in zip(v.shape, v.stride(), strict=True))
    room = v.untyped_storage().nbytes() // v.element_size()
    if last + extra >= room:
        raise ValueError(
            f"v is key-major with {keys} keys, read in groups of {align}: its storage must hold "
            f"{extra} more elements past its last key (v_key_major pads each row of keys to a "
            f"multiple of {align}); it ends {room - 1 - last} past it"
        )


def v_key_major(v: torch.Tensor) -> torch.Tensor:
    """v `[B, S, Hk, D]` (or packed `[T, Hk, D]`) with the same values in key-major memory: a
    view of `[B, Hk, D, S']` (or `[Hk, D, T']`) storage, S' = S rounded up to a multiple of 16
    so that every row of keys starts 16-byte aligned. The FP8 prefill path's V: Hopper's FP8 MMA
    takes P @ V's V with keys contiguous only, so a D-contiguous V tile goes through a transpose
    in shared memory on every step of the key loop, and this layout loads without one. One
    copy of V (S * Hk * D bytes in e4m3), far below the attention's own cost at prefill sizes."""
    check_tensor("v", v)
    if v.dim() not in (3, 4):
        raise ValueError(f"v must be [B, S, Hk, D] or packed [T, Hk, D]; got shape {list(v.shape)}")
    keys = v.shape[-3]
    padded = triton.cdiv(keys, KEY_ALIGN.value) * KEY_ALIGN.value
    store = v.new_empty(*v.shape[:-3], *v.shape[-2:], padded)  # [..., Hk, D, S']
    store[..., keys:].zero_()  # read (and hidden) in the last group of keys: no NaN there
    out = store[..., :keys].movedim(-1, -3)
    return out.copy_(v)


def _out_shapes(q, B):
    packed = q.dim() == 3
    lse_shape = (q.shape[1], q.shape[0]) if packed else (B, q.shape[2], q.shape[1])
    out_dtype = torch.bfloat16 if q.dtype == fp8_ref.E4M3 else q.dtype
    return out_dtype, lse_shape


def _launches(q, k, v, out, lse, causal, softmax_scale, window, cu_seqlens, max_seqlen,
              descales, config) -> list[Launch]:  # fmt: skip
    packed = cu_seqlens is not None
    Hq, Hk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    if packed:
        B, S = cu_seqlens.shape[0] - 1, _longest(max_seqlen, q)
        lead = lambda t: (0, *t.stride()[:2])  # noqa: E731  (no batch stride: rows are tokens)
        lse_strides = (0, lse.stride(0), 1) if lse is not None else (0, 0, 0)
    else:
        B, S = q.shape[:2]
        lead = lambda t: t.stride()[:3]  # noqa: E731
        lse_strides = (lse.stride(0), lse.stride(1), 1) if lse is not None else (0, 0, 0)
    G = Hq // Hk
    GP = triton.next_power_of_2(G)
    block_q = max(1, config.meta["BLOCK_M"] // GP)
    fp8 = q.dtype == fp8_ref.E4M3
    q_d, k_d, v_d = descales
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    grid = (triton.cdiv(S, block_q), B, Hk)
    block_n, block_d = config.meta["BLOCK_N"], triton.next_power_of_2(D)
    # The largest K/V offset within a sequence (a key-major V's packed tiles start up to
    # KEY_ALIGN - 1 keys early) must fit int32, else the kernel forms them in int64.
    span = (S + block_n + KEY_ALIGN.value) * max(k.stride(-3), v.stride(-3)) + block_d * v.stride(
        -1
    )
    offset_64 = span >= 2**31
    return [
        launch(
            _attention_kernel, grid,
            q, k, v, out, lse, cu_seqlens, q_d, k_d, v_d,
            S, q.shape[0] if packed else 0, G, window if window is not None else 0, scale,
            cu_seqlens.stride(0) if packed else 0,
            *lead(q), *lead(k), *lead(v), v.stride(-1), *lead(out), *lse_strides,
            *descale_strides(q_d), *descale_strides(k_d), *descale_strides(v_d),
            CAUSAL=causal, WINDOW=window is not None, VARLEN=packed, FP8=fp8,
            V_KEY_MAJOR=_key_major(v), STORE_LSE=lse is not None, OFFSET_64=offset_64,
            HEAD_DIM=D, GP=GP, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    ]  # fmt: skip


_tuner = Autotuner("flash_attention")


def _flash_attention_impl(q, k, v, *, causal=True, softmax_scale=None, window=None,
                          cu_seqlens=None, max_seqlen=None, q_descale=None, k_descale=None,
                          v_descale=None, return_lse=False):  # fmt: skip
    B = _check_args(q, k, v, causal, softmax_scale, window, cu_seqlens, max_seqlen,
                    q_descale, k_descale, v_descale)  # fmt: skip
    out_dtype, lse_shape = _out_shapes(q, B)
    descales = (q_descale, k_descale, v_descale)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device) if return_lse else None
    if q.numel() == 0:  # no rows (and no lse rows), before the path choice so both agree
        return out, (lse if return_lse else out.new_empty(0, dtype=torch.float32))
    if not use_triton(q.device, "flash_attention"):
        out, lse = attention_reference(
            q.cpu(), k.cpu(), v.cpu(), causal=causal, softmax_scale=softmax_scale, window=window,
            cu_seqlens=None if cu_seqlens is None else cu_seqlens.cpu(),
            q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        )  # fmt: skip
        return out, (lse if return_lse else lse.new_empty(0))
    S = _longest(max_seqlen, q) if cu_seqlens is not None else q.shape[1]
    G = q.shape[-2] // k.shape[-2]
    key = (q.device, q.dtype, q.shape[-1], causal, window is not None, cu_seqlens is not None,
           G, return_lse, m_bucket(S))  # fmt: skip

    def run(config):
        for step in _launches(q, k, v, out, lse, causal, softmax_scale, window, cu_seqlens,
                              max_seqlen, descales, config):  # fmt: skip
            step()

    candidates = lambda: configs_for(capability(q.device), q.shape[-1], q.dtype == fp8_ref.E4M3)  # noqa: E731
    run(_tuner.choose(key, candidates, run))
    return out, (lse if return_lse else out.new_empty(0, dtype=torch.float32))


def _flash_attention_fake(q, k, v, *, causal=True, softmax_scale=None, window=None,
                          cu_seqlens=None, max_seqlen=None, q_descale=None, k_descale=None,
                          v_descale=None, return_lse=False):  # fmt: skip
    B = _check_args(q, k, v, causal, softmax_scale, window, cu_seqlens, max_seqlen,
                    q_descale, k_descale, v_descale)  # fmt: skip
    out_dtype, lse_shape = _out_shapes(q, B)
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    return out, torch.empty(lse_shape if return_lse else (0,), dtype=torch.float32, device=q.device)


register_op(
    "flash_attention(Tensor q, Tensor k, Tensor v, *, bool causal=True, float? softmax_scale=None, "
    "int? window=None, Tensor? cu_seqlens=None, int? max_seqlen=None, Tensor? q_descale=None, "
    "Tensor? k_descale=None, Tensor? v_descale=None, bool return_lse=False) -> (Tensor, Tensor)",
    _flash_attention_impl,
    _flash_attention_fake,
)


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    softmax_scale: float | None = None,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Attention of q `[B, S, Hq, D]` over k, v `[B, S, Hk, D]` (or packed `[T, H, D]` with
    `cu_seqlens`/`max_seqlen`), GQA when Hq > Hk. `window`: each query sees itself and the
    `window - 1` keys before it (needs `causal`). e4m3 q/k/v take `q/k/v_descale` (`[B, Hk]` or
    scalar) and return bf16. Returns out, or (out, lse) with `return_lse` (natural log, fp32,
    `[B, Hq, S]` or `[Hq, T]`)."""
    optional = (torch.Tensor, type(None))
    check_types(q=(q, torch.Tensor), k=(k, torch.Tensor), v=(v, torch.Tensor),
                causal=(causal, bool), softmax_scale=(softmax_scale, (float, int, type(None))),
                window=(window, (int, type(None))), cu_seqlens=(cu_seqlens, optional),
                max_seqlen=(max_seqlen, (int, type(None))), q_descale=(q_descale, optional),
                k_descale=(k_descale, optional), v_descale=(v_descale, optional),
                return_lse=(return_lse, bool))  # fmt: skip
    out, lse = torch.ops.fp8nemo.flash_attention(
        q, k, v, causal=causal, softmax_scale=softmax_scale, window=window, cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        return_lse=return_lse,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def aot_specs(cap: int):
    """Every config at NeMo's heads (32 q, 8 kv, head_dim 128; the wide configs at 256), causal,
    bf16 and e4m3 on meta tensors, plus the sliding-window and packed variants of the first
    config. bf16 must compile to HGMMA on Hopper and e4m3 to QGMMA (HMMA / QMMA on Ada)."""
    from ._triton import AotSpec

    hopper = cap >= 90
    specs = []
    for D in (128, 256):
        for dtype in (torch.bfloat16, fp8_ref.E4M3):
            fp8 = dtype == fp8_ref.E4M3
            for i, config in enumerate(configs_for((cap // 10, cap % 10), D, fp8)):
                mma = ("QGMMA" if hopper else "QMMA") if fp8 else ("HGMMA" if hopper else "HMMA")
                variants = [("causal", None, False, False)]
                if fp8:
                    variants += [("vkeymajor causal", None, False, True)]
                if i == 0 and D == 128:
                    variants += [("window 4096", 4096, False, False), ("packed", None, True, False)]
                    if fp8:
                        variants += [("vkeymajor packed", None, True, True)]
                for label, window, packed, keymajor in variants:
                    B, S, T = (1, 4096, 4096) if not packed else (4, 4096, 16384)
                    shape_q, shape_kv = (
                        ((T, 32, D), (T, 8, D)) if packed else ((B, S, 32, D), (B, S, 8, D))
                    )
                    q = torch.empty(shape_q, dtype=dtype, device="meta")
                    k = torch.empty(shape_kv, dtype=dtype, device="meta")
                    v = v_key_major(k) if keymajor else k
                    out = torch.empty(shape_q, dtype=torch.bfloat16, device="meta")
                    lse = torch.empty((32, T) if packed else (B, 32, S), device="meta")
                    cu = torch.empty(B + 1, dtype=torch.int32, device="meta") if packed else None
                    desc = torch.empty(B, 8, device="meta") if fp8 else None
                    max_seqlen = S if packed else None
                    launches = _launches(
                        q, k, v, out, lse, True, None, window, cu, max_seqlen, (desc,) * 3, config
                    )
                    name = f"{config.name} d{D} {str(dtype).removeprefix('torch.')} {label}"
                    specs += [AotSpec("flash_attention", name, step, mma) for step in launches]
    return specs
