"""fp8_gemm against the fp64 product of its dequantized inputs (round-off bound), against the
unquantized fp16 product (SQNR), and on bad input."""

import importlib

import pytest
import torch
from conftest import DEVICE
from helpers import (
    MMA_UNIT_ROUNDOFF,
    UNIT_ROUNDOFF,
    assert_within,
    check_bad_input,
    poisoned,
    randn,
    sqnr_db,
)

from fp8nemo import fp8
from fp8nemo.kernels import fp8_gemm

G = importlib.import_module("fp8nemo.kernels.fp8_gemm")
E4M3 = torch.float8_e4m3fn
OUT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
PAIRS = list(G.SCALE_PAIRS)
NEMO_KN = [(5120, 6144), (4096, 5120), (5120, 28672), (14336, 5120)]


def make_operands(M, N, K, pair, gen, device, bias_dtype=None):
    a_kind, b_kind = pair
    x = randn(M, K, gen=gen, scale=2.0)
    w = randn(N, K, gen=gen, scale=0.05)
    a, a_s = fp8.quantize(x, a_kind)
    b, b_s = fp8.quantize(w, b_kind)
    bias = randn(N, gen=gen, dtype=bias_dtype, device=device) if bias_dtype else None
    return (a.to(device), a_s.to(device), b.to(device), b_s.to(device), bias)


def bound_and_ref(a, a_s, b, b_s, bias, pair, out_dtype, block_k):
    """fp64 reference on the dequantized inputs, and the elementwise round-off bound: each
    K-tile's MMA chain (block_k additions), its promotion into fp32 (one addition per K-tile),
    two scale products and the bias add, then the rounding to the output dtype."""
    a_kind, b_kind = pair
    a_deq = fp8.dequantize(a.cpu(), a_s.cpu(), a_kind).double()
    b_deq = fp8.dequantize(b.cpu(), b_s.cpu(), b_kind).double()
    ref = a_deq @ b_deq.T
    mag = a_deq.abs() @ b_deq.abs().T
    if bias is not None:
        ref = ref + bias.cpu().double()
        mag = mag + bias.cpu().double().abs()
    k_tiles = -(-a.shape[1] // block_k)
    u32 = UNIT_ROUNDOFF[torch.float32]
    acc_err = (block_k * MMA_UNIT_ROUNDOFF + (k_tiles + 4) * u32) * mag
    return ref, UNIT_ROUNDOFF[out_dtype] * (ref.abs() + acc_err) + acc_err


def run(a, a_s, b, b_s, bias, out_dtype, pair, config=None, fast_accum=False):
    """The launcher with `config` (default: the op's first choice) on a NaN-poisoned output."""
    M, N = a.shape[0], b.shape[0]
    if config is None:
        config = G.candidate_configs(a, b, pair[0] == "group")[0]
    out = poisoned((M, N), out_dtype, a.device)
    G._launch(a, a_s, pair[0], b, b_s, pair[1], bias, out, config, fast_accum)
    return out, config


def check(ops, pair, out_dtype, what, config=None):
    """Run (poisoned output) and compare with the reference within the round-off bound."""
    out, config = run(*ops, out_dtype, pair, config)
    ref, bound = bound_and_ref(*ops, pair, out_dtype, config.meta["BLOCK_K"])
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert_within(out, ref, bound, f"{what} {config.name} {pair} {out_dtype}")
    return out


@pytest.mark.parametrize("M", [1, 7, 16, 17, 129, 300])
@pytest.mark.parametrize("pair", PAIRS, ids="x".join)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_dequantized_reference(M, pair, out_dtype, bias, device, gen):
    N, K = 80, 144
    ops = make_operands(M, N, K, pair, gen, device, torch.bfloat16 if bias else None)
    out = check(ops, pair, out_dtype, f"M={M}")
    # The public op picks the same config, so it agrees bit for bit.
    public = fp8_gemm(*ops, out_dtype=out_dtype)
    assert torch.equal(public.view(torch.uint8), out.view(torch.uint8))


@pytest.mark.parametrize("M, N, K", [(3, 200, 272), (65, 136, 400), (130, 257, 1040)])
@pytest.mark.parametrize(
    "pair", [("tensor", "tensor"), ("token", "channel"), ("group", "block")], ids="x".join
)
def test_other_shapes(M, N, K, pair, device, gen):
    ops = make_operands(M, N, K, pair, gen, device, torch.float32)
    check(ops, pair, torch.bfloat16, f"{M}x{N}x{K}")


def all_named_configs():
    """Every config of every target through the interpreter; on a GPU, its own target's."""
    targets = {"hopper": G.HOPPER_CONFIGS, "ada": G.ADA_CONFIGS, "interp": G.INTERPRETER_CONFIGS}
    if DEVICE == "cuda":
        cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
        targets = {f"sm{cap[0]}{cap[1]}": G.configs_for(cap)}
    for target, configs in targets.items():
        for c in configs:
            yield pytest.param(c, id=f"{target}-{c.name}")


@pytest.mark.parametrize("config", list(all_named_configs()))
@pytest.mark.parametrize("K", [400, 512])  # a ragged last K-tile, and none
def test_every_named_config(config, K, device, gen):
    """The kernel is right under every config's constexprs (tiles, split-K, swap-AB)."""
    M = 5 if config.meta["SWAP"] else 70
    N = 136
    cfg = G.with_token_tile(config, M)
    # Every named config holds both accumulators and takes block scales (BLOCK_K = 128).
    assert G.fits(cfg, True, cfg.meta["BLOCK_N"]), config.name
    for pair in [("token", "channel"), ("group", "block")]:
        ops = make_operands(M, N, K, pair, gen, device, torch.float16)
        check(ops, pair, torch.bfloat16, f"K={K}", cfg)


@pytest.mark.parametrize(
    "pair", [("tensor", "tensor"), ("token", "channel"), ("group", "block")], ids="x".join
)
def test_sqnr_against_unquantized_fp16(pair, device, gen):
    """FP8 quantization error on Gaussian data stays above the 25 dB the GEMM issue asks for,
    against the fp16 product (e4m3 has 3 mantissa bits: about 31 dB per operand)."""
    M, N, K = 64, 96, 512
    x = randn(M, K, gen=gen, dtype=torch.float16)
    w = randn(N, K, gen=gen, dtype=torch.float16)
    a, a_s = fp8.quantize(x, pair[0])
    b, b_s = fp8.quantize(w, pair[1])
    out = fp8_gemm(
        a.to(device), a_s.to(device), b.to(device), b_s.to(device), out_dtype=torch.float32
    )
    ref = x.double() @ w.double().T
    db = sqnr_db(out.cpu(), ref)
    print(f"SQNR {pair}: {db:.1f} dB")
    assert db > 25.0, f"SQNR {db:.1f} dB for {pair}"


@pytest.mark.parametrize(
    "pair", [("tensor", "tensor"), ("token", "channel"), ("group", "block")], ids="x".join
)
@pytest.mark.parametrize("M", [3, 100])
def test_nan_in_nan_out(pair, M, device, gen):
    a, a_s, b, b_s, _ = make_operands(M, 72, 256, pair, gen, device)
    nan = torch.tensor(float("nan")).to(E4M3)
    a[1, 200] = nan  # row 1 of the output
    b[5, 3] = nan  # column 5
    out = fp8_gemm(a, a_s, b, b_s).cpu()
    expect = torch.zeros_like(out, dtype=torch.bool)
    expect[1, :] = True
    expect[:, 5] = True
    assert torch.equal(out.isnan(), expect)


def test_split_k_is_deterministic(device, gen):
    """Split-K sums its partials in a fixed order: the same inputs give the same bits."""
    config = G._config("t", 64, 16, 128, 4, 1, split=4, swap=True)
    pair = ("token", "channel")
    ops = make_operands(9, 200, 1024, pair, gen, device, torch.bfloat16)
    first = check(ops, pair, torch.float32, "split-K", config)
    second, _ = run(*ops, torch.float32, pair, config)
    assert torch.equal(first, second)


@pytest.mark.parametrize("cap", [(9, 0), (8, 9), (0, 0)])
@pytest.mark.parametrize("block_scaled", [False, True])
def test_every_problem_has_a_config(cap, block_scaled):
    for M in (1, 7, 16, 17, 64, 65, 128, 300, 4096, 16384):
        for K, N in NEMO_KN + [(16, 16), (144, 80)]:
            configs = G.prune_configs(G.configs_for(cap), M, N, K, block_scaled, 132)
            assert configs, (cap, M, N, K, block_scaled)
            assert all(c.meta["SWAP"] == (M <= G.SMALL_M) for c in configs)
            assert all(c.meta["BLOCK_N"] >= 16 for c in configs)
            if block_scaled:
                assert all(c.meta["BLOCK_K"] == fp8.BLOCK for c in configs)


# One FP8 MMA instruction on Hopper takes 32 of K (QGMMA.64xNx32).
MMA_INSTRUCTION_K = 32


@pytest.mark.parametrize("K", [5120, 14336])  # NeMo's hidden and MLP widths
@pytest.mark.parametrize("pair", [("tensor", "tensor"), ("token", "channel")], ids="x".join)
@pytest.mark.parametrize("family", ["pointer", "tma"])
def test_fast_accum_error_is_bounded(K, pair, family, device, gen):
    """fast_accum chains the whole K loop through the MMA accumulator: each of its K / 32 MMA
    instructions rounds the running sum to the accumulator's precision, so the normwise error
    against the fp64 product stays within (K / 32) unit round-offs of it (the README quotes
    the bound, the benchmark the measured error). Promoted, the same product keeps the
    round-off bound of every other test."""
    M, N = 70, 136
    ops = make_operands(M, N, K, pair, gen, device)
    ref, bound = bound_and_ref(*ops, pair, torch.float32, 128)
    if DEVICE == "cuda":  # the GPU's own first choice in the family
        config = G.candidate_configs(ops[0], ops[2], False, family)[0]
    else:  # the interpreter runs the family's first Hopper config
        config = next(c for c in G.HOPPER_CONFIGS if not c.meta["OVERLAP"] and
                      c.meta["TMA"] == (family == "tma"))  # fmt: skip
    fast, _ = run(*ops, torch.float32, pair, config, fast_accum=True)
    err = (fast.double() - ref).norm() / ref.norm()
    limit = K / MMA_INSTRUCTION_K * MMA_UNIT_ROUNDOFF + 4 * UNIT_ROUNDOFF[torch.float32]
    assert torch.isfinite(fast).all() and err <= limit, (config.name, err.item(), limit)
    promoted, _ = run(*ops, torch.float32, pair, config)
    assert_within(promoted, ref, bound, f"K={K} {config.name} promoted")
    public = fp8_gemm(*ops[:4], out_dtype=torch.float32, fast_accum=True)
    assert (public.double() - ref).norm() / ref.norm() <= limit


def test_one_config_family(gen, device):
    """fp8_gemm_family (the benchmark's pointer-vs-TMA comparison) is fp8_gemm restricted to
    one family's configs: the same numbers as the promoted op within its bound."""
    M, N, K = 130, 136, 400
    ops = make_operands(M, N, K, ("token", "channel"), gen, device)
    ref, bound = bound_and_ref(*ops, ("token", "channel"), torch.float32, 128)
    families = [f for f in G.FAMILIES if G.candidate_configs(ops[0], ops[2], False, f)]
    assert "pointer" in families
    for family in families:
        out = G.fp8_gemm_family(*ops[:4], family, out_dtype=torch.float32)
        assert_within(out, ref, bound, family)
    with pytest.raises(ValueError, match="family must be one of"):
        G.fp8_gemm_family(*ops[:4], "cutlass")


def test_tma_configs_need_aligned_operands(gen, device):
    """TMA loads from 16-byte aligned bases and row strides: with an operand that is not (a
    view at an odd offset) only the pointer configs are left, and the two never share a
    tuning (nor does fast_accum): an unaligned call has a key of its own."""
    M, N, K = 300, 256, 512
    a, a_s, b, b_s, _ = make_operands(M, N, K, ("token", "channel"), gen, device)
    shifted = torch.empty(M * K + 8, dtype=torch.uint8, device=device)[8:]
    shifted = shifted.view(E4M3).view(M, K).copy_(a)
    assert G.tma_ready(a, b) and not G.tma_ready(shifted, b)
    kept = G.prune_configs(G.HOPPER_CONFIGS, M, N, K, False, 132, G.tma_ready(a, b))
    assert any(c.meta["TMA"] for c in kept) and not all(c.meta["TMA"] for c in kept)
    kept = G.prune_configs(G.HOPPER_CONFIGS, M, N, K, False, 132, G.tma_ready(shifted, b))
    assert kept and not any(c.meta["TMA"] for c in kept)
    ref, bound = bound_and_ref(a, a_s, b, b_s, None, ("token", "channel"), torch.float32, 128)
    G._tuner.cache.clear()
    for x in (a, shifted):
        assert_within(fp8_gemm(x, a_s, b, b_s, out_dtype=torch.float32), ref, bound, "aligned")
    fp8_gemm(a, a_s, b, b_s, out_dtype=torch.float32, fast_accum=True)
    assert [k[8:] for k in G._tuner.cache] == [(), ("unaligned",), ("fast_accum",)]


@pytest.mark.skipif(DEVICE != "cuda", reason="needs 2 GB of device memory and a GPU's speed")
def test_offsets_past_2_31_elements(device, gen):
    """M * K > 2^31: row offsets must be computed in int64."""
    K, N = 4096, 128
    M = 2**31 // K + 64
    a = torch.empty(M, K, dtype=torch.uint8, device=device)
    a.random_(0, 126, generator=None)  # finite e4m3 codes 0..125 and their negatives below
    a[::2] |= 0x80
    a = a.view(E4M3)
    a_s = torch.rand(M, 1, device=device) + 0.5
    b, b_s = fp8.quantize(randn(N, K, gen=gen), "channel")
    b, b_s = b.to(device), b_s.to(device)
    out, config = run(a, a_s, b, b_s, None, torch.float32, ("token", "channel"))
    rows = torch.tensor([0, M // 2, M - 65, M - 1], device=device)  # the last two past 2^31
    block_k = config.meta["BLOCK_K"]
    ref, bound = bound_and_ref(
        a[rows], a_s[rows], b, b_s, None, ("token", "channel"), torch.float32, block_k
    )
    assert_within(out[rows], ref, bound, "rows past 2^31 elements")


def bad(**kw):
    """Valid arguments for a 16x32 @ 48x32 product, with `kw` replacing some."""
    g = torch.Generator().manual_seed(0)
    args = dict(
        a=fp8.saturating_cast(torch.randn(16, 32, generator=g)),
        a_scale=torch.ones(16, 1),
        b=fp8.saturating_cast(torch.randn(48, 32, generator=g)),
        b_scale=torch.ones(48, 1),
    )
    args.update(kw)
    return args


BAD_INPUTS = [
    (bad(a=torch.ones(16, 32, dtype=torch.bfloat16)), TypeError, "a must have dtype float8_e4m3fn"),
    (bad(b=torch.ones(48, 32).to(torch.float8_e5m2)), TypeError, "b must have dtype float8_e4m3fn"),
    (
        bad(a=torch.ones(16, 40).to(E4M3), b=torch.ones(48, 40).to(E4M3)),
        ValueError,
        "multiple of 16",
    ),
    (bad(b=torch.ones(48, 48).to(E4M3)), ValueError, "K must match"),
    (bad(a=torch.ones(2, 16, 32).to(E4M3)), ValueError, "a must be 2-D"),
    (
        bad(a_scale=torch.ones(16, 1, dtype=torch.float16)),
        TypeError,
        "a_scale must have dtype float32",
    ),
    (bad(a_scale=torch.ones(16, 2)), ValueError, "not a supported pair"),
    (bad(b_scale=torch.ones(47, 1)), ValueError, "not a supported pair"),
    (
        bad(a_scale=torch.ones(16, 1), b_scale=torch.ones(1, 1)),
        None,
        None,
    ),  # K <= 128: token x block-shaped [1,1]
    (
        bad(a_scale=torch.ones(16, 1), b_scale=torch.ones(48, 1), bias=torch.ones(47)),
        ValueError,
        "bias must be",
    ),
    (bad(bias=torch.ones(48, dtype=torch.int32)), TypeError, "bias must have dtype"),
    (bad(out_dtype=torch.int8), ValueError, "out_dtype must be one of"),
    (bad(a=torch.ones(32, 16).to(E4M3).t()), ValueError, "unit stride along K"),
    (bad(b_scale=torch.ones(48, 1, device="meta")), ValueError, "on one device"),
    (bad(a_scale=1.0), TypeError, "a_scale must be torch.Tensor; got float"),
    (bad(bias=[0.0] * 48), TypeError, "bias must be torch.Tensor or None; got list"),
    (bad(out_dtype="bfloat16"), TypeError, "out_dtype must be torch.dtype; got str"),
    (bad(fast_accum=1), TypeError, "fast_accum must be bool; got int"),
    (
        bad(
            a=torch.ones(16, 256).to(E4M3),
            a_scale=torch.ones(16, 2),
            b=torch.ones(128, 256).to(E4M3),
            b_scale=torch.ones(1, 2),
            fast_accum=True,
        ),
        ValueError,
        "fast_accum needs per-tensor/per-token",
    ),  # fmt: skip
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
def test_bad_input_is_a_clear_error(kwargs, error, match):
    check_bad_input(fp8_gemm, kwargs, error, match)


def test_group_scales_need_block_weights():
    with pytest.raises(ValueError, match="not a supported pair"):
        fp8_gemm(**bad(a=torch.ones(16, 256).to(E4M3), a_scale=torch.ones(16, 2),
                       b=torch.ones(48, 256).to(E4M3), b_scale=torch.ones(48, 1)))  # fmt: skip


@pytest.mark.parametrize("a_shape, b_shape", [((1, 1), (1, 1)), ((1, 1), None), (None, (1, 1, 1))])
@pytest.mark.parametrize("M", [1, 17])
def test_one_element_scales_of_any_shape_are_per_tensor(a_shape, b_shape, M, device, gen):
    """A per-tensor scale stored as [1, 1] (checkpoints, vLLM's tests) is per tensor; for M = 1
    it is also a per-token scale, with the same numbers."""
    N, K = 200, 144
    ops = make_operands(M, N, K, ("tensor", "tensor"), gen, device)
    a, a_s, b, b_s, _ = ops
    wide_a = a_s.reshape(a_shape) if a_shape else a_s
    wide_b = b_s.reshape(b_shape) if b_shape else b_s
    want = check(ops, ("tensor", "tensor"), torch.float32, f"M={M}")
    got = fp8_gemm(a, wide_a, b, wide_b, out_dtype=torch.float32)
    assert torch.equal(got, want)


@pytest.mark.parametrize("M, N", [(0, 80), (9, 0), (0, 0)])
@pytest.mark.parametrize("pair", [("token", "channel"), ("group", "block")], ids="x".join)
def test_empty_products(M, N, pair, device, gen):
    """M = 0 or N = 0: an empty [M, N] output (the bias unused)."""
    a, a_s, b, b_s, bias = make_operands(M, N, 256, pair, gen, device, torch.bfloat16)
    out = fp8_gemm(a, a_s, b, b_s, bias, out_dtype=torch.float16)
    assert out.shape == (M, N) and out.dtype == torch.float16 and out.device == a.device
