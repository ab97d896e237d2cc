"""Tiny Mistral-shaped checkpoints written by hand in each format fp8nemo reads, with the exact
tensor names, shapes and dtypes of that format, and the dequantized weights each should give."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from fp8nemo import fp8

E4M3 = torch.float8_e4m3fn
# Two decoder layers; k/v have 2 heads of 64, the MLP 384 wide (3 blocks of 128).
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 256, 384, 2, 4, 2, 64, 96
LINEARS = {
    "self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN),
    "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def hf_config() -> dict:
    return {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "sliding_window": None,
    }  # fmt: skip


def linear_names():
    return [f"model.layers.{i}.{n}" for i in range(LAYERS) for n in LINEARS]


def bf16_tensors(gen) -> dict[str, torch.Tensor]:
    """Random weights under HF Mistral names, bf16."""
    t = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen),
        "model.norm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=gen),
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=gen) * 0.05,
    }
    for i in range(LAYERS):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t[f"model.layers.{i}.{norm}.weight"] = 1 + 0.1 * torch.randn(HIDDEN, generator=gen)
    for name in linear_names():
        shape = LINEARS[name.split(".", 3)[3]]
        t[f"{name}.weight"] = torch.randn(*shape, generator=gen) / shape[1] ** 0.5
    return {k: v.bfloat16() for k, v in t.items()}


def write(path, config, tensors, hf_quant_config=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if hf_quant_config is not None:
        with open(os.path.join(path, "hf_quant_config.json"), "w") as f:
            json.dump(hf_quant_config, f)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors")
    )
    return path


# format name -> (weight granularity, static activations, config["quantization_config"] or None)
FORMATS = {
    "autofp8-static": ("tensor", True, {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}),
    "autofp8-dynamic": ("tensor", False, {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}),
    "autofp8-legacy": ("tensor", True, {"quant_method": "fp8", "activation_scheme": "static"}),
    "finegrained": ("block", False, {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}),
    "ct-tensor-static": ("tensor", True, None),
    "ct-channel-dynamic": ("channel", False, None),
    "ct-block-dynamic": ("block", False, None),
    "modelopt": ("tensor", True, None),
}  # fmt: skip


def ct_config(granularity, static):
    weights = {"num_bits": 8, "type": "float", "strategy": granularity, "symmetric": True,
               "dynamic": False, "group_size": None, "observer": "minmax",
               "block_structure": [128, 128] if granularity == "block" else None}  # fmt: skip
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
            "strategy": "tensor" if static else ("group" if granularity == "block" else "token"),
            "group_size": 128 if granularity == "block" else None}  # fmt: skip
    return {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "version": "0.10.2", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts, "output_activations": None}},
        "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True} if static else None,
    }  # fmt: skip


def fp8_fixture(path, fmt, gen):
    """Write checkpoint `fmt` (a FORMATS key) to `path`; returns (expected dequantized fp32
    weights by HF name, expected input scales by module, expected kv scales by attention)."""
    granularity, static, qc = FORMATS[fmt]
    base = bf16_tensors(gen)
    config = hf_config()
    ct = fmt.startswith("ct-")
    scale_dtype = torch.bfloat16 if ct else torch.float32  # compressed-tensors: the model dtype
    tensors, want, inputs, kv = {}, {}, {}, {}
    for name, t in base.items():
        module = name[: -len(".weight")]
        if module not in linear_names():
            tensors[name] = t
            want[name] = t.float()
            continue
        w_fp8, scale = fp8.quantize(t, "channel" if granularity == "channel" else granularity)
        stored = scale.to(scale_dtype)
        if granularity == "tensor" and not ct:
            stored = stored.reshape(())  # AutoFP8 / ModelOpt scales are 0-d
        scale_name = "weight_scale_inv" if fmt == "finegrained" else "weight_scale"
        tensors[name] = w_fp8
        tensors[f"{module}.{scale_name}"] = stored
        want[name] = fp8.dequantize(w_fp8, stored.float().reshape(scale.shape), granularity)
        if static:
            s = (torch.rand((), generator=gen) * 0.05 + 0.01).to(scale_dtype)
            key = "act_scale" if fmt == "autofp8-legacy" else "input_scale"
            tensors[f"{module}.{key}"] = s.reshape(1) if ct else s
            inputs[module] = s.float().reshape(1)
    if static:
        for i in range(LAYERS):
            attn = f"model.layers.{i}.self_attn"
            k, v = (torch.rand((), generator=gen) * 0.1 + 0.05 for _ in range(2))
            if fmt == "autofp8-legacy":
                tensors[f"{attn}.kv_scale"] = k
                v = k
            elif fmt == "modelopt":
                tensors[f"{attn}.k_proj.k_scale"], tensors[f"{attn}.v_proj.v_scale"] = k, v
            elif ct:
                k, v = k.bfloat16(), v.bfloat16()
                tensors[f"{attn}.k_scale"], tensors[f"{attn}.v_scale"] = k.reshape(1), v.reshape(1)
            else:
                tensors[f"{attn}.k_scale"], tensors[f"{attn}.v_scale"] = k, v
            kv[attn] = {"k_scale": k.float().reshape(1), "v_scale": v.float().reshape(1)}
    hf_quant = None
    if fmt == "modelopt":
        hf_quant = {"producer": {"name": "modelopt", "version": "0.33.0"},
                    "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}  # fmt: skip
    elif ct:
        config["quantization_config"] = ct_config(granularity, static)
    else:
        config["quantization_config"] = qc
    write(path, config, tensors, hf_quant)
    return want, inputs, kv


def static_source(tmp_path, gen, sequences, length):
    """A 16-bit checkpoint and a calibration file of random token ids for it."""
    src = write(tmp_path / "src", hf_config(), bf16_tensors(gen))
    calib = tmp_path / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, VOCAB, (sequences, length), generator=gen)}, calib)
    return src, calib
