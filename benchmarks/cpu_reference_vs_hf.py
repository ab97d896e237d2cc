"""fp8nemo's bf16 reference backend against HF transformers' eager bf16 model on the CPU, on the
same random-weight checkpoint and thread count: prefill and decode timed alternately, the
fastest of N runs each (other processes only ever slow a run down, and a tiny model's
millisecond steps swing with them; `fp8nemo bench --suite e2e` reports medians).

    python benchmarks/cpu_reference_vs_hf.py [--model tiny] [--runs 30] [--threads 2]
"""

import argparse
import os
import tempfile

import torch

from fp8nemo.bench import e2e
from fp8nemo.model.loader import write_random_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="a preset (random weights) or checkpoint")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if not os.path.isdir(path):
            path = write_random_checkpoint(e2e.model_config(args.model), f"{tmp}/ckpt", cpu)
        work = argparse.Namespace(device=cpu, path=path, hf_eager=None)
        ours, hf = e2e.Fp8nemo(work, "reference"), e2e.HF(work)
        vocab = e2e.model_config(args.model).vocab_size
        print(f"{args.model}, {args.threads} threads, fastest of {args.runs} alternating runs")
        print(f"{'case':>20}  {'reference ms':>12}  {'HF eager ms':>11}  {'ref/HF tok/s':>12}")

        def compare(case, run_ours, run_hf):
            times = {"ours": [], "hf": []}
            for _ in range(args.runs):
                times["ours"].append(run_ours().ms)
                times["hf"].append(run_hf().ms)
            o, h = min(times["ours"]), min(times["hf"])
            print(f"{case:>20}  {o:12.2f}  {h:11.2f}  {h / o:12.2f}")

        gen = torch.Generator().manual_seed(0)
        for P in (64, 256, 1024):
            ids = torch.randint(0, vocab, (P,), generator=gen)
            compare(f"prefill P={P}", lambda ids=ids: ours.prefill(ids),
                    lambda ids=ids: hf.prefill(ids))  # fmt: skip
        for B, P in ((1, 32), (4, 32), (1, 512), (16, 512)):
            prompts = torch.randint(0, vocab, (B, P), generator=gen)
            compare(f"decode B={B} P={P}", lambda x=prompts: ours.decode(x, 8),
                    lambda x=prompts: hf.decode(x, 8))  # fmt: skip


if __name__ == "__main__":
    main()
