"""The attention suite: causal prefill with flash_attention in bf16 and FP8 (V D-contiguous, and
key-major as v_key_major lays it out) beside torch's flash scaled_dot_product_attention, in
TFLOP/s."""

from __future__ import annotations

import functools

import torch

from fp8nemo import fp8 as fp8_ref

from .harness import NEMO_HEADS, case_fields, measure, rel_err

PREFILL_S = (1024, 4096, 16384)
PREFILL_TOKENS = 16384  # batch = tokens // S, so every row moves a similar amount of work
CPU_HEADS = (4, 1, 64)


def cases(on_gpu: bool, shapes=None, ms=None):
    """(name, B, S, Hq, Hk, D): causal prefill at NeMo's heads."""
    Hq, Hk, D = NEMO_HEADS if on_gpu else CPU_HEADS
    for S in ms or (PREFILL_S if on_gpu else (128, 256)):
        yield "prefill causal", max(1, PREFILL_TOKENS // S) if on_gpu else 1, S, Hq, Hk, D


def _sdpa(q, k, v, causal):
    """torch's flash SDPA on [B, S, H, D] tensors, GQA through enable_gqa."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=causal,
            enable_gqa=True,
        )
    return out.transpose(1, 2)


def run_case(env, device, name, B, S, Hq, Hk, D) -> list:
    """flash_attention in bf16 and FP8 (per-tensor descales; V D-contiguous and key-major, the
    same values) beside torch's flash SDPA; the check compares the first 256 queries of
    sequence 0 (causal: they see only each other) with the fp32 reference."""
    from fp8nemo.kernels import flash_attention, v_key_major
    from fp8nemo.kernels.attention import attention_reference

    gen = torch.Generator(device=device).manual_seed(S * 31 + B)
    q, k, v = (
        torch.randn(B, S, h, D, device=device, generator=gen).to(torch.bfloat16)
        for h in (Hq, Hk, Hk)
    )
    flops = 4.0 * B * Hq * D * S * (S + 1) / 2
    n = min(S, 256)
    rows = []
    case = case_fields("attention", name, dict(B=B, S=S, Hq=Hq, Hk=Hk, D=D), torch.bfloat16)
    ref = attention_reference(
        *(t[:1, :n].cpu() for t in (q, k, v)), causal=True, out_dtype=torch.float32
    )[0]

    def check(out):
        return rel_err(out[:1, :n].cpu(), ref)

    half_bytes = 2 * B * S * D * (2 * Hq + 2 * Hk)
    ours = functools.partial(flash_attention, q, k, v, causal=True)
    measure(env, device, rows, case, "fp8nemo", "bf16", ours, flops, half_bytes, False, check)
    (q8, qs), (k8, ks), (v8, vs) = (fp8_ref.quantize(t, "tensor") for t in (q, k, v))
    descales = dict(q_descale=qs.reshape(()), k_descale=ks.reshape(()), v_descale=vs.reshape(()))
    fp8_bytes = B * S * D * (Hq + 2 * Hk) + 2 * B * S * Hq * D
    for scheme, v_layout in (("fp8", v8), ("fp8 vkeymajor", v_key_major(v8))):
        ours8 = functools.partial(flash_attention, q8, k8, v_layout, causal=True, **descales)
        measure(env, device, rows, case, "fp8nemo", scheme, ours8, flops, fp8_bytes, True, check)
    if env.on_gpu:
        sdpa = functools.partial(_sdpa, q, k, v, True)
        measure(
            env,
            device,
            rows,
            case,
            "torch SDPA flash",
            "bf16",
            sdpa,
            flops,
            half_bytes,
            False,
            check,
        )
    return rows
