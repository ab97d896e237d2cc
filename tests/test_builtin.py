"""The built-in models `fp8nemo validate` checks by default: what ships (NeMo's quirks in
miniature, bf16 weights, the training record and its split), that the QAT model's block linears
lie exactly on the FP8 grid once converted (and the twin's do not), and that the training script
runs and writes what `validate` and every loader read."""

import json
import os

import pytest
import torch

from fp8nemo.model import load_model
from fp8nemo.model.config import ModelConfig
from fp8nemo.quant.checkpoint import read_checkpoint
from fp8nemo.quant.convert import quantize_checkpoint
from fp8nemo.validate import train
from fp8nemo.validate.report import BUILTIN, BUILTIN_TWIN, CALIB_FILES, EVAL_FILES, builtin_path

KINDS = {BUILTIN: "qat", BUILTIN_TWIN: "twin"}
BLOCK_LINEARS = 7 * train.CONFIG.num_hidden_layers


@pytest.mark.parametrize("name", KINDS)
def test_the_builtin_checkpoints_ship_with_their_training_record(name):
    path = builtin_path(name)
    c = ModelConfig.from_pretrained(path)
    assert c == train.CONFIG
    # NeMo's quirks: GQA 4:1, head_dim != hidden / heads, theta 1e6, untied embeddings.
    assert c.num_attention_heads == 4 * c.num_key_value_heads
    assert c.head_dim != c.hidden_size // c.num_attention_heads
    assert c.rope_theta == 1e6 and not c.tie_word_embeddings and c.vocab_size == 256
    files = os.listdir(path)
    weights = sum(
        os.path.getsize(os.path.join(path, f)) for f in files if f.endswith(".safetensors")
    )
    assert weights < 8e6
    ckpt = read_checkpoint(path)
    assert ckpt.format == "unquantized"
    assert all(t.dtype == torch.bfloat16 for t in ckpt.tensors.values())
    with open(os.path.join(path, "training.json")) as f:
        record = json.load(f)
    assert record["kind"] == KINDS[name] and (record["qat"] is None) == (name == BUILTIN_TWIN)
    for key in ("seed", "steps", "wall_time_s", "final_train_loss", "held_out_loss", "command"):
        assert key in record
    # A trained model: far below a uniform byte's log(256) = 5.55 nats.
    assert record["held_out_loss"] < 2.0 and record["final_train_loss"] < 2.0
    split = record["split"]
    assert split["eval_files"] == list(EVAL_FILES) and split["calib_files"] == list(CALIB_FILES)


def test_training_files_hold_out_the_evaluation_and_calibration_files():
    files = train.training_files()
    assert len(files) > 100 and set(EVAL_FILES).isdisjoint(files)
    assert set(CALIB_FILES).isdisjoint(files) and set(EVAL_FILES).isdisjoint(CALIB_FILES)
    assert not any("site-packages" in f for f in files)


@pytest.mark.parametrize("scheme", ["channel", "tensor"])
def test_converted_qat_block_linears_lie_on_the_fp8_grid(scheme, tmp_path):
    src = builtin_path(BUILTIN)
    reports = quantize_checkpoint(src, str(tmp_path / "qat"), scheme=scheme, progress=False)
    assert len(reports) == BLOCK_LINEARS
    source = read_checkpoint(src).tensors
    fp8 = read_checkpoint(str(tmp_path / "qat"))
    on_grid = {r.name for r in reports if r.on_grid}
    if scheme == "channel":  # what QAT trained: per channel, power-of-two scales
        assert on_grid == {r.name for r in reports}
        for name, q in fp8.linears.items():  # codes x scale is the bf16 weight, exactly
            assert torch.equal(q.dequantize(), source[f"{name}.weight"].float()), name
    else:  # one scale for the whole tensor is not the grid QAT trained on
        assert len(on_grid) < len(reports)
    twin = quantize_checkpoint(builtin_path(BUILTIN_TWIN), str(tmp_path / "twin"), scheme=scheme,
                               progress=False)  # fmt: skip
    assert not any(r.on_grid for r in twin)  # the check can fail: the twin is off the grid


def test_the_training_script_writes_loadable_checkpoints_and_reruns_in_place(tmp_path, capsys):
    assert train.main(["--steps", "2", "--out", str(tmp_path)]) == 0
    assert train.main(["--steps", "1", "--out", str(tmp_path), "--only", "qat"]) == 0
    out = capsys.readouterr().out
    assert "qat: wrote" in out and "twin: wrote" in out
    for kind, steps in (("qat", 1), ("twin", 2)):
        with open(tmp_path / kind / "training.json") as f:
            record = json.load(f)
        assert record["steps"] == steps and record["seed"] == train.SEED
        assert record["wall_time_s"] > 0 and record["final_train_loss"] > 0
        model = load_model(str(tmp_path / kind), backend="reference", progress=False)
        assert model.config == train.CONFIG
    reports = quantize_checkpoint(str(tmp_path / "qat"), str(tmp_path / "q8"), progress=False)
    assert all(r.on_grid for r in reports)  # the saved QAT weights are its FP8 values
    with pytest.raises(SystemExit):
        train.main(["--steps", "0", "--out", str(tmp_path)])
