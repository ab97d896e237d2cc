"""The e2e suite: the whole model's speed. Prefill and decode tokens/s, peak memory and GB/s of
the weights read per step, for fp8nemo's fp8 and bf16 reference backends beside HF transformers'
eager bf16 model and that model after `fp8nemo.hf.quantize_`, side by side in one run on one
checkpoint. Every row carries a check against an fp32 reference, so a broken fast path cannot
post a good number.

MODEL is an HF checkpoint folder or a preset; a preset's random weights are written once to a
temporary checkpoint folder, which all four implementations read.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import inspect
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fp8nemo.model.loader import write_random_checkpoint

from .harness import CORRECTNESS_ONLY, Row, case_fields, fmt, measure, rel_err

REFERENCE, FP8, HF_EAGER, HF_QUANTIZED = (
    "fp8nemo bf16 reference", "fp8nemo fp8", "HF eager bf16", "HF + quantize_",
)  # fmt: skip
# The order they run in: the fp8 backend first (a GPU check's budget may end the run; the first
# case also writes a preset's checkpoint and loads the fp32 reference), HF + quantize_ right
# after HF eager, whose model it quantizes in place instead of loading another.
IMPLS = (FP8, REFERENCE, HF_EAGER, HF_QUANTIZED)
KERNEL_IMPLS = (FP8, HF_QUANTIZED)  # the rows that run fp8nemo's Triton kernels
# The checks tell a broken path (logits off by ~100%, tokens agreeing ~1/vocab of the time) from
# FP8 round-off, which grows with depth (`fp8nemo validate` measures accuracy).
MAX_LOGITS_ERR = 0.3
MIN_AGREEMENT = 0.5
TORCH_CPU = "cpu (torch path: a CPU figure)"
EMULATED = "cpu (torch emulation of FP8, not the kernels)"


@dataclass(frozen=True)
class Sizes:
    """Prefill: one prompt of each length in `prompts`, into a fresh cache. Decode: `batches`
    sequences of `decode_prompt` tokens, `steps` greedy tokens each (the first from the prefill,
    the rest timed per step). Each row is timed over `repeats` runs after the checked one (which
    may have tuned or compiled); the interpreter's rows take the checked run's time."""

    prompts: tuple[int, ...]
    batches: tuple[int, ...]
    decode_prompt: int
    steps: int
    repeats: int

    def __post_init__(self):
        if not self.prompts or not self.batches or min(self.prompts + self.batches) < 1:
            raise ValueError(f"prompts and batches must be positive sizes; got {self}")
        if self.decode_prompt < 1 or self.steps < 2:
            raise ValueError(f"decode_prompt must be >= 1 and steps >= 2; got {self}")


GPU_SIZES = Sizes(prompts=(512, 4096), batches=(1, 16), decode_prompt=512, steps=32, repeats=2)
# The interpreter spends ~2 s on each decode step of the tiny preset, whatever the batch.
# The torch rows' steps take milliseconds: 15 repeats steady their medians on a busy CPU.
CPU_SIZES = Sizes(prompts=(64, 256), batches=(1, 4), decode_prompt=32, steps=6, repeats=15)


def default_model(on_gpu: bool) -> str:
    return "nemo-12b" if on_gpu else "tiny"


def model_config(model: str):
    """The ModelConfig of a checkpoint folder or preset; a ValueError naming both kinds else."""
    from fp8nemo.model import ModelConfig, preset
    from fp8nemo.model.config import PRESETS

    if os.path.isdir(model):
        return ModelConfig.from_pretrained(model)
    if model not in PRESETS:
        raise ValueError(
            f"MODEL {model} is neither a checkpoint folder nor a preset ({', '.join(PRESETS)})"
        )
    return preset(model)


def cases(on_gpu: bool, shapes=None, ms=None, model: str | None = None):
    """(implementation, workload) per implementation; `ms` are prefill prompt lengths."""
    sizes = GPU_SIZES if on_gpu else CPU_SIZES
    if ms:
        prompts = tuple(dict.fromkeys(ms))
        sizes = dataclasses.replace(sizes, prompts=prompts,
                                    decode_prompt=min(sizes.decode_prompt, *prompts))  # fmt: skip
    work = Workload(model or default_model(on_gpu), sizes, on_gpu)
    for impl in IMPLS:
        yield impl, work


# --- the workload every implementation shares ----------------------------------------------


class Workload:
    """The checkpoint, the prompts and the fp32 reference the checks compare with; the
    checkpoint is written and the reference loaded when the first case needs them."""

    def __init__(self, model: str, sizes: Sizes, on_gpu: bool):
        self.model, self.sizes = model, sizes
        self.device = torch.device("cuda" if on_gpu else "cpu")
        self.config = model_config(model)
        longest = max(*sizes.prompts, sizes.decode_prompt + sizes.steps)
        if longest > self.config.max_position_embeddings:
            raise ValueError(
                f"e2e sequences reach {longest} tokens, past {model}'s max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        gen = torch.Generator().manual_seed(0)
        vocab = self.config.vocab_size
        self.prompts = {p: torch.randint(0, vocab, (p,), generator=gen) for p in sizes.prompts}
        self.decode_prompts = torch.randint(0, vocab, (max(sizes.batches), sizes.decode_prompt),
                                            generator=gen)  # fmt: skip
        self._scratch = None  # the temporary folder of a preset's checkpoint
        self._truth = None
        self._truth_logits = {}
        self.hf_eager = None  # (HF eager's model, memory in use before it), for HF + quantize_

    def __str__(self) -> str:
        s = self.sizes
        return (f"{self.model} P={','.join(map(str, s.prompts))} B={','.join(map(str, s.batches))}"
                f" new={s.steps}")  # fmt: skip

    @property
    def path(self) -> str:
        if os.path.isdir(self.model):
            return self.model
        if self._scratch is None:
            nbytes = checkpoint_bytes(self.config)
            self._scratch = tempfile.TemporaryDirectory(prefix="fp8nemo-e2e-",
                                                        dir=_scratch_parent(nbytes))  # fmt: skip
            write_random_checkpoint(self.config, os.path.join(self._scratch.name, self.model),
                              self.device)  # fmt: skip
        return os.path.join(self._scratch.name, self.model)

    @property
    def truth(self):
        """The reference backend in fp32, kept for the whole run (its memory is in every
        implementation's baseline, so no row's peak counts it)."""
        if self._truth is None:
            from fp8nemo.model import load_model

            self._truth = load_model(self.path, backend="reference", dtype=torch.float32,
                                     device=self.device, progress=False)  # fmt: skip
        return self._truth

    @torch.inference_mode()
    def truth_logits(self, prompt_len: int) -> torch.Tensor:
        if prompt_len not in self._truth_logits:
            ids = self.prompts[prompt_len].to(self.device)
            self._truth_logits[prompt_len] = self.truth(ids[None], last_only=True)[0]
        return self._truth_logits[prompt_len]

    @torch.inference_mode()
    def agreement(self, prompts: torch.Tensor, tokens: list[list[int]]) -> float:
        """The share of `tokens` (each prompt's greedy continuation) that the fp32 reference
        ranks first given the same prefix: teacher-forced, so one early difference (a near tie
        that bf16 or FP8 round-off flips) does not count against every later token."""
        same = total = 0
        for prompt, new in zip(prompts.tolist(), tokens, strict=True):
            seq = torch.tensor([prompt + new[:-1]], device=self.device)
            picked = self.truth(seq)[0, len(prompt) - 1 :].argmax(-1)
            same += (picked.cpu() == torch.tensor(new)).sum().item()
            total += len(new)
        return same / total

    def close(self) -> None:
        self._truth = self.hf_eager = None
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def checkpoint_bytes(config) -> int:
    from fp8nemo.model import build_model

    meta = build_model(config, "reference", dtype=torch.bfloat16, device="meta")
    return sum(t.numel() * t.element_size() for t in meta.state_dict().values())


def _scratch_parent(nbytes: int) -> str | None:
    """/dev/shm where it has room: memory, so NeMo-12B's 24 GB are not written back to disk
    while the run reads them (the GPU machine has 128 GB of it); else the temporary folder."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and shutil.disk_usage(shm).free > 1.5 * nbytes:
        return shm
    return None


# --- the implementations ---------------------------------------------------------------------


class Timed(NamedTuple):
    value: object  # the prefill's last-token logits [V]; decode's tokens, [B][steps]
    ms: float  # the prefill's time; decode's per step


def _timed(fn, device: torch.device) -> Timed:
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return Timed(value, (time.perf_counter() - start) * 1e3)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Fp8nemo:
    """fp8nemo's model on `backend`: prefill as `generate` runs it (packed, into a cache),
    decode through `generate`, on a GPU replaying the fp8 backend's step as a CUDA graph (the
    reference decodes eagerly, as HF eager does)."""

    def __init__(self, work: Workload, backend: str):
        from fp8nemo.model import load_model

        self.device, self.base = work.device, None
        self.model = load_model(work.path, backend=backend, device=work.device, progress=False)
        self.graph = backend == "fp8" and work.device.type == "cuda"
        scheme = self.model.backend.scheme
        self.scheme = "bf16" if scheme is None else f"fp8 {scheme.weights}/{scheme.activations}"
        self.note = "CUDA graph" if self.graph else ""

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> Timed:
        P = ids.numel()
        cu = torch.tensor([0, P], dtype=torch.int32, device=self.device)
        return _timed(lambda: self.model(ids, cache=self.model.new_cache(1, P), cu_seqlens=cu,
                                         max_seqlen=P, last_only=True)[0], self.device)  # fmt: skip

    def decode(self, prompts: torch.Tensor, steps: int) -> Timed:
        from fp8nemo.model.generate import generate

        out = generate(self.model, prompts.tolist(), max_new_tokens=steps, stop_tokens=(),
                       cuda_graph=self.graph)  # fmt: skip
        return Timed(out.tokens, 1e3 * out.decode_s / out.decode_steps)


class HF:
    """transformers' AutoModelForCausalLM, eager attention, bf16: prefill is one forward of the
    prompt, decode a loop of one-token forwards over its DynamicCache, each step's argmax read on
    the host, as `generate` does. With `quantize`, the HF eager run's model (or a new one) after
    `fp8nemo.hf.quantize_`."""

    def __init__(self, work: Workload, quantize: bool = False):
        try:
            import transformers
        except ImportError:
            raise RuntimeError("transformers is not installed") from None
        self.device, self.base = work.device, None
        if quantize and work.hf_eager is not None:
            (self.model, self.base), work.hf_eager = work.hf_eager, None
        else:
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                work.path, dtype=torch.bfloat16, attn_implementation="eager",
                device_map=str(work.device) if work.device.type == "cuda" else None,
            ).eval()  # fmt: skip
        self.scheme, self.note = "bf16", ""
        if quantize:
            try:
                from fp8nemo.hf import FP8Config, quantize_
            except ModuleNotFoundError as err:
                if err.name != "fp8nemo.hf":
                    raise
                raise RuntimeError("fp8nemo.hf not present") from None
            config = FP8Config()
            report = quantize_(self.model, config)
            self.scheme = f"fp8 {config.weights}/{config.activations}"
            kept = [name.rsplit(".", 1)[-1] for name in report.skipped]
            self.note = f"kept bf16: {', '.join(dict.fromkeys(kept))}" if kept else ""
        self.cache_type = transformers.DynamicCache
        # transformers 5.2x renamed past_key_values to cache (the old name warns)
        forward = inspect.signature(self.model.forward).parameters
        self.cache_arg = "cache" if "cache" in forward else "past_key_values"

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> Timed:
        return _timed(lambda: self.model(ids[None], logits_to_keep=1).logits[0, -1], self.device)

    @torch.inference_mode()
    def decode(self, prompts: torch.Tensor, steps: int) -> Timed:
        cache = {self.cache_arg: self.cache_type(config=self.model.config)}
        logits = self.model(prompts, **cache, logits_to_keep=1).logits[:, -1]
        nxt = logits.argmax(-1)
        tokens = [nxt.tolist()]
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps - 1):
            logits = self.model(nxt[:, None], **cache, logits_to_keep=1).logits
            nxt = logits[:, -1].argmax(-1)
            tokens.append(nxt.tolist())
        _sync(self.device)
        ms = (time.perf_counter() - start) * 1e3 / (steps - 1)
        return Timed([list(t) for t in zip(*tokens, strict=True)], ms)


def _load(impl: str, work: Workload):
    if impl == REFERENCE:
        return Fp8nemo(work, "reference")
    if impl == FP8:
        return Fp8nemo(work, "fp8")
    return HF(work, quantize=impl == HF_QUANTIZED)


class _Unavailable:
    """An implementation that could not be set up: each of its rows says why (via measure)."""

    scheme, note, model, base = "-", "", None, None

    def __init__(self, err: Exception):
        self.err = err

    def prefill(self, *args):
        raise self.err

    decode = prefill


# --- what a step reads and computes ----------------------------------------------------------


def _linears(model) -> list[torch.nn.Module]:
    """nn.Linear and FP8Linear (fp8nemo's and quantize_'s) alike: modules with in/out features."""
    return [m for m in model.modules() if hasattr(m, "in_features") and hasattr(m, "out_features")]


def weight_bytes(model, tokens: int) -> int:
    """The weight bytes one forward of `tokens` tokens reads: every linear's tensors in full
    (weight, FP8 scales; the block linears and lm_head) and the embedding rows it looks up.
    Left out: norm weights (0.01% of NeMo-12B's) and the KV cache, whose reads grow with the
    context, not with the weights (at 512 tokens of context it is ~5% of a B=16 step's bytes)."""
    if model is None:
        return 0
    seen, total = set(), 0
    for m in _linears(model):
        for t in itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            total += tokens * m.embedding_dim * m.weight.element_size()
    return total


def linear_weights(model) -> int:
    return 0 if model is None else sum(m.in_features * m.out_features for m in _linears(model))


def prefill_flops(model, config, prompt_len: int) -> float:
    """2 flops per linear weight per token, and causal attention's two matmuls; a decode step's
    are the linears' alone (its attention adds ~1% at 512 tokens of NeMo-12B context)."""
    P = prompt_len
    attention = 4 * config.num_attention_heads * config.head_dim * P * (P + 1) / 2
    return 2.0 * linear_weights(model) * P + attention * config.num_hidden_layers


# --- peak memory -----------------------------------------------------------------------------


def _proc_status(key: str) -> int | None:
    """A /proc/self/status figure in bytes (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) << 10 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None


def memory_in_use(device: torch.device) -> int | None:
    """Bytes in use now: CUDA tensors on a GPU; on the CPU the process's RSS, after returning
    the freed heap to the system, so the last implementation's pages do not hide this one's."""
    gc.collect()
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _proc_status("VmRSS")


def reset_peak(device: torch.device) -> bool:
    """Start a new peak; False where the high-water mark cannot be reset. On the CPU this is
    Linux's /proc/self/clear_refs: getrusage's ru_maxrss cannot be reset, and it also counts
    the peak of the process image this one was exec'd from."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status("VmHWM") is not None


def peak_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _proc_status("VmHWM")


# --- the suite -------------------------------------------------------------------------------


def _mode(env, impl: str) -> str:
    """How to read a row's time: the environment's on a GPU; on the CPU a real figure for the
    torch paths, correctness only where the kernels ran in the interpreter."""
    if env.on_gpu:
        return env.mode
    if impl not in KERNEL_IMPLS:
        return TORCH_CPU
    from fp8nemo.kernels._triton import INTERPRET

    return CORRECTNESS_ONLY if INTERPRET else EMULATED


def run_case(env, device, impl: str, work: Workload) -> list[Row]:
    """Load `impl`, then its prefill rows (one per prompt length) and decode rows (one per
    batch size); each row's peak memory is above what was in use before loading."""
    sizes = work.sizes
    row_env = dataclasses.replace(env, mode=_mode(env, impl))
    work.truth_logits(sizes.prompts[0])  # the checkpoint and the reference exist before `base`
    base = memory_in_use(device)
    try:
        runner = _load(impl, work)
    except (RuntimeError, ValueError, TypeError, NotImplementedError) as err:
        if impl.startswith("fp8nemo"):
            raise
        runner = _Unavailable(err)
    base = runner.base if runner.base is not None else base
    repeats = 0 if row_env.mode == CORRECTNESS_ONLY else sizes.repeats
    fp8 = impl in KERNEL_IMPLS
    rows = []

    def row(shape, dims, fn, flops, nbytes, tokens, **checks):
        has_peak = runner.model is not None and base is not None and reset_peak(device)
        case = case_fields("e2e", shape, dims, torch.bfloat16, model=work.model)
        measure(row_env, device, rows, case, impl, runner.scheme, fn, flops, nbytes, fp8,
                ms_of=lambda first: _median_ms(first, fn, repeats), tokens=tokens,
                **checks)  # fmt: skip
        peak = peak_memory(device) if has_peak else None
        new = rows[-1]
        new.peak_mib = (peak - base) / 2**20 if peak is not None else None
        new.note = new.note or runner.note

    for P in sizes.prompts:
        ids = work.prompts[P].to(device)
        truth = work.truth_logits(P)
        row("prefill", dict(P=P), lambda ids=ids: runner.prefill(ids),
            prefill_flops(runner.model, work.config, P), weight_bytes(runner.model, P), P,
            check=lambda out, truth=truth: rel_err(out.value, truth))  # fmt: skip
    for B in sizes.batches:
        prompts = work.decode_prompts[:B].to(device)
        row("decode", dict(B=B, P=sizes.decode_prompt, new=sizes.steps),
            lambda prompts=prompts: runner.decode(prompts, sizes.steps),
            2.0 * linear_weights(runner.model) * B, weight_bytes(runner.model, B), B,
            agreement=lambda out, prompts=prompts: work.agreement(prompts, out.value))  # fmt: skip
    if impl == HF_EAGER and not isinstance(runner, _Unavailable):
        work.hf_eager = (runner.model, base)  # HF + quantize_ quantizes this model in place
    if impl == IMPLS[-1]:
        work.close()
    return rows


def _median_ms(first: Timed, fn, repeats: int) -> float:
    if not repeats:
        return first.ms
    return statistics.median(fn().ms for _ in range(repeats))


def passed(row: Row) -> bool:
    """A prefill row's logits within MAX_LOGITS_ERR of the fp32 reference's, a decode row's
    tokens agreeing at least MIN_AGREEMENT; a row without a figure passes only if it is not
    fp8nemo's (a baseline this machine lacks, or a case the budget left out)."""
    figure = row.rel_err if row.shape == "prefill" else row.agreement
    if figure is None or row.shape not in ("prefill", "decode"):
        return not row.impl.startswith("fp8nemo")
    return figure < MAX_LOGITS_ERR if row.shape == "prefill" else figure >= MIN_AGREEMENT


# --- the side-by-side table ------------------------------------------------------------------

# Speed ratios a person reads first: (numerator, denominator) implementations.
RATIOS = ((REFERENCE, HF_EAGER), (FP8, REFERENCE), (HF_QUANTIZED, HF_EAGER))


def _check_text(row: Row) -> str:
    if row.shape == "prefill" and row.rel_err is not None:
        text = f"logits {row.rel_err:.1e}"
    elif row.shape == "decode" and row.agreement is not None:
        text = f"agree {row.agreement:.0%}"
    else:
        return "-"
    return text if passed(row) else f"{text} FAIL"


def _tables(env, rows: list[Row]):
    """(header lines, table, ratio table, rows the budget left out), as lists of cells."""
    measured = [r for r in rows if r.shape in ("prefill", "decode")]
    skipped = [r for r in rows if r.shape not in ("prefill", "decode")]
    # a case the budget left out names its workload in dims: "<model> P=... B=... new=..."
    model = next((r.model for r in measured), None) or next(
        (r.dims.split()[0] for r in skipped if r.dims), ""
    )
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = "not installed"
    interpreted = any(r.env.get("mode") == CORRECTNESS_ONLY for r in measured)
    where = f"{env.device} (cc {env.capability})" if env.on_gpu else (
        f"{env.device}, {torch.get_num_threads()} torch threads")  # fmt: skip
    head = [
        f"e2e {model}: whole-model tokens/s on {where}; torch {env.torch}, triton {env.triton}, "
        f"transformers {hf_version}, {env.date}",
        "prefill P: one P-token prompt into a fresh cache; decode B: B prompts of P tokens, `new` "
        "greedy tokens each, ms and GB/s per step (the first token comes from the prefill)",
        "GB/s: weight bytes a step reads (every linear with lm_head, the embedding rows looked "
        "up) / its time; peak: memory above what was in use before the implementation loaded",
        f"check against the fp32 reference backend: prefill = relative error of the last "
        f"token's logits (< {MAX_LOGITS_ERR}), decode = share of the tokens it ranks first "
        f"given the same prefix (>= {MIN_AGREEMENT:.0%})",
    ]
    if interpreted:
        head.append("* the kernels ran in the Triton interpreter: correctness only, not a speed")
    cases = list(dict.fromkeys(f"{r.shape} {r.dims}" for r in measured))
    order = {impl: i for i, impl in enumerate(IMPLS)}
    by_case = sorted(measured, key=lambda r: (cases.index(f"{r.shape} {r.dims}"),
                                              order.get(r.impl, len(order))))  # fmt: skip
    table = [("case", "impl", "scheme", "tok/s", "ms", "GB/s", "%roof", "peak MiB", "check",
              "note")]  # fmt: skip
    last = None
    for r in by_case:
        case = f"{r.shape} {r.dims}"
        star = "*" if r.env.get("mode") == CORRECTNESS_ONLY else ""
        table.append((
            case if case != last else "", r.impl, r.scheme,
            fmt(r.tokens_per_s, ".1f") + star, fmt(r.median_ms, ".2f"), fmt(r.gbps, ".1f"),
            fmt(r.roofline_pct, ".0f"), fmt(r.peak_mib, ".0f"), _check_text(r), r.note,
        ))  # fmt: skip
        last = case
    speed = {(f"{r.shape} {r.dims}", r.impl): r for r in measured}
    ratios = [("tokens/s ratio", *cases)]
    for num, den in RATIOS:
        cells = []
        for case in cases:
            a, b = speed.get((case, num)), speed.get((case, den))
            if a is None or b is None or not a.tokens_per_s or not b.tokens_per_s:
                cells.append("-")
            elif CORRECTNESS_ONLY in (a.env.get("mode"), b.env.get("mode")):
                cells.append("*")
            else:
                cells.append(f"{a.tokens_per_s / b.tokens_per_s:.2f}")
        ratios.append((f"{num} / {den}", *cells))
    return head, table, ratios, skipped


def _text(table, left: tuple[int, ...]) -> list[str]:
    """Columns padded to their widest cell; those in `left` flush left, figures flush right."""
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) if i in left else c.rjust(w)
                      for i, (c, w) in enumerate(zip(t, widths, strict=True))).rstrip()
            for t in table]  # fmt: skip


def format_table(env, rows: list[Row]) -> str:
    head, table, ratios, skipped = _tables(env, rows)
    lines = head
    if len(table) > 1:
        lines = [*head, "", *_text(table, (0, 1, 2, 8, 9)), "", *_text(ratios, (0,))]
    lines += [f"{r.shape}: {r.note}" for r in skipped]
    return "\n".join(lines)


def format_markdown(env, rows: list[Row]) -> str:
    head, table, ratios, skipped = _tables(env, rows)

    def md(t):
        cells = [[c.replace("*", r"\*") for c in r] for r in t]  # a bare * starts emphasis
        return ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])] + [
            "| " + " | ".join(r) + " |" for r in cells[1:]
        ]

    lines = [f"{h}  " for h in head]
    if len(table) > 1:
        lines += ["", *md(table), "", *md(ratios)]
    lines += [f"- {r.shape}: {r.note}" for r in skipped]
    return "\n".join(lines) + "\n"
