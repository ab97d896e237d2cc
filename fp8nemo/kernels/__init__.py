"""Triton kernels, one op per file, each registered as `torch.ops.fp8nemo.<name>`."""

from ._triton import value_checks
from .attention import flash_attention, v_key_major
from .decode import append_attention, decode_attention
from .fp8_gemm import fp8_gemm
from .norm import rmsnorm_fp8
from .quantize import quantize_fp8
from .rope import rope_, rope_cache, rope_kv_cache_
from .swiglu import silu_mul_fp8

__all__ = [
    "append_attention",
    "decode_attention",
    "flash_attention",
    "fp8_gemm",
    "quantize_fp8",
    "rmsnorm_fp8",
    "rope_",
    "rope_cache",
    "rope_kv_cache_",
    "silu_mul_fp8",
    "v_key_major",
    "value_checks",
]
