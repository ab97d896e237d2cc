"""The Mistral/Llama decoder in one module tree with HF's module names, so checkpoint tensors
map one to one. Two backends, chosen when the model is built: "reference" (plain torch:
`nn.Linear`, `scaled_dot_product_attention`; the fp16/fp32 reference of every accuracy check)
and "fp8" (FP8Linear on fp8_gemm, fused norm/SwiGLU quantization, RoPE fused with the cache
write, flash / append-to-cache attention). The forwards are the same code for both."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fp8nemo import fp8
from fp8nemo import kernels as K
from fp8nemo.kernels._triton import value_checks_enabled
from fp8nemo.kernels.rope import rope_reference

from .cache import Batch, KVCache
from .config import ModelConfig
from .linear import FP8Linear, FP8Scheme, QuantizedActivation, static_scale_buffer

log = logging.getLogger(__name__)

BACKENDS = ("reference", "fp8")


@dataclass(frozen=True)
class Backend:
    """What the model is built from: `name`, the activation dtype, the FP8 scheme (fp8 only)
    and the KV cache's dtype."""

    name: str
    dtype: torch.dtype
    scheme: FP8Scheme | None
    kv_cache_dtype: torch.dtype
    device: torch.device | str | None = None

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}; got {self.name!r}")
        allowed = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
        if self.name == "fp8":
            allowed = allowed[2:]  # the attention kernels take 16-bit activations
            if self.scheme is None:
                raise ValueError("the fp8 backend needs an FP8Scheme")
        if self.dtype not in allowed:
            raise TypeError(
                f"dtype for the {self.name} backend must be one of {allowed}; got {self.dtype}"
            )
        caches = (self.dtype, fp8.E4M3) if self.name == "fp8" else (self.dtype,)
        if self.kv_cache_dtype not in caches:
            raise TypeError(
                f"kv_cache_dtype for the {self.name} backend must be one of {caches}; got "
                f"{self.kv_cache_dtype}"
            )

    @property
    def fp8(self) -> bool:
        return self.name == "fp8"

    def linear(self, in_features: int, out_features: int) -> nn.Module:
        if self.fp8:
            return FP8Linear(in_features, out_features, self.scheme, self.dtype, self.device)
        return nn.Linear(
            in_features, out_features, bias=False, dtype=self.dtype, device=self.device
        )


# ---------------------------------------------------------------------------------------------
# modules


class RMSNorm(nn.Module):
    """HF's RMSNorm, with the residual add before it: `(norm(x + residual), x + residual)`."""

    def __init__(self, dim: int, eps: float, backend: Backend):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=backend.dtype, device=backend.device))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # x, residual: [T, D] -> normalized [T, D], new residual [T, D]
        if residual is not None:
            x = x + residual
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype), x


class FP8RMSNorm(RMSNorm):
    """Residual add + RMSNorm + e4m3 quantization in one kernel, for the FP8 linears after it;
    a static `input_scale` is the largest of theirs."""

    def __init__(self, dim: int, eps: float, backend: Backend):
        super().__init__(dim, eps, backend)
        self.granularity = backend.scheme.activation_granularity
        static_scale_buffer(self, backend.scheme, backend.device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        # x, residual: [T, D] -> quantized normalized [T, D], new residual [T, D]
        x_fp8, scale, residual = K.rmsnorm_fp8(
            x, self.weight, self.eps, residual=residual, scale=self.input_scale,
            granularity=self.granularity,
        )  # fmt: skip
        return QuantizedActivation(x_fp8, scale), residual


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, backend: Backend):
        super().__init__()
        self.gate_proj = backend.linear(config.hidden_size, config.intermediate_size)
        self.up_proj = backend.linear(config.hidden_size, config.intermediate_size)
        self.down_proj = backend.linear(config.intermediate_size, config.hidden_size)

    def act(self, gate: torch.Tensor, up: torch.Tensor):
        return F.silu(gate) * up

    def forward(self, x):
        # x: [T, D] -> gate, up: [T, I] -> [T, D]
        return self.down_proj(self.act(self.gate_proj(x), self.up_proj(x)))


class FP8MLP(MLP):
    """SiLU(gate) * up quantized for down_proj in one kernel."""

    def act(self, gate: torch.Tensor, up: torch.Tensor):
        down = self.down_proj
        return QuantizedActivation(*K.silu_mul_fp8(
            gate, up, scale=down.input_scale, granularity=down.scheme.activation_granularity
        ))  # fmt: skip


class KVTap(nn.Module):
    """Where the reference attention has K (after RoPE) and V as the cache holds them: an
    identity the Calibrator hooks to observe the KV-cache scales' data."""

    def forward(self, k: torch.Tensor, v: torch.Tensor):
        return k, v


class Attention(nn.Module):
    """GQA self-attention with RoPE and the KV cache, in plain torch."""

    def __init__(self, config: ModelConfig, layer: int, backend: Backend):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim, self.window = config.head_dim, config.sliding_window
        self.q_proj = backend.linear(config.hidden_size, config.q_size)
        self.k_proj = backend.linear(config.hidden_size, config.kv_size)
        self.v_proj = backend.linear(config.hidden_size, config.kv_size)
        self.o_proj = backend.linear(config.q_size, config.hidden_size)
        self.kv_tap = KVTap()

    def forward(self, x, batch: Batch) -> torch.Tensor:
        # x: [T, D] -> q: [T, Hq, Dh], k, v: [T, Hk, Dh] -> [T, D]
        T = batch.tokens
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        out = self.attend(q, k, v, batch)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))

    def attend(self, q, k, v, batch: Batch) -> torch.Tensor:
        # q: [T, Hq, Dh], k, v: [T, Hk, Dh] -> [T, Hq, Dh]
        q, k = rope_reference(q, k, batch.positions, batch.cos_sin)
        k, v = self.kv_tap(k, v)
        cache = batch.cache
        if cache is not None:
            # The model's slots are all valid (never -1): an indexed write without
            # kv_cache_write_reference's boolean mask (a device sync, which neither a CUDA graph
            # nor torch.compile can hold), into the whole cache tensor (inductor writes a
            # layer's view of it through a copy of the view; the tensor itself in place).
            b, pos = batch.slots // cache.max_seq_len, batch.slots % cache.max_seq_len
            where = (torch.full_like(b, self.layer), b, pos)
            cache.k.index_put_(where, k.to(cache.dtype))
            cache.v.index_put_(where, v.to(cache.dtype))
        B, S = batch.batch_size, batch.seq_len
        if batch.kind == "append":
            # S new queries per sequence at positions start + t, over the cache's slots in use
            # (all of them where the host does not know how many: a traced or captured step).
            L = batch.kv_len or cache.max_seq_len
            out = self._sdpa(q.view(B, S, *q.shape[1:]), cache.k[self.layer, :B, :L],
                             cache.v[self.layer, :B, :L], batch.positions.view(B, S))  # fmt: skip
            return out.reshape(q.shape)
        if batch.kind == "packed":
            bounds = batch.cu_seqlens.tolist()
            parts = [
                self._sdpa(q[None, a:b], k[None, a:b], v[None, a:b])[0]
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            return torch.cat(parts) if parts else q.new_empty(q.shape)
        out = self._sdpa(q.view(B, S, *q.shape[1:]), k.view(B, S, *k.shape[1:]),
                         v.view(B, S, *v.shape[1:]))  # fmt: skip
        return out.reshape(q.shape)

    def _sdpa(self, q, k, v, q_pos=None) -> torch.Tensor:
        # q: [B, S, Hq, Dh] at positions q_pos [B, S] (None: the keys' own 0..S-1);
        # k, v: [B, Skv, Hk, Dh] at 0..Skv-1
        kv_pos = torch.arange(k.shape[1], device=q.device)
        if q_pos is None:
            if self.window is None:  # plain causal: SDPA's causal kernel needs no mask
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                    enable_gqa=True,
                )  # fmt: skip
                return out.transpose(1, 2)
            q_pos = kv_pos[None].expand(q.shape[0], -1)
        visible = kv_pos[None, None, :] <= q_pos[:, :, None]  # [B, S, Skv]
        if self.window is not None:
            visible &= kv_pos[None, None, :] > q_pos[:, :, None] - self.window
        k, v = k.to(q.dtype), v.to(q.dtype)
        if q.shape[1] == 1:
            return _decode_attention(q, k, v, visible)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=visible[:, None],
            enable_gqa=True,
        )
        return out.transpose(1, 2)


def _decode_attention(q, k, v, visible) -> torch.Tensor:
    """One query per sequence as two matmuls, the query heads grouped by their KV head: on a
    CPU, SDPA's flash kernel with a mask takes 2-4x as long for a single query (as HF's eager
    attention does it). Softmax in fp32.
    q: [B, 1, Hq, Dh]; k, v: [B, Skv, Hk, Dh]; visible: [B, 1, Skv] -> [B, 1, Hq, Dh]"""
    B, _, Hq, D = q.shape
    Hk = k.shape[2]
    q = q.view(B, Hk, Hq // Hk, D)  # head h reads KV head h // G
    scores = torch.matmul(q, k.permute(0, 2, 3, 1)) * D**-0.5  # [B, Hk, G, Skv]
    scores = scores.float().masked_fill(~visible[:, None], float("-inf"))
    out = torch.matmul(scores.softmax(-1).to(v.dtype), v.transpose(1, 2))  # [B, Hk, G, Dh]
    return out.reshape(B, 1, Hq, D)


class FP8Attention(Attention):
    """The same attention on the kernels: RoPE fused with the cache write, flash attention for
    full and packed prefill, append-to-cache attention after a cache; an e4m3 cache holds
    `k_scale`/`v_scale` ([1] fp32) as buffers."""

    def __init__(self, config: ModelConfig, layer: int, backend: Backend):
        super().__init__(config, layer, backend)
        if backend.kv_cache_dtype == fp8.E4M3:
            self.register_buffer("k_scale", torch.ones(1, device=backend.device))
            self.register_buffer("v_scale", torch.ones(1, device=backend.device))
        else:
            self.k_scale = self.v_scale = None

    def attend(self, q, k, v, batch: Batch) -> torch.Tensor:
        # q: [T, Hq, Dh], k, v: [T, Hk, Dh] -> [T, Hq, Dh]
        cache, B, S = batch.cache, batch.batch_size, batch.seq_len
        if cache is None:
            K.rope_(q, k, batch.positions, batch.cos_sin)
        else:
            k_cache, v_cache = cache.k[self.layer], cache.v[self.layer]
            K.rope_kv_cache_(q, k, v, batch.positions, batch.cos_sin, k_cache, v_cache,
                             batch.slots, k_scale=self.k_scale, v_scale=self.v_scale)  # fmt: skip
        if batch.kind == "append":
            out = K.append_attention(
                q.view(B, S, *q.shape[1:]), k_cache[:B], v_cache[:B], batch.start,
                window=self.window,
                k_descale=self.k_scale, v_descale=self.v_scale,
            )  # fmt: skip
        elif batch.kind == "packed":
            out = K.flash_attention(q, k, v, window=self.window, cu_seqlens=batch.cu_seqlens,
                                    max_seqlen=S)  # fmt: skip
        else:
            out = K.flash_attention(q.view(B, S, *q.shape[1:]), k.view(B, S, *k.shape[1:]),
                                    v.view(B, S, *v.shape[1:]), window=self.window)  # fmt: skip
        return out.reshape(q.shape)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, backend: Backend):
        super().__init__()
        fp8_path = backend.fp8
        norm = FP8RMSNorm if fp8_path else RMSNorm
        self.self_attn = (FP8Attention if fp8_path else Attention)(config, layer, backend)
        self.mlp = (FP8MLP if fp8_path else MLP)(config, backend)
        self.input_layernorm = norm(config.hidden_size, config.rms_norm_eps, backend)
        self.post_attention_layernorm = norm(config.hidden_size, config.rms_norm_eps, backend)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: Batch):
        # x: [T, D] the previous block's output (the embeddings in the first), residual [T, D]
        h, residual = self.input_layernorm(x, residual)
        x = self.self_attn(h, batch)
        h, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(h), residual


class Decoder(nn.Module):
    """HF's `model` (MistralModel / LlamaModel): embeddings, blocks, final norm."""

    def __init__(self, config: ModelConfig, backend: Backend):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         dtype=backend.dtype, device=backend.device)  # fmt: skip
        self.layers = nn.ModuleList(
            Block(config, i, backend) for i in range(config.num_hidden_layers)
        )
        # The final norm feeds the 16-bit lm_head: plain, on every backend.
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend)


class Transformer(nn.Module):
    """`MistralForCausalLM` / `LlamaForCausalLM`: `model` and `lm_head` (16-bit on every
    backend). `forward` takes token ids in one of three layouts (see `forward`)."""

    def __init__(self, config: ModelConfig, backend: Backend, max_seq_len: int | None = None):
        super().__init__()
        self.config, self.backend = config, backend
        self.max_seq_len = max_seq_len or config.max_position_embeddings
        self.model = Decoder(config, backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False,
                                 dtype=backend.dtype, device=backend.device)  # fmt: skip
        self.tie_weights()
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)
        if torch.device(backend.device or "cpu").type != "meta":
            self.init_rope()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_rope(self) -> None:
        """The fp32 RoPE table for positions [0, max_seq_len) on the model's device (it is
        not a checkpoint tensor: a model built on the meta device gets it after loading)."""
        device = self.model.embed_tokens.weight.device
        c = self.config
        self.cos_sin = K.rope_cache(c.head_dim, self.max_seq_len, c.rope_theta, c.rope,
                                    device=device)  # fmt: skip

    def tie_input_scales(self) -> None:
        """Static activations: each fused quantization uses the largest input_scale of the
        linears that read its output (vLLM does the same for its fused q/k/v and gate/up)."""
        for block in self.model.layers:
            attn, mlp = block.self_attn, block.mlp
            for norm, readers in (
                (block.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                (block.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
            ):
                if getattr(norm, "input_scale", None) is not None:
                    norm.input_scale.copy_(torch.stack([r.input_scale for r in readers]).amax(0))

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch_size, max_seq_len or self.max_seq_len,
                       self.backend.kv_cache_dtype, self.device)  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: KVCache | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits for `input_ids` laid out as:
        - `[B, S]`, no cache: B whole sequences (causal) -> `[B, S, V]`;
        - `[B, S]` with `cache`: S new tokens per sequence after the cache's `seqlens` ->
          `[B, S, V]` (decode is S = 1); the cache's lengths grow by S;
        - `[T]` with `cu_seqlens` `[B + 1]` int32: B sequences packed back to back, written to
          the cache (if given) from its start -> `[T, V]`; the cache's lengths become theirs.
        `last_only` keeps each sequence's last token: `[B, V]`.
        Token ids, lengths and positions are checked once here (one device sync); the ops then
        run with their own value checks off. Under torch.compile neither check runs while
        tracing (a host read would break the graph): the caller validates, and runs the
        compiled graph inside `kernels.value_checks(False)` (as `generate(compile=True)` does),
        else its ops check their indices, with a sync each, whenever it runs."""
        batch = self.batch(input_ids, cache, cu_seqlens, max_seqlen)
        with K.value_checks(False):
            x = self.model.embed_tokens(input_ids.reshape(-1))  # [T, D]
            residual = None
            for block in self.model.layers:
                x, residual = block(x, residual, batch)
            x, _ = self.model.norm(x, residual)
            if last_only:
                x = x[batch.cu_seqlens[1:].long() - 1] if batch.kind == "packed" else (
                    x.view(batch.batch_size, batch.seq_len, -1)[:, -1])  # fmt: skip
            logits = self.lm_head(x)
        if cache is not None:
            if batch.kind == "packed":
                B = batch.batch_size
                cache.seqlens[:B] = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).to(torch.int32)
            else:
                cache.seqlens[: batch.batch_size] += batch.seq_len
        if batch.kind != "packed" and not last_only:
            logits = logits.view(batch.batch_size, batch.seq_len, -1)
        return logits

    def batch(self, input_ids, cache, cu_seqlens, max_seqlen) -> Batch:
        """The Batch of one forward, its ids, lengths and positions checked on the host."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (
            torch.int32,
            torch.int64,
        ):
            raise TypeError(f"input_ids must be an int32/int64 tensor; got {_describe(input_ids)}")
        if input_ids.device != self.device:
            raise ValueError(f"input_ids is on {input_ids.device}; the model is on {self.device}")
        check = value_checks_enabled(input_ids)
        if cu_seqlens is not None:
            batch = self._packed(input_ids, cache, cu_seqlens, max_seqlen, check)
        else:
            if input_ids.dim() != 2 or input_ids.shape[1] == 0:
                raise ValueError(
                    f"input_ids must be [B, S] with S >= 1 (or [T] with cu_seqlens); got shape "
                    f"{list(input_ids.shape)}"
                )
            B, S = input_ids.shape
            positions = torch.arange(S, device=self.device).repeat(B)
            batch = Batch("full", B, S, positions, self.cos_sin)
            if cache is not None:
                _check_cache(cache, self, B)
                start = cache.seqlens[:B]
                positions = start[:, None].long() + torch.arange(S, device=self.device)  # [B, S]
                # Row offsets by broadcasting, not repeat_interleave: no device sync, ever.
                rows = torch.arange(B, device=self.device)[:, None] * cache.max_seq_len
                slots, positions = (rows + positions).reshape(-1), positions.reshape(-1)
                batch = Batch("append", B, S, positions, self.cos_sin, cache, slots, start=start)
                if check:  # one host read for the lengths and the ids
                    lo, hi, longest = torch.stack(
                        [input_ids.min().long(), input_ids.max().long(), start.max().long()]
                    ).tolist()
                    _check_ids(lo, hi, self.config.vocab_size)
                    end = longest + S
                    batch.kv_len = end
                    if end > min(cache.max_seq_len, self.max_seq_len):
                        raise ValueError(
                            f"cache seqlens + {S} new tokens reach {end}, past the cache's "
                            f"{cache.max_seq_len} slots or the model's max_seq_len "
                            f"{self.max_seq_len}"
                        )
            elif check and self.max_seq_len < S:
                raise ValueError(
                    f"input_ids has {S} tokens per sequence; max_seq_len is {self.max_seq_len}"
                )
        if check and batch.kind != "append" and input_ids.numel():
            _check_ids(*(int(v) for v in torch.aminmax(input_ids)), self.config.vocab_size)
        return batch

    def _packed(self, input_ids, cache, cu_seqlens, max_seqlen, check) -> Batch:
        if input_ids.dim() != 1:
            raise ValueError(f"packed input_ids must be [T]; got shape {list(input_ids.shape)}")
        if (
            not isinstance(cu_seqlens, torch.Tensor)
            or cu_seqlens.dtype != torch.int32
            or cu_seqlens.dim() != 1
            or cu_seqlens.numel() < 2
        ):
            raise ValueError(
                f"cu_seqlens must be an int32 [B + 1] tensor, B >= 1; got {_describe(cu_seqlens)}"
            )
        if cu_seqlens.device != self.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device}; the model is on {self.device}")
        B, T = cu_seqlens.numel() - 1, input_ids.numel()
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if check:
            bounds = cu_seqlens.tolist()
            longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
            if (
                bounds[0] != 0
                or bounds[-1] != T
                or any(b < a for a, b in zip(bounds[:-1], bounds[1:], strict=True))
            ):
                raise ValueError(
                    f"cu_seqlens must start at 0, never decrease and end at T = {T}; got {bounds}"
                )
            if max_seqlen is None:
                max_seqlen = longest
            elif max_seqlen < longest:
                raise ValueError(
                    f"max_seqlen {max_seqlen} is shorter than the longest sequence, {longest}"
                )
            if longest > self.max_seq_len:
                raise ValueError(
                    f"a sequence of {longest} tokens is past max_seq_len {self.max_seq_len}"
                )
        elif max_seqlen is None:
            raise ValueError("max_seqlen is needed where value checks are off (no device sync)")
        seq = torch.repeat_interleave(
            torch.arange(B, device=self.device), lengths.long(), output_size=T
        )
        positions = torch.arange(T, device=self.device) - cu_seqlens[:-1].long()[seq]
        slots = None
        if cache is not None:
            _check_cache(cache, self, B)
            if check and max_seqlen > cache.max_seq_len:
                raise ValueError(
                    f"a sequence of {max_seqlen} tokens is past the cache's "
                    f"{cache.max_seq_len} slots"
                )
            slots = seq * cache.max_seq_len + positions
        return Batch("packed", B, max_seqlen, positions, self.cos_sin, cache, slots, cu_seqlens)


def _check_ids(lo: int, hi: int, vocab_size: int) -> None:
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"input_ids must lie in [0, vocab_size = {vocab_size}); got values in [{lo}, {hi}]"
        )


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)}"
    return type(t).__name__


def _check_cache(cache: KVCache, model: Transformer, batch_size: int) -> None:
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a KVCache; got {type(cache).__name__}")
    c = model.config
    want = (c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    have = (cache.k.shape[0], cache.k.shape[3], cache.k.shape[4])
    if have != want:
        raise ValueError(f"cache is for (layers, kv heads, head_dim) {have}; the model has {want}")
    if cache.dtype != model.backend.kv_cache_dtype or cache.device != model.device:
        raise ValueError(
            f"cache is {cache.dtype} on {cache.device}; the model wants "
            f"{model.backend.kv_cache_dtype} on {model.device} (use model.new_cache)"
        )
    if batch_size > cache.batch_size:
        raise ValueError(
            f"a batch of {batch_size} sequences needs a cache of as many; it has {cache.batch_size}"
        )


def build_model(config: ModelConfig, backend: str = "reference", *, dtype=torch.bfloat16,
                device=None, scheme: FP8Scheme | None = None, kv_cache_dtype=None,
                max_seq_len: int | None = None) -> Transformer:  # fmt: skip
    """An untrained model of `config` on `backend` (weights uninitialized on a real device;
    use the loader to fill them)."""
    if backend == "fp8" and scheme is None:
        scheme = FP8Scheme()
    be = Backend(
        backend, dtype, scheme if backend == "fp8" else None, kv_cache_dtype or dtype, device
    )
    return Transformer(config, be, max_seq_len)
