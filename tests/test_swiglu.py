"""silu_mul_fp8 against its torch reference: the codes and scales that quantize_fp8 gives the
reference's fp32 SiLU(gate) * up.

Both compute g / (1 + exp(-g)) * up with one rounding per operation; only exp differs. The
GPU's is CUDA's __expf (ex2.approx of g * log2(e)), within (2 + 1.173 |g|) ulp, torch's and the
interpreter's (numpy) within 1 ulp, and one fp32 ulp is at most 2u relative, so the two exp(-g)
differ by at most e = (1 + (4 + 2.346 |g|) u) (1 + 2u) - 1. That carries through 1 + exp(-g)
(shrunk by exp / (1 + exp) < 1) and the division, and the add, the division and the product with
up round once each side: |y / y_ref - 1| <= (1 / (1 - e)) ((1 + u) / (1 - u))^3 - 1. A code may
differ by one step only where the reference's quotient lies that close to an e4m3 rounding
boundary (helpers.assert_quantized_like).
"""

import importlib

import pytest
import torch
from helpers import (
    E4M3_NAN_CODE,
    UNIT_ROUNDOFF,
    assert_quantized_like,
    check_bad_input,
    poisoned,
    randn,
    run_on_torch_path,
)

from fp8nemo import fp8
from fp8nemo.kernels import silu_mul_fp8
from fp8nemo.kernels.swiglu import silu_mul_reference

S = importlib.import_module("fp8nemo.kernels.swiglu")
Q = importlib.import_module("fp8nemo.kernels.quantize")
E4M3 = torch.float8_e4m3fn
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 64), (5, 1), (17, 200), (3, 7, 200), (2, 14336)]
GRANULARITIES = ["token", "group", "static"]


def silu_mul_rel(gate: torch.Tensor) -> torch.Tensor:
    """Bound on |y / y_ref - 1| for each element (module docstring)."""
    u = UNIT_ROUNDOFF[torch.float32]
    g = gate.double().abs().cpu()
    e = (1 + (4 + 2.346 * g) * u) * (1 + 2 * u) - 1
    return (1 / (1 - e)) * ((1 + u) / (1 - u)) ** 3 - 1


def static_scale(gen, device):
    # Small enough that the largest products saturate at +-448.
    return (torch.rand(1, generator=gen) * 0.01 + 0.01).to(device)


def fused_gate_up(shape, dtype, device, gen):
    """gate and up as the two halves of one [..., 2I] GEMM output (row stride 2I, no copy)."""
    I = shape[-1]
    gu = randn(*shape[:-1], 2 * I, gen=gen, dtype=dtype, device=device, scale=2.0)
    return gu[..., :I], gu[..., I:]


def check(gate, up, granularity, gen, group_size=128, what=""):
    scale = static_scale(gen, gate.device) if granularity == "static" else None
    gran = "token" if granularity == "static" else granularity
    q, s = silu_mul_fp8(gate, up, scale=scale, granularity=gran, group_size=group_size)
    want_shape = (1,) if scale is not None else fp8.scale_shape(gate.shape, gran, group_size)
    assert s.shape == want_shape and s.dtype == torch.float32
    y_ref = silu_mul_reference(gate.cpu(), up.cpu())
    assert_quantized_like(q, s, y_ref, silu_mul_rel(gate), gran, scale, group_size,
                          what or f"silu_mul_fp8 {granularity}")  # fmt: skip
    return q, s


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(dtype, shape, granularity, device, gen):
    gate, up = fused_gate_up(shape, dtype, device, gen)
    assert gate.stride(-2) == 2 * shape[-1]  # views of one tensor, no copy
    q, s = check(gate, up, granularity, gen)
    # The op allocates its outputs: every element must have been written with a real value.
    assert not ((q.view(torch.uint8) & 0x7F) == E4M3_NAN_CODE).any(), "a code is NaN"
    assert (s.isfinite() & (s > 0)).all(), "a scale is not positive and finite"


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_separate_tensors_with_their_own_row_strides(granularity, device, gen):
    gate = randn(5, 3, 300, gen=gen, dtype=torch.float16, device=device)[..., 50:250]
    up = randn(5, 3, 200, gen=gen, dtype=torch.float16, device=device)
    check(gate, up, granularity, gen)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_row_longer_than_one_tile(granularity, device, gen):
    """I past ROW_TILE_MAX: per token the row is read twice (amax, then codes); group and static
    tiles split it."""
    I = 20000
    assert I > Q.ROW_TILE_MAX
    gate, up = fused_gate_up((3, I), torch.bfloat16, device, gen)
    check(gate, up, granularity, gen)


@pytest.mark.parametrize("group_size", [32, 256])
def test_other_group_sizes(group_size, device, gen):
    gate, up = fused_gate_up((4, 300), torch.bfloat16, device, gen)
    check(gate, up, "group", gen, group_size=group_size)


def test_large_gate_values(device, gen):
    """|g| up to 60: exp(-g) near fp32's range ends, where the GPU's __expf is least accurate."""
    gate = randn(6, 256, gen=gen, device=device, scale=20.0).clamp(-60, 60)
    up = randn(6, 256, gen=gen, device=device)
    for granularity in GRANULARITIES:
        check(gate, up, granularity, gen)


@pytest.mark.parametrize("shape", [(), (1, 1)], ids=str)
def test_static_scale_of_any_one_element_shape(shape, device, gen):
    gate, up = fused_gate_up((9, 144), torch.bfloat16, device, gen)
    scale = torch.full(shape, 0.011, device=device)
    for granularity in ("token", "tensor"):
        q, s = silu_mul_fp8(gate, up, scale=scale, granularity=granularity)
        assert s.shape == (1,) and s.item() == scale.item()
        assert_quantized_like(q, s, silu_mul_reference(gate.cpu(), up.cpu()),
                              silu_mul_rel(gate), "tensor", scale, what=f"{shape} scale")  # fmt: skip


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_nan_input(granularity, device, gen):
    """A NaN in gate makes that y NaN, quantized by quantize_fp8's rule: NaN reaches its row's
    (token) or group's scale; static: only that code. Other rows and groups are untouched."""
    gate, up = fused_gate_up((6, 300), torch.bfloat16, device, gen)
    gate[2, 140] = float("nan")
    q, s = check(gate, up, granularity, gen)
    nan = ((q.view(torch.uint8) & 0x7F) == E4M3_NAN_CODE).cpu()
    want = torch.zeros(6, 300, dtype=torch.bool)
    want[
        2, {"token": slice(None), "group": slice(128, 256), "static": slice(140, 141)}[granularity]
    ] = True
    assert torch.equal(nan, want), "NaN codes in the wrong places"
    if granularity != "static":
        assert torch.equal(s.isnan().cpu(), fp8.amax(want.float(), granularity) > 0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_infinite_input(granularity, device, gen):
    """silu(+inf) * up = +-inf and silu(-inf) = -inf / inf = NaN (g / (1 + exp(-g))), as in the
    reference; then quantize_fp8's rule (an inf amax makes an inf scale, NaN codes at inf, 0
    elsewhere in that row or group)."""
    gate, up = fused_gate_up((6, 300), torch.float32, device, gen)
    gate[1, 3], gate[4, 200], up[0, 7] = float("inf"), -float("inf"), -float("inf")
    check(gate, up, granularity, gen)


def test_launches_write_every_element(device, gen):
    """The launcher on NaN-poisoned outputs, for every scale kind and both tile paths."""
    for I in (200, 20000):
        gate, up = fused_gate_up((3, I), torch.float16, device, gen)
        y_ref = silu_mul_reference(gate.cpu(), up.cpu())
        for granularity in GRANULARITIES:
            scale = static_scale(gen, device) if granularity == "static" else None
            gran = "token" if scale is not None else granularity
            shape = (1,) if scale is not None else fp8.scale_shape(gate.shape, gran)
            q = poisoned(gate.shape, E4M3, device)
            s = scale.clone() if scale is not None else poisoned(shape, torch.float32, device)
            for step in S._launches(gate, up, q, scale, s, gran, 128):
                step()
            assert_quantized_like(q, s, y_ref, silu_mul_rel(gate), gran, scale,
                                  what=f"launcher I={I} {granularity}")  # fmt: skip


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 200)], ids=str)
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_zero_rows_give_empty_outputs(shape, granularity, device, gen):
    gate, up = (torch.empty(shape, dtype=torch.bfloat16, device=device) for _ in range(2))
    scale = static_scale(gen, device) if granularity == "static" else None
    gran = "token" if scale is not None else granularity
    q, s = silu_mul_fp8(gate, up, scale=scale, granularity=gran)
    want_shape = (1,) if scale is not None else fp8.scale_shape(shape, gran)
    assert q.shape == shape and q.dtype == E4M3 and s.shape == want_shape
    if scale is not None:
        assert torch.equal(s, scale)


def _bad(**overrides):
    kwargs = dict(gate=torch.ones(4, 16), up=torch.ones(4, 16))
    kwargs.update(overrides)
    return kwargs


GU = torch.ones(4, 32)
BAD_INPUTS = [
    (_bad(gate=1.0), TypeError, "gate must be torch.Tensor; got float"),
    (_bad(up=None), TypeError, "up must be torch.Tensor; got NoneType"),
    (
        _bad(gate=torch.ones(4, 16, dtype=torch.int32)),
        TypeError,
        "gate must have dtype float32, float16, bfloat16; got torch.int32",
    ),
    (
        _bad(gate=torch.ones(4, 16).to(E4M3), up=torch.ones(4, 16).to(E4M3)),
        TypeError,
        "gate must have dtype",
    ),
    (
        _bad(up=torch.ones(4, 16, dtype=torch.bfloat16)),
        TypeError,
        "up must have dtype float32; got torch.bfloat16",
    ),
    (
        _bad(gate=torch.tensor(1.0), up=torch.tensor(1.0)),
        ValueError,
        "gate must have a non-empty last dimension I",
    ),
    (_bad(gate=torch.ones(4, 0), up=torch.ones(4, 0)), ValueError, "non-empty last dimension"),
    (_bad(up=torch.ones(4, 17)), ValueError, r"up must have gate's shape \[4, 16\]; got \[4, 17\]"),
    (_bad(up=torch.ones(2, 4, 16)), ValueError, "up must have gate's shape"),
    (
        _bad(gate=torch.ones(16, 4).t()),
        ValueError,
        r"gate must have unit stride in its last dimension; got strides \[1, 4\]",
    ),
    (_bad(up=torch.ones(16, 4).t()), ValueError, "up must have unit stride"),
    (
        _bad(gate=torch.ones(3, 4, 16).transpose(0, 1), up=torch.ones(4, 3, 16)),
        ValueError,
        "gate with shape .* cannot be viewed as",
    ),
    (_bad(up=torch.ones(4, 16, device="meta")), ValueError, "up is on meta but gate is on cpu"),
    (_bad(granularity="channel"), ValueError, "granularity must be one of"),
    (_bad(granularity="tensor"), ValueError, "granularity='tensor' needs a static scale"),
    (
        _bad(granularity="group", group_size=100),
        ValueError,
        "group_size must be one of .*; got 100",
    ),
    (_bad(group_size=2.0), TypeError, "group_size must be int; got float"),
    (
        _bad(granularity="group", scale=torch.ones(1)),
        ValueError,
        "granularity='group' takes no scale",
    ),
    (_bad(scale=torch.ones(1, dtype=torch.bfloat16)), TypeError, "scale must have dtype float32"),
    (
        _bad(scale=torch.ones(4, 1)),
        ValueError,
        r"scale must have one element .*; got shape \[4, 1\]",
    ),
    (
        _bad(scale=torch.full((1,), float("inf"))),
        ValueError,
        "scale must be positive and finite; got inf",
    ),
    (_bad(scale=torch.zeros(())), ValueError, "scale must be positive and finite; got 0.0"),
    (_bad(scale=torch.ones(1, device="meta")), ValueError, "scale is on meta but gate is on cpu"),
    (_bad(gate=GU[:, :16], up=GU[:, 16:]), None, None),  # the halves of one GEMM output
    (_bad(gate=GU[:, :16], up=GU[:, :16]), None, None),  # one tensor twice: read only
    (_bad(scale=torch.ones(1, 1), granularity="tensor"), None, None),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
def test_bad_input_is_a_clear_error(kwargs, error, match):
    check_bad_input(silu_mul_fp8, kwargs, error, match)


@pytest.mark.parametrize(
    "granularity, static", [("token", False), ("group", False), ("token", True)]
)
def test_opcheck(granularity, static, device, gen):
    gate, up = fused_gate_up((5, 3, 144), torch.bfloat16, device, gen)
    kwargs = {"granularity": granularity}
    if static:
        kwargs["scale"] = static_scale(gen, device)
    torch.library.opcheck(torch.ops.fp8nemo.silu_mul_fp8.default, (gate, up), kwargs)
    empty = torch.empty(0, 144, dtype=torch.bfloat16, device=device)
    torch.library.opcheck(torch.ops.fp8nemo.silu_mul_fp8.default, (empty, empty), kwargs)


def mlp_input(gu):
    # gu: [B, S, 2I] gate/up GEMM output -> the dequantized FP8 input of the down projection
    I = gu.shape[-1] // 2
    q, s = silu_mul_fp8(gu[..., :I], gu[..., I:])
    return q.float() * s


@pytest.mark.slow
def test_torch_compile_fullgraph(device, gen):
    torch._dynamo.reset()
    gu = randn(2, 7, 320, gen=gen, dtype=torch.bfloat16, device=device)
    eager = mlp_input(gu)
    compiled = torch.compile(mlp_input, fullgraph=True)(gu)
    # The op runs the same kernel; only the dequantizing multiply is compiled.
    assert torch.equal(compiled, eager)


TORCH_PATH = """
import torch
from fp8nemo import fp8
from fp8nemo.kernels import silu_mul_fp8
from fp8nemo.kernels._triton import INTERPRET
from fp8nemo.kernels.swiglu import silu_mul_reference
assert not INTERPRET
g = torch.Generator().manual_seed(0)
gu = torch.randn(3, 5, 400, generator=g).bfloat16()
gate, up = gu[..., :200], gu[..., 200:]
for granularity, scale in (("token", None), ("group", None), ("token", torch.full((), 0.01))):
    q, s = silu_mul_fp8(gate, up, scale=scale, granularity=granularity)
    y = silu_mul_reference(gate, up)
    want_q, want_s = fp8.quantize(y, "tensor" if scale is not None else granularity, scale)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8)), granularity
    assert torch.equal(s, want_s.reshape(s.shape)), granularity
    assert s.shape == ((1,) if scale is not None else fp8.scale_shape(gate.shape, granularity))
q, s = silu_mul_fp8(gate[:0], up[:0], granularity="group")
assert q.shape == (0, 5, 200) and s.shape == (0, 5, 2)
print("ok")
"""


def test_torch_path_is_the_reference():
    """Without TRITON_INTERPRET, CPU tensors take the torch path: the reference, exactly."""
    assert run_on_torch_path(TORCH_PATH) == "ok"
