"""quantize_fp8 against the torch reference: the same FP8 codes and scales, bit for bit.

The kernel divides exactly (div_rn), as the reference does, so no one-step differences between
division and reciprocal-multiply are allowed here.
"""

import importlib

import pytest
import torch
from helpers import E4M3_NAN_CODE, assert_codes_equal, check_bad_input, poisoned, randn

from fp8nemo import fp8
from fp8nemo.kernels import quantize_fp8

Q = importlib.import_module("fp8nemo.kernels.quantize")
E4M3 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 16), (7, 144), (17, 300), (3, 5, 272), (4097, 64), (2, 5120), (33, 1000)]


def check_against_reference(x, granularity, scale=None, group_size=128):
    """Public op and, separately, the launcher on poisoned buffers: both equal the reference."""
    want_q, want_s = fp8.quantize(
        x.cpu(), granularity, None if scale is None else scale.cpu(), group_size
    )
    want_s = want_s.reshape(fp8.scale_shape(x.shape, granularity, group_size))

    q, s = quantize_fp8(x, granularity, scale=scale, group_size=group_size)
    assert q.shape == x.shape and q.dtype == E4M3
    assert s.shape == want_s.shape and s.dtype == torch.float32
    assert_codes_equal(q, want_q, f"quantize_fp8({granularity}) codes")
    assert torch.equal(s.cpu().isnan(), want_s.isnan())
    assert torch.equal(s.cpu().nan_to_num(), want_s.nan_to_num()), "scales differ"

    K = x.shape[-1]
    q2 = poisoned(x.shape, E4M3, x.device)
    s2 = (
        scale.reshape(want_s.shape).clone()
        if scale is not None
        else poisoned(want_s.shape, torch.float32, x.device)
    )
    Q._launch(x.reshape(-1, K), q2.view(-1, K), granularity, scale, s2, group_size)
    assert_codes_equal(q2, want_q, f"launcher({granularity}) codes on a poisoned buffer")
    assert torch.equal(s2.cpu().nan_to_num(), want_s.nan_to_num()), "launcher scales differ"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "token", "group"])
def test_dynamic_matches_reference(shape, dtype, granularity, device, gen):
    x = randn(*shape, gen=gen, dtype=dtype, device=device, scale=3.0)
    check_against_reference(x, granularity)


@pytest.mark.parametrize("shape", [(5, 300), (3, 2, 48)])
@pytest.mark.parametrize("group_size", [16, 32, 256])
def test_other_group_sizes(shape, group_size, device, gen):
    x = randn(*shape, gen=gen, dtype=torch.bfloat16, device=device)
    check_against_reference(x, "group", group_size=group_size)


@pytest.mark.parametrize("shape", [(1, 16), (17, 300), (3, 5, 272)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "token", "group"])
def test_static_matches_reference(shape, dtype, granularity, device, gen):
    x = randn(*shape, gen=gen, dtype=dtype, device=device, scale=3.0)
    scale_shape = fp8.scale_shape(x.shape, granularity)
    # Scales small enough that some values saturate at +-448.
    scale = (torch.rand(scale_shape, generator=gen) * 0.02 + 0.003).to(device)
    check_against_reference(x, granularity, scale=scale)


def test_static_per_tensor_accepts_a_0d_scale(device, gen):
    x = randn(9, 64, gen=gen, device=device)
    q, s = quantize_fp8(x, "tensor", scale=torch.tensor(0.01, device=device))
    assert s.shape == (1,)
    assert_codes_equal(q, fp8.quantize(x.cpu(), "tensor", torch.tensor(0.01))[0], "0-d scale")


def test_row_strided_input(device, gen):
    big = randn(37, 400, gen=gen, dtype=torch.float16, device=device)
    x = big[:, :272]
    assert not x.is_contiguous()
    for granularity in ("tensor", "token", "group"):
        check_against_reference(x, granularity)


def test_values_beyond_range_saturate(device, gen):
    x = randn(8, 256, gen=gen, device=device)
    x[0, :4] = torch.tensor([1e3, -1e3, 1e30, -float("inf")])
    q, _ = quantize_fp8(x, "tensor", scale=torch.ones(1, device=device))
    assert q[0, :4].float().tolist() == [448.0, -448.0, 448.0, -448.0]
    inside = x.abs() <= 448
    assert_codes_equal(q[inside], fp8.saturating_cast(x[inside]), "in-range values")


def test_nan_stays_nan(device, gen):
    x = randn(6, 200, gen=gen, device=device)
    x[2, 17] = float("nan")
    # static: only that element
    q, _ = quantize_fp8(x, "token", scale=torch.full((6, 1), 0.01, device=device))
    nan = q.float().isnan()
    assert nan[2, 17] and nan.sum() == 1
    # dynamic per token: the NaN reaches the row's scale, the other rows are untouched
    q, s = quantize_fp8(x, "token")
    assert s[2].isnan() and not s[[0, 1, 3, 4, 5]].isnan().any()
    assert q[2].float().isnan().all() and not q[[0, 1, 3, 4, 5]].float().isnan().any()
    # dynamic per group: only the group holding it
    q, s = quantize_fp8(x, "group")
    assert s[2, 0].isnan() and s.isnan().sum() == 1
    assert q[2, :128].float().isnan().all() and q.float().isnan().sum() == 128
    # dynamic per tensor: everything
    q, s = quantize_fp8(x, "tensor")
    assert s.isnan().all() and q.float().isnan().all()
    assert int(q.view(torch.uint8)[0, 0]) & 0x7F == E4M3_NAN_CODE


def test_all_zero_rows_get_the_floor_scale(device, gen):
    x = randn(4, 160, gen=gen, device=device)
    x[1] = 0.0
    for granularity in ("token", "group"):
        q, s = quantize_fp8(x, granularity)
        assert (s[1] == fp8.AMAX_FLOOR / fp8.E4M3_MAX).all() and (s[1] > 0).all()
        assert (q[1].float() == 0).all()
        check_against_reference(x, granularity)


def test_empty_batch(device):
    x = torch.empty(0, 64, device=device)
    q, s = quantize_fp8(x, "token")
    assert q.shape == (0, 64) and s.shape == (0, 1)
    q, s = quantize_fp8(x, "tensor")
    assert s.shape == (1,) and torch.isfinite(s).all()


BAD_INPUTS = [
    (dict(x=torch.ones(4, 16, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(x=torch.ones(4, 16).to(E4M3)), TypeError, "x must have dtype"),
    (dict(x=torch.tensor(1.0)), ValueError, "non-empty last dimension"),
    (dict(x=torch.ones(4, 0)), ValueError, "non-empty last dimension"),
    (dict(x=torch.ones(16, 4).t()), ValueError, "unit stride"),
    (dict(x=torch.ones(4, 16), granularity="channel"), ValueError, "granularity must be one of"),
    (dict(x=torch.ones(4, 16), granularity="group", group_size=100), ValueError, "group_size"),
    (
        dict(x=torch.ones(4, 16), scale=torch.ones(4, 1, dtype=torch.float16)),
        TypeError,
        "scale must have dtype",
    ),
    (dict(x=torch.ones(4, 16), scale=torch.ones(4)), ValueError, r"must have shape \[4, 1\]"),
    (
        dict(x=torch.ones(4, 16), granularity="tensor", scale=torch.ones(2)),
        ValueError,
        r"shape \[1\]",
    ),
    (
        dict(x=torch.ones(4, 300), granularity="group", scale=torch.ones(4, 2)),
        ValueError,
        r"\[4, 3\]",
    ),
    (dict(x=torch.ones(4, 16), scale=torch.ones(4, 1, device="meta")), ValueError, "on one device"),
    (dict(x=torch.ones(2, 2, 32)[..., :16]), None, None),  # rows with one stride: accepted
    (dict(x=torch.ones(3, 4, 16).transpose(0, 1)), ValueError, "cannot be viewed"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
def test_bad_input_is_a_clear_error(kwargs, error, match):
    check_bad_input(quantize_fp8, kwargs, error, match)


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 300)])
@pytest.mark.parametrize("granularity", ["tensor", "token", "group"])
@pytest.mark.parametrize("static", [False, True])
def test_zero_rows_give_empty_codes_and_scales(shape, granularity, static, device, gen):
    """No rows: empty codes and scales of the granularity's (empty) shape; a per-tensor scale is
    the floor scale of an all-zero tensor when dynamic, the given one when static."""
    x = torch.empty(shape, device=device)
    want_shape = fp8.scale_shape(shape, granularity)
    scale = None
    if static:
        scale = (torch.rand(want_shape, generator=gen) * 0.02 + 0.003).to(device)
    q, s = quantize_fp8(x, granularity, scale=scale)
    assert (
        q.shape == shape and q.dtype == E4M3 and s.shape == want_shape and s.dtype == torch.float32
    )
    want_q, want_s = fp8.quantize(x.cpu(), granularity, None if scale is None else scale.cpu())
    assert want_q.shape == shape and torch.equal(want_s.reshape(want_shape), s.cpu())
    if granularity == "tensor" and not static:
        assert torch.equal(s.cpu(), fp8.scale_from_amax(torch.zeros(1)))


@pytest.mark.parametrize("granularity", ["tensor", "token", "group"])
@pytest.mark.parametrize("value", [0.0, -0.01, float("nan"), float("inf")])
def test_static_scale_that_makes_nan_is_refused(granularity, value, gen):
    """A static scale of 0 (x / 0 = inf, saturated to 448), negative, NaN or inf turns finite
    input into garbage: refused, naming the value."""
    x = randn(4, 300, gen=gen)
    scale = torch.rand(fp8.scale_shape(x.shape, granularity), generator=gen) * 0.02 + 0.003
    scale.view(-1)[-1] = value
    seen = torch.tensor(value).item()  # as fp32 holds it
    with pytest.raises(ValueError, match=f"scale must be positive and finite; got {seen}"):
        quantize_fp8(x, granularity, scale=scale)


@pytest.mark.parametrize("shape", [(1, 1), (1, 1, 1), ()])
def test_static_per_tensor_scale_of_any_one_element_shape(shape, device, gen):
    """A [1, 1] per-tensor scale (as checkpoints and vLLM store it) is a per-tensor scale."""
    x = randn(9, 144, gen=gen, device=device, scale=3.0)
    scale = torch.full(shape, 0.011, device=device)
    q, s = quantize_fp8(x, "tensor", scale=scale)
    assert s.shape == (1,) and s.item() == scale.item()
    check_against_reference(x, "tensor", scale=scale.reshape(1))
    assert_codes_equal(
        q, fp8.quantize(x.cpu(), "tensor", scale.cpu().reshape(1))[0], "[1, 1] scale"
    )


def test_bool_is_not_a_group_size():
    with pytest.raises(TypeError, match="group_size must be int; got bool"):
        quantize_fp8(torch.ones(4, 16), "token", group_size=True)
