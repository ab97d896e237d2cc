"""The FP8 backend's linear layer and what it shares with the fused quantization ops: the
scheme (weight granularity, dynamic or static activations) and the quantized activation they
pass to each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from fp8nemo import fp8
from fp8nemo.kernels import fp8_gemm, quantize_fp8

WEIGHT_SCHEMES = ("tensor", "channel", "block")
ACTIVATION_SCHEMES = ("dynamic", "static")


@dataclass(frozen=True)
class FP8Scheme:
    """How every block linear of the FP8 backend quantizes: `weights` per tensor, output
    channel or 128x128 block; `activations` per token (1x128 groups for block weights) at run
    time, or static per-tensor scales from calibration."""

    weights: str = "channel"
    activations: str = "dynamic"

    def __post_init__(self):
        if self.weights not in WEIGHT_SCHEMES:
            raise ValueError(f"weights must be one of {WEIGHT_SCHEMES}; got {self.weights!r}")
        if self.activations not in ACTIVATION_SCHEMES:
            raise ValueError(
                f"activations must be one of {ACTIVATION_SCHEMES}; got {self.activations!r}"
            )
        if self.weights == "block" and self.activations == "static":
            raise ValueError(
                "block weights take dynamic 1x128 activation groups (fp8_gemm's group x block "
                "pair); static activations need tensor or channel weights"
            )

    @property
    def activation_granularity(self) -> str:
        """quantize_fp8's granularity for this scheme's activations."""
        if self.weights == "block":
            return "group"
        return "tensor" if self.activations == "static" else "token"

    @property
    def static(self) -> bool:
        return self.activations == "static"


class QuantizedActivation(NamedTuple):
    """e4m3 activations `[T, K]` and their fp32 dequant scale, as quantize_fp8 returns them."""

    data: torch.Tensor
    scale: torch.Tensor


def static_scale_buffer(module: nn.Module, scheme: FP8Scheme, device=None) -> None:
    """Give `module` an `input_scale` buffer ([1] fp32) for static activations, else None."""
    if scheme.static:
        module.register_buffer("input_scale", torch.ones(1, device=device))
    else:
        module.input_scale = None


class FP8Linear(nn.Module):
    """`y = x @ W.T + bias` on `fp8_gemm`: `weight` e4m3 `[N, K]` and fp32 `weight_scale`
    (`[1]`, `[N, 1]` or `[ceil(N/128), ceil(K/128)]`) as buffers, plus `input_scale` `[1]` for
    static activations and an optional `bias` `[N]` in `out_dtype`. Takes 16-bit activations
    `[..., K]` (quantized here) or a `QuantizedActivation` `[T, K]` from a fused op; returns
    `out_dtype`."""

    def __init__(self, in_features: int, out_features: int, scheme: FP8Scheme,
                 out_dtype: torch.dtype = torch.bfloat16, device=None,
                 bias: bool = False):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.out_dtype = scheme, out_dtype
        shape = fp8.scale_shape((out_features, in_features), scheme.weights)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=fp8.E4M3,
                                                   device=device))  # fmt: skip
        self.register_buffer("weight_scale", torch.ones(shape, device=device))
        static_scale_buffer(self, scheme, device)
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=out_dtype, device=device))
        else:
            self.bias = None

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        # x: [..., K] 16-bit, or [T, K] already quantized by a fused op -> [..., N] out_dtype
        if isinstance(x, QuantizedActivation):
            return fp8_gemm(x.data, x.scale, self.weight, self.weight_scale, self.bias,
                            out_dtype=self.out_dtype)  # fmt: skip
        lead = x.shape[:-1]
        a, a_scale = quantize_fp8(x.reshape(-1, x.shape[-1]), self.scheme.activation_granularity,
                                  scale=self.input_scale)  # fmt: skip
        out = fp8_gemm(a, a_scale, self.weight, self.weight_scale, self.bias,
                       out_dtype=self.out_dtype)  # fmt: skip
        return out.view(*lead, self.out_features)

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight `[N, K]` this layer multiplies by."""
        return fp8.dequantize(self.weight, self.weight_scale, self.scheme.weights)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weights={self.scheme.weights}, activations={self.scheme.activations}, "
            f"bias={self.bias is not None}, out_dtype={str(self.out_dtype).removeprefix('torch.')}"
        )
