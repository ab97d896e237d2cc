"""decode_attention and append_attention (T_new tokens appended to a cache, causal aligned
bottom-right) against an fp64 reference by flash-attn's rule (our error at most twice a PyTorch
version in q's half precision plus twice the fp32 reference's round-off), with split-KV really
splitting; append with T_new = 1 is decode, and appending is prefilling."""

import importlib

import pytest
import torch
from conftest import DEVICE
from helpers import assert_within, check_bad_input, poisoned, randn

from fp8nemo import fp8
from fp8nemo.kernels import append_attention, decode_attention, flash_attention, value_checks
from fp8nemo.kernels._triton import capability, num_sms

Dm = importlib.import_module("fp8nemo.kernels.decode")
E4M3 = torch.float8_e4m3fn
GQA = {"1:1": (2, 2), "4:1": (8, 2), "8:1": (8, 1)}


def make(B, S_max, Hq, Hk, D, cache_dtype, gen, device, descale_shape=None):
    q = randn(B, Hq, D, gen=gen, dtype=torch.bfloat16, device=device)
    k = randn(B, S_max, Hk, D, gen=gen)
    v = randn(B, S_max, Hk, D, gen=gen)
    if cache_dtype != E4M3:
        return q, k.to(cache_dtype).to(device), v.to(cache_dtype).to(device), {}
    shape = descale_shape if descale_shape is not None else (B, Hk)
    scales = {
        n: (torch.rand(shape, generator=gen) * 0.02 + 0.005).to(device)
        for n in ("k_descale", "v_descale")
    }
    return (
        q,
        fp8.saturating_cast(k / 0.01).to(device),
        fp8.saturating_cast(v / 0.01).to(device),
        scales,
    )


def reference(q, k_cache, v_cache, lens, **kw):
    """(fp64 reference, flash-attn's bound on an error against it: twice the error of a PyTorch
    version in q's precision plus twice the fp32 reference's), decode's for q [B, Hq, D] and
    append's for q [B, T_new, Hq, D]."""
    ref_fn = Dm.decode_reference if q.dim() == 3 else Dm.append_reference
    cpu = [t.cpu() for t in (q, k_cache, v_cache, lens)]
    ref_kw = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    ref = ref_fn(*cpu, **ref_kw, acc_dtype=torch.float64, out_dtype=torch.float64)
    ref32 = ref_fn(*cpu, **ref_kw, out_dtype=torch.float32)
    low = ref_fn(*cpu, **ref_kw, acc_dtype=q.dtype)
    seen = ref.isfinite()  # NaN where a query sees a non-finite V: the same in all three
    e_low, e_ref = ((x.double() - ref)[seen].abs().max().item() for x in (low, ref32))
    return ref, 2 * e_low + 2 * e_ref


def check(q, k_cache, v_cache, lens, num_splits, config=None, **kw):
    """The launcher on a NaN-poisoned output; by default with 32-key blocks, so short caches
    split too."""
    config = config or Dm._config("t", 64, 32, 4, 2)
    out = poisoned(q.shape, q.dtype, q.device)
    steps = Dm._launches(q, k_cache, v_cache, lens, out, kw.get("softmax_scale"), kw.get("window"),
                         kw.get("k_descale"), kw.get("v_descale"), config, num_splits)  # fmt: skip
    assert (len(steps) > 1) == (num_splits > 1), "split-KV should split (and combine)"
    for step in steps:
        step()
    ref, bound = reference(q, k_cache, v_cache, lens, **kw)
    assert not out.isnan().any(), "unwritten (NaN-poisoned) elements"
    e = (out.double().cpu() - ref).abs().max().item()
    assert e <= bound, f"error {e:.3g} > {bound:.3g} (2x PyTorch in q's dtype + 2x fp32 reference)"
    return out


@pytest.mark.parametrize("L", [1, 100, 4097])
@pytest.mark.parametrize("gqa", list(GQA))
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, E4M3], ids=str)
def test_cache_lengths(L, gqa, cache_dtype, device, gen):
    Hq, Hk = GQA[gqa]
    q, k, v, scales = make(1, L + 3, Hq, Hk, 128, cache_dtype, gen, device)
    lens = torch.tensor([L], dtype=torch.int32, device=device)
    splits = 4 if L > 100 else (2 if L > 1 else 1)
    check(q, k, v, lens, splits, **scales)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("cache_dtype", [torch.float16, E4M3], ids=str)
def test_uneven_batch_and_splits(num_splits, cache_dtype, device, gen):
    """Sequences of 0, 1, 100 and 1500 keys in one batch; splits past a short sequence's end
    are empty and the combine must ignore them."""
    q, k, v, scales = make(4, 1500, 8, 2, 64, cache_dtype, gen, device)
    if cache_dtype == torch.float16:
        q = q.half()
    lens = torch.tensor([0, 1, 100, 1500], dtype=torch.int32, device=device)
    out = check(q, k, v, lens, num_splits, **scales)
    assert (out[0] == 0).all(), "a sequence without keys attends to nothing"


@pytest.mark.parametrize("window", [1, 64, 1000, 8000])
def test_sliding_window(window, device, gen):
    q, k, v, _ = make(2, 3000, 8, 2, 128, torch.bfloat16, gen, device)
    lens = torch.tensor([3000, 700], dtype=torch.int32, device=device)
    check(q, k, v, lens, 4, window=window)


@pytest.mark.parametrize("D", [64, 256, 80])
def test_head_dims(D, device, gen):
    q, k, v, scales = make(2, 300, 4, 1, D, E4M3, gen, device, descale_shape=())
    lens = torch.tensor([300, 45], dtype=torch.int32, device=device)
    check(q, k, v, lens, 2, softmax_scale=0.2, **scales)


def test_public_op_splits_long_caches(device, gen):
    """The heuristic splits a long cache of few sequences; the op gives the launcher's result."""
    q, k, v, _ = make(1, 4100, 8, 2, 128, torch.bfloat16, gen, device)
    lens = torch.tensor([4097], dtype=torch.int32, device=device)
    splits = Dm.num_splits_for(1 * 2, 4100, num_sms(q.device))
    assert splits > 1
    out = check(q, k, v, lens, splits, Dm.configs_for(capability(q.device))[0])
    assert torch.equal(decode_attention(q, k, v, lens), out)


def named_configs():
    """(kind, config) for every named config: decode's, append's and append-64's lists."""
    caps = [(9, 0), (8, 9)]
    if DEVICE == "cuda":
        caps = [torch.cuda.get_device_capability()] if torch.cuda.is_available() else []
    for cap in caps:
        lists = Dm.HOPPER_CONFIGS if cap >= (9, 0) else Dm.ADA_CONFIGS
        for kind, configs in lists.items():
            for c in configs:
                yield pytest.param(kind, c, id=f"sm{cap[0]}{cap[1]}-{kind}-{c.name}")


@pytest.mark.parametrize("kind, config", list(named_configs()))
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, E4M3], ids=str)
def test_every_named_config(kind, config, cache_dtype, device, gen):
    if kind == "decode":
        q, k, v, scales = make(3, 700, 8, 2, 128, cache_dtype, gen, device)
        lens = torch.tensor([700, 1, 333], dtype=torch.int32, device=device)
        check(q, k, v, lens, 3, config, window=400, **scales)
        return
    # The append kinds at the T_new their lists serve: 3 tokens x 4 heads, 16 x 4.
    T = 3 if kind == "append" else 16
    q, k, v, scales, lens = make_append([0, 300, 77], T, 8, 2, 128, cache_dtype, gen, device)
    check(q, k, v, lens, 3, config, window=200, **scales)


def test_strided_cache_seqlens(device, gen):
    """Lengths given as a column of a table are read through their stride."""
    q, k, v, _ = make(3, 200, 8, 2, 64, torch.bfloat16, gen, device)
    table = torch.tensor([[200, 9], [17, 9], [90, 9]], dtype=torch.int32, device=device)
    check(q, k, v, table[:, 0], 2)


def test_lengths_past_the_cache_are_clamped_in_the_kernel(device, gen):
    """Inside a CUDA graph no host check runs: a length past S_max reads the whole cache, no
    further."""
    q, k, v, _ = make(2, 64, 4, 2, 64, torch.bfloat16, gen, device)
    config = Dm._config("t", 64, 32, 4, 2)
    outs = []
    for lens in ([64, 64], [1000, 64]):
        out = poisoned(q.shape, q.dtype, q.device)
        for step in Dm._launches(q, k, v, torch.tensor(lens, dtype=torch.int32, device=device), out,
                                 None, None, None, None, config, 2):  # fmt: skip
            step()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


def test_split_heuristic():
    assert Dm.num_splits_for(16 * 8, 131072, 132) == 3  # 2 waves over 132 SMs: 264 / 128 programs
    assert Dm.num_splits_for(1 * 8, 131072, 132) == 33
    assert Dm.num_splits_for(1 * 8, 1024, 132) == 4  # at least 256 keys per split
    assert Dm.num_splits_for(256 * 8, 4096, 132) == 1
    assert Dm.num_splits_for(1, 100, 132) == 1


def args(**kw):
    g = torch.Generator().manual_seed(0)
    a = dict(q=torch.randn(2, 8, 64, generator=g).bfloat16(), k_cache=torch.randn(2, 32, 2, 64, generator=g).bfloat16(),
             v_cache=torch.randn(2, 32, 2, 64, generator=g).bfloat16(), cache_seqlens=torch.tensor([5, 32], dtype=torch.int32))  # fmt: skip
    a.update(kw)
    return a


fp8_cache = torch.ones(2, 32, 2, 64).to(E4M3)
BAD_INPUTS = [
    (args(k_cache=torch.randn(2, 32, 3, 64).bfloat16(), v_cache=torch.randn(2, 32, 3, 64).bfloat16()), ValueError, "multiple of the cache's 3 heads"),
    (args(q=torch.randn(2, 8, 320).bfloat16(), k_cache=torch.randn(2, 32, 2, 320).bfloat16(), v_cache=torch.randn(2, 32, 2, 320).bfloat16()), ValueError, "head_dim must be a multiple of 16 up to 256"),
    (args(k_cache=torch.randn(2, 32, 2, 64).half(), v_cache=torch.randn(2, 32, 2, 64).half()), TypeError, "k_cache must have dtype bfloat16, float8_e4m3fn"),
    (args(k_cache=fp8_cache, v_cache=fp8_cache), ValueError, "needs k_descale and v_descale"),
    (args(k_descale=torch.ones(())), ValueError, "k_descale applies to an e4m3 cache only"),
    (args(k_cache=fp8_cache, v_cache=fp8_cache, k_descale=torch.ones(2, 3), v_descale=torch.ones(())), ValueError, r"k_descale must be \[B, Hk\] = \[2, 2\]"),
    (args(cache_seqlens=torch.tensor([5, 33], dtype=torch.int32)), ValueError, r"cache_seqlens must lie in \[0, 33\)"),
    (args(cache_seqlens=torch.tensor([5, 32])), TypeError, "cache_seqlens must have dtype int32"),
    (args(cache_seqlens=torch.tensor([5], dtype=torch.int32)), ValueError, r"cache_seqlens must be \[B\] = \[2\]"),
    (args(v_cache=torch.randn(2, 31, 2, 64).bfloat16()), ValueError, "v_cache must have k_cache's shape"),
    (args(window=0), ValueError, "window must be >= 1"),
    (args(q=torch.randn(2, 64, 8).bfloat16().transpose(1, 2)), ValueError, "q must have unit stride along D"),
    (args(q=torch.randn(2, 8, 64).to(E4M3)), TypeError, "q must have dtype float16, bfloat16"),
    (args(q="q"), TypeError, "q must be torch.Tensor"),
    (args(cache_seqlens=torch.tensor([5.0, 32.0])), TypeError, "cache_seqlens must have dtype int32"),
    (args(k_cache=torch.randn(2, 32, 64, 2).bfloat16().transpose(2, 3), v_cache=torch.randn(2, 32, 2, 64).bfloat16()), ValueError, "k_cache must have unit stride along D"),
    (args(k_cache=fp8_cache, v_cache=fp8_cache, k_descale=torch.ones((), dtype=torch.float64), v_descale=torch.ones(())), TypeError, "k_descale must have dtype float32"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
def test_bad_input_is_a_clear_error(kwargs, error, match):
    check_bad_input(decode_attention, kwargs, error, match)


def test_fp8_mixed_descale_layouts(device, gen):
    """k_descale [B, Hk] and a scalar v_descale, each read with its own layout."""
    q, k, v, scales = make(2, 300, 8, 2, 128, E4M3, gen, device)
    scales["v_descale"] = scales["v_descale"][1, 0].clone()
    lens = torch.tensor([300, 150], dtype=torch.int32, device=device)
    check(q, k, v, lens, 3, **scales)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, E4M3], ids=str)
def test_empty_cache_gives_zeros(cache_dtype, device, gen):
    """S_max = 0 (every length 0): nothing to attend to, so zeros, as the kernel gives a
    sequence without keys; an empty batch gives an empty output."""
    q, k, v, scales = make(3, 0, 8, 2, 64, cache_dtype, gen, device)
    lens = torch.zeros(3, dtype=torch.int32, device=device)
    out = decode_attention(q, k, v, lens, **scales)
    assert out.shape == q.shape and out.dtype == q.dtype and (out == 0).all()
    q, k, v, scales = make(3, 40, 8, 2, 64, cache_dtype, gen, device)
    assert torch.equal(decode_attention(q, k, v, lens, **scales), out), "as with all lengths 0"
    q, k, v, scales = make(0, 40, 8, 2, 64, cache_dtype, gen, device)
    out = decode_attention(q, k, v, torch.zeros(0, dtype=torch.int32, device=device), **scales)
    assert out.shape == (0, 8, 64)


def test_one_element_descales_of_any_shape(device, gen):
    """[1, 1] descales (as checkpoints store them) are per-tensor descales like []."""
    q, k, v, scales = make(2, 300, 8, 2, 128, E4M3, gen, device, descale_shape=())
    lens = torch.tensor([300, 150], dtype=torch.int32, device=device)
    want = check(q, k, v, lens, 3, **scales)
    wide = {n: t.reshape(1, 1) for n, t in scales.items()}
    assert torch.equal(check(q, k, v, lens, 3, **wide), want)
    assert torch.equal(
        decode_attention(q, k, v, lens, **wide), decode_attention(q, k, v, lens, **scales)
    )


def fp8_args(**kw):
    descales = {"k_descale": torch.full((2, 2), 0.01), "v_descale": torch.full((), 0.01)}
    return args(k_cache=fp8_cache, v_cache=fp8_cache, **{**descales, **kw})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (args(softmax_scale=float("inf")), ValueError, "softmax_scale must be positive and finite; got inf"),
        (args(softmax_scale=float("nan")), ValueError, "softmax_scale must be positive and finite; got nan"),
        (fp8_args(k_descale=torch.zeros(2, 2)), ValueError, "k_descale must be positive and finite; got 0.0"),
        (fp8_args(v_descale=torch.full((), -1.0)), ValueError, "v_descale must be positive and finite; got -1.0"),
        (fp8_args(k_descale=torch.tensor([[0.1, 0.1], [float("nan"), 0.1]])), ValueError, "k_descale must be positive and finite; got nan"),
        (fp8_args(v_descale=torch.full((1, 1), float("inf"))), ValueError, "v_descale must be positive and finite; got inf"),
        (fp8_args(k_descale=torch.full((1, 1), 0.01)), None, None),
        (args(window=True), TypeError, "window must be int or None; got bool"),
        (args(softmax_scale=True), TypeError, "softmax_scale must be float or int or None; got bool"),
    ],
)  # fmt: skip
def test_values_that_make_nan_are_refused(kwargs, error, match):
    check_bad_input(decode_attention, kwargs, error, match)


# --- append_attention -------------------------------------------------------------------------

APPEND_DTYPES = {"fp16": (torch.float16, torch.float16), "bf16": (torch.bfloat16, torch.bfloat16),
                 "e4m3": (torch.bfloat16, E4M3)}  # fmt: skip


def make_append(lens, T, Hq, Hk, D, cache_dtype, gen, device, q_dtype=torch.bfloat16, slack=5,
                pow2_descales=False):  # fmt: skip
    """q [B, T, Hq, D] and a cache holding lens[b] + T keys per sequence (the new tokens' at
    [lens[b], lens[b] + T)), every slot past them NaN: they must not matter. An e4m3 cache gets
    [B, Hk] descales, powers of two with `pow2_descales` (so dequantizing to bf16 is exact)."""
    B, S_max = len(lens), max(lens) + T + slack
    q = randn(B, T, Hq, D, gen=gen, dtype=q_dtype, device=device)
    k, v = randn(B, S_max, Hk, D, gen=gen), randn(B, S_max, Hk, D, gen=gen)
    for b, n in enumerate(lens):
        k[b, n + T :], v[b, n + T :] = float("nan"), float("nan")
    lens = torch.tensor(lens, dtype=torch.int32, device=device)
    if cache_dtype != E4M3:
        return q, k.to(cache_dtype).to(device), v.to(cache_dtype).to(device), {}, lens
    if pow2_descales:
        draw = lambda: 2.0 ** -torch.randint(6, 9, (B, Hk), generator=gen).float()  # noqa: E731
    else:
        draw = lambda: torch.rand(B, Hk, generator=gen) * 0.02 + 0.005  # noqa: E731
    scales = {"k_descale": draw().to(device), "v_descale": draw().to(device)}
    codes = [fp8.saturating_cast(x / 0.01).to(device) for x in (k, v)]
    return q, *codes, scales, lens


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("D", [64, 128, 80])
@pytest.mark.parametrize("T", [1, 3, 16, 33])
@pytest.mark.parametrize("G", [1, 4, 3])
@pytest.mark.parametrize("kind", list(APPEND_DTYPES))
def test_append(kind, G, T, D, window, device, gen):
    """Ragged caches (one empty: appending is prefilling), split in two; rows tiled by 64, so
    33 tokens x 3 or 4 heads take two or three tiles, with a token's heads across a tile edge.
    One KV head (the interpreter pays per program) but two where G = 1."""
    q_dtype, cache_dtype = APPEND_DTYPES[kind]
    lens = [0, *(int(torch.randint(lo, lo + 40, (), generator=gen)) for lo in (1, 41))]
    Hk = 2 if G == 1 else 1
    q, k, v, scales, lens = make_append(lens, T, G * Hk, Hk, D, cache_dtype, gen, device, q_dtype)
    check(q, k, v, lens, 2, window=window, **scales)


@pytest.mark.parametrize("window", [None, 3, 40])
@pytest.mark.parametrize("kind", list(APPEND_DTYPES))
def test_append_t1_is_decode_bit_for_bit(kind, window, device, gen):
    q_dtype, cache_dtype = APPEND_DTYPES[kind]
    q, k, v, scales, lens = make_append(
        [0, 7, 600], 1, 8, 2, 128, cache_dtype, gen, device, q_dtype
    )
    splits = Dm.num_splits_for(3 * 2, k.shape[1], num_sms(q.device))
    assert splits > 1, "the public op splits this cache (and combines)"
    out = append_attention(q, k, v, lens, window=window, **scales)
    want = decode_attention(q[:, 0], k, v, lens + 1, window=window, **scales)
    assert out.shape == q.shape and torch.equal(out[:, 0], want)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("kind", list(APPEND_DTYPES))
def test_append_equals_prefill(kind, window, device, gen):
    """T_new tokens appended after L cached ones attend as the last T_new queries of a causal
    prefill over all L + T_new (flash_attention, packed). Each is within flash-attn's bound B of
    the fp64 reference, so they differ by at most 2B. An e4m3 cache takes power-of-two descales:
    its keys dequantize to bf16 exactly, the prefill's input."""
    q_dtype, cache_dtype = APPEND_DTYPES[kind]
    T, Hq, Hk, D = 7, 6, 2, 64
    q, k, v, scales, lens = make_append([0, 20, 83], T, Hq, Hk, D, cache_dtype, gen, device,
                                        q_dtype, pow2_descales=True)  # fmt: skip
    out = append_attention(q, k, v, lens, window=window, **scales)
    _, bound = reference(q, k, v, lens, window=window, **scales)
    ends = (lens + T).tolist()
    qs, ks, vs = [], [], []
    for b, end in enumerate(ends):
        kb, vb = k[b, :end], v[b, :end]
        if cache_dtype == E4M3:
            kb = (kb.float() * scales["k_descale"][b][:, None]).to(q_dtype)
            vb = (vb.float() * scales["v_descale"][b][:, None]).to(q_dtype)
        earlier = randn(end - T, Hq, D, gen=gen, dtype=q_dtype, device=device)
        qs.append(torch.cat([earlier, q[b]]))
        ks.append(kb)
        vs.append(vb)
    cu = torch.tensor([0, *torch.tensor(ends).cumsum(0).tolist()], dtype=torch.int32, device=device)
    prefill = flash_attention(torch.cat(qs), torch.cat(ks), torch.cat(vs), cu_seqlens=cu,
                              max_seqlen=max(ends), window=window)  # fmt: skip
    last = torch.stack([prefill[cu[b + 1] - T : cu[b + 1]] for b in range(len(ends))])
    e = (out.double() - last.double()).abs().max().item()
    assert e <= 2 * bound, f"append and prefill differ by {e:.3g} > 2 * {bound:.3g}"


@pytest.mark.parametrize("rows_per_tile", [16, 32])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_append_row_tiles_and_splits(rows_per_tile, num_splits, device, gen):
    """Small row tiles (a token's 3 heads across tile edges), unsplit and split caches."""
    q, k, v, _, lens = make_append([50, 0, 130], 16, 6, 2, 64, torch.bfloat16, gen, device)
    check(q, k, v, lens, num_splits, Dm._config("t", rows_per_tile, 32, 4, 2), window=70)


@pytest.mark.parametrize("window", [None, 40])
def test_append_many_tokens(window, device, gen):
    """T_new = 128 (a prefill chunk): two 64-row tiles per KV head for G = 1, thirty-two
    32-row tiles for G = 8."""
    q, k, v, _, lens = make_append([0, 61], 128, 2, 2, 64, torch.bfloat16, gen, device)
    check(q, k, v, lens, 2, window=window)
    q, k, v, scales, lens = make_append([9], 128, 8, 1, 64, E4M3, gen, device)
    check(q, k, v, lens, 1, Dm._config("t", 32, 64, 4, 2), window=window, **scales)


# The interpreter's numpy dot meets the NaN on purpose.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("kind", ["bf16", "e4m3"])
def test_append_nonfinite_v_counts_only_where_seen(kind, device, gen):
    """NaN and inf in V at new tokens (hidden from the earlier new tokens: causality) and at
    keys that the window hides from the later ones: each makes NaN exactly in the columns of
    the queries that see it, as the reference does, and nothing elsewhere."""
    q_dtype, cache_dtype = APPEND_DTYPES[kind]
    T = 12
    q, k, v, scales, lens = make_append([30, 0], T, 8, 2, 64, cache_dtype, gen, device)
    bad = float("nan") if cache_dtype == E4M3 else float("inf")  # e4m3 has no inf
    for b, pos, col in ((0, 30 + 5, 3), (0, 27, 10), (1, 8, 0), (1, 2, 63)):
        v[b, pos, 1, col] = bad
    for num_splits in (1, 2):
        out = poisoned(q.shape, q.dtype, q.device)
        for step in Dm._launches(q, k, v, lens, out, None, 9, scales.get("k_descale"),
                                 scales.get("v_descale"), Dm._config("t", 64, 32, 4, 2),
                                 num_splits):  # fmt: skip
            step()
        ref, bound = reference(q, k, v, lens, window=9, **scales)
        assert ref.isnan().any() and (~ref.isnan()).any(), "both kinds of rows are exercised"
        assert_within(out, ref, torch.tensor(bound), f"non-finite V, {num_splits} split(s)")


def test_append_lengths_past_the_cache_are_clamped_in_the_kernel(device, gen):
    """With no host check (a CUDA graph), cache_seqlens + T_new past S_max reads the cache up to
    its end and no further: as if the new tokens were its last T_new."""
    q, k, v, _, lens = make_append([40, 10], 8, 4, 2, 64, torch.bfloat16, gen, device, slack=0)
    S_max = k.shape[1]
    outs = []
    for n in (S_max - 8, 1000):
        lens_n = torch.tensor([n, 10], dtype=torch.int32, device=device)
        out = poisoned(q.shape, q.dtype, q.device)
        for step in Dm._launches(q, k, v, lens_n, out, None, None, None, None,
                                 Dm._config("t", 64, 32, 4, 2), 2):  # fmt: skip
            step()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    with value_checks(False):
        unchecked = append_attention(
            q, k, v, torch.tensor([1000, 10], dtype=torch.int32, device=device)
        )
    assert not unchecked.isnan().any()


def test_append_zero_size(device, gen):
    q, k, v, _, lens = make_append([3, 5], 2, 4, 2, 64, torch.bfloat16, gen, device)
    for empty in (q[:, :0], q[:0]):
        out = append_attention(
            empty, k[: empty.shape[0]], v[: empty.shape[0]], lens[: empty.shape[0]]
        )
        assert out.shape == empty.shape and out.dtype == q.dtype


def append_args(**kw):
    g = torch.Generator().manual_seed(0)
    a = dict(q=torch.randn(2, 3, 8, 64, generator=g).bfloat16(), k_cache=torch.randn(2, 32, 2, 64, generator=g).bfloat16(),
             v_cache=torch.randn(2, 32, 2, 64, generator=g).bfloat16(), cache_seqlens=torch.tensor([5, 29], dtype=torch.int32))  # fmt: skip
    a.update(kw)
    return a


APPEND_BAD_INPUTS = [
    (append_args(cache_seqlens=torch.tensor([5, 30], dtype=torch.int32)), ValueError, r"cache_seqlens must lie in \[0, 30\) \(keys cached before the T_new = 3 new ones"),
    (append_args(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, r"cache_seqlens must lie in \[0, 30\)"),
    (append_args(q=torch.randn(2, 33, 8, 64).bfloat16()), ValueError, "T_new = 33 new tokens cannot fit in a cache of S_max = 32"),
    (append_args(q=torch.randn(2, 8, 64).bfloat16()), ValueError, r"q must be 4-D; got shape \[2, 8, 64\]"),
    (append_args(q=torch.randn(2, 3, 8, 64)), TypeError, "q must have dtype float16, bfloat16; got torch.float32"),
    (append_args(q=torch.randn(2, 3, 8, 64).to(E4M3)), TypeError, "q must have dtype float16, bfloat16"),
    (append_args(q=torch.randn(3, 3, 8, 64).bfloat16()), ValueError, r"k_cache must be \[B, S_max, Hk, D\] with B = 3 and D = 64 from q \[B, T_new, Hq, D\]"),
    (append_args(q=torch.randn(2, 3, 8, 128).bfloat16()), ValueError, "with B = 2 and D = 128"),
    (append_args(q=torch.randn(2, 3, 9, 64).bfloat16()), ValueError, "q's 9 heads must be a multiple of the cache's 2 heads"),
    (append_args(q=torch.randn(2, 3, 64, 8).bfloat16().transpose(2, 3)), ValueError, "q must have unit stride along D"),
    (append_args(k_cache=torch.randn(2, 32, 2, 64).half(), v_cache=torch.randn(2, 32, 2, 64).half()), TypeError, "k_cache must have dtype bfloat16, float8_e4m3fn"),
    (append_args(k_cache=torch.randn(32, 2, 64).bfloat16()), ValueError, "k_cache must be 4-D"),
    (append_args(v_cache=torch.randn(2, 31, 2, 64).bfloat16()), ValueError, "v_cache must have k_cache's shape"),
    (append_args(cache_seqlens=torch.tensor([5, 29])), TypeError, "cache_seqlens must have dtype int32"),
    (append_args(cache_seqlens=torch.tensor([[5, 29]], dtype=torch.int32)), ValueError, "cache_seqlens must be 1-D"),
    (append_args(cache_seqlens=torch.tensor([5], dtype=torch.int32)), ValueError, r"cache_seqlens must be \[B\] = \[2\]"),
    (append_args(k_cache=fp8_cache, v_cache=fp8_cache), ValueError, "needs k_descale and v_descale"),
    (append_args(k_descale=torch.ones(())), ValueError, "k_descale applies to an e4m3 cache only"),
    (append_args(k_cache=fp8_cache, v_cache=fp8_cache, k_descale=torch.ones(2, 3), v_descale=torch.ones(())), ValueError, r"k_descale must be \[B, Hk\] = \[2, 2\] or one element"),
    (append_args(k_cache=fp8_cache, v_cache=fp8_cache, k_descale=torch.ones(()), v_descale=torch.ones(2)), ValueError, r"v_descale must be \[B, Hk\] = \[2, 2\] or one element"),
    (append_args(k_cache=fp8_cache, v_cache=fp8_cache, k_descale=torch.zeros(2, 2), v_descale=torch.ones(())), ValueError, "k_descale must be positive and finite; got 0.0"),
    (append_args(window=0), ValueError, "window must be >= 1"),
    (append_args(window=True), TypeError, "window must be int or None; got bool"),
    (append_args(softmax_scale=float("nan")), ValueError, "softmax_scale must be positive and finite; got nan"),
    (append_args(q="q"), TypeError, "q must be torch.Tensor"),
    (append_args(k_descale=torch.ones(()), k_cache=fp8_cache, v_cache=fp8_cache, v_descale=torch.ones(()), window=4), None, None),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, error, match", APPEND_BAD_INPUTS)
def test_append_bad_input_is_a_clear_error(kwargs, error, match):
    check_bad_input(append_attention, kwargs, error, match)


def test_append_range_check_follows_value_checks(gen):
    """Inside value_checks(False) the lengths are not read on the host (the kernel clamps)."""
    with value_checks(False):
        append_attention(**append_args(cache_seqlens=torch.tensor([5, 31], dtype=torch.int32)))
