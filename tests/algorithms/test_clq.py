"""CLQ's cross-layer parameter search (jaxquant.algorithms.clq).

Claims: (1) the traced-clip weight quantizer gives exactly the codes of ``quantize`` with that
clip ratio; (2) on a small two-layer network CLPS returns the brute-force optimum: a numpy loop
over the grid (its own 4-bit weight and per-token activation quantizers, its own forward) picks
the target point where the unsearched quantizer's error peaks and the candidate minimising the
error there; (3) the target is the most sensitive downstream point, not the layer's own output,
and the choice can differ from a search on the own output; (4) bad settings are refused by name.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.algorithms.clq import clps_search, fake_quant_weight, select
from jaxquant.core.qarray import dequantize, quantize
from jaxquant.core.spec import QuantSpec
from jaxquant.nn.linear import apply_linear

SPEC = QuantSpec(bits=4, group_size=-1, symmetric=True)


@pytest.mark.parametrize("clip", [1.0, 0.9, 0.73])
@pytest.mark.parametrize("gs", [-1, 16])
def test_traced_clip_matches_quantize(clip, gs):
    W = jax.random.normal(jax.random.PRNGKey(0), (64, 24))
    spec = dataclasses.replace(SPEC, group_size=gs)
    ref = dequantize(quantize(W, dataclasses.replace(spec, clip_ratio=clip)), dtype=jnp.float32)
    got = jax.jit(lambda w, c: fake_quant_weight(w, spec, c))(W, jnp.float32(clip))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- a two-layer toy and its oracle
def _np_wq(W, clip, bits=4):
    """numpy symmetric per-output-channel min-max weight quantizer (GPTQ's grid)."""
    maxq = 2**bits - 1
    amax = np.maximum(np.abs(W).max(0, keepdims=True), 1e-12) * clip
    s = 2 * amax / maxq
    z = 2 ** (bits - 1)
    return s * (np.clip(np.round(W / s) + z, 0, maxq) - z)


def _np_aq(x, clip, bits=4):
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(x).max(-1, keepdims=True) * clip
    s = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.round(x / s), -qmax, qmax) * s


def _np_points(x, W1, b1, W2, W3, wc=None, ac=None):
    h = (_np_aq(x, ac) if ac else x) @ (_np_wq(W1, wc) if wc else W1) + b1
    a = np.tanh(h)
    y = a @ W2
    return [h, y, x[:, :W3.shape[1]] + y @ W3]


def _run(params, inputs):
    x = inputs
    h = apply_linear(x, params["l1"])
    y = apply_linear(jnp.tanh(h), params["l2"])
    return [h, y, x[:, :params["l3"]["kernel"].shape[1]] + apply_linear(y, params["l3"])]


def _toy(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(96, 48)).astype(np.float32)
    x[:, [3, 17]] *= 12.0  # outlier channels: clipping the activations pays
    W1 = (rng.standard_t(3, size=(48, 32)) * 0.15).astype(np.float32)  # heavy-tailed weights
    b1 = (rng.normal(size=32) * 0.1).astype(np.float32)
    W2 = (rng.normal(size=(32, 40)) * 0.3).astype(np.float32)
    W3 = (rng.normal(size=(40, 40)) * 0.1).astype(np.float32)
    params = {"l1": {"kernel": jnp.asarray(W1), "bias": jnp.asarray(b1)},
              "l2": {"kernel": jnp.asarray(W2)}, "l3": {"kernel": jnp.asarray(W3)}}
    return x, W1, b1, W2, W3, params


GRID_W = (1.0, 0.9, 0.8, 0.7)
GRID_A = (1.0, 0.85, 0.7, 0.55, 0.4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("downstream", ["max", "first", "last"])
def test_clps_finds_the_brute_force_optimum(seed, downstream):
    x, W1, b1, W2, W3, params = _toy(seed)
    res = clps_search(_run, params, jnp.asarray(x), ["l1"], SPEC, 4, GRID_W, GRID_A,
                      downstream=downstream, cost="rel")
    x64 = x.astype(np.float64)
    Y = _np_points(x64, W1, b1, W2, W3)

    def errs(wc, ac):
        Yh = _np_points(x64, W1, b1, W2, W3, wc, ac)
        return np.array([np.sum((a - b) ** 2) / np.sum(b**2) for a, b in zip(Yh, Y, strict=True)])

    base = errs(1.0, 1.0)
    target = {"max": int(np.argmax(base)), "first": 0, "last": 2}[downstream]
    table = {(w, a): errs(w, a)[target] for w in GRID_W for a in GRID_A}
    best = min(table.values())
    assert res.target == target
    # the chosen candidate is the brute-force optimum, up to near-ties: float32 (jax) and
    # float64 (numpy) round a few values at a grid boundary differently (~1% of an error)
    ranked = sorted(table, key=table.get)
    assert table[(res.weight_clip, res.act_clip)] <= best * 1.02 + 1e-9, (res, ranked[:3])
    np.testing.assert_allclose(res.base, base, rtol=3e-2, atol=1e-7)
    # searching pays at the most sensitive point (at the own output l = r = 1 may be optimal)
    assert best < base[target] if downstream == "max" else best <= base[target]


def test_target_is_the_peak_downstream_point_not_the_own_output():
    errors = np.array([[0.30, 0.10, 0.02],   # own output best, downstream poor
                       [0.35, 0.05, 0.01]])  # worse own output, best where it matters
    base = np.array([0.4, 0.2, 0.03])  # the error peaks... at the own output here
    assert select(errors, base, "max") == (0, 0)
    base = np.array([0.1, 0.2, 0.03])  # ...and here downstream (point 1)
    assert select(errors, base, "max") == (1, 1)
    assert select(errors, base, "first") == (0, 0)
    assert select(errors, base, "last") == (1, 2)


def test_bad_settings_are_refused():
    x, *_, params = _toy(0)
    with pytest.raises(ValueError, match="downstream"):
        clps_search(_run, params, jnp.asarray(x), ["l1"], SPEC, 4, GRID_W, GRID_A,
                    downstream="peak")
    with pytest.raises(ValueError, match="cost"):
        clps_search(_run, params, jnp.asarray(x), ["l1"], SPEC, 4, GRID_W, GRID_A, cost="l1")
    with pytest.raises(ValueError, match=r"ratios in \(0, 1\]"):
        clps_search(_run, params, jnp.asarray(x), ["l1"], SPEC, 4, (1.2,), GRID_A)
    with pytest.raises(ValueError, match="min-max uniform"):
        fake_quant_weight(jnp.ones((8, 4)), dataclasses.replace(SPEC, scale_method="mse",
                                                                   clip_ratio=0.8), 1.0)
