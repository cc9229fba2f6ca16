"""The Shakespeare masked-diffusion LM pieces: byte tokenizer, held-out split, the LLaDA objective,
the LLaDA HF writer, and a short training run.

Oracles: Python's own UTF-8 bytes and ``transformers.AutoTokenizer`` (tokenizer), the public
LLaDA checkpoint ``llada_tiny`` (the writer must reproduce its tensors and config fields), a
uniform predictor whose loss is ``log V`` in expectation (the ``1/p`` weighting), and the
uniform bound ``log V`` that training must beat on held-out text.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant import data as jdata
from jaxquant.data import shakespeare as sh
from jaxquant.diffusion import masked_objective as mo
from jaxquant.models import llada

DATA = jdata.data_dir()
needs_data = pytest.mark.skipif(
    DATA is None or not os.path.isdir(os.path.join(DATA, "shakespeare")),
    reason="set $JAXQUANT_DATA to the protocol data (with shakespeare/ and llada_tiny/)")


def test_byte_tokenizer_loads_in_transformers_and_maps_each_byte(tmp_path):
    from transformers import AutoTokenizer

    sh.write_byte_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "HAMLET.\n  To be, or not to be: that is the question~\t\x01 é"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text
    assert tok.convert_tokens_to_ids("<|mdm_mask|>") == sh.MASK_ID
    assert tok.eos_token_id == sh.EOS_ID
    assert sh.decode([*b"ab", sh.MASK_ID, *b"c", sh.EOS_ID, *b"zz"]) == "ab_c"


@needs_data
def test_heldout_plays_stay_out_of_training():
    train = sh.corpus("train")
    held = sh.plays("heldout")
    assert sorted(held) == sorted(sh.HELDOUT)
    tb = train[train < 256].astype(np.uint8).tobytes()
    for line in (b"Alas, poor Yorick", b"O brave new world", b"To be, or not to be"):
        assert line not in tb
    assert (train == sh.EOS_ID).sum() == 40  # 42 texts, 2 held out, one eos after each
    w = sh.heldout_windows(64, 5)
    hb = "".join(held.values()).encode()
    assert all(bytes(r.astype(np.uint8).tolist()) in hb for r in w if (r < 256).all())


def _uniform_fn(v):
    def fn(params, ids, attention_mask=None, positions=None):
        return jnp.zeros((*ids.shape, v), jnp.float32)
    return fn


def test_llada_loss_weights_masked_tokens_by_inverse_ratio():
    """A uniform predictor has cross-entropy log V on every masked token; weighting by 1/p makes
    the expected loss log V whatever the ratio (the unweighted mean would be log V / 2)."""
    v = 50
    ids = jnp.asarray(np.random.default_rng(0).integers(0, v - 1, (64, 32)))
    losses = [float(mo.llada_loss(_uniform_fn(v), None, ids, jax.random.key(i), mask_id=v - 1))
              for i in range(64)]
    assert abs(np.mean(losses) - np.log(v)) < 0.05 * np.log(v)
    b = mo.nll_bound(_uniform_fn(v), None, np.asarray(ids), mask_id=v - 1, n_t=8)
    assert abs(b["nll_bound"] - np.log(v)) < 0.03 * np.log(v)
    for ce in b["masked_ce"].values():
        assert ce == pytest.approx(np.log(v), rel=1e-5)


def test_mask_tokens_masks_at_the_requested_ratio():
    ids = jnp.zeros((4, 4000), jnp.int32)
    p = jnp.asarray([0.1, 0.4, 0.7, 1.0])
    noisy, m = mo.mask_tokens(jax.random.key(0), ids, p, 9)
    np.testing.assert_allclose(np.asarray(m).mean(1), np.asarray(p), atol=0.03)
    assert (np.asarray(noisy)[np.asarray(m)] == 9).all()


@needs_data
def test_writer_reproduces_the_public_llada_checkpoint(tmp_path):
    from safetensors.numpy import load_file

    src = os.path.join(DATA, "llada_tiny")
    m = llada.load_llada(src)
    llada.save_llada(tmp_path, m.config, m.params)
    ref, got = load_file(os.path.join(src, "model.safetensors")), \
        load_file(os.path.join(tmp_path, "model.safetensors"))
    assert sorted(ref) == sorted(got)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k].astype(np.float32), err_msg=k)
    with open(os.path.join(src, "config.json")) as f:
        ref_cfg = json.load(f)
    with open(os.path.join(tmp_path, "config.json")) as f:
        got_cfg = json.load(f)
    for k, v in got_cfg.items():
        if k in ref_cfg and k not in ("mlp_ratio", "dtype", "transformers_version"):
            assert ref_cfg[k] == v, k
    again = llada.load_llada(tmp_path)
    ids = np.arange(20)[None] % m.config.vocab_size
    np.testing.assert_array_equal(np.asarray(again(ids)), np.asarray(m(ids)))


def test_writer_refuses_nan_weights(tmp_path):
    cfg = llada.LLaDAConfig(vocab_size=16, embedding_size=16, d_model=8, n_heads=2,
                            n_kv_heads=2, n_layers=1, mlp_hidden_size=8, mask_token_id=15)
    p = llada.init_params(cfg, jax.random.key(0))
    p["ln_f"]["scale"] = p["ln_f"]["scale"].at[0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"ln_f.*NaN"):
        llada.save_llada(tmp_path, cfg, p)


@needs_data
def test_short_training_beats_the_uniform_bound_on_heldout_text():
    from jaxquant.diffusion.train_shakespeare import train

    cfg = llada.LLaDAConfig(vocab_size=258, embedding_size=258, d_model=32, n_heads=2,
                            n_kv_heads=2, n_layers=1, mlp_hidden_size=64, mask_token_id=257,
                            max_sequence_length=96)
    params, curve, _ = train(sh.corpus("train"), cfg=cfg, steps=100, batch_size=8, seq_len=64,
                             lr=5e-3, log=lambda *_: None)
    b = mo.nll_bound(llada.LogitsFn(cfg), params, sh.heldout_windows(64, 16), mask_id=257,
                     n_t=4)
    # uniform over the bytes: log 258 = 5.55 nats; byte unigram statistics alone give ~3.3
    assert b["nll_bound"] < 0.75 * np.log(258)
    assert curve[-1] < curve[0]
