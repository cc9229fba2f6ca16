"""Mistral (HF ``model_type`` "mistral", without sliding window): logits parity with HF
transformers' ``MistralForCausalLM`` on a tiny random model built in-process, and the refusal of a
sliding-window config (the README's claim: "mistral (no sliding window)")."""

import jax
import numpy as np
import pytest

from jaxquant import models
from jaxquant.models.common.hf_config import UnsupportedConfigError
from tests.models.hf_tiny import hf_logits


def _tiny_mistral(num_kv_heads, tied, sliding_window=None, seed=0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.MistralConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=1000000.0,
        tie_word_embeddings=tied, sliding_window=sliding_window,
    )
    model = tf.MistralForCausalLM(cfg).eval().float()
    with torch.no_grad():  # move the norm gains away from their all-ones init
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize(("num_kv_heads", "tied"), [(2, False), (4, True)], ids=["gqa", "mha_tied"])
def test_mistral_logits_match_transformers(tmp_path, num_kv_heads, tied):
    hf = _tiny_mistral(num_kv_heads, tied)
    hf.save_pretrained(tmp_path)
    m = models.load(tmp_path)
    assert m.config.num_kv_heads == num_kv_heads and m.config.tie_word_embeddings == tied
    tokens = np.random.default_rng(0).integers(0, 96, size=(2, 80)).astype(np.int32)
    ref = hf_logits(hf, tokens)
    fwd = jax.jit(models.forward, static_argnums=0, static_argnames="scan_layers")
    for scan in (True, False):
        ours, _ = fwd(m.config, m.params, tokens, scan_layers=scan)
        assert np.max(np.abs(np.asarray(ours) - ref)) <= 1e-4


def test_sliding_window_mistral_is_refused(tmp_path):
    _tiny_mistral(2, False, sliding_window=32).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedConfigError, match="sliding_window"):
        models.load(tmp_path)
