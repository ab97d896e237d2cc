"""generate(): sampling rules, stop tokens, streaming and bad arguments; `fp8nemo generate` on a
small checkpoint with a tokenizer.json (and a chat template) and without one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import torch_path_env

from fp8nemo.model import load_model
from fp8nemo.model.generate import Sampling, generate


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", backend="reference", dtype=torch.float32, seed=1)


def test_top_k_and_top_p_keep_only_the_tokens_they_allow(gen):
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    for sampling, allowed in (
        (Sampling(temperature=1.0, top_k=2), {0, 1}),
        (Sampling(temperature=1.0, top_p=0.6), {0, 1}),  # 0.5 < 0.6: the second one is needed
        (Sampling(temperature=1.0, top_p=0.5), {0}),
        (Sampling(temperature=1.0), {0, 1, 2, 3}),
    ):
        picked = sampling.pick(logits, g)
        assert set(picked.tolist()) == allowed, sampling
    # Without cuts the frequencies are the probabilities (4000 draws: 4 sigma is ~0.03).
    freq = torch.bincount(Sampling(temperature=1.0).pick(logits, g), minlength=4) / 4000
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.035)


def test_greedy_is_temperature_zero_and_top_k_one(tiny, gen):
    prompt = torch.randint(0, 512, (12,), generator=gen).tolist()
    greedy = generate(tiny, [prompt], max_new_tokens=8, stop_tokens=[])
    top1 = generate(tiny, [prompt], max_new_tokens=8, stop_tokens=[], seed=5,
                    sampling=Sampling(temperature=0.7, top_k=1))  # fmt: skip
    assert greedy.tokens == top1.tokens and len(greedy.tokens[0]) == 8


def test_sampling_is_reproducible_with_a_seed(tiny, gen):
    prompt = torch.randint(0, 512, (6,), generator=gen).tolist()
    runs = [
        generate(
            tiny,
            [prompt],
            max_new_tokens=10,
            stop_tokens=[],
            seed=s,
            sampling=Sampling(temperature=5.0),
        ).tokens  # fmt: skip
        for s in (1, 1, 2)
    ]
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_stop_tokens_end_each_sequence_and_stream_sees_every_token(tiny, gen):
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (9, 3)]
    free = generate(tiny, prompts, max_new_tokens=6, stop_tokens=[])
    stop = free.tokens[0][2]  # prompt 0 stops at its third token (or earlier, if repeated)
    seen = []
    out = generate(tiny, prompts, max_new_tokens=6, stop_tokens=[stop],
                   stream=lambda i, t: seen.append((i, t)))  # fmt: skip
    first = free.tokens[0].index(stop) + 1
    assert out.tokens[0] == free.tokens[0][:first] and out.finished[0]
    k = free.tokens[1].index(stop) + 1 if stop in free.tokens[1] else 6
    assert out.tokens[1] == free.tokens[1][:k]
    assert sorted(seen) == sorted((i, t) for i, ts in enumerate(out.tokens) for t in ts)


BAD = [
    (dict(prompts=[]), ValueError, "non-empty list"),
    (dict(prompts=[[1, 2], []]), ValueError, r"prompts\[1\] must be a non-empty list"),
    (dict(prompts=[[1, 512]]), ValueError, r"prompts\[0\] holds 512: token ids lie in \[0, 512\)"),
    (dict(prompts=[[1, True]]), ValueError, "holds True"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive int"),
    (dict(max_new_tokens=5000), ValueError, "past the model's max_seq_len 4096"),
    (dict(cuda_graph=True), ValueError, "cuda_graph needs a CUDA model"),
    (dict(compile=1), TypeError, "compile must be a bool or a torch.compile backend's name"),
    (dict(compile="no-such-backend"), ValueError, "compile: Invalid backend: 'no-such-backend'"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD)
def test_bad_arguments(tiny, kwargs, error, match):
    args = dict(prompts=[[1, 2, 3]])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        generate(tiny, args.pop("prompts"), **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(temperature=-1.0), "temperature must be"), (dict(top_k=-1), "top_k must be"),
     (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"), (dict(temperature=float("nan")), "temperature")],
)  # fmt: skip
def test_bad_sampling(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


# ---------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The tiny preset saved as an HF folder, with a word-level tokenizer.json and a chat
    template in tokenizer_config.json."""
    pytest.importorskip("tokenizers")
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny")
    model = load_model("tiny", backend="reference", dtype=torch.bfloat16, seed=2)
    (path / "config.json").write_text(json.dumps(model.config.to_hf()))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors")
    )
    words = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"] + [f"w{i}" for i in range(200)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    template = (
        "{{ bos_token }} {% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    )
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": template}))  # fmt: skip
    return path


def run_cli(*args):
    env = torch_path_env()  # the torch path
    return subprocess.run([sys.executable, "-m", "fp8nemo.cli", "generate", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)  # fmt: skip


@pytest.mark.parametrize("backend", ["reference", "fp8"])
def test_generate_command_prints_text_and_speed(checkpoint, backend):
    proc = run_cli(
        checkpoint, "--prompt", "w1 w2 w3", "--backend", backend, "--max-new-tokens", "5"
    )
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert 1 <= len(words) <= 5 and all(w.startswith("w") or w.startswith("[") for w in words), (
        proc.stdout
    )
    for part in ("load", "prefill 3 tokens", "tok/s", "decode", "peak", f"{backend} on cpu"):
        assert part in proc.stderr


def test_generate_command_chat_and_batch(checkpoint):
    chat = run_cli(
        checkpoint, "--prompt", "w7", "--chat", "--backend", "reference", "--max-new-tokens", "3"
    )
    assert chat.returncode == 0, chat.stderr
    assert "prefill 4 tokens" in chat.stderr  # <s> [INST] w7 [/INST]
    batch = run_cli(checkpoint, "--prompt", "w1", "--prompt", "w2 w3", "--backend", "reference",
                    "--max-new-tokens", "2")  # fmt: skip
    assert batch.returncode == 0, batch.stderr
    assert batch.stdout.startswith("[0] ") and "\n[1] " in batch.stdout


def test_generate_command_takes_token_ids_without_a_tokenizer(tmp_path, checkpoint):
    bare = tmp_path / "bare"
    os.makedirs(bare)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, bare / name)
    ok = run_cli(bare, "--prompt", "5 6 7", "--backend", "reference", "--max-new-tokens", "4")
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout.split()) <= 4 and all(t.isdigit() for t in ok.stdout.split())
    bad = run_cli(bare, "--prompt", "hello", "--backend", "reference")
    assert bad.returncode == 2
    assert bad.stderr.strip() == (f"error: {bare} has no tokenizer.json: the prompt must be token "
                                  "ids separated by spaces; got 'hello'")  # fmt: skip
    chat = run_cli(bare, "--prompt", "1", "--chat", "--backend", "reference")
    assert chat.returncode == 2 and "--chat needs one" in chat.stderr


# ---------------------------------------------------------------------------------------------
# the FP8 model on the test device (the interpreter on CPU, the compiled kernels on CUDA)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny preset (2 blocks of NeMo's quirks, seeded random weights) saved as a bf16 HF
    checkpoint folder."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("tiny-bf16")
    model = load_model("tiny", backend="reference", dtype=torch.bfloat16, seed=7)
    (path / "config.json").write_text(json.dumps(model.config.to_hf()))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors")
    )
    return str(path)


def test_fp8_model_on_device_generates_as_prefill_recomputes(tiny_folder, device, gen):
    """Greedy decode on the FP8 model (packed prefill, then cached decode steps) picks the
    tokens a full forward over the generated sequence ranks first, where the full forward's
    margin is clear; and its logits stay above the e4m3 floor against the fp32 reference."""
    import math

    ref32 = load_model(tiny_folder, backend="reference", dtype=torch.float32, progress=False)
    model = load_model(tiny_folder, backend="fp8", device=device, progress=False)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (17, 5)]
    out = generate(model, prompts, max_new_tokens=6, stop_tokens=[])
    for prompt, tokens in zip(prompts, out.tokens, strict=True):
        seq = torch.tensor([prompt + tokens], device=device)
        with torch.no_grad():
            full = model(seq)[0, len(prompt) - 1 : -1].float()
            ref = ref32(seq.cpu())[0].double()
        top2 = full.topk(2, dim=-1)
        clear = (top2.values[:, 0] - top2.values[:, 1]) > 0.05 * full.abs().amax(-1)
        picked = top2.indices[:, 0].cpu()
        assert (picked == torch.tensor(tokens))[clear.cpu()].all()
        noise = (model(seq)[0].double().cpu() - ref).pow(2).sum()
        sqnr = 10 * math.log10(ref.pow(2).sum().item() / noise.item())
        assert sqnr > 28.9 - 10 * math.log10(11 * 2), sqnr  # see tests/test_model.py


def test_cuda_graph_decode_gives_the_eager_tokens(tiny_folder, device, gen):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need FP8NEMO_TEST_DEVICE=cuda")
    model = load_model(tiny_folder, backend="fp8", device=device, progress=False)
    prompts = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (9, 4, 30)]
    eager = generate(model, prompts, max_new_tokens=8, stop_tokens=[])
    graph = generate(model, prompts, max_new_tokens=8, stop_tokens=[], cuda_graph=True)
    assert graph.tokens == eager.tokens


def test_model_checks_indices_once_and_runs_its_ops_without_value_checks(tiny_folder, monkeypatch):
    """The forward validates ids and lengths itself; inside, every op runs with the host value
    checks off (each would cost a device sync per op)."""
    from fp8nemo import kernels
    from fp8nemo.kernels._triton import value_checks_enabled

    model = load_model(tiny_folder, backend="fp8", progress=False)
    seen = []
    for op in ("rope_", "rope_kv_cache_", "flash_attention", "append_attention", "fp8_gemm"):
        original = getattr(kernels, op)

        def spy(*args, _original=original, **kw):
            seen.append(value_checks_enabled(args[0]))
            return _original(*args, **kw)

        monkeypatch.setattr(kernels, op, spy)
    monkeypatch.setattr("fp8nemo.model.linear.fp8_gemm", kernels.fp8_gemm)
    cache = model.new_cache(1, 16)
    with torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))
        model(
            torch.tensor([3, 4, 5]), cache=cache, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)
        )
        model(torch.tensor([[6]]), cache=cache)
    assert seen and not any(seen)
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size = 512\)"):
        model(torch.tensor([[3, 512]]))
    with pytest.raises(ValueError, match="past the cache's 16 slots"):
        model(torch.zeros(1, 13, dtype=torch.long), cache=cache)


def test_warmup_leaves_no_trace(tiny_folder, gen):
    from fp8nemo.model.generate import warmup

    model = load_model(tiny_folder, backend="reference", dtype=torch.float32, progress=False)
    prompt = torch.randint(0, 512, (7,), generator=gen).tolist()
    before = generate(model, [prompt], max_new_tokens=4, stop_tokens=[]).tokens
    warmup(model, batch_size=2, prompt_len=5)
    assert generate(model, [prompt], max_new_tokens=4, stop_tokens=[]).tokens == before


@pytest.mark.parametrize("backend", ["reference", "fp8"])
def test_a_smaller_batch_moves_only_its_own_cache_rows(tiny_folder, backend):
    """A step of the first two of three cached sequences reads and grows only theirs, and
    gives what a cache of just those two gives."""
    model = load_model(tiny_folder, backend=backend, progress=False)
    three, two = model.new_cache(3, 16), model.new_cache(2, 16)
    with torch.no_grad():
        model(
            torch.arange(7), cache=three, cu_seqlens=torch.tensor([0, 4, 6, 7], dtype=torch.int32)
        )
        model(torch.arange(6), cache=two, cu_seqlens=torch.tensor([0, 4, 6], dtype=torch.int32))
        assert three.seqlens.tolist() == [4, 2, 1]
        step = torch.tensor([[8], [9]])
        a, b = model(step, cache=three), model(step, cache=two)
    assert three.seqlens.tolist() == [5, 3, 1] and two.seqlens.tolist() == [5, 3]
    assert torch.equal(a, b)
