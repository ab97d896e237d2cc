"""`fp8nemo bench --suite e2e`: the whole model, four implementations side by side, each row with
its speed and its check against the fp32 reference (on CPU, at the interpreter's tiny sizes)."""

import csv
import math
import subprocess
import sys

import torch
from helpers import torch_path_env

from fp8nemo.bench import e2e
from fp8nemo.model.loader import write_random_checkpoint


def test_e2e_cli_prints_every_implementation_side_by_side_with_passing_checks(tmp_path):
    # The CLI chooses the interpreter itself on a machine without a GPU; prompt 16 keeps the
    # interpreter's rows to seconds (decode runs at the CPU default batches 1 and 4).
    proc = subprocess.run(
        [sys.executable, "-m", "fp8nemo.cli", "bench", "--suite", "e2e", "--m", "16", "--out",
         str(tmp_path)], capture_output=True, text=True, env=torch_path_env(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("e2e tiny: whole-model tokens/s")
    assert "correctness only" in out  # the interpreter's rows say so
    for impl in e2e.IMPLS:
        assert impl in out
    for num, den in e2e.RATIOS:
        assert f"{num} / {den}" in out
    (csv_path,) = tmp_path.glob("bench_e2e_*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    want = {("prefill", "P=16"), ("decode", "B=1 P=16 new=6"), ("decode", "B=4 P=16 new=6")}
    for impl in e2e.IMPLS:
        mine = [r for r in rows if r["impl"] == impl]
        assert {(r["shape"], r["dims"]) for r in mine} == want, impl
        for r in mine:
            assert r["model"] == "tiny" and not r["note"].startswith("unavailable"), r
            tokens_per_s = float(r["tokens_per_s"])
            assert math.isfinite(tokens_per_s) and tokens_per_s > 0, r
            if r["shape"] == "prefill":
                assert float(r["rel_err"]) < e2e.MAX_LOGITS_ERR, r
            else:
                assert float(r["agreement"]) >= e2e.MIN_AGREEMENT, r
            interpreted = impl in e2e.KERNEL_IMPLS
            assert (r["mode"] == e2e.CORRECTNESS_ONLY) == interpreted, r
            assert interpreted or r["mode"] == e2e.TORCH_CPU, r


def test_quantize_row_says_unavailable_without_fp8nemo_hf(monkeypatch):
    """Without fp8nemo.hf the HF + quantize_ rows say so (and fail no check); the same
    workload's HF eager rows are unaffected."""
    monkeypatch.setitem(sys.modules, "fp8nemo.hf", None)  # import fp8nemo.hf now fails
    from fp8nemo.bench.harness import environment, failed_checks

    device = torch.device("cpu")
    env = environment(device)
    sizes = e2e.Sizes(prompts=(8,), batches=(2,), decode_prompt=8, steps=3, repeats=0)
    work = e2e.Workload("tiny", sizes, on_gpu=False)
    try:
        rows = e2e.run_case(env, device, e2e.HF_QUANTIZED, work)
    finally:
        work.close()
    assert [r.note for r in rows] == ["unavailable: fp8nemo.hf not present"] * 2
    assert all(r.tokens_per_s is None and r.peak_mib is None for r in rows)
    assert not failed_checks("e2e", rows)


def test_random_checkpoint_weights_are_lively(tmp_path):
    """std 1/sqrt(fan_in) linears, N(0, 1) untied embeddings: HF's 0.02 init would make the
    logits nearly uniform."""
    from safetensors.torch import load_file

    config = e2e.model_config("tiny")
    path = write_random_checkpoint(config, str(tmp_path / "tiny"), torch.device("cpu"))
    tensors = load_file(f"{path}/model.safetensors")
    down = tensors["model.layers.0.mlp.down_proj.weight"].float()
    assert abs(down.std().item() * config.intermediate_size**0.5 - 1) < 0.05
    assert abs(tensors["model.embed_tokens.weight"].float().std().item() - 1) < 0.05
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
