"""The ops are registered with torch.library: opcheck passes, and torch.compile(fullgraph=True)
traces them and computes what eager mode does."""

import pytest
import torch
from helpers import randn

import fp8nemo.kernels  # noqa: F401  (registers torch.ops.fp8nemo.*)
from fp8nemo import fp8


@pytest.mark.parametrize(
    "granularity, static",
    [("tensor", False), ("token", False), ("group", False), ("tensor", True), ("token", True)],
)
def test_opcheck_quantize_fp8(granularity, static, device, gen):
    x = randn(5, 3, 144, gen=gen, dtype=torch.bfloat16, device=device)
    kwargs = {}
    if static:
        kwargs["scale"] = torch.rand(fp8.scale_shape(x.shape, granularity), generator=gen).to(
            device
        )
    torch.library.opcheck(torch.ops.fp8nemo.quantize_fp8.default, (x, granularity), kwargs)


@pytest.mark.parametrize(
    "pair", [("tensor", "tensor"), ("token", "channel"), ("group", "block")], ids="x".join
)
@pytest.mark.parametrize("bias", [False, True])
def test_opcheck_fp8_gemm(pair, bias, device, gen):
    a, a_s = fp8.quantize(randn(9, 272, gen=gen), pair[0])
    b, b_s = fp8.quantize(randn(40, 272, gen=gen), pair[1])
    args = [t.to(device) for t in (a, a_s, b, b_s)]
    args.append(randn(40, gen=gen, device=device) if bias else None)
    before = [t.clone() if t is not None else None for t in args]
    # test_schema compares inputs before and after with torch.allclose, which torch does not
    # implement for float8 on the CPU; the same no-mutation check is done bytewise below.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(
        torch.ops.fp8nemo.fp8_gemm.default,
        tuple(args),
        {"out_dtype": torch.float16},
        test_utils=utils,
    )
    torch.ops.fp8nemo.fp8_gemm(*args, torch.float16)
    for t, t0 in zip(args, before, strict=True):
        if t is not None:
            assert torch.equal(t.view(torch.uint8), t0.view(torch.uint8)), "an input was mutated"


@pytest.mark.parametrize("fp8_cache", [False, True])
def test_opcheck_rope(fp8_cache, device, gen):
    from fp8nemo.kernels import rope_cache

    T, HQ, HK, D = 6, 4, 2, 64
    q = randn(T, HQ, D, gen=gen, dtype=torch.bfloat16, device=device)
    k = randn(T, HK, D, gen=gen, dtype=torch.bfloat16, device=device)
    v = randn(T, HK, D, gen=gen, dtype=torch.bfloat16, device=device)
    positions = torch.arange(T, device=device)
    cos_sin = rope_cache(D, 64, 1e4, device=device)
    torch.library.opcheck(
        torch.ops.fp8nemo.rope_.default, (q.clone(), k.clone(), positions, cos_sin)
    )
    cache_dtype = torch.float8_e4m3fn if fp8_cache else torch.bfloat16
    k_cache = torch.zeros(2, 8, HK, D, device=device).to(cache_dtype)
    v_cache = torch.zeros(2, 8, HK, D, device=device).to(cache_dtype)
    kwargs = {}
    if fp8_cache:
        kwargs = {
            "k_scale": torch.full((1,), 0.02, device=device),
            "v_scale": torch.full((HK,), 0.03, device=device),
        }
    args = (q, k, v, positions, cos_sin, k_cache, v_cache, torch.arange(T, device=device))
    # test_schema compares tensors with torch.allclose, which has no float8 CPU kernel.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    check = {"test_utils": utils} if fp8_cache else {}
    torch.library.opcheck(torch.ops.fp8nemo.rope_kv_cache_.default, args, kwargs, **check)


@pytest.mark.parametrize("fp8_inputs", [False, True])
def test_opcheck_flash_attention(fp8_inputs, device, gen):
    B, S, HQ, HK, D = 2, 19, 4, 2, 64
    q, k, v = (randn(B, S, h, D, gen=gen, device=device) for h in (HQ, HK, HK))
    kwargs = {"causal": True, "return_lse": True}
    if fp8_inputs:
        q, k, v = (fp8.saturating_cast(t * 20) for t in (q, k, v))
        kwargs.update(
            {
                n: torch.full((B, HK), 0.05, device=device)
                for n in ("q_descale", "k_descale", "v_descale")
            }
        )
        utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
        kwargs_check = {"test_utils": utils}  # no float8 allclose on the CPU
    else:
        q, k, v = (t.bfloat16() for t in (q, k, v))
        kwargs_check = {}
    torch.library.opcheck(
        torch.ops.fp8nemo.flash_attention.default, (q, k, v), kwargs, **kwargs_check
    )
    T = 23
    packed = [randn(T, h, D, gen=gen, dtype=torch.bfloat16, device=device) for h in (HQ, HK, HK)]
    cu = torch.tensor([0, 5, 23], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.fp8nemo.flash_attention.default, tuple(packed),
                          {"cu_seqlens": cu, "max_seqlen": 18, "window": 4})  # fmt: skip


@pytest.mark.parametrize("op", ["decode_attention", "append_attention"])
@pytest.mark.parametrize("fp8_cache", [False, True])
def test_opcheck_cached_attention(op, fp8_cache, device, gen):
    """decode: one token per sequence, q [B, Hq, D], lengths counting it; append: 5 new tokens
    per sequence, q [B, 5, Hq, D], lengths before them (one an empty cache)."""
    B, S, HQ, HK, D = 2, 40, 8, 2, 64
    new = (5,) if op == "append_attention" else ()
    q = randn(B, *new, HQ, D, gen=gen, dtype=torch.bfloat16, device=device)
    k, v = (randn(B, S, HK, D, gen=gen, device=device) for _ in range(2))
    lens = torch.tensor([0, 35] if new else [3, 40], dtype=torch.int32, device=device)
    kwargs, check = {"window": 16}, {}
    if fp8_cache:
        k, v = fp8.saturating_cast(k * 20), fp8.saturating_cast(v * 20)
        kwargs.update(
            k_descale=torch.full((B, HK), 0.05, device=device),
            v_descale=torch.full((), 0.05, device=device),
        )
        check = {
            "test_utils": (
                "test_autograd_registration",
                "test_faketensor",
                "test_aot_dispatch_dynamic",
            )
        }
    else:
        k, v = k.bfloat16(), v.bfloat16()
    torch.library.opcheck(getattr(torch.ops.fp8nemo, op).default, (q, k, v, lens), kwargs, **check)


def linear_fp8(x, w_fp8, w_scale, bias):
    # x: [B, S, K] bf16 -> [B, S, N]
    B, S, K = x.shape
    x_fp8, x_scale = torch.ops.fp8nemo.quantize_fp8(x.reshape(B * S, K), "token")
    y = torch.ops.fp8nemo.fp8_gemm(x_fp8, x_scale, w_fp8, w_scale, bias, torch.bfloat16)
    return torch.nn.functional.silu(y.reshape(B, S, -1)) * 2


@pytest.mark.slow
def test_torch_compile_fullgraph(device, gen):
    torch._dynamo.reset()
    x = randn(2, 7, 160, gen=gen, dtype=torch.bfloat16, device=device)
    w_fp8, w_scale = (t.to(device) for t in fp8.quantize(randn(48, 160, gen=gen), "channel"))
    bias = randn(48, gen=gen, device=device)
    eager = linear_fp8(x, w_fp8, w_scale, bias)
    compiled = torch.compile(linear_fp8, fullgraph=True)(x, w_fp8, w_scale, bias)
    assert compiled.shape == (2, 7, 48) and compiled.dtype == torch.bfloat16
    # The FP8 ops run the same kernels; only the elementwise tail is compiled differently.
    torch.testing.assert_close(compiled, eager, rtol=2**-7, atol=1e-5)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 6, 300, dtype=torch.float16)
        q, s = torch.ops.fp8nemo.quantize_fp8(x, "group", group_size=128)
        assert q.shape == (4, 6, 300) and q.dtype == torch.float8_e4m3fn and s.shape == (4, 6, 3)
        out = torch.ops.fp8nemo.fp8_gemm(
            torch.empty(24, 256, dtype=torch.float8_e4m3fn),
            torch.empty(24, 2),
            torch.empty(384, 256, dtype=torch.float8_e4m3fn),
            torch.empty(3, 2),
            None,
            torch.float32,
        )
        assert out.shape == (24, 384) and out.dtype == torch.float32
        with pytest.raises(ValueError, match="multiple of 16"):
            torch.ops.fp8nemo.fp8_gemm(
                torch.empty(2, 40, dtype=torch.float8_e4m3fn),
                torch.empty(1),
                torch.empty(3, 40, dtype=torch.float8_e4m3fn),
                torch.empty(1),
            )


def test_zero_size_inputs_pass_opcheck(device, gen):
    """The early returns for zero-size inputs keep each op's schema and fake: opcheck passes."""
    torch.library.opcheck(
        torch.ops.fp8nemo.quantize_fp8.default, (torch.empty(0, 300, device=device), "group")
    )
    q, k = (randn(2, 0, h, 64, gen=gen, dtype=torch.bfloat16, device=device) for h in (4, 2))
    torch.library.opcheck(torch.ops.fp8nemo.flash_attention.default, (q, k, k.clone()),
                          {"return_lse": True})  # fmt: skip
    qd = randn(3, 4, 64, gen=gen, dtype=torch.bfloat16, device=device)
    cache = torch.empty(3, 0, 2, 64, dtype=torch.bfloat16, device=device)
    lens = torch.zeros(3, dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.fp8nemo.decode_attention.default, (qd, cache, cache, lens))
    qa = randn(3, 0, 4, 64, gen=gen, dtype=torch.bfloat16, device=device)
    cache = torch.empty(3, 8, 2, 64, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.fp8nemo.append_attention.default, (qa, cache, cache, lens))


def test_fake_tensors_get_the_overlap_check():
    """The in-place ops refuse aliased arguments under fake tensors too (torch.compile traces
    through the fake), from shapes and strides alone; disjoint views of one buffer pass."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fp8nemo.kernels import rope_cache

    table = rope_cache(64, 16, 1e4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        qkv = torch.empty(5, 8, 64)
        positions = torch.arange(5)
        torch.ops.fp8nemo.rope_(qkv[:, :4], qkv[:, 4:6], positions, table)
        with pytest.raises(ValueError, match="q and k share memory"):
            torch.ops.fp8nemo.rope_(qkv[:, :4], qkv[:, 3:5], positions, table)
        with pytest.raises(ValueError, match="q is written in place but several"):
            torch.ops.fp8nemo.rope_(
                torch.empty(1, 4, 64).expand(5, 4, 64), qkv[:, 4:6], positions, table
            )
