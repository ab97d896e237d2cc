"""`fp8nemo tune`: time the kernel configs a model runs at given batch sizes and prompt lengths
on this GPU, so that later processes read the choices from the tuning file instead."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fp8nemo.kernels import _triton
from fp8nemo.kernels._triton import Autotuner, Decision
from fp8nemo.model import Transformer, load_model
from fp8nemo.model.generate import warmup

BATCH_SIZES = (1, 16)
PROMPT_LENS = (512, 4096)


@dataclass
class TuneResult:
    decisions: list[Decision]  # each (op, key) the warm-ups met, in the order they met it
    path: str  # the tuning file they were written to / read from


def untunable(device: torch.device) -> str | None:
    """Why configs cannot be timed on `device`, or None when they can."""
    if os.environ.get("FP8NEMO_AUTOTUNE", "1") == "0":
        return "FP8NEMO_AUTOTUNE=0 turns tuning off; unset it to tune"
    if device.type != "cuda" or not torch.cuda.is_available():
        seen = "torch sees no CUDA device" if device.type == "cuda" else f"{device} is not one"
        return f"tuning needs a CUDA GPU, as configs are only timed there; {seen}"
    if _triton.INTERPRET:
        return "TRITON_INTERPRET=1 runs the kernels through the interpreter, which cannot be timed"
    try:
        _triton.use_triton(device, "tune")  # the FP8 tensor-core check
    except RuntimeError as err:
        return str(err)
    return None


def tune_model(model: Transformer, batch_sizes=BATCH_SIZES, prompt_lens=PROMPT_LENS):
    """Run `warmup` (a packed prefill and a decode step) at every batch size and prompt length,
    so every GEMM and attention shape they meet is tuned; the decisions they made."""
    start = len(Autotuner.decisions)
    for batch_size in batch_sizes:
        for prompt_len in prompt_lens:
            warmup(model, batch_size, prompt_len)
    return Autotuner.decisions[start:]


def tune(path_or_preset: str, *, batch_sizes=BATCH_SIZES, prompt_lens=PROMPT_LENS, device="cuda",
         dtype="bf16", scheme=None, kv_cache_dtype=None, progress=False) -> TuneResult:  # fmt: skip
    """Load the checkpoint or preset (random weights) on the fp8 backend and `tune_model` it."""
    device = torch.device(device)
    problem = untunable(device)
    if problem:
        raise RuntimeError(problem)
    model = load_model(path_or_preset, backend="fp8", device=device, dtype=dtype, scheme=scheme,
                       kv_cache_dtype=kv_cache_dtype, max_seq_len=max(prompt_lens) + 1,
                       progress=progress)  # fmt: skip
    return TuneResult(tune_model(model, batch_sizes, prompt_lens), _triton.tuning_path(device))
