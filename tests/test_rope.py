"""RoPE: the cos/sin table against HF transformers' rope init functions, the in-place rotation
against HF's apply_rotary_pos_emb and the fp32 reference, and the fused KV-cache write against
the unfused path, bit for bit."""

import importlib
import math

import pytest
import torch
from helpers import (
    E4M3_NAN_CODE,
    UNIT_ROUNDOFF,
    assert_codes_equal,
    assert_within,
    check_bad_input,
    randn,
)

from fp8nemo.kernels import rope_, rope_cache, rope_kv_cache_, value_checks
from fp8nemo.kernels.rope import kv_cache_write_reference, rope_reference

R = importlib.import_module("fp8nemo.kernels.rope")
E4M3 = torch.float8_e4m3fn
MAX_POS = 131072
SCALINGS = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "max_position_embeddings": 32768},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn-mscale": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096,
        "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 16, "beta_slow": 2,
    },
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}  # fmt: skip


def hf_inv_freq(rot_dim, theta, scaling, max_pos):
    """HF transformers' own rope init function for this scaling."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "default", "rope_theta": theta}
    max_position = max_pos
    if scaling is not None:
        params = {**scaling, "rope_theta": theta}
        if scaling["rope_type"] == "dynamic":  # HF's dynamic reads the length from the config
            max_position = params.pop("max_position_embeddings")
    config = transformers.MistralConfig(
        hidden_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=rot_dim,
        max_position_embeddings=max_position, rope_parameters=params,
    )  # fmt: skip
    if scaling is None:
        inv = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
        return inv, 1.0
    return ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu", seq_len=max_pos)


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("rot_dim, theta", [(128, 1e6), (64, 1e4)])
def test_cache_matches_hf_frequencies(name, rot_dim, theta):
    scaling = SCALINGS[name]
    inv_freq, attention = hf_inv_freq(rot_dim, theta, scaling, MAX_POS)
    ours, ours_attention = R._inv_freq(rot_dim, theta, scaling, MAX_POS)
    assert torch.equal(ours, inv_freq), "inverse frequencies differ from HF's"
    assert ours_attention == pytest.approx(attention, rel=1e-12)
    cache = rope_cache(rot_dim, MAX_POS, theta, scaling)
    assert cache.shape == (MAX_POS, rot_dim) and cache.dtype == torch.float32
    pos = torch.tensor([0, 1, 17, 4095, 32768, 100000, MAX_POS - 1], dtype=torch.float64)
    angles = pos[:, None] * inv_freq.double()[None, :]
    want = torch.cat([angles.cos(), angles.sin()], -1) * attention
    # The table is the fp64 value rounded once to fp32.
    assert torch.equal(cache[pos.long()], want.float())


def test_cache_against_hf_rotary_embedding_at_long_positions():
    """HF's own fp32 cos/sin: equal up to the rounding of HF's fp32 angles (pos * inv_freq)."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    config = transformers.MistralConfig(
        hidden_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
        max_position_embeddings=MAX_POS, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
    )  # fmt: skip
    pos = torch.tensor([[0, 5, 999, 65535, MAX_POS - 1]])
    cos, sin = MistralRotaryEmbedding(config)(torch.zeros(1, 1, 5, 128), pos)
    cache = rope_cache(128, MAX_POS, 1e6)[pos[0]]
    angle = pos[0, :, None].double() * rope_cache_inv_freq(128, 1e6)[None, :]
    bound = 2 * angle * 2.0**-24 + 2.0**-23  # HF's product rounding, then cos/sin rounding
    assert_within(cache[:, :64], cos[0, :, :64], bound, "cos vs HF")
    assert_within(cache[:, 64:], sin[0, :, :64], bound, "sin vs HF")


@pytest.mark.parametrize("seq_len", [1000, 32768, 50000])
def test_dynamic_scaling_follows_hf_per_sequence_length(seq_len):
    """HF's dynamic NTK recomputes frequencies for the sequence in use (plain base up to
    max_position_embeddings); rope_cache for that many positions gives HF's table."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding

    config = transformers.MistralConfig(
        hidden_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
        max_position_embeddings=32768, rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e6},
    )  # fmt: skip
    hf = MistralRotaryEmbedding(config)
    pos = torch.tensor([[0, 7, seq_len // 2, seq_len - 1]])
    cos, sin = hf(torch.zeros(1, 1, 4, 128), pos)
    scaling = {"rope_type": "dynamic", "factor": 4.0, "max_position_embeddings": 32768}
    table = rope_cache(128, seq_len, 1e6, scaling)[pos[0]]
    inv_freq = R._inv_freq(128, 1e6, scaling, seq_len)[0]
    assert torch.equal(inv_freq, hf.inv_freq.cpu()), "HF's frequencies for this length"
    angle = pos[0, :, None].double() * inv_freq.double()[None, :]
    bound = 2 * angle * 2.0**-24 + 2.0**-23
    assert_within(table[:, :64], cos[0, :, :64], bound, "cos vs HF")
    assert_within(table[:, 64:], sin[0, :, :64], bound, "sin vs HF")


def rope_cache_inv_freq(rot_dim, theta):
    return R._inv_freq(rot_dim, theta, None, 1)[0].double()


def rotation_bound(x, ref, cos_sin, positions, dtype, interleaved=False):
    """Round-off of x1 cos - x2 sin and x2 cos + x1 sin in fp32 (with or without FMA): a few
    units of |x1 cos| + |x2 sin|, then the rounding to dtype. Unrotated dims must be exact."""
    rot = cos_sin.shape[1]
    half = rot // 2
    cs = cos_sin[positions].abs()
    c, s = cs[:, None, :half], cs[:, None, half:]
    r = x[..., :rot].abs().float()
    x1, x2 = (r[..., 0::2], r[..., 1::2]) if interleaved else (r[..., :half], r[..., half:])
    m1, m2 = x1 * c + x2 * s, x2 * c + x1 * s
    mag = torch.stack([m1, m2], -1).flatten(-2) if interleaved else torch.cat([m1, m2], -1)
    mag = torch.cat([mag, torch.zeros_like(x[..., rot:], dtype=torch.float32)], -1)
    return UNIT_ROUNDOFF[dtype] * ref.float().abs() + 4 * UNIT_ROUNDOFF[torch.float32] * mag


def positions_for(kind, T, gen):
    if kind == "prefill":
        return torch.arange(T)
    if kind == "decode":
        return torch.randint(0, MAX_POS, (T,), generator=gen)
    cuts = sorted(torch.randperm(T - 1, generator=gen)[:3].add(1).tolist())
    lens = [b - a for a, b in zip([0, *cuts], [*cuts, T], strict=True)]
    return torch.cat([torch.arange(n) + 1000 * i for i, n in enumerate(lens)])  # packed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot_dim", [128, 64])
@pytest.mark.parametrize("positions_kind", ["prefill", "decode", "packed"])
# T=130 spans several programs of the interpreter's 64 tokens; Hq=40 two head blocks of 32.
@pytest.mark.parametrize(
    "T, HQ, HK, D", [(17, 32, 8, 128), (5, 4, 4, 64), (33, 12, 3, 256), (130, 40, 8, 128)]
)
def test_rotation_matches_reference(
    dtype, interleaved, rot_dim, positions_kind, T, HQ, HK, D, device, gen
):
    rot_dim = min(rot_dim, D)
    cos_sin = rope_cache(rot_dim, MAX_POS, 1e6)
    q = randn(T, HQ, D, gen=gen, dtype=dtype, device=device)
    k = randn(T, HK, D, gen=gen, dtype=dtype, device=device)
    positions = positions_for(positions_kind, T, gen)
    want_q, want_k = rope_reference(q.cpu(), k.cpu(), positions, cos_sin, interleaved)
    q0, k0 = q.clone(), k.clone()
    out_q, out_k = rope_(q, k, positions.to(device), cos_sin.to(device), interleaved=interleaved)
    assert out_q is q and out_k is k
    bound_q = rotation_bound(q0.cpu(), want_q, cos_sin, positions, dtype, interleaved)
    bound_k = rotation_bound(k0.cpu(), want_k, cos_sin, positions, dtype, interleaved)
    assert_within(q, want_q, bound_q, "q")
    assert_within(k, want_k, bound_k, "k")
    # dims past rot_dim are untouched
    assert torch.equal(q[..., rot_dim:], q0[..., rot_dim:]) and torch.equal(
        k[..., rot_dim:], k0[..., rot_dim:]
    )


def test_neox_matches_hf_apply_rotary_pos_emb(device, gen):
    pytest.importorskip("transformers")
    from transformers.models.mistral.modeling_mistral import apply_rotary_pos_emb

    T, HQ, HK, D = 40, 32, 8, 128
    cos_sin = rope_cache(D, MAX_POS, 1e6)
    q = randn(T, HQ, D, gen=gen)
    k = randn(T, HK, D, gen=gen)
    positions = positions_for("decode", T, gen)
    half = cos_sin[positions]
    cos = torch.cat([half[:, :64], half[:, :64]], -1)[None]
    sin = torch.cat([half[:, 64:], half[:, 64:]], -1)[None]
    # HF: [batch, heads, seq, D]
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    hf_q, hf_k = hf_q[0].transpose(0, 1), hf_k[0].transpose(0, 1)
    qd, kd = q.to(device), k.to(device)
    rope_(qd, kd, positions.to(device), cos_sin.to(device))
    assert_within(qd, hf_q, rotation_bound(q, hf_q, cos_sin, positions, torch.float32), "q vs HF")
    assert_within(kd, hf_k, rotation_bound(k, hf_k, cos_sin, positions, torch.float32), "k vs HF")


def test_interleaved_is_neox_on_deinterleaved_dims(device, gen):
    """Interleaved pairs (2i, 2i+1) are the neox pairs (i, i + D/2) of the permuted head."""
    T, H, D = 9, 4, 64
    cos_sin = rope_cache(D, 4096, 1e4).to(device)
    positions = torch.randint(0, 4096, (T,), generator=gen).to(device)
    x = randn(T, H, D, gen=gen, device=device)
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)]).to(device)
    a, b = x.clone(), x[..., perm].contiguous()
    rope_(a, a.clone(), positions, cos_sin, interleaved=True)
    rope_(b, b.clone(), positions, cos_sin)
    torch.testing.assert_close(a[..., perm], b, rtol=0, atol=0)


@pytest.mark.parametrize(
    "cache_dtype, per_head_scale",
    [(torch.bfloat16, False), (torch.float16, False), (E4M3, False), (E4M3, True)],
    ids=["bf16", "fp16", "e4m3-tensor-scale", "e4m3-head-scales"],
)
@pytest.mark.parametrize("rot_dim", [128, 96])
def test_fused_cache_write_matches_unfused(cache_dtype, per_head_scale, rot_dim, device, gen):
    T, HQ, HK, D, B, S = 23, 8, 4, 128, 3, 40
    cos_sin = rope_cache(rot_dim, 8192, 1e6)
    q = randn(T, HQ, D, gen=gen, dtype=torch.bfloat16, device=device)
    k = randn(T, HK, D, gen=gen, dtype=torch.bfloat16, device=device, scale=3.0)
    v = randn(T, HK, D, gen=gen, dtype=torch.bfloat16, device=device, scale=3.0)
    positions = torch.randint(0, 8192, (T,), generator=gen)
    slots = torch.randperm(B * S, generator=gen)[:T]
    slots[[2, 11]] = -1  # padding tokens: skipped
    k_scale = v_scale = None
    if cache_dtype == E4M3:
        n = HK if per_head_scale else 1
        k_scale = (torch.rand(n, generator=gen) * 0.01 + 0.004).to(device)  # some values saturate
        v_scale = (torch.rand(n, generator=gen) * 0.01 + 0.004).to(device)
    nan = torch.full((B, S, HK, D), float("nan"))
    k_cache, v_cache = nan.to(cache_dtype).to(device), nan.to(cache_dtype).to(device)
    want_k_cache, want_v_cache = k_cache.cpu().clone(), v_cache.cpu().clone()
    want_q, want_k = rope_reference(q.cpu(), k.cpu(), positions, cos_sin)
    kv_cache_write_reference(want_k, v.cpu(), want_k_cache, want_v_cache, slots,
                             None if k_scale is None else k_scale.cpu(),
                             None if v_scale is None else v_scale.cpu())  # fmt: skip
    rope_q, rope_k = q.clone(), k.clone()
    rope_(rope_q, rope_k, positions.to(device), cos_sin.to(device))
    rope_kv_cache_(q, k, v, positions.to(device), cos_sin.to(device), k_cache, v_cache,
                   slots.to(device), k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    assert torch.equal(q, rope_q) and torch.equal(k, rope_k), "the fused op rotates like rope_"
    # The cache: written slots hold exactly what the unfused write stores; the rest stays NaN.
    assert_codes_equal(k_cache, want_k_cache.to(device), "k_cache")
    assert_codes_equal(v_cache, want_v_cache.to(device), "v_cache")
    if cache_dtype == E4M3:
        assert (k_cache.float().abs() == 448).any(), "the test meant some values to saturate"


def test_strided_positions_slots_and_scales(device, gen):
    """Views with strides (a decode step's last column of position ids, a column of a slot
    table, per-head scales picked from a wider tensor) are read through their strides."""
    T, HQ, HK, D = 6, 4, 2, 64
    cos_sin = rope_cache(D, 512, 1e4)
    position_ids = torch.randint(0, 512, (T, 3), generator=gen)
    slot_table = torch.stack(
        [torch.randperm(2 * 16, generator=gen)[:T], torch.zeros(T, dtype=torch.int64)], 1
    )
    scales = torch.rand(HK, 2, generator=gen) * 0.02 + 0.005
    q, k, v = (randn(T, h, D, gen=gen, dtype=torch.bfloat16, device=device) for h in (HQ, HK, HK))
    want_q, want_k = rope_reference(q.cpu(), k.cpu(), position_ids[:, -1], cos_sin)
    want_kc, want_vc = (torch.zeros(2, 16, HK, D).to(E4M3) for _ in range(2))
    kv_cache_write_reference(
        want_k, v.cpu(), want_kc, want_vc, slot_table[:, 0], scales[:, 1], scales[:, 1]
    )
    k_cache, v_cache = (torch.zeros(2, 16, HK, D, device=device).to(E4M3) for _ in range(2))
    d = lambda t: t.to(device)  # noqa: E731
    rope_kv_cache_(q, k, v, d(position_ids)[:, -1], d(cos_sin), k_cache, v_cache, d(slot_table)[:, 0],
                   k_scale=d(scales)[:, 1], v_scale=d(scales)[:, 1])  # fmt: skip
    assert torch.equal(q.cpu(), want_q) and torch.equal(k.cpu(), want_k)
    assert_codes_equal(k_cache, d(want_kc), "k_cache")
    assert_codes_equal(v_cache, d(want_vc), "v_cache")


def test_out_of_range_position_gives_nan_in_the_kernel(device, gen):
    """With the host checks off (the model's forward, a CUDA graph) the kernel rotates a bad
    position into NaN."""
    T, H, D = 4, 2, 64
    cos_sin = rope_cache(D, 100, 1e4).to(device)
    q, k = randn(T, H, D, gen=gen, device=device), randn(T, H, D, gen=gen, device=device)
    positions = torch.tensor([3, 100, -1, 50], device=device)
    with pytest.raises(ValueError, match="positions must lie in"):
        rope_(q.clone(), k.clone(), positions, cos_sin)
    with value_checks(False):
        rope_(q, k, positions, cos_sin)
    bad = torch.tensor([False, True, True, False])
    assert (
        q.isnan().any(-1).any(-1).cpu().eq(bad).all()
        and k.isnan().all(-1).all(-1).cpu().eq(bad).all()
    )


def test_out_of_range_slots_are_not_written_in_the_kernel(device, gen):
    """With the host checks off a slot past the cache writes nothing."""
    T, H, D = 3, 2, 64
    cos_sin = rope_cache(D, 64, 1e4).to(device)
    q, k, v = (randn(T, H, D, gen=gen, dtype=torch.bfloat16, device=device) for _ in range(3))
    k_cache, v_cache = (
        torch.full((1, 4, H, D), float("nan"), device=device).bfloat16() for _ in range(2)
    )
    slots = torch.tensor([1, 4, 1000], device=device)  # 4 and 1000 lie past the 4 slots
    positions = torch.arange(T, device=device)
    with value_checks(False):
        rope_kv_cache_(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    written = ~k_cache.isnan().all(-1).all(-1)[0]
    assert written.cpu().tolist() == [False, True, False, False]


def rope_args(**kw):
    args = dict(
        q=torch.randn(5, 4, 64), k=torch.randn(5, 2, 64),
        positions=torch.arange(5), cos_sin_cache=rope_cache(64, 16, 1e4),
    )  # fmt: skip
    args.update(kw)
    return args


ROPE_BAD = [
    (rope_args(positions=torch.tensor([0, 1, 2, 3, 16])), ValueError, r"positions must lie in \[0, 16\)"),
    (rope_args(positions=torch.tensor([0, -1, 2, 3, 4])), ValueError, "positions must lie in"),
    (rope_args(positions=torch.arange(5.0)), TypeError, "positions must have dtype int32, int64"),
    (rope_args(positions=torch.arange(4)), ValueError, r"positions must be \[T\] = \[5\]"),
    (rope_args(k=torch.randn(5, 2, 64, dtype=torch.float16)), TypeError, "k must have dtype float32"),
    (rope_args(k=torch.randn(5, 2, 32)), ValueError, "T and D must match"),
    (rope_args(q=torch.randn(5, 4, 64).to(torch.int8)), TypeError, "q must have dtype"),
    (rope_args(cos_sin_cache=rope_cache(128, 16, 1e4)), ValueError, "rot_dim even, positive and <= D"),
    (rope_args(cos_sin_cache=rope_cache(64, 16, 1e4).double()), TypeError, "cos_sin_cache must have dtype float32"),
    (rope_args(q=torch.randn(5, 64, 4).transpose(1, 2)), ValueError, "q must have unit stride along D"),
    (rope_args(q="q"), TypeError, "q must be torch.Tensor"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, error, match", ROPE_BAD)
def test_rope_bad_input(kwargs, error, match):
    check_bad_input(rope_, kwargs, error, match)


def cache_args(cache_dtype=torch.bfloat16, **kw):
    args = dict(
        q=torch.randn(5, 4, 64), k=torch.randn(5, 2, 64), v=torch.randn(5, 2, 64),
        positions=torch.arange(5), cos_sin_cache=rope_cache(64, 16, 1e4),
        k_cache=torch.zeros(2, 8, 2, 64, dtype=cache_dtype),
        v_cache=torch.zeros(2, 8, 2, 64, dtype=cache_dtype), slots=torch.arange(5),
    )  # fmt: skip
    if cache_dtype == E4M3:
        args.update(k_scale=torch.ones(1), v_scale=torch.ones(1))
    args.update(kw)
    return args


CACHE_BAD = [
    (cache_args(E4M3, k_scale=None), ValueError, "an e4m3 cache needs k_scale"),
    (cache_args(k_scale=torch.ones(1)), ValueError, "k_scale applies to an e4m3 cache only"),
    (cache_args(E4M3, v_scale=torch.ones(3)), ValueError, r"v_scale must be \[Hk\] = \[2\] or one element"),
    (cache_args(slots=torch.tensor([0, 1, 2, 3, 16])), ValueError, r"slots must lie in \[-1, 16\)"),
    (cache_args(k_cache=torch.zeros(2, 8, 4, 64, dtype=torch.bfloat16)), ValueError, r"\[B, S_max, Hk, D\]"),
    (cache_args(v_cache=torch.zeros(2, 8, 2, 64, dtype=torch.float16)), TypeError, "v_cache must have dtype"),
    (cache_args(k_cache=torch.zeros(2, 8, 2, 64, dtype=torch.int8), v_cache=torch.zeros(2, 8, 2, 64, dtype=torch.int8)), TypeError, "k_cache must have dtype"),
    (cache_args(v=torch.randn(5, 2, 32)), ValueError, "v must have k's shape"),
    (cache_args(slots=torch.arange(4)), ValueError, r"slots must be \[T\]"),
    (cache_args(slots=torch.arange(5.0)), TypeError, "slots must have dtype int32, int64"),
    (cache_args(E4M3, k_scale=torch.ones(1, dtype=torch.float16)), TypeError, "k_scale must have dtype float32"),
    (cache_args(k_cache=torch.zeros(2, 8, 64, 2, dtype=torch.bfloat16).transpose(2, 3), v_cache=torch.zeros(2, 8, 64, 2, dtype=torch.bfloat16).transpose(2, 3)), ValueError, "unit stride along D"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, error, match", CACHE_BAD)
def test_rope_kv_cache_bad_input(kwargs, error, match):
    check_bad_input(rope_kv_cache_, kwargs, error, match)


@pytest.mark.parametrize(
    "args, match",
    [
        ((63, 16, 1e4), "rot_dim must be a positive even number"),
        ((64, 0, 1e4), "max_pos must be positive"),
        ((64, 16, -1.0), "theta must be positive"),
        ((64, 16, 1e4, {"rope_type": "longrope"}), "rope_type must be one of"),
        ((64, 16, 1e4, {"rope_type": "linear"}), "needs 'factor'"),
        ((64, 16, 1e4, {"rope_type": "llama3", "factor": 8.0}), "needs 'original_max_position_embeddings'"),
    ],
)  # fmt: skip
def test_rope_cache_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        rope_cache(*args)


def test_yarn_attention_factor_scales_cos_and_sin():
    scaling = SCALINGS["yarn"]
    plain = R._inv_freq(128, 1e6, scaling, MAX_POS)
    assert plain[1] == pytest.approx(0.1 * math.log(4.0) + 1.0)
    cache = rope_cache(128, 64, 1e6, scaling)
    assert torch.allclose(cache[0, :64], torch.full((64,), plain[1]))


# ---------------------------------------------------------------------------------------------
# In-place arguments own their memory; values that would make NaN/inf are refused.


def test_disjoint_views_of_one_buffer_are_rotated_once(device, gen):
    """q and k as views of a fused qkv buffer ([T, Hq + 2 Hk, D], vLLM's layout) interleave in
    memory without sharing an element: accepted, and each rotated exactly once."""
    T, HQ, HK, D = 9, 4, 2, 64
    qkv = randn(T, HQ + 2 * HK, D, gen=gen, device=device)
    q, k = qkv[:, :HQ], qkv[:, HQ : HQ + HK]
    positions = torch.randint(0, 512, (T,), generator=gen)
    cos_sin = rope_cache(D, 512, 1e4)
    want_q, want_k = rope_reference(q.cpu(), k.cpu(), positions, cos_sin)
    v_before = qkv[:, HQ + HK :].clone()
    rope_(q, k, positions.to(device), cos_sin.to(device))
    bound = lambda x, ref: rotation_bound(x, ref, cos_sin, positions, torch.float32)  # noqa: E731
    assert_within(q, want_q, bound(want_q, want_q), "q view")
    assert_within(k, want_k, bound(want_k, want_k), "k view")
    assert torch.equal(qkv[:, HQ + HK :], v_before), "v's third of the buffer is not touched"


def aliased(kind, gen):
    """rope_ arguments whose written tensors share memory."""
    T, D = 5, 64
    x = torch.randn(T, 6, D, generator=gen)
    table = rope_cache(D, 16, 1e4)
    args = dict(q=x[:, :4], k=x[:, 4:], positions=torch.arange(T), cos_sin_cache=table)
    if kind == "q expanded along T":
        args["q"] = torch.randn(1, 4, D, generator=gen).expand(T, 4, D)
    elif kind == "k expanded along H":
        args["k"] = torch.randn(T, 1, D, generator=gen).expand(T, 2, D)
    elif kind == "q is k":
        args["k"] = args["q"]
    elif kind == "q and k overlap":
        args["k"] = x[:, 3:5]
    elif kind == "k inside the table":
        args["q"] = torch.randn(T, 4, D, generator=gen)
        args["k"] = table[: T * 2].view(T, 2, D)
    return args


@pytest.mark.parametrize(
    "kind, match",
    [
        ("q expanded along T", "q is written in place but several of its elements share memory"),
        ("k expanded along H", "k is written in place but several of its elements share memory"),
        ("q is k", "q and k share memory and both are written in place"),
        ("q and k overlap", "q and k share memory and both are written in place"),
        ("k inside the table", "k and cos_sin_cache share memory and k is written in place"),
    ],
)
def test_rope_refuses_aliased_in_place_arguments(kind, match, gen):
    args = aliased(kind, gen)
    before = {n: t.clone() for n, t in args.items()}
    with pytest.raises(ValueError, match=match):
        rope_(**args)
    for n, t in args.items():
        assert torch.equal(t, before[n]), f"{n} changed before the error"


@pytest.mark.parametrize(
    "kind, match",
    [
        ("k_cache is v_cache", "k_cache and v_cache share memory and both are written"),
        ("k_cache overlaps v_cache", "k_cache and v_cache share memory"),
        ("v inside v_cache", "v_cache and v share memory and v_cache is written"),
        ("k inside k_cache", "k and k_cache share memory and both are written"),
        ("k_cache expanded", "k_cache is written in place but several of its elements share"),
        ("q is k", "q and k share memory"),
    ],
)
def test_rope_kv_cache_refuses_aliased_in_place_arguments(kind, match, gen):
    args = cache_args(
        k=torch.randn(5, 2, 64, generator=gen), v=torch.randn(5, 2, 64, generator=gen)
    )
    buf = torch.randn(4, 8, 2, 64, generator=gen).bfloat16()
    if kind == "k_cache is v_cache":
        args["v_cache"] = args["k_cache"]
    elif kind == "k_cache overlaps v_cache":
        args["k_cache"], args["v_cache"] = buf[:2], buf[1:3]
    elif kind in ("v inside v_cache", "k inside k_cache"):
        args["k_cache"], args["v_cache"] = buf[:2], buf[2:]
        args["q"], args["k"], args["v"] = (args[n].bfloat16() for n in ("q", "k", "v"))
        if kind == "v inside v_cache":
            args["v"] = args["v_cache"][1, :5]
        else:
            args["k"] = args["k_cache"][0, 2:7]
    elif kind == "k_cache expanded":
        args["k_cache"] = torch.randn(1, 8, 2, 64, generator=gen).bfloat16().expand(2, 8, 2, 64)
        args["v_cache"] = torch.randn(1, 8, 2, 64, generator=gen).bfloat16().expand(2, 8, 2, 64)
    elif kind == "q is k":
        args["q"] = args["k"]
    with pytest.raises(ValueError, match=match):
        rope_kv_cache_(**args)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (rope_args(cos_sin_cache=torch.empty(16, 0)), ValueError, "cos_sin_cache must be .* positive"),
        (rope_args(interleaved="yes"), TypeError, "interleaved must be bool; got str"),
        (rope_args(interleaved=1), TypeError, "interleaved must be bool; got int"),
    ],
)  # fmt: skip
def test_rope_table_and_flags(kwargs, error, match):
    check_bad_input(rope_, kwargs, error, match)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (cache_args(cos_sin_cache=torch.empty(16, 0)), ValueError, "cos_sin_cache must be .* positive"),
        (cache_args(interleaved="yes"), TypeError, "interleaved must be bool; got str"),
        (cache_args(E4M3, k_scale=torch.zeros(1)), ValueError, "k_scale must be positive and finite; got 0.0"),
        (cache_args(E4M3, v_scale=torch.tensor([0.1, -0.1])), ValueError, "v_scale must be positive and finite; got -0.1"),
        (cache_args(E4M3, k_scale=torch.full((), float("nan"))), ValueError, "k_scale must be positive and finite; got nan"),
        (cache_args(E4M3, v_scale=torch.full((2,), float("inf"))), ValueError, "v_scale must be positive and finite; got inf"),
    ],
)  # fmt: skip
def test_rope_kv_cache_scales_and_flags(kwargs, error, match):
    check_bad_input(rope_kv_cache_, kwargs, error, match)


def test_one_element_kv_scales_of_any_shape(device, gen):
    """k_scale / v_scale [1, 1] (as checkpoints store them) are per-tensor scales like [1]."""
    T, HQ, HK, D = 7, 4, 2, 64
    cos_sin = rope_cache(D, 64, 1e4).to(device)
    positions, slots = (
        torch.arange(T, device=device),
        torch.randperm(16, generator=gen)[:T].to(device),
    )
    outs = []
    for shape in ((1,), (1, 1)):
        q, k, v = (randn(T, h, D, gen=torch.Generator().manual_seed(1), device=device)
                   for h in (HQ, HK, HK))  # fmt: skip
        caches = [torch.full((2, 8, HK, D), E4M3_NAN_CODE, dtype=torch.uint8, device=device).view(E4M3)
                  for _ in range(2)]  # fmt: skip
        scale = torch.full(shape, 0.02, device=device)
        rope_kv_cache_(q, k, v, positions, cos_sin, *caches, slots, k_scale=scale, v_scale=scale)
        outs.append([c.view(torch.uint8) for c in caches])
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_zero_tokens(device, gen):
    """T = 0: nothing to rotate or write, on both ops."""
    q, k, v = (torch.empty(0, h, 64, device=device) for h in (4, 2, 2))
    table = rope_cache(64, 16, 1e4, device=device)
    none = torch.empty(0, dtype=torch.int64, device=device)
    assert rope_(q, k, none, table)[0].shape == (0, 4, 64)
    cache = randn(1, 4, 2, 64, gen=gen, dtype=torch.bfloat16, device=device)
    before = cache.clone()
    rope_kv_cache_(q, k, v, none, table, cache, cache.clone(), none)
    assert torch.equal(cache, before)


@pytest.mark.parametrize(
    "args, match",
    [
        ((64, 16, float("nan")), "theta must be positive and finite; got nan"),
        ((64, 16, float("inf")), "theta must be positive and finite; got inf"),
        ((64, 16, 1e4, {"rope_type": "linear", "factor": 0.0}), "'factor' must be a positive finite number; got 0.0"),
        ((64, 16, 1e4, {"rope_type": "linear", "factor": -2.0}), "'factor' must be a positive finite number"),
        ((64, 16, 1e4, {"rope_type": "linear", "factor": float("inf")}), "'factor' must be a positive finite number; got inf"),
        ((64, 16, 1e4, {"rope_type": "linear", "factor": "4"}), "'factor' must be a positive finite number; got '4'"),
        ((64, 16, 1e4, {"rope_type": "dynamic", "factor": float("nan"), "max_position_embeddings": 8}), "'factor' must be a positive finite number; got nan"),
        ((2, 16, 1e4, {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 8}), "dynamic NTK scaling needs rot_dim > 2"),
        ((64, 16, 1e4, {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": 0}), "'max_position_embeddings' must be a positive int; got 0"),
        ((64, 16, 1e4, {"rope_type": "dynamic", "factor": 2.0, "max_position_embeddings": -8}), "'max_position_embeddings' must be a positive int; got -8"),
        ((64, 16, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}), "'original_max_position_embeddings' must be a positive int; got 0"),
        ((64, 16, 1e4, {"rope_type": "yarn", "original_max_position_embeddings": 4096.0}), "'original_max_position_embeddings' must be a positive int; got 4096.0"),
        ((64, 16, 1e4, {"rope_type": "yarn", "factor": -4.0, "original_max_position_embeddings": 8}), "'factor' must be a positive finite number"),
        ((64, 16, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": -32}), "'beta_fast' must be a positive finite number; got -32"),
        ((64, 16, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_slow": float("nan")}), "'beta_slow' must be a positive finite number; got nan"),
        ((64, 16, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "attention_factor": 0.0}), "'attention_factor' must be a positive finite number; got 0.0"),
        ((64, 16, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": float("inf"), "mscale_all_dim": 1.0}), "'mscale' must be a finite number >= 0; got inf"),
        ((64, 16, 1e4, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "truncate": "no"}), "'truncate' must be a bool; got 'no'"),
        ((64, 16, 1e4, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}), "'high_freq_factor' must be greater than 'low_freq_factor'; got 4.0 and 4.0"),
        ((64, 16, 1e4, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": float("nan"), "high_freq_factor": 4.0, "original_max_position_embeddings": 8}), "'low_freq_factor' must be a positive finite number; got nan"),
        ((64, 16, 1e4, {"rope_type": "llama3", "factor": 0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}), "'factor' must be a positive finite number; got 0"),
    ],
)  # fmt: skip
def test_rope_cache_refuses_values_that_make_nan(args, match):
    with pytest.raises(ValueError, match=match):
        rope_cache(*args)


def test_value_checks_switch_is_scoped_and_restored(device, gen):
    """`value_checks(False)` turns the host checks off inside its block only, nested or not, and
    the default comes back after an exception."""
    q, k = randn(2, 2, 64, gen=gen, device=device), randn(2, 2, 64, gen=gen, device=device)
    cos_sin = rope_cache(64, 8, 1e4).to(device)
    bad = torch.tensor([0, 8], device=device)
    with value_checks(False):
        with value_checks(True), pytest.raises(ValueError, match="positions must lie in"):
            rope_(q.clone(), k.clone(), bad, cos_sin)
        rope_(q.clone(), k.clone(), bad, cos_sin)
    with pytest.raises(RuntimeError), value_checks(False):
        raise RuntimeError
    with pytest.raises(ValueError, match="positions must lie in"):
        rope_(q, k, bad, cos_sin)
    with pytest.raises(TypeError, match="enabled must be a bool"), value_checks(0):
        pass
