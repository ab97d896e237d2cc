"""The KV cache and the description of one forward's tokens: where each sits in its sequence
and in the cache. Lengths and positions live on the device, so a decode step needs no sync."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fp8nemo import fp8

from .config import ModelConfig

CACHE_DTYPES = {
    "fp64": torch.float64,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8": fp8.E4M3,
}


class KVCache:
    """Keys (after RoPE) and values of every layer, `[L, B, S_max, Hk, D]` in the model's dtype
    or e4m3 (the model holds the static k/v scales), and `seqlens` `[B]` int32: the tokens held
    per sequence."""

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):  # fmt: skip
        for name, value in (("batch_size", batch_size), ("max_seq_len", max_seq_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if dtype not in CACHE_DTYPES.values():
            raise TypeError(f"dtype must be one of {list(CACHE_DTYPES.values())}; got {dtype}")
        shape = (config.num_hidden_layers, batch_size, max_seq_len, config.num_key_value_heads,
                 config.head_dim)  # fmt: skip
        # Zeros, not garbage: a masked key's value still enters the torch reference's P @ V.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def reset(self) -> None:
        self.seqlens.zero_()

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class Batch:
    """The T tokens of one forward. `kind`: "full" (B sequences of S tokens, no cache),
    "packed" (sequences of different lengths back to back, `cu_seqlens` [B + 1]; written to
    the cache from its start when there is one) or "append" (S new tokens per sequence after
    the `start` [B] tokens the cache holds)."""

    kind: str
    batch_size: int
    seq_len: int  # S for full/append; the longest sequence for packed
    positions: torch.Tensor  # [T] int64, each token's position in its sequence
    cos_sin: torch.Tensor  # [max_pos, D] fp32 rope table
    cache: KVCache | None = None
    slots: torch.Tensor | None = None  # [T] int64: b * S_max + position
    cu_seqlens: torch.Tensor | None = None  # [B + 1] int32 (packed)
    start: torch.Tensor | None = None  # [B] int32: cache length before this forward (append)
    kv_len: int | None = None  # append: the cache slots in use after it, where the host knows

    @property
    def tokens(self) -> int:
        return self.positions.shape[0]
