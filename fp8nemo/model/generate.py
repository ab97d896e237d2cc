"""Generation: one packed prefill of every prompt (through `cu_seqlens`), then decode steps
over the KV cache; greedy, temperature, top-k and top-p sampling, stop tokens, streaming. The
decode step can run through torch.compile (CPU or GPU) and, on a GPU, as a captured CUDA
graph."""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fp8nemo.kernels import value_checks

from .cache import KVCache
from .transformer import Transformer

# Graphs torch.compile may keep for the decode step (one per model structure, batch size and
# cache length) before dynamo refuses to compile more; its default, 8, is soon reached by a
# process that serves several batch sizes.
MAX_COMPILED_STEPS = 64


@dataclass(frozen=True)
class Sampling:
    """`temperature` 0 is greedy; `top_k` 0 and `top_p` 1 keep every token."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        if (
            not isinstance(t, (int, float))
            or isinstance(t, bool)
            or not (math.isfinite(t) and t >= 0)
        ):
            raise ValueError(f"temperature must be a finite number >= 0; got {t!r}")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"top_k must be an int >= 0; got {k!r}")
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p must lie in (0, 1]; got {p!r}")

    def pick(self, logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Next tokens [B] int64 from logits [B, V]."""
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            # Drop a token once the ones before it already hold top_p (the first always stays).
            drop = probs.cumsum(-1) - probs >= self.top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        probs = logits.softmax(-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@dataclass
class Generation:
    """Each prompt's new tokens (stop token included when one ended it), and the timings."""

    tokens: list[list[int]]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    finished: list[bool] = field(default_factory=list)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else math.inf

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens decoded per second over the whole batch (each step makes B tokens)."""
        produced = self.decode_steps * len(self.tokens)
        return produced / self.decode_s if self.decode_s else math.inf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token id lists")
    if all(isinstance(t, int) for t in prompts):
        prompts = [list(prompts)]
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, Sequence) or not p:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids; got {p!r}")
        bad = next((t for t in p if not isinstance(t, int) or isinstance(t, bool)
                    or not 0 <= t < vocab_size), None)  # fmt: skip
        if bad is not None:
            raise ValueError(f"prompts[{i}] holds {bad!r}: token ids lie in [0, {vocab_size})")
        out.append(list(p))
    return out


@torch.inference_mode()
def generate(
    model: Transformer,
    prompts,
    *,
    max_new_tokens: int = 32,
    sampling: Sampling | None = None,
    stop_tokens: Sequence[int] | None = None,
    seed: int | None = None,
    stream: Callable[[int, int], None] | None = None,
    cuda_graph: bool = False,
    compile: bool | str = False,
) -> Generation:
    """Continue each prompt (a list of token ids; several of different lengths at once) by up
    to `max_new_tokens`, stopping a sequence at any of `stop_tokens` (default: the config's
    eos ids). `stream(i, token)` sees each new token of prompt i as soon as it exists.

    `compile` runs the decode step through `torch.compile(fullgraph=True, dynamic=False)`, on
    either backend, CPU or GPU: True with inductor, or a string naming another torch.compile
    backend ("aot_eager" traces without generating code). Positions and lengths are tensors on
    the device, so one graph serves every step; the cache is rounded up to a power-of-two
    length, so later calls with the same batch size mostly reuse it. `cuda_graph` replays the
    decode step (the compiled one, with `compile`) as a captured CUDA graph (CUDA only). Either
    warms the step up before the decode timing starts: compile time is not decode time.

    Not torch.compile's mode="reduce-overhead" for the graph: its CUDA graphs are skipped for
    a graph that mutates its inputs unless they are marked static, and the KV cache and its
    lengths are written in place every step. One hand-made graph, captured after a warm-up on
    a side stream, serves the eager and the compiled step alike (as vLLM captures compiled
    graphs)."""
    config = model.config
    prompts = _check_prompts(prompts, config.vocab_size)
    if (
        not isinstance(max_new_tokens, int)
        or isinstance(max_new_tokens, bool)
        or max_new_tokens < 1
    ):
        raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}")
    sampling = sampling or Sampling()
    stops = set(config.eos_token_id if stop_tokens is None else stop_tokens)
    device = model.device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph needs a CUDA model; this one is on {device}")
    if not isinstance(compile, (bool, str)):
        raise TypeError(
            f"compile must be a bool or a torch.compile backend's name; got {compile!r}"
        )
    if compile:
        try:
            _compiled_forward(_backend_name(compile))
        except torch._dynamo.exc.InvalidBackend as err:
            raise ValueError(f"compile: {err}") from None
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)

    B = len(prompts)
    lengths = [len(p) for p in prompts]
    longest = max(lengths) + max_new_tokens
    if longest > model.max_seq_len:
        raise ValueError(
            f"the longest prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) is "
            f"{longest}, past the model's max_seq_len {model.max_seq_len}"
        )
    cache_len = longest
    if compile:  # one graph per power-of-two cache length, not per prompt length
        cache_len = min(1 << (longest - 1).bit_length(), model.max_seq_len)
    cache = model.new_cache(B, cache_len)
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.int64, device=device)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)

    _sync(device)
    t0 = time.perf_counter()
    logits = model(ids, cache=cache, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), last_only=True)
    nxt = sampling.pick(logits, gen)
    _sync(device)
    prefill_s = time.perf_counter() - t0

    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    step = None  # one new token is the prefill's: no step to compile or capture
    if max_new_tokens > 1:
        step = _decode_step(model, cache, B, compile=compile, cuda_graph=cuda_graph)
    steps = 0
    t1 = time.perf_counter()
    while True:
        for i, t in enumerate(nxt.tolist()):
            if done[i]:
                continue
            out[i].append(t)
            if stream is not None:
                stream(i, t)
            if t in stops or len(out[i]) == max_new_tokens:
                done[i] = True
        if all(done):
            break
        step_ids = nxt.view(B, 1)
        logits = step(step_ids)
        nxt = sampling.pick(logits, gen)
        steps += 1
    _sync(device)
    decode_s = time.perf_counter() - t1
    finished = [bool(o) and o[-1] in stops for o in out]
    return Generation(out, sum(lengths), prefill_s, decode_s, steps, finished)


@torch.inference_mode()
def warmup(model: Transformer, batch_size: int = 1, prompt_len: int = 16) -> None:
    """Run a packed prefill and a decode step of this shape once, so the autotuner has picked
    the kernels' configs (on a GPU the first call of a shape tunes) and the CPU path has said
    what it is, before something is timed. The cache it fills is thrown away. (generate's
    compiled and captured steps warm up on their own cache: attention tunes per cache length.)"""
    cache = model.new_cache(batch_size, prompt_len + 1)
    ids = torch.zeros(batch_size * prompt_len, dtype=torch.int64, device=model.device)
    cu = torch.arange(0, (batch_size + 1) * prompt_len, prompt_len, dtype=torch.int32,
                      device=model.device)  # fmt: skip
    model(ids, cache=cache, cu_seqlens=cu, max_seqlen=prompt_len, last_only=True)
    model(ids.view(batch_size, prompt_len)[:, :1], cache=cache)
    _sync(model.device)


def _forward(model: Transformer, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    # ids [B, 1] -> logits [B, V]
    return model(ids, cache=cache)[:, -1]


def _backend_name(compile: bool | str) -> str:
    return "inductor" if compile is True else compile


@functools.cache
def _compiled_forward(backend: str) -> Callable:
    return torch.compile(_forward, backend=backend, fullgraph=True, dynamic=False)


def _decode_step(model: Transformer, cache: KVCache, batch_size: int, *,
                 compile: bool | str = False, cuda_graph: bool = False) -> Callable:  # fmt: skip
    """generate's decode step, ids [B, 1] int64 -> logits [B, V]: eager, compiled and/or
    replayed as a CUDA graph, warmed up when compiled or captured."""
    if not compile:
        step = functools.partial(_forward, model, cache=cache)
    else:
        forward = _compiled_forward(_backend_name(compile))

        def step(ids: torch.Tensor) -> torch.Tensor:
            # The model cannot switch its ops' value checks off from inside a graph: they would
            # read (and sync) at every step. generate validated the ids and lengths.
            with value_checks(False):
                return forward(model, ids, cache)

    if compile or cuda_graph:
        limit = (
            torch._dynamo.config.patch(cache_size_limit=MAX_COMPILED_STEPS)
            if compile
            else contextlib.nullcontext()
        )
        with limit:  # the warm-up compiles
            _warm_up(step, cache, batch_size)
    return _graph_step(step, cache, batch_size) if cuda_graph else step


def _warm_up(step: Callable, cache: KVCache, batch_size: int) -> None:
    """Run `step` twice on dummy ids, putting the lengths back each time (its cache writes land
    where the next step writes): torch.compile compiles, and the autotuner picks every kernel's
    config for exactly this step's shapes, before the timed loop and before a CUDA graph
    captures (capture must see neither). On a GPU on a side stream, as capture needs."""
    device = cache.device
    ids = torch.zeros(batch_size, 1, dtype=torch.int64, device=device)
    saved = cache.seqlens.clone()
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for _ in range(2):
            step(ids)
            cache.seqlens.copy_(saved)
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)


def _graph_step(step: Callable, cache: KVCache, batch_size: int) -> Callable:
    """`step`, warmed up, captured as a CUDA graph: static ids in, static logits out (valid
    until the next replay). Positions and lengths are read from the cache on the device and
    the ops' host checks are off while a graph captures, so a replay makes no host sync.
    Capture records and runs nothing: the cache is as it was."""
    static_ids = torch.zeros(batch_size, 1, dtype=torch.int64, device=cache.device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = step(static_ids)

    def replay(ids: torch.Tensor) -> torch.Tensor:
        static_ids.copy_(ids)
        graph.replay()
        return static_logits

    return replay
