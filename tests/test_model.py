"""fp8nemo's model against HF transformers (logits and greedy generation, on small random
Mistral/Llama models with each family's quirks), the KV cache, packed batches and appending,
and the FP8 backend's error against the reference."""

from __future__ import annotations

import pytest
import torch
from models import CONFIGS, save_hf_model

from fp8nemo.model import load_model
from fp8nemo.model.generate import generate

pytest.importorskip("transformers")

SEQ = 96


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (folder of the fp32 HF checkpoint, the fp32 HF model)."""
    out = {}
    for name in CONFIGS:
        path = tmp_path_factory.mktemp(name)
        out[name] = (str(path), save_hf_model(name, path))
    return out


def ids_for(gen, *shape, vocab=320):
    return torch.randint(0, vocab, shape, generator=gen)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reference_logits_match_hf_to_fp32_round_off(name, checkpoints, gen):
    """The reference backend in fp32 is no further from HF's fp64 logits than 2x HF's own fp32
    logits are (the bound is HF's round-off, measured, not chosen)."""
    path, hf = checkpoints[name]
    ids = ids_for(gen, 2, SEQ)
    with torch.no_grad():
        hf32 = hf(ids).logits
        hf64 = hf.double()(ids).logits
        hf.float()
        ours = load_model(path, backend="reference", dtype=torch.float32, progress=False)(ids)
    assert ours.shape == hf32.shape and ours.dtype == torch.float32
    own = (hf32.double() - hf64).abs().max().item()
    err = (ours.double() - hf64).abs().max().item()
    assert err <= 2 * own, f"{name}: max error {err:.3g} vs HF fp32's own {own:.3g}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_reference_greedy_generation_matches_hf(name, checkpoints, gen):
    """24 greedy tokens after prompts of different lengths (packed prefill, then cached decode)
    are HF's, prompt by prompt."""
    path, hf = checkpoints[name]
    prompts = [ids_for(gen, n).tolist() for n in (SEQ, 41, 5)]
    model = load_model(path, backend="reference", dtype=torch.float32, progress=False)
    ours = generate(model, prompts, max_new_tokens=24, stop_tokens=[])
    for prompt, tokens in zip(prompts, ours.tokens, strict=True):
        with torch.no_grad():
            want = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, len(prompt):]  # fmt: skip
        assert tokens == want.tolist()
    distinct = {t for tokens in ours.tokens for t in tokens}
    assert len(distinct) > 5, f"degenerate model: greedy decoding makes only {distinct}"


def logits_of(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).double()


def reference_pair(path):
    """The reference backend in fp32 and in fp64 (the fp64 one measures fp32's round-off)."""
    return (load_model(path, backend="reference", dtype=dt, progress=False)
            for dt in (torch.float32, torch.float64))  # fmt: skip


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("name", ["nemo", "mistral"])
def test_cached_decode_and_append_equal_full_recompute(name, checkpoints, gen):
    """Packed prefill of 30 tokens, 3 single-token decode steps, then 14 tokens appended at once
    give the logits a full forward over all 47 gives: within 2x the full forward's own fp32
    round-off (measured against fp64). The Mistral case's window (40) cuts into the last."""
    ref32, ref64 = reference_pair(checkpoints[name][0])
    B, S, P = 2, 47, 30
    ids = ids_for(gen, B, S)
    full64 = logits_of(ref64, ids)
    own = max_err(logits_of(ref32, ids), full64)
    cache = ref32.new_cache(B, 64)
    cu = torch.tensor([0, P, 2 * P], dtype=torch.int32)
    pre = logits_of(ref32, ids[:, :P].reshape(-1), cache=cache, cu_seqlens=cu)
    steps = [logits_of(ref32, ids[:, P + i : P + i + 1], cache=cache) for i in range(3)]
    rest = logits_of(ref32, ids[:, P + 3 :], cache=cache)
    assert cache.seqlens.tolist() == [S, S]
    got = torch.cat([pre.view(B, P, -1), *steps, rest], dim=1)
    assert max_err(got, full64) <= 2 * own


def test_packed_batch_equals_one_by_one(checkpoints, gen):
    """Sequences of 37, 1 and 20 tokens packed through cu_seqlens give each one's own logits,
    within 2x the fp32 round-off of running them one by one (measured against fp64)."""
    ref32, ref64 = reference_pair(checkpoints["nemo"][0])
    seqs = [ids_for(gen, n) for n in (37, 1, 20)]
    cu = torch.tensor([0, 37, 38, 58], dtype=torch.int32)
    packed = logits_of(ref32, torch.cat(seqs), cu_seqlens=cu)
    last = logits_of(ref32, torch.cat(seqs), cu_seqlens=cu, last_only=True)
    alone64 = [logits_of(ref64, s[None])[0] for s in seqs]
    own = max(max_err(logits_of(ref32, s[None])[0], a) for s, a in zip(seqs, alone64, strict=True))
    assert max_err(packed, torch.cat(alone64)) <= 2 * own
    assert max_err(last, torch.stack([a[-1] for a in alone64])) <= 2 * own
