"""The Mistral/Llama transformer on fp8nemo's kernels (the "fp8" backend) or plain torch (the
"reference" backend): config, modules, KV cache, loading and generation."""

from .cache import KVCache
from .calibrate import calibrate_checkpoint
from .config import ModelConfig, preset
from .linear import FP8Linear, FP8Scheme
from .loader import load_model
from .transformer import Transformer, build_model

__all__ = [
    "FP8Linear",
    "FP8Scheme",
    "KVCache",
    "ModelConfig",
    "Transformer",
    "build_model",
    "calibrate_checkpoint",
    "load_model",
    "preset",
]
