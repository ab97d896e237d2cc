"""decode_attention against an fp64 reference by flash-attn's rule (our error at most twice a
PyTorch version in q's half precision plus twice the fp32 reference's round-off), with split-KV
really splitting."""

import importlib

import pytest
import torch
from conftest import DEVICE
from helpers import check_bad_input, poisoned, randn

from fp8nemo import fp8
from fp8nemo.kernels import decode_attention
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


def check(q, k_cache, v_cache, lens, num_splits, config=None, **kw):
    """The launcher on a NaN-poisoned output; by default with 32-key blocks, so short caches
    split too."""
    config = config or Dm._config("t", 32, 4, 2)
    out = poisoned(q.shape, q.dtype, q.device)
    steps = Dm._launches(q, k_cache, v_cache, lens, out, kw.get("softmax_scale"), kw.get("window"),
                         kw.get("k_descale"), kw.get("v_descale"), config, num_splits)  # fmt: skip
    assert (len(steps) > 1) == (num_splits > 1), "split-KV should split (and combine)"
    for step in steps:
        step()
    cpu = [t.cpu() for t in (q, k_cache, v_cache, lens)]
    ref_kw = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    ref = Dm.decode_reference(*cpu, **ref_kw, acc_dtype=torch.float64, out_dtype=torch.float64)
    ref32 = Dm.decode_reference(*cpu, **ref_kw, out_dtype=torch.float32)
    low = Dm.decode_reference(*cpu, **ref_kw, acc_dtype=q.dtype)
    assert not out.isnan().any(), "unwritten (NaN-poisoned) elements"
    e, e_low, e_ref = ((x.double().cpu() - ref).abs().max().item() for x in (out, low, ref32))
    assert e <= 2 * e_low + 2 * e_ref, (
        f"error {e:.3g} > 2 * {e_low:.3g} (PyTorch bf16) + 2 * {e_ref:.3g} (fp32 reference)"
    )
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
    caps = [(9, 0), (8, 9)]
    if DEVICE == "cuda":
        caps = [torch.cuda.get_device_capability()] if torch.cuda.is_available() else []
    for cap in caps:
        for c in Dm.configs_for(cap):
            yield pytest.param(c, id=f"sm{cap[0]}{cap[1]}-{c.name}")


@pytest.mark.parametrize("config", list(named_configs()))
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, E4M3], ids=str)
def test_every_named_config(config, cache_dtype, device, gen):
    q, k, v, scales = make(3, 700, 8, 2, 128, cache_dtype, gen, device)
    lens = torch.tensor([700, 1, 333], dtype=torch.int32, device=device)
    check(q, k, v, lens, 3, config, window=400, **scales)


def test_strided_cache_seqlens(device, gen):
    """Lengths given as a column of a table are read through their stride."""
    q, k, v, _ = make(3, 200, 8, 2, 64, torch.bfloat16, gen, device)
    table = torch.tensor([[200, 9], [17, 9], [90, 9]], dtype=torch.int32, device=device)
    check(q, k, v, table[:, 0], 2)


def test_lengths_past_the_cache_are_clamped_in_the_kernel(device, gen):
    """Inside a CUDA graph no host check runs: a length past S_max reads the whole cache, no
    further."""
    q, k, v, _ = make(2, 64, 4, 2, 64, torch.bfloat16, gen, device)
    config = Dm._config("t", 32, 4, 2)
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
