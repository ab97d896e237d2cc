"""Small random HF transformers models (saved with `save_pretrained`) with the quirks each model
family has, for parity tests of fp8nemo's model against transformers."""

from __future__ import annotations

import torch

# name -> (HF config class, its kwargs): each at least 3 layers.
CONFIGS = {
    # NeMo's quirks: head_dim 32 != 128 / 8, GQA 4:1, theta 1e6, no window, untied embeddings.
    "nemo": ("MistralConfig", dict(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
        sliding_window=None, max_position_embeddings=1024, tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )),
    # Mistral-7B-like: a sliding window (40) shorter than the 96-token sequences.
    "mistral": ("MistralConfig", dict(
        vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e4,
        sliding_window=40, max_position_embeddings=1024, tie_word_embeddings=False,
    )),
    # Llama-3-like: tied embeddings, llama3 rope scaling, GQA 3:1, head_dim 64.
    "llama": ("LlamaConfig", dict(
        vocab_size=320, hidden_size=192, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=64, rope_theta=5e5,
        tie_word_embeddings=True, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64),
    )),
}  # fmt: skip


def hf_model(name: str, seed: int = 0):
    """The HF model of CONFIGS[name] in fp32 with lively random weights: HF's 0.02 init makes
    nearly uniform logits, where greedy decoding repeats one token and ties are likely."""
    import transformers

    cls_name, kwargs = CONFIGS[name]
    config = getattr(transformers, cls_name)(**kwargs)
    model_cls = (
        transformers.MistralForCausalLM if name != "llama" else transformers.LlamaForCausalLM
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in pname:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
            elif p.dim() == 2:  # tied: a large embedding makes every step predict its input
                p.normal_(0.0, 0.1 if config.tie_word_embeddings else 1.0)
            else:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def save_hf_model(name: str, path, dtype=torch.float32, seed: int = 0):
    """`hf_model(name)` saved to `path` in `dtype`; returns the fp32 model."""
    model = hf_model(name, seed)
    model.to(dtype).save_pretrained(path)
    return model.float()
