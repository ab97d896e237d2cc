"""The autotuner times candidates once per key; decode batch sizes share a bucket."""

import pytest
import triton

from fp8nemo.kernels import _triton
from fp8nemo.kernels._triton import Autotuner, KernelConfig, m_bucket


def test_m_bucket():
    assert [m_bucket(m) for m in (0, 1, 2, 3, 4, 5, 16, 17, 4096, 4097)] == [
        1, 1, 2, 4, 4, 8, 16, 32, 4096, 8192,
    ]  # fmt: skip


@pytest.fixture
def timed(monkeypatch, tmp_path):
    """A tuner that runs as on a GPU, with do_bench replaced by a fixed time per config (and its
    tuning file in a temp folder, not the user's cache)."""
    monkeypatch.setattr(_triton, "INTERPRET", False)
    monkeypatch.delenv("FP8NEMO_AUTOTUNE", raising=False)
    monkeypatch.setenv("FP8NEMO_CACHE_DIR", str(tmp_path))
    calls = []
    times = {"slow": 2.0, "fast": 1.0, "mid": 1.5}

    def fake_do_bench(fn, **kw):
        name = fn()
        calls.append(name)
        return times[name]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    return calls


def test_tunes_once_per_key_and_keeps_the_fastest(timed):
    tuner = Autotuner("op")
    built = []

    def candidates():
        built.append(1)
        return [KernelConfig(n) for n in ("slow", "fast", "mid")]

    def launch(c):
        return c.name

    for m in (3, 4, 3, 4):
        best = tuner.choose(("k", m_bucket(m)), candidates, launch)
        assert best.name == "fast"
    assert timed == ["slow", "fast", "mid"]  # M=3 and M=4 share bucket 4: timed once
    assert len(built) == 1  # a cached key does not even prune configs
    tuner.choose(("k", m_bucket(5)), candidates, launch)
    assert len(timed) == 6


def test_autotune_off_takes_the_first_candidate(timed, monkeypatch):
    monkeypatch.setenv("FP8NEMO_AUTOTUNE", "0")
    configs = [KernelConfig(n) for n in ("slow", "fast")]
    assert Autotuner("op").choose(("k",), lambda: configs, lambda c: c.name).name == "slow"
    assert timed == []


def test_no_candidates_is_an_error():
    with pytest.raises(RuntimeError, match="no launch config"):
        Autotuner("op").choose(("k",), list, lambda c: None)
