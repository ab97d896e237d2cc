"""Hostile checkpoints, the user's own files, and bad values given to `quantize` and the CLI:
what is read is only the checkpoint's, what is written never costs the user a file, and every
refusal is one clear line. (The ops' hostile inputs are in the op test files.)"""

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from checkpoints import (
    VOCAB,
    bf16_tensors,
    fp8_fixture,
    hf_config,
    static_source,
    write,
)
from helpers import torch_path_env
from safetensors.torch import load_file, save_file

from fp8nemo import fp8
from fp8nemo.model import calibrate_checkpoint
from fp8nemo.quant.checkpoint import CheckpointError, read_checkpoint
from fp8nemo.quant.convert import quantize_checkpoint
from fp8nemo.quant.files import MARKER, CheckpointWriter

L0 = "model.layers.0"


def quantize(src, dst, **kw):
    return quantize_checkpoint(str(src), str(dst), progress=False, calibrate=calibrate_checkpoint,
                               **kw)  # fmt: skip


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(proc.stdout)


def listing(folder) -> dict[str, str]:
    """{name: contents} of the regular files in `folder`."""
    return {n: (folder / n).read_bytes().decode("latin-1") for n in sorted(os.listdir(folder))}


@contextmanager
def deadline(seconds: int):
    """TimeoutError in the test where work that must be refused at once runs on instead."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cli(*args, timeout=300, preexec_fn=None):
    env = torch_path_env()
    return subprocess.run([sys.executable, "-m", "fp8nemo.cli", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout,
                          preexec_fn=preexec_fn)  # fmt: skip


def assert_one_line_error(proc, match):
    """The CLI refused: exit status 2, one line naming the problem last on stderr (after any
    progress bar), no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert "Traceback" not in proc.stderr and errors == lines[-1:], proc.stderr
    assert match in lines[-1], lines[-1]


# ---- reading only the checkpoint's files -------------------------------------------------------


def sharded(
    path, gen, names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
):
    """A 16-bit checkpoint in two shards with an index naming them."""
    tensors = bf16_tensors(gen)
    os.makedirs(path)
    (path / "config.json").write_text(json.dumps(hf_config()))
    keys = sorted(tensors)
    halves = (keys[: len(keys) // 2], keys[len(keys) // 2 :])
    for name, part in zip(names, halves, strict=True):
        save_file({k: tensors[k] for k in part}, path / name)
    weight_map = {k: n for n, part in zip(names, halves, strict=True) for k in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors, weight_map


@pytest.mark.parametrize("where", ["parent", "absolute", "nested", "symlink"])
def test_an_index_cannot_name_a_file_outside_the_checkpoint(where, tmp_path, gen):
    src = tmp_path / "src"
    _, weight_map = sharded(src, gen)
    victim = sorted(weight_map.values())[1]
    evil = tmp_path / "elsewhere" / "evil.safetensors"
    os.makedirs(evil.parent)
    os.replace(src / victim, evil)  # the shard's tensors now live outside the checkpoint
    name = {
        "parent": "../elsewhere/evil.safetensors",
        "absolute": str(evil),
        "nested": "sub/../../elsewhere/evil.safetensors",
        "symlink": victim,
    }[where]
    if where == "symlink":
        os.symlink(evil, src / victim)
    index = src / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: name if v == victim else v
                                                for k, v in weight_map.items()}}))  # fmt: skip
    match = "outside the checkpoint folder" if where == "symlink" else "is not the name of a file"
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(str(src))
    with pytest.raises(CheckpointError, match=match):
        quantize(src, tmp_path / "dst")
    assert not os.path.exists(tmp_path / "dst")


@pytest.mark.parametrize("target", ["secret", "/proc/self/environ", "dir-link"])
@pytest.mark.parametrize("name", ["generation_config.json", "README.md"])
def test_carried_files_never_follow_links_out_of_the_source(target, name, tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    secret = tmp_path / "home" / ".ssh" / "id_rsa"
    os.makedirs(secret.parent)
    secret.write_text("PRIVATE KEY")
    link = {"secret": secret, "/proc/self/environ": "/proc/self/environ",
            "dir-link": secret.parent}[target]  # fmt: skip
    os.symlink(link, src / name)
    (src / "tokenizer.json").write_text('{"model": "bytes"}')  # an honest file: carried
    os.symlink("tokenizer.json", src / "tokenizer_config.json")  # a link inside: carried
    with pytest.warns(UserWarning, match=f"not carried.*{name} links to"):
        quantize(src, tmp_path / "dst")
    files = listing(tmp_path / "dst")
    assert name not in files
    assert not any("PRIVATE KEY" in c or "PATH=" in c for c in files.values())
    assert files["tokenizer.json"] == files["tokenizer_config.json"] == '{"model": "bytes"}'
    assert not os.path.islink(tmp_path / "dst" / "tokenizer_config.json")


def hf_cache_snapshot(root, gen, tensors=None):
    """A checkpoint as huggingface_hub lays one out in its cache: every file of the snapshot
    is a relative link into the repository's blobs/."""
    repo = root / "hub" / "models--mistralai--tiny"
    blobs, snap = repo / "blobs", repo / "snapshots" / "0123abcd"
    os.makedirs(blobs)
    os.makedirs(snap)
    staged = write(root / "staged", hf_config(), tensors or bf16_tensors(gen))
    (staged / "tokenizer.json").write_text('{"model": "bytes"}')
    for i, name in enumerate(sorted(os.listdir(staged))):
        os.replace(staged / name, blobs / f"{i:040x}")
        os.symlink(os.path.join("..", "..", "blobs", f"{i:040x}"), snap / name)
    return snap


def test_an_hf_cache_snapshot_reads_and_quantizes(tmp_path, gen):
    tensors = bf16_tensors(gen)
    snap = hf_cache_snapshot(tmp_path, gen, tensors)
    back = read_checkpoint(str(snap))
    assert all(torch.equal(back.tensors[n], t) for n, t in tensors.items())
    quantize(snap, tmp_path / "dst", scheme="block")
    dst = tmp_path / "dst"
    assert not os.path.islink(dst / "tokenizer.json")
    assert (dst / "tokenizer.json").read_text() == '{"model": "bytes"}'
    deq = read_checkpoint(str(dst)).dequantize()
    assert torch.equal(deq["model.norm.weight"].bfloat16(), tensors["model.norm.weight"])


def test_an_hf_cache_snapshot_cannot_link_past_its_blobs(tmp_path, gen):
    snap = hf_cache_snapshot(tmp_path, gen)
    secret = tmp_path / "secret.json"
    secret.write_text('{"token": "hf_abc"}')
    os.symlink(os.path.join("..", "..", "..", "..", "secret.json"), snap / "generation_config.json")
    assert os.path.realpath(snap / "generation_config.json") == str(secret)
    with pytest.warns(UserWarning, match="generation_config.json links to"):
        quantize(snap, tmp_path / "dst")
    assert "generation_config.json" not in os.listdir(tmp_path / "dst")
    os.remove(snap / "config.json")
    os.symlink(os.path.join("..", "..", "..", "..", "secret.json"), snap / "config.json")
    with pytest.raises(CheckpointError, match="config.json links to .*outside the checkpoint"):
        read_checkpoint(str(snap))


READ_IN_A_SUBPROCESS = """
import sys
from fp8nemo.quant.checkpoint import CheckpointError, read_checkpoint
try:
    read_checkpoint(sys.argv[1])
except CheckpointError as err:
    print(err)
"""


@pytest.mark.parametrize(
    "name",
    ["model.safetensors", "model.safetensors.index.json", "config.json", "hf_quant_config.json"],
)
def test_a_fifo_is_refused_not_waited_on(name, tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    if os.path.exists(src / name):
        os.remove(src / name)
    os.mkfifo(src / name)
    # In a subprocess: a reader that opens the FIFO blocks forever, and the test with it.
    proc = subprocess.run([sys.executable, "-c", READ_IN_A_SUBPROCESS, str(src)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"{name} is not a regular file" in proc.stdout


def test_a_fifo_among_the_carried_files_is_skipped(tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    os.mkfifo(src / "tokenizer.json")
    with pytest.warns(UserWarning, match="tokenizer.json is not a regular file"):
        quantize(src, tmp_path / "dst")
    assert "tokenizer.json" not in os.listdir(tmp_path / "dst")


# ---- never deleting or replacing what the user owns -------------------------------------------


def test_a_users_backup_beside_the_destination_is_never_touched(tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    pid = dead_pid()
    backup, scratch = tmp_path / f"results.old-{pid}", tmp_path / f"results.tmp-{pid}"
    for folder in (backup, scratch):
        os.makedirs(folder)
        (folder / "config.json").write_text('{"mine": true}')
        (folder / "thesis.tex").write_text("three years")
    before = {f: listing(f) for f in (backup, scratch)}
    results = tmp_path / "results"
    os.makedirs(results)
    (results / "notes.md").write_text("not a checkpoint")
    for overwrite in (False, True):  # refused: results is the user's folder
        with pytest.raises(CheckpointError, match="holds notes.md"):
            quantize(src, results, overwrite=overwrite)
    os.remove(results / "notes.md")
    os.rmdir(results)
    quantize(src, results)  # results is new: the backups stay as they are
    assert {f: listing(f) for f in (backup, scratch)} == before
    assert sorted(os.listdir(tmp_path)) == sorted(["src", "results", backup.name, scratch.name])


KILLED_WRITER = """
import os, signal, sys
import torch
from fp8nemo.quant.files import CheckpointWriter
dst, stage, tag = sys.argv[1], sys.argv[2], sys.argv[3]
real_replace = os.replace

def replace(a, b):
    real_replace(a, b)
    moved_aside = os.path.basename(b) == f"{os.path.basename(dst)}.old-{os.getpid()}"
    if (stage == "moved-aside" and moved_aside) or (stage == "swapped" and b == dst):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
with CheckpointWriter(dst, overwrite=True) as out:
    out.add("w", torch.full((4, 4), float(len(tag))))
    if stage == "writing":
        out._flush()
        os.kill(os.getpid(), signal.SIGKILL)
    out.finish({"tag": tag})
"""


def write_tagged(dst, tag, overwrite=False):
    with CheckpointWriter(str(dst), overwrite=overwrite) as out:
        out.add("w", torch.full((4, 4), float(len(tag))))
        out.finish({"tag": tag})


def killed_writer(dst, stage, tag) -> int:
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(dst), stage, tag])
    assert proc.wait(timeout=120) == -signal.SIGKILL
    return proc.pid


def tag_of(dst):
    return json.loads((dst / "config.json").read_text())["tag"]


# stage killed at -> (what the kill leaves beside "out", whether out exists and its tag, and
# what stays after a refused run: a refused run touches nothing, except that an old checkpoint
# moved aside comes back so the rules can apply to it)
KILLS = {
    "writing": (["out", "out.tmp-{pid}"], "old", ["out", "out.tmp-{pid}"], "old"),
    "moved-aside": (["out.old-{pid}", "out.tmp-{pid}"], None, ["out"], "old"),
    "swapped": (["out", "out.old-{pid}"], "new", ["out", "out.old-{pid}"], "new"),
}


@pytest.mark.parametrize("stage", list(KILLS))
def test_a_killed_writer_is_recovered_from_its_marker(stage, tmp_path):
    dst = tmp_path / "out"
    write_tagged(dst, "old")
    pid = killed_writer(dst, stage, "new")
    left, tag, after_refusal, tag_after = KILLS[stage]
    assert sorted(os.listdir(tmp_path)) == [n.format(pid=pid) for n in left]
    assert (tag_of(dst) if dst.exists() else None) == tag
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        write_tagged(dst, "next")
    assert sorted(os.listdir(tmp_path)) == [n.format(pid=pid) for n in after_refusal]
    assert tag_of(dst) == tag_after
    write_tagged(dst, "next", overwrite=True)  # a run that proceeds cleans up
    assert sorted(os.listdir(tmp_path)) == ["out"] and tag_of(dst) == "next"


def test_a_marker_of_another_checkpoint_claims_nothing(tmp_path):
    """A .tmp folder with a marker copied from elsewhere (another dst, another pid) stays."""
    write_tagged(tmp_path / "other", "x")
    pid = dead_pid()
    fake = tmp_path / f"out.tmp-{pid}"
    os.makedirs(fake)
    (fake / MARKER).write_text((tmp_path / "other" / MARKER).read_text())  # pid and dst differ
    (fake / "data.csv").write_text("1,2,3")
    write_tagged(tmp_path / "out", "new")
    assert (fake / "data.csv").read_text() == "1,2,3"


def crafted_marker(folder, **fields):
    """A marker as a writer of `out` would leave it, with `fields` changed."""
    if not (folder.parent / "model").exists():
        write_tagged(folder.parent / "model", "x")
    marker = json.loads((folder.parent / "model" / MARKER).read_text())
    marker.update(dst="out", pid=dead_pid(), state="swapping", **fields)
    os.makedirs(folder, exist_ok=True)
    (folder / MARKER).write_text(json.dumps(marker))
    return marker


@pytest.mark.parametrize("where", ["dst", "tmp"])
@pytest.mark.parametrize("old", ["victim", "../victim", "/abs"])
def test_a_marker_cannot_point_recovery_at_another_folder(where, old, tmp_path):
    victim = tmp_path / "victim" if old != "/abs" else tmp_path / "abs"
    os.makedirs(victim)
    (victim / "keep.txt").write_text("mine")
    dst = tmp_path / "out"
    if where == "dst":
        write_tagged(dst, "old")
        crafted_marker(dst, old=str(victim) if old == "/abs" else old, files=["config.json"])
    else:
        m = crafted_marker(tmp_path / "scratch", old=str(victim) if old == "/abs" else old)
        os.replace(tmp_path / "scratch", tmp_path / f"out.tmp-{m['pid']}")
    write_tagged(dst, "new", overwrite=True)
    assert (victim / "keep.txt").read_text() == "mine"


def test_recovery_skips_what_it_cannot_own(tmp_path):
    """A pid too large for the OS, a marker of another machine, a malformed file list."""
    (tmp_path / "out.tmp-99999999999999999999").mkdir()
    crafted_marker(tmp_path / "host", host="another-machine")
    crafted_marker(tmp_path / "files", files=[["notes.md"]])
    for name in ("host", "files"):
        pid = json.loads((tmp_path / name / MARKER).read_text())["pid"]
        os.replace(tmp_path / name, tmp_path / f"out.tmp-{pid}")
    before = sorted(os.listdir(tmp_path))
    write_tagged(tmp_path / "out", "new")
    assert sorted(os.listdir(tmp_path)) == sorted([*before, "out"])


def test_an_hf_cache_whose_blobs_is_a_link_is_not_trusted(tmp_path, gen):
    snap = hf_cache_snapshot(tmp_path, gen)
    home = tmp_path / "home"
    os.makedirs(home / ".ssh")
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    blobs = snap.parent.parent / "blobs"
    os.replace(blobs, home / "blobs")  # the real blobs move under home, and blobs links to home
    os.symlink(home, blobs)
    for name in os.listdir(snap):
        target = os.readlink(snap / name).replace("blobs", os.path.join("blobs", "blobs"))
        os.remove(snap / name)
        os.symlink(target, snap / name)
    os.symlink(os.path.join("..", "..", "blobs", ".ssh", "id_rsa"), snap / "README.md")
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        read_checkpoint(str(snap))


def test_a_full_disk_after_the_swap_leaves_a_usable_checkpoint(tmp_path, monkeypatch):
    from fp8nemo.quant import files

    dst = tmp_path / "out"
    write_tagged(dst, "old")
    real = files._write_marker

    def disk_full_after_the_swap(folder, marker):
        if marker["state"] == "done":
            raise OSError(28, "No space left on device")
        real(folder, marker)

    monkeypatch.setattr(files, "_write_marker", disk_full_after_the_swap)
    write_tagged(dst, "new", overwrite=True)
    monkeypatch.undo()
    assert tag_of(dst) == "new" and sorted(os.listdir(tmp_path)) == ["out"]
    write_tagged(dst, "next", overwrite=True)  # the marker left "swapping": still replaceable
    assert tag_of(dst) == "next"


def test_a_huge_integer_in_json_is_a_clear_error(tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    (src / "config.json").write_text('{"vocab_size": ' + "9" * 5000 + "}")
    with pytest.raises(CheckpointError, match="config.json is not readable JSON"):
        read_checkpoint(str(src))


@pytest.mark.parametrize("name", ["notes.md", "chat_template.jinja", "model.safetensors"])
@pytest.mark.parametrize("start", ["absent", "empty", "checkpoint"])
def test_a_file_put_into_the_destination_during_the_run_is_kept(
    start, name, tmp_path, gen, monkeypatch
):
    """Whatever its name: one that a checkpoint could hold is the user's too."""
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    dst = tmp_path / "dst"
    if start == "empty":
        os.makedirs(dst)
    if start == "checkpoint":
        quantize(src, dst)
    real = CheckpointWriter._write_rest

    def user_writes_meanwhile(self, config):
        os.makedirs(dst, exist_ok=True)
        (dst / name).write_text("written during the run")
        real(self, config)

    monkeypatch.setattr(CheckpointWriter, "_write_rest", user_writes_meanwhile)
    with pytest.raises(CheckpointError, match="dst changed during the run; nothing was replaced"):
        quantize(src, dst, overwrite=start == "checkpoint")
    assert (dst / name).read_text() == "written during the run"
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]  # no temporary folder left


@pytest.mark.parametrize(
    "files",
    [
        {"config.json": "{}", "thesis.pdf": "chapter 1", "notes.md": "todo"},
        {"config.json": "{}", "model.safetensors": "", "experiments.ipynb": "{}"},
        {"config.json": "{}", "model.safetensors": "", "runs/": None},
        {"config.json": "{}"},  # config alone: not a checkpoint
    ],
    ids=["project", "project-with-weights", "subfolder", "config-only"],
)
def test_overwrite_replaces_only_a_checkpoint_folder(files, tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    dst = tmp_path / "project"
    os.makedirs(dst)
    for name, text in files.items():
        if text is None:
            os.makedirs(dst / name)
            (dst / name / "log.txt").write_text("run 1")
        else:
            (dst / name).write_text(text)
    before = sorted(os.listdir(dst))
    with pytest.raises(CheckpointError, match="fp8nemo writes into a new or empty folder"):
        quantize(src, dst, overwrite=True)
    assert sorted(os.listdir(dst)) == before
    assert sorted(os.listdir(tmp_path)) == ["project", "src"]


def test_overwrite_replaces_a_checkpoint_and_what_fp8nemo_wrote(tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    (src / "LICENSE.txt").write_text("Apache-2.0")  # carried: the marker lists it
    quantize(src, tmp_path / "ours")
    quantize(src, tmp_path / "ours", overwrite=True, scheme="block")
    assert (
        read_checkpoint(str(tmp_path / "ours")).linears[f"{L0}.mlp.up_proj"].granularity == "block"
    )
    hf = write(tmp_path / "hf", hf_config(), bf16_tensors(gen))  # an HF download
    (hf / "tokenizer.json").write_text("{}")
    (hf / "generation_config.json").write_text("{}")
    quantize(src, hf, overwrite=True)
    (tmp_path / "ours" / "notes.md").write_text("mine now")  # the user added a file: refused
    with pytest.raises(CheckpointError, match="holds notes.md"):
        quantize(src, tmp_path / "ours", overwrite=True)


# ---- calibrating on exactly the tensors converted -----------------------------------------------


@pytest.mark.parametrize(
    "layout", ["weights.safetensors + pytorch_model.bin", "two unindexed shards"]
)
def test_static_calibration_reads_exactly_the_converted_tensors(layout, tmp_path, gen):
    src, calib = static_source(tmp_path, gen, 3, 16)
    tensors = load_file(src / "model.safetensors")
    os.remove(src / "model.safetensors")
    if layout.startswith("weights"):
        save_file(tensors, src / "weights.safetensors")
        torch.save({k: v * 1e4 for k, v in tensors.items()}, src / "pytorch_model.bin")  # stray
    else:
        keys = sorted(tensors)
        save_file({k: tensors[k] for k in keys[:5]}, src / "a.safetensors")
        save_file({k: tensors[k] for k in keys[5:]}, src / "b.safetensors")
    reference = write(tmp_path / "reference", hf_config(), tensors)
    kw = dict(scheme="tensor", activations="static", calib=str(calib), format="fp8")
    quantize(src, tmp_path / "dst", **kw)
    quantize(reference, tmp_path / "want", **kw)
    got, want = (read_checkpoint(str(tmp_path / d)) for d in ("dst", "want"))
    for module, q in want.linears.items():
        assert torch.equal(got.linears[module].input_scale, q.input_scale), module
    for attn, scales in want.kv_scales.items():
        assert all(torch.equal(got.kv_scales[attn][k], scales[k]) for k in scales), attn


SIZE_CASES = [
    ({"num_hidden_layers": 10**9}, None, "num_hidden_layers = 1000000000, but the checkpoint holds only 21 tensors"),
    ({"num_hidden_layers": 3}, None, "num_hidden_layers = 3, but the checkpoint holds layers 0..1"),
    ({"num_hidden_layers": "2"}, None, "num_hidden_layers must be int; got '2'"),
    ({"hidden_size": 4096}, None, "hidden_size = 4096 is larger than every tensor dimension of the checkpoint \\(the largest is 384\\)"),
    ({"hidden_size": 128}, None, r"model.safetensors: tensor model.embed_tokens.weight has shape \[96, 256\]; the config \(config.json\) makes it \[96, 128\]"),
    ({"intermediate_size": 256}, None, r"mlp.gate_proj.weight has shape \[384, 256\]; the config \(config.json\) makes it \[256, 256\]"),
    ({"num_attention_heads": 2}, None, r"q_proj.weight has shape \[256, 256\]; the config \(config.json\) makes it \[128, 256\]"),
    ({"vocab_size": -1}, None, "vocab_size must be positive; got -1"),
    ({"num_attention_heads": 2.5}, None, "num_attention_heads must be int; got 2.5"),
    # The names cannot hide a size: layers renamed, the embedding gone.
    ({"num_hidden_layers": 10**9}, "rename-layers", "num_hidden_layers = 1000000000, but the checkpoint holds only 21"),
    ({"vocab_size": 10**9}, "drop-embedding", "vocab_size = 1000000000 is larger than every tensor dimension"),
    ({}, "drop-embedding", r"missing tensor model.embed_tokens.weight \(no shard holds it\)"),
]  # fmt: skip


@pytest.mark.parametrize("changes, tensors, match", SIZE_CASES)
def test_config_sizes_must_agree_with_the_tensors_before_any_work(
    changes, tensors, match, tmp_path, gen
):
    src, calib = static_source(tmp_path, gen, 2, 8)
    config = json.loads((src / "config.json").read_text())
    weights = load_file(src / "model.safetensors")
    if tensors == "rename-layers":
        weights = {k.replace(".layers.", ".blocks."): v for k, v in weights.items()}
    if tensors == "drop-embedding":
        del weights["model.embed_tokens.weight"]
    write(src, {**config, **changes}, weights)
    with deadline(60), pytest.raises(CheckpointError, match=match):  # 10**9 layers: no end
        quantize(src, tmp_path / "dst", scheme="tensor", activations="static", calib=str(calib))
    assert not os.path.exists(tmp_path / "dst")


@pytest.mark.parametrize(
    "ids, match",
    [
        (
            torch.full((2, 8), VOCAB),
            rf"must lie in \[0, vocab_size = {VOCAB}\); got values in \[{VOCAB}, {VOCAB}\]",
        ),
        (torch.tensor([[3, -1, 5]]), r"got values in \[-1, 5\]"),
        (
            torch.zeros(2, 0, dtype=torch.long),
            r"non-empty integer \[sequences, length\]; got torch.int64 \[2, 0\]",
        ),
        (torch.zeros(0, 8, dtype=torch.long), r"got torch.int64 \[0, 8\]"),
        (torch.ones(2, 8, dtype=torch.bool), "got torch.bool"),
    ],
    ids=["out-of-vocab", "negative", "length-0", "no-sequences", "bool"],
)
def test_calibration_ids_are_checked(ids, match, tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    save_file({"input_ids": ids}, tmp_path / "calib.safetensors")
    with pytest.raises(CheckpointError, match=match):
        quantize(src, tmp_path / "dst", scheme="tensor", activations="static",
                 calib=str(tmp_path / "calib.safetensors"))  # fmt: skip
    assert not os.path.exists(tmp_path / "dst")


# ---- what quantize writes, its reader reads -----------------------------------------------------


def source_with(tmp_path, gen, **changes):
    tensors = bf16_tensors(gen)
    tensors.update(changes)
    return write(tmp_path / "src", hf_config(), tensors)


@pytest.mark.parametrize(
    "name, tensor, match",
    [
        (f"{L0}.mlp.up_proj.weight", "e4m3", "has FP8 tensors .* but no quantization_config"),
        (
            f"{L0}.mlp.up_proj.input_scale",
            torch.ones(1),
            "up_proj.input_scale in a 16-bit checkpoint",
        ),
        (f"{L0}.self_attn.k_scale", torch.ones(()), "k_scale in a 16-bit checkpoint"),
        (f"{L0}.mlp.up_proj.weight", "int8", "up_proj.weight is a linear weight of dtype I8"),
        (f"{L0}.mlp.down_proj.weight", "int32", "down_proj.weight is a linear weight of dtype I32"),
    ],
)
def test_quantize_refuses_what_its_reader_would_refuse(name, tensor, match, tmp_path, gen):
    base = bf16_tensors(gen)
    if tensor == "e4m3":
        tensor = fp8.saturating_cast(base[name].float() * 100)
    elif isinstance(tensor, str):
        tensor = (base[name].float() * 100).to(getattr(torch, tensor))
    src = source_with(tmp_path, gen, **{name: tensor})
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(str(src))
    with pytest.raises(CheckpointError, match=match):
        quantize(src, tmp_path / "dst")
    assert not os.path.exists(tmp_path / "dst")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_wide_float_linear_weight_is_quantized_and_reported(dtype, tmp_path, gen):
    name = f"{L0}.mlp.up_proj"
    src = source_with(
        tmp_path, gen, **{f"{name}.weight": torch.randn(384, 256, generator=gen, dtype=dtype) / 16}
    )
    reports = quantize(src, tmp_path / "dst")
    assert name in {r.name for r in reports}
    assert read_checkpoint(str(tmp_path / "dst")).linears[name].weight.dtype == fp8.E4M3


@pytest.mark.parametrize("fmt", ["autofp8-dynamic", "ct-channel-dynamic", "finegrained"])
def test_an_fp8_checkpoint_holds_no_int_weights_and_no_zero_scale_over_codes(fmt, tmp_path, gen):
    name = f"{L0}.mlp.up_proj"
    fp8_fixture(tmp_path / "ckpt", fmt, gen)
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    scale_name = f"{name}.weight_scale_inv" if fmt == "finegrained" else f"{name}.weight_scale"

    def read_with(**changes):
        write(tmp_path / "ckpt", config, {**tensors, **changes})
        return read_checkpoint(str(tmp_path / "ckpt"))

    zero = tensors[scale_name].clone()
    zero.view(-1)[0] = 0  # the group's codes are not all zero
    with pytest.raises(
        CheckpointError, match=f"{scale_name} is 0 for a group whose codes are not all 0"
    ):
        read_with(**{scale_name: zero})
    codes = tensors[f"{name}.weight"].clone()
    if fmt == "finegrained":
        codes[:128, :128] = 0
    elif fmt == "ct-channel-dynamic":
        codes[0] = 0
    else:
        codes[:] = 0
    assert read_with(**{scale_name: zero, f"{name}.weight": codes}).linears[name]  # allowed
    with pytest.raises(CheckpointError, match="up_proj.weight is a linear weight of dtype I8"):
        read_with(**{f"{name}.weight": torch.ones(384, 256, dtype=torch.int8)})


@pytest.mark.parametrize("shape", [(1, 1), (1,), ()])
def test_a_one_element_weight_scale_is_per_tensor(shape, tmp_path, gen):
    name = f"{L0}.mlp.up_proj"
    want, _, _ = fp8_fixture(tmp_path / "ckpt", "autofp8-dynamic", gen)
    tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    tensors[f"{name}.weight_scale"] = tensors[f"{name}.weight_scale"].reshape(shape)
    write(tmp_path / "ckpt", json.loads((tmp_path / "ckpt" / "config.json").read_text()), tensors)
    deq = read_checkpoint(str(tmp_path / "ckpt")).dequantize()
    assert torch.equal(deq[f"{name}.weight"], want[f"{name}.weight"])


# ---- wrongly typed JSON --------------------------------------------------------------------------


def fp8_config(**qc):
    return {
        **hf_config(),
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", **qc},
    }


BAD_JSON = [
    ("config", {**hf_config(), "quantization_config": "fp8"}, "quantization_config must be dict; got 'fp8'"),
    ("config", fp8_config(weight_block_size=128), "weight_block_size must be list; got 128"),
    ("config", fp8_config(quant_method=["fp8"]), r"quant_method must be str; got \['fp8'\]"),
    ("config", {**hf_config(), "quantization_config": {"quant_method": "compressed-tensors", "config_groups": ["g"]}}, r"config_groups must be dict; got \['g'\]"),
    ("config", {**hf_config(), "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": "fp8"}}}, "config_groups.g must be dict; got 'fp8'"),
    ("config", {**hf_config(), "quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": 8}}}}, "weights must be dict; got 8"),
    ("config", [1, 2], "must hold a JSON object; got list"),
    ("index", {"weight_map": {"model.norm.weight": 7}}, "weight_map values must be file names; got 7"),
    ("index", {"weight_map": ["model.safetensors"]}, "weight_map must be dict"),
    ("modelopt", {"quantization": "FP8"}, "quantization must be dict; got 'FP8'"),
]  # fmt: skip


@pytest.mark.parametrize("file, data, match", BAD_JSON)
def test_wrongly_typed_json_is_a_clear_error(file, data, match, tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    name = {"config": "config.json", "index": "model.safetensors.index.json",
            "modelopt": "hf_quant_config.json"}[file]  # fmt: skip
    (src / name).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(str(src))


def test_a_deeply_nested_config_is_a_clear_error(tmp_path, gen):
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    (src / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="config.json nests too deeply"):
        read_checkpoint(str(src))
    with pytest.raises(CheckpointError, match="config.json nests too deeply"):
        quantize(src, tmp_path / "dst")


# ---- the CLI: one line, exit status 2 --------------------------------------------------------------


@pytest.fixture
def src(tmp_path, gen):
    return write(tmp_path / "src", hf_config(), bf16_tensors(gen))


def test_cli_refuses_a_device_it_cannot_use(src, tmp_path):
    save_file({"input_ids": torch.zeros(2, 8, dtype=torch.long)}, tmp_path / "calib.safetensors")
    static = [
        "--scheme",
        "tensor",
        "--activations",
        "static",
        "--calib",
        tmp_path / "calib.safetensors",
    ]
    proc = cli("quantize", src, tmp_path / "dst", *static, "--device", "tpu9")
    assert_one_line_error(proc, "error: device 'tpu9' is not a device (cpu, cuda, cuda:1)")
    proc = cli("quantize", src, tmp_path / "dst", "--device", "cpu")
    assert_one_line_error(proc, "device applies to static activations")
    if not torch.cuda.is_available():
        proc = cli("quantize", src, tmp_path / "dst", *static, "--device", "cuda")
        assert_one_line_error(proc, "error: device 'cuda': torch")
        assert "sees no CUDA GPU" in proc.stderr
    assert not os.path.exists(tmp_path / "dst")


def test_cli_names_a_destination_it_cannot_write(src, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    proc = cli("quantize", src, tmp_path / "a_file" / "dst")
    assert_one_line_error(proc, "the destination's parent")
    assert (tmp_path / "a_file").read_text() == "x"
    # Read-only: as root (CI) permissions do not stop writes, so the refusal is simulated.
    real = os.makedirs

    def read_only(path, *args, **kw):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(13, "Permission denied", str(path))
        real(path, *args, **kw)

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(CheckpointError, match=r"cannot create .*ro/dst.tmp-\d+: Permission denied"):
        quantize(src, tmp_path / "ro" / "dst")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_cli_names_a_read_only_destination(src, tmp_path):
    os.makedirs(tmp_path / "ro")
    os.chmod(tmp_path / "ro", 0o555)
    try:
        assert_one_line_error(cli("quantize", src, tmp_path / "ro" / "dst"), "Permission denied")
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def _small_file_limit():  # in the child: a disk that fills after 200 kB
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def test_cli_on_a_full_disk_says_so_and_leaves_nothing(src, tmp_path):
    proc = cli("quantize", src, tmp_path / "dst", preexec_fn=_small_file_limit)
    assert_one_line_error(proc, "cannot write")
    assert "File too large" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["src"]


@pytest.mark.parametrize(
    "args, match",
    [
        (["bench", "--m", "-1"], "argument --m: must be a positive integer; got -1"),
        (["bench", "--m", "0"], "argument --m: must be a positive integer; got 0"),
        (["bench", "--budget", "-5"], "argument --budget: must be a finite number of seconds >= 0"),
        (["bench", "--out", "{file}"], "--out {file} exists and is not a folder"),
        (["inspect", "--op", "fp8_gem"], "unknown op fp8_gem; the ops are"),
        (["inspect", "--jobs", "0"], "argument --jobs: must be a positive integer"),
    ],
)
def test_cli_refuses_bad_arguments(args, match, tmp_path):
    file = tmp_path / "results.csv"
    file.write_text("keep")
    args = [a.format(file=file) for a in args]
    proc = cli(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert match.format(file=file) in proc.stderr, proc.stderr
    assert file.read_text() == "keep"


def test_cli_quantize_errors_are_one_line(src, tmp_path):
    (src / "config.json").write_text(json.dumps({**hf_config(), "quantization_config": "fp8"}))
    assert_one_line_error(
        cli("quantize", src, tmp_path / "dst"), "quantization_config must be dict"
    )
    os.remove(src / "model.safetensors")
    os.symlink("/dev/zero", src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(hf_config()))
    assert_one_line_error(cli("quantize", src, tmp_path / "dst"), "outside the checkpoint folder")
