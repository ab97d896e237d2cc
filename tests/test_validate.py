"""`fp8nemo validate`: its metrics on known inputs, and the command end to end (on the torch
path in a child process, and once through the interpreter) checked against an independent
computation of the same numbers."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import run_on_torch_path, torch_path_env
from models import save_hf_model

from fp8nemo import cli
from fp8nemo.quant.convert import quantize_checkpoint
from fp8nemo.validate import LogitStats, TensorStats, divergence, perplexity, sqnr_db
from fp8nemo.validate.report import builtin_path, stdlib_text

SMALL = ("--max-tokens", "64", "--window", "32", "--new-tokens", "2")


def fp8nemo(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fp8nemo.cli", *args], capture_output=True,
                          text=True, env=env or torch_path_env(), timeout=timeout)  # fmt: skip


# --- metrics -----------------------------------------------------------------------------------


def test_identical_tensors_and_logits_are_exact(gen):
    a = torch.randn(37, 129, generator=gen)
    s = TensorStats()
    s.add(a, a.clone())
    assert s.sqnr_db == math.inf and s.rel_err == 0.0 and s.cosine == pytest.approx(1.0, abs=1e-15)
    logits, ids = (
        torch.randn(2, 17, 50, generator=gen),
        torch.randint(0, 50, (2, 17), generator=gen),
    )
    stats = LogitStats()
    for w in range(2):
        stats.add(logits[w], logits[w].clone(), ids[w])
    r = stats.summary()
    assert r["kl_mean"] == 0.0 and r["kl_max"] == 0.0 and r["top1_agreement"] == 100.0
    assert r["ppl_fp8"] == r["ppl_reference"] and r["ppl_delta_pct"] == 0.0
    assert r["top_p_drop_mean"] == 0.0
    assert divergence([1, 2, 3], [1, 2, 3]) is None and divergence([1, 2, 3], [1, 5, 3]) == 1


def test_known_perturbation_gives_the_known_sqnr_and_kl(gen):
    a = torch.randn(64, 96, generator=gen, dtype=torch.float64)
    # b = 1.1 a: noise 0.1 a, so SQNR is exactly 20 dB, relative error 0.1, cosine 1.
    s = TensorStats()
    s.add(a, 1.1 * a)
    assert s.sqnr_db == pytest.approx(20.0, abs=1e-9)
    assert s.rel_err == pytest.approx(0.1, rel=1e-12) and s.cosine == pytest.approx(1.0, abs=1e-12)
    noise = 0.05 * torch.randn(64, 96, generator=gen, dtype=torch.float64)
    expect = 10 * math.log10(float((a**2).sum()) / float((noise**2).sum()))
    assert sqnr_db(a.float(), (a + noise).float()) == pytest.approx(expect, abs=1e-4)

    ref = torch.randn(40, 30, generator=gen, dtype=torch.float64) * 3
    out = ref + 0.3 * torch.randn(40, 30, generator=gen, dtype=torch.float64)
    ids = torch.randint(0, 30, (40,), generator=gen)
    stats = LogitStats()
    stats.add(ref[:25], out[:25], ids[:25])
    stats.add(ref[25:], out[25:], ids[25:])
    r = stats.summary()
    # independent float64: probabilities by exp / sum, KL as sum p log(p / q)
    p = ref.exp() / ref.exp().sum(-1, keepdim=True)
    q = out.exp() / out.exp().sum(-1, keepdim=True)
    kl = (p * (p / q).log()).sum(-1)
    assert r["kl_mean"] == pytest.approx(float(kl.mean()), rel=1e-10)
    assert r["kl_max"] == pytest.approx(float(kl.max()), rel=1e-10)
    assert r["kl_median"] == pytest.approx(float(kl.double().quantile(0.5)), rel=1e-10)
    assert r["kl_p99"] == pytest.approx(float(kl.double().quantile(0.99)), rel=1e-10)
    top = p.argmax(-1)
    assert r["top1_agreement"] == pytest.approx(100 * float((top == q.argmax(-1)).double().mean()))
    dp = p[torch.arange(40), top] - q[torch.arange(40), top]
    assert r["top_p_drop_mean"] == pytest.approx(float(dp.mean()), rel=1e-10)
    nll = torch.cat(
        [-p[:25][torch.arange(24), ids[1:25]].log(), -p[25:][torch.arange(14), ids[26:]].log()]
    )
    assert r["ppl_reference"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-10)


def test_perplexity_interval_is_over_windows():
    w = [torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]), torch.tensor([3.0, 3.0])]
    r = perplexity(w)
    se = 1.0 / math.sqrt(3)  # std of the window means (1, 2, 3) is 1
    assert r["ppl"] == pytest.approx(math.exp(2.0))
    assert r["ci"] == pytest.approx([math.exp(2 - 1.96 * se), math.exp(2 + 1.96 * se)])


# --- the command -------------------------------------------------------------------------------

INDEPENDENT = """
import json, math, torch
from fp8nemo.model import load_model
ref = load_model({path!r}, backend="reference", dtype=torch.float32, progress=False)
fp8 = load_model({path!r}, backend="fp8", dtype=torch.bfloat16, scheme="channel", progress=False)
ids = torch.tensor(list(open({data!r}, "rb").read())) % ref.config.vocab_size
kl, same, nll = [], [], []
with torch.inference_mode():
    for w in ids[:64].split(32):
        a = ref(w[None], cache=ref.new_cache(1, 32))[0].double()
        b = fp8(w[None], cache=fp8.new_cache(1, 32))[0].double()
        p, q = a.softmax(-1), b.softmax(-1)
        kl += (p * (p.log() - q.log())).sum(-1).tolist()
        same += (a.argmax(-1) == b.argmax(-1)).tolist()
        nll += (-p[:-1].log().gather(-1, w[1:, None])[:, 0]).tolist()
print(json.dumps(dict(kl_mean=sum(kl) / len(kl), top1=100 * sum(same) / len(same),
                      ppl=math.exp(sum(nll) / len(nll)))))
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A small random HF Llama checkpoint (no tokenizer.json) and a text file for --data."""
    root = tmp_path_factory.mktemp("validate")
    save_hf_model("llama", root / "llama")
    data = root / "data.txt"
    data.write_text("def f(x):\n    return x * 2  # évaluation\n" * 20)
    return str(root / "llama"), str(data)


def test_validate_on_an_hf_llama_matches_an_independent_computation(llama, tmp_path):
    path, data = llama
    out = tmp_path / "r.json"
    proc = fp8nemo("validate", path, "--data", data, *SMALL, "--json", str(out),
                   "--markdown", str(tmp_path / "r.md"), "--plot", str(tmp_path / "r.png"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "top-1 agreement" in proc.stdout and "worst layer SQNR" in proc.stdout
    r = json.loads(out.read_text())
    for key in ("per_layer", "kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agreement",
                "ppl_reference", "ppl_fp8", "ppl_delta_pct", "generation", "settings", "versions"):  # fmt: skip
        assert key in r
    names = {x["name"] for x in r["per_layer"]}
    assert {"model.layers.0", "model.layers.2.mlp.down_proj", "model.layers.1.self_attn.q_proj",
            "lm_head"} <= names  # fmt: skip
    assert all(x["sqnr_db"] > 10 and 0.9 < x["cosine"] <= 1 for x in r["per_layer"])
    assert r["tokens"] == 64 and len(r["generation"]) == 2
    assert all(len(g["fp8"]) == 2 for g in r["generation"])
    assert (tmp_path / "r.png").stat().st_size > 0 and "| layer |" in (
        tmp_path / "r.md"
    ).read_text()
    want = json.loads(run_on_torch_path(INDEPENDENT.format(path=path, data=data)).splitlines()[-1])
    assert r["kl_mean"] == pytest.approx(want["kl_mean"], rel=1e-6)
    assert r["top1_agreement"] == pytest.approx(want["top1"])
    assert r["ppl_reference"] == pytest.approx(want["ppl"], rel=1e-9)


def test_validate_defaults_to_the_builtin_model_beside_its_twin(tmp_path):
    out = tmp_path / "r.json"
    md, png = tmp_path / "r.md", tmp_path / "r.png"
    proc = fp8nemo(
        "validate", *SMALL, "--json", str(out), "--markdown", str(md), "--plot", str(png)
    )
    assert proc.returncode == 0, proc.stderr
    assert "fp8nemo validate builtin" in proc.stdout and "non-QAT twin" in proc.stdout
    text = md.read_text()
    assert "| twin SQNR dB |" in text and "| non-QAT twin |" in text
    assert "| KL(ref \\|\\| fp8) mean |" in text  # one cell, not three
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert rows and all(line.replace("\\|", "").count("|") == 4 for line in rows[:3])
    assert png.stat().st_size > 0
    r = json.loads(out.read_text())
    assert r["settings"]["model"] == "builtin" and r["twin"]["model"] == "builtin-twin"
    assert r["twin"]["tokens"] == r["tokens"] == 64
    assert {x["name"] for x in r["twin"]["per_layer"]} == {x["name"] for x in r["per_layer"]}
    data = tmp_path / "eval.txt"  # the default text, for the independent computation
    data.write_text(stdlib_text(), encoding="utf-8")
    for got, name in ((r, "builtin"), (r["twin"], "builtin-twin")):
        code = INDEPENDENT.format(path=builtin_path(name), data=str(data))
        want = json.loads(run_on_torch_path(code).splitlines()[-1])
        assert got["kl_mean"] == pytest.approx(want["kl_mean"], rel=1e-6)
        assert got["top1_agreement"] == pytest.approx(want["top1"])
        assert got["ppl_reference"] == pytest.approx(want["ppl"], rel=1e-9)
    # What quantisation awareness buys: on its exact FP8 weights the QAT model loses less.
    assert r["kl_mean"] < r["twin"]["kl_mean"]
    worst = lambda rep: min(x["sqnr_db"] for x in rep["per_layer"])  # noqa: E731
    assert worst(r) > worst(r["twin"])


def test_an_fp8_checkpoint_is_validated_on_its_own_scheme(tmp_path):
    quantize_checkpoint(builtin_path("builtin"), str(tmp_path / "fp8"), scheme="channel",
                        progress=False)  # fmt: skip
    out = tmp_path / "r.json"
    proc = fp8nemo("validate", str(tmp_path / "fp8"), *SMALL, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "the compressed-tensors checkpoint's own scales" in proc.stdout
    assert "twin" not in proc.stdout
    assert "is an FP8 checkpoint: its own scheme" in proc.stdout
    r = json.loads(out.read_text())
    # The reference is the checkpoint dequantized: its weights exactly, so only activations,
    # and the bf16 activations of the FP8 backend, differ.
    assert r["settings"]["checkpoint_format"] == "compressed-tensors"
    assert 0 < r["kl_mean"] < 1e-2 and r["top1_agreement"] > 90


def test_fail_under_and_over_gate_the_exit_status():
    met = fp8nemo(
        "validate", *SMALL, "--fail-under", "top1_agreement=1", "--fail-over", "kl_mean=10"
    )
    assert met.returncode == 0, met.stderr
    missed = fp8nemo("validate", *SMALL, "--fail-under", "top1_agreement=100.5",
                     "--fail-over", "kl_mean=0", "--fail-over", "kl_max=10")  # fmt: skip
    assert missed.returncode == 1
    fails = [line for line in missed.stderr.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 2 and "top1_agreement" in fails[0] and "kl_mean" in fails[1]


def test_static_activations_and_fp8_cache_through_the_interpreter(llama):
    path, data = llama
    env = dict(torch_path_env())
    proc = fp8nemo("validate", path, "--activations", "static", "--scheme", "tensor", "--kv-cache",
                   "fp8", "--max-tokens", "32", "--window", "16", "--new-tokens", "2",
                   "--interpret", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "FP8 path triton-interpreter" in proc.stdout and "static activations" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["/no/such/model"], "neither a checkpoint folder, a built-in model"),
        (["tiny", "--data", "/no/such.txt"], "does not exist"),
        (["tiny", "--data", "{empty}"], "holds 0 tokens"),
        (["tiny", "--data", "{binary}"], "cannot be read as UTF-8"),
        (["tiny", "--data", "{bad_ids}"], "cannot be read"),
        (["tiny", "--activations", "static", "--scheme", "block"], "static is per tensor"),
        (["tiny", "--calib", "x.txt"], "--activations static only"),
        (["builtin", "--reference", "."], "not the built-in one"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    files = {
        "empty": tmp_path / "e.txt",
        "binary": tmp_path / "b.txt",
        "bad_ids": tmp_path / "i.pt",
    }
    files["empty"].write_text("")
    files["binary"].write_bytes(b"\xff\xfe\x00\x9f" * 10)
    files["bad_ids"].write_bytes(b"not a pickle")
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    assert cli.main(["validate", *args, *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_a_malformed_gate_is_refused():
    proc = fp8nemo("validate", "--fail-under", "top1=90")
    assert proc.returncode == 2 and "METRIC=VALUE" in proc.stderr
