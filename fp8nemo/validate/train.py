"""Train the built-in models `fp8nemo validate` checks by default: a small model of Mistral
NeMo's shape and quirks over bytes, trained on the Python standard library's source files (text
every machine has) with FP8 fake-quant (`prepare_qat`) on its block linears, and a twin trained
the same way (same seed, same batches) without it.

    python -m fp8nemo.validate.train [--steps N] [--out DIR] [--only qat|twin] [--threads N]

The split is by file: `report.EVAL_FILES` (what `validate` evaluates on) and `CALIB_FILES` (its
static-scale calibration text) are held out, every other `.py` file outside site-packages
trains. Seed, split, steps, wall time and the final training and held-out losses are recorded
beside the weights (`training.json`), which are written as HF-style bf16 checkpoint folders. The
QAT model's block linears are saved as the FP8 values its forward used, codes x per-channel
power-of-two scales, which bf16 holds exactly: `fp8nemo quantize` finds them on the grid.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

import torch

from fp8nemo import fp8
from fp8nemo.model.config import ModelConfig
from fp8nemo.model.transformer import build_model
from fp8nemo.quant.files import CheckpointWriter
from fp8nemo.quant.qat import convert_qat, prepare_qat

from .report import BUILTIN_DIR, BUILTIN_FOLDERS, CALIB_FILES, EVAL_FILES, stdlib_root

# NeMo's quirks, shrunk: GQA 4:1, head_dim 64 != 256 / 8, theta 1e6, SwiGLU, RMSNorm, untied.
CONFIG = ModelConfig(
    vocab_size=256, hidden_size=256, intermediate_size=768, num_hidden_layers=3,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
    rope_theta=1e6, max_position_embeddings=1024, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=(2,),
)  # fmt: skip
SEED = 0
SEQ_LEN = 256
BATCH = 16
STEPS = 1500  # what trained the shipped models
LR, WARMUP, MIN_LR_FRACTION = 2e-3, 50, 0.1
WEIGHT_DECAY, CLIP = 0.1, 1.0
EVAL_TOKENS = 16384  # held-out tokens the recorded eval loss is measured on
KINDS = tuple(BUILTIN_FOLDERS.values())  # ("qat", "twin")


def training_files(root: str | None = None) -> list[str]:
    """Every standard-library .py file (site-packages and caches left out) but the held-out
    ones, as sorted paths relative to the library's folder."""
    root = root or stdlib_root()
    held_out = set(EVAL_FILES) | set(CALIB_FILES)
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "__pycache__")]
        for f in files:
            rel = os.path.relpath(os.path.join(folder, f), root)
            if f.endswith(".py") and rel not in held_out:
                out.append(rel)
    return sorted(out)


def read_corpus(paths, root: str | None = None) -> torch.Tensor:
    """The files' bytes joined by newlines (uint8: token ids are bytes)."""
    root = root or stdlib_root()
    chunks = []
    for p in paths:
        with open(os.path.join(root, p), "rb") as f:
            chunks.append(f.read())
    return torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """N(0, 0.02) linears and embeddings (the residual branches' outputs scaled by
    1/sqrt(2 * layers), as GPT-2 does), norms one."""
    gen = torch.Generator().manual_seed(seed)
    out_std = 0.02 / math.sqrt(2 * CONFIG.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = out_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.normal_(0.0, std, generator=gen)


def lr_at(step: int, steps: int) -> float:
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / max(1, steps - WARMUP)
    return LR * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def held_out_loss(model, ids: torch.Tensor) -> float:
    """Mean next-byte cross entropy (nats) over the held-out ids in SEQ_LEN windows."""
    ids = ids.long()[: min(EVAL_TOKENS, ids.numel()) // (SEQ_LEN + 1) * (SEQ_LEN + 1)]
    ids = ids.view(-1, SEQ_LEN + 1)
    return sum(loss_of(model, w[None]).item() for w in ids) / ids.shape[0]


def is_block_linear(name: str, module) -> bool:
    return name != "lm_head"


def train(kind: str, steps: int, corpus: torch.Tensor, held_out: torch.Tensor):
    """The trained fp32 model of `kind` ("qat" or "twin") and its record."""
    torch.manual_seed(SEED)
    model = build_model(CONFIG, "reference", dtype=torch.float32, max_seq_len=SEQ_LEN)
    init_weights(model, SEED)
    if kind == "qat":
        prepare_qat(model, weight_granularity="row", input_granularity="row",
                    weight_scales="pow2", filter_fn=is_block_linear)  # fmt: skip
    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    other = [p for n, p in model.named_parameters() if p.dim() != 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": other, "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95))  # fmt: skip
    batches = torch.Generator().manual_seed(SEED)  # the same batches for both kinds
    losses, start = [], time.perf_counter()
    for step in range(steps):
        at = torch.randint(0, corpus.numel() - SEQ_LEN - 1, (BATCH,), generator=batches)
        ids = torch.stack([corpus[a : a + SEQ_LEN + 1] for a in at.tolist()]).long()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps)
        loss = loss_of(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"{kind} step {step}/{steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - start:.0f} s)")  # fmt: skip
    wall = time.perf_counter() - start
    model.eval()
    record = {
        "kind": kind,
        "qat": None if kind == "twin" else {
            "weights": "per output channel, power-of-two scales (the FP8 values are saved)",
            "inputs": "per token, amax / 448", "layers": "every block linear (not lm_head)"},
        "steps": steps, "wall_time_s": round(wall, 1),
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),  # the last 50 steps' mean
        "held_out_loss": held_out_loss(model, held_out),
    }  # fmt: skip
    if kind == "qat":
        # The FP8 weights the forward used become the weights; the QAT forward is then the plain
        # forward for the weights, and the held-out loss is measured again without fake-quant
        # on the inputs (what the 16-bit reference computes).
        with torch.no_grad():
            for name, (w_fp8, scale) in convert_qat(model).items():
                model.get_submodule(name).weight.copy_(fp8.dequantize(w_fp8, scale, "channel"))
        record["held_out_loss_16bit_inputs"] = held_out_loss(model, held_out)
    return model, record


def save(model, record: dict, dst: str) -> None:
    """The bf16 checkpoint folder, with training.json (written with it, so that a rerun may
    replace the folder)."""
    with CheckpointWriter(dst, overwrite=True) as out:
        for name, t in model.state_dict().items():
            out.add(name, t.to(torch.bfloat16))
        with open(os.path.join(out.tmp, "training.json"), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        out.finish(CONFIG.to_hf())


def split_record(files: list[str], corpus: torch.Tensor) -> dict:
    digest = hashlib.sha256("\n".join(files).encode()).hexdigest()
    return {
        "root": "the standard library folder (os.path.dirname(os.__file__)), no site-packages",
        "eval_files": list(EVAL_FILES),
        "calib_files": list(CALIB_FILES),
        "train": f"every other .py file: {len(files)} files, {corpus.numel()} bytes",
        "train_files_sha256": digest,
    }  # fmt: skip (the sorted path list's hash)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fp8nemo.validate.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--out", default=BUILTIN_DIR, help="writes OUT/qat and OUT/twin")
    p.add_argument("--only", choices=KINDS)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1; got {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    files = training_files()
    corpus = read_corpus(files)
    root = stdlib_root()
    held_out = read_corpus([f for f in EVAL_FILES if os.path.isfile(os.path.join(root, f))])
    for kind in (args.only,) if args.only else KINDS:
        model, record = train(kind, args.steps, corpus, held_out)
        record.update(
            seed=SEED, seq_len=SEQ_LEN, batch=BATCH, lr=LR, warmup=WARMUP,
            min_lr_fraction=MIN_LR_FRACTION, weight_decay=WEIGHT_DECAY, clip=CLIP,
            optimizer="AdamW(0.9, 0.95)", dtype="fp32", split=split_record(files, corpus),
            threads=torch.get_num_threads(), python=platform.python_version(),
            torch=torch.__version__, machine=platform.machine(),
            command="python -m fp8nemo.validate.train " + " ".join(sys.argv[1:] if argv is None
                                                                    else argv),
        )  # fmt: skip
        dst = os.path.join(args.out, kind)
        save(model, record, dst)
        print(f"{kind}: wrote {dst} (held-out loss {record['held_out_loss']:.4f} nats/byte)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
