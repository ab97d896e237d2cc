"""flash_attention against an fp64 reference, by flash-attn's rule: our error is at most twice
that of a PyTorch implementation in the same low precision (for FP8, one that also quantizes P)
plus twice the fp32 reference's own round-off.

On a Hopper GPU the FP8 dots also accumulate in the tensor core's ~14-bit accumulator within one
block (QK^T over head_dim, PV over one key block) before the fp32 accumulator takes over; that
error is far below P's e4m3 rounding, which the low-precision version carries."""

import importlib

import pytest
import torch
from conftest import DEVICE
from helpers import check_bad_input, poisoned, randn

from fp8nemo.kernels import flash_attention
from fp8nemo.kernels._triton import capability
from fp8nemo.kernels.attention import attention_reference
from fp8nemo.quant import fp8

A = importlib.import_module("fp8nemo.kernels.attention")
E4M3 = torch.float8_e4m3fn


def make_qkv(shape_q, shape_kv, dtype, gen, device, descale_shape=None):
    """Random q/k/v; e4m3 ones come with random descales of `descale_shape` (or scalars)."""
    tensors = [randn(*shape, gen=gen) for shape in (shape_q, shape_kv, shape_kv)]
    if dtype != E4M3:
        return [t.to(dtype).to(device) for t in tensors], {}
    scales = {}
    out = []
    for name, t in zip(("q", "k", "v"), tensors, strict=True):
        d = torch.rand(descale_shape or (), generator=gen) * 0.02 + 0.005
        # Values on the e4m3 grid times the descale: q ~= q_fp8 * q_descale.
        out.append(fp8.saturating_cast(t / 0.01).to(device))
        scales[f"{name}_descale"] = d.float().to(device)
    return out, scales


def run(q, k, v, config=None, **kw):
    """The launcher on NaN-poisoned out/lse buffers with `config` (default: the op's first)."""
    B = A._check_args(q, k, v, kw.get("causal", True), kw.get("softmax_scale"), kw.get("window"),
                      kw.get("cu_seqlens"), kw.get("max_seqlen"), kw.get("q_descale"),
                      kw.get("k_descale"), kw.get("v_descale"))  # fmt: skip
    out_dtype, lse_shape = A._out_shapes(q, B)
    out = poisoned(q.shape, out_dtype, q.device)
    lse = poisoned(lse_shape, torch.float32, q.device)
    config = config or A.configs_for(capability(q.device), q.shape[-1], q.dtype == E4M3)[0]
    descales = (kw.get("q_descale"), kw.get("k_descale"), kw.get("v_descale"))
    for step in A._launches(q, k, v, out, lse, kw.get("causal", True), kw.get("softmax_scale"),
                            kw.get("window"), kw.get("cu_seqlens"), kw.get("max_seqlen"),
                            descales, config):  # fmt: skip
        step()
    return out, lse


def check(q, k, v, config=None, **kw):
    """Our out and lse vs the fp64 reference, within flash-attn's rule; also the public op
    (when run with the op's own config)."""
    out, lse = run(q, k, v, config, **kw)
    ref_kw = {
        n: (t.cpu() if isinstance(t, torch.Tensor) else t)
        for n, t in kw.items()
        if n != "max_seqlen"
    }
    cpu = [t.cpu() for t in (q, k, v)]
    ref, ref_lse = attention_reference(
        *cpu, **ref_kw, quantize_p=False, acc_dtype=torch.float64, out_dtype=torch.float64
    )
    ref32, ref32_lse = attention_reference(
        *cpu, **ref_kw, quantize_p=False, out_dtype=torch.float32
    )
    if q.dtype == E4M3:  # PyTorch in fp32 that also quantizes P
        low, low_lse = attention_reference(*cpu, **ref_kw, acc_dtype=torch.float32)
    else:  # PyTorch in the inputs' half precision
        low, low_lse = attention_reference(*cpu, **ref_kw, acc_dtype=q.dtype)

    def err(x, y):
        return (x.double().cpu() - y.double()).abs().max().item()

    for name, ours, want, lowp, r32 in (
        ("out", out, ref, low, ref32),
        ("lse", lse, ref_lse, low_lse, ref32_lse),
    ):
        assert not ours.isnan().any(), f"{name}: unwritten (NaN-poisoned) elements"
        e, e_low, e_ref = err(ours, want), err(lowp, want), err(r32, want)
        assert e <= 2 * e_low + 2 * e_ref, (
            f"{name}: error {e:.3g} > 2 * {e_low:.3g} (PyTorch low precision) + 2 * {e_ref:.3g} (fp32 reference)"
        )
    if config is None:
        public = flash_attention(q, k, v, **kw, return_lse=True)
        assert torch.equal(public[0].view(torch.uint8), out.view(torch.uint8)) and torch.equal(
            public[1], lse
        )
    return out, lse


GQA = {"1:1": (4, 4), "4:1": (8, 2), "8:1": (8, 1)}


@pytest.mark.parametrize("S", [1, 17, 128, 257, 1000])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, E4M3], ids=str)
def test_sequence_lengths(S, causal, dtype, device, gen):
    B = 1 if S == 1000 else 2
    Hq, Hk = GQA["4:1"]
    (q, k, v), scales = make_qkv((B, S, Hq, 128), (B, S, Hk, 128), dtype, gen, device, (B, Hk))
    check(q, k, v, causal=causal, **scales)


@pytest.mark.parametrize("gqa", list(GQA))
@pytest.mark.parametrize("D", [64, 128, 256, 80, 192])
@pytest.mark.parametrize("dtype", [torch.float16, E4M3], ids=str)
def test_heads_and_head_dims(gqa, D, dtype, device, gen):
    Hq, Hk = GQA[gqa]
    (q, k, v), scales = make_qkv((2, 129, Hq, D), (2, 129, Hk, D), dtype, gen, device)
    check(q, k, v, causal=True, **scales)


def test_odd_group_size(device, gen):
    """Hq / Hk = 3: the group is padded to 4 rows inside, the padding never stored."""
    (q, k, v), _ = make_qkv((1, 70, 6, 64), (1, 70, 2, 64), torch.bfloat16, gen, device)
    check(q, k, v, causal=True)


@pytest.mark.parametrize("window", [1, 7, 64, 256, 5000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, E4M3], ids=str)
def test_sliding_window(window, dtype, device, gen):
    (q, k, v), scales = make_qkv((2, 300, 8, 128), (2, 300, 2, 128), dtype, gen, device)
    check(q, k, v, causal=True, window=window, **scales)


@pytest.mark.parametrize("lengths", [[1, 37, 200, 5], [300], [1, 1, 64]])
@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 16)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, E4M3], ids=str)
def test_packed_variable_lengths(lengths, causal, window, dtype, device, gen):
    T = sum(lengths)
    cu = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device
    )
    (q, k, v), scales = make_qkv((T, 8, 128), (T, 2, 128), dtype, gen, device, (len(lengths), 2))
    check(q, k, v, causal=causal, window=window, cu_seqlens=cu, max_seqlen=max(lengths), **scales)


def named_configs():
    """Every target's configs through the interpreter; on a GPU, its own target's."""
    caps = [(9, 0), (8, 9)]
    if DEVICE == "cuda":
        caps = [torch.cuda.get_device_capability()] if torch.cuda.is_available() else []
    for cap in caps:
        for fp8_path in (False, True):
            for D in (128, 256):
                for c in A.configs_for(cap, D, fp8_path):
                    yield pytest.param(
                        c,
                        D,
                        fp8_path,
                        id=f"sm{cap[0]}{cap[1]}-{c.name}-d{D}-{'fp8' if fp8_path else 'bf16'}",
                    )


@pytest.mark.parametrize("config, D, fp8_path", list(named_configs()))
def test_every_named_config(config, D, fp8_path, device, gen):
    """The kernel under each config's tile sizes: causal with a window, and packed."""
    dtype = E4M3 if fp8_path else torch.bfloat16
    (q, k, v), scales = make_qkv((2, 150, 8, D), (2, 150, 2, D), dtype, gen, device, (2, 2))
    check(q, k, v, config, causal=True, window=70, **scales)
    cu = torch.tensor([0, 1, 99, 150], dtype=torch.int32, device=device)
    (q, k, v), scales = make_qkv((150, 8, D), (150, 2, D), dtype, gen, device, (3, 2))
    check(q, k, v, config, causal=False, cu_seqlens=cu, max_seqlen=98, **scales)


def test_strided_cu_seqlens(device, gen):
    """A cu_seqlens view with a stride (a column of a table) is read through its stride."""
    table = torch.tensor([[0, 7], [5, 7], [40, 7]], dtype=torch.int32, device=device)
    (q, k, v), _ = make_qkv((40, 4, 64), (40, 2, 64), torch.bfloat16, gen, device)
    check(q, k, v, causal=True, cu_seqlens=table[:, 0], max_seqlen=35)


def test_softmax_scale(device, gen):
    (q, k, v), _ = make_qkv((1, 64, 4, 64), (1, 64, 4, 64), torch.bfloat16, gen, device)
    check(q, k, v, causal=False, softmax_scale=0.3)


def test_fp8_scalar_descales(device, gen):
    (q, k, v), scales = make_qkv((2, 100, 8, 128), (2, 100, 2, 128), E4M3, gen, device, ())
    check(q, k, v, causal=True, **scales)


def test_returns_out_alone_by_default(device, gen):
    (q, k, v), _ = make_qkv((1, 16, 4, 64), (1, 16, 4, 64), torch.bfloat16, gen, device)
    out = flash_attention(q, k, v)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape and out.dtype == q.dtype


def qkv(**kw):
    g = torch.Generator().manual_seed(0)
    args = dict(q=torch.randn(2, 8, 4, 64, generator=g).bfloat16(), k=torch.randn(2, 8, 2, 64, generator=g).bfloat16(),
                v=torch.randn(2, 8, 2, 64, generator=g).bfloat16())  # fmt: skip
    args.update(kw)
    return args


def packed(**kw):
    g = torch.Generator().manual_seed(0)
    args = dict(q=torch.randn(9, 4, 64, generator=g).bfloat16(), k=torch.randn(9, 2, 64, generator=g).bfloat16(),
                v=torch.randn(9, 2, 64, generator=g).bfloat16(), cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32),
                max_seqlen=5)  # fmt: skip
    args.update(kw)
    return args


e4m3 = torch.ones(2, 8, 2, 64).to(E4M3)
BAD_INPUTS = [
    (qkv(k=torch.randn(2, 8, 3, 64).bfloat16(), v=torch.randn(2, 8, 3, 64).bfloat16()), ValueError, "multiple of k's 3 heads"),
    (qkv(q=torch.randn(2, 8, 4, 320).bfloat16(), k=torch.randn(2, 8, 2, 320).bfloat16(), v=torch.randn(2, 8, 2, 320).bfloat16()), ValueError, "head_dim must be a multiple of 16 up to 256"),
    (qkv(q=torch.randn(2, 8, 4, 72).bfloat16(), k=torch.randn(2, 8, 2, 72).bfloat16(), v=torch.randn(2, 8, 2, 72).bfloat16()), ValueError, "head_dim must be a multiple of 16"),
    (qkv(k=torch.randn(2, 8, 2, 64).half()), TypeError, "k must have dtype bfloat16"),
    (qkv(q=torch.ones(2, 8, 4, 64).to(E4M3), k=e4m3, v=e4m3), ValueError, "needs q_descale, k_descale and v_descale"),
    (qkv(q_descale=torch.ones(())), ValueError, "q_descale applies to e4m3 input only"),
    (qkv(q=torch.ones(2, 8, 4, 64).to(E4M3), k=e4m3, v=e4m3, q_descale=torch.ones(2, 4), k_descale=torch.ones(()), v_descale=torch.ones(())), ValueError, r"q_descale must be \[B, Hk\] = \[2, 2\]"),
    (qkv(window=4, causal=False), ValueError, "needs causal=True"),
    (qkv(window=0), ValueError, "window must be >= 1"),
    (qkv(max_seqlen=8), ValueError, "max_seqlen applies to packed input"),
    (qkv(v=torch.randn(2, 7, 2, 64).bfloat16()), ValueError, "must share"),
    (qkv(q=torch.randn(2, 8, 64, 4).bfloat16().transpose(2, 3)), ValueError, "q must have unit stride along D"),
    (qkv(softmax_scale=-1.0), ValueError, "softmax_scale must be positive"),
    (qkv(q=torch.randn(16, 4, 64).bfloat16()), ValueError, r"q must be \[B, S, H, D\]"),
    (packed(cu_seqlens=torch.tensor([1, 4, 9], dtype=torch.int32)), ValueError, "cu_seqlens must start at 0"),
    (packed(cu_seqlens=torch.tensor([0, 6, 4], dtype=torch.int32)), ValueError, "never decrease"),
    (packed(cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32)), ValueError, "end at T = 9"),
    (packed(cu_seqlens=torch.tensor([0, 4, 9])), TypeError, "cu_seqlens must have dtype int32"),
    (packed(max_seqlen=4), ValueError, "max_seqlen = 4 is below the longest sequence, 5"),
    (packed(max_seqlen=None), ValueError, "needs max_seqlen"),
    (packed(), None, None),
    (qkv(causal=1), TypeError, "causal must be bool"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
def test_bad_input_is_a_clear_error(kwargs, error, match):
    check_bad_input(flash_attention, kwargs, error, match)


def test_fp8_mixed_descale_layouts(device, gen):
    """Each descale is read with its own layout: a scalar q, a [B, Hk] k and a [1] v."""
    (q, k, v), scales = make_qkv((2, 90, 8, 64), (2, 90, 2, 64), E4M3, gen, device, (2, 2))
    scales["q_descale"] = scales["q_descale"][0, 0].clone()  # 0-d
    scales["v_descale"] = scales["v_descale"][1, 1].reshape(1).clone()
    check(q, k, v, causal=True, **scales)
