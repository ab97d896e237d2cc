"""Rotary position embeddings: `rope_cache` builds the fp32 cos/sin table (with HF's rope_scaling
types), `rope_` rotates q and k in place, and `rope_kv_cache_` also writes k and v into a KV
cache (quantizing to FP8 when the cache is e4m3). Registered as `torch.ops.fp8nemo.rope_` and
`torch.ops.fp8nemo.rope_kv_cache_`.

Shapes:
    q          [T, Hq, D]  fp32 / fp16 / bf16, unit stride along D
    k, v       [T, Hk, D]
    positions  [T]         int32 / int64, each in [0, max_pos)
    cache      [max_pos, rot_dim] fp32 = cat(cos, sin); the first rot_dim <= D dims rotate
    k_cache    [B, S_max, Hk, D] fp16 / bf16 / e4m3; slots [T] int64 = b * S_max + s, -1 skips
Neox layout (HF Mistral weights) pairs dims (i, i + rot_dim/2); interleaved (native Mistral
weights) pairs (2i, 2i + 1). Angles and cos/sin stay fp32 in the kernel: bf16 angles are off by
whole radians at 128k positions.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fp8nemo import fp8 as fp8_ref

from ._triton import (
    INTERPRET,
    Launch,
    check_in_range,
    check_no_overlap,
    check_positive_finite,
    check_same_device,
    check_scales,
    check_tensor,
    check_types,
    launch,
    register_op,
    use_triton,
)

QK_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CACHE_DTYPES = (torch.float16, torch.bfloat16, fp8_ref.E4M3)
POSITION_DTYPES = (torch.int32, torch.int64)
SCALING_TYPES = ("linear", "dynamic", "yarn", "llama3")
E4M3_MAX = tl.constexpr(fp8_ref.E4M3_MAX)
# Tokens per program: the interpreter pays per program, a GPU wants a few KB per program.
BLOCK_T = 64 if INTERPRET else 1


# ---------------------------------------------------------------------------------------------
# cos/sin cache


def _inv_freq(
    rot_dim: int, theta: float, scaling: dict | None, max_pos: int
) -> tuple[torch.Tensor, float]:
    """fp32 inverse frequencies [rot_dim / 2] and the cos/sin multiplier, computed as HF
    transformers' rope init functions compute them (same formulas, same fp32 rounding)."""
    base = theta
    exponents = torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim
    if scaling is None:
        return 1.0 / (base**exponents), 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in SCALING_TYPES:
        raise ValueError(f"scaling rope_type must be one of {SCALING_TYPES}; got {kind!r}")

    def need(key, rule="positive", required=True):
        """scaling[key] checked against `rule`: "positive" (finite number > 0), "non-negative"
        (finite number >= 0), "length" (int > 0) or "bool"; None when absent and optional."""
        value = scaling.get(key)
        if value is None:
            if required:
                raise ValueError(
                    f"scaling of rope_type {kind!r} needs {key!r}; got keys {sorted(scaling)}"
                )
            return None
        if rule == "bool":
            ok = isinstance(value, bool)
        elif rule == "length":
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        else:
            ok = (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and (value > 0 if rule == "positive" else value >= 0)
            )
        if not ok:
            allowed = {
                "positive": "a positive finite number",
                "non-negative": "a finite number >= 0",
                "length": "a positive int",
                "bool": "a bool",
            }[rule]
            raise ValueError(f"scaling {key!r} must be {allowed}; got {value!r}")
        return value

    if kind == "linear":
        return 1.0 / (base**exponents) / need("factor"), 1.0
    if kind == "dynamic":
        # HF recomputes the base for the length of the sequence in use and keeps the plain one
        # up to the model's max_position_embeddings: a table of max_pos rows is HF's table for
        # a sequence of max_pos tokens. (HF reads the length from the config, not from
        # rope_scaling: pass it in the dict.)
        factor = need("factor")
        original = need("max_position_embeddings", "length", required=False) or need(
            "original_max_position_embeddings", "length"
        )
        if rot_dim <= 2:  # HF's exponent rot_dim / (rot_dim - 2) has no value at 2
            raise ValueError(f"dynamic NTK scaling needs rot_dim > 2; got rot_dim = {rot_dim}")
        seq_len = max(max_pos, original)
        base = base * ((factor * seq_len / original) - (factor - 1)) ** (rot_dim / (rot_dim - 2))
        return 1.0 / (base**exponents), 1.0
    if kind == "llama3":
        factor, original = need("factor"), need("original_max_position_embeddings", "length")
        low, high = need("low_freq_factor"), need("high_freq_factor")
        if not high > low:  # HF's smoothing divides by high - low
            raise ValueError(
                f"scaling 'high_freq_factor' must be greater than 'low_freq_factor'; got "
                f"{high} and {low}"
            )
        inv_freq = 1.0 / (base**exponents)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn
    original = need("original_max_position_embeddings", "length")
    factor = need("factor", required=False) or max_pos / original
    mscale = need("mscale", "non-negative", required=False)
    mscale_all_dim = need("mscale_all_dim", "non-negative", required=False)

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = need("attention_factor", required=False)
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = need("beta_fast", required=False) or 32
    beta_slow = need("beta_slow", required=False) or 1

    def correction_dim(rotations):
        return rot_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if need("truncate", "bool", required=False) is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rot_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rot_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, rot_dim, 2).float() / rot_dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (
        1.0 / pos_freqs
    ) * extrapolation
    return inv_freq, float(attention_factor)


def rope_cache(
    rot_dim: int,
    max_pos: int,
    theta: float,
    scaling: dict | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """fp32 `[max_pos, rot_dim]` = cat(cos, sin) of `position * inv_freq`.

    `scaling` is an HF `rope_scaling` dict (`rope_type` linear, dynamic, yarn or llama3, with
    that type's keys; dynamic also needs the model's `max_position_embeddings`). Frequencies
    are HF's, in fp32; angles are taken in fp64 so the table is exact to fp32 rounding at every
    position (yarn's attention factor multiplies cos and sin). Dynamic NTK depends on the
    sequence length, as in HF: this is HF's table for a sequence of `max_pos` tokens, so build
    it for the current length to follow HF exactly (or for the full context, as vLLM does).
    """
    check_types(rot_dim=(rot_dim, int), max_pos=(max_pos, int), theta=(theta, (int, float)))
    if rot_dim <= 0 or rot_dim % 2:
        raise ValueError(f"rot_dim must be a positive even number; got {rot_dim}")
    if max_pos <= 0:
        raise ValueError(f"max_pos must be positive; got {max_pos}")
    check_positive_finite("theta", theta)
    if scaling is not None and not isinstance(scaling, dict):
        raise TypeError(
            f"scaling must be a dict (HF rope_scaling) or None; got {type(scaling).__name__}"
        )
    inv_freq, attention_factor = _inv_freq(rot_dim, float(theta), scaling, max_pos)
    angles = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    cache = torch.cat([angles.cos(), angles.sin()], dim=-1) * attention_factor
    return cache.float().to(device)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _rotate(base, d1, d2, mask, cos, sin):
    # x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin in fp32, stored back in place; returns the
    # stored values, so a cache written from them holds what a separate write would copy.
    x1 = tl.load(base + d1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + d2, mask=mask, other=0.0).to(tl.float32)
    r1 = (x1 * cos - x2 * sin).to(base.dtype.element_ty)
    r2 = (x2 * cos + x1 * sin).to(base.dtype.element_ty)
    tl.store(base + d1, r1, mask=mask)
    tl.store(base + d2, r2, mask=mask)
    return r1, r2


@triton.jit
def _to_cache(x, scale, FP8: tl.constexpr):
    # Cache values: x / scale saturated to e4m3 (NaN stays NaN) for an FP8 cache, else x.
    if FP8:
        x = tl.math.div_rn(x.to(tl.float32), scale)
        x = tl.clamp(x, -E4M3_MAX, E4M3_MAX, propagate_nan=tl.PropagateNan.ALL)
    return x


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    k_scale_ptr, v_scale_ptr,
    T, HQ, HK, D, max_pos, S_max, num_slots,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_pos, stride_slot, stride_ks, stride_vs,
    HALF: tl.constexpr, INTERLEAVED: tl.constexpr, WRITE_CACHE: tl.constexpr,
    FP8_CACHE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_REST: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    # One [BLOCK_T, BLOCK_H, pairs] tile at a time. An out-of-range position rotates by NaN,
    # so a bad position shows in the output instead of reading past the table.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    pos = tl.load(pos_ptr + offs_t * stride_pos, mask=t_mask, other=0).to(tl.int64)
    pos_ok = (pos >= 0) & (pos < max_pos)
    i = tl.arange(0, BLOCK_HALF)
    cs_ptrs = cos_sin_ptr + tl.where(pos_ok, pos, 0)[:, None] * (2 * HALF) + i[None, :]
    cs_mask = t_mask[:, None] & (i < HALF)[None, :]
    cos = tl.where(pos_ok[:, None], tl.load(cs_ptrs, mask=cs_mask, other=0.0), float("nan"))
    sin = tl.where(pos_ok[:, None], tl.load(cs_ptrs + HALF, mask=cs_mask, other=0.0), float("nan"))
    cos, sin = cos[:, None, :], sin[:, None, :]
    if INTERLEAVED:
        d1, d2 = 2 * i, 2 * i + 1
    else:
        d1, d2 = i, i + HALF
    d1, d2 = d1[None, None, :], d2[None, None, :]
    t = offs_t.to(tl.int64)[:, None, None]
    pair_mask = t_mask[:, None, None] & (i < HALF)[None, None, :]

    for h0 in range(0, HQ, BLOCK_HQ):
        h = h0 + tl.arange(0, BLOCK_HQ)[None, :, None]
        _rotate(q_ptr + t * stride_qt + h * stride_qh, d1, d2, pair_mask & (h < HQ), cos, sin)

    if WRITE_CACHE:
        slot = tl.load(slot_ptr + offs_t * stride_slot, mask=t_mask, other=-1).to(tl.int64)
        # -1 skips a padding token; a slot past the cache is not written either (the host
        # check reports it when it runs; inside a CUDA graph it cannot)
        write = (t_mask & (slot >= 0) & (slot < num_slots))[:, None, None]
        slot_row = (slot // S_max) * stride_cb + (slot % S_max) * stride_cs
        rest = 2 * HALF + tl.arange(0, BLOCK_REST)[None, None, :]
        dd = tl.arange(0, BLOCK_D)[None, None, :]
    for h0 in range(0, HK, BLOCK_HK):
        h = h0 + tl.arange(0, BLOCK_HK)[None, :, None]
        k_row = k_ptr + t * stride_kt + h * stride_kh
        r1, r2 = _rotate(k_row, d1, d2, pair_mask & (h < HK), cos, sin)
        if WRITE_CACHE:
            # Rotated pairs from registers, the unrotated tail and all of v from memory.
            dst = slot_row[:, None, None] + h * stride_ch
            if FP8_CACHE:
                k_s = tl.load(k_scale_ptr + h * stride_ks, mask=h < HK, other=1.0)
                v_s = tl.load(v_scale_ptr + h * stride_vs, mask=h < HK, other=1.0)
            else:
                k_s, v_s = 1.0, 1.0
            ty = k_cache_ptr.dtype.element_ty
            m = pair_mask & (h < HK) & write
            tl.store(k_cache_ptr + dst + d1, _to_cache(r1, k_s, FP8_CACHE).to(ty), mask=m)
            tl.store(k_cache_ptr + dst + d2, _to_cache(r2, k_s, FP8_CACHE).to(ty), mask=m)
            m = t_mask[:, None, None] & (h < HK) & (rest < D) & write
            tail = tl.load(k_row + rest, mask=m, other=0.0)
            tl.store(k_cache_ptr + dst + rest, _to_cache(tail, k_s, FP8_CACHE).to(ty), mask=m)
            m = t_mask[:, None, None] & (h < HK) & (dd < D) & write
            v = tl.load(v_ptr + t * stride_vt + h * stride_vh + dd, mask=m, other=0.0)
            tl.store(v_cache_ptr + dst + dd, _to_cache(v, v_s, FP8_CACHE).to(ty), mask=m)


# ---------------------------------------------------------------------------------------------
# launchers

MAX_BLOCK_H = 32


def _check_rope(q, k, positions, cos_sin_cache, cache_args=()):
    """Validate rope_'s arguments (positions' values too, where they can be read) and, with
    cache_args (v, k_cache, v_cache, slots, k_scale, v_scale), rope_kv_cache_'s. What is written
    in place must own its memory: an element that two tokens, heads or arguments share would
    be rotated (or written) more than once."""
    check_tensor("q", q, QK_DTYPES, ndim=3)
    check_tensor("k", k, (q.dtype,), ndim=3)
    check_tensor("positions", positions, POSITION_DTYPES, ndim=1)
    check_tensor("cos_sin_cache", cos_sin_cache, (torch.float32,), ndim=2)
    check_same_device(q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    (T, _, D), (Tk, _, Dk) = q.shape, k.shape
    if (Tk, Dk) != (T, D):
        raise ValueError(
            f"q is [T, Hq, D] = {list(q.shape)} and k is [T, Hk, D] = {list(k.shape)}: "
            f"T and D must match"
        )
    if positions.shape[0] != T:
        raise ValueError(f"positions must be [T] = [{T}]; got {list(positions.shape)}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise ValueError(
                f"{name} must have unit stride along D; got strides {list(t.stride())}"
            )
    max_pos, rot_dim = cos_sin_cache.shape
    if rot_dim == 0 or rot_dim % 2 or rot_dim > D or not cos_sin_cache.is_contiguous():
        raise ValueError(
            f"cos_sin_cache must be a contiguous [max_pos, rot_dim] table with rot_dim even, "
            f"positive and <= D = {D}; got shape {list(cos_sin_cache.shape)}, "
            f"strides {list(cos_sin_cache.stride())}"
        )
    check_in_range("positions", positions, 0, max_pos, "rows of cos_sin_cache")
    written, read = {"q": q, "k": k}, {"positions": positions, "cos_sin_cache": cos_sin_cache}
    if cache_args:
        _check_cache_write(k, *cache_args)
        v, k_cache, v_cache, slots, k_scale, v_scale = cache_args
        written.update(k_cache=k_cache, v_cache=v_cache)
        read.update(v=v, slots=slots, k_scale=k_scale, v_scale=v_scale)
    check_no_overlap(written, read)


def _check_cache_write(k, v, k_cache, v_cache, slots, k_scale, v_scale):
    check_tensor("v", v, (k.dtype,), ndim=3)
    check_tensor("k_cache", k_cache, CACHE_DTYPES, ndim=4)
    check_tensor("v_cache", v_cache, (k_cache.dtype,), ndim=4)
    check_tensor("slots", slots, POSITION_DTYPES, ndim=1)
    check_same_device(
        k=k, v=v, k_cache=k_cache, v_cache=v_cache, slots=slots, k_scale=k_scale, v_scale=v_scale
    )
    T, Hk, D = k.shape
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {list(k.shape)}; got {list(v.shape)}")
    if v.stride(-1) != 1:
        raise ValueError(f"v must have unit stride along D; got strides {list(v.stride())}")
    B, S_max, Hc, Dc = k_cache.shape
    if (Hc, Dc) != (Hk, D) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must be [B, S_max, Hk, D] with Hk, D = {Hk}, {D}; got "
            f"{list(k_cache.shape)} and {list(v_cache.shape)}"
        )
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError(
            f"k_cache and v_cache must share strides with unit stride along D; got "
            f"{list(k_cache.stride())} and {list(v_cache.stride())}"
        )
    if slots.shape[0] != T:
        raise ValueError(f"slots must be [T] = [{T}]; got {list(slots.shape)}")
    check_scales({"k_scale": k_scale, "v_scale": v_scale}, k_cache.dtype == fp8_ref.E4M3,
                 "an e4m3 cache", (Hk,), f"[Hk] = [{Hk}]")  # fmt: skip
    check_in_range("slots", slots, -1, B * S_max, "b * S_max + s, or -1 to skip")


def _rope_launches(q, k, positions, cos_sin_cache, interleaved, v=None, k_cache=None, v_cache=None,
                   slots=None, k_scale=None, v_scale=None) -> list[Launch]:  # fmt: skip
    T, HQ, D = q.shape
    HK = k.shape[1]
    max_pos, rot_dim = cos_sin_cache.shape
    write = k_cache is not None
    fp8_cache = write and k_cache.dtype == fp8_ref.E4M3
    B, S_max = (k_cache.shape[0], k_cache.shape[1]) if write else (0, 1)
    cache_strides = k_cache.stride()[:3] if write else (0, 0, 0)
    vector_stride = lambda t: 0 if t is None or fp8_ref.is_per_tensor(t) else t.stride(0)  # noqa: E731
    return [
        launch(
            _rope_kernel, (triton.cdiv(T, BLOCK_T),),
            q, k, v, positions, cos_sin_cache, k_cache, v_cache, slots, k_scale, v_scale,
            T, HQ, HK, D, max_pos, S_max, B * S_max,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0) if write else 0, v.stride(1) if write else 0,
            *cache_strides, positions.stride(0), slots.stride(0) if write else 0,
            vector_stride(k_scale), vector_stride(v_scale),
            HALF=rot_dim // 2, INTERLEAVED=interleaved, WRITE_CACHE=write, FP8_CACHE=fp8_cache,
            BLOCK_T=BLOCK_T, BLOCK_HQ=min(MAX_BLOCK_H, triton.next_power_of_2(HQ)),
            BLOCK_HK=min(MAX_BLOCK_H, triton.next_power_of_2(HK)),
            BLOCK_HALF=triton.next_power_of_2(rot_dim // 2),
            BLOCK_REST=triton.next_power_of_2(max(D - rot_dim, 1)),
            BLOCK_D=triton.next_power_of_2(D),
        )
    ]  # fmt: skip


def _run(q, k, positions, cos_sin_cache, interleaved, cache_args=()):
    """Rotate q and k in place and, with cache_args (v, k_cache, v_cache, slots, k_scale,
    v_scale), write k and v into the cache."""
    if q.shape[0] == 0:
        return
    if not use_triton(q.device, "rope_kv_cache_" if cache_args else "rope_"):
        q_rot, k_rot = rope_reference(q, k, positions, cos_sin_cache, interleaved)
        q.copy_(q_rot)
        k.copy_(k_rot)
        if cache_args:
            kv_cache_write_reference(k, *cache_args)
        return
    for step in _rope_launches(q, k, positions, cos_sin_cache, interleaved, *cache_args):
        step()


def _rope_impl(q, k, positions, cos_sin_cache, *, interleaved=False):
    _check_rope(q, k, positions, cos_sin_cache)
    _run(q, k, positions, cos_sin_cache, interleaved)


def _rope_fake(q, k, positions, cos_sin_cache, *, interleaved=False):
    _check_rope(q, k, positions, cos_sin_cache)


def _rope_kv_cache_impl(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slots, *,
                        k_scale=None, v_scale=None, interleaved=False):  # fmt: skip
    cache_args = (v, k_cache, v_cache, slots, k_scale, v_scale)
    _check_rope(q, k, positions, cos_sin_cache, cache_args)
    _run(q, k, positions, cos_sin_cache, interleaved, cache_args)


def _rope_kv_cache_fake(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slots, *,
                        k_scale=None, v_scale=None, interleaved=False):  # fmt: skip
    _check_rope(q, k, positions, cos_sin_cache, (v, k_cache, v_cache, slots, k_scale, v_scale))


register_op(
    "rope_(Tensor(a!) q, Tensor(b!) k, Tensor positions, Tensor cos_sin_cache, *, "
    "bool interleaved=False) -> ()",
    _rope_impl,
    _rope_fake,
)
register_op(
    "rope_kv_cache_(Tensor(a!) q, Tensor(b!) k, Tensor v, Tensor positions, Tensor cos_sin_cache, "
    "Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slots, *, Tensor? k_scale=None, "
    "Tensor? v_scale=None, bool interleaved=False) -> ()",
    _rope_kv_cache_impl,
    _rope_kv_cache_fake,
)


def rope_reference(q, k, positions, cos_sin_cache, interleaved=False):
    """Torch rotation in fp32, returned in q's dtype (the CPU path and the tests' reference)."""
    rot = cos_sin_cache.shape[1]
    half = rot // 2
    cs = cos_sin_cache[positions.long()].to(q.device)
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rotate(x):
        x = x.float()
        r = x[..., :rot]
        x1, x2 = (r[..., 0::2], r[..., 1::2]) if interleaved else (r[..., :half], r[..., half:])
        o1, o2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
        out = torch.stack([o1, o2], -1).flatten(-2) if interleaved else torch.cat([o1, o2], -1)
        return torch.cat([out, x[..., rot:]], -1)

    return rotate(q).to(q.dtype), rotate(k).to(k.dtype)


def kv_cache_write_reference(k, v, k_cache, v_cache, slots, k_scale=None, v_scale=None):
    """Torch cache write: k and v (already rotated) into their slots, FP8 with saturation."""
    keep = slots >= 0
    s = slots[keep].long()
    b, pos = s // k_cache.shape[1], s % k_cache.shape[1]
    for src, cache, scale in ((k[keep], k_cache, k_scale), (v[keep], v_cache, v_scale)):
        if cache.dtype == fp8_ref.E4M3:
            src = fp8_ref.saturating_cast(src.float() / scale.float().reshape(-1, 1))
        cache[b, pos] = src.to(cache.dtype)


def rope_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    *,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q `[T, Hq, D]` and k `[T, Hk, D]` in place at `positions` `[T]` with the fp32
    table from `rope_cache`; neox pairing (HF weights) or `interleaved` (native Mistral)."""
    check_types(q=(q, torch.Tensor), k=(k, torch.Tensor), positions=(positions, torch.Tensor),
                cos_sin_cache=(cos_sin_cache, torch.Tensor),
                interleaved=(interleaved, bool))  # fmt: skip
    torch.ops.fp8nemo.rope_(q, k, positions, cos_sin_cache, interleaved=interleaved)
    return q, k


def rope_kv_cache_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_` fused with the KV-cache write: q and k rotate in place, and k (rotated) and v go
    to `k_cache`/`v_cache` `[B, S_max, Hk, D]` at `slots` `[T]` (b * S_max + s; -1 skips).
    An e4m3 cache stores `x / scale` saturated, with `k_scale`/`v_scale` fp32 of one element
    (per tensor) or `[Hk]`, positive and finite. One pass instead of three."""
    check_types(q=(q, torch.Tensor), k=(k, torch.Tensor), v=(v, torch.Tensor),
                positions=(positions, torch.Tensor), cos_sin_cache=(cos_sin_cache, torch.Tensor),
                k_cache=(k_cache, torch.Tensor), v_cache=(v_cache, torch.Tensor),
                slots=(slots, torch.Tensor), k_scale=(k_scale, (torch.Tensor, type(None))),
                v_scale=(v_scale, (torch.Tensor, type(None))),
                interleaved=(interleaved, bool))  # fmt: skip
    torch.ops.fp8nemo.rope_kv_cache_(
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slots,
        k_scale=k_scale, v_scale=v_scale, interleaved=interleaved,
    )  # fmt: skip
    return q, k


def aot_specs(cap: int):
    """The launcher's launches at NeMo's heads (32 q, 8 kv, head_dim 128) on meta tensors: rope_
    neox and interleaved, and the fused cache write into a bf16 and an e4m3 cache."""
    from ._triton import AotSpec

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    T, HQ, HK, D, B, S = 4096, 32, 8, 128, 16, 4096
    q, k, v = meta(T, HQ, D), meta(T, HK, D), meta(T, HK, D)
    positions, slots = meta(T, dtype=torch.int64), meta(T, dtype=torch.int64)
    cos_sin = meta(131072, D, dtype=torch.float32)
    specs = []
    for interleaved in (False, True):
        label = "interleaved" if interleaved else "neox"
        for step in _rope_launches(q, k, positions, cos_sin, interleaved):
            specs.append(AotSpec("rope_", label, step))
    for cache_dtype in (torch.bfloat16, fp8_ref.E4M3):
        cache = meta(B, S, HK, D, dtype=cache_dtype)
        scale = meta(1, dtype=torch.float32) if cache_dtype == fp8_ref.E4M3 else None
        label = f"neox, {str(cache_dtype).removeprefix('torch.')} cache"
        for step in _rope_launches(
            q, k, positions, cos_sin, False, v, cache, cache, slots, scale, scale
        ):
            specs.append(AotSpec("rope_kv_cache_", label, step))
    return specs
