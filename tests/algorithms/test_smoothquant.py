"""SmoothQuant: the fold is an identity, and it makes per-token W8A8 more accurate on outliers."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.algorithms.smoothquant import apply_smoothing, smoothquant_scales
from jaxquant.core import fake_quant_per_token


def _outlier_acts(seed=0, t=256, k=128):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((t, k)).astype(np.float32)
    X[:, [3, 17, 40]] *= 60.0  # a few outlier channels, as in LLM activations
    return jnp.asarray(X)


def test_smoothing_preserves_the_product():
    X = _outlier_acts()
    W = jnp.asarray(np.random.default_rng(1).standard_normal((128, 32)).astype(np.float32))
    s = smoothquant_scales(jnp.max(jnp.abs(X), axis=0), [W], alpha=0.5)
    Xs, Ws = apply_smoothing(X, W, s)
    np.testing.assert_allclose(np.asarray(Xs @ Ws), np.asarray(X @ W), rtol=1e-4, atol=1e-3)


def test_smoothing_reduces_w8a8_error_on_outliers():
    X = _outlier_acts(2)
    W = jnp.asarray(np.random.default_rng(3).standard_normal((128, 32)).astype(np.float32))
    ref = X @ W
    spec = jq.QuantSpec(bits=8, group_size=-1, symmetric=True)

    def w8a8(x, w):
        return fake_quant_per_token(x, 8) @ jq.fake_quant(w, spec)

    s = smoothquant_scales(jnp.max(jnp.abs(X), axis=0), [W], alpha=0.5)
    Xs, Ws = apply_smoothing(X, W, s)
    e_plain = float(jnp.linalg.norm(w8a8(X, W) - ref))
    e_smooth = float(jnp.linalg.norm(w8a8(Xs, Ws) - ref))
    assert e_smooth < 0.7 * e_plain, (e_smooth, e_plain)


def test_bad_alpha():
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(jnp.ones((4,), jnp.float32), [jnp.ones((4, 2), jnp.float32)], alpha=2.0)
