"""Tuned configs persist in a JSON file per GPU and versions, so that a second process reads
them instead of re-tuning; `fp8nemo tune` fills it. The CPU cannot time kernels: these tests
replace the timing function and say that timing is possible, as on a GPU."""

import errno
import importlib
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
from conftest import DEVICE
from helpers import torch_path_env

import fp8nemo
from fp8nemo.kernels import _triton
from fp8nemo.kernels._triton import Autotuner, Decision, KernelConfig

NAMES = ("slow", "fast", "mid")  # candidates[0] is not the fastest, so a reused pick shows
TIMES = {"slow": 2.0, "fast": 1.0, "mid": 1.5}
KEY = (torch.device("cpu"), "token", torch.bfloat16, True, 16)
KEY_TEXT = "cpu, token, bfloat16, True, 16"
CPU = torch.device("cpu")


def candidates():
    return [KernelConfig(n) for n in NAMES]


def choose(key=KEY, op="op") -> str:
    return Autotuner(op).choose(key, candidates, lambda c: c.name).name


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """Timing on, as on a GPU: each config takes TIMES[name]; the timed names, in order. The
    tuning file lives under tmp_path/cache."""
    monkeypatch.setenv("FP8NEMO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(_triton, "timing_enabled", lambda: True)
    calls = []

    def bench(fn):
        calls.append(fn())
        return TIMES[calls[-1]]

    monkeypatch.setattr(_triton, "bench", bench)
    return calls


def read(path) -> dict:
    with open(path) as f:
        return json.load(f)


def header(device_name="cpu") -> dict:
    return {"device": device_name, "triton": triton.__version__, "torch": torch.__version__,
            "fp8nemo": fp8nemo.__version__}  # fmt: skip


def tuning_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_a_tuned_choice_is_written_with_device_versions_op_and_key(timed, tmp_path, monkeypatch):
    monkeypatch.setattr(_triton, "device_name", lambda device: "NVIDIA Test GPU 80GB")
    assert choose() == "fast"
    assert timed == list(NAMES)
    path = _triton.tuning_path(CPU)
    assert os.path.dirname(path) == str(tmp_path / "cache")
    assert os.path.basename(path) == (
        f"tuning-NVIDIA-Test-GPU-80GB-triton{triton.__version__.replace('+', '-')}-"
        f"torch{torch.__version__.replace('+', '-')}-fp8nemo{fp8nemo.__version__}.json"
    )
    assert read(path) == {**header("NVIDIA Test GPU 80GB"), "configs": {"op": {KEY_TEXT: "fast"}}}
    assert Autotuner.decisions[-1] == Decision("op", KEY_TEXT, "fast", "tuned")
    # A second key of another op joins the file; the first stays.
    assert choose((CPU, 8), op="other") == "fast"
    assert read(path)["configs"] == {"op": {KEY_TEXT: "fast"}, "other": {"cpu, 8": "fast"}}


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FP8NEMO_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _triton.cache_dir() == str(tmp_path / "xdg" / "fp8nemo")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _triton.cache_dir() == str(tmp_path / "home" / ".cache" / "fp8nemo")
    monkeypatch.setenv("FP8NEMO_CACHE_DIR", str(tmp_path / "mine"))
    assert _triton.cache_dir() == str(tmp_path / "mine")


@pytest.mark.parametrize("why", ["interpreter", "autotune-off"])
def test_untimed_picks_never_reach_the_file(monkeypatch, tmp_path, why):
    monkeypatch.setenv("FP8NEMO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_triton, "bench", lambda fn: pytest.fail("timed"))
    if why == "interpreter":
        monkeypatch.setattr(_triton, "INTERPRET", True)
        monkeypatch.delenv("FP8NEMO_AUTOTUNE", raising=False)
    else:
        monkeypatch.setattr(_triton, "INTERPRET", False)
        monkeypatch.setenv("FP8NEMO_AUTOTUNE", "0")
    assert choose() == "slow"
    assert Autotuner.decisions[-1] == Decision("op", KEY_TEXT, "slow", "untimed")
    assert os.listdir(tmp_path) == []


def test_graph_capture_takes_a_stored_choice_and_never_writes_its_own(timed, monkeypatch,
                                                                     caplog):  # fmt: skip
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    path = _triton.tuning_path(CPU)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        json.dump({**header(), "configs": {"op": {KEY_TEXT: "mid"}}}, f)
    with caplog.at_level(logging.WARNING, logger="fp8nemo"):
        assert choose() == "mid"  # a stored choice is fine to replay
        tuner = Autotuner("op")
        for _ in range(2):
            assert tuner.choose((CPU, 8), candidates, lambda c: c.name).name == "slow"
    assert timed == []
    assert Autotuner.decisions[-1] == Decision("op", "cpu, 8", "slow", "untimed")
    assert (CPU, 8) not in tuner.cache  # tuned once the capture is over
    assert read(path)["configs"] == {"op": {KEY_TEXT: "mid"}}
    warnings = tuning_warnings(caplog)
    assert warnings and all("CUDA graph capture" in w for w in warnings)


CHILD = textwrap.dedent("""
    import json, torch
    from fp8nemo.kernels import _triton
    from fp8nemo.kernels._triton import Autotuner, KernelConfig
    calls = []
    def bench(fn):  # were it to re-tune, candidates[0] would win
        calls.append(fn())
        return {"slow": 0.5, "fast": 2.0, "mid": 1.0}[calls[-1]]
    _triton.bench = bench
    key = (torch.device("cpu"), "token", torch.bfloat16, True, 16)
    best = Autotuner("op").choose(key, lambda: [KernelConfig(n) for n in ("slow", "fast", "mid")],
                                  lambda c: c.name)
    print(json.dumps({"config": best.name, "calls": calls, "source": Autotuner.decisions[-1].source,
                      "timing": _triton.timing_enabled()}))
""")


def test_a_second_process_reuses_the_choice_without_timing(timed, tmp_path):
    assert choose() == "fast"
    env = dict(torch_path_env(), FP8NEMO_CACHE_DIR=str(tmp_path / "cache"), FP8NEMO_AUTOTUNE="1")
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    # The child could time (no interpreter), yet timed nothing and took the stored pick.
    assert child == {"config": "fast", "calls": [], "source": "cached", "timing": True}


@pytest.mark.parametrize(
    "content",
    [
        b"\x00\xff\xfe garbage {",
        b'{"device": "cpu", "configs": {"op": {',  # truncated
        b"[1, 2, 3]",
        b'{"device": "cpu"}',
        json.dumps({**header(), "configs": {"op": ["fast"]}}).encode(),
        json.dumps({**header(), "configs": {"op": {KEY_TEXT: 3}}}).encode(),
    ],
    ids=["bytes", "truncated", "list", "no-configs", "op-not-a-table", "name-not-a-string"],
)
def test_a_corrupt_file_warns_once_is_ignored_and_rewritten(timed, caplog, content):
    path = _triton.tuning_path(CPU)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(content)
    with caplog.at_level(logging.WARNING, logger="fp8nemo"):
        assert choose() == "fast"  # read twice: before tuning and before writing
    assert timed == list(NAMES)
    (warning,) = tuning_warnings(caplog)
    assert path in warning and "ignored" in warning
    assert read(path) == {**header(), "configs": {"op": {KEY_TEXT: "fast"}}}


def test_a_stored_config_that_is_no_longer_a_candidate_is_retuned(timed):
    path = _triton.tuning_path(CPU)
    os.makedirs(os.path.dirname(path))
    stored = {"op": {KEY_TEXT: "gone", "cpu, 8": "mid"}}
    with open(path, "w") as f:
        json.dump({**header(), "configs": stored}, f)
    assert choose() == "fast"
    assert timed == list(NAMES)
    assert read(path)["configs"] == {"op": {KEY_TEXT: "fast", "cpu, 8": "mid"}}
    # The entry beside it still counts.
    assert choose((CPU, 8)) == "mid"
    assert len(timed) == len(NAMES)


def test_a_file_written_for_other_versions_is_not_used(timed, caplog, monkeypatch):
    path = _triton.tuning_path(CPU)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:  # our file name, another triton inside (say, hand-copied)
        json.dump({**header(), "triton": "0.0.1", "configs": {"op": {KEY_TEXT: "mid"}}}, f)
    with caplog.at_level(logging.WARNING, logger="fp8nemo"):
        assert choose() == "fast"
    assert len(timed) == len(NAMES)
    (warning,) = tuning_warnings(caplog)
    assert "0.0.1" in warning
    assert read(path) == {**header(), "configs": {"op": {KEY_TEXT: "fast"}}}

    # Another fp8nemo version has a file of its own: its choices are not ours.
    with monkeypatch.context() as m:
        m.setattr(fp8nemo, "__version__", "0.0.9")
        old = _triton.tuning_path(CPU)
        with open(old, "w") as f:
            json.dump({**header(), "configs": {"op": {"cpu, 8": "mid"}}}, f)
        assert choose((CPU, 8)) == "mid"  # 0.0.9 reads its own
    assert old != path
    assert choose((CPU, 8)) == "fast"  # ours has no such key: tuned again
    assert len(timed) == 2 * len(NAMES)
    assert read(old)["configs"] == {"op": {"cpu, 8": "mid"}}


def test_a_write_that_fails_midway_leaves_the_old_file(timed, caplog, monkeypatch):
    assert choose() == "fast"
    path = _triton.tuning_path(CPU)
    with open(path, "rb") as f:
        before = f.read()

    def disk_full(obj, fp, **kw):
        fp.write('{"device": "cp')
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="fp8nemo"):
        m.setattr(json, "dump", disk_full)
        assert choose((CPU, 8)) == "fast"  # tuned all the same, kept in memory
        assert choose((CPU, 9)) == "fast"
    (warning,) = tuning_warnings(caplog)
    assert "No space left" in warning
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no temp file left


def test_an_unwritable_cache_folder_warns_once_and_tunes_in_memory(timed, caplog, monkeypatch,
                                                                   tmp_path):  # fmt: skip
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("FP8NEMO_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    tuner = Autotuner("op")
    with caplog.at_level(logging.WARNING, logger="fp8nemo"):
        for key in (KEY, (CPU, 8), KEY):
            assert tuner.choose(key, candidates, lambda c: c.name).name == "fast"
    assert len(timed) == 2 * len(NAMES)  # the repeated key came from memory
    (warning,) = tuning_warnings(caplog)
    assert "cannot be written" in warning


def test_a_write_merges_what_another_process_wrote_meanwhile(timed):
    assert choose() == "fast"
    path = _triton.tuning_path(CPU)
    data = read(path)
    data["configs"]["other"] = {"cpu, 4": "mid"}  # another process, after our read
    with open(path, "w") as f:
        json.dump(data, f)
    assert choose((CPU, 8)) == "fast"
    assert read(path)["configs"] == {
        "op": {KEY_TEXT: "fast", "cpu, 8": "fast"},
        "other": {"cpu, 4": "mid"},
    }


# The tiny model's kernels on the CPU: through the interpreter (a CUDA run's CPU takes the torch
# path, which tunes nothing).
interpreter_only = pytest.mark.skipif(DEVICE != "cpu", reason="runs kernels in the interpreter")


@pytest.fixture
def model_tuning(timed, monkeypatch):
    """The real launchers with empty tuners, "timed" as on a GPU of 132 SMs (where split-K
    configs stay candidates beside the plain ones), each timing faster than the one before (so
    the last candidate wins, not the first): (the ops' tuners, the fp8_gemm module, the timings)."""
    gemm, attention, decode = (
        importlib.import_module(f"fp8nemo.kernels.{m}") for m in ("fp8_gemm", "attention", "decode")
    )
    tuners = [gemm._tuner, attention._tuner, *decode._tuners.values()]
    for t in tuners:  # earlier tests' untimed picks
        monkeypatch.setattr(t, "cache", {})
    monkeypatch.setattr(gemm, "num_sms", lambda device: 132)
    ticks = []

    def bench(fn):
        ticks.append(1)
        return 1.0 / len(ticks)

    monkeypatch.setattr(_triton, "bench", bench)
    return tuners, gemm, ticks


@interpreter_only
def test_tune_model_records_every_shape_of_a_model_and_reads_them_back(model_tuning, monkeypatch):
    """The tiny preset's prefill and decode through the driver, on the interpreter."""
    from fp8nemo.model import load_model
    from fp8nemo.tune import tune_model

    tuners, gemm, ticks = model_tuning
    model = load_model("tiny", backend="fp8", progress=False, max_seq_len=33)
    first = tune_model(model, [2], [32])
    gemms = [d for d in first if d.op == "fp8_gemm"]
    # prefill M = 2 * 32 = 64 and decode M = 2, over the tiny model's 3 GEMM shapes
    assert sorted(int(d.key.split(", ")[5]) for d in gemms) == [2, 2, 2, 64, 64, 64]
    for d in gemms:
        m, n, k = (int(x) for x in d.key.split(", ")[5:])
        names = [c.name for c in gemm.prune_configs(gemm.configs_for((0, 0)), m, n, k, False, 132)]
        if len(names) > 1:  # the fastest: the last candidate timed, not the first
            assert (d.source, d.config) == ("tuned", names[-1]) and names[-1] != names[0]
        else:
            assert (d.source, d.config) == ("single", names[0])
    tuned = {d.key: d.config for d in gemms if d.source == "tuned"}
    assert len(tuned) >= 2 and len(ticks) >= 2 * len(tuned)
    assert {d.source for d in first if d.op != "fp8_gemm"} == {"single"}
    assert read(_triton.tuning_path(CPU))["configs"] == {"fp8_gemm": tuned}

    for t in tuners:  # a new process, in effect
        monkeypatch.setattr(t, "cache", {})
    ticks.clear()
    again = tune_model(model, [2], [32])
    assert ticks == []
    assert [(d.op, d.key, d.config) for d in again] == [(d.op, d.key, d.config) for d in first]
    assert [d.source for d in again] == [
        "cached" if d.source == "tuned" else d.source for d in first
    ]


@interpreter_only
def test_tune_prints_each_choice_and_the_file(model_tuning, monkeypatch, capsys):
    """`fp8nemo tune` in-process, told that this CPU can be timed: the table and the file."""
    from fp8nemo import cli, tune

    monkeypatch.setattr(tune, "untunable", lambda device: None)
    argv = ["tune", "tiny", "--batch-size", "2", "--prompt-len", "32", "--device", "cpu"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["op", "key", "config", "source"]
    path = _triton.tuning_path(CPU)
    stored = read(path)["configs"]["fp8_gemm"]
    rows = [line for line in lines[1:] if line.startswith("fp8_gemm ")]
    tuned = [r for r in rows if r.endswith(" tuned")]
    assert len(rows) == 6 and len(tuned) == len(stored) >= 2
    for key, config in stored.items():
        assert any(key in r and f" {config} " in r for r in tuned)
    assert lines[-1].startswith(f"{len(stored)} tuned now, 0 already cached")
    assert lines[-1].endswith(f"-> {path}")


def fp8nemo_cli(*args, **extra_env):
    env = {k: v for k, v in torch_path_env().items() if k != "FP8NEMO_AUTOTUNE"}
    env.update(CUDA_VISIBLE_DEVICES="", **extra_env)  # no GPU, even on a GPU machine
    return subprocess.run([sys.executable, "-m", "fp8nemo.cli", *args], capture_output=True,
                          text=True, env=env)  # fmt: skip


def test_tune_without_a_gpu_says_so_and_exits_2():
    proc = fp8nemo_cli("tune", "tiny")
    assert proc.returncode == 2
    assert "tuning needs a CUDA GPU" in proc.stderr and "timed" in proc.stderr
    assert proc.stdout == ""


def test_tune_with_autotune_off_says_so_and_exits_2():
    proc = fp8nemo_cli("tune", "tiny", FP8NEMO_AUTOTUNE="0")
    assert proc.returncode == 2 and "FP8NEMO_AUTOTUNE=0" in proc.stderr


@pytest.mark.parametrize(
    "args, named",
    [
        (["tune"], "model"),
        (["tune", "tiny", "--batch-size", "0"], "--batch-size"),
        (["tune", "tiny", "--prompt-len", "many"], "--prompt-len"),
        (["tune", "tiny", "--kv-cache", "int4"], "--kv-cache"),
        (["tune", "tiny", "--scheme", "row"], "--scheme"),
        (["tune", "tiny", "--dtype", "fp32"], "--dtype"),
        (["tune", "no-such-model"], "MODEL no-such-model"),
    ],
)
def test_tune_bad_arguments_exit_2_naming_them(args, named):
    proc = fp8nemo_cli(*args)
    assert proc.returncode == 2
    assert named in proc.stderr


@pytest.mark.skipif(DEVICE != "cuda", reason="times real kernels on a GPU")
def test_cuda_a_tuned_gemm_is_read_by_a_second_process_without_timing(device, tmp_path,
                                                                      monkeypatch, gen):  # fmt: skip
    from fp8nemo.kernels import fp8_gemm, quantize_fp8

    monkeypatch.setenv("FP8NEMO_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("FP8NEMO_AUTOTUNE", "1")  # conftest turns it off on CUDA
    gemm = importlib.import_module("fp8nemo.kernels.fp8_gemm")
    monkeypatch.setattr(gemm._tuner, "cache", {})
    calls = []
    real = _triton.bench
    monkeypatch.setattr(_triton, "bench", lambda fn: calls.append(1) or real(fn))
    M, N, K = 48, 384, 512
    a, a_scale = quantize_fp8(torch.randn(M, K, generator=gen).to(device))
    b, b_scale = quantize_fp8(torch.randn(N, K, generator=gen).to(device))
    fp8_gemm(a, a_scale, b, b_scale)
    decision = [d for d in Autotuner.decisions if d.op == "fp8_gemm"][-1]
    assert decision.source == "tuned" and len(calls) >= 2
    path = _triton.tuning_path(device)
    assert read(path)["configs"]["fp8_gemm"] == {decision.key: decision.config}
    assert read(path)["device"] == torch.cuda.get_device_name(device)

    child = textwrap.dedent(f"""
        import json, torch
        from fp8nemo.kernels import _triton, fp8_gemm, quantize_fp8
        from fp8nemo.kernels._triton import Autotuner
        calls = []
        real = _triton.bench
        _triton.bench = lambda fn: calls.append(1) or real(fn)
        a, a_scale = quantize_fp8(torch.randn({M}, {K}, device="{device}"))
        b, b_scale = quantize_fp8(torch.randn({N}, {K}, device="{device}"))
        fp8_gemm(a, a_scale, b, b_scale)
        d = [d for d in Autotuner.decisions if d.op == "fp8_gemm"][-1]
        print(json.dumps({{"calls": len(calls), "key": d.key, "config": d.config,
                          "source": d.source}}))
    """)
    env = dict(torch_path_env(), FP8NEMO_CACHE_DIR=str(tmp_path), FP8NEMO_AUTOTUNE="1")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "calls": 0, "key": decision.key, "config": decision.config, "source": "cached",
    }  # fmt: skip
