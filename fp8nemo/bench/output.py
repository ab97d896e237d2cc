"""What a run leaves: CSV rows written as cases finish, the terminal and markdown tables, a
plot, and the comparison table `benchmarks/gpu_check.sh` prints from a CSV."""

from __future__ import annotations

import csv
import os
from dataclasses import asdict

from fp8nemo.utils import text_table

from .harness import CORRECTNESS_ONLY, Environment, Row, fmt

COLUMNS = [
    "date", "device", "capability", "torch", "triton", "fp8nemo", "python", "mode", "copy_gbps",
    "suite", "shape", "dims", "M", "N", "K", "impl", "scheme", "out_dtype", "median_ms",
    "tflops", "gbps", "roofline_pct", "bound", "rel_err", "note", "model", "tokens_per_s",
    "agreement", "peak_mib",
]  # fmt: skip
# Each suite's figure, and its unit: TFLOP/s for matrix work, GB/s for memory-bound ops,
# tokens/s for the whole model.
METRICS = {"decode": "gbps", "rope": "gbps", "e2e": "tokens_per_s"}
UNITS = {"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tokens/s"}


class CsvSink:
    """Rows appended to `<stem>.csv.partial` as each case finishes, so a run that is killed keeps
    what it measured; renamed to `<stem>.csv` when the run completes."""

    def __init__(self, out_dir: str, suite: str):
        self.out_dir, self.suite = out_dir, suite
        self.path = self._file = self._writer = None

    def add(self, env: Environment, rows: list[Row]) -> None:
        if self._writer is None:
            self.path = os.path.join(self.out_dir, result_stem(env, self.suite) + ".csv")
            self._file = open(self.path + ".partial", "w", newline="")  # noqa: SIM115
            self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS)
            self._writer.writeheader()
        for r in rows:
            d = {**r.env, **{k: v for k, v in asdict(r).items() if k != "env"}}
            self._writer.writerow({k: d.get(k) for k in COLUMNS})
        self._file.flush()

    def __enter__(self) -> CsvSink:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._file is not None:
            self._file.close()
            if exc_type is None:
                os.replace(self.path + ".partial", self.path)


def _metric(suite: str) -> str:
    return METRICS.get(suite, "tflops")


def _own_tables(rows: list[Row]):
    """The suite module that prints its rows its own way (e2e, quantize), else None."""
    if rows and rows[0].suite in ("e2e", "quantize"):
        import importlib

        return importlib.import_module(f"{__package__}.{rows[0].suite}")
    return None


def format_table(env: Environment, rows: list[Row]) -> str:
    suite = _own_tables(rows)
    if suite is not None:  # e2e: the whole model side by side; quantize: MB/s beside the floor
        return suite.format_table(env, rows)
    head = f"{env.device} (cc {env.capability}), torch {env.torch}, triton {env.triton}, {env.date}"
    if env.on_gpu:
        head += f", copy {env.copy_gbps:.0f} GB/s"
        if env.peak_fp8_tflops is None:
            head += " (no datasheet peak for this GPU: % of roofline left blank)"
    else:
        head = f"{CORRECTNESS_ONLY.upper()}: timings are the interpreter's, not a GPU's\n{head}"
    cols = ("shape", "dims", "impl", "scheme", "ms", "TFLOP/s", "GB/s", "%roof", "rel err")
    table = [cols]
    for r in rows:
        table.append((
            r.shape, r.dims, r.impl, r.scheme, fmt(r.median_ms, ".4f"), fmt(r.tflops, ".1f"),
            fmt(r.gbps, ".0f"), fmt(r.roofline_pct, ".0f"),
            fmt(r.rel_err, ".1e") if not r.note else r.note[:40],
        ))  # fmt: skip
    return "\n".join([head, "", *text_table(table, "right")])


def format_markdown(env: Environment, rows: list[Row]) -> str:
    suite = _own_tables(rows)
    if suite is not None:
        return suite.format_markdown(env, rows)
    lines = [
        f"**{env.device}** (cc {env.capability}) · torch {env.torch} · triton {env.triton} · "
        f"fp8nemo {env.fp8nemo} · {env.date} · mode: {env.mode}"
        + (f" · measured copy bandwidth {env.copy_gbps:.0f} GB/s" if env.copy_gbps else ""),
        "",
        "| shape | dims | impl | scheme | ms | TFLOP/s | GB/s | % roofline | rel err |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.dims} | {r.impl} | {r.scheme} | {fmt(r.median_ms, '.4f')} | "
            f"{fmt(r.tflops, '.1f')} | {fmt(r.gbps, '.0f')} | {fmt(r.roofline_pct, '.0f')} | "
            f"{r.note or fmt(r.rel_err, '.1e')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: str) -> None:
    """One bar group per case: the suite's figure (METRICS) for each implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = _metric(rows[0].suite) if rows else "tflops"
    cases = list(dict.fromkeys((r.shape, r.dims) for r in rows))
    impls = list(dict.fromkeys(f"{r.impl} {r.scheme}" for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 1.2), 5))
    width = 0.8 / max(len(impls), 1)
    values = {((r.shape, r.dims), f"{r.impl} {r.scheme}"): getattr(r, metric) for r in rows}
    for i, impl in enumerate(impls):
        vals = [values.get((case, impl)) or 0.0 for case in cases]
        ax.bar([c + i * width for c in range(len(cases))], vals, width, label=impl)
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))])
    ax.set_xticklabels([f"{s}\n{d}".replace(" ", "\n") for s, d in cases], fontsize=6)
    ax.set_ylabel(UNITS[metric])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def result_stem(env: Environment, suite: str) -> str:
    slug = "".join(c if c.isalnum() else "-" for c in env.device).strip("-").lower() or "device"
    return f"bench_{suite}_{slug}_{env.date.replace(':', '')}"


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def format_compare(rows: list[dict]) -> str:
    """One line per case of a bench CSV: the suite's figure (METRICS) for each implementation
    and scheme, and our best over the best baseline's."""
    if not rows:
        return "(no rows)"
    metric = _metric(rows[0]["suite"])
    cases = {}
    for r in rows:
        label = f"{r['impl'].replace('torch.', '')} {r['scheme']}".replace(" -", "")
        cases.setdefault((r["shape"], r["dims"]), {})[label] = (
            float(r[metric]) if r[metric] else None
        )
    labels = list(dict.fromkeys(label for v in cases.values() for label in v))
    head = ["shape", "dims", *labels, "ours/baseline"]
    table = [head]
    for (shape, dims), vals in cases.items():
        ours = [v for k, v in vals.items() if k.startswith("fp8nemo") and v]
        theirs = [v for k, v in vals.items() if not k.startswith("fp8nemo") and v]
        ratio = f"{max(ours) / max(theirs):.2f}" if ours and theirs else "-"
        table.append([shape, dims, *(fmt(vals.get(k), ".0f") for k in labels), ratio])
    return "\n".join([f"{rows[0]['suite']}: {UNITS[metric]} (median)", *text_table(table, "right")])
