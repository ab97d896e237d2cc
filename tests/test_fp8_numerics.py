"""The torch reference of the FP8 numerics (fp8nemo/fp8.py), and the interpreter's float casts that
fp8nemo corrects to match the GPU."""

import pytest
import torch
from conftest import DEVICE
from helpers import randn

from fp8nemo import fp8

E4M3 = torch.float8_e4m3fn
CODES = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3)
FINITE = ~CODES.float().isnan()


def nearest_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Brute force: the finite e4m3 value nearest each x, ties to the even code, saturating."""
    codes = torch.arange(256)[FINITE]
    grid = CODES[FINITE].float().double()
    d = (x.double()[:, None] - grid[None, :]).abs()
    best = d.min(1, keepdim=True).values
    # Among equally near codes prefer the even mantissa; +0 over -0 does not matter (equal).
    cand = (d == best) & (codes[None, :] % 2 == 0)
    cand = torch.where(cand.any(1, keepdim=True), cand, d == best)
    return grid[cand.int().argmax(1)].float()


def test_saturating_cast_rounds_to_nearest_even_and_saturates(gen):
    x = torch.cat(
        [
            randn(4000, gen=gen, scale=100.0),
            randn(2000, gen=gen, scale=0.01),  # subnormals (below 2^-6)
            randn(500, gen=gen, scale=2000.0),  # beyond +-448
        ]
    )
    grid = CODES[FINITE].float().unique()
    mids = (grid[1:] + grid[:-1]) / 2  # exact ties
    x = torch.cat([x, mids, -mids])
    got = fp8.saturating_cast(x).float()
    want = nearest_e4m3(x.clamp(-448, 448))
    assert torch.equal(got, want), (x[got != want][:5], got[got != want][:5])


def test_saturating_cast_special_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -0.0, 448.0, 464.0])
    y = fp8.saturating_cast(x)
    assert y[0].float().isnan()
    assert y[1:4].float().tolist() == [448.0, -448.0, 448.0]
    assert y[4].view(torch.uint8).item() == 0x80  # -0 keeps its sign
    assert y[5:].float().tolist() == [448.0, 448.0]


def test_scale_from_amax_floor_and_nan():
    amax = torch.tensor([0.0, 1e-20, 448.0, 3.5, float("nan")])
    s = fp8.scale_from_amax(amax)
    assert s.dtype == torch.float32
    assert s[0].item() == s[1].item() == pytest.approx(fp8.AMAX_FLOOR / 448.0)
    assert s[0].item() > 0
    assert s[2].item() == 1.0
    assert s[3].item() == torch.tensor(3.5 / 448.0, dtype=torch.float32).item()
    assert s[4].isnan()


@pytest.mark.parametrize("shape", [(5, 7), (130, 300), (257, 128), (1, 1)])
@pytest.mark.parametrize("granularity", ["tensor", "token", "channel", "group", "block"])
def test_amax_and_groups_match_a_loop(shape, granularity, gen):
    """amax per scale, and `groups` holding each scale's elements (zero padding aside)."""
    x = randn(*shape, gen=gen)
    got = fp8.amax(x, granularity)
    assert tuple(got.shape) == fp8.scale_shape(x.shape, granularity)
    sums = fp8.groups(x, granularity).sum(-1)
    b = fp8.BLOCK
    want, want_sums = torch.empty(got.shape), torch.empty(got.shape)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in got.shape]).reshape(-1, got.dim()):
        i = tuple(idx.tolist())
        if granularity == "tensor":
            part = x
        elif granularity in ("token", "channel"):
            part = x[i[0]]
        elif granularity == "group":
            part = x[i[0], i[1] * b : (i[1] + 1) * b]
        else:
            part = x[i[0] * b : (i[0] + 1) * b, i[1] * b : (i[1] + 1) * b]
        want[i], want_sums[i] = part.abs().max(), part.sum()
    assert torch.equal(got, want)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("granularity", ["tensor", "token", "group", "block"])
def test_quantize_error_is_half_an_fp8_step(granularity, gen):
    x = randn(200, 300, gen=gen, scale=3.0)
    q, s = fp8.quantize(x, granularity)
    assert q.dtype == E4M3 and s.dtype == torch.float32
    deq = fp8.dequantize(q, s, granularity)
    s_full = fp8.expand_scale(s, x.shape, granularity)
    # e4m3 spacing: 2^(e-3) for normals |v| >= 2^-6, 2^-9 below; half of it, in x's units.
    v = (x / s_full).abs()
    step = torch.where(v >= 2**-6, torch.exp2(torch.floor(torch.log2(v)) - 3), 2.0**-9)
    assert ((deq - x).abs() <= step / 2 * s_full * (1 + 1e-6)).all()
    # amax maps to +-448 exactly: the scale uses the whole range.
    assert (q.float().abs().amax() == 448.0).item()


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter only runs on the CPU")
class TestInterpreterCasts:
    """The interpreter converts floats like the GPU (cvt.rn, cvt.rn.satfinite for FP8)."""

    @staticmethod
    def _convert(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        import triton
        import triton.language as tl

        from fp8nemo.kernels._triton import INTERPRET

        assert INTERPRET
        tl_dtypes = {
            torch.float32: tl.float32,
            torch.bfloat16: tl.bfloat16,
            torch.float8_e4m3fn: tl.float8e4nv,
            torch.float16: tl.float16,
        }

        @triton.jit
        def cast_kernel(x_ptr, y_ptr, n, OUT: tl.constexpr, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n)
            tl.store(y_ptr + offs, x.to(OUT), mask=offs < n)

        y = torch.empty(x.shape, dtype=dtype)
        cast_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), tl_dtypes[dtype], 4096)
        return y

    def test_every_fp16_value_to_e4m3(self):
        x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
        got = self._convert(x, E4M3)
        want = fp8.saturating_cast(x)
        nan = want.float().isnan()
        assert torch.equal(got.float().isnan(), nan)
        assert torch.equal(got.view(torch.uint8)[~nan], want.view(torch.uint8)[~nan])

    def test_every_e4m3_code_to_fp32(self):
        got = self._convert(CODES, torch.float32)
        want = CODES.float()
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got[FINITE], want[FINITE])

    def test_bf16_dot_multiplies_values(self, gen):
        """tl.dot on bf16 tiles: exact products accumulated in fp32, as the tensor cores do."""
        import triton
        import triton.language as tl

        from fp8nemo.kernels._triton import INTERPRET  # importing it applies the fixes

        assert INTERPRET

        @triton.jit
        def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
            r = tl.arange(0, N)
            a = tl.load(a_ptr + r[:, None] * N + r[None, :])
            b = tl.load(b_ptr + r[:, None] * N + r[None, :])
            tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))

        a, b = randn(16, 16, gen=gen).bfloat16(), randn(16, 16, gen=gen).bfloat16()
        c = torch.empty(16, 16)
        dot_kernel[(1,)](a, b, c, 16)
        want = a.double() @ b.double()
        assert (
            (c.double() - want).abs() <= 16 * 2.0**-24 * (a.double().abs() @ b.double().abs())
        ).all()

    def test_fp32_to_bf16_rounds_to_nearest_even(self, gen):
        x = randn(10000, gen=gen)
        ties = (x.view(torch.int32) & ~0xFFFF) | 0x8000  # exactly halfway between two bf16
        x = torch.cat([x, ties.view(torch.float32)])
        assert torch.equal(self._convert(x, torch.bfloat16), x.to(torch.bfloat16))


@pytest.mark.parametrize(
    "shape, granularity",
    [((0, 300), "group"), ((3, 0, 300), "group"), ((0, 64), "token"), ((0, 64), "tensor"),
     ((0, 300), "channel"), ((0, 300), "block"), ((5, 0), "block")],
)  # fmt: skip
def test_no_elements_quantize_to_empty_scales(shape, granularity):
    """No rows (or columns): groups() views them as scale_shape + (elements,), and quantize
    gives empty codes and scales of that shape (a per-tensor one: the floor scale)."""
    x = torch.empty(shape)
    want = fp8.scale_shape(shape, granularity)
    assert fp8.groups(x, granularity).shape[:-1] == want
    q, s = fp8.quantize(x, granularity)
    assert q.shape == shape and s.shape == want
    if granularity == "tensor":
        assert torch.equal(s, fp8.scale_from_amax(torch.zeros(1)))


def test_a_one_element_scale_is_per_tensor(gen):
    assert all(fp8.is_per_tensor(torch.ones(shape)) for shape in ((), (1,), (1, 1), (1, 1, 1)))
    assert not any(fp8.is_per_tensor(torch.ones(shape)) for shape in ((2,), (0,), (1, 2)))
    x = randn(6, 144, gen=gen)
    s = torch.full((1, 1), 0.01)
    want = fp8.quantize(x, "tensor", s.reshape(1))[0]
    assert torch.equal(fp8.quantize(x, "tensor", s)[0].view(torch.uint8), want.view(torch.uint8))
