"""The calibration engine on a LLaDA masked-diffusion LM, and ``jaxquant generate`` for it.

Claims: (1) the block spec's stages and ``finish`` compute LLaDA's block; (2) GPTQ through the
engine, calibrated on masked windows, beats RTN on the model's logits for held-out masked inputs;
(3) the quantized model saves, loads and decodes with Elastic-dLLM compression (keep-all
compression = baseline decoding, for quantized weights too); (4) the CLI returns the library's
decode (prompt + generation) and the kept tokens per step; bad input is refused by name.
"""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant
from jaxquant.models import llada
from jaxquant.models.llada.spec import llada_block_spec, masked_calibration_batch
from jaxquant.recipes import load_recipe

MASK = 63
CFG = llada.LLaDAConfig(vocab_size=64, embedding_size=64, d_model=64, n_heads=4, n_kv_heads=4,
                        n_layers=2, mlp_hidden_size=128, mask_token_id=MASK,
                        max_sequence_length=256)


@pytest.fixture(scope="module")
def tiny():
    return llada.LLaDAModel(CFG, llada.init_params(CFG, jax.random.key(0)))


def _recipe(algo, bits=3):
    return load_recipe({"name": f"{algo}_w{bits}", "rules": [
        {"pattern": r"layers/\d+/\w+", "algorithm": algo,
         "spec": {"bits": bits, "group_size": 32, "symmetric": False}}],
        "calibration": {"n_samples": 64, "seqlen": 32, "batch_size": 16}})


def test_block_spec_stages_compute_the_llada_block(tiny):
    spec = llada_block_spec(CFG)
    bp = llada.block_params(tiny.params, 1)
    x = jax.random.normal(jax.random.key(1), (3, 10, CFG.d_model))
    pos = jnp.broadcast_to(jnp.arange(10), (3, 10))
    state = {"x": x}
    for st in spec.stages:
        state = st.fn(bp, state, {"positions": pos})
    got = spec.finish(bp, state, {"positions": pos})["x"]
    np.testing.assert_allclose(np.asarray(got),
                               np.asarray(llada.block_apply(CFG, bp, x, pos)), atol=1e-5)


def test_masked_calibration_batch_masks_each_sample_at_its_ratio():
    w = np.random.default_rng(0).integers(0, 60, (40, 400))
    b = masked_calibration_batch(w, [0.2, 0.5, 0.8, 1.0], mask_id=MASK, seed=3)
    frac = (b["tokens"] == MASK).mean(1)
    np.testing.assert_allclose(frac, b["mask_ratio"], atol=0.08)
    np.testing.assert_array_equal(b["group"], np.arange(40) % 4)
    keep = b["tokens"] != MASK
    np.testing.assert_array_equal(b["tokens"][keep], w[keep])
    with pytest.raises(ValueError, match="mask_ratios"):
        masked_calibration_batch(w, [0.0, 0.5], mask_id=MASK)


def test_gptq_beats_rtn_on_heldout_masked_inputs(tiny):
    rng = np.random.default_rng(0)
    calib = masked_calibration_batch(rng.integers(0, 60, (64, 32)), [0.25, 0.5, 0.75],
                                     mask_id=MASK, seed=0)
    held = masked_calibration_batch(rng.integers(0, 60, (16, 32)), [0.25, 0.5, 0.75],
                                    mask_id=MASK, seed=1)["tokens"]
    ref = np.asarray(tiny(held))
    errs = {}
    for algo in ("rtn", "gptq"):
        q = jaxquant.quantize_model(tiny, _recipe(algo), calib, progress=False)
        assert isinstance(q, llada.LLaDAModel)
        errs[algo] = float(np.mean((np.asarray(q(held)) - ref) ** 2))
    assert errs["gptq"] < 0.8 * errs["rtn"], errs


def test_quantized_llada_saves_loads_and_decodes_compressed(tiny, tmp_path):
    calib = masked_calibration_batch(np.random.default_rng(0).integers(0, 60, (64, 32)),
                                     [0.3, 0.7], mask_id=MASK)
    q = jaxquant.quantize_model(tiny, _recipe("gptq", 4), calib, tmp_path / "q", progress=False)
    back = jaxquant.load(tmp_path / "q")
    assert isinstance(back, llada.LLaDAModel)
    ids = np.array([[5, 17, 40, 9]])
    np.testing.assert_array_equal(np.asarray(back(ids)), np.asarray(q(ids)))
    kw = dict(gen_length=16, block_length=4, steps=8)
    base = np.asarray(back.generate(ids, **kw))
    np.testing.assert_array_equal(np.asarray(back.generate_compressed(ids, **kw)), base)
    comp, stats = back.generate_compressed(ids, keep_far=1, return_stats=True, **kw)
    assert (np.asarray(comp)[:, 4:] != MASK).all()
    assert stats["tokens_total"] < stats["tokens_full"]


def test_bad_llada_calibration_input_is_refused(tiny):
    with pytest.raises(ValueError, match="masked token windows"):
        jaxquant.quantize_model(tiny, _recipe("gptq"), "wikitext2", progress=False)
    with pytest.raises(ValueError, match=r"unknown field.*timesteps"):
        jaxquant.quantize_model(tiny, _recipe("gptq"), {"tokens": np.zeros((64, 32), int),
                                                        "timesteps": np.zeros(64)},
                                progress=False)


# -------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("llada_cli")
    llada.save_llada(d, CFG, tiny.params)
    return d


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "jaxquant.cli.main", "generate", *args],
                       capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "JAXQUANT_XLA_CACHE": ""})
    return r


def test_cli_generate_returns_the_library_decode(tiny, saved):
    r = _cli("--model", str(saved), "--prompt-ids", "5,17,40", "--gen-length", "16",
             "--block-length", "4", "--steps", "8", "--keep-far", "1", "--terminal-mask")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    ids, stats = tiny.generate_compressed(np.array([[5, 17, 40]]), gen_length=16,
                                          block_length=4, steps=8, keep_far=1,
                                          terminal_mask=True, return_stats=True)
    assert out["output_ids"] == np.asarray(ids)[0, :19].tolist()  # no terminal column
    assert out["kept_per_step"] == [int(k) for k in stats["tokens_per_step"]]
    assert out["steps"] == 8 and out["tokens_per_s"] > 0
    assert "block 4/4" in r.stderr  # progress per block


def test_cli_generate_refuses_bad_input_by_name(saved):
    r = _cli("--model", str(saved), "--prompt-ids", "5,17", "--gen-length", "16",
             "--block-length", "5")
    assert r.returncode == 2 and "block_length=5" in r.stderr
    r = _cli("--model", str(saved), "--prompt-ids", "5,17", "--gen-length", "300",
             "--block-length", "4")
    assert r.returncode == 2 and "max_sequence_length 256" in r.stderr
    r = _cli("--model", str(saved), "--prompt", "hi", "--gen-length", "8", "--block-length", "4")
    assert r.returncode == 2 and "tokenizer" in r.stderr
