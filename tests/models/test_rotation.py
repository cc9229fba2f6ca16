"""Residual rotation (norm fusion + Hadamard rotation folded into the weights): the rotated fp
model computes the same function. Oracles: HF transformers' logits on tiny random models of every
family (tied and untied heads), and the unrotated model's logits on the real SmolLM2."""

import numpy as np
import pytest

from jaxquant import models
from jaxquant.models.assets import resolve_model_path
from jaxquant.models.loading import adapter_for
from jaxquant.models.rotation import RotatedAdapter, RotationSpec, rotate_block, rotate_params
from tests.models.hf_tiny import FAMILIES, hf_logits, make_hf_model
from tests.models.test_mistral import _tiny_mistral

TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 24)).astype(np.int32)


BLOCK, FULL = RotationSpec("block_hadamard", 16, seed=1), RotationSpec("hadamard", None, seed=2)
# every family, both head kinds and both rotation kinds, without the full product
CASES = [(f, tied, rot) for i, f in enumerate([*FAMILIES, "mistral"])
         for tied, rot in (((i % 2 == 0), BLOCK), ((i % 2 == 1), FULL))]


@pytest.mark.parametrize("family,tied,rot", CASES,
                         ids=[f"{f}-{'tied' if t else 'untied'}-{r.kind}" for f, t, r in CASES])
def test_rotated_model_logits_equal_hf(tmp_path, family, tied, rot):
    hf = _tiny_mistral(2, tied) if family == "mistral" else make_hf_model(family, "gqa", tied)
    hf.save_pretrained(tmp_path)
    want = hf_logits(hf, TOKENS)
    for source in (tmp_path, models.load(tmp_path)):  # streamed and in memory
        cfg, params = rotate_params(adapter_for(source), rot)
        assert not cfg.tie_word_embeddings
        got = np.asarray(models.forward(cfg, params, TOKENS)[0])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        # the transform did something: the stream's weights and norms changed
        ref = models.load(tmp_path).params
        assert not np.allclose(np.asarray(params["embed_tokens"]["embedding"]),
                               np.asarray(ref["embed_tokens"]["embedding"]))
        np.testing.assert_array_equal(np.asarray(params["layers"]["input_layernorm"]["scale"]), 1)


@pytest.mark.slow
def test_rotated_smollm2_logits_equal_unrotated():
    path = resolve_model_path("smollm2-135m")
    m = models.load(path)
    tokens = np.random.default_rng(1).integers(0, m.config.vocab_size, (1, 48)).astype(np.int32)
    want = np.asarray(models.forward(m.config, m.params, tokens)[0])
    for rot in (RotationSpec("block_hadamard", 64), RotationSpec("hadamard", None)):  # 576 = 72·8
        cfg, params = rotate_params(adapter_for(path), rot)
        got = np.asarray(models.forward(cfg, params, tokens)[0])
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_rotation_refuses_what_it_cannot_fuse(tmp_path):
    make_hf_model("llama", "mha", False).save_pretrained(tmp_path)
    ad = adapter_for(tmp_path)
    bp = ad.read_block(0)
    bp["post_attention_layernorm"]["bias"] = np.zeros_like(bp["post_attention_layernorm"]["scale"])
    with pytest.raises(ValueError, match=r"norm 'post_attention_layernorm' has a bias"):
        rotate_block(ad.spec, bp, np.eye(64))
    with pytest.raises(ValueError, match=r"rotation\.kind"):
        RotationSpec("givens")
    with pytest.raises(ValueError, match="block 48 must divide the order 64"):
        RotatedAdapter(ad, RotationSpec("block_hadamard", 48))


def test_recipe_rotation_through_the_engine_keeps_the_fp_function(tmp_path):
    """A recipe that rotates and keeps every linear fp: quantize_model's output (streamed,
    rotated block by block, top tensors assembled and the head untied) equals HF's logits."""
    import jaxquant as jq
    from jaxquant.recipes import load_recipe
    from jaxquant.recipes.recipe import RecipeError

    make_hf_model("qwen2", "gqa", True, seed=4).save_pretrained(tmp_path / "m")
    want = hf_logits(make_hf_model("qwen2", "gqa", True, seed=4), TOKENS)
    rec = load_recipe({"name": "rot_fp", "rules": [{"pattern": ".*", "algorithm": "none"}],
                       "rotation": {"kind": "block_hadamard", "block": 32, "seed": 3}})
    q = jq.quantize_model(tmp_path / "m", rec, None, progress=False)
    np.testing.assert_allclose(np.asarray(q(TOKENS)), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(RecipeError, match=r"rotation\.kind"):
        load_recipe({"rules": [{"pattern": ".*", "algorithm": "none"}],
                     "rotation": {"kind": "givens"}})
    with pytest.raises(RecipeError, match="rotation: unknown"):
        load_recipe({"rules": [{"pattern": ".*", "algorithm": "none"}], "rotation": {"blk": 3}})
