"""D²Quant's pure parts: the DSQ least-squares step (numpy oracle, optimality), the alternating
objective never increasing, DSQ beating GPTQ on its own objective, the exact fold into up_proj,
and DAC's mean shift."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.algorithms.d2quant import (
    dsq,
    dsq_dequantize,
    dsq_group_scale_step,
    dsq_scale_step,
    fold_channel_scale,
    mean_shift,
)
from jaxquant.algorithms.gptq import gptq
from jaxquant.core.qarray import dequantize


def _problem(k=128, n=48, tokens=1024, seed=0):
    """Correlated activations with uneven channel magnitudes, and a weight whose input rows differ
    in scale (where a per-input-channel scale can help)."""
    rng = np.random.default_rng(seed)
    A = np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k)
    X = (rng.standard_normal((tokens, k)) @ A) * np.exp(0.7 * rng.standard_normal(k))
    W = rng.standard_normal((k, n)) * np.exp(0.6 * rng.standard_normal((k, 1)))
    return X.astype(np.float32), W.astype(np.float32)


def _f64_objective(W, s, U, H):
    D = W.astype(np.float64) - s[:, None].astype(np.float64) * U.astype(np.float64)
    return float(np.sum(D * (H.astype(np.float64) @ D)))


def test_scale_step_solves_the_least_squares_problem():
    X, W = _problem(k=64, n=32)
    H = X.T @ X
    U = np.asarray(dequantize(jq.quantize(jnp.asarray(W), jq.QuantSpec(bits=2, group_size=32))))
    s = np.asarray(dsq_scale_step(jnp.asarray(W), jnp.asarray(U), jnp.asarray(H),
                                  jnp.ones(64, jnp.float32), prox=1e-9))
    # numpy oracle: minimise ||X (W - diag(s) U)||_F^2 as an ordinary least-squares problem in s
    # (column i of the design matrix is vec(X[:, i] U[i, :]))
    Xd, Ud, Wd = X.astype(np.float64), U.astype(np.float64), W.astype(np.float64)
    design = np.stack([np.outer(Xd[:, i], Ud[i]).ravel() for i in range(64)], axis=1)
    s_ref = np.linalg.lstsq(design, (Xd @ Wd).ravel(), rcond=None)[0]
    live = np.abs(U).sum(1) > 0  # a zero row of U leaves s_i undetermined: it keeps s_prev
    assert live.sum() > 32
    np.testing.assert_allclose(s[live], s_ref[live], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(s[~live], 1.0, rtol=1e-5)
    # and it is a minimiser: no random perturbation lowers the objective
    f = _f64_objective(W, s, U, H)
    rng = np.random.default_rng(1)
    for _ in range(20):
        d = 1e-2 * rng.standard_normal(64)
        assert _f64_objective(W, s + d, U, H) >= f * (1 - 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("requant", ["gptq", "rtn"])
@pytest.mark.parametrize("init", ["ones", "wmax"])
def test_alternating_objective_never_increases(bits, requant, init):
    X, W = _problem(seed=bits)
    H = jnp.asarray(X.T @ X)
    spec = jq.QuantSpec(bits=bits, group_size=32)
    qa, s, info = dsq(jnp.asarray(W), H, spec, iters=4, init=init, requant=requant)
    hist = np.asarray(info["history"], np.float64)
    assert hist.shape == (13,)  # f0, then (s^c, S, requant) x 4
    assert np.all(np.diff(hist) <= 1e-6 * hist[0]), hist
    # the recorded value is the objective of what is returned (float64 recomputation)
    U = np.asarray(dequantize(qa, dtype=jnp.float32))
    np.testing.assert_allclose(_f64_objective(W, np.asarray(s), U, np.asarray(H)), hist[-1],
                               rtol=1e-3)


def test_least_squares_half_steps_decrease_without_the_safeguard():
    X, W = _problem(seed=5)
    H = jnp.asarray(X.T @ X)
    _, _, info = dsq(jnp.asarray(W), H, jq.QuantSpec(bits=2, group_size=32), iters=5,
                     requant="rtn", monotone=False)
    h = np.asarray(info["history"], np.float64)
    # history = [f0, (s-step, S-step, requant) x 5]: the s- and S-steps are exact minimisations
    for r in range(5):
        for i in (3 * r + 1, 3 * r + 2):
            assert h[i] <= h[i - 1] * (1 + 1e-5), (i, h)


def test_group_scale_step_solves_the_least_squares_problem():
    X, W = _problem(k=64, n=8, seed=4)
    H = X.T @ X
    spec = jq.QuantSpec(bits=2, group_size=16)
    qa = jq.quantize(jnp.asarray(W), spec)
    C = np.asarray(qa.codes(), np.float64) - np.repeat(np.asarray(qa.zero_point()), 16, axis=0)
    s = np.exp(0.2 * np.random.default_rng(0).standard_normal(64))
    S = np.asarray(dsq_group_scale_step(jnp.asarray(W), jnp.asarray(s, jnp.float32),
                                        jnp.asarray(C, jnp.float32), jnp.asarray(H),
                                        qa.scale, 16, prox=1e-9))
    # numpy oracle per output column: min_S ||X (w_o - diag(s) (C_o ⊙ S[g(i), o]))||
    Xd = X.astype(np.float64)
    for o in range(8):
        design = np.stack([Xd[:, g * 16:(g + 1) * 16] @ (s * C[:, o])[g * 16:(g + 1) * 16]
                           for g in range(4)], axis=1)
        ref = np.linalg.lstsq(design, Xd @ W[:, o].astype(np.float64), rcond=None)[0]
        np.testing.assert_allclose(S[:, o], ref, rtol=2e-3)


@pytest.mark.parametrize("bits", [2, 3])
def test_dsq_output_error_below_gptq(bits):
    X, W = _problem(k=256, n=64, tokens=2048, seed=10 + bits)
    H = jnp.asarray(X.T @ X)
    spec = jq.QuantSpec(bits=bits, group_size=64)
    q_gptq, _ = gptq(jnp.asarray(W), H, spec)
    qa, s, _ = dsq(jnp.asarray(W), H, spec, iters=5)

    def err(W_hat):
        return float(np.linalg.norm(X @ W - X @ np.asarray(W_hat)) / np.linalg.norm(X @ W))

    e_gptq = err(dequantize(q_gptq, dtype=jnp.float32))
    e_dsq = err(dsq_dequantize(qa, s))
    assert e_dsq < 0.95 * e_gptq, (e_dsq, e_gptq)


@pytest.mark.parametrize("scale_dtype", ["float32"])
def test_fold_into_up_proj_is_exact(scale_dtype):
    """With the codes fixed, silu(x Wg) ⊙ (x Ŵ_up diag(s)) U_down equals the unfolded
    dequantized MLP, silu(x Wg) ⊙ (x Ŵ_up) diag(s) U_down (numpy float64 oracle)."""
    rng = np.random.default_rng(3)
    d, f = 64, 96
    x = rng.standard_normal((40, d)).astype(np.float32)
    Wg = rng.standard_normal((d, f)).astype(np.float32) / 8
    Wu = rng.standard_normal((d, f)).astype(np.float32) / 8
    Wd = rng.standard_normal((f, d)).astype(np.float32) / 8
    spec = jq.QuantSpec(bits=3, group_size=32, scale_dtype=scale_dtype)
    h = jax.nn.silu(x @ Wg) * (x @ Wu)
    q_up = jq.quantize(jnp.asarray(Wu), spec)
    q_down, s, _ = dsq(jnp.asarray(Wd), jnp.asarray(np.asarray(h).T @ np.asarray(h)), spec,
                       iters=3, init="wmax")
    assert not np.allclose(np.asarray(s), 1.0)
    folded = fold_channel_scale(q_up, s)
    np.testing.assert_array_equal(np.asarray(folded.packed), np.asarray(q_up.packed))
    assert folded.scale.dtype == q_up.scale.dtype

    from jaxquant.models.common.config import DecoderConfig
    from jaxquant.models.common.layers import MLP

    cfg = DecoderConfig(family="llama", vocab_size=8, hidden_size=d, intermediate_size=f, num_layers=1,
                        num_heads=4, num_kv_heads=4, head_dim=16)
    params = {"gate_proj": {"kernel": jnp.asarray(Wg)}, "up_proj": {"kernel": folded},
              "down_proj": {"kernel": q_down}}
    y = np.asarray(MLP(cfg).apply({"params": params}, jnp.asarray(x)), np.float64)

    def silu(z):
        return z / (1 + np.exp(-z))

    up_hat = np.asarray(dequantize(q_up, dtype=jnp.float32), np.float64)
    down_hat = np.asarray(dsq_dequantize(q_down, s), np.float64)  # diag(s) U, unfolded
    x64 = x.astype(np.float64)
    y_ref = (silu(x64 @ Wg) * (x64 @ up_hat)) @ down_hat
    np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5 * np.abs(y_ref).max())


def test_fold_into_a_dense_up_proj_and_shape_error():
    up = jnp.arange(12.0, dtype=jnp.float32).reshape(3, 4)
    s = jnp.asarray([1.0, 2.0, 0.5, -1.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(fold_channel_scale(up, s)),
                                  np.asarray(up) * np.asarray(s)[None, :])
    with pytest.raises(ValueError, match="up_proj output channel"):
        fold_channel_scale(up, jnp.ones(3, jnp.float32))


def test_mean_shift_is_the_token_mean_of_the_difference():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5, 8)).astype(np.float32)
    b = a + rng.standard_normal(8).astype(np.float32)[None, None, :] + \
        0.1 * rng.standard_normal((3, 5, 8)).astype(np.float32)
    mu = np.asarray(mean_shift(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(mu, (a - b).reshape(-1, 8).mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        mean_shift(jnp.asarray(a), jnp.asarray(b[:, :4]))


def test_bad_arguments_name_the_parameter():
    W = jnp.ones((64, 8), jnp.float32)
    H = jnp.eye(64, dtype=jnp.float32)
    spec = jq.QuantSpec(bits=2, group_size=32)
    for kw, name in (({"init": "zeros"}, "init"), ({"requant": "awq"}, "requant"),
                     ({"ls": "qr"}, "ls"), ({"iters": -1}, "iters")):
        with pytest.raises(ValueError, match=name):
            dsq(W, H, spec, **kw)
    with pytest.raises(ValueError, match="H must be"):
        dsq(W, jnp.eye(32, dtype=jnp.float32), spec)
