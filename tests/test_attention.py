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

from fp8nemo import fp8
from fp8nemo.kernels import flash_attention, v_key_major
from fp8nemo.kernels._triton import capability
from fp8nemo.kernels.attention import attention_reference

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
    """The kernel under each config's tile sizes: causal with a window, and packed; FP8 also
    with a key-major V."""
    dtype = E4M3 if fp8_path else torch.bfloat16
    layouts = (lambda v: v, v_key_major) if fp8_path else (lambda v: v,)
    (q, k, v), scales = make_qkv((2, 150, 8, D), (2, 150, 2, D), dtype, gen, device, (2, 2))
    for layout in layouts:
        check(q, k, layout(v), config, causal=True, window=70, **scales)
    cu = torch.tensor([0, 1, 99, 150], dtype=torch.int32, device=device)
    (q, k, v), scales = make_qkv((150, 8, D), (150, 2, D), dtype, gen, device, (3, 2))
    for layout in layouts:
        check(q, k, layout(v), config, causal=False, cu_seqlens=cu, max_seqlen=98, **scales)


KEY_MAJOR_CASES = {
    "causal": dict(shape=(2, 150, 8, 2, 128), causal=True),
    "not causal, S % 16 = 13": dict(shape=(2, 141, 8, 2, 128), causal=False),
    "MQA 8:1, D=64": dict(shape=(1, 200, 8, 1, 64), causal=True),
    "1:1, D=256": dict(shape=(1, 70, 2, 2, 256), causal=True),
    "window 37": dict(shape=(1, 300, 8, 2, 64), causal=True, window=37),
    # first keys at tokens 0, 1, 38 (off the 16-token grid), 238 and 243; T = 257
    "packed causal": dict(lengths=[1, 37, 200, 5, 14], causal=True),
    "packed not causal": dict(lengths=[1, 37, 200, 5, 14], causal=False),
    "packed window 16": dict(lengths=[3, 61, 120], causal=True, window=16),
}


@pytest.mark.parametrize("case", list(KEY_MAJOR_CASES))
def test_fp8_key_major_v(case, device, gen):
    """An e4m3 V in key-major memory (v_key_major: keys contiguous, as Hopper's FP8 MMA reads
    P @ V's V) gives the result the D-contiguous V gives, within flash-attn's rule of the
    reference, for every kind of call: both layouts are checked on the same fresh inputs.
    Packed, the key tiles start on the 16-token grid before each sequence (so they round P
    differently); otherwise they are the same tiles and the results the same bits."""
    kw = dict(KEY_MAJOR_CASES[case])
    if "lengths" in kw:
        lengths = kw.pop("lengths")
        T = sum(lengths)
        bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        kw |= dict(cu_seqlens=torch.tensor(bounds, dtype=torch.int32, device=device),
                   max_seqlen=max(lengths))  # fmt: skip
        shape_q, shape_kv, descale_shape = (T, 8, 64), (T, 2, 64), (len(lengths), 2)
    else:
        B, S, Hq, Hk, D = kw.pop("shape")
        shape_q, shape_kv, descale_shape = (B, S, Hq, D), (B, S, Hk, D), (B, Hk)
    (q, k, v), scales = make_qkv(shape_q, shape_kv, E4M3, gen, device, descale_shape)
    v_km = v_key_major(v)
    assert (
        v_km.stride(-3) == 1
        and v_km.stride(-1) % 16 == 0
        and torch.equal(v_km.view(torch.uint8), v.view(torch.uint8))
    )
    out, lse = check(q, k, v, **kw, **scales)
    out_km, lse_km = check(q, k, v_km, **kw, **scales)
    if "cu_seqlens" not in kw:  # the same key tiles of the same values: the same bits
        assert torch.equal(out_km.view(torch.uint8), out.view(torch.uint8))
        assert torch.equal(lse_km, lse)


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


def fp8_qkv(**kw):
    descales = {n: torch.full((), 0.01) for n in ("q_descale", "k_descale", "v_descale")}
    return qkv(**{"q": torch.ones(2, 8, 4, 64).to(E4M3), "k": e4m3, "v": e4m3, **descales, **kw})


BAD_INPUTS += [
    # V with neither D nor its keys contiguous
    (fp8_qkv(v=torch.ones(2, 8, 2, 128).to(E4M3)[..., ::2]), ValueError, r"v must have unit stride along D, or along keys .* got strides \[2048, 256, 128, 2\]"),
    # key-major, but 8 keys in storage that ends there: the kernel reads 16
    (fp8_qkv(v=torch.ones(2, 2, 64, 8).to(E4M3).permute(0, 3, 1, 2)), ValueError, "v is key-major with 8 keys, read in groups of 16: its storage must hold 8 more"),
    (fp8_qkv(v=v_key_major(e4m3)), None, None),
    (packed(q=torch.ones(9, 4, 64).to(E4M3), k=torch.ones(9, 2, 64).to(E4M3), v=v_key_major(torch.ones(9, 2, 64).to(E4M3)),
            q_descale=torch.full((), 0.01), k_descale=torch.full((), 0.01), v_descale=torch.full((), 0.01)), None, None),
    # key-major is for e4m3 V only
    (qkv(v=v_key_major(torch.randn(2, 8, 2, 64).bfloat16())), ValueError, "v must have unit stride along D; got strides"),
]  # fmt: skip


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
def test_bad_input_is_a_clear_error(kwargs, error, match):
    check_bad_input(flash_attention, kwargs, error, match)


def test_v_key_major_takes_v_shapes():
    with pytest.raises(
        ValueError, match=r"v must be \[B, S, Hk, D\] or packed \[T, Hk, D\]; got shape \[8, 64\]"
    ):
        v_key_major(torch.ones(8, 64).to(E4M3))
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        v_key_major([1.0])


def test_fp8_mixed_descale_layouts(device, gen):
    """Each descale is read with its own layout: a scalar q, a [B, Hk] k and a [1] v."""
    (q, k, v), scales = make_qkv((2, 90, 8, 64), (2, 90, 2, 64), E4M3, gen, device, (2, 2))
    scales["q_descale"] = scales["q_descale"][0, 0].clone()  # 0-d
    scales["v_descale"] = scales["v_descale"][1, 1].reshape(1).clone()
    check(q, k, v, causal=True, **scales)


# ---------------------------------------------------------------------------------------------
# Hidden keys count for nothing, whatever their K and V hold; visible non-finite V propagates.


def visible_only_reference(q, k, v, causal=True, window=None, cu_seqlens=None, softmax_scale=None,
                           q_descale=None, k_descale=None, v_descale=None):  # fmt: skip
    """fp64 attention built row by row from the keys each query sees, and only those: a hidden
    key's K and V never enter the arithmetic. Returns out [like q] fp64."""
    packed = cu_seqlens is not None
    if not packed:
        B, S = q.shape[:2]
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
        cu_seqlens = torch.arange(B + 1) * S
    cu = cu_seqlens.tolist()
    Hq, Hk, D = q.shape[1], k.shape[1], q.shape[2]
    G = Hq // Hk
    scale = softmax_scale if softmax_scale is not None else D**-0.5
    out = torch.full(q.shape, float("nan"), dtype=torch.float64)
    for b in range(len(cu) - 1):
        for h in range(Hq):
            kvh = h // G
            factors = [1.0, 1.0, 1.0]
            if q.dtype == E4M3:
                factors = [A.expand_descale(d, b, Hk)[kvh].item()
                           for d in (q_descale, k_descale, v_descale)]  # fmt: skip
            for i in range(cu[b + 1] - cu[b]):
                keys = torch.arange(i + 1 if causal else cu[b + 1] - cu[b])
                if window is not None:
                    keys = keys[keys > i - window]
                rows = cu[b] + keys
                qi = q[cu[b] + i, h].double() * factors[0]
                s = (k[rows, kvh].double() * factors[1]) @ qi * scale
                out[cu[b] + i, h] = torch.softmax(s, 0) @ (v[rows, kvh].double() * factors[2])
    return out.unflatten(0, (B, S)) if not packed else out


def check_nonfinite(q, k, v, clean, **kw):
    """q, k, v hold NaN/inf; `clean` is (k, v) with finite values everywhere the garbage is.
    Kernel (launcher and op) and torch path against the visible-only fp64 reference: NaN at
    the same places, the rest within flash-attn's rule (bounds from the clean inputs, where
    the garbage is hidden the same problem)."""
    out, lse = run(q, k, v, **kw)
    ref_kw = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()
              if n != "max_seqlen"}  # fmt: skip
    cpu = [t.cpu() for t in (q, k, v)]
    want = visible_only_reference(*cpu, **ref_kw)
    _, want_lse = attention_reference(*cpu, **ref_kw, quantize_p=False, acc_dtype=torch.float64)
    torch_path, torch_lse = attention_reference(*cpu, **ref_kw)
    ref32, ref32_lse = attention_reference(
        *cpu, **ref_kw, quantize_p=False, out_dtype=torch.float32
    )
    low, low_lse = attention_reference(
        *cpu, **ref_kw, acc_dtype=torch.float32 if q.dtype == E4M3 else q.dtype
    )
    nan = ~want.isfinite()  # NaN, or inf where the math has one (NaN is fine there)
    assert nan.any(), "the test means some visible NaN"
    for name, x, y in (("kernel", out, lse), ("torch path", torch_path, torch_lse),
                       ("fp32 reference", ref32, ref32_lse)):  # fmt: skip
        bad = ~x.cpu().isfinite() != nan
        assert not bad.any(), f"{name}: non-finite at {bad.nonzero()[:5].tolist()} unlike the math"
        assert torch.equal(y.cpu().isnan(), want_lse.isnan()), (
            f"{name}: lse NaN (K) unlike the math"
        )

    def err(x, y):
        return (x.double().cpu() - y).nan_to_num().abs().max().item()

    for ours, ref, lowp, r32 in ((out, want, low, ref32), (lse, want_lse, low_lse, ref32_lse)):
        assert err(ours, ref) <= 2 * err(lowp, ref) + 2 * err(r32, ref)
    public = flash_attention(q, k, v, **kw)
    assert torch.equal(public.view(torch.uint8), out.view(torch.uint8))
    if clean is not None:  # hidden garbage only: the torch path gives exactly the clean answer
        torch_clean, lse_clean = attention_reference(cpu[0], *(t.cpu() for t in clean), **ref_kw)
        finite = ~nan
        assert torch.equal(torch_path[finite], torch_clean[finite])
        seen_fine = want_lse.isfinite()
        assert torch.equal(torch_lse[seen_fine], lse_clean[seen_fine].float())
    return out


def with_garbage(t, positions, dtype, value):
    """A copy of t with `value` (NaN or inf; e4m3 has NaN only) at `positions` (index tuples)."""
    t = t.clone()
    for index in positions:
        if dtype == E4M3:
            t.view(torch.uint8)[index] = E4M3_NAN
        else:
            t[index] = value
    return t


E4M3_NAN = 0x7F


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, E4M3], ids=str)
def test_nonfinite_v_and_k_at_causally_hidden_keys(dtype, device, gen):
    """NaN/inf at keys after some queries of the same block: those queries stay finite, the
    later ones that see the key get NaN in its columns only (one element, one column)."""
    (q, k, v), scales = make_qkv((2, 150, 8, 64), (2, 150, 2, 64), dtype, gen, device, (2, 2))
    v_bad = with_garbage(v, [(0, 100), (1, 140, 1, 5)], dtype, float("nan"))
    v_bad = with_garbage(v_bad, [(0, 90, 0, 3)], dtype, float("inf"))
    k_bad = with_garbage(k, [(0, 120), (1, 70, 0)], dtype, float("nan"))
    k_bad = with_garbage(k_bad, [(0, 110, 1)], dtype, -float("inf"))
    # K garbage at keys the queries before them do not see; V garbage seen from 90 / 100 / 140 on
    out = check_nonfinite(q, k, v_bad, None, causal=True, **scales)
    assert out[0, :90].isfinite().all() and out[1, :140].isfinite().all()
    assert out[1, 140:, 4:6, 5].isnan().all() and out[1, 140:, :, :5].isfinite().all()
    # K garbage only: the torch path is bit for bit as without it wherever it is hidden
    (q2, k2, v2), scales = make_qkv((2, 150, 8, 64), (2, 150, 2, 64), dtype, gen, device, (2, 2))
    k_bad = with_garbage(k2, [(0, 110), (1, 70, 1)], dtype, float("nan"))
    out = check_nonfinite(q2, k_bad, v2, (k2, v2), causal=True, **scales)
    assert out[0, :110].isfinite().all() and out[1, :70].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, E4M3], ids=str)
def test_nonfinite_before_the_sliding_window(dtype, device, gen):
    """Keys before a query's window: NaN/inf there reach only the queries whose window holds
    them; later queries, the same block's included, stay finite and right."""
    (q, k, v), scales = make_qkv((1, 300, 8, 64), (1, 300, 2, 64), dtype, gen, device, (1, 2))
    v_bad = with_garbage(v, [(0, 10), (0, 40, 1, 7)], dtype, float("nan"))
    v_bad = with_garbage(v_bad, [(0, 12, 0, 1)], dtype, float("inf"))
    k_bad = with_garbage(k, [(0, 20), (0, 5, 1)], dtype, float("nan"))
    out = check_nonfinite(q, k_bad, v_bad, None, causal=True, window=37, **scales)
    assert out[0, 40 + 37 :].isfinite().all(), "keys left behind by the window count for nothing"
    assert out[0, :5].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, E4M3], ids=str)
def test_nonfinite_in_packed_sequences(dtype, device, gen):
    """Packed varlen: NaN/inf in one sequence's tokens never reach its neighbours, nor its own
    queries before them; garbage in an empty-tailed layout between sequences neither."""
    lengths = [37, 200, 5, 60]
    T = sum(lengths)
    cu = torch.tensor([0, 37, 237, 242, 302], dtype=torch.int32, device=device)
    (q, k, v), scales = make_qkv((T, 8, 64), (T, 2, 64), dtype, gen, device, (4, 2))
    v_bad = with_garbage(v, [(40,), (36,), (238, 1, 9)], dtype, float("nan"))
    v_bad = with_garbage(v_bad, [(241, 0, 2)], dtype, float("inf"))
    k_bad = with_garbage(k, [(300,), (236, 1)], dtype, float("nan"))
    for causal, window in ((True, None), (True, 16)):
        out = check_nonfinite(q, k_bad, v_bad, None, causal=causal, window=window, cu_seqlens=cu,
                              max_seqlen=200, **scales)  # fmt: skip
        assert out[37:40].isfinite().all(), "sequence 2's queries before its NaN key"
        assert out[242:300].isfinite().all(), "sequence 4 before its K garbage"
        assert out[36].isnan().all() and out[:36].isfinite().all()


@pytest.mark.parametrize("packed", [False, True], ids=["batched", "packed"])
def test_nonfinite_key_major_v(packed, device, gen):
    """A key-major e4m3 V with NaN at hidden and seen keys: the exact pass reads it through its
    strides, and a packed sequence's neighbours (in its first and last key tiles) stay finite."""
    if packed:
        cu = torch.tensor([0, 37, 237, 242, 302], dtype=torch.int32, device=device)
        kw = dict(cu_seqlens=cu, max_seqlen=200)
        (q, k, v), scales = make_qkv((302, 8, 64), (302, 2, 64), E4M3, gen, device, (4, 2))
        v_bad = with_garbage(v, [(40,), (36,), (238, 1, 9), (241, 0, 2)], E4M3, float("nan"))
    else:
        kw = {}
        (q, k, v), scales = make_qkv((2, 150, 8, 64), (2, 150, 2, 64), E4M3, gen, device, (2, 2))
        v_bad = with_garbage(v, [(0, 100), (1, 140, 1, 5), (0, 90, 0, 3)], E4M3, float("nan"))
    out = check_nonfinite(q, k, v_key_major(v_bad), None, causal=True, **kw, **scales)
    if packed:
        assert out[37:40].isfinite().all() and out[242:].isfinite().all()
        assert out[36].isnan().all() and out[:36].isfinite().all()
    else:
        assert out[0, :90].isfinite().all() and out[1, :140].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, E4M3], ids=str)
def test_visible_nonfinite_v_still_propagates(dtype, device, gen):
    """Not causal: every query sees every key, so a NaN V element makes its column NaN in
    every row of its heads, and nothing else; inf the same (the kernel gives NaN)."""
    (q, k, v), scales = make_qkv((1, 140, 8, 64), (1, 140, 2, 64), dtype, gen, device, (1, 2))
    v_bad = with_garbage(v, [(0, 3, 0, 17), (0, 139, 1, 63)], dtype, float("nan"))
    if dtype != E4M3:
        v_bad = with_garbage(v_bad, [(0, 70, 1, 0)], dtype, -float("inf"))
    out = check_nonfinite(q, k, v_bad, None, causal=False, **scales)
    assert out[0, :, :4, 17].isnan().all() and out[0, :, 4:, 63].isnan().all()
    assert int((~out.isfinite()).sum()) == 140 * 4 * (2 if dtype == E4M3 else 3)


def test_large_max_seqlen_bounds_the_grid(device, gen, monkeypatch):
    """max_seqlen far past the tokens there are: no sequence can be longer than T, so the grid
    (and the tuning key) follow T, and the result is right."""
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    (q, k, v), _ = make_qkv((12, 8, 64), (12, 2, 64), torch.bfloat16, gen, device)
    config = A.configs_for(capability(q.device), 64, False)[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    (launch,) = A._launches(q, k, v, out, None, True, None, None, cu, 10**6, (None,) * 3, config)
    block_q = config.meta["BLOCK_M"] // 4
    assert launch.grid == (-(-12 // block_q), 2, 2)
    monkeypatch.setattr(A._tuner, "cache", {})
    check(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=10**6)
    assert [key[-1] for key in A._tuner.cache] == [A.m_bucket(12)], "tuned by the real length"


@pytest.mark.parametrize("dtype", [torch.bfloat16, E4M3], ids=str)
def test_packed_batch_with_empty_sequences(dtype, device, gen):
    """cu_seqlens [0, 0, 5, 5, 9]: empty sequences have no rows; the others are as alone."""
    cu = torch.tensor([0, 0, 5, 5, 9], dtype=torch.int32, device=device)
    (q, k, v), scales = make_qkv((9, 8, 64), (9, 2, 64), dtype, gen, device, (4, 2))
    check(q, k, v, causal=True, cu_seqlens=cu, max_seqlen=5, **scales)
    check(q, k, v, causal=False, cu_seqlens=cu, max_seqlen=5, **scales)


@pytest.mark.parametrize(
    "shape_q, shape_kv, packed",
    [((2, 0, 8, 64), (2, 0, 2, 64), False), ((0, 7, 8, 64), (0, 7, 2, 64), False),
     ((0, 8, 64), (0, 2, 64), True)],
    ids=["S=0", "B=0", "T=0"],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.bfloat16, E4M3], ids=str)
def test_zero_size_inputs(shape_q, shape_kv, packed, dtype, device, gen):
    (q, k, v), scales = make_qkv(shape_q, shape_kv, dtype, gen, device, ())
    kw = (
        dict(cu_seqlens=torch.zeros(2, dtype=torch.int32, device=device), max_seqlen=1)
        if packed
        else {}
    )
    out, lse = flash_attention(q, k, v, **kw, **scales, return_lse=True)
    out_dtype, lse_shape = A._out_shapes(q, 1 if packed else q.shape[0])
    assert out.shape == q.shape and out.dtype == out_dtype and out.device == q.device
    assert lse.shape == lse_shape and lse.dtype == torch.float32
    ref, ref_lse = attention_reference(*(t.cpu() for t in (q, k, v)), cu_seqlens=kw.get("cu_seqlens"),
                                       **{n: t.cpu() for n, t in scales.items()})  # fmt: skip
    assert ref.shape == out.shape and ref_lse.shape == lse.shape


def test_one_element_descales_of_any_shape(device, gen):
    """A [1, 1] descale (as checkpoints store it) is a per-tensor descale like [] and [1]."""
    (q, k, v), scales = make_qkv((2, 90, 8, 64), (2, 90, 2, 64), E4M3, gen, device, ())
    scales = {n: t.reshape(1, 1) for n, t in scales.items()}
    scales["v_descale"] = scales["v_descale"].reshape(1, 1, 1)
    check(q, k, v, causal=True, **scales)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (qkv(softmax_scale=float("inf")), ValueError, "softmax_scale must be positive and finite; got inf"),
        (qkv(softmax_scale=float("nan")), ValueError, "softmax_scale must be positive and finite; got nan"),
        (qkv(softmax_scale=0.0), ValueError, "softmax_scale must be positive and finite"),
        (fp8_qkv(q_descale=torch.zeros(())), ValueError, "q_descale must be positive and finite; got 0.0"),
        (fp8_qkv(k_descale=torch.full((2, 2), -0.5)), ValueError, "k_descale must be positive and finite; got -0.5"),
        (fp8_qkv(v_descale=torch.tensor([[0.1, float("nan")], [0.1, 0.1]])), ValueError, "v_descale must be positive and finite; got nan"),
        (fp8_qkv(v_descale=torch.full((1,), float("inf"))), ValueError, "v_descale must be positive and finite; got inf"),
        (fp8_qkv(q_descale=torch.ones(1, 1)), None, None),
        (qkv(window=True), TypeError, "window must be int or None; got bool"),
        (qkv(return_lse=1), TypeError, "return_lse must be bool"),
        (packed(max_seqlen=True), TypeError, "max_seqlen must be int or None; got bool"),
        (packed(max_seqlen=10**6), None, None),
    ],
)  # fmt: skip
def test_values_that_make_nan_are_refused(kwargs, error, match):
    check_bad_input(flash_attention, kwargs, error, match)
