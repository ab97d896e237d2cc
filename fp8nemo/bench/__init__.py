"""Kernel benchmarks at NeMo-12B shapes beside the baselines a user would pick, with TFLOP/s,
GB/s and % of roofline, written as CSV rows that name the device, versions and date.

Without a GPU the same suites run small shapes through the Triton interpreter; their figures are
labelled "correctness only". The e2e suite times the whole model beside HF transformers.
`harness` runs a suite, one module per suite times its cases, `output` writes and prints rows.
"""

from . import e2e
from .gemm import CPU_SHRINK, GEMM_SCHEMES, NEMO_GEMM_SHAPES
from .harness import CORRECTNESS_ONLY, SUITES, Environment, Row, failed_checks, run_suite
from .output import CsvSink, format_compare, format_markdown, format_table, plot, read_csv

__all__ = [
    "CORRECTNESS_ONLY",
    "CPU_SHRINK",
    "GEMM_SCHEMES",
    "NEMO_GEMM_SHAPES",
    "SUITES",
    "CsvSink",
    "Environment",
    "Row",
    "e2e",
    "failed_checks",
    "format_compare",
    "format_markdown",
    "format_table",
    "plot",
    "read_csv",
    "run_suite",
]
