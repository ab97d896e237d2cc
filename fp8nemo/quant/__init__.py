"""FP8 numerics, scale calibration, QAT fake-quant and checkpoint formats."""
