"""Tiny random HF models built in-process (torch CPU), saved as safetensors: the parity oracle."""

from __future__ import annotations

import numpy as np

FAMILIES = ("llama", "llama3", "qwen2", "qwen3")
ATTENTION = {"mha": 4, "gqa": 2, "mqa": 1}  # num_key_value_heads with 4 query heads


def make_hf_model(family: str, attn: str, tied: bool, seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=ATTENTION[attn], max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, head_dim=16,
    )
    if family == "llama":
        cfg = tf.LlamaConfig(**common, rope_theta=10000.0)
        cls = tf.LlamaForCausalLM
    elif family == "llama3":
        cfg = tf.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(**common, rope_theta=1000000.0)
        cls = tf.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = tf.Qwen3Config(**common, rope_theta=1000000.0)
        cls = tf.Qwen3ForCausalLM
    else:
        raise ValueError(family)
    model = cls(cfg).eval().float()
    # make the random model less degenerate: perturb norms and biases away from their init
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
