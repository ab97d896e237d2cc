"""The RoPE suite: rope_ and RoPE fused with the bf16 / e4m3 KV-cache write beside the unfused
torch version, in GB/s."""

from __future__ import annotations

import functools

import torch

from fp8nemo import fp8 as fp8_ref

from .harness import NEMO_HEADS, case_fields, measure, rel_err

ROPE_TOKENS = (16, 4096, 16384)


def cases(on_gpu: bool, shapes=None, ms=None):
    """(name, T, Hq, Hk, D): rope_ alone, and fused with a bf16 or e4m3 cache write."""
    Hq, Hk, D = NEMO_HEADS if on_gpu else (8, 2, 64)
    for T in ms or (ROPE_TOKENS if on_gpu else (16, 256)):
        for name in ("rope_", "rope_kv_cache_ bf16", "rope_kv_cache_ fp8"):
            yield name, T, Hq, Hk, D


def run_case(env, device, name, T, Hq, Hk, D) -> list:
    """The fused kernel beside the unfused torch version (rotate q and k, then write the cache),
    in GB/s of the bytes the op must move."""
    from fp8nemo.kernels import rope_, rope_cache, rope_kv_cache_
    from fp8nemo.kernels.rope import kv_cache_write_reference, rope_reference

    gen = torch.Generator(device=device).manual_seed(T)
    q = torch.randn(T, Hq, D, device=device, generator=gen).to(torch.bfloat16)
    k, v = (
        torch.randn(T, Hk, D, device=device, generator=gen).to(torch.bfloat16) for _ in range(2)
    )
    positions = torch.randint(0, 131072, (T,), device=device, generator=gen)
    cos_sin = rope_cache(D, 131072, 1e6, device=device)
    want_q, want_k = rope_reference(q, k, positions, cos_sin)

    def check(out):
        return max(rel_err(out[0], want_q), rel_err(out[1], want_k))

    qk_bytes = 2 * 2 * T * (Hq + Hk) * D + T * D * 4
    rows = []
    case = case_fields("rope", name, dict(T=T, Hq=Hq, Hk=Hk, D=D), torch.bfloat16)
    # The timed op rotates scratch copies in place: the first call (the one checked) sees the
    # original values, later ones rotate further, at the same cost.
    q_work, k_work = q.clone(), k.clone()
    if name == "rope_":
        ours = functools.partial(rope_, q_work, k_work, positions, cos_sin)
        theirs = functools.partial(rope_reference, q, k, positions, cos_sin)
        nbytes = qk_bytes
    else:
        fp8 = name.endswith("fp8")
        cache_dtype = fp8_ref.E4M3 if fp8 else torch.bfloat16
        k_cache = torch.zeros(1, T, Hk, D, device=device).to(cache_dtype)
        v_cache = torch.zeros_like(k_cache)
        slots = torch.arange(T, device=device)
        scale = torch.full((1,), 0.02, device=device) if fp8 else None
        ours = functools.partial(rope_kv_cache_, q_work, k_work, v, positions, cos_sin, k_cache,
                                 v_cache, slots, k_scale=scale, v_scale=scale)  # fmt: skip

        def theirs():
            q_rot, k_rot = rope_reference(q, k, positions, cos_sin)
            kv_cache_write_reference(k_rot, v, k_cache, v_cache, slots, scale, scale)
            return q_rot, k_rot

        nbytes = qk_bytes + 2 * T * Hk * D + 2 * T * Hk * D * k_cache.element_size()
    scheme = "-" if name == "rope_" else f"{name.split()[-1]} cache"
    measure(env, device, rows, case, "fp8nemo", scheme, ours, 0.0, nbytes, False, check)
    if env.on_gpu:
        measure(env, device, rows, case, "torch unfused", scheme, theirs, 0.0, nbytes, False, check)
    return rows
