"""Decode attention: one new query token per sequence over a KV cache (fp16/bf16 or e4m3),
split across programs along the cache so one long sequence fills the GPU, then combined.
Registered as `torch.ops.fp8nemo.decode_attention`.

Shapes:
    q                 [B, Hq, D]  fp16 / bf16 (the new token, at position cache_seqlens - 1)
    k_cache, v_cache  [B, S_max, Hk, D]  q's dtype or e4m3, unit stride along D
    cache_seqlens     [B] int32: keys [0, L) of each sequence, the new token's included
    k/v_descale       [B, Hk] or one element fp32 (e4m3 cache only), positive and finite
    out               [B, Hq, D]  q's dtype

One program reads a chunk of one sequence's cache for one KV head and serves all G = Hq / Hk
query heads from it (the heads are the rows of its MMA, padded to 16), so each cache byte is
read once. An e4m3 cache is widened to q's dtype in registers; its descales fold into the
softmax scale (k) and the output (v). With several splits each writes a normalized partial
output and its log-sum-exp; a second kernel combines them in a fixed order.
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
from .attention import LOG2E, check_attention_params, expand_descale

Q_DTYPES = (torch.float16, torch.bfloat16)
MIN_ROWS = 16  # tl.dot needs 16 rows: the G query heads are padded up to it
MAX_SPLITS = 64
# A split should stream at least this many keys, or the combine costs more than it saves.
MIN_KEYS_PER_SPLIT = 256


def _config(prefix, block_n, warps, stages):
    return KernelConfig(
        f"{prefix}n{block_n}w{warps}s{stages}", dict(BLOCK_N=block_n), warps, stages
    )


HOPPER_CONFIGS = [_config("h", 64, 4, 4), _config("h", 128, 4, 3), _config("h", 32, 4, 6)]
ADA_CONFIGS = [_config("a", 64, 4, 3), _config("a", 32, 4, 4)]
INTERPRETER_CONFIGS = [_config("i", 128, 4, 1)]


def configs_for(cap: tuple[int, int]) -> list[KernelConfig]:
    if cap == (0, 0):
        return INTERPRETER_CONFIGS
    return HOPPER_CONFIGS if cap >= (9, 0) else ADA_CONFIGS


def num_splits_for(batch_heads: int, s_max: int, sms: int) -> int:
    """Splits per (sequence, KV head): enough programs for two waves over the SMs, each split
    streaming at least MIN_KEYS_PER_SPLIT keys of the cache's capacity."""
    want = triton.cdiv(2 * sms, max(batch_heads, 1))
    return max(1, min(want, MAX_SPLITS, s_max // MIN_KEYS_PER_SPLIT))


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, lens_ptr, out_ptr, part_ptr, part_lse_ptr, k_desc_ptr, v_desc_ptr,
    G, window, softmax_scale, chunk, S_max, stride_lens,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_oh, stride_kdb, stride_kdh, stride_vdb, stride_vdh,
    WINDOW: tl.constexpr, FP8_CACHE: tl.constexpr, SPLIT: tl.constexpr, OFFSET_64: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # program (b, kvh, split): keys [split * chunk, (split + 1) * chunk) of sequence b that lie
    # in [lo, L); rows are the G query heads of kv head kvh (BLOCK_H >= G, padded).
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Clamped so that a bad length (unchecked inside a CUDA graph) cannot read past the cache.
    L = min(max(tl.load(lens_ptr + b * stride_lens), 0), S_max)
    lo = 0
    if WINDOW:
        lo = max(0, L - window)
    n_start = max(split * chunk, lo // BLOCK_N * BLOCK_N)
    n_end = min((split + 1) * chunk, L)

    r = tl.arange(0, BLOCK_H)
    head = kvh * G + r
    row_ok = r < G
    d = tl.arange(0, BLOCK_D)
    d_ok = (d < HEAD_DIM)[None, :]
    q_rows = b.to(tl.int64) * stride_qb + head * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_ok[:, None] & d_ok, other=0.0)
    scale = softmax_scale * LOG2E
    if FP8_CACHE:
        scale = scale * tl.load(k_desc_ptr + b * stride_kdb + kvh * stride_kdh)

    k_base = k_ptr + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
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
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m - m_safe)
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m = m_new

    l_safe = tl.where(l == 0.0, 1.0, l)
    out = acc / l_safe[:, None]
    if FP8_CACHE:
        out = out * tl.load(v_desc_ptr + b * stride_vdb + kvh * stride_vdh)
    if SPLIT:
        # Normalized partial output and its log2-sum-exp (-inf for an empty split).
        rows = (b * tl.num_programs(1) * G + head).to(tl.int64) * tl.num_programs(2) + split
        tl.store(part_ptr + rows[:, None] * HEAD_DIM + d[None, :], out, mask=row_ok[:, None] & d_ok)
        lse = tl.where(l == 0.0, float("-inf"), m + tl.math.log2(l_safe))
        tl.store(part_lse_ptr + rows, lse, mask=row_ok)
    else:
        o_rows = b.to(tl.int64) * stride_ob + head * stride_oh
        tl.store(out_ptr + o_rows[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok)  # fmt: skip


@triton.jit
def _decode_combine_kernel(
    part_ptr, part_lse_ptr, out_ptr,
    HQ, NUM_SPLITS, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # program (b, h): out = sum_s w_s part_s / sum_s w_s with w_s = 2^(lse_s - max lse).
    b = tl.program_id(0)
    h = tl.program_id(1)
    row = (b * HQ + h).to(tl.int64) * NUM_SPLITS
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
    o = out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d
    tl.store(o, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# ---------------------------------------------------------------------------------------------
# torch reference


def decode_reference(
    q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None, window=None,
    k_descale=None, v_descale=None, acc_dtype=torch.float32, out_dtype=None,
):  # fmt: skip
    """Attention of each sequence's new token over its cache, in `acc_dtype` on dequantized
    values; out [B, Hq, D] in `out_dtype` (default q's)."""
    B, Hq, D = q.shape
    Hk = k_cache.shape[2]
    G = Hq // Hk
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    out = torch.zeros(B, Hq, D, dtype=acc_dtype)
    for b, L in enumerate(cache_seqlens.tolist()):
        lo = max(0, L - window) if window is not None else 0
        if lo >= L:
            continue
        k = k_cache[b, lo:L].to(acc_dtype)  # [n, Hk, D]
        v = v_cache[b, lo:L].to(acc_dtype)
        if k_cache.dtype == fp8_ref.E4M3:
            k = k * expand_descale(k_descale, b, Hk).to(acc_dtype)[:, None]
            v = v * expand_descale(v_descale, b, Hk).to(acc_dtype)[:, None]
        k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # [n, Hq, D]
        s = torch.einsum("hd,nhd->hn", q[b].to(acc_dtype), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)
    return out.to(out_dtype or q.dtype)


# ---------------------------------------------------------------------------------------------
# launcher


def _check_args(q, k_cache, v_cache, cache_seqlens, softmax_scale, window, k_descale, v_descale):
    check_tensor("q", q, Q_DTYPES, ndim=3)
    check_tensor("k_cache", k_cache, (q.dtype, fp8_ref.E4M3), ndim=4)
    check_tensor("v_cache", v_cache, (k_cache.dtype,), ndim=4)
    check_tensor("cache_seqlens", cache_seqlens, (torch.int32,), ndim=1)
    B, Hq, D = q.shape
    Bc, S_max, Hk, Dc = k_cache.shape
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache must have k_cache's shape {list(k_cache.shape)}; got {list(v_cache.shape)}"
        )
    if Bc != B or Dc != D:
        raise ValueError(
            f"k_cache must be [B, S_max, Hk, D] with B = {B} and D = {D} from q [B, Hq, D]; "
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
    check_scales({"k_descale": k_descale, "v_descale": v_descale}, k_cache.dtype == fp8_ref.E4M3,
                 "an e4m3 cache", (B, Hk), f"[B, Hk] = [{B}, {Hk}]")  # fmt: skip
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens,
                      k_descale=k_descale, v_descale=v_descale)  # fmt: skip
    check_in_range("cache_seqlens", cache_seqlens, 0, S_max + 1, "keys held in the cache")


def _launches(q, k_cache, v_cache, cache_seqlens, out, softmax_scale, window, k_descale,
              v_descale, config, num_splits) -> list[Launch]:  # fmt: skip
    B, Hq, D = q.shape
    S_max, Hk = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hk
    block_n = config.meta["BLOCK_N"]
    chunk = triton.cdiv(triton.cdiv(S_max, num_splits), block_n) * block_n
    num_splits = triton.cdiv(S_max, chunk)  # no split left without keys to read
    fp8 = k_cache.dtype == fp8_ref.E4M3
    split = num_splits > 1
    part = part_lse = None
    if split:
        part = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B, Hq, num_splits, dtype=torch.float32, device=q.device)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    offset_64 = (S_max + block_n) * max(k_cache.stride(1), v_cache.stride(1)) >= 2**31
    steps = [
        launch(
            _decode_kernel, (B, Hk, num_splits),
            q, k_cache, v_cache, cache_seqlens, out, part, part_lse, k_descale, v_descale,
            G, window if window is not None else 0, scale, chunk, S_max, cache_seqlens.stride(0),
            q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
            out.stride(0), out.stride(1), *descale_strides(k_descale), *descale_strides(v_descale),
            WINDOW=window is not None, FP8_CACHE=fp8, SPLIT=split, OFFSET_64=offset_64, HEAD_DIM=D,
            BLOCK_H=max(MIN_ROWS, triton.next_power_of_2(G)), BLOCK_N=block_n,
            BLOCK_D=triton.next_power_of_2(D),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
    ]  # fmt: skip
    if split:
        steps.append(
            launch(
                _decode_combine_kernel, (B, Hq),
                part, part_lse, out, Hq, num_splits, out.stride(0), out.stride(1),
                HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits),
                BLOCK_D=triton.next_power_of_2(D),
            )
        )  # fmt: skip
    return steps


_tuner = Autotuner("decode_attention")


def _decode_attention_impl(q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None,
                           window=None, k_descale=None, v_descale=None):  # fmt: skip
    _check_args(q, k_cache, v_cache, cache_seqlens, softmax_scale, window, k_descale, v_descale)
    # Before the path choice, so both paths agree: no rows, or an empty cache (every length is
    # 0), which attends to nothing: zeros, as the kernel gives a sequence without keys.
    if q.numel() == 0 or k_cache.shape[1] == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    if not use_triton(q.device, "decode_attention"):
        return decode_reference(
            q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale, window=window,
            k_descale=k_descale, v_descale=v_descale,
        )  # fmt: skip
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    B, Hq, D = q.shape
    S_max, Hk = k_cache.shape[1], k_cache.shape[2]
    num_splits = num_splits_for(B * Hk, S_max, num_sms(q.device))
    key = (q.device, q.dtype, k_cache.dtype, D, Hq // Hk, window is not None, m_bucket(B),
           m_bucket(S_max), num_splits)  # fmt: skip

    def run(config):
        for step in _launches(q, k_cache, v_cache, cache_seqlens, out, softmax_scale, window,
                              k_descale, v_descale, config, num_splits):  # fmt: skip
            step()

    run(_tuner.choose(key, lambda: configs_for(capability(q.device)), run))
    return out


def _decode_attention_fake(q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None,
                           window=None, k_descale=None, v_descale=None):  # fmt: skip
    _check_args(q, k_cache, v_cache, cache_seqlens, softmax_scale, window, k_descale, v_descale)
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


register_op(
    "decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, *, "
    "float? softmax_scale=None, int? window=None, Tensor? k_descale=None, "
    "Tensor? v_descale=None) -> Tensor",
    _decode_attention_impl,
    _decode_attention_fake,
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
    return torch.ops.fp8nemo.decode_attention(
        q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale, window=window,
        k_descale=k_descale, v_descale=v_descale,
    )  # fmt: skip


def aot_specs(cap: int):
    """Every config at NeMo's heads (32 q, 8 kv, head_dim 128) for a bf16 and an e4m3 cache of
    32k positions, batch 16 (split into chunks) and batch 1 with a sliding window, on meta
    tensors. The dots are bf16 with 16 rows (the 4 query heads of a KV head, padded), below
    wgmma's 64: mma.sync (HMMA) on Hopper as on Ada, which a memory-bound loop can afford."""
    from ._triton import AotSpec

    mma = "HMMA"
    specs = []
    for config in configs_for((cap // 10, cap % 10)):
        for cache_dtype in (torch.bfloat16, fp8_ref.E4M3):
            for B, window in ((16, None), (1, 4096)):
                q = torch.empty(B, 32, 128, dtype=torch.bfloat16, device="meta")
                cache = torch.empty(B, 32768, 8, 128, dtype=cache_dtype, device="meta")
                lens = torch.empty(B, dtype=torch.int32, device="meta")
                fp8 = cache_dtype == fp8_ref.E4M3
                desc = torch.empty(B, 8, device="meta") if fp8 else None
                splits = num_splits_for(B * 8, 32768, 132)
                label = f"{config.name} {str(cache_dtype).removeprefix('torch.')} cache B={B}"
                label += f" window {window}" if window else ""
                for step in _launches(
                    q, cache, cache, lens, q, None, window, desc, desc, config, splits
                ):
                    expect = mma if step.kernel is _decode_kernel else None
                    specs.append(
                        AotSpec("decode_attention", f"{label} splits={splits}", step, expect)
                    )
    return specs
