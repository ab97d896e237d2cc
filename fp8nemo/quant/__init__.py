"""FP8 numerics, scale calibration, QAT fake-quant and checkpoint formats.

`quant.fp8` is a leaf (torch only) that the kernels' CPU path shares; keep this package's
import free of modules that import `fp8nemo.kernels`, so the two never import each other.
"""
