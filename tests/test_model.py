"""fp8nemo's model against HF transformers (logits and greedy generation, on small random
Mistral/Llama models with each family's quirks), the KV cache, packed batches and appending,
and the FP8 backend's error against the reference."""

from __future__ import annotations

import pytest
import torch
from helpers import fp8_floor_db, sqnr_db
from models import CONFIGS, save_hf_model

from fp8nemo.model import FP8Scheme, load_model
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
    assert max_err(cached_logits(ref32, ids, P), full64) <= 2 * own


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


# ---------------------------------------------------------------------------------------------
# the FP8 backend


def cached_logits(model, ids, prefill: int, steps: int = 3):
    """Logits of `ids` [B, S] computed as generation does: packed prefill of `prefill` tokens,
    `steps` single-token decode steps, then the rest appended at once."""
    B, S = ids.shape
    cache = model.new_cache(B, S + 8)
    cu = torch.arange(0, (B + 1) * prefill, prefill, dtype=torch.int32)
    pre = logits_of(model, ids[:, :prefill].reshape(-1), cache=cache, cu_seqlens=cu)
    parts = [pre.view(B, prefill, -1)]
    for i in range(steps):
        parts.append(logits_of(model, ids[:, prefill + i : prefill + i + 1], cache=cache))
    parts.append(logits_of(model, ids[:, prefill + steps :], cache=cache))
    assert cache.seqlens.tolist() == [S] * B
    return torch.cat(parts, dim=1)


def fp8_model(path, scheme="channel", **kw):
    return load_model(
        path, backend="fp8", dtype=torch.bfloat16, scheme=scheme, progress=False, **kw
    )


@pytest.mark.parametrize(
    "name, scheme",
    [("nemo", "tensor"), ("nemo", "channel"), ("nemo", "block"), ("mistral", "channel"),
     ("llama", "block")],
)  # fmt: skip
def test_fp8_backend_logits_sqnr_above_the_derived_floor(name, scheme, checkpoints, gen):
    path, _ = checkpoints[name]
    ids = ids_for(gen, 2, SEQ)
    ref = logits_of(load_model(path, backend="reference", dtype=torch.float32, progress=False), ids)
    out = logits_of(fp8_model(path, scheme), ids)
    assert out.isfinite().all()
    floor = fp8_floor_db(CONFIGS[name][1]["num_hidden_layers"])
    assert sqnr_db(out, ref) > floor, f"{name}/{scheme}: {sqnr_db(out, ref):.1f} dB <= {floor:.1f}"


def test_quantized_on_load_equals_converted_then_loaded(checkpoints, tmp_path, gen):
    """A 16-bit checkpoint quantized on load is the checkpoint `fp8nemo quantize` writes, loaded:
    the same codes and scales in every layer, the same logits bit for bit."""
    from fp8nemo.quant.convert import quantize_checkpoint

    path, _ = checkpoints["nemo"]
    quantize_checkpoint(path, str(tmp_path / "fp8"), scheme="channel", progress=False)
    a, b = fp8_model(path, "channel"), fp8_model(str(tmp_path / "fp8"), None)
    assert b.backend.scheme == FP8Scheme("channel", "dynamic")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(
            sa[key].view(torch.uint8) if sa[key].dtype == torch.float8_e4m3fn else sa[key],
            sb[key].view(torch.uint8) if sb[key].dtype == torch.float8_e4m3fn else sb[key],
        ), key
    ids = ids_for(gen, 1, 40)
    assert torch.equal(logits_of(a, ids), logits_of(b, ids))
    # The reference backend reads an FP8 checkpoint as its dequantized self.
    deq = load_model(
        str(tmp_path / "fp8"), backend="reference", dtype=torch.float32, progress=False
    )
    for name, module in b.named_modules():
        if hasattr(module, "weight_scale"):
            assert torch.equal(deq.get_submodule(name).weight, module.dequantize()), name


def test_static_activations_from_calibration_through_the_model(checkpoints, tmp_path, gen):
    """`quantize --activations static` calibrates on fp8nemo's reference model; the FP8 model of
    the result, with its e4m3 KV cache and k/v scales, stays above the same floor."""
    from safetensors.torch import save_file

    from fp8nemo.model import calibrate_checkpoint
    from fp8nemo.quant.convert import quantize_checkpoint

    path, _ = checkpoints["nemo"]
    save_file({"input_ids": ids_for(gen, 8, SEQ)}, str(tmp_path / "calib.safetensors"))
    quantize_checkpoint(path, str(tmp_path / "fp8"), scheme="tensor", activations="static",
                        calib=str(tmp_path / "calib.safetensors"), progress=False,
                        calibrate=calibrate_checkpoint)  # fmt: skip
    model = fp8_model(str(tmp_path / "fp8"), None, kv_cache_dtype="fp8")
    assert model.backend.scheme.static
    attn = model.model.layers[0].self_attn
    assert attn.k_scale.item() != 1.0 and attn.q_proj.input_scale.item() > 0
    norm = model.model.layers[0].input_layernorm
    want = torch.stack(
        [attn.q_proj.input_scale, attn.k_proj.input_scale, attn.v_proj.input_scale]
    ).amax(0)
    assert torch.equal(norm.input_scale, want)
    ids = ids_for(gen, 2, SEQ)
    ref = logits_of(load_model(path, backend="reference", dtype=torch.float32, progress=False), ids)
    assert sqnr_db(logits_of(model, ids), ref) > fp8_floor_db(3)
    # Through the e4m3 cache (prefill writes it, decode and append read it): two more
    # quantized tensors per block.
    assert sqnr_db(cached_logits(model, ids, 60), ref) > fp8_floor_db(3, per_block=13)


@pytest.mark.parametrize("name", ["nemo", "mistral"])
def test_fp8_cached_decode_and_append_equal_full_recompute(name, checkpoints, gen):
    """On the FP8 backend the cached paths (flash prefill, decode, append over the cache) differ
    from the full forward by less than the FP8 backend differs from the reference: their
    difference is accumulation order, not quantization."""
    path, _ = checkpoints[name]
    ids = ids_for(gen, 2, 47)
    ref = logits_of(load_model(path, backend="reference", dtype=torch.float32, progress=False), ids)
    model = fp8_model(path)
    full = logits_of(model, ids)
    assert sqnr_db(cached_logits(model, ids, 30), full) > sqnr_db(full, ref)
