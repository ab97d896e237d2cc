"""FP8 accuracy validation: metrics of an FP8 model against its reference and the
`fp8nemo validate` report built from them."""

from .metrics import LogitStats, TensorStats, divergence, perplexity, sqnr_db
from .report import Settings, format_markdown, format_table, missed, plot, run

__all__ = [
    "LogitStats",
    "Settings",
    "TensorStats",
    "divergence",
    "format_markdown",
    "format_table",
    "missed",
    "perplexity",
    "plot",
    "run",
    "sqnr_db",
]
