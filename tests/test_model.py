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
