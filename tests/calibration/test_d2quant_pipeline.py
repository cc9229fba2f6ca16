"""D²Quant inside the calibration engine: DAC's stored bias is the measured mean shift and
zeroes the calibration mean deviation (recomputed from the model's own forward and a float64
numpy RMSNorm), DSQ's channel-scale fold into up_proj preserves the function, the fold keeps the
model runnable stacked and looped, and a D²Quant model saves, loads, evaluates and generates
like any other quantized model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import eval as jeval
from jaxquant import models
from jaxquant.calibration.engine import calibrate as engine_calibrate
from jaxquant.models.common.decoder import attn_half, block_apply, embed
from jaxquant.models.loading import adapter_for
from jaxquant.models.quantized import load_quantized, save_quantized
from jaxquant.recipes import load_recipe
from jaxquant.recipes.recipe import RecipeError
from tests.models.hf_tiny import make_hf_model

ALL = r"layers/\d+/(self_attn|mlp)/\w+_proj"


def calibrate(model, recipe, tokens, **kw):
    return engine_calibrate(adapter_for(model), recipe, tokens, **kw)


def _recipe(down="gptq", dac=None, bits=2, gs=32, reference=None, **dsq_opts):
    rules = [{"pattern": r"layers/\d+/mlp/down_proj", "algorithm": down,
              "spec": {"bits": bits, "group_size": gs}},
             {"pattern": ALL, "algorithm": "gptq", "spec": {"bits": bits, "group_size": gs}}]
    if dsq_opts:
        rules[0]["options"] = dsq_opts
    d = {"name": "d2q_test", "rules": rules,
         "calibration": {"n_samples": 8, "seqlen": 64, "batch_size": 4}}
    if dac is not None:
        d["dac"] = dac
    if reference is not None:
        d["reference"] = reference
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


def _np_rms(x, g, eps):
    """RMSNorm without bias, float64 numpy: ``g ⊙ x / sqrt(mean(x²) + eps)``."""
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(g, np.float64)


def _mean_tokens(a):
    return a.reshape(-1, a.shape[-1]).mean(0)


@pytest.mark.parametrize("reference", ["same_input", "fp_prefix", "teacher"])
def test_dac_bias_is_the_measured_mean_shift(tiny, reference):
    """``teacher``: the recipe carries the fp model's stream (for GPTAQ) while DAC's teacher is
    the fp block on the quantized input (D²Quant's public code): one more partial pass."""
    d, m, tokens = tiny
    norms = (["input_layernorm", "post_attention_layernorm"] if reference == "fp_prefix"
             else ["post_attention_layernorm"])
    if reference == "teacher":
        rec = _recipe(dac={"norms": norms, "reference": "same_input"}, reference="fp_prefix")
        reference = "same_input"  # the oracle: fp attention on the same (quantized) input
    else:
        rec = _recipe(dac={"norms": norms, "reference": reference})
    res = calibrate(d, rec, tokens, progress=False)
    cfg = m.config
    eps = cfg.rms_norm_eps
    for b in range(cfg.num_layers):
        qb, fb = _block(res.params, b), _block(m.params, b)
        xq, pos = _inputs(cfg, res.params, tokens, b)
        xr = xq if reference == "same_input" else _inputs(cfg, m.params, tokens, b)[0]
        # the post-attention norm's input: fp block on the reference input, quantized block
        # (with its input-norm correction) on the quantized input; the norm itself in numpy
        g = qb["post_attention_layernorm"]["scale"]
        h_fp = _np_rms(attn_half(cfg, fb, xr, pos), fb["post_attention_layernorm"]["scale"], eps)
        h_q = _np_rms(attn_half(cfg, qb, xq, pos), g, eps)
        mu = _mean_tokens(h_fp - h_q)
        bias = np.asarray(qb["post_attention_layernorm"]["bias"], np.float64)
        assert np.abs(mu).max() > 1e-4  # the quantized attention did shift the mean
        np.testing.assert_allclose(bias, mu, atol=1e-5 + 1e-3 * np.abs(mu).max())
        # after the correction, the mean deviation on the calibration data is ~0
        assert np.abs(_mean_tokens(h_fp - (h_q + bias))).max() < 1e-3 * np.abs(mu).max() + 1e-5
        if reference == "fp_prefix":
            gi = qb["input_layernorm"]["scale"]
            mu_in = _mean_tokens(_np_rms(xr, fb["input_layernorm"]["scale"], eps)
                                 - _np_rms(xq, gi, eps))
            np.testing.assert_allclose(np.asarray(qb["input_layernorm"]["bias"]), mu_in,
                                       atol=1e-5 + 1e-3 * np.abs(mu_in).max())
        else:
            assert "bias" not in qb["input_layernorm"]
    dac_rows = [r for r in res.report if r.algorithm == "dac"]
    assert len(dac_rows) == cfg.num_layers * len(norms)


def test_dsq_fold_preserves_the_function_and_runs_stacked(tiny):
    """DSQ folds its per-channel scale s^c into up_proj's output channels and divides it out of
    down_proj's rows. At 8 bits the quantizer is near-exact, so the model must stay the fp model:
    a wrong fold (wrong side, wrong axis, applied twice) would move the logits far away."""
    d, m, tokens = tiny
    res = calibrate(d, _recipe("dsq_uniform", bits=8, gs=32), tokens, progress=False)
    fp = jeval.model_logits_fn(m.config, m.params)
    kl = jeval.kl_divergence(fp, jeval.model_logits_fn(m.config, res.params), tokens,
                             progress=False)["kl"]
    assert kl < 1e-3, kl
    p = res.params
    up, down = p["layers"]["mlp"]["up_proj"]["kernel"], p["layers"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(up, jq.QArray) and isinstance(down, jq.QArray)
    a, _ = models.forward(m.config, p, tokens[:2], scan_layers=True)
    b, _ = models.forward(m.config, p, tokens[:2], scan_layers=False)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def test_d2quant_model_saves_loads_evaluates_generates(tiny, tmp_path):
    from jaxquant import eval as jeval
    from jaxquant.models.common.generate import generate

    d, _, tokens = tiny
    res = calibrate(d, _recipe("dsq_uniform", dac={}), tokens, progress=False)
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
    r = _recipe("dsq_uniform", dac={"norms": ["input_layernorm", "post_attention_layernorm"],
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


def test_final_dac_is_the_mean_shift_of_its_teacher_stream(tiny):
    """dac.final: the last norm's bias is the mean over all calibration tokens of (teacher −
    quantized) at its output, the teacher being the stream through the quantized attention (with
    its DAC) and the fp MLPs, recomputed here from the model's own block halves."""
    from jaxquant.models.common.decoder import attn_half, mlp_half

    d, m, tokens = tiny
    res = calibrate(d, _recipe(dac={"final": True}), tokens, progress=False)
    cfg = m.config
    xq, pos = _inputs(cfg, res.params, tokens, cfg.num_layers)
    t = embed(m.params, jnp.asarray(tokens))
    for b in range(cfg.num_layers):
        qb, fb = _block(res.params, b), _block(m.params, b)
        r = attn_half(cfg, qb, t, pos)
        t = mlp_half(cfg, {"post_attention_layernorm": qb["post_attention_layernorm"],
                           "mlp": fb["mlp"]}, r)
    g = m.params["norm"]["scale"]
    mu = _mean_tokens(_np_rms(t, g, cfg.rms_norm_eps) - _np_rms(xq, g, cfg.rms_norm_eps))
    bias = np.asarray(res.params["norm"]["bias"], np.float64)
    assert np.abs(mu).max() > 1e-4
    np.testing.assert_allclose(bias, mu, atol=1e-5 + 1e-3 * np.abs(mu).max())
    np.testing.assert_array_equal(np.asarray(res.params["norm"]["scale"]), np.asarray(g))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"dac": {"reference": "fp"}}, "dac.reference"),
        ({"dac": {"bias": 1}}, "bias"),
        ({"dac": {}, "sequential": "block"}, "sequential"),
    ],
)
def test_bad_d2quant_recipes(extra, match):
    base = {"rules": [{"pattern": ALL, "algorithm": "gptq", "spec": {"bits": 2}}], **extra}
    with pytest.raises(RecipeError, match=match):
        load_recipe(base)


@pytest.mark.parametrize(
    ("dac", "match"),
    [({"norms": ["input_layernorm"]}, "needs reference fp_prefix"),
     ({"norms": ["final_norm"]}, r"dac.norms names 'final_norm', which is not a norm of this "
                                 r"block \(its norms: \['input_layernorm', "
                                 r"'post_attention_layernorm'\]\)")],
)
def test_dac_placement_checked_against_the_block_spec(tiny, dac, match):
    d, _, tokens = tiny
    with pytest.raises(ValueError, match=match):
        calibrate(d, _recipe(dac=dac), tokens, progress=False)


def test_bad_dsq_options_and_placement(tiny):
    for opts, name in (({"init": "zeros"}, "init"), ({"requant": "awq"}, "requant"),
                       ({"iters": -2}, "iters"), ({"itres": 2}, "itres")):
        with pytest.raises(RecipeError, match=name):
            load_recipe({"rules": [{"pattern": ALL, "algorithm": "dsq_uniform", "spec": {"bits": 2},
                                    "options": opts}]})
    d, _, tokens = tiny
    bad = load_recipe({"rules": [{"pattern": ALL, "algorithm": "dsq_uniform",
                                  "spec": {"bits": 2, "group_size": 32}}],
                       "calibration": {"n_samples": 8, "seqlen": 64}})
    with pytest.raises(ValueError, match="layers/0/self_attn/q_proj: the dsq_uniform algorithm "
                                         "folds .* role 'gated_mlp'"):
        calibrate(d, bad, tokens, progress=False)


def test_shipped_d2quant_recipes():
    for bits in (2, 3):
        r = load_recipe(f"d2quant_w{bits}_g64")  # the public code's defaults (methods.md §1.9)
        assert r.dac == {"norms": ("post_attention_layernorm",), "reference": "same_input",
                         "clip": 10.0, "final": True}
        assert r.reference == "fp_prefix" and r.dac_teacher
        assert r.rotation == {"kind": "block_hadamard", "block": 64, "seed": 0}
        down = r.match("layers/7/mlp/down_proj")
        assert down.algorithm == "dsq" and down.spec.bits == bits
        assert down.opts["iters"] == 15 and down.opts["backend"] == "gptaq"
        up = r.match("layers/7/mlp/up_proj")
        assert up.algorithm == "gptaq" and up.opts["gar"]
        u = load_recipe(f"d2quant_uniform_w{bits}_g64")  # our earlier reconstruction, kept
        assert u.match("layers/7/mlp/down_proj").algorithm == "dsq_uniform"
        # the paper's 128 x 2048 calibration: the same method, only the data differ
        big = load_recipe(f"d2quant_w{bits}_g64_c128x2048")
        assert (big.calib["n_samples"], big.calib["seqlen"]) == (128, 2048)
        assert (r.calib["n_samples"], r.calib["seqlen"]) == (32, 512)
        a, b = r.to_dict(), big.to_dict()
        for k in ("name", "calibration", "description"):
            a.pop(k, None), b.pop(k, None)
        assert a == b


def test_block_halves_compose_to_the_block(tiny):
    from jaxquant.models.common.decoder import attn_half, mlp_half

    _, m, tokens = tiny
    x = embed(m.params, jnp.asarray(tokens[:2]))
    pos = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2, 64))
    bp = models.layer_params(m.params, 1)
    whole = block_apply(m.config, bp, x, pos)
    halves = mlp_half(m.config, bp, attn_half(m.config, bp, x, pos))
    np.testing.assert_allclose(np.asarray(halves), np.asarray(whole), atol=1e-6)


def test_faithful_d2quant_saves_reloads_generates_through_the_kernels(tiny, tmp_path, caplog):
    """The public code's pipeline (rotation, GPTAQ + GAR, binary DSQ folded into up_proj, DAC with
    a same-input teacher) on a tiny model: the binary-coded down_proj survives save/reload and
    the reloaded model generates the same greedy tokens through the Pallas kernel path (TPU and
    GPU kernels, interpret mode; the binary down_proj included) as through XLA; a kernel that
    implements only the uniform grid (jax-triton) refuses the format with a logged reason."""
    import logging

    from jaxquant.core.qarray import QArray
    from jaxquant.kernels import dispatch
    from jaxquant.kernels.dispatch import kernel_mode
    from jaxquant.models.common.generate import generate

    d, _, tokens = tiny
    rec = load_recipe("d2quant_w3_g64").to_dict()
    rec["rules"] = [dict(r, spec=dict(r["spec"], group_size=32)) for r in rec["rules"]]
    rec["rotation"] = dict(rec["rotation"], block=32)
    rec["calibration"] = {"n_samples": 8, "seqlen": 64, "batch_size": 4}
    res = calibrate(d, load_recipe(rec), tokens, progress=False)
    down = _block(res.params, 0)["mlp"]["down_proj"]["kernel"]
    assert isinstance(down, QArray) and down.spec.codebook == "binary"
    assert down.scale.shape == (down.shape[0] // 32, down.shape[1], 3) and down.zero is None
    save_quantized(tmp_path / "q", res.config, res.params, recipe=rec)
    loaded = models.load(tmp_path / "q")
    a, _ = models.forward(res.config, res.params, tokens[:2])
    b, _ = models.forward(loaded.config, loaded.params, tokens[:2])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompt = jnp.asarray(tokens[:1, :8])
    toks, logits = {}, {}
    for mode, plat in (("xla", "tpu"), ("interpret", "tpu"), ("interpret", "gpu")):
        jax.clear_caches()  # inner jitted functions were traced under the previous mode
        with caplog.at_level(logging.INFO, logger="jaxquant.kernels.dispatch"), \
                kernel_mode(mode, interpret_platform=plat):
            # a fresh trace per mode: the dispatcher chooses at trace time
            gen = jax.jit(lambda p, t: generate(loaded.config, p, t, jax.random.PRNGKey(0),
                                                max_new_tokens=6))
            toks[(mode, plat)] = np.asarray(gen(loaded.params, prompt))
            fwd = jax.jit(lambda p, t: models.forward(loaded.config, p, t)[0])
            # 32 rows: the GPU kernel serves M <= 64 (a longer prefill goes to XLA by design)
            logits[(mode, plat)] = np.asarray(fwd(loaded.params, tokens[:1, :32]))
            jaxpr = str(jax.make_jaxpr(lambda p, t: models.forward(loaded.config, p, t)[0])(
                loaded.params, tokens[:1, :32]))
        # every linear, the binary-coded down_proj included, takes the kernel in interpret mode
        n_calls = jaxpr.count("pallas_call")
        assert (n_calls > 0) == (mode == "interpret")
        if mode == "interpret":
            assert "_bc_" in jaxpr, "the binary-coded kernel is not on the path"
            assert "XLA fallback" not in caplog.text, caplog.text
    ref = toks[("xla", "tpu")]
    assert ref.shape == (1, 6)
    for k, v in toks.items():
        np.testing.assert_array_equal(v, ref, err_msg=str(k))
        np.testing.assert_allclose(logits[k], logits[("xla", "tpu")], atol=1e-4, rtol=1e-4)
    ok, why = dispatch.can_use_jax_triton(tokens[:1, :down.shape[0]].astype(np.float32), down,
                                          "cuda")
    assert not ok and "uniform codebook" in why
