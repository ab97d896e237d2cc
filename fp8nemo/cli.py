"""The `fp8nemo` command: `validate` reports FP8 accuracy against the reference, `bench` times
kernels, `inspect` reports their Hopper/Ada codegen, `quantize` turns a 16-bit checkpoint into an
FP8 one, `generate` runs a model, `tune` records the fastest kernel configs for a model on this
GPU."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

from fp8nemo.utils import text_table

# fp8nemo.bench's suites and GEMM layers, spelled here so --help needs no torch import
SUITES = ("gemm", "attention", "decode", "rope", "e2e", "quantize")
NEMO_LAYERS = ("qkv", "o", "gate_up", "down")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return value


def _float_arg(kind: str, allowed: str, ok):
    """An argparse type: a float for which `ok(value)` holds, else "must be <kind|allowed>"."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {kind}; got {text!r}") from None
        if not ok(value):  # NaN fails every comparison: refused too
            raise argparse.ArgumentTypeError(f"must be {allowed}; got {text}")
        return value

    return parse


_seconds = _float_arg(
    "a number of seconds", "a finite number of seconds >= 0", lambda v: 0 <= v < math.inf
)
_temperature = _float_arg("a number >= 0", "a finite number >= 0", lambda v: 0 <= v < math.inf)
_unit_interval = _float_arg("a number in (0, 1]", "a number in (0, 1]", lambda v: 0 < v <= 1)


def _error(message: str) -> int:
    """One line on stderr, exit status 2: what the CLI does for any input it cannot take."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def _gate(text: str):
    from fp8nemo.validate.report import parse_gate

    try:
        return parse_gate(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _validate(args) -> int:
    if args.interpret:
        # The real kernels through the interpreter: chosen before triton is first imported.
        os.environ["TRITON_INTERPRET"] = "1"
    elif not args.verbose:
        # The torch emulation is chosen here, and the report names it: no warning per op.
        logging.getLogger("fp8nemo").addFilter(lambda r: "torch emulation" not in r.msg)
    from fp8nemo.validate import report as V

    model = args.model or V.DEFAULT_MODEL
    if args.activations == "static" and args.scheme == "block":
        return _error("--scheme block takes dynamic 1x128 activations; static is per tensor")
    if args.calib is not None and args.activations != "static":
        return _error("--calib applies to --activations static only")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot)):
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if parent is not None and not os.path.isdir(parent):
            return _error(f"{flag} {path}: the folder {parent} does not exist")
    settings = V.Settings(
        model=model, scheme=args.scheme, activations=args.activations, kv_cache=args.kv_cache,
        data=args.data, calib=args.calib, max_tokens=args.max_tokens, window=args.window,
        reference=args.reference, new_tokens=args.new_tokens, interpret=args.interpret,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        report = V.run(settings, progress=sys.stderr.isatty())
    except (ValueError, TypeError) as err:  # CheckpointError included
        return _error(str(err))
    except OSError as err:
        return _error(f"{err.filename or model}: {err.strerror or err}")
    report["wall_s"] = time.perf_counter() - start
    print(V.format_table(report))
    written = []
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        written.append(args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(V.format_markdown(report))
        written.append(args.markdown)
    if args.plot:
        V.plot(report, args.plot)
        written.append(args.plot)
    print(
        f"\nvalidated in {report['wall_s']:.0f}s" + (f" -> {', '.join(written)}" if written else "")
    )
    failures = V.missed(report, args.fail_under or (), args.fail_over or ())
    for line in failures:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if failures else 0


def _bench(args) -> int:
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        return _error(f"--out {args.out} exists and is not a folder")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as err:
        return _error(f"--out {args.out}: cannot create it: {err.strerror}")
    import signal

    import torch

    # `timeout` (gpu_check.sh's stage limit) sends SIGTERM: unwind as Ctrl-C does, so the
    # .partial CSV stays and the e2e suite's temporary checkpoint (24 GB for NeMo-12B) goes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    if not torch.cuda.is_available():
        # Without a GPU the kernels run through the Triton interpreter, which must be chosen
        # before triton is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from fp8nemo import bench

    requested = args.suite or ["gemm"]
    suites = list(bench.SUITES) if "all" in requested else list(dict.fromkeys(requested))
    if args.model is not None:
        if not set(suites) & {"e2e", "quantize"}:
            return _error(f"MODEL ({args.model}) is for --suite e2e or quantize only")
        try:
            bench.e2e.model_config(args.model)
        except ValueError as err:
            return _error(str(err))
    failed = 0
    for suite in suites:
        start = time.perf_counter()
        model = args.model if suite in ("e2e", "quantize") else None
        with bench.CsvSink(args.out, suite) as sink:
            env, rows = bench.run_suite(suite, shapes=args.shape, ms=args.m, on_rows=sink.add,
                                        budget_s=args.budget, model=model)  # fmt: skip
        stem = sink.path.removesuffix(".csv")
        written = [sink.path]
        if args.markdown:
            with open(stem + ".md", "w") as f:
                f.write(bench.format_markdown(env, rows))
            written.append(stem + ".md")
        if args.plot:
            bench.plot(rows, stem + ".png")
            written.append(stem + ".png")
        print(bench.format_table(env, rows))
        print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f}s -> {', '.join(written)}\n")
        # Every fp8nemo row carries its check against an fp32 reference.
        bad = bench.failed_checks(suite, rows)
        if bad:
            print(
                f"error: {len(bad)} fp8nemo rows of {suite} failed their correctness check",
                file=sys.stderr,
            )
            failed = 1
    return failed


def _inspect(args) -> int:
    from fp8nemo import codegen

    done = []

    def progress(row):
        done.append(row)
        if not args.json:
            print(
                f"\rcompiled {len(done)} kernels for {args.arch}",
                end="",
                file=sys.stderr,
                flush=True,
            )

    start = time.perf_counter()
    try:
        rows = codegen.inspect_kernels(args.arch, ops=args.op, jobs=args.jobs, progress=progress)
    except codegen.InspectError as err:
        return _error(str(err))
    if args.json:
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        print(f" in {time.perf_counter() - start:.0f}s", file=sys.stderr)
        print(codegen.format_table(rows))
    bad = [r for r in rows if r["problems"]]
    if bad:
        print(f"{len(bad)} of {len(rows)} kernel configs have problems", file=sys.stderr)
        return 1
    return 0


def _quantize(args) -> int:
    from fp8nemo.model import calibrate_checkpoint
    from fp8nemo.quant.convert import DEFAULT_KEEP, quantize_checkpoint

    start = time.perf_counter()
    try:
        reports = quantize_checkpoint(
            args.src, args.dst, scheme=args.scheme, activations=args.activations, calib=args.calib,
            format=args.format, method=args.method, observer=args.observer,
            keep=(*DEFAULT_KEEP, *(args.keep or ())), overwrite=args.overwrite,
            device=args.device, calibrate=calibrate_checkpoint,
        )  # fmt: skip
    except ValueError as err:  # CheckpointError, or calibration data the model can't take
        return _error(str(err))
    except OSError as err:  # what the checkpoint code did not name itself
        return _error(f"{err.filename or args.dst}: {err.strerror or err}")
    width = max(len(r.name) for r in reports)
    print(f"{'layer'.ljust(width)}  {'shape':>13}  scheme   QAT grid  SQNR dB")
    for r in reports:
        grid = "yes" if r.on_grid else (f"{r.grid_fraction:.0%}" if r.grid_fraction else "no")
        sqnr = "exact" if r.sqnr_db == float("inf") else f"{r.sqnr_db:.1f}"
        shape = "x".join(map(str, r.shape))
        print(f"{r.name.ljust(width)}  {shape:>13}  {r.granularity:<7}  {grid:>8}  {sqnr:>7}")
    finite = [r.sqnr_db for r in reports if r.sqnr_db != float("inf")]
    on_grid = sum(r.on_grid for r in reports)
    print(
        f"\n{len(reports)} layers quantized ({on_grid} on a QAT grid)"
        + (f", SQNR min {min(finite):.1f} dB" if finite else "")
        + f" in {time.perf_counter() - start:.0f}s -> {args.dst} ({args.format})"
    )
    return 0


def _generate(args) -> int:
    import torch

    from fp8nemo.model import load_model
    from fp8nemo.model.generate import Sampling, generate
    from fp8nemo.model.text import TextCodec

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    try:
        codec = TextCodec.for_model(args.model)
        prompts = [codec.encode(p, chat=args.chat) for p in args.prompt]
        model = load_model(args.model, backend=args.backend, dtype=args.dtype, device=device,
                           scheme=args.scheme, kv_cache_dtype=args.kv_cache,
                           progress=sys.stderr.isatty())  # fmt: skip
    except (ValueError, TypeError) as err:
        return _error(str(err))
    except OSError as err:
        return _error(f"{err.filename or args.model}: {err.strerror or err}")
    load_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    streamed = []

    def stream(i, token):  # one prompt: print the text as it grows
        streamed.append(token)
        print(codec.increment(streamed), end="", flush=True)

    try:
        result = generate(
            model, prompts, max_new_tokens=args.max_new_tokens,
            sampling=Sampling(args.temperature, args.top_k or 0, args.top_p), seed=args.seed,
            stream=stream if len(prompts) == 1 else None, cuda_graph=args.cuda_graph,
            compile=args.compile,
        )  # fmt: skip
    except ValueError as err:
        return _error(str(err))
    if len(prompts) == 1:
        print()
    else:
        for i, tokens in enumerate(result.tokens):
            print(f"[{i}] {codec.decode(tokens)}")
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
    else:
        import resource

        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB host"
    print(
        f"load {load_s:.1f}s | prefill {result.prompt_tokens} tokens "
        f"{result.prefill_tokens_per_s:.1f} tok/s | decode {result.decode_steps} steps "
        f"{result.decode_tokens_per_s:.1f} tok/s | peak {peak} | {args.backend} on {device}",
        file=sys.stderr,
    )
    return 0


def _tune(args) -> int:
    import torch

    from fp8nemo.model.config import PRESETS

    if not os.path.isdir(args.model) and args.model not in PRESETS:
        return _error(f"MODEL {args.model} is neither a checkpoint folder nor a preset "
                      f"({', '.join(sorted(PRESETS))})")  # fmt: skip
    from fp8nemo import tune

    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        return _error(f"--device {args.device}: {err}")
    problem = tune.untunable(device)
    if problem:
        return _error(problem)
    batch_sizes = list(dict.fromkeys(args.batch_size or tune.BATCH_SIZES))
    prompt_lens = list(dict.fromkeys(args.prompt_len or tune.PROMPT_LENS))
    start = time.perf_counter()
    try:
        result = tune.tune(args.model, batch_sizes=batch_sizes, prompt_lens=prompt_lens,
                           device=device, dtype=args.dtype, scheme=args.scheme,
                           kv_cache_dtype=args.kv_cache, progress=sys.stderr.isatty())  # fmt: skip
    except (ValueError, TypeError) as err:
        return _error(str(err))
    except OSError as err:
        return _error(f"{err.filename or args.model}: {err.strerror or err}")
    rows = [("op", "key", "config", "source")]
    rows += [(d.op, d.key, d.config, d.source) for d in result.decisions]
    print("\n".join(text_table(rows)))
    counts = {s: sum(d.source == s for d in result.decisions) for s in ("tuned", "cached")}
    print(
        f"\n{counts['tuned']} tuned now, {counts['cached']} already cached, "
        f"{len(result.decisions) - sum(counts.values())} with one config, at batch sizes "
        f"{batch_sizes} x prompt lengths {prompt_lens} in {time.perf_counter() - start:.0f}s "
        f"-> {result.path}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fp8nemo", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log tuning and setup")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="FP8 accuracy against the reference: per layer, logits, "
                       "perplexity, generation")  # fmt: skip
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help="HF checkpoint folder (16-bit: quantized with --scheme; FP8: as it is), "
                   "a preset, or a built-in model: `builtin` (default; quantisation-aware, "
                   "reported beside its non-QAT twin) or `builtin-twin`")  # fmt: skip
    p.add_argument("--scheme", default="channel", choices=["tensor", "channel", "block"],
                   help="weight scales of a 16-bit MODEL")  # fmt: skip
    p.add_argument("--activations", default="dynamic", choices=["dynamic", "static"],
                   help="static: scales calibrated on --calib, as `fp8nemo quantize`")  # fmt: skip
    p.add_argument("--kv-cache", default="bf16", choices=["fp8", "bf16"])
    p.add_argument("--data", help="evaluation data: plain text (tokenized with the checkpoint's "
                   "tokenizer.json, else UTF-8 bytes %% vocab) or input_ids in .safetensors/.pt "
                   "(default: Python standard-library sources)")  # fmt: skip
    p.add_argument("--calib", help="static calibration data, as --data (default: other stdlib "
                   "sources than the evaluation's)")  # fmt: skip
    p.add_argument("--max-tokens", type=_positive_int, default=512, help="evaluation tokens")
    p.add_argument("--window", type=_positive_int, default=128, help="tokens per forward")
    p.add_argument("--new-tokens", type=_positive_int, default=16, help="greedy tokens per prompt")
    p.add_argument("--reference", help="FP8 MODEL: its 16-bit source as the reference")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--markdown", help="write the report as markdown here")
    p.add_argument("--plot", help="write per-layer SQNR as a PNG here")
    p.add_argument("--fail-under", type=_gate, action="append", metavar="METRIC=VALUE",
                   help="exit 1 when METRIC is below VALUE, for higher-is-better metrics "
                   "(top1_agreement, worst_sqnr_db, ...); repeatable")  # fmt: skip
    p.add_argument("--fail-over", type=_gate, action="append", metavar="METRIC=VALUE",
                   help="exit 1 when METRIC is above VALUE, for lower-is-better metrics "
                   "(kl_mean, kl_p99, ppl_delta_pct, ...); repeatable")  # fmt: skip
    p.add_argument("--interpret", action="store_true",
                   help="CPU: run the FP8 backend's Triton kernels through the interpreter "
                   "(slower) instead of their torch emulation")  # fmt: skip
    p.set_defaults(run=_validate)

    p = sub.add_parser("bench", help="time kernels at NeMo-12B shapes beside torch baselines")
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="e2e: a preset or HF checkpoint folder (default: tiny on CPU, nemo-12b on a GPU)",
    )
    p.add_argument(
        "--suite",
        action="append",
        choices=[*SUITES, "all"],
        help="gemm, attention, decode, rope, e2e (the whole model beside HF transformers) or "
        "all (repeatable; default gemm)",
    )
    p.add_argument(
        "--budget", type=_seconds, help="seconds per suite; later cases are listed, not run"
    )
    p.add_argument("--out", default=".", help="directory for the CSV (and .md / .png)")
    p.add_argument(
        "--shape",
        action="append",
        choices=sorted(NEMO_LAYERS),
        help="gemm: only this layer (repeatable)",
    )
    p.add_argument(
        "--m",
        type=_positive_int,
        action="append",
        help="only this size (repeatable): gemm M, attention S, decode L, rope T, e2e prompt",
    )
    p.add_argument("--markdown", action="store_true", help="also write a markdown table")
    p.add_argument("--plot", action="store_true", help="also plot TFLOP/s (needs matplotlib)")
    p.set_defaults(run=_bench)

    p = sub.add_parser("quantize", help="quantize a 16-bit HF checkpoint to FP8")
    p.add_argument("src", help="16-bit HF checkpoint folder (config.json + safetensors)")
    p.add_argument("dst", help="output folder (written atomically)")
    p.add_argument(
        "--scheme",
        default="channel",
        choices=["tensor", "channel", "block"],
        help="weight scales: per tensor, per output channel or per 128x128 block",
    )
    p.add_argument("--activations", default="dynamic", choices=["dynamic", "static"])
    p.add_argument(
        "--calib", help="static activations: input_ids [sequences, length] (.safetensors / .pt)"
    )
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "fp8"])
    p.add_argument(
        "--method", default="absmax", choices=["absmax", "mse"], help="weight scales off a grid"
    )
    p.add_argument("--observer", default="absmax", choices=["absmax", "percentile", "mse"])
    p.add_argument(
        "--keep",
        action="append",
        help="regex of more linear layers to keep 16-bit (lm_head and embeddings always are)",
    )
    p.add_argument("--device", help="static calibration runs here (default: cuda if present)")
    p.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at dst")
    p.set_defaults(run=_quantize)

    p = sub.add_parser("generate", help="generate text with a checkpoint or preset")
    p.add_argument("model", help="HF checkpoint folder (16-bit or FP8) or a preset name")
    p.add_argument("--prompt", action="append", required=True,
                   help="text (without a tokenizer.json: token ids); repeatable")  # fmt: skip
    p.add_argument("--backend", default="fp8", choices=["fp8", "reference"])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--scheme", choices=["tensor", "channel", "block"],
                   help="weight scales when a 16-bit checkpoint is quantized on load")  # fmt: skip
    p.add_argument("--kv-cache", choices=["bf16", "fp16", "fp32", "fp8"], help="default: --dtype")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--temperature", type=_temperature, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=_positive_int, default=None)
    p.add_argument("--top-p", type=_unit_interval, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="apply the checkpoint's chat_template")
    p.add_argument("--device", help="default: cuda if present")
    p.add_argument("--cuda-graph", action="store_true", help="replay decode as a CUDA graph")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.set_defaults(run=_generate)

    p = sub.add_parser("inspect", help="compile every kernel config ahead of time; report codegen")
    p.add_argument("--arch", default="sm_90", choices=["sm_90", "sm_89"])
    p.add_argument("--op", action="append", help="only this op (repeatable)")
    p.add_argument("--jobs", type=_positive_int, help="parallel compiles (default: CPU count)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("tune", help="time every kernel config a model runs; keep the fastest")
    p.add_argument("model", help="HF checkpoint folder or a preset name (random weights)")
    p.add_argument("--batch-size", type=_positive_int, action="append",
                   help="sequences per step (repeatable; default 1 and 16)")  # fmt: skip
    p.add_argument("--prompt-len", type=_positive_int, action="append",
                   help="prompt tokens per sequence (repeatable; default 512, 4096)")  # fmt: skip
    p.add_argument("--kv-cache", choices=["fp8", "bf16", "fp16"], help="default: --dtype")
    p.add_argument("--scheme", choices=["tensor", "channel", "block"],
                   help="weight scales when a 16-bit checkpoint is quantized on load")  # fmt: skip
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--device", default="cuda", help="the GPU to tune (default: cuda)")
    p.set_defaults(run=_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
