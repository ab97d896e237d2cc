"""The quantize benchmark suite runs on a tiny synthetic checkpoint and measures every case."""

from fp8nemo.bench import quantize as suite
from fp8nemo.bench.harness import run_suite


def test_quantize_suite_runs_on_a_tiny_checkpoint():
    env, rows = run_suite("quantize", model="tiny")
    impls = {(r.impl, r.scheme) for r in rows}
    assert impls == {("fp8nemo", f"{s}/{m}") for s in suite.SCHEMES for m in suite.METHODS} | {
        ("torch absmax (floor)", "channel/absmax")
    }
    for r in rows:
        assert r.gbps > 0 and r.peak_mib > 0 and "MB/s" in r.note, r
        assert suite.passed(r)
