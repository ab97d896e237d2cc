"""`fp8nemo validate`: load a checkpoint (a preset, or the built-in QAT model, reported beside its
non-QAT twin) on the reference backend (fp32) and on the FP8 backend, run both over the
evaluation tokens window by window with forward hooks on every linear and block, and report
per-layer SQNR / relative error / cosine, logits KL, top-1 agreement, perplexity and
greedy-generation divergence (as a dict, a table, markdown, a PNG)."""

from __future__ import annotations

import math
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, replace

import torch

from fp8nemo.model import calibrate_checkpoint, load_model
from fp8nemo.model.config import PRESETS, ModelConfig, preset
from fp8nemo.model.generate import generate
from fp8nemo.model.loader import write_random_checkpoint
from fp8nemo.model.text import TextCodec
from fp8nemo.model.transformer import Block
from fp8nemo.quant.checkpoint import read_checkpoint
from fp8nemo.quant.convert import load_calibration, quantize_checkpoint
from fp8nemo.quant.files import CheckpointError
from fp8nemo.utils import progress as show_progress
from fp8nemo.utils import text_table

from .metrics import LogitStats, TensorStats, divergence, in_top_k

# The built-in models (`python -m fp8nemo.validate.train` made them; training.json says how):
# "builtin" is the quantisation-aware one, validated beside its twin trained without QAT;
# "builtin-twin" is the twin alone.
BUILTIN, BUILTIN_TWIN = "builtin", "builtin-twin"
BUILTIN_FOLDERS = {BUILTIN: "qat", BUILTIN_TWIN: "twin"}  # folders in BUILTIN_DIR
BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "builtin")
DEFAULT_MODEL = BUILTIN
# Text every machine has: Python standard library sources (a fixed list, read in this order).
# Evaluation and calibration files are disjoint.
EVAL_FILES = ("textwrap.py", "colorsys.py", "bisect.py", "fnmatch.py", "heapq.py", "shlex.py")
CALIB_FILES = ("glob.py", "keyword.py", "stat.py", "token.py", "numbers.py", "queue.py")
ID_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
GEN_PROMPTS = 3  # greedy continuations from the starts of this many windows
GEN_PROMPT_LEN = 16
TOP_K = 5  # vLLM's check: the divergent token is in the other model's top 5


@dataclass(frozen=True)
class Settings:
    model: str = DEFAULT_MODEL
    scheme: str = "channel"
    activations: str = "dynamic"
    kv_cache: str = "bf16"
    data: str | None = None
    calib: str | None = None
    max_tokens: int = 512
    window: int = 128
    reference: str | None = None
    new_tokens: int = 16
    interpret: bool = False  # the FP8 backend's CPU path: Triton interpreter vs torch emulation


# --- data ------------------------------------------------------------------------------------


def stdlib_root() -> str:
    """This Python's standard library folder, where the evaluation text comes from."""
    return os.path.dirname(os.__file__)


def stdlib_text(files=EVAL_FILES) -> str:
    """The named standard-library sources concatenated (those this Python lacks skipped)."""
    root = stdlib_root()
    parts = []
    for name in files:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
    return "\n".join(parts)


def encode_text(text: str, codec: TextCodec, vocab_size: int) -> torch.Tensor:
    """Token ids of `text`: the checkpoint's tokenizer.json, else its UTF-8 bytes % vocab."""
    if codec.tokenizer is not None:
        return torch.tensor(codec.tokenizer.encode(text).ids, dtype=torch.long)
    raw = text.encode("utf-8")
    if not raw:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() % vocab_size


def load_tokens(path: str | None, codec: TextCodec, vocab_size: int, what: str,
                default_files=EVAL_FILES) -> torch.Tensor:  # fmt: skip
    """The ids `[N]` of `path` (plain text, or ids in .safetensors/.pt), or the default text."""
    if path is None:
        ids = encode_text(stdlib_text(default_files), codec, vocab_size)
    elif path.endswith(ID_SUFFIXES):
        try:
            ids = load_calibration(path, vocab_size).reshape(-1)
        except CheckpointError as err:  # torch.load's messages run over several lines
            raise ValueError(f"{what}: {str(err).splitlines()[0]}") from None
    else:
        if not os.path.isfile(path):
            why = "is not a regular file" if os.path.exists(path) else "does not exist"
            raise ValueError(f"{what} {path} {why}")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"{what} {path} cannot be read as UTF-8 text: {err}") from None
        ids = encode_text(text, codec, vocab_size)
    if ids.numel() < 2:
        raise ValueError(f"{what} {path or '(default text)'} holds {ids.numel()} tokens; need 2+")
    return ids


def windows(ids: torch.Tensor, window: int, max_tokens: int) -> list[torch.Tensor]:
    """The first `max_tokens` ids cut into windows of `window` (a last, shorter one kept if it
    has 2+ tokens: one next-token prediction)."""
    ids = ids[:max_tokens]
    out = [ids[i : i + window] for i in range(0, ids.numel(), window)]
    return [w for w in out if w.numel() >= 2]


# --- models ----------------------------------------------------------------------------------


def builtin_path(name: str = BUILTIN) -> str:
    """The checkpoint folder of a built-in model ("builtin" or "builtin-twin")."""
    return os.path.join(BUILTIN_DIR, BUILTIN_FOLDERS[name])


def _source(settings: Settings, work: str) -> str:
    """A checkpoint folder for settings.model: the folder itself, a built-in model's, or a
    preset written out once (so both backends read the very same weights)."""
    if settings.model in BUILTIN_FOLDERS:
        path = builtin_path(settings.model)
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(
                f"the built-in model is missing from this install ({path}); reinstall fp8nemo, "
                "or train it with `python -m fp8nemo.validate.train`"
            )
        return path
    if os.path.isdir(settings.model):
        return settings.model
    if settings.model not in PRESETS:
        raise ValueError(
            f"MODEL {settings.model} is neither a checkpoint folder, a built-in model "
            f"({', '.join(BUILTIN_FOLDERS)}) nor a preset ({', '.join(sorted(PRESETS))})"
        )

    return write_random_checkpoint(preset(settings.model), os.path.join(work, "preset"), "cpu")


def _calibration_file(settings: Settings, src: str, codec, vocab_size: int, work: str) -> str:
    if settings.calib is not None and settings.calib.endswith(ID_SUFFIXES):
        return settings.calib
    ids = load_tokens(settings.calib, codec, vocab_size, "--calib", CALIB_FILES)
    ids = ids[: settings.max_tokens]
    rows = max(1, ids.numel() // settings.window)
    ids = ids[: rows * settings.window].reshape(rows, -1) if ids.numel() >= settings.window else (
        ids.reshape(1, -1))  # fmt: skip
    from safetensors.torch import save_file

    path = os.path.join(work, "calib.safetensors")
    save_file({"input_ids": ids.contiguous()}, path)
    return path


def load_pair(settings: Settings, src: str, codec: TextCodec, work: str, progress: bool = False):
    """(reference model, FP8 model, notes) of checkpoint `src` for `settings`, writing into
    `work` (a scratch folder) where static calibration needs a converted checkpoint."""
    fp8_ckpt = read_checkpoint(src).format != "unquantized"
    notes = []
    fp8_src, scheme = src, settings.scheme
    if fp8_ckpt:
        scheme = None  # an FP8 checkpoint runs on its own scheme
        against = settings.reference or f"{src} dequantized"
        notes.append(f"{src} is an FP8 checkpoint: its own scheme, against {against}")
    elif settings.activations == "static":
        vocab = ModelConfig.from_pretrained(src).vocab_size
        calib = _calibration_file(settings, src, codec, vocab, work)
        fp8_src = os.path.join(work, "fp8")
        quantize_checkpoint(src, fp8_src, scheme=settings.scheme, activations="static",
                            calib=calib, progress=progress, device="cpu",
                            calibrate=calibrate_checkpoint)  # fmt: skip
        scheme = None
    kv = "fp8" if settings.kv_cache == "fp8" else "bf16"
    ref = load_model(settings.reference or src, backend="reference", dtype=torch.float32,
                     progress=progress)  # fmt: skip
    fp8 = load_model(fp8_src, backend="fp8", dtype=torch.bfloat16, scheme=scheme,
                     kv_cache_dtype=kv, progress=progress)  # fmt: skip
    if ref.config.vocab_size != fp8.config.vocab_size:
        raise ValueError(
            f"--reference {settings.reference} has vocab {ref.config.vocab_size}; the model "
            f"{fp8.config.vocab_size}"
        )
    return ref.eval(), fp8.eval(), notes


# --- the run ---------------------------------------------------------------------------------


class Capture:
    """Forward hooks on every linear (its output) and every block (its output hidden state,
    x + residual, as HF's decoder layer returns it), keyed by HF module name."""

    def __init__(self, model: torch.nn.Module):
        self.outputs: dict[str, torch.Tensor] = {}
        self.order: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, Block):
                self.handles.append(module.register_forward_hook(self._hook(name, block=True)))
            elif hasattr(module, "in_features") and hasattr(module, "out_features"):
                self.handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str, block: bool = False):
        def hook(module, args, output):
            if block:
                x, residual = output
                output = x.float() + residual.float()
            if name not in self.outputs:
                self.order.append(name)
            # A copy: the FP8 attention applies RoPE to q and k in place after the hook.
            self.outputs[name] = output.detach().clone()

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _forward(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits [S, V] of one window, prefilled through a fresh KV cache (so an FP8 cache's
    quantization is part of what is measured)."""
    batch = ids.view(1, -1).to(model.device)
    cache = model.new_cache(1, ids.numel())
    return model(batch, cache=cache)[0]


@torch.inference_mode()
def compare(ref, fp8, wins: list[torch.Tensor], progress: bool = False) -> dict:
    """Per-layer stats and logits metrics of the two models over `wins`."""
    caps = Capture(ref), Capture(fp8)
    layers: dict[str, TensorStats] = {}
    logits = LogitStats()
    try:
        for ids in show_progress(wins, "validate", "window", enabled=progress):
            lr, lq = _forward(ref, ids), _forward(fp8, ids)
            for name in caps[0].order:
                if name in caps[1].outputs:
                    layers.setdefault(name, TensorStats()).add(
                        caps[0].outputs[name], caps[1].outputs[name]
                    )
            logits.add(lr.cpu(), lq.cpu(), ids)
    finally:
        for c in caps:
            c.close()
    kinds = {n: "block" if n.split(".")[-1].isdigit() else "linear" for n in layers}
    per_layer = [{"name": n, "kind": kinds[n], **s.as_dict()} for n, s in layers.items()]
    return {"per_layer": per_layer, **logits.summary()}


@torch.inference_mode()
def generation(ref, fp8, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    """Greedy continuations of each prompt by both models; at the first divergence, whether
    each model's token is in the other's top 5 there."""
    kw = dict(max_new_tokens=new_tokens, stop_tokens=[])
    r = generate(ref, prompts, **kw).tokens
    q = generate(fp8, prompts, **kw).tokens
    out = []
    for prompt, a, b in zip(prompts, r, q, strict=True):
        i = divergence(a, b)
        row = {"prompt_tokens": len(prompt), "reference": a, "fp8": b,
               "tokens_until_divergence": len(a) if i is None else i}  # fmt: skip
        if i is not None:
            prefix = torch.tensor(prompt + a[:i])
            lr, lq = _forward(ref, prefix)[-1], _forward(fp8, prefix)[-1]
            row["fp8_token_in_reference_top5"] = in_top_k(lr, b[i], TOP_K)
            row["reference_token_in_fp8_top5"] = in_top_k(lq, a[i], TOP_K)
        out.append(row)
    return out


def _versions() -> dict:
    import triton

    import fp8nemo

    return {"fp8nemo": getattr(fp8nemo, "__version__", "dev"), "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version()}  # fmt: skip


def _report(settings: Settings, src: str, codec: TextCodec, wins, work: str, progress: bool):
    """Per-layer, logits and generation metrics of checkpoint `src` over `wins`."""
    os.makedirs(work, exist_ok=True)
    ref, fp8, notes = load_pair(settings, src, codec, work, progress)
    report = compare(ref, fp8, wins, progress)
    prompts = [w[:GEN_PROMPT_LEN].tolist() for w in wins[:GEN_PROMPTS]]
    report["generation"] = generation(ref, fp8, prompts, settings.new_tokens)
    report["notes"] = notes
    report["fp8_device"] = fp8.device.type
    return report


def run(settings: Settings, progress: bool = False) -> dict:
    """The whole report of `settings` as a JSON-ready dict; for the built-in model, the same
    report of its non-QAT twin under "twin"."""
    with tempfile.TemporaryDirectory(prefix="fp8nemo-validate-") as work:
        if settings.reference is not None and settings.model in BUILTIN_FOLDERS:
            raise ValueError("--reference applies to an FP8 checkpoint MODEL, not the built-in one")
        if settings.reference is not None and not os.path.isdir(settings.reference):
            raise ValueError(f"--reference {settings.reference} is not a checkpoint folder")
        src = _source(settings, work)
        codec = TextCodec.for_model(src)
        config = ModelConfig.from_pretrained(src)
        # The data is read before any model is: a bad file fails in a second.
        ids = load_tokens(settings.data, codec, config.vocab_size, "--data")
        wins = windows(ids, min(settings.window, config.max_position_embeddings),
                       settings.max_tokens)  # fmt: skip
        report = _report(settings, src, codec, wins, os.path.join(work, "model"), progress)
        if settings.model == BUILTIN:
            twin = replace(settings, model=BUILTIN_TWIN)
            report["twin"] = _report(twin, _source(twin, work), codec, wins,
                                     os.path.join(work, "twin"), progress)  # fmt: skip
            report["twin"].pop("fp8_device")
            report["twin"]["model"] = BUILTIN_TWIN
        fmt = read_checkpoint(src).format
    on = report.pop("fp8_device")
    fp8_mode = "cuda" if on == "cuda" else (
        "triton-interpreter" if settings.interpret else "torch-emulation")  # fmt: skip
    # An FP8 checkpoint runs on its own scales, whatever --scheme / --activations say.
    report["settings"] = {**asdict(settings), "checkpoint_format": fmt, "fp8_path": fp8_mode,
                          "reference_dtype": "fp32", "fp8_dtype": "bf16"}  # fmt: skip
    report["versions"] = _versions()
    return report


# --- thresholds ------------------------------------------------------------------------------

# Metrics a gate can name; "worst_sqnr_db" is the lowest per-layer SQNR.
GATE_METRICS = ("kl_mean", "kl_median", "kl_p99", "kl_max", "top1_agreement", "top_p_drop_mean",
                "top_p_drop_p99", "ppl_reference", "ppl_fp8", "ppl_delta_pct",
                "worst_sqnr_db", "min_tokens_until_divergence")  # fmt: skip


def metric(report: dict, name: str) -> float:
    if name == "worst_sqnr_db":
        return min(r["sqnr_db"] for r in report["per_layer"])
    if name == "min_tokens_until_divergence":
        return min(g["tokens_until_divergence"] for g in report["generation"])
    return report[name]


def parse_gate(text: str) -> tuple[str, float]:
    """ "METRIC=VALUE" -> (metric, value); ValueError naming what is allowed."""
    name, sep, value = text.partition("=")
    if not sep or name not in GATE_METRICS:
        raise ValueError(f"must be METRIC=VALUE with METRIC one of {', '.join(GATE_METRICS)}; "
                         f"got {text!r}")  # fmt: skip
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"{name}: the value must be a number; got {value!r}") from None
    if math.isnan(v):
        raise ValueError(f"{name}: the value must be a number; got {value!r}")
    return name, v


def missed(report: dict, under=(), over=()) -> list[str]:
    """One line per threshold missed: `under` (metric, v) fails when metric < v, `over` when
    metric > v."""
    out = []
    for name, v in under:
        got = metric(report, name)
        if not got >= v:
            out.append(f"{name} = {got:.6g} is under {v:g}")
    for name, v in over:
        got = metric(report, name)
        if not got <= v:
            out.append(f"{name} = {got:.6g} is over {v:g}")
    return out


# --- output ----------------------------------------------------------------------------------


def _db(v: float) -> str:
    return "exact" if v == math.inf else f"{v:.1f}"


def summary_rows(report: dict) -> list[tuple[str, str]]:
    r = report
    ci = lambda k: f"[{r[k][0]:.4g}, {r[k][1]:.4g}]"  # noqa: E731
    return [
        ("tokens", f"{r['tokens']} in {r['ppl_windows']} windows"),
        ("KL(ref || fp8) mean", f"{r['kl_mean']:.3e}"),
        ("KL median / p99 / max", f"{r['kl_median']:.3e} / {r['kl_p99']:.3e} / {r['kl_max']:.3e}"),
        ("top-1 agreement", f"{r['top1_agreement']:.2f} %"),
        ("top-token p drop mean / p99", f"{r['top_p_drop_mean']:.3e} / {r['top_p_drop_p99']:.3e}"),
        ("perplexity reference", f"{r['ppl_reference']:.4f} (95% CI {ci('ppl_reference_ci')})"),
        ("perplexity fp8", f"{r['ppl_fp8']:.4f} (95% CI {ci('ppl_fp8_ci')})"),
        ("perplexity change", f"{r['ppl_delta_pct']:+.3f} %"),
        ("worst layer SQNR", f"{_db(metric(r, 'worst_sqnr_db'))} dB"),
    ]


def _gen_rows(report: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    for i, g in enumerate(report["generation"]):
        n = len(g["reference"])
        same = g["tokens_until_divergence"]
        a = "-" if same == n else ("yes" if g["fp8_token_in_reference_top5"] else "no")
        b = "-" if same == n else ("yes" if g["reference_token_in_fp8_top5"] else "no")
        rows.append((str(i), f"{same}/{n}", a, b))
    return rows


def _title(report: dict) -> str:
    s = report["settings"]
    fmt = s.get("checkpoint_format", "unquantized")
    scales = (f"{s['scheme']} weights, {s['activations']} activations" if fmt == "unquantized"
              else f"the {fmt} checkpoint's own scales")  # fmt: skip
    return f"{scales}, {s['kv_cache']} KV cache; FP8 path {s['fp8_path']}"


def _columns(report: dict) -> list[tuple[str, dict]]:
    """(heading, report) of each model reported: the model, and the built-in one's twin."""
    if "twin" not in report:
        return [("value", report)]
    return [("QAT model", report), ("non-QAT twin", report["twin"])]


def _summary(report: dict) -> list[list[str]]:
    """Rows [metric, value per model]."""
    cols = [summary_rows(r) for _, r in _columns(report)]
    return [[k, *(c[i][1] for c in cols)] for i, (k, _) in enumerate(cols[0])]


def _layers(report: dict) -> list[list[str]]:
    """Rows [layer, SQNR, rel err, cosine of the model, then the twin's SQNR]."""
    twin = {r["name"]: r for r in report["twin"]["per_layer"]} if "twin" in report else None
    rows = []
    for r in report["per_layer"]:
        row = [r["name"], _db(r["sqnr_db"]), f"{r['rel_err']:.3e}", f"{r['cosine']:.6f}"]
        if twin is not None:
            row.append(_db(twin[r["name"]]["sqnr_db"]) if r["name"] in twin else "-")
        rows.append(row)
    return rows


def _layer_heads(report: dict) -> list[str]:
    heads = ["layer", "SQNR dB", "rel err", "cosine"]
    return [*heads, "twin SQNR dB"] if "twin" in report else heads


def _md_table(heads: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; a `|` inside a cell (`KL(ref || fp8)`) is escaped, not a column."""

    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(heads), "|---|" + "---:|" * (len(heads) - 1), *(line(r) for r in rows)]


def _generation(report: dict) -> tuple[list[str], list[list[str]]]:
    heads = ["greedy", "same tokens", "fp8 tok in ref top-5", "ref tok in fp8 top-5"]
    cols = _columns(report)
    if len(cols) > 1:
        each = ("same", "fp8 in ref top-5", "ref in fp8 top-5")
        heads = ["greedy", *(f"{who} {c}" for who in ("QAT", "twin") for c in each)]
    per = [_gen_rows(r) for _, r in cols]
    rows = [[str(i), *(x for p in per for x in p[i][1:])] for i in range(len(per[0]))]
    return heads, rows


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [f"fp8nemo validate {s['model']}: {_title(report)}"]
    if "twin" in report:
        lines.append("the built-in quantisation-aware model, beside its twin trained without QAT")
    lines += report["notes"]
    lines += ["", *text_table([_layer_heads(report), *_layers(report)], "label"), ""]
    lines += text_table([["", *(h for h, _ in _columns(report))], *_summary(report)], "label")
    heads, rows = _generation(report)
    lines += ["", *text_table([heads, *rows], "label")]
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    s = report["settings"]
    out = [f"# fp8nemo validate `{s['model']}`", "",
           f"{_title(report)}; versions "
           + ", ".join(f"{k} {v}" for k, v in report["versions"].items()), ""]  # fmt: skip
    # a blank line ends the quote: a table right after it would be quoted too
    out += [*(f"> {n}" for n in report["notes"]), ""] if report["notes"] else []
    out += _md_table(["metric", *(h for h, _ in _columns(report))], _summary(report))
    out += ["", *_md_table(_layer_heads(report), _layers(report))]
    out += ["", *_md_table(*_generation(report))]
    return "\n".join(out) + "\n"


def plot(report: dict, path: str) -> None:
    """Per-layer SQNR (dB) as a PNG: linears and block outputs in execution order; the built-in
    model's twin as hatched bars beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _columns(report)
    names = [r["name"] for r in report["per_layer"]]
    kinds = {r["name"]: r["kind"] for r in report["per_layer"]}
    values = [{r["name"]: r["sqnr_db"] for r in rep["per_layer"]} for _, rep in cols]
    finite = [v for vals in values for v in vals.values() if math.isfinite(v)]
    cap = (max(finite) + 10) if finite else 100.0
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names) * len(cols)), 4))
    for j, ((label, _), vals) in enumerate(zip(cols, values, strict=True)):
        xs = [i + (j - (len(cols) - 1) / 2) * width for i in range(len(names))]
        ys = [min(vals.get(n, math.nan), cap) for n in names]
        colors = ["tab:orange" if kinds[n] == "block" else "tab:blue" for n in names]
        ax.bar(xs, ys, width, color=colors, alpha=1.0 if j == 0 else 0.45,
               hatch=None if j == 0 else "//", label=label if len(cols) > 1 else None)  # fmt: skip
    ax.set_xticks(range(len(names)), [n.removeprefix("model.") for n in names],
                  rotation=90, fontsize=7)  # fmt: skip
    ax.set_ylabel("SQNR (dB)")
    if len(cols) > 1:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{report['settings']['model']}: {_title(report)} (orange: block outputs)",
                 fontsize=8)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
