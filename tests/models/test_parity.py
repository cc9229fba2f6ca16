"""Logits parity with HF transformers for every family x {MHA, GQA, MQA} x {tied, untied}."""

import itertools

import jax
import numpy as np
import pytest

from jaxquant import models
from tests.models.hf_tiny import ATTENTION, FAMILIES, hf_logits, make_hf_model

CASES = list(itertools.product(FAMILIES, ATTENTION, [True, False]))


@pytest.mark.parametrize(("family", "attn", "tied"), CASES)
def test_logits_match_transformers(tmp_path, family, attn, tied):
    hf = make_hf_model(family, attn, tied)
    hf.save_pretrained(tmp_path)
    m = models.load(tmp_path)
    assert m.config.num_kv_heads == ATTENTION[attn] and m.config.tie_word_embeddings == tied
    tokens = np.random.default_rng(0).integers(0, 96, size=(2, 80)).astype(np.int32)
    ref = hf_logits(hf, tokens)
    fwd = jax.jit(models.forward, static_argnums=0, static_argnames="scan_layers")
    stacked, _ = fwd(m.config, m.params, tokens, scan_layers=True)
    looped, _ = fwd(m.config, m.params, tokens, scan_layers=False)
    assert np.max(np.abs(np.asarray(stacked) - ref)) <= 1e-4
    assert np.max(np.abs(np.asarray(looped) - ref)) <= 1e-4


def test_each_block_alone_matches_hf_hidden_states(tmp_path):
    import torch

    hf = make_hf_model("qwen3", "gqa", False)
    hf.save_pretrained(tmp_path)
    m = models.load(tmp_path)
    tokens = np.random.default_rng(1).integers(0, 96, size=(1, 40)).astype(np.int32)
    with torch.no_grad():
        hs = hf(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True).hidden_states
    positions = np.arange(40, dtype=np.int32)[None]
    for i in range(m.config.num_layers - 1):  # HF's last hidden state is after the final norm
        x = hs[i].numpy()
        y = models.block_apply(m.config, models.layer_params(m.params, i), x, positions)
        assert np.max(np.abs(np.asarray(y) - hs[i + 1].numpy())) <= 1e-4


def test_sharded_safetensors_checkpoint(tmp_path):
    hf = make_hf_model("qwen2", "gqa", False, seed=8)
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    m = models.load(tmp_path)
    tokens = np.random.default_rng(3).integers(0, 96, size=(1, 24)).astype(np.int32)
    ours, _ = models.forward(m.config, m.params, tokens)
    assert np.max(np.abs(np.asarray(ours) - hf_logits(hf, tokens))) <= 1e-4
