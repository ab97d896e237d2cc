"""The decode suite: decode_attention over a bf16 or e4m3 cache beside torch SDPA, in GB/s of
cache read."""

from __future__ import annotations

import functools

import torch

from fp8nemo import fp8 as fp8_ref

from .harness import NEMO_HEADS, case_fields, measure, rel_err

DECODE_CONTEXT = (4096, 32768, 131072)
DECODE_BATCH = (1, 16)


def cases(on_gpu: bool, shapes=None, ms=None):
    """(name, B, L, Hq, Hk, D, cache dtype): one token per sequence over L cached keys."""
    Hq, Hk, D = NEMO_HEADS if on_gpu else (8, 2, 64)
    for L in ms or (DECODE_CONTEXT if on_gpu else (256, 1024)):
        for B in DECODE_BATCH if on_gpu else (1, 2):
            for cache in ("bf16", "fp8"):
                yield "decode", B, L, Hq, Hk, D, cache


def run_case(env, device, name, B, L, Hq, Hk, D, cache) -> list:
    """decode_attention over a full bf16 or e4m3 cache of L keys, in GB/s of cache read,
    beside torch SDPA (bf16 cache only); the check compares sequence 0 with fp32."""
    from fp8nemo.kernels import decode_attention
    from fp8nemo.kernels.decode import decode_reference

    gen = torch.Generator(device=device).manual_seed(L + B)
    q = torch.randn(B, Hq, D, device=device, generator=gen).to(torch.bfloat16)
    k, v = (
        torch.randn(B, L, Hk, D, device=device, generator=gen).to(torch.bfloat16) for _ in range(2)
    )
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    kw = {}
    if cache == "fp8":
        (k, ks), (v, vs) = fp8_ref.quantize(k, "tensor"), fp8_ref.quantize(v, "tensor")
        kw = {"k_descale": ks.reshape(()), "v_descale": vs.reshape(())}
    first = (t[:1].cpu() for t in (q, k, v, lens))
    descales = {n: t.cpu() for n, t in kw.items()}
    ref = decode_reference(*first, out_dtype=torch.float32, **descales)

    def check(out):
        return rel_err(out[:1].cpu(), ref)

    flops = 4.0 * B * Hq * L * D
    nbytes = 2 * B * L * Hk * D * k.element_size() + 2 * 2 * B * Hq * D
    rows = []
    dims = dict(B=B, L=L, Hq=Hq, Hk=Hk, D=D, cache=cache)
    case = case_fields("decode", name, dims, torch.bfloat16)
    ours = functools.partial(decode_attention, q, k, v, lens, **kw)
    measure(env, device, rows, case, "fp8nemo", f"{cache} cache", ours, flops, nbytes, False, check)
    if env.on_gpu and cache == "bf16":
        sdpa = functools.partial(_sdpa_decode, q, k, v)
        measure(
            env, device, rows, case, "torch SDPA", "bf16 cache", sdpa, flops, nbytes, False, check
        )
    return rows


def _sdpa_decode(q, k, v):
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True
    )
    return out[:, :, 0]
