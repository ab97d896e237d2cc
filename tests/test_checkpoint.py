"""Reading FP8 checkpoints in every supported format, writing compressed-tensors and AutoFP8 /
vLLM ones, round trips, and the `fp8nemo quantize` command."""

import json
import os
import subprocess
import sys

import pytest
import torch
from checkpoints import (
    FORMATS,
    bf16_tensors,
    fp8_fixture,
    hf_config,
    linear_names,
    static_source,
    write,
)
from helpers import torch_path_env
from safetensors.torch import load_file, save_file

from fp8nemo import fp8
from fp8nemo.model import calibrate_checkpoint
from fp8nemo.quant.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    FP8Weight,
    read_checkpoint,
    write_checkpoint,
)
from fp8nemo.quant.convert import quantize_checkpoint

E4M3 = torch.float8_e4m3fn
FORMAT_OF = {
    "autofp8-static": "fp8", "autofp8-dynamic": "fp8", "autofp8-legacy": "fp8",
    "finegrained": "fine-grained-fp8", "ct-tensor-static": "compressed-tensors",
    "ct-channel-dynamic": "compressed-tensors", "ct-block-dynamic": "compressed-tensors",
    "modelopt": "modelopt",
}  # fmt: skip


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_loads_to_its_dequantized_weights(fmt, tmp_path, gen):
    want, inputs, kv = fp8_fixture(tmp_path / fmt, fmt, gen)
    ckpt = read_checkpoint(str(tmp_path / fmt))
    granularity, static, _ = FORMATS[fmt]
    assert ckpt.format == FORMAT_OF[fmt]
    assert ckpt.activation_scheme == ("static" if static else "dynamic")
    assert set(ckpt.linears) == set(linear_names())
    assert set(ckpt.schemes.values()) == {f"{granularity}/{ckpt.activation_scheme}"}
    got = ckpt.dequantize()
    assert set(got) == set(want)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    assert {
        m: q.input_scale for m, q in ckpt.linears.items() if q.input_scale is not None
    }.keys() == inputs.keys()
    for m, s in inputs.items():
        assert torch.equal(ckpt.linears[m].input_scale, s)
    assert ckpt.kv_scales.keys() == kv.keys()
    for attn, scales in kv.items():
        for key in ("k_scale", "v_scale"):
            assert torch.equal(ckpt.kv_scales[attn][key], scales[key])
    assert all(q.weight_scale.dtype == torch.float32 for q in ckpt.linears.values())


def test_unquantized_checkpoint(tmp_path, gen):
    tensors = bf16_tensors(gen)
    write(tmp_path / "bf16", hf_config(), tensors)
    ckpt = read_checkpoint(str(tmp_path / "bf16"))
    assert ckpt.format == "unquantized" and not ckpt.linears and ckpt.activation_scheme is None
    got = ckpt.dequantize()
    assert all(torch.equal(got[n], t.float()) for n, t in tensors.items())


def sharded(path, tensors):
    names = sorted(tensors)
    os.makedirs(path)
    with open(path / "config.json", "w") as f:
        json.dump(hf_config(), f)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in halves.items():
        save_file({n: tensors[n] for n in part}, path / file)
    weight_map = {n: file for file, part in halves.items() for n in part}
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return weight_map


def test_sharded_checkpoint_reads_through_its_index(tmp_path, gen):
    tensors = bf16_tensors(gen)
    sharded(tmp_path / "sharded", tensors)
    got = read_checkpoint(str(tmp_path / "sharded")).dequantize()
    assert all(torch.equal(got[n], t.float()) for n, t in tensors.items())


@pytest.mark.parametrize("edit", ["listed in the wrong shard", "not listed"])
def test_an_index_that_disagrees_with_its_shards(edit, tmp_path, gen):
    path = tmp_path / "sharded"
    weight_map = sharded(path, bf16_tensors(gen))
    name = "model.embed_tokens.weight"
    if edit == "not listed":
        del weight_map[name]
        match = f"holds {name}, which .* does not list"
    else:
        weight_map[name] = next(f for f in set(weight_map.values()) if f != weight_map[name])
        match = f"lists {name} in .*, which does not hold it"
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(str(path))


def test_unreadable_json_is_a_clear_error(tmp_path, gen):
    write(tmp_path / "ckpt", hf_config(), bf16_tensors(gen))
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "mistral",')
    with pytest.raises(CheckpointError, match="config.json is not readable JSON"):
        read_checkpoint(str(tmp_path / "ckpt"))


def quantized(gen, granularity, static, kv=True):
    """An in-memory FP8 Checkpoint of the tiny model."""
    base = bf16_tensors(gen)
    ckpt = Checkpoint(config=hf_config(), format="compressed-tensors",
                      activation_scheme="static" if static else "dynamic")  # fmt: skip
    for name, t in base.items():
        module = name[: -len(".weight")]
        if module in linear_names():
            w, s = fp8.quantize(t, granularity)
            in_s = torch.rand(1, generator=gen) * 0.05 + 0.01 if static else None
            ckpt.linears[module] = FP8Weight(w, s, granularity, in_s)
        else:
            ckpt.tensors[name] = t
    if kv and static:
        for i in range(2):
            ckpt.kv_scales[f"model.layers.{i}.self_attn"] = {
                k: torch.rand(1, generator=gen) * 0.1 + 0.01 for k in ("k_scale", "v_scale")
            }
    return ckpt


ROUND_TRIPS = [
    ("compressed-tensors", "tensor", True), ("compressed-tensors", "tensor", False),
    ("compressed-tensors", "channel", False), ("compressed-tensors", "channel", True),
    ("compressed-tensors", "block", False), ("fp8", "tensor", True), ("fp8", "tensor", False),
    ("fp8", "block", False),
]  # fmt: skip


@pytest.mark.parametrize("fmt, granularity, static", ROUND_TRIPS)
def test_round_trip_keeps_bytes_and_scales(fmt, granularity, static, tmp_path, gen):
    ckpt = quantized(gen, granularity, static)
    write_checkpoint(str(tmp_path / "out"), ckpt, format=fmt)
    back = read_checkpoint(str(tmp_path / "out"))
    assert back.activation_scheme == ckpt.activation_scheme
    assert back.linears.keys() == ckpt.linears.keys()
    for name, q in ckpt.linears.items():
        b = back.linears[name]
        assert b.granularity == granularity
        assert torch.equal(b.weight.view(torch.uint8), q.weight.view(torch.uint8)), name
        assert torch.equal(b.weight_scale.reshape(q.weight_scale.shape), q.weight_scale), name
        if static:
            assert torch.equal(b.input_scale, q.input_scale)
    assert back.kv_scales.keys() == ckpt.kv_scales.keys()
    for attn, scales in ckpt.kv_scales.items():
        assert all(torch.equal(back.kv_scales[attn][k], scales[k]) for k in scales)
    assert all(torch.equal(back.tensors[n], t) for n, t in ckpt.tensors.items())
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "lm_head" in (qc.get("ignore") or qc.get("ignored_layers"))


def test_writer_shards_large_checkpoints(tmp_path, gen):
    ckpt = quantized(gen, "channel", False)
    with CheckpointWriter(str(tmp_path / "out"), shard_bytes=200_000) as out:
        for module, q in ckpt.linears.items():
            out.add(f"{module}.weight", q.weight)
            out.add(f"{module}.weight_scale", q.weight_scale)
        for n, t in ckpt.tensors.items():
            out.add(n, t)
        out.finish({**hf_config(), "quantization_config": {"quant_method": "compressed-tensors",
                    "format": "float-quantized", "config_groups": {"g": {"targets": ["Linear"],
                    "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}})  # fmt: skip
    files = sorted(f for f in os.listdir(tmp_path / "out") if f.endswith(".safetensors"))
    assert len(files) > 1 and os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    back = read_checkpoint(str(tmp_path / "out"))
    assert all(
        torch.equal(back.linears[m].weight.view(torch.uint8), q.weight.view(torch.uint8))
        for m, q in ckpt.linears.items()
    )


def test_channel_scales_cannot_be_written_as_fp8(tmp_path, gen):
    with pytest.raises(CheckpointError, match="per-channel weights need format compressed-tensors"):
        write_checkpoint(str(tmp_path / "out"), quantized(gen, "channel", False), format="fp8")
    assert not os.path.exists(tmp_path / "out")


def test_destination_rules(tmp_path, gen):
    ckpt = quantized(gen, "tensor", False)
    dst = str(tmp_path / "out")
    write_checkpoint(dst, ckpt)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        write_checkpoint(dst, ckpt)
    write_checkpoint(dst, ckpt, overwrite=True)
    for source in (dst, str(tmp_path), os.path.join(dst, "inner")):  # is, holds, lies inside
        with pytest.raises(CheckpointError, match="is, holds or lies inside the source"):
            write_checkpoint(dst, ckpt, overwrite=True, source=source)
    os.makedirs(tmp_path / "notes")
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    for overwrite in (False, True):  # a folder that is not a checkpoint is never replaced
        with pytest.raises(
            CheckpointError, match=r"holds todo.txt, which a checkpoint writer would not write"
        ):
            write_checkpoint(str(tmp_path / "notes"), ckpt, overwrite=overwrite)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    os.makedirs(tmp_path / "empty")
    write_checkpoint(str(tmp_path / "empty"), ckpt)  # an empty folder is fine
    assert sorted(os.listdir(tmp_path)) == ["empty", "notes", "out"]  # no temporary folders left


def test_an_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, gen, monkeypatch):
    ckpt = quantized(gen, "tensor", False)
    dst = str(tmp_path / "out")
    write_checkpoint(dst, ckpt)
    before = sorted(os.listdir(dst))
    real_replace = os.replace

    def replace(a, b):  # the move of the new folder into place fails
        if os.path.basename(a) == f"out.tmp-{os.getpid()}":
            raise KeyboardInterrupt
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(dst, ckpt, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(dst)) == before


def test_a_failed_write_leaves_nothing(tmp_path, gen, monkeypatch):
    ckpt = quantized(gen, "tensor", False)
    calls = []

    def failing_add(self, name, tensor):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk full")
        CheckpointWriter._real_add(self, name, tensor)

    monkeypatch.setattr(CheckpointWriter, "_real_add", CheckpointWriter.add, raising=False)
    monkeypatch.setattr(CheckpointWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        write_checkpoint(str(tmp_path / "out"), ckpt)
    assert os.listdir(tmp_path) == []


def edit_fixture(path, fmt, gen, drop=(), add=None, config=None):
    fp8_fixture(path, fmt, gen)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    cfg = json.loads((path / "config.json").read_text())
    if config:
        cfg["quantization_config"].update(config)
    write(path, cfg, tensors)
    return str(path)


L0 = "model.layers.0"
BAD_CHECKPOINTS = [
    ("autofp8-static", dict(drop=[f"{L0}.self_attn.q_proj.weight_scale"]), "missing tensor model.layers.0.self_attn.q_proj.weight_scale"),
    ("autofp8-static", dict(drop=[f"{L0}.mlp.up_proj.input_scale"]), "missing tensor model.layers.0.mlp.up_proj.input_scale"),
    ("ct-channel-dynamic", dict(add={f"{L0}.mlp.up_proj.input_scale": torch.ones(1)}), "unexpected tensor model.layers.0.mlp.up_proj.input_scale"),
    ("ct-channel-dynamic", dict(add={f"{L0}.mlp.up_proj.weight_scale": torch.ones(384, 2)}), r"must have shape \[384, 1\]"),
    ("finegrained", dict(add={f"{L0}.mlp.down_proj.weight_scale_inv": torch.ones(2, 2)}), r"must have shape \[2, 3\]"),
    ("autofp8-dynamic", dict(config={"quant_method": "awq"}), "unknown quant_method 'awq'"),
    ("autofp8-static", dict(add={f"{L0}.mlp.up_proj.input_scale": torch.tensor(0.0)}), "up_proj.input_scale must be finite and positive; holds 0.0"),
    ("autofp8-static", dict(add={f"{L0}.mlp.up_proj.weight_scale": torch.tensor(float("nan"))}), "up_proj.weight_scale must be finite and positive; holds nan"),
    ("ct-channel-dynamic", dict(add={f"{L0}.mlp.up_proj.weight_scale": -torch.ones(384, 1)}), "must be finite and positive; holds -1.0"),
    ("autofp8-static", dict(add={f"{L0}.self_attn.k_scale": torch.tensor(float("inf"))}), "self_attn.k_scale must be finite and positive; holds inf"),
    ("autofp8-dynamic", dict(add={f"{L0}.mlp.up_proj.weight": torch.zeros(384, 256, dtype=torch.float8_e5m2)}), "up_proj.weight is FP8 e5m2"),
    ("autofp8-dynamic", dict(config={"activation_scheme": "sometimes"}), "activation_scheme must be static or dynamic"),
    ("ct-channel-dynamic", dict(config={"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "tensor_group"}, "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}}), "weight strategy 'tensor_group' is not supported"),
    ("ct-block-dynamic", dict(config={"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [64, 64]}, "input_activations": {"num_bits": 8, "type": "float", "strategy": "group", "dynamic": True}}}}), "block_structure must be"),
]  # fmt: skip


@pytest.mark.parametrize("fmt, edits, match", BAD_CHECKPOINTS)
def test_bad_checkpoints_are_clear_errors(fmt, edits, match, tmp_path, gen):
    path = edit_fixture(tmp_path / "ckpt", fmt, gen, **edits)
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)


def test_truncated_safetensors_file(tmp_path, gen):
    fp8_fixture(tmp_path / "ckpt", "ct-channel-dynamic", gen)
    file = tmp_path / "ckpt" / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        read_checkpoint(str(tmp_path / "ckpt"))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a checkpoint folder"):
        read_checkpoint(str(tmp_path / "nothing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="has no config.json"):
        read_checkpoint(str(tmp_path / "empty"))


# ---- quantize --------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, scheme", [("compressed-tensors", "channel"), ("compressed-tensors", "block"),
                                         ("fp8", "tensor"), ("fp8", "block")])  # fmt: skip
def test_quantize_checkpoint_reads_back(fmt, scheme, tmp_path, gen):
    tensors = bf16_tensors(gen)
    src = write(tmp_path / "src", hf_config(), tensors)
    for name in ("tokenizer.json", "tekken.json", "vocab.json", "README.md", "params.json"):
        with open(src / name, "w") as f:
            f.write("{}")
    reports = quantize_checkpoint(
        str(src), str(tmp_path / "dst"), scheme=scheme, format=fmt, progress=False
    )
    assert {r.name for r in reports} == set(linear_names())
    assert all(r.sqnr_db > 25 and not r.on_grid for r in reports)  # Gaussian weights: no QAT grid
    back = read_checkpoint(str(tmp_path / "dst"))
    assert back.linears.keys() == set(linear_names())
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= back.tensors.keys()  # kept 16-bit
    assert back.tensors["lm_head.weight"].dtype == torch.bfloat16
    deq = back.dequantize()
    for name in linear_names():
        w = tensors[f"{name}.weight"].float()
        assert (deq[f"{name}.weight"] - w).norm() / w.norm() < 0.05
    carried = {"tokenizer.json", "tekken.json", "vocab.json", "README.md"}
    assert carried <= set(os.listdir(tmp_path / "dst"))
    assert not os.path.exists(tmp_path / "dst" / "params.json")  # describes the source weights
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]


def test_quantize_recovers_qat_weights_exactly(tmp_path, gen):
    """Weights trained on an FP8 grid (per channel) convert with no error beyond bf16."""
    tensors = bf16_tensors(gen)
    for name in linear_names():
        w = tensors[f"{name}.weight"]
        q, s = fp8.quantize(w, "channel")
        tensors[f"{name}.weight"] = fp8.dequantize(q, s * 1.37, "channel").bfloat16()
    src = write(tmp_path / "src", hf_config(), tensors)
    reports = quantize_checkpoint(str(src), str(tmp_path / "dst"), scheme="channel", progress=False)
    assert all(r.on_grid and r.method == "grid" for r in reports)
    deq = read_checkpoint(str(tmp_path / "dst")).dequantize()
    for name in linear_names():
        assert torch.equal(deq[f"{name}.weight"].bfloat16(), tensors[f"{name}.weight"])


def test_quantize_static_activations_calibrates_through_fp8nemos_model(tmp_path, gen):
    src, calib = static_source(tmp_path, gen, 6, 24)
    quantize_checkpoint(str(src), str(tmp_path / "dst"), scheme="tensor", activations="static",
                        calib=str(calib), format="fp8", progress=False,
                        calibrate=calibrate_checkpoint)  # fmt: skip
    back = read_checkpoint(str(tmp_path / "dst"))
    assert back.activation_scheme == "static"
    assert all(
        q.input_scale is not None and q.input_scale.item() > 0 for q in back.linears.values()
    )
    assert back.kv_scales.keys() == {"model.layers.0.self_attn", "model.layers.1.self_attn"}


QUANTIZE_BAD = [
    (dict(scheme="channel", format="fp8"), "per-channel weights need format compressed-tensors"),
    (dict(activations="static"), "static activations need calibration data"),
    (
        dict(scheme="tensor", activations="static", calib="x"),
        "static activations need calibration runs of a model: pass calibrate=",
    ),
    (dict(scheme="block", activations="static", calib="x"), "block-scaled weights take dynamic"),
    (dict(scheme="row"), "scheme must be one of"),
    (dict(format="gguf"), "format must be one of"),
    (dict(keep=["lm_head", "layers.(0"]), "keep pattern 'layers.\\(0' is not a regex"),
    (dict(activations="static", calib="garbage"), "calibration file .* cannot be read"),
    (dict(keep=["lm_head", r"layers\.1\..*q_proj"]), "one fused GEMM in vLLM"),
    (dict(keep=["lm_head", "up_proj"]), "one fused GEMM in vLLM"),
]


@pytest.mark.parametrize("kwargs, match", QUANTIZE_BAD)
def test_quantize_bad_arguments_write_nothing(kwargs, match, tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    if kwargs.get("calib") == "x":
        kwargs["calib"] = str(tmp_path / "calib.pt")
        torch.save(torch.zeros(2, 4, dtype=torch.long), kwargs["calib"])
    if kwargs.get("calib") == "garbage":
        kwargs["calib"] = str(tmp_path / "calib.pt")
        (tmp_path / "calib.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match=match):
        quantize_checkpoint(str(src), str(tmp_path / "dst"), progress=False, **kwargs)
    assert not os.path.exists(tmp_path / "dst")


def test_quantize_keeps_embeddings_and_warns_where_vllm_would_not_load(tmp_path, gen):
    tensors = bf16_tensors(gen)
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors[
        "model.layers.0.self_attn.k_proj.weight"
    ][:64]  # 64 rows: half a 128-block
    src = write(tmp_path / "src", hf_config(), tensors)
    with pytest.warns(UserWarning, match="lm_head is quantized"):
        reports = quantize_checkpoint(str(src), str(tmp_path / "a"), keep=(), progress=False)
    assert "lm_head" in {r.name for r in reports}
    back = read_checkpoint(str(tmp_path / "a"))
    assert back.tensors["model.embed_tokens.weight"].dtype == torch.bfloat16  # never quantized
    with pytest.warns(UserWarning, match="k_proj: output size not a multiple of 128"):
        quantize_checkpoint(str(src), str(tmp_path / "b"), scheme="block", progress=False)


def test_quantize_static_with_a_kept_attention_reads_back(tmp_path, gen):
    """KV-cache scales belong to the attention, quantized projections or not."""
    src, calib = static_source(tmp_path, gen, 2, 16)
    quantize_checkpoint(str(src), str(tmp_path / "dst"), scheme="tensor", activations="static",
                        calib=str(calib), keep=["lm_head", r"layers\.0\.self_attn"],
                        progress=False, calibrate=calibrate_checkpoint)  # fmt: skip
    back = read_checkpoint(str(tmp_path / "dst"))
    assert back.kv_scales.keys() == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert "model.layers.0.self_attn.q_proj" not in back.linears
    assert back.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_quantize_names_a_weight_it_cannot_quantize(tmp_path, gen):
    tensors = bf16_tensors(gen)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 7] = float("nan")
    src = write(tmp_path / "src", hf_config(), tensors)
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.up_proj.weight: w holds 1 NaN"):
        quantize_checkpoint(str(src), str(tmp_path / "dst"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_quantize_static_needs_a_scale_for_every_layer(tmp_path, gen):
    src, calib = static_source(tmp_path, gen, 2, 8)
    with pytest.raises(CheckpointError, match="no static input scale"):
        quantize_checkpoint(str(src), str(tmp_path / "dst"), scheme="tensor",
                            activations="static", calib=str(calib), progress=False,
                            calibrate=lambda *args: ({}, {}))  # fmt: skip
    assert not os.path.exists(tmp_path / "dst")


def test_quantize_refuses_an_fp8_source(tmp_path, gen):
    fp8_fixture(tmp_path / "src", "ct-channel-dynamic", gen)
    with pytest.raises(CheckpointError, match="already quantized"):
        quantize_checkpoint(str(tmp_path / "src"), str(tmp_path / "dst"), progress=False)


def test_quantize_command(tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    env = torch_path_env()
    cmd = [
        sys.executable,
        "-m",
        "fp8nemo.cli",
        "quantize",
        str(src),
        str(tmp_path / "dst"),
        "--scheme",
        "block",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (
        "model.layers.1.mlp.down_proj" in proc.stdout
        and "14 layers quantized (0 on a QAT grid)" in proc.stdout
    )
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "already holds a checkpoint" in proc.stderr
    proc = subprocess.run(
        [*cmd, "--overwrite"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("scheme", ["tensor", "channel", "block"])
def test_compressed_tensors_output_loads_in_transformers(scheme, tmp_path, gen):
    """The reference loader of the format (transformers with compressed-tensors) reads what we
    write: the same FP8 codes, and our fp32 scales (it keeps them in the model dtype)."""
    pytest.importorskip("compressed_tensors")
    transformers = pytest.importorskip("transformers")
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    quantize_checkpoint(str(src), str(tmp_path / "dst"), scheme=scheme, progress=False)
    ours = read_checkpoint(str(tmp_path / "dst"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "dst"), dtype=torch.bfloat16
    )
    state = model.state_dict()
    for name, q in ours.linears.items():
        assert torch.equal(state[f"{name}.weight"].view(torch.uint8), q.weight.view(torch.uint8)), (
            name
        )
        theirs = state[f"{name}.weight_scale"]
        assert torch.equal(theirs.reshape(q.weight_scale.shape), q.weight_scale.to(theirs.dtype)), (
            name
        )


def test_fp8_block_output_loads_in_transformers(tmp_path, gen):
    """transformers' FineGrainedFP8 loader (which dequantizes to bf16 without a GPU) reads our
    `fp8` block checkpoint to our dequantized weights, rounded to bf16."""
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    quantize_checkpoint(str(src), str(tmp_path / "dst"), scheme="block", format="fp8",
                        progress=False)  # fmt: skip
    ours = read_checkpoint(str(tmp_path / "dst")).dequantize()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "dst"), dtype=torch.bfloat16
    )
    state = model.state_dict()
    for name in linear_names():
        assert torch.equal(state[f"{name}.weight"], ours[f"{name}.weight"].bfloat16()), name


QUANTIZE = """
from fp8nemo.quant.convert import quantize_checkpoint

quantize_checkpoint(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps({"peak": peak()}))
"""


def test_quantize_checkpoint_peak_memory_is_a_few_tensors_not_the_checkpoint(tmp_path):
    """Converting a checkpoint whose MLP weights are 256 MB each peaks within 1 GB + 4x the
    largest tensor (calibration's temporaries come in row chunks; each source weight's pages
    go once it is converted), where calibrating a whole weight at once took ~20x its bytes."""
    import dataclasses

    from helpers import peak_rss

    from fp8nemo.model import preset
    from fp8nemo.model.loader import write_random_checkpoint

    config = dataclasses.replace(preset("tiny"), hidden_size=1024, intermediate_size=131072,
                                 num_hidden_layers=1)  # fmt: skip
    src = write_random_checkpoint(config, str(tmp_path / "src"), torch.device("cpu"))
    largest = config.hidden_size * config.intermediate_size * 2  # bf16 bytes of up_proj
    peak = peak_rss(QUANTIZE, src, str(tmp_path / "dst"))["peak"]
    assert peak <= (1 << 30) + 4 * largest, f"peak RSS {peak / 2**20:.0f} MiB"
