"""Quantisation-aware training for FP8: a fake-quant op with a straight-through estimator, and
`prepare_qat` / `convert_qat` for a model's linear layers.

The fake-quant forward is `dequantize(quantize(x))` with the e4m3 numerics of `fp8nemo/fp8.py`
(scale = amax / 448 at each step unless a static scale is given; for weights optionally that
scale rounded up to a power of two: codes x scale, a 4-bit significand times a power of two, is
then exact in bf16 (and in fp16 for scales from 2^-15 up), and accuracy is kept but in the
lowest binade, as e4m3's relative spacing is the same at every scale). Its backward passes the
gradient straight through where the cast rounds, |x| / scale <= 464 (the midpoint between
e4m3's largest value, 448, and the next power-of-two step, which rounds to 448), and stops it
where the cast saturates (only with a static scale: amax / 448 keeps every x inside) or x is
NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fp8nemo import fp8

QAT_GRANULARITIES = ("tensor", "row")  # row: one scale per output channel / per token
WEIGHT_SCALES = ("amax", "pow2")  # amax / 448, or that rounded up to a power of two
ROUNDS_TO_MAX = 464.0  # x / scale up to here rounds to 448 in e4m3; beyond, the cast saturates


def _fp8_granularity(granularity: str) -> str:
    if granularity not in QAT_GRANULARITIES:
        raise ValueError(f"granularity must be one of {QAT_GRANULARITIES}; got {granularity!r}")
    return "token" if granularity == "row" else "tensor"


def pow2_scale(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= amax / 448 (fp32): the largest |x| maps to a code in
    (224, 448]."""
    scale = fp8.scale_from_amax(amax)
    mantissa, exponent = torch.frexp(scale)  # scale = m * 2^e, m in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # 2^(e-1) already
    # A NaN or inf amax keeps its scale, as scale_from_amax's does.
    return torch.where(scale.isfinite(), torch.ldexp(torch.ones_like(scale), exponent), scale)


def _scale(x: torch.Tensor, granularity: str, rule: str) -> torch.Tensor:
    amax = fp8.amax(x.detach(), granularity)
    return pow2_scale(amax) if rule == "pow2" else fp8.scale_from_amax(amax)


class _FakeQuantFP8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, granularity, scale):
        full = fp8.expand_scale(scale, x.shape, granularity)
        q, _ = fp8.quantize(x.detach(), granularity, scale)
        ctx.save_for_backward((x.detach().float() / full).abs() <= ROUNDS_TO_MAX)
        return fp8.dequantize(q, scale, granularity).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None


def fake_quant_fp8(x: torch.Tensor, granularity: str = "tensor", scale: torch.Tensor | None = None):
    """x rounded through e4m3 and back (same dtype), with a straight-through gradient.

    granularity "tensor" or "row" (per last-dim row); `scale` (fp32, `[1]` or `[..., 1]`) makes
    it static, else scale = amax / 448 of the current x."""
    g = _fp8_granularity(granularity)
    return _FakeQuantFP8.apply(x, g, _scale(x, g, "amax") if scale is None else scale)


class QATLinear(torch.nn.Linear):
    """An nn.Linear whose forward sees its weight, and optionally its input, through FP8
    fake-quant. Same parameters and state_dict keys as the nn.Linear it replaces."""

    weight_granularity: str = "row"
    weight_scales: str = "amax"
    input_granularity: str | None = None

    def weight_scale(self) -> torch.Tensor:
        g = _fp8_granularity(self.weight_granularity)
        return _scale(self.weight, g, self.weight_scales)

    def forward(self, x):
        w = fake_quant_fp8(self.weight, self.weight_granularity, self.weight_scale())
        if self.input_granularity is not None:
            x = fake_quant_fp8(x, self.input_granularity)
        return torch.nn.functional.linear(x, w, self.bias)


def prepare_qat(
    model: torch.nn.Module,
    *,
    weight_granularity: str = "row",
    weight_scales: str = "amax",
    input_granularity: str | None = None,
    filter_fn: Callable[[str, torch.nn.Module], bool] | None = None,
) -> torch.nn.Module:
    """Put FP8 fake-quant on every nn.Linear weight of `model` (and on its input with
    `input_granularity`), in place; `filter_fn(name, module)` picks the layers. `weight_scales`
    "pow2" rounds each weight scale up to a power of two: codes x scale is then exact in a
    bf16 checkpoint, where amax / 448 scales need the converter to recover them."""
    _fp8_granularity(weight_granularity)
    if weight_scales not in WEIGHT_SCALES:
        raise ValueError(f"weight_scales must be one of {WEIGHT_SCALES}; got {weight_scales!r}")
    if input_granularity is not None:
        _fp8_granularity(input_granularity)
    found = 0
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and (filter_fn is None or filter_fn(name, module)):
            module.__class__ = QATLinear
            module.weight_granularity = weight_granularity
            module.weight_scales = weight_scales
            module.input_granularity = input_granularity
            found += 1
    if not found:
        raise ValueError("prepare_qat found no nn.Linear to prepare")
    return model


def convert_qat(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Turn the QAT layers back into nn.Linear and return their FP8 weights and scales,
    `{name: (w_fp8, scale)}` (scale `[1]` per tensor or `[N, 1]` per channel). Dequantized in
    fp32, each weight equals what the QAT forward used bit for bit in an fp32 model; in a 16-bit
    model the forward used `(codes * scale).to(dtype)`, so they are equal after rounding to the
    model's dtype."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QATLinear):
            granularity = "channel" if module.weight_granularity == "row" else "tensor"
            with torch.no_grad():
                out[name] = fp8.quantize(module.weight.detach(), granularity, module.weight_scale())
            module.__class__ = torch.nn.Linear
            del module.weight_granularity, module.weight_scales, module.input_granularity
    if not out:
        raise ValueError("convert_qat found no layer prepared by prepare_qat")
    return out
