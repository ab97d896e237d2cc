"""FP8 numerics, scale calibration, QAT fake-quant and checkpoint formats.

`quant.fp8` is a leaf (torch only) that the kernels' CPU path shares; keep this package's
import free of modules that import `fp8nemo.kernels`, so the two never import each other.
"""

from .calibrate import Calibrator, calibrate_weight, quantize_weight
from .checkpoint import Checkpoint, QuantizedLinear, read_checkpoint, write_checkpoint
from .qat import convert_qat, fake_quant_fp8, prepare_qat

__all__ = [
    "Calibrator",
    "Checkpoint",
    "QuantizedLinear",
    "calibrate_weight",
    "convert_qat",
    "fake_quant_fp8",
    "prepare_qat",
    "quantize_weight",
    "read_checkpoint",
    "write_checkpoint",
]
