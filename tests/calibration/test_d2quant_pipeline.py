"""D²Quant inside the calibration driver: DAC's stored bias is the measured mean shift and
zeroes the calibration mean deviation (independent recomputation from the model's forward), DSQ
never ends above GPTQ on the same layer, the fold keeps the model runnable stacked and looped,
and a D²Quant model saves, loads, evaluates and generates like any other quantized model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import models
from jaxquant.calibration.capture import run_block_capture
from jaxquant.models.quantized import load_quantized, save_quantized
from jaxquant.calibration.driver import calibrate
from jaxquant.models.common.decoder import block_apply, embed
from jaxquant.recipes import load_recipe
from jaxquant.recipes.recipe import RecipeError
from tests.models.hf_tiny import make_hf_model

ALL = r"layers/\d+/(self_attn|mlp)/\w+_proj"


def _recipe(down="gptq", dac=None, sequential="attn_mlp", bits=2, **dsq_opts):
    rules = [{"pattern": r"layers/\d+/mlp/down_proj", "algorithm": down,
              "spec": {"bits": bits, "group_size": 32}},
             {"pattern": ALL, "algorithm": "gptq", "spec": {"bits": bits, "group_size": 32}}]
    if dsq_opts:
        rules[0]["options"] = dsq_opts
    d = {"name": "d2q_test", "rules": rules, "sequential": sequential,
         "calibration": {"n_samples": 8, "seqlen": 64, "batch_size": 4}}
    if dac is not None:
        d["dac"] = dac
    return load_recipe(d)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("d2q")
    make_hf_model("llama", "gqa", False, seed=21).save_pretrained(d)
    tokens = np.random.default_rng(2).integers(0, 96, size=(8, 64)).astype(np.int32)
    return d, models.load(d), tokens


def _block(params, i):
    layers = params["layers"]
    return layers[i] if isinstance(layers, list) else models.layer_params(params, i)


def _inputs(cfg, params, tokens, upto):
    """The input of block ``upto`` on the path ``params`` (recomputed from the embeddings)."""
    x = embed(params, jnp.asarray(tokens))
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    for i in range(upto):
        x = block_apply(cfg, _block(params, i), x, pos)
    return x, pos


def _norm_out(cfg, bp, x, pos, key):
    return run_block_capture(cfg, bp, x, pos)[1][key].astype(jnp.float32)


def _without_bias(bp, norm):
    bp = dict(bp)
    bp[norm] = {"scale": bp[norm]["scale"]}
    return bp


@pytest.mark.parametrize("reference", ["same_input", "fp_prefix"])
def test_dac_bias_is_the_measured_mean_shift(tiny, reference):
    d, m, tokens = tiny
    norms = (["post_attention_layernorm"] if reference == "same_input"
             else ["input_layernorm", "post_attention_layernorm"])
    res = calibrate(d, _recipe(dac={"norms": norms, "reference": reference}), tokens,
                    progress=False)
    cfg = m.config
    for b in range(cfg.num_layers):
        qb, fb = _block(res.params, b), _block(m.params, b)
        xq, pos = _inputs(cfg, res.params, tokens, b)
        xr = xq if reference == "same_input" else _inputs(cfg, m.params, tokens, b)[0]
        # fp reference path; quantized path with the post-attention bias removed
        key = "mlp/gate_proj"
        h_fp = _norm_out(cfg, fb, xr, pos, key)
        h_q = _norm_out(cfg, _without_bias(qb, "post_attention_layernorm"), xq, pos, key)
        mu = np.asarray(jnp.mean((h_fp - h_q).reshape(-1, h_fp.shape[-1]), axis=0))
        bias = np.asarray(qb["post_attention_layernorm"]["bias"])
        assert np.abs(mu).max() > 1e-4  # the quantized attention did shift the mean
        np.testing.assert_allclose(bias, mu, atol=1e-5 + 1e-3 * np.abs(mu).max())
        # after the correction, the mean deviation on the calibration data is ~0
        dev = np.asarray(jnp.mean((h_fp - _norm_out(cfg, qb, xq, pos, key)).reshape(
            -1, h_fp.shape[-1]), axis=0))
        assert np.abs(dev).max() < 1e-3 * np.abs(mu).max() + 1e-6, (b, np.abs(dev).max())
        if reference == "fp_prefix":
            key = "self_attn/q_proj"
            h_fp = _norm_out(cfg, fb, xr, pos, key)
            h_q = _norm_out(cfg, _without_bias(qb, "input_layernorm"), xq, pos, key)
            mu_in = np.asarray(jnp.mean((h_fp - h_q).reshape(-1, h_fp.shape[-1]), axis=0))
            np.testing.assert_allclose(np.asarray(qb["input_layernorm"]["bias"]), mu_in,
                                       atol=1e-5 + 1e-3 * np.abs(mu_in).max())
        else:
            assert "bias" not in qb["input_layernorm"]
    dac_rows = [r for r in res.report if r.algorithm == "dac"]
    assert len(dac_rows) == cfg.num_layers * len(norms)


def test_dsq_layer_error_not_above_gptq_and_fold_runs(tiny):
    d, m, tokens = tiny
    runs = {down: calibrate(d, _recipe(down), tokens, progress=False) for down in ("gptq", "dsq")}
    err = {k: {r.layer: r.rel_error for r in v.report} for k, v in runs.items()}
    # block 0 sees identical inputs in both runs (attention is quantized the same way), and DSQ
    # starts from s^c = 1, i.e. from GPTQ, with a monotone objective
    assert err["dsq"]["layers/0/mlp/down_proj"] <= err["gptq"]["layers/0/mlp/down_proj"] * 1.0001
    for k in ("layers/0/self_attn/q_proj", "layers/0/mlp/up_proj"):
        assert err["dsq"][k] == pytest.approx(err["gptq"][k], rel=1e-6)
    p = runs["dsq"].params
    up, down = p["layers"]["mlp"]["up_proj"]["kernel"], p["layers"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(up, jq.QArray) and isinstance(down, jq.QArray)
    a, _ = models.forward(m.config, p, tokens[:2], scan_layers=True)
    b, _ = models.forward(m.config, p, tokens[:2], scan_layers=False)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_d2quant_model_saves_loads_evaluates_generates(tiny, tmp_path):
    from jaxquant import eval as jeval
    from jaxquant.models.common.generate import generate

    d, _, tokens = tiny
    res = calibrate(d, _recipe("dsq", dac={}), tokens, progress=False)
    save_quantized(tmp_path / "q", res.config, res.params, recipe={"name": "d2q_test"})
    _, params, _ = load_quantized(tmp_path / "q")
    bias = params["layers"]["post_attention_layernorm"]["bias"]
    np.testing.assert_array_equal(np.asarray(bias),
                                  np.asarray(res.params["layers"]["post_attention_layernorm"]
                                             ["bias"]))
    assert float(jnp.abs(bias).max()) > 0
    loaded = models.load(tmp_path / "q")
    a, _ = models.forward(res.config, res.params, tokens[:2])
    b, _ = models.forward(loaded.config, loaded.params, tokens[:2])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ppl = jeval.perplexity(jeval.model_logits_fn(loaded.config, loaded.params), tokens[:2],
                           progress=False)["ppl"]
    assert np.isfinite(ppl)
    out = generate(loaded.config, loaded.params, jnp.asarray(tokens[:1, :8]),
                   jax.random.PRNGKey(0), max_new_tokens=5)
    # greedy continuation equals the argmax of the full forward (the KV cache saw the bias too)
    seq = np.concatenate([tokens[:1, :8], np.asarray(out)], axis=1)
    lg, _ = models.forward(loaded.config, loaded.params, seq)
    np.testing.assert_array_equal(np.asarray(jnp.argmax(lg[0, 7:-1], -1)), np.asarray(out[0]))


def test_fp_prefix_dac_resumes_bit_identically(tiny, tmp_path):
    d, _, tokens = tiny
    r = _recipe("dsq", dac={"norms": ["input_layernorm", "post_attention_layernorm"],
                            "reference": "fp_prefix"}, iters=2)
    full = calibrate(d, r, tokens, progress=False)

    class Stop(Exception):
        pass

    def stop_after_first(b, info):
        if b == 0:
            raise Stop

    with pytest.raises(Stop):
        calibrate(d, r, tokens, out_dir=tmp_path / "run", progress=False,
                  on_block_end=stop_after_first)
    resumed = calibrate(d, r, tokens, out_dir=tmp_path / "run", resume=True, progress=False)
    assert resumed.resumed_from == 1
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"dac": {"norms": ["input_layernorm"]}}, "fp_prefix"),
        ({"dac": {"reference": "fp"}}, "dac.reference"),
        ({"dac": {"norms": ["final_norm"]}}, "dac.norms"),
        ({"dac": {"bias": 1}}, "bias"),
        ({"dac": {}, "sequential": "block"}, "attn_mlp"),
        ({"sequential": "layer"}, "sequential"),
    ],
)
def test_bad_d2quant_recipes(extra, match):
    base = {"rules": [{"pattern": ALL, "algorithm": "gptq", "spec": {"bits": 2}}], **extra}
    with pytest.raises(RecipeError, match=match):
        load_recipe(base)


def test_bad_dsq_options_and_placement(tiny):
    for opts, name in (({"init": "zeros"}, "init"), ({"requant": "awq"}, "requant"),
                       ({"iters": -2}, "iters"), ({"itres": 2}, "itres")):
        with pytest.raises(RecipeError, match=name):
            load_recipe({"rules": [{"pattern": ALL, "algorithm": "dsq", "spec": {"bits": 2},
                                    "options": opts}]})
    d, _, tokens = tiny
    bad = load_recipe({"rules": [{"pattern": ALL, "algorithm": "dsq",
                                  "spec": {"bits": 2, "group_size": 32}}],
                       "calibration": {"n_samples": 8, "seqlen": 64}})
    with pytest.raises(ValueError, match="self_attn/q_proj: the dsq algorithm applies to "
                                         "mlp/down_proj only"):
        calibrate(d, bad, tokens, progress=False)


def test_shipped_d2quant_recipes():
    for bits in (2, 3):
        r = load_recipe(f"d2quant_w{bits}_g64")
        assert r.staged and r.dac == {"norms": ("post_attention_layernorm",),
                                      "reference": "same_input"}
        down = r.match("layers/7/mlp/down_proj")
        assert down.algorithm == "dsq" and down.spec.bits == bits
        assert r.match("layers/7/mlp/up_proj").algorithm == "gptq"


def test_block_halves_compose_to_the_block(tiny):
    from jaxquant.models.common.decoder import attn_half, mlp_half

    _, m, tokens = tiny
    x = embed(m.params, jnp.asarray(tokens[:2]))
    pos = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 64))
    bp = models.layer_params(m.params, 1)
    whole = block_apply(m.config, bp, x, pos)
    halves = mlp_half(m.config, bp, attn_half(m.config, bp, x, pos))
    np.testing.assert_allclose(np.asarray(halves), np.asarray(whole), atol=1e-6)
