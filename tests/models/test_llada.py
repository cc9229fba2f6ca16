"""LLaDA model: parity with the public PyTorch LLaDA code, and the converter's refusals.

Oracle: ``$JAXQUANT_DATA/llada_tiny`` (a tiny random LLaDA saved by ``LLaDAModelLM`` and its
logits from the public ``modeling_llada.py``; see that folder's README). Refusal tests build
their config in the test and need no data.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant
from jaxquant import data as jdata
from jaxquant.models import llada
from jaxquant.models.common.hf_config import UnsupportedConfigError

DATA = jdata.data_dir()
LLADA_DIR = os.path.join(DATA, "llada_tiny") if DATA else None
needs_data = pytest.mark.skipif(
    LLADA_DIR is None or not os.path.isdir(LLADA_DIR),
    reason="set $JAXQUANT_DATA to the protocol data (with llada_tiny/)")
ATOL = 1e-4  # float32 logits; an independent float64 implementation agrees to 1e-5

# the tiny checkpoint's config.json, the fields LLaDA reads (for tests that need no data)
BASE_CONFIG = {
    "model_type": "llada", "architectures": ["LLaDAModelLM"], "block_type": "llama",
    "activation_type": "silu", "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "bias_for_layer_norm": False, "include_bias": False, "include_qkv_bias": False,
    "alibi": False, "rope": True, "rope_theta": 10000.0, "rope_full_precision": True,
    "attention_layer_norm": False, "input_emb_norm": False, "scale_logits": False,
    "block_group_size": 1, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2,
    "mlp_hidden_size": 128, "mlp_ratio": 4, "vocab_size": 256, "embedding_size": 256,
    "mask_token_id": 255, "eos_token_id": 1, "pad_token_id": 1, "weight_tying": False,
    "rms_norm_eps": 1e-5, "max_sequence_length": 128, "multi_query_attention": None,
}


@pytest.fixture(scope="module")
def model():
    return llada.load_llada(LLADA_DIR)


@pytest.fixture(scope="module")
def ref():
    return np.load(os.path.join(LLADA_DIR, "forward.npz"))


def _maxdiff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# -------------------------------------------------------------------- parity with the reference
@needs_data
def test_config_read_from_checkpoint(model):
    c = model.config
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.n_layers) == (64, 4, 2, 16, 2)
    assert (c.mlp_hidden_size, c.embedding_size, c.mask_token_id) == (128, 256, 255)
    assert not c.weight_tying
    assert model.params["blocks"]["q_proj"]["kernel"].shape == (2, 64, 64)  # [L, in, out]
    assert model.params["blocks"]["k_proj"]["kernel"].shape == (2, 64, 32)
    assert model.params["ff_out"]["kernel"].shape == (64, 256)


@needs_data
def test_logits_match_reference_with_padding_mask(model, ref):
    """Row 1 is left-padded (5 pads closed by the mask): every position's logits, pads included."""
    logits = model(ref["input_ids"], attention_mask=ref["attention_mask"])
    assert logits.dtype == jnp.float32 and logits.shape == (2, 20, 256)
    assert _maxdiff(logits, ref["logits"]) <= ATOL


@needs_data
def test_logits_match_reference_without_mask(model, ref):
    """No mask: the pads of row 1 are attended (the reference logits differ by up to 8.5)."""
    logits = model(ref["input_ids"])
    assert _maxdiff(logits, ref["logits_without_attention_mask"]) <= ATOL
    # the mask matters, so the masked comparison above can fail
    assert _maxdiff(logits[1], ref["logits"][1]) > 1.0


@needs_data
def test_forward_is_jittable_and_pure(model, ref):
    fn = jax.jit(llada.forward, static_argnums=0)
    ids = jnp.asarray(ref["input_ids"], jnp.int32)
    am = jnp.asarray(ref["attention_mask"], jnp.int32)
    assert _maxdiff(fn(model.config, model.params, ids, am), ref["logits"]) <= ATOL
    # the unstacked form (a list of blocks) runs the same network
    blocks = [llada.block_params(model.params, i) for i in range(model.config.n_layers)]
    listed = {**model.params, "blocks": blocks}
    assert _maxdiff(llada.forward(model.config, listed, ids, am), ref["logits"]) <= ATOL


@needs_data
def test_bidirectional_and_explicit_positions(model, ref):
    """Attention is not causal; RoPE follows the given positions, not the array index."""
    ids = np.asarray(ref["input_ids"][:1])
    changed = ids.copy()
    changed[0, -1] = 3 if ids[0, -1] != 3 else 4
    a, b = model(ids), model(changed)
    assert _maxdiff(a[0, 0], b[0, 0]) > 1e-2  # position 0 sees the last token
    # row 1 without its 5 pads, at its original positions 5..19, equals the padded run
    tail = ref["input_ids"][1:, 5:]
    pos = np.arange(5, 20)[None, :]
    assert _maxdiff(model(tail, positions=pos)[0], ref["logits"][1, 5:]) <= ATOL


@needs_data
def test_jaxquant_load_dispatches_to_llada(ref):
    m = jaxquant.load(LLADA_DIR)
    assert isinstance(m, llada.LLaDAModel)
    assert m.path == LLADA_DIR and m.config.mask_token_id == 255
    assert _maxdiff(m(ref["input_ids"], attention_mask=ref["attention_mask"]),
                    ref["logits"]) <= ATOL


# -------------------------------------------------------------------- refusals
def _write_config(tmp_path, cfg: dict) -> str:
    d = tmp_path / "llada"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("field,value", [
    ("alibi", True), ("layer_norm_type", "default"), ("layer_norm_type", "gemma_rms"),
    ("include_bias", True), ("include_qkv_bias", True), ("attention_layer_norm", True),
    ("input_emb_norm", True), ("scale_logits", True), ("block_type", "sequential"),
    ("activation_type", "swiglu"), ("rope", False), ("block_group_size", 2),
    ("bias_for_layer_norm", True), ("layer_norm_with_affine", False),
])
def test_converter_refuses_unimplemented_settings(tmp_path, field, value):
    path = _write_config(tmp_path, {**BASE_CONFIG, field: value})
    cfg_file = os.path.join(path, "config.json")
    with pytest.raises(ValueError, match=field) as e:
        llada.load_llada(path)
    assert cfg_file in str(e.value)
    assert isinstance(e.value, UnsupportedConfigError)


def test_converter_refuses_missing_mask_token_id(tmp_path):
    cfg = {k: v for k, v in BASE_CONFIG.items() if k != "mask_token_id"}
    path = _write_config(tmp_path, cfg)
    with pytest.raises(ValueError, match="mask_token_id") as e:
        llada.load_llada(path)
    assert os.path.join(path, "config.json") in str(e.value)
    with pytest.raises(ValueError, match="mask_token_id"):  # the front door refuses it too
        jaxquant.load(path)


def test_absent_field_takes_llada_default_and_is_refused(tmp_path):
    """A config without ``block_type`` gets LLaDA's default ('sequential'), not ours."""
    cfg = {k: v for k, v in BASE_CONFIG.items() if k != "block_type"}
    with pytest.raises(ValueError, match=r"'block_type' = 'sequential' \(absent"):
        llada.config_from_hf(cfg, source="x/config.json")


def test_config_reads_gqa_mqa_and_mlp_ratio():
    c = llada.config_from_hf(BASE_CONFIG)
    assert (c.n_kv_heads, c.mlp_hidden_size, c.head_dim) == (2, 128, 16)
    c = llada.config_from_hf({**BASE_CONFIG, "n_kv_heads": None, "multi_query_attention": True,
                              "mlp_hidden_size": None})
    assert (c.n_kv_heads, c.mlp_hidden_size) == (1, 4 * 64)
    with pytest.raises(ValueError, match="multi_query_attention"):
        llada.config_from_hf({**BASE_CONFIG, "multi_query_attention": True})
    assert llada.is_llada_config(BASE_CONFIG)
    assert not llada.is_llada_config({"model_type": "llama", "hidden_size": 64})


@needs_data
def test_converter_checks_tensors(tmp_path):
    """A checkpoint whose tensors disagree with its config is refused by tensor name."""
    d = tmp_path / "llada"
    d.mkdir()
    shutil.copyfile(os.path.join(LLADA_DIR, "model.safetensors"), d / "model.safetensors")
    with open(os.path.join(LLADA_DIR, "config.json")) as f:
        cfg = json.load(f)
    (d / "config.json").write_text(json.dumps({**cfg, "mlp_hidden_size": 96}))
    with pytest.raises(ValueError, match=r"blocks\.0\.ff_proj\.weight"):
        llada.load_llada(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "weight_tying": True}))
    with pytest.raises(ValueError, match=r"model\.transformer\.ff_out\.weight"):
        llada.load_llada(str(d))


def test_random_model_runs_with_tied_head():
    cfg = llada.config_from_hf({**BASE_CONFIG, "weight_tying": True})
    params = llada.init_params(cfg, jax.random.key(0))
    assert "ff_out" not in params
    ids = jnp.asarray([[3, 255, 7, 255]], jnp.int32)
    logits = llada.LLaDAModel(cfg, params)(ids)
    assert logits.shape == (1, 4, 256) and bool(jnp.all(jnp.isfinite(logits)))
