"""rmsnorm_fp8 against its torch reference: the new residual bit for bit, and the codes and scales
that quantize_fp8 gives the reference's fp32 output.

The kernel and the reference sum the K squares in different fp32 orders; everything else (the
residual add in x's dtype, the squares, mean, + eps, sqrt, 1 / x, * rstd, * weight, the exact
division by the scale) rounds the same way once each. Any order of K rounded products is within
gamma_K = K u / (1 - K u) of the exact sum, so the two y differ by at most
rel = sqrt((1 + gamma_K) / (1 - gamma_K)) ((1 + u) / (1 - u))^5 - 1, and a code may differ by one
step only where the reference's quotient lies that close to an e4m3 rounding boundary
(helpers.assert_quantized_like). Integer-valued inputs make every sum exact: then the codes and
scales match bit for bit.
"""

import importlib
import math

import pytest
import torch
from helpers import (
    E4M3_NAN_CODE,
    UNIT_ROUNDOFF,
    assert_codes_equal,
    assert_quantized_like,
    check_bad_input,
    poisoned,
    randn,
    run_on_torch_path,
)

from fp8nemo import fp8
from fp8nemo.kernels import rmsnorm_fp8
from fp8nemo.kernels.norm import rmsnorm_reference

N = importlib.import_module("fp8nemo.kernels.norm")
E4M3 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 64), (5, 1), (17, 200), (3, 7, 200), (2, 5120)]
GRANULARITIES = ["token", "group", "static"]


def norm_rel(K: int) -> float:
    """Bound on |y / y_ref - 1| (module docstring)."""
    u = UNIT_ROUNDOFF[torch.float32]
    gamma = K * u / (1 - K * u)
    return math.sqrt((1 + gamma) / (1 - gamma)) * ((1 + u) / (1 - u)) ** 5 - 1


def static_scale(gen, device):
    # Small enough that the largest normed values saturate at +-448.
    return (torch.rand(1, generator=gen) * 0.005 + 0.004).to(device)


def inputs(shape, dtype, device, gen, residual=True, weight_dtype=torch.float32):
    x = randn(*shape, gen=gen, dtype=dtype, device=device, scale=3.0)
    res = randn(*shape, gen=gen, dtype=dtype, device=device) if residual else None
    weight = (torch.randn(shape[-1], generator=gen) * 0.5 + 1.0).to(weight_dtype).to(device)
    return x, weight, res


def check(x, weight, res, granularity, gen, eps=1e-5, group_size=128, what=""):
    """The op against the reference: new residual bit for bit, codes and scales as derived."""
    scale = static_scale(gen, x.device) if granularity == "static" else None
    gran = "token" if granularity == "static" else granularity
    q, s, h = rmsnorm_fp8(x, weight, eps, residual=res, scale=scale, granularity=gran,
                          group_size=group_size)  # fmt: skip
    y_ref, h_ref = rmsnorm_reference(x.cpu(), weight.cpu(), eps, None if res is None else res.cpu())
    if res is None:
        assert h is x, "without a residual, residual_out is x itself"
    else:
        assert h.shape == x.shape and h.dtype == x.dtype and h.is_contiguous()
        assert h.data_ptr() not in (x.data_ptr(), res.data_ptr())
        # Bit for bit (NaN where x + residual is NaN, whatever its payload).
        torch.testing.assert_close(h, x + res, rtol=0, atol=0, equal_nan=True)
    want_shape = (1,) if scale is not None else fp8.scale_shape(x.shape, gran, group_size)
    assert s.shape == want_shape and s.dtype == torch.float32
    assert_quantized_like(q, s, y_ref, norm_rel(x.shape[-1]), gran, scale, group_size,
                          what or f"rmsnorm_fp8 {granularity}")  # fmt: skip
    return q, s


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, shape, granularity, residual, device, gen):
    x, weight, res = inputs(shape, dtype, device, gen, residual)
    q, s = check(x, weight, res, granularity, gen)
    # The op allocates its outputs: every element must have been written with a real value.
    assert not ((q.view(torch.uint8) & 0x7F) == E4M3_NAN_CODE).any(), "a code is NaN"
    assert (s.isfinite() & (s > 0)).all(), "a scale is not positive and finite"


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_row_longer_than_one_tile(granularity, device, gen):
    """K past ROW_TILE_MAX: the row is read in CHUNK steps, two or three times."""
    K = 20000
    assert K > importlib.import_module("fp8nemo.kernels.quantize").ROW_TILE_MAX
    x, weight, res = inputs((3, K), torch.bfloat16, device, gen)
    check(x, weight, res, granularity, gen)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("K", [200, 5120])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_integer_inputs_are_bit_exact(dtype, K, granularity, device, gen):
    """Integers in [-4, 4] in x and residual: h^2 <= 64, and K <= 5120 squares sum below 2^24,
    exactly in any order. Then both sides compute the same fp32 y, so codes and scales match
    bit for bit."""
    ints = lambda: torch.randint(-4, 5, (9, K), generator=gen).to(dtype).to(device)  # noqa: E731
    x, res = ints(), ints()
    weight = (torch.randn(K, generator=gen) * 0.5 + 1.0).to(device)
    scale = static_scale(gen, device) if granularity == "static" else None
    gran = "token" if granularity == "static" else granularity
    q, s, _ = rmsnorm_fp8(x, weight, residual=res, scale=scale, granularity=gran)
    y_ref, _ = rmsnorm_reference(x.cpu(), weight.cpu(), 1e-5, res.cpu())
    want_q, want_s = fp8.quantize(y_ref, "tensor" if scale is not None else gran,
                                  None if scale is None else scale.cpu())  # fmt: skip
    assert_codes_equal(q, want_q, f"integer inputs, {granularity}")
    assert torch.equal(s.cpu(), want_s.reshape(s.shape)), "scales differ"


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_weight_dtypes(weight_dtype, device, gen):
    x, weight, res = inputs((5, 200), torch.bfloat16, device, gen, weight_dtype=weight_dtype)
    check(x, weight, res, "token", gen)


@pytest.mark.parametrize("group_size", [32, 256])
def test_other_group_sizes(group_size, device, gen):
    x, weight, res = inputs((4, 300), torch.float16, device, gen)
    check(x, weight, res, "group", gen, group_size=group_size)


@pytest.mark.parametrize("eps", [1e-6, 0.25, 1])
def test_eps(eps, device, gen):
    x, weight, res = inputs((6, 64), torch.float32, device, gen)
    check(x * 0.01, weight, res * 0.01, "token", gen, eps=eps)


def test_row_strided_inputs(device, gen):
    """x and residual as column slices of wider tensors (one row stride each, not K)."""
    big_x = randn(3, 5, 400, gen=gen, dtype=torch.bfloat16, device=device)
    big_r = randn(3, 5, 300, gen=gen, dtype=torch.bfloat16, device=device)
    x, res = big_x[..., 100:300], big_r[..., :200]
    assert not x.is_contiguous() and not res.is_contiguous()
    weight = randn(200, gen=gen, device=device)
    for granularity in GRANULARITIES:
        check(x, weight, res, granularity, gen)
        check(x, randn(400, gen=gen, device=device)[::2], None, granularity, gen)  # strided weight


@pytest.mark.parametrize("shape", [(), (1, 1), (1,)], ids=str)
def test_static_scale_of_any_one_element_shape(shape, device, gen):
    x, weight, res = inputs((9, 144), torch.bfloat16, device, gen)
    scale = torch.full(shape, 0.011, device=device)
    for granularity in ("token", "tensor"):
        q, s, _ = rmsnorm_fp8(x, weight, residual=res, scale=scale, granularity=granularity)
        assert s.shape == (1,) and s.item() == scale.item()
        y_ref, _ = rmsnorm_reference(x.cpu(), weight.cpu(), 1e-5, res.cpu())
        assert_quantized_like(q, s, y_ref, norm_rel(144), "tensor", scale, what=f"{shape} scale")


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_input(granularity, value, device, gen):
    """A NaN or inf in x reaches the row's sum of squares: the whole row's y is NaN (inf: the
    inf element is inf * 0 = NaN, the others 0), quantized by quantize_fp8's rule (a NaN reaches
    its group's or row's scale; static: NaN codes only where y is NaN). Other rows are untouched."""
    x, weight, res = inputs((6, 300), torch.bfloat16, device, gen)
    x[2, 17] = value
    q, s = check(x, weight, res, granularity, gen)
    nan = (q.view(torch.uint8) & 0x7F) == E4M3_NAN_CODE
    want = torch.zeros(6, 300, dtype=torch.bool)
    if math.isnan(value) or granularity == "token":
        want[2] = True
    else:  # inf: the element itself, its group, or its row is NaN
        want[2, {"static": slice(17, 18), "group": slice(0, 128)}[granularity]] = True
    assert torch.equal(nan.cpu(), want), "NaN codes in the wrong places"
    if granularity != "static":
        assert torch.equal(s.isnan().cpu(), fp8.amax(want.float(), granularity) > 0)


def test_launches_write_every_element(device, gen):
    """The launcher on NaN-poisoned outputs, for every scale kind and both tile paths: every
    code, scale and residual element is written."""
    for K in (200, 20000):
        x, weight, res = inputs((3, K), torch.float16, device, gen)
        y_ref, h_ref = rmsnorm_reference(x.cpu(), weight.cpu(), 1e-5, res.cpu())
        for granularity in GRANULARITIES:
            scale = static_scale(gen, device) if granularity == "static" else None
            gran = "token" if scale is not None else granularity
            shape = (1,) if scale is not None else fp8.scale_shape(x.shape, gran)
            q, h = poisoned(x.shape, E4M3, device), poisoned(x.shape, x.dtype, device)
            s = scale.clone() if scale is not None else poisoned(shape, torch.float32, device)
            for step in N._launches(x, weight, res, h, q, scale, s, 1e-5, gran, 128):
                step()
            assert torch.equal(h.cpu(), h_ref), f"K={K} {granularity}: residual_out"
            assert_quantized_like(q, s, y_ref, norm_rel(K), gran, scale,
                                  what=f"launcher K={K} {granularity}")  # fmt: skip


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 200)], ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
def test_zero_rows_give_empty_outputs(shape, granularity, residual, device, gen):
    x = torch.empty(shape, dtype=torch.bfloat16, device=device)
    res = torch.empty(shape, dtype=torch.bfloat16, device=device) if residual else None
    weight = randn(shape[-1], gen=gen, device=device)
    scale = static_scale(gen, device) if granularity == "static" else None
    gran = "token" if scale is not None else granularity
    q, s, h = rmsnorm_fp8(x, weight, residual=res, scale=scale, granularity=gran)
    want_shape = (1,) if scale is not None else fp8.scale_shape(shape, gran)
    assert q.shape == shape and q.dtype == E4M3 and s.shape == want_shape
    assert h.shape == shape and (h is x) == (res is None)
    if scale is not None:
        assert torch.equal(s, scale)


def _bad(**overrides):
    kwargs = dict(x=torch.ones(4, 16), weight=torch.ones(16))
    kwargs.update(overrides)
    return kwargs


BAD_INPUTS = [
    (_bad(x=[[1.0] * 16]), TypeError, "x must be torch.Tensor"),
    (
        _bad(x=torch.ones(4, 16, dtype=torch.int32)),
        TypeError,
        "x must have dtype float32, float16, bfloat16; got torch.int32",
    ),
    (_bad(x=torch.ones(4, 16).to(E4M3)), TypeError, "x must have dtype"),
    (_bad(x=torch.tensor(1.0)), ValueError, "x must have a non-empty last dimension K; got shape"),
    (_bad(x=torch.ones(4, 0), weight=torch.ones(0)), ValueError, "non-empty last dimension"),
    (
        _bad(x=torch.ones(16, 4).t()),
        ValueError,
        r"x must have unit stride in its last dimension; got strides \[1, 4\]",
    ),
    (
        _bad(x=torch.ones(3, 4, 16).transpose(0, 1)),
        ValueError,
        "x with shape .* cannot be viewed as",
    ),
    (
        _bad(weight=torch.ones(17)),
        ValueError,
        r"weight must be \[K\] = \[16\] for x \[4, 16\]; got \[17\]",
    ),
    (_bad(weight=torch.ones(1, 16)), ValueError, "weight must be 1-D"),
    (_bad(weight=torch.ones(16, dtype=torch.int64)), TypeError, "weight must have dtype"),
    (_bad(weight=torch.ones(16, device="meta")), ValueError, "weight is on meta but x is on cpu"),
    (
        _bad(residual=torch.ones(4, 16, dtype=torch.float16)),
        TypeError,
        "residual must have dtype float32; got torch.float16",
    ),
    (
        _bad(residual=torch.ones(4, 15)),
        ValueError,
        r"residual must have x's shape \[4, 16\]; got \[4, 15\]",
    ),
    (_bad(residual=torch.ones(16, 4).t()), ValueError, "residual must have unit stride"),
    (_bad(residual=torch.ones(4, 16, device="meta")), ValueError, "residual is on meta"),
    (
        _bad(residual=torch.ones(3, 4, 16).transpose(0, 1), x=torch.ones(4, 3, 16)),
        ValueError,
        "residual with shape",
    ),
    (_bad(eps=0.0), ValueError, "eps must be positive and finite in fp32"),
    (_bad(eps=-1e-5), ValueError, "eps must be positive and finite in fp32"),
    (_bad(eps=float("nan")), ValueError, "eps must be positive and finite in fp32"),
    (_bad(eps=float("inf")), ValueError, "got inf"),
    (_bad(eps=1e-50), ValueError, "got 1e-50"),  # 0 in fp32
    (_bad(eps=1e39), ValueError, "got 1e"),  # inf in fp32
    (_bad(eps="1e-5"), TypeError, "eps must be float or int; got str"),
    (_bad(eps=True), TypeError, "eps must be float or int; got bool"),
    (_bad(granularity="channel"), ValueError, "granularity must be one of"),
    (_bad(granularity="tensor"), ValueError, "granularity='tensor' needs a static scale"),
    (
        _bad(granularity="group", group_size=100),
        ValueError,
        "group_size must be one of .*; got 100",
    ),
    (_bad(group_size=True), TypeError, "group_size must be int; got bool"),
    (
        _bad(granularity="group", scale=torch.ones(1)),
        ValueError,
        "granularity='group' takes no scale",
    ),
    (_bad(scale=torch.ones(1, dtype=torch.float16)), TypeError, "scale must have dtype float32"),
    (
        _bad(scale=torch.ones(4, 1)),
        ValueError,
        r"scale must have one element .*; got shape \[4, 1\]",
    ),
    (_bad(scale=torch.zeros(1)), ValueError, "scale must be positive and finite; got 0.0"),
    (_bad(scale=torch.full((1,), -0.5)), ValueError, "scale must be positive and finite; got -0.5"),
    (
        _bad(scale=torch.full((1,), float("nan"))),
        ValueError,
        "scale must be positive and finite; got nan",
    ),
    (_bad(scale=torch.ones(1, device="meta")), ValueError, "scale is on meta"),
    (_bad(scale=0.01), TypeError, "scale must be torch.Tensor or None; got float"),
    (_bad(x=torch.ones(2, 2, 32)[..., :16], residual=torch.ones(4, 16).view(2, 2, 16)), None, None),
    (_bad(scale=torch.tensor(0.02), granularity="tensor"), None, None),
    (_bad(eps=1), None, None),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
def test_bad_input_is_a_clear_error(kwargs, error, match):
    check_bad_input(rmsnorm_fp8, kwargs, error, match)


@pytest.mark.parametrize(
    "granularity, static, residual",
    [
        ("token", False, True),
        ("group", False, True),
        ("token", True, True),
        ("token", False, False),
    ],
)
def test_opcheck(granularity, static, residual, device, gen):
    x, weight, res = inputs((5, 3, 144), torch.bfloat16, device, gen, residual)
    kwargs = {"residual": res, "granularity": granularity}
    if static:
        kwargs["scale"] = static_scale(gen, device)
    torch.library.opcheck(torch.ops.fp8nemo.rmsnorm_fp8.default, (x, weight, 1e-5), kwargs)
    torch.library.opcheck(
        torch.ops.fp8nemo.rmsnorm_fp8.default,
        (torch.empty(0, 144, dtype=torch.bfloat16, device=device), weight),
        {"residual": torch.empty(0, 144, dtype=torch.bfloat16, device=device)},
    )


def block_input(x, weight, residual):
    # x, residual: [B, S, K] -> the FP8 input of the next linear and the new residual
    q, s, h = rmsnorm_fp8(x, weight, residual=residual)
    return q.float() * s, h


@pytest.mark.slow
def test_torch_compile_fullgraph(device, gen):
    torch._dynamo.reset()
    x, weight, res = inputs((2, 7, 160), torch.bfloat16, device, gen)
    eager = block_input(x, weight, res)
    compiled = torch.compile(block_input, fullgraph=True)(x, weight, res)
    # The op runs the same kernel; only the dequantizing multiply is compiled.
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[1], eager[1])


TORCH_PATH = """
import torch
from fp8nemo import fp8
from fp8nemo.kernels import rmsnorm_fp8
from fp8nemo.kernels._triton import INTERPRET
from fp8nemo.kernels.norm import rmsnorm_reference
assert not INTERPRET
g = torch.Generator().manual_seed(0)
x, r = (torch.randn(3, 5, 200, generator=g).bfloat16() for _ in range(2))
w = torch.randn(200, generator=g)
for granularity, scale in (("token", None), ("group", None), ("token", torch.full((), 0.01))):
    q, s, h = rmsnorm_fp8(x, w, residual=r, scale=scale, granularity=granularity)
    y, h_ref = rmsnorm_reference(x, w, 1e-5, r)
    want_q, want_s = fp8.quantize(y, "tensor" if scale is not None else granularity, scale)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), granularity
    assert torch.equal(s, want_s.reshape(s.shape)) and torch.equal(h, h_ref), granularity
    assert s.shape == ((1,) if scale is not None else fp8.scale_shape(x.shape, granularity))
    assert rmsnorm_fp8(x, w, scale=scale, granularity=granularity)[2] is x
q, s, h = rmsnorm_fp8(x[:0], w, residual=r[:0], granularity="group")
assert q.shape == (0, 5, 200) and s.shape == (0, 5, 2) and h.shape == (0, 5, 200)
print("ok")
"""


def test_torch_path_is_the_reference():
    """Without TRITON_INTERPRET, CPU tensors take the torch path: the reference, exactly."""
    assert run_on_torch_path(TORCH_PATH) == "ok"
