"""The `fp8nemo` command as a user runs it."""

import csv
import os
import subprocess
import sys

import pytest
from helpers import torch_path_env

from fp8nemo import bench


def fp8nemo(*args, **kw):
    env = torch_path_env()
    return subprocess.run(
        [sys.executable, "-m", "fp8nemo.cli", *args], capture_output=True, text=True, env=env, **kw
    )


def test_help_lists_the_commands():
    proc = fp8nemo("--help")
    assert proc.returncode == 0
    assert "bench" in proc.stdout and "inspect" in proc.stdout


@pytest.mark.slow
def test_bench_gemm_on_cpu_is_labelled_correctness_only(tmp_path):
    proc = fp8nemo("bench", "--suite", "gemm", "--shape", "down", "--m", "16", "--m", "1",
                   "--out", str(tmp_path), "--markdown", timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "CORRECTNESS ONLY" in proc.stdout
    (csv_path,) = tmp_path.glob("bench_gemm_*.csv")
    assert csv_path.with_suffix(".md").exists()
    rows = list(csv.DictReader(csv_path.open()))
    ours = [r for r in rows if r["impl"] == "fp8nemo"]
    assert {(r["scheme"], r["M"]) for r in ours} == {
        (s, m) for s in bench.GEMM_SCHEMES for m in ("1", "16")
    }
    for r in rows:
        assert r["mode"] == bench.CORRECTNESS_ONLY
        assert r["device"] and r["torch"] and r["triton"] and r["date"]
        assert r["N"] == str(5120 // bench.CPU_SHRINK) and r["K"] == str(14336 // bench.CPU_SHRINK)
    # Each row carries its own check against the fp32 reference: bf16 output round-off.
    assert all(float(r["rel_err"]) < 1e-2 for r in ours)


def test_bench_rejects_an_unknown_suite():
    proc = fp8nemo("bench", "--suite", "nope")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_inspect_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fp8nemo.cli", "inspect"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr


def test_the_cli_knows_the_bench_layers_and_suites():
    from fp8nemo import cli

    assert set(cli.NEMO_LAYERS) == set(bench.NEMO_GEMM_SHAPES)
    assert set(cli.SUITES) == set(bench.SUITES)


@pytest.mark.slow
def test_bench_attention_decode_rope_on_cpu(tmp_path):
    proc = fp8nemo("bench", "--suite", "attention", "--suite", "decode", "--suite", "rope",
                   "--m", "128", "--out", str(tmp_path), timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for suite in ("attention", "decode", "rope"):
        (csv_path,) = tmp_path.glob(f"bench_{suite}_*.csv")
        rows = list(csv.DictReader(csv_path.open()))
        ours = [r for r in rows if r["impl"] == "fp8nemo"]
        assert ours and all(r["mode"] == bench.CORRECTNESS_ONLY for r in rows)
        assert all(float(r["rel_err"]) < 0.1 for r in ours), ours


def test_bench_budget_lists_the_cases_it_did_not_run(tmp_path):
    proc = fp8nemo("bench", "--suite", "rope", "--budget", "0", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr
    (csv_path,) = tmp_path.glob("bench_rope_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 6 and all(r["note"].startswith("not run") for r in rows)
