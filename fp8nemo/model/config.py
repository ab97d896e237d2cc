"""The model's configuration: a dataclass that validates itself, read from an HF `config.json`
(Mistral and Llama, key by key) or taken from a named preset."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from fp8nemo.quant.files import read_config

MODEL_TYPES = {"mistral": "MistralForCausalLM", "llama": "LlamaForCausalLM"}
ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")
MAX_HEAD_DIM = 256  # flash_attention's limit


@dataclass(frozen=True)
class ModelConfig:
    """A Mistral/Llama decoder: SwiGLU MLP, RMSNorm, RoPE (neox pairing, HF weights), GQA, no
    biases. `rope_scaling` is an HF rope_scaling dict (without rope_theta) or None;
    `sliding_window` is Mistral's (a query sees itself and the window - 1 keys before it)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: dict | None = None
    max_position_embeddings: int = 131072
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    model_type: str = "mistral"
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    quantization_config: dict | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):  # fmt: skip
            _positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 16 or self.head_dim > MAX_HEAD_DIM:
            raise ValueError(
                f"head_dim must be a multiple of 16 up to {MAX_HEAD_DIM}; got {self.head_dim}"
            )
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _is_number(value) or not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number; got {value!r}")
        if self.sliding_window is not None:
            _positive_int("sliding_window", self.sliding_window)
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"tie_word_embeddings must be a bool; got {self.tie_word_embeddings!r}"
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(
                f"model_type must be one of {sorted(MODEL_TYPES)}; got {self.model_type!r}"
            )
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"rope_scaling must be a dict or None; got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ROPE_TYPES:
                raise ValueError(
                    f"rope_scaling rope_type must be one of {ROPE_TYPES}; got {kind!r}"
                )
        if self.bos_token_id is not None:
            _token_id("bos_token_id", self.bos_token_id, self.vocab_size)
        if not isinstance(self.eos_token_id, tuple):
            raise ValueError(f"eos_token_id must be a tuple of ints; got {self.eos_token_id!r}")
        for t in self.eos_token_id:
            _token_id("eos_token_id", t, self.vocab_size)

    @property
    def rope(self) -> dict | None:
        """The rope_scaling dict `rope_cache` takes (dynamic NTK also needs the context)."""
        if self.rope_scaling is None:
            return None
        scaling = dict(self.rope_scaling)
        if scaling.get("rope_type", scaling.get("type")) == "dynamic":
            scaling.setdefault("max_position_embeddings", self.max_position_embeddings)
        return scaling

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, path: str) -> ModelConfig:
        """The config of the HF checkpoint folder `path` (its `config.json`)."""
        return cls.from_hf(read_config(path), where=os.path.join(path, "config.json"))

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config") -> ModelConfig:
        """Read an HF config dict for MistralForCausalLM / LlamaForCausalLM key by key; what
        fp8nemo does not implement is a ValueError naming the key and its value."""

        def refuse(key, allowed):
            raise ValueError(f"{where}: {key} = {hf.get(key)!r} is not supported ({allowed})")

        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            refuse("model_type", f"fp8nemo implements {sorted(MODEL_TYPES)}")
        architectures = hf.get("architectures")
        if architectures is not None and architectures != [MODEL_TYPES[model_type]]:
            refuse("architectures", f"a {model_type} config needs [{MODEL_TYPES[model_type]!r}]")
        if hf.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", "the MLP is SwiGLU: silu")
        for key in ("attention_bias", "mlp_bias"):
            if hf.get(key, False) is not False:
                refuse(key, "the linears have no bias")
        if hf.get("pretraining_tp", 1) != 1:
            refuse("pretraining_tp", "only 1")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            refuse("partial_rotary_factor", "RoPE over the whole head_dim only")
        if hf.get("use_sliding_window") is False and hf.get("sliding_window") is not None:
            refuse("use_sliding_window", "sliding_window set means it is used")

        theta, scaling = _rope(hf, where, refuse)
        heads = _get(hf, "num_attention_heads", where)
        hidden = _get(hf, "hidden_size", where)
        eos = hf.get("eos_token_id")
        fields = dict(
            vocab_size=_get(hf, "vocab_size", where),
            hidden_size=hidden,
            intermediate_size=_get(hf, "intermediate_size", where),
            num_hidden_layers=_get(hf, "num_hidden_layers", where),
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim")
            or (hidden // heads if isinstance(heads, int) and heads else 0),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 131072),
            sliding_window=hf.get("sliding_window"),
            tie_word_embeddings=hf.get("tie_word_embeddings", model_type == "llama"),
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            quantization_config=hf.get("quantization_config"),
        )
        try:
            return cls(**fields)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def to_hf(self) -> dict:
        """The HF config.json this config reads back from (for presets written to disk)."""
        hf = {
            "architectures": [MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "eos_token_id":
                value = list(value) if len(value) != 1 else value[0]
            if value is not None or f.name == "sliding_window":
                hf[f.name] = value
        return hf

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def _token_id(name: str, value, vocab_size: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < vocab_size:
        raise ValueError(
            f"{name} must be token ids in [0, vocab_size = {vocab_size}); got {value!r}"
        )


def _get(hf: dict, key: str, where: str):
    if key not in hf:
        raise ValueError(f"{where}: {key} is missing")
    return hf[key]


def _rope(hf: dict, where: str, refuse) -> tuple[float, dict | None]:
    """(theta, rope_scaling or None) from transformers v5's `rope_parameters` or v4's
    `rope_theta` + `rope_scaling`."""
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            refuse("rope_parameters", "a dict")
        if "full_attention" in params:  # per-layer-type parameters: one kind of layer here
            refuse("rope_parameters", "one set of parameters, not one per layer type")
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            refuse("rope_scaling", "a dict or null")
        scaling = dict(scaling) if scaling else {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES:
        key = "rope_parameters" if params is not None else "rope_scaling"
        raise ValueError(
            f"{where}: {key} rope_type = {kind!r} is not supported (one of {ROPE_TYPES} or default)"
        )
    return theta, scaling


PRESETS = {
    # Mistral NeMo 12B: head_dim 128 is not 5120 / 32; no sliding window; untied embeddings.
    "nemo-12b": dict(vocab_size=131072, hidden_size=5120, intermediate_size=14336,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, rms_norm_eps=1e-5, rope_theta=1e6,
                     max_position_embeddings=131072, bos_token_id=1, eos_token_id=(2,)),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, rms_norm_eps=1e-5, rope_theta=1e4,
                       max_position_embeddings=32768, sliding_window=4096, bos_token_id=1,
                       eos_token_id=(2,)),
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, rms_norm_eps=1e-5, rope_theta=5e5,
                       max_position_embeddings=8192, model_type="llama", bos_token_id=128000,
                       eos_token_id=(128001, 128009)),
    # NeMo's quirks at a size the interpreter runs: head_dim 64 != 256 / 8, GQA 4:1, theta 1e6.
    "tiny": dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=8, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5,
                 rope_theta=1e6, max_position_embeddings=4096, bos_token_id=1,
                 eos_token_id=(2,)),
}  # fmt: skip


def preset(name: str) -> ModelConfig:
    """The named preset's config: "nemo-12b", "mistral-7b", "llama-3-8b" or "tiny"."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
    return ModelConfig(**PRESETS[name])
