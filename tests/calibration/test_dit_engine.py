"""The calibration engine on a diffusion transformer (DiT block spec, trajectory batches) and the
W·A integer path of DiT linears.

Claims: (1) the integer path (per-token int8/int4 activation codes times integer weight codes,
XLA int8 GEMM and the Pallas TPU kernel in interpret mode) computes what the fake-quant path
computes (dequantize both, multiply in float) on a whole quantized DiT; (2) GPTQ through the
engine beats RTN on the DiT's output error on held-out trajectory inputs; (3) bad batches and
recipes are refused, naming the field.
"""

import jax
import numpy as np
import pytest

from jaxquant.calibration.engine import calibrate
from jaxquant.kernels.dispatch import kernel_mode
from jaxquant.models.dit.transformer import DiffusionTransformer
from jaxquant.models.loading import adapter_for
from jaxquant.nn.linear import ActQuant
from jaxquant.recipes import RecipeError, load_recipe
from tests.calibration.tiny_dit import make_tiny_dit, tiny_config

CFG = tiny_config(2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinydit")
    return make_tiny_dit(d, CFG)


def _recipe(algo, wbits, abits=None, mode="int"):
    act = {} if abits is None else {"activations": {"bits": abits, "mode": mode}}
    cond = {} if abits is None else {"activations": {"bits": 8, "mode": mode}}
    return load_recipe({"name": f"{algo}_w{wbits}", "rules": [
        {"pattern": r"layers/\d+/norm1/.*", "algorithm": "rtn",
         "spec": {"bits": 8, "group_size": -1, "symmetric": True}, **cond},
        {"pattern": r"layers/\d+/(attn1|ff)/.*", "algorithm": algo,
         "spec": {"bits": wbits, "group_size": -1, "symmetric": True}, **act}],
        "calibration": {"n_samples": 320, "seqlen": 1, "batch_size": 32}})


def _out(m, params, held):
    qm = DiffusionTransformer(m.config, params, m.path)
    return np.asarray(qm(held["latents"], timestep=held["timesteps"],
                         class_labels=held["class_labels"]))


def _acts(tree):
    if isinstance(tree, ActQuant):
        return [tree]
    if isinstance(tree, dict):
        return [a for v in tree.values() for a in _acts(v)]
    if isinstance(tree, list):
        return [a for v in tree for a in _acts(v)]
    return []


def _swap(tree, mode):
    if isinstance(tree, dict):
        return {k: (ActQuant(v.bits, v.clip_ratio, mode) if isinstance(v, ActQuant)
                    else _swap(v, mode)) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_swap(v, mode) for v in tree]
    return tree


@pytest.mark.parametrize("wbits,abits", [(8, 8), (4, 8), (4, 4)])
def test_integer_path_equals_fake_quant_path(tiny, wbits, abits):
    m, calib, held = tiny
    res = calibrate(adapter_for(m), _recipe("rtn", wbits, abits), calib, progress=False)
    acts = _acts(res.params)
    assert len(acts) == 2 * 9 and {a.bits for a in acts} == {8, abits}
    fake = _out(m, _swap(res.params, "fake"), held)
    integer = _out(m, res.params, held)  # XLA int8 GEMM on CPU
    with kernel_mode("interpret", interpret_platform="tpu"):
        pallas = _out(m, res.params, held)
    fp = _out(m, m.params, held)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    # equal up to float summation order; a last-bit difference can flip one per-token rounding
    # in a later layer, so the whole-model bound is relative to the quantization error itself
    q_err = rel(fake, fp)
    assert q_err > 1e-3  # quantization did something
    assert rel(integer, fake) < 0.25 * q_err, (rel(integer, fake), q_err)
    assert rel(pallas, fake) < 0.25 * q_err, (rel(pallas, fake), q_err)
    # one linear alone: no rounding downstream, so the paths agree to float precision
    bp = res.params["transformer_blocks"][0]["ff"]["net.0"]["proj"]
    x = np.random.default_rng(0).standard_normal((64, CFG.hidden_size)).astype(np.float32)
    from jaxquant.nn.linear import apply_linear

    one_int = np.asarray(apply_linear(x, bp))
    one_fake = np.asarray(apply_linear(x, _swap({"p": bp}, "fake")["p"]))
    np.testing.assert_allclose(one_int, one_fake, atol=1e-5 * np.abs(one_fake).max(), rtol=0)


def test_gptq_beats_rtn_on_the_dit_output(tiny):
    m, calib, held = tiny
    fp = _out(m, m.params, held)
    errs = {}
    for algo in ("rtn", "gptq"):
        res = calibrate(adapter_for(m), _recipe(algo, 3), calib, progress=False)
        errs[algo] = float(np.linalg.norm(_out(m, res.params, held) - fp) / np.linalg.norm(fp))
    assert errs["gptq"] < 0.85 * errs["rtn"], errs


def test_bad_dit_batches_and_recipes(tiny):
    m, calib, _ = tiny
    rec = _recipe("gptq", 8, 8)  # a recipe that needs data (RTN runs data-free)
    bad = {k: v for k, v in calib.items() if k != "timesteps"}
    with pytest.raises(ValueError, match="'timesteps'"):
        calibrate(adapter_for(m), rec, bad, progress=False)
    with pytest.raises(ValueError, match="'class_labels' must lie in"):
        calibrate(adapter_for(m), rec, {**calib, "class_labels": calib["class_labels"] + 11},
                  progress=False)
    with pytest.raises(ValueError, match="'latents' must be"):
        calibrate(adapter_for(m), rec, {**calib, "latents": calib["latents"][:, :, :7, :7]},
                  progress=False)
    with pytest.raises(ValueError, match="'timesteps' must lie in"):
        calibrate(adapter_for(m), rec, {**calib, "timesteps": calib["timesteps"] - 5000},
                  progress=False)
    base = {"name": "x", "rules": [{"pattern": ".*", "algorithm": "rtn",
                                    "spec": {"bits": 4, "symmetric": False}}]}
    with pytest.raises(RecipeError, match="symmetric 4- or 8-bit"):
        load_recipe({**base, "rules": [{**base["rules"][0], "activations": {"bits": 8}}]})
    with pytest.raises(RecipeError, match=r"activations: unknown key\(s\) \['bitz'\]"):
        load_recipe({**base, "rules": [{**base["rules"][0], "activations": {"bitz": 8}}]})
    with pytest.raises(RecipeError, match=r"ActQuant\.bits must be an integer in 2\.\.8"):
        load_recipe({**base, "rules": [{**base["rules"][0],
                                        "activations": {"bits": 9, "mode": "fake"}}]})
    sym = {"pattern": ".*", "algorithm": "rtn", "spec": {"bits": 4, "symmetric": True}}
    with pytest.raises(RecipeError, match=r"4 or 8 for mode 'int'.*use mode 'fake'"):
        load_recipe({**base, "rules": [{**sym, "activations": {"bits": 3}}]})


def test_smoothing_folds_leave_the_fp_block_unchanged(tiny):
    """SmoothQuant's exact folds on a DiT block: 1/s into the adaLN modulation's shift and scale
    chunks (before attention and before the MLP) and into to_v's columns (before to_out), s into
    the readers' rows: the fp block computes the same function (an algebraic identity)."""
    import jax.numpy as jnp

    from jaxquant.calibration.engine import fold_into_producer
    from jaxquant.models.blockspec import get_path, set_path
    from jaxquant.models.dit.model import block_params, dit_block_apply
    from jaxquant.models.dit.spec import dit_block_spec

    m, calib, _ = tiny
    spec = dit_block_spec(m.config)
    bp = jax.tree.map(jnp.asarray, block_params(m.params, 0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, CFG.hidden_size)),
                    jnp.float32)
    t, y = jnp.asarray([5.0, 300.0, 600.0, 999.0]), jnp.asarray([0, 3, 9, 10])
    ref = np.asarray(dit_block_apply(m.config, bp, x, t, y))
    g = np.random.default_rng(2)
    for stage in spec.stages:
        if stage.producer is None:
            continue
        s = jnp.asarray(g.uniform(0.3, 3.0, CFG.hidden_size), jnp.float32)
        bp = fold_into_producer(bp, stage.producer, 1.0 / s)
        for lin in stage.linears:
            bp = set_path(bp, f"{lin}/kernel", get_path(bp, f"{lin}/kernel") * s[:, None])
    assert {st.name for st in spec.stages if st.producer} == {"attn_in", "attn_out", "mlp_in"}
    out = np.asarray(dit_block_apply(m.config, bp, x, t, y))
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def test_online_hadamard_spreads_outliers_for_w4a4():
    """QuaRot's claim on one linear: with a few outlier input channels, rotating the input online
    (x Q, weight Qᵀ W quantized) gives a smaller W4A4 output error than quantizing as is."""
    import jax.numpy as jnp

    from jaxquant.algorithms.rtn import rtn as rtn_quantize
    from jaxquant.core.spec import QuantSpec
    from jaxquant.nn.linear import apply_linear, online_rotation

    g = np.random.default_rng(0)
    k, n = 128, 64
    x = g.standard_normal((256, k)).astype(np.float32)
    x[:, [3, 77]] *= 40.0  # outlier channels
    W = g.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
    Q = online_rotation(k, k)
    np.testing.assert_allclose(Q @ Q.T, np.eye(k), atol=1e-5)
    spec = QuantSpec(bits=4, group_size=-1, symmetric=True)
    exact = x @ W
    errs = {}
    for rot in (0, k):
        Wr = Q.T @ W if rot else W
        p = {"kernel": rtn_quantize(jnp.asarray(Wr), spec),
             "act": ActQuant(4, mode="fake", rotate=rot)}
        errs[rot] = float(np.linalg.norm(np.asarray(apply_linear(jnp.asarray(x), p)) - exact))
    assert errs[k] < 0.75 * errs[0], errs
