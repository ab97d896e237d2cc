"""Scale calibration, QAT fake-quant and checkpoint formats: FP8 weights and scales as data.

It builds on the numerics leaf `fp8nemo.fp8` and never imports `fp8nemo.model` (a test checks
the layering).
"""

from .calibrate import Calibrator, calibrate_weight, quantize_weight
from .checkpoint import Checkpoint, FP8Weight, read_checkpoint, write_checkpoint
from .qat import convert_qat, fake_quant_fp8, prepare_qat

__all__ = [
    "Calibrator",
    "Checkpoint",
    "FP8Weight",
    "calibrate_weight",
    "convert_qat",
    "fake_quant_fp8",
    "prepare_qat",
    "quantize_weight",
    "read_checkpoint",
    "write_checkpoint",
]
