"""Accuracy metrics of an FP8 model against its reference, in float64: per-tensor SQNR /
relative error / cosine (accumulated over windows), logits metrics as llama.cpp's
`--kl-divergence` reports them, perplexity with a confidence interval, and greedy-generation
divergence with vLLM's top-5 check."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Z95 = 1.96  # two-sided 95% normal quantile


@dataclass
class TensorStats:
    """Running sums over every element seen of a reference tensor `a` and its FP8 twin `b`."""

    signal: float = 0.0  # sum a^2
    noise: float = 0.0  # sum (a - b)^2
    other: float = 0.0  # sum b^2
    dot: float = 0.0  # sum a * b
    count: int = 0

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        a, b = ref.detach().double().reshape(-1), out.detach().double().reshape(-1)
        if a.shape != b.shape:
            raise ValueError(f"reference has {a.numel()} elements, the FP8 output {b.numel()}")
        self.signal += float(a @ a)
        self.noise += float((a - b) @ (a - b))
        self.other += float(b @ b)
        self.dot += float(a @ b)
        self.count += a.numel()

    @property
    def sqnr_db(self) -> float:
        """10 log10(|a|^2 / |a - b|^2): inf for identical tensors."""
        if self.noise == 0.0:
            return math.inf
        if self.signal == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.signal / self.noise)

    @property
    def rel_err(self) -> float:
        """|a - b|_F / |a|_F."""
        if self.signal == 0.0:
            return 0.0 if self.noise == 0.0 else math.inf
        return math.sqrt(self.noise / self.signal)

    @property
    def cosine(self) -> float:
        denom = math.sqrt(self.signal * self.other)
        if denom == 0.0:
            return 1.0 if self.noise == 0.0 else 0.0
        return self.dot / denom

    def as_dict(self) -> dict:
        return {"sqnr_db": self.sqnr_db, "rel_err": self.rel_err, "cosine": self.cosine}


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    s = TensorStats()
    s.add(ref, out)
    return s.sqnr_db


def _quantile(x: torch.Tensor, q: float) -> float:
    # torch.quantile refuses more than 2^24 elements; sort instead (linear interpolation).
    if x.numel() == 0:
        return math.nan
    xs, _ = torch.sort(x.reshape(-1))
    pos = q * (xs.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


@dataclass
class LogitStats:
    """Per-token logits metrics, collected window by window: KL(reference || FP8), whether the
    top tokens agree, the reference top token's probability drop, and each model's NLL of the
    next token (per window, for the perplexity's confidence interval)."""

    kl: list[torch.Tensor] = field(default_factory=list)
    same_top: list[torch.Tensor] = field(default_factory=list)
    dp: list[torch.Tensor] = field(default_factory=list)
    nll_ref: list[torch.Tensor] = field(default_factory=list)
    nll_fp8: list[torch.Tensor] = field(default_factory=list)

    def add(self, ref_logits: torch.Tensor, fp8_logits: torch.Tensor, ids: torch.Tensor) -> None:
        """One window: logits [S, V] of both models at the positions of `ids` [S]."""
        lr = torch.log_softmax(ref_logits.double(), dim=-1)
        lq = torch.log_softmax(fp8_logits.double(), dim=-1)
        pr = lr.exp()
        self.kl.append((pr * (lr - lq)).sum(-1).clamp_min(0.0))
        top = lr.argmax(-1)
        self.same_top.append(top == lq.argmax(-1))
        self.dp.append(pr.gather(-1, top[:, None])[:, 0] - lq.exp().gather(-1, top[:, None])[:, 0])
        nxt = ids[1:, None].long()
        self.nll_ref.append(-lr[:-1].gather(-1, nxt)[:, 0])
        self.nll_fp8.append(-lq[:-1].gather(-1, nxt)[:, 0])

    def summary(self) -> dict:
        kl, dp = torch.cat(self.kl), torch.cat(self.dp)
        ref, fp8 = perplexity(self.nll_ref), perplexity(self.nll_fp8)
        return {
            "tokens": kl.numel(),
            "kl_mean": float(kl.mean()),
            "kl_median": _quantile(kl, 0.5),
            "kl_p99": _quantile(kl, 0.99),
            "kl_max": float(kl.max()),
            "top1_agreement": 100.0 * float(torch.cat(self.same_top).double().mean()),
            "top_p_drop_mean": float(dp.mean()),
            "top_p_drop_p99": _quantile(dp, 0.99),
            "ppl_reference": ref["ppl"],
            "ppl_reference_ci": ref["ci"],
            "ppl_fp8": fp8["ppl"],
            "ppl_fp8_ci": fp8["ci"],
            "ppl_delta_pct": 100.0 * (fp8["ppl"] / ref["ppl"] - 1.0),
            "ppl_windows": ref["windows"],
        }


def perplexity(nll_per_window: list[torch.Tensor]) -> dict:
    """exp(mean NLL over all tokens), with a 95% interval exp(mean ± 1.96 SE) where SE is the
    standard error of the per-window mean NLLs (tokens within a window are not independent);
    with one window the interval falls back to the tokens' standard error."""
    nll = torch.cat(nll_per_window).double()
    mean = float(nll.mean()) if nll.numel() else math.nan
    means = torch.stack([w.double().mean() for w in nll_per_window if w.numel()])
    samples = means if means.numel() >= 2 else nll
    se = (
        float(samples.std(unbiased=True) / math.sqrt(samples.numel()))
        if samples.numel() >= 2
        else math.nan
    )
    return {
        "ppl": math.exp(mean),
        "ci": [math.exp(mean - Z95 * se), math.exp(mean + Z95 * se)],
        "windows": len(nll_per_window),
    }


def divergence(ref_tokens: list[int], fp8_tokens: list[int]) -> int | None:
    """Index of the first token where two greedy continuations differ (None: they never do)."""
    for i, (a, b) in enumerate(zip(ref_tokens, fp8_tokens, strict=False)):
        if a != b:
            return i
    if len(ref_tokens) != len(fp8_tokens):
        return min(len(ref_tokens), len(fp8_tokens))
    return None


def in_top_k(logits: torch.Tensor, token: int, k: int = 5) -> bool:
    return token in torch.topk(logits.double(), min(k, logits.shape[-1])).indices.tolist()
