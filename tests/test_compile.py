"""The decode step as one graph: torch.compile(fullgraph=True) of the step on both backends
gives the eager step's logits and cache (exactly where the ops run as they are, within
round-off under inductor) and compiles once; on CUDA the captured CUDA graph (of the eager or
the compiled step) gives the eager tokens and replays without a host sync."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import UNIT_ROUNDOFF, assert_within

from fp8nemo import fp8
from fp8nemo.model import build_model
from fp8nemo.model.config import preset
from fp8nemo.model.generate import _decode_step, generate
from fp8nemo.model.linear import FP8Linear
from fp8nemo.model.transformer import RMSNorm

# The tiny preset shrunk further (every interpreted kernel launch costs ~0.1 s): two blocks
# still, GQA 2:1, head_dim 16.
CONFIG = dataclasses.replace(
    preset("tiny"), vocab_size=256, hidden_size=64, intermediate_size=128,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
)  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles what it counts (dynamo would reuse a graph of an earlier test)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_model(backend, device, gen, dtype=torch.bfloat16, kv_cache_dtype=None):
    """CONFIG with lively random weights (HF's 0.02 init makes near-uniform logits, where
    greedy tokens tie): linears N(0, 1/K) (FP8 ones quantized per channel), embeddings N(0, 1),
    norms 1 + N(0, 0.01)."""
    model = build_model(CONFIG, backend, dtype=dtype, device=device,
                        kv_cache_dtype=kv_cache_dtype)  # fmt: skip
    draw = lambda *shape, std=1.0: (torch.randn(*shape, generator=gen) * std).to(device)  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FP8Linear):
                w = draw(module.out_features, module.in_features, std=module.in_features**-0.5)
                w_fp8, scale = fp8.quantize(w, module.scheme.weights)
                module.weight.copy_(w_fp8)
                module.weight_scale.copy_(scale.reshape(module.weight_scale.shape))
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(draw(*module.weight.shape, std=module.in_features**-0.5))
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(draw(*module.weight.shape))
            elif isinstance(module, RMSNorm):
                module.weight.copy_(1 + draw(*module.weight.shape, std=0.1))
    return model


def prefilled(model, gen, lengths=(9, 5), cache_len=32):
    """A cache holding random prompts of `lengths`, written by the eager packed prefill."""
    cache = model.new_cache(len(lengths), cache_len)
    ids = torch.randint(0, CONFIG.vocab_size, (sum(lengths),), generator=gen).to(model.device)
    bounds = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    model(ids, cache=cache, cu_seqlens=bounds.to(model.device), max_seqlen=max(lengths))
    return cache


def twin_caches(model, gen):
    cache = prefilled(model, gen)
    twin = model.new_cache(cache.batch_size, cache.max_seq_len)
    for name in ("k", "v", "seqlens"):
        getattr(twin, name).copy_(getattr(cache, name))
    return cache, twin


def graphs_compiled() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def random_ids(gen, device, batch_size=2):
    return torch.randint(0, CONFIG.vocab_size, (batch_size, 1), generator=gen).to(device)


@pytest.mark.parametrize(
    "backend, kv_cache_dtype",
    [("reference", None), ("fp8", fp8.E4M3)],
    ids=["reference", "fp8-e4m3-cache"],
)
@torch.inference_mode()
def test_traced_step_is_the_eager_step_and_compiles_once(backend, kv_cache_dtype, device, gen):
    """aot_eager runs the traced graph's ops as eager runs them: the same logits and cache
    bits at every step, with fresh ids each step; one graph, no recompile after the warm-up's
    two steps, and no graph break (fullgraph=True would raise)."""
    model = small_model(backend, device, gen, kv_cache_dtype=kv_cache_dtype)
    cache, twin = twin_caches(model, gen)
    before = graphs_compiled()
    eager = _decode_step(model, cache, 2)
    compiled = _decode_step(model, twin, 2, compile="aot_eager")  # warms up: 2 steps
    assert graphs_compiled() - before == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            ids = random_ids(gen, device)
            want, got = eager(ids), compiled(ids)
            assert torch.equal(got, want), f"step {step}: logits differ"
            for name in ("k", "v", "seqlens"):
                a, b = getattr(twin, name), getattr(cache, name)
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"step {step}: {name}"
    assert twin.seqlens.tolist() == [12, 8]
    assert graphs_compiled() - before == 1


def test_a_host_read_in_the_step_fails_the_full_graph(device, gen, monkeypatch):
    """What fullgraph=True guards against: the model's host checks (a `.tolist()` of the lengths)
    traced into the step break the graph, and the compile refuses."""
    model = small_model("reference", device, gen)
    cache = prefilled(model, gen)
    monkeypatch.setattr("fp8nemo.model.transformer.value_checks_enabled", lambda t: True)
    # Dynamo refuses the host read itself or the branch on its value (torch versions differ).
    where = r'transformer\.py", line \d+, in batch'
    with torch.inference_mode(), pytest.raises(torch._dynamo.exc.TorchDynamoException, match=where):
        _decode_step(model, cache, 2, compile="aot_eager")


def lm_head_bound(model, h, logits, u, roundings):
    """|logit error| allowed when the final norm's output h [B, D] may round `roundings` times
    differently (u each, relative) and each logit rounds once more: roundings * u * |W| @ |h|
    + 2u |logit|."""
    spread = h.double().abs() @ model.lm_head.weight.double().abs().T
    return roundings * u * spread + 2 * u * logits.double().abs()


@pytest.mark.parametrize("backend", ["reference", "fp8"])
@torch.inference_mode()  # as generate runs: its caches are inference tensors, as these
def test_inductor_step_within_round_off_and_generate_gives_the_eager_tokens(backend, device, gen):
    """Inductor reorders and fuses arithmetic. The reference backend (fp32, every op compiled)
    stays within twice the eager step's own error against the same model in fp64 (the
    attention rule). On the fp8 backend inductor computes only the final RMSNorm (the rest is
    the kernels): eager rounds its output twice (to bf16, then times the weight), inductor
    once, so the two differ by up to 3u. generate(compile=True) then picks the eager tokens."""
    dtype = torch.float32 if backend == "reference" else torch.bfloat16
    model = small_model(backend, device, gen, dtype=dtype)
    cache, twin = twin_caches(model, gen)
    seen = {}  # the eager step's final norm output (the hook does nothing in a graph)
    model.model.norm.register_forward_hook(
        lambda m, args, out: None if torch.compiler.is_compiling() else seen.update(h=out[0])
    )
    if backend == "reference":
        ref = build_model(CONFIG, "reference", dtype=torch.float64, device=device)
        ref.load_state_dict(model.state_dict())
        ref_cache = ref.new_cache(2, cache.max_seq_len)  # the step's error only: eager's prefill
        for name in ("k", "v", "seqlens"):
            getattr(ref_cache, name).copy_(getattr(cache, name))
    eager = _decode_step(model, cache, 2)
    compiled = _decode_step(model, twin, 2, compile=True)
    for step in range(2):
        ids = random_ids(gen, device)
        want = eager(ids)
        h = seen["h"]
        got = compiled(ids)
        assert torch.isfinite(got).all()
        if backend == "reference":
            exact = _decode_step(ref, ref_cache, 2)(ids)
            own = (want.double() - exact).norm()
            assert (got.double() - exact).norm() <= 2 * own, f"step {step}"
        else:
            bound = lm_head_bound(model, h, want, UNIT_ROUNDOFF[dtype], roundings=3)
            assert_within(got, want, bound, f"step {step} logits")
    # Prompts of 9 and 5 tokens + 8 new fill a cache of 32 slots, the step's above: no recompile.
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,), generator=gen).tolist() for n in (9, 5)]
    before = graphs_compiled()
    want = generate(model, prompts, max_new_tokens=8, stop_tokens=[])
    got = generate(model, prompts, max_new_tokens=8, stop_tokens=[], compile=True)
    assert got.tokens == want.tokens and got.decode_steps == want.decode_steps == 7
    assert graphs_compiled() == before


# ---------------------------------------------------------------------------------------------
# CUDA graphs (FP8NEMO_TEST_DEVICE=cuda)


def needs_cuda(device):
    if device.type != "cuda":
        pytest.skip("CUDA graphs need FP8NEMO_TEST_DEVICE=cuda")


@pytest.mark.parametrize("backend", ["reference", "fp8"])
def test_cuda_graph_and_compiled_decode_give_the_eager_tokens(backend, device, gen):
    needs_cuda(device)
    dtype = torch.float32 if backend == "reference" else torch.bfloat16
    model = small_model(backend, device, gen, dtype=dtype)
    lengths = (9, 4, 30)
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    eager = generate(model, prompts, max_new_tokens=8, stop_tokens=[]).tokens
    for kwargs in (dict(cuda_graph=True), dict(compile=True),
                   dict(compile=True, cuda_graph=True)):  # fmt: skip
        got = generate(model, prompts, max_new_tokens=8, stop_tokens=[], **kwargs).tokens
        assert got == eager, kwargs


@pytest.mark.parametrize("backend", ["reference", "fp8"])
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@torch.inference_mode()
def test_cuda_graph_replay_makes_no_host_sync(backend, compile, device, gen):
    """Replays (and the compiled step without a graph) under sync debug mode "error", which
    raises at any device sync; each replay picks the eager step's tokens."""
    needs_cuda(device)
    model = small_model(backend, device, gen, kv_cache_dtype=fp8.E4M3 if backend == "fp8" else None)
    cache, twin = twin_caches(model, gen)
    eager = _decode_step(model, cache, 2)
    graph = _decode_step(model, twin, 2, compile=compile, cuda_graph=True)
    steps = [random_ids(gen, device) for _ in range(4)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        replayed = [graph(ids).clone() for ids in steps]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for step, (ids, got) in enumerate(zip(steps, replayed, strict=True)):
        assert torch.equal(got.argmax(-1), eager(ids).argmax(-1)), f"step {step}"
    assert torch.equal(twin.seqlens, cache.seqlens)
    if compile:
        fresh = prefilled(model, gen)
        step = _decode_step(model, fresh, 2, compile=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for ids in steps:
                step(ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
