"""The sequential driver: claims (GPTQ < RTN, AWQ <= RTN), sharding, streaming memory, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from jaxquant import eval as jeval
from jaxquant import models
from jaxquant.calibration.capture import block_stats
from jaxquant.calibration.driver import ResumeMismatchError, calibrate
from jaxquant.recipes import load_recipe
from jaxquant.recipes.recipe import RecipeError
from tests.models.hf_tiny import make_hf_model


def _recipe(algo, bits=3, gs=32, n=8, seqlen=64, **opts):
    rule = {"pattern": r"layers/\d+/(self_attn|mlp)/\w+_proj", "algorithm": algo,
            "spec": {"bits": bits, "group_size": gs}}
    if opts:
        rule["options"] = opts
    return load_recipe({"name": f"{algo}_test", "rules": [rule],
                        "calibration": {"n_samples": n, "seqlen": seqlen, "batch_size": 4}})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    make_hf_model("llama", "mha", False, seed=11).save_pretrained(d)
    tokens = np.random.default_rng(0).integers(0, 96, size=(8, 64)).astype(np.int32)
    return d, models.load(d), tokens


@pytest.fixture(scope="module")
def runs(tiny):
    d, _, tokens = tiny
    return {a: calibrate(d, _recipe(a), tokens, progress=False) for a in ("rtn", "gptq", "awq")}


def _kl(m, res, tokens):
    return jeval.kl_divergence(jeval.model_logits_fn(m.config, m.params),
                               jeval.model_logits_fn(res.config, res.params), tokens,
                               progress=False)["kl"]


def test_gptq_beats_rtn_and_awq_not_worse(tiny, runs):
    _, m, tokens = tiny
    err = {a: np.mean([r.rel_error for r in res.report]) for a, res in runs.items()}
    assert err["gptq"] < 0.9 * err["rtn"], err
    assert err["awq"] <= err["rtn"] * 1.0001, err
    kl = {a: _kl(m, res, tokens) for a, res in runs.items()}
    assert kl["gptq"] < kl["rtn"] and kl["awq"] <= kl["rtn"] * 1.0001, kl


def test_quantized_params_are_qarrays_and_run_stacked(tiny, runs):
    import jaxquant as jq

    _, m, tokens = tiny
    p = runs["gptq"].params
    k = p["layers"]["mlp"]["down_proj"]["kernel"]
    assert isinstance(k, jq.QArray) and k.shape == (3, 96, 64) and k.spec.bits == 3
    a, _ = models.forward(m.config, p, tokens[:2], scan_layers=True)
    b, _ = models.forward(m.config, p, tokens[:2], scan_layers=False)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)
    assert len(runs["gptq"].report) == 3 * 7


def test_awq_fold_preserves_fp_function(tiny):
    """AWQ at 8 bits ≈ identity: if the scale fold were wrong, outputs would drift badly."""
    d, m, tokens = tiny
    res = calibrate(d, _recipe("awq", bits=8, gs=32, clip_search=False), tokens, progress=False)
    assert _kl(m, res, tokens) < 1e-4


def test_sharded_statistics_equal_single_device(tiny):
    _, m, tokens = tiny
    x = models.common.decoder.embed(m.params, jnp.asarray(tokens))
    pos = jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), tokens.shape)
    bp = models.layer_params(m.params, 0)
    mesh = Mesh(np.array(jax.devices("cpu")[:8]), ("data",))
    single = block_stats(m.config, bp, x, pos)
    sharded = block_stats(m.config, bp, x, pos, mesh=mesh)
    for k in single:
        for s in ("H", "absmax", "sum", "count"):
            np.testing.assert_allclose(np.asarray(sharded[k][s]), np.asarray(single[k][s]),
                                       rtol=2e-5, atol=2e-5 * float(jnp.max(single[k]["H"])))
    # and the statistics are what they claim: H = X^T X of the q/k/v input
    x2 = np.asarray(x, np.float64)
    assert np.asarray(single["self_attn/q_proj"]["count"]) == 8 * 64
    del x2


def test_streaming_never_holds_the_whole_fp_model(tmp_path):
    """Count live fp block kernels after every block: at most one block's worth."""
    make_hf_model("llama", "mha", True, seed=12).save_pretrained(tmp_path)
    cfg = models.load(tmp_path).config
    tokens = np.random.default_rng(1).integers(0, 96, size=(4, 32)).astype(np.int32)
    import gc

    live_fp_kernels = []

    def n_live():
        gc.collect()
        return sum(1 for a in jax.live_arrays()
                   if a.dtype == jnp.float32 and a.shape == (cfg.hidden_size, cfg.intermediate_size))

    baseline = n_live()  # arrays other tests in this process still hold

    live_tables = []
    tables0 = sum(1 for a in jax.live_arrays() if a.shape == (cfg.vocab_size, cfg.hidden_size))

    def count(b, info):
        live_fp_kernels.append(n_live() - baseline)
        live_tables.append(sum(1 for a in jax.live_arrays()
                               if a.shape == (cfg.vocab_size, cfg.hidden_size)))

    calibrate(tmp_path, _recipe("gptq", n=4, seqlen=32), tokens, progress=False,
              on_block_end=count)
    assert len(live_fp_kernels) == cfg.num_layers
    # a dense model would hold 2 such kernels (gate, up) per block: 6 for 3 blocks
    assert max(live_fp_kernels) <= 2, live_fp_kernels
    # nor the [V, D] embedding table: it is read to embed the tokens and again at the end
    assert max(live_tables) <= tables0, live_tables


def test_bad_calibration_inputs(tiny):
    d, _, tokens = tiny
    with pytest.raises(ValueError, match="shorter than the recipe asks for"):
        calibrate(d, _recipe("rtn", n=16), tokens, progress=False)
    bad = tokens.copy()
    bad[0, 0] = 96
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 96\)"):
        calibrate(d, _recipe("rtn"), bad, progress=False)


@pytest.mark.parametrize(
    ("recipe", "match"),
    [
        ({"rules": [{"pattern": ".*", "algorithm": "smoothquant9"}]}, "unknown algorithm"),
        ({"rules": [{"pattern": ".*", "algorithm": "rtn", "spec": {"bitz": 4}}]}, "bitz"),
        ({"rules": [{"pattern": ".*", "algorithm": "gptq", "options": {"dmp": 1}}]}, "dmp"),
        ({"rulez": []}, "rulez"),
        ({"rules": [{"pattern": "(", "algorithm": "rtn"}]}, "not a regex"),
        ({"rules": [{"pattern": ".*", "algorithm": "rtn", "spec": {"bits": 9}}]}, "bits"),
    ],
)
def test_bad_recipes(recipe, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(recipe)


def test_recipe_first_match_and_report():
    r = load_recipe({"rules": [
        {"pattern": r"layers/\d+/mlp/down_proj", "algorithm": "gptq", "spec": {"bits": 4}},
        {"pattern": r"layers/\d+/mlp/.*", "algorithm": "rtn", "spec": {"bits": 3}},
        {"pattern": r"vision/.*", "algorithm": "rtn", "spec": {"bits": 3}},
    ]})
    assert r.match("layers/0/mlp/down_proj").algorithm == "gptq"
    assert r.match("layers/0/mlp/up_proj").algorithm == "rtn"
    assert r.match("layers/0/self_attn/q_proj") is None
    unmatched, unused = r.report(["layers/0/mlp/down_proj", "layers/0/self_attn/q_proj"])
    assert unmatched == ["layers/0/self_attn/q_proj"]
    assert unused == [r"layers/\d+/mlp/.*", "vision/.*"]


def test_shipped_recipes_all_load():
    import os

    from jaxquant.recipes.recipe import RECIPE_DIR

    names = sorted(f[:-5] for f in os.listdir(RECIPE_DIR) if f.endswith(".yaml"))
    for algo in ("rtn", "gptq", "awq"):
        for bits in (4, 3, 2):
            for g in (64, 128):
                assert f"{algo}_w{bits}_g{g}" in names
    for n in names:
        r = load_recipe(n)
        assert r.rules and r.rules[0].spec.group_size in (64, 128)


def test_resume_mismatch_and_existing_output(tiny, tmp_path):
    d, _, tokens = tiny
    out = tmp_path / "run"
    calibrate(d, _recipe("rtn"), tokens, out_dir=out, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        calibrate(d, _recipe("rtn"), tokens, out_dir=out, progress=False)
    with pytest.raises(ResumeMismatchError, match="different recipe"):
        calibrate(d, _recipe("rtn", bits=4), tokens, out_dir=out, resume=True, progress=False)
    other = tokens.copy()
    other[0, 0] = (other[0, 0] + 1) % 96
    with pytest.raises(ResumeMismatchError, match="different calibration data"):
        calibrate(d, _recipe("rtn"), other, out_dir=out, resume=True, progress=False)
    d2 = tmp_path / "other_model"
    make_hf_model("llama", "mha", False, seed=99).save_pretrained(d2)
    with pytest.raises(ResumeMismatchError, match="different model"):
        calibrate(d2, _recipe("rtn"), tokens, out_dir=out, resume=True, progress=False)


def test_inf_activations_are_refused_not_written(tmp_path):
    import torch

    hf = make_hf_model("llama", "mha", False, seed=13)
    with torch.no_grad():  # block 1's MLP overflows float32: its output is inf
        hf.model.layers[1].mlp.up_proj.weight.mul_(1e30)
        hf.model.layers[1].mlp.down_proj.weight.mul_(1e30)
    hf.save_pretrained(tmp_path / "m")
    tokens = np.random.default_rng(4).integers(0, 96, size=(8, 64)).astype(np.int32)
    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"block [12]: .*(NaN/Inf)"):
        calibrate(tmp_path / "m", _recipe("rtn"), tokens, out_dir=out, progress=False)
    assert not (out / "progress" / "block_0002").exists()
