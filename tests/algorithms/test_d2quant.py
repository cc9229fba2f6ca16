"""D²Quant's pure parts against independent float64 numpy computations: the DSQ least-squares
steps (lstsq oracles), one full alternating round (init, s^c step, S step, RTN/GPTQ requantization)
re-run in numpy, the reported objective recomputed as ‖X(W − diag(s^c) S(Q − Z))‖² from the returned
codes, DSQ beating single-scale GPTQ/RTN on weights with per-input-channel magnitude outliers, the
exact fold into up_proj, and DAC's mean shift."""

import functools

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
from tests.algorithms.test_gptq import numpy_gptq


def _problem(k=128, n=48, tokens=1024, seed=0, row_spread=0.6):
    """Correlated activations with uneven channel magnitudes, and a weight whose input rows differ
    in scale by ``exp(row_spread · N(0, 1))`` (where a per-input-channel scale can help)."""
    rng = np.random.default_rng(seed)
    A = np.eye(k) + 0.3 * rng.standard_normal((k, k)) / np.sqrt(k)
    X = (rng.standard_normal((tokens, k)) @ A) * np.exp(0.7 * rng.standard_normal(k))
    W = rng.standard_normal((k, n)) * np.exp(row_spread * rng.standard_normal((k, 1)))
    return X.astype(np.float32), W.astype(np.float32)


def _f64_objective(W, s, U, H):
    D = W.astype(np.float64) - s[:, None].astype(np.float64) * U.astype(np.float64)
    return float(np.sum(D * (H.astype(np.float64) @ D)))


# ----------------------------------------------------------------------------- numpy oracle
def _np_rtn(W, bits, gs):
    """Asymmetric min-max RTN of ``W`` ``[K, N]`` per group of ``gs`` input rows (0 always in the
    range, ``S = (max − min)/maxq``, ``Z = round(−min/S)``): codes ``[K, N]``; ``S``, ``Z``
    ``[G, N]``."""
    k, n = W.shape
    maxq = 2**bits - 1
    Wg = W.reshape(k // gs, gs, n)
    lo, hi = np.minimum(Wg.min(1), 0.0), np.maximum(Wg.max(1), 0.0)
    empty = lo == hi
    lo, hi = np.where(empty, -1.0, lo), np.where(empty, 1.0, hi)
    S = (hi - lo) / maxq
    Z = np.clip(np.round(-lo / S), 0, maxq)
    Q = np.clip(np.round(Wg / S[:, None]) + Z[:, None], 0, maxq).reshape(k, n)
    return Q, S, Z


def _np_deq(Q, S, Z, gs):
    return np.repeat(S, gs, axis=0) * (Q - np.repeat(Z, gs, axis=0))


def _np_f(X, W, s, U):
    """``‖X (W − diag(s) U)‖²_F`` in float64, from the activations themselves (not from H)."""
    X, W = X.astype(np.float64), W.astype(np.float64)
    return float(np.sum((X @ (W - s[:, None] * U)) ** 2))


def _np_scale_step(X, W, U, s_prev):
    """``argmin_s ‖X(W − diag(s)U)‖²`` by lstsq (column ``i``: ``vec(X[:, i] U[i, :])``); a channel
    whose row of ``U`` is zero is undetermined and keeps ``s_prev``."""
    X, W = X.astype(np.float64), W.astype(np.float64)
    live = np.abs(U).sum(1) > 0
    design = np.stack([np.outer(X[:, i], U[i]).ravel() for i in np.where(live)[0]], axis=1)
    s = s_prev.astype(np.float64).copy()
    s[live] = np.linalg.lstsq(design, (X @ W).ravel(), rcond=None)[0]
    return s


def _np_group_scale_step(X, W, s, C, gs):
    """Per output column ``o``: ``argmin_S ‖X(w_o − diag(s)(C_o ⊙ S[g(i), o]))‖`` by lstsq."""
    X, W = X.astype(np.float64), W.astype(np.float64)
    k, n = W.shape
    S = np.empty((k // gs, n))
    for o in range(n):
        sc = s * C[:, o]
        design = np.stack([X[:, g * gs:(g + 1) * gs] @ sc[g * gs:(g + 1) * gs]
                           for g in range(k // gs)], axis=1)
        S[:, o] = np.linalg.lstsq(design, X @ W[:, o], rcond=None)[0]
    return S


def _returned(qa, gs):
    """Codes, scales, zeros of a QArray as float64 numpy (no library dequantize)."""
    Q = np.asarray(qa.codes(), np.float64)
    S = np.asarray(qa.scale, np.float64)
    Z = np.asarray(qa.zero, np.float64)
    return Q, S, Z, _np_deq(Q, S, Z, gs)


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


def test_one_round_with_rtn_requant_matches_numpy():
    """``init="wmax"``, one round, ``requant="rtn"``, no safeguard, re-run in float64 numpy: the
    initial RTN of ``W / s0``, the s^c least-squares step, the S least-squares step and the final
    RTN of ``W / s^c`` (``history`` = their objectives, recomputed here from X)."""
    bits, gs = 2, 32
    X, W = _problem(k=64, n=32, tokens=512, seed=2)
    qa, s, info = dsq(jnp.asarray(W), jnp.asarray(X.T @ X), jq.QuantSpec(bits=bits, group_size=gs),
                      iters=1, init="wmax", requant="rtn", monotone=False)
    hist = np.asarray(info["history"], np.float64)
    assert hist.shape == (4,)
    W64 = W.astype(np.float64)
    m = np.sqrt(np.abs(W64).max(1))
    s0 = m / np.exp(np.mean(np.log(m)))  # s_i ∝ sqrt(max_o |W_io|), geometric mean 1
    Q0, S0, Z0 = _np_rtn(W64 / s0[:, None], bits, gs)
    U0 = _np_deq(Q0, S0, Z0, gs)
    np.testing.assert_allclose(hist[0], _np_f(X, W, s0, U0), rtol=1e-4)
    s1 = _np_scale_step(X, W, U0, s0)
    np.testing.assert_allclose(np.asarray(s), s1, rtol=2e-3)
    np.testing.assert_allclose(hist[1], _np_f(X, W, s1, U0), rtol=1e-3)
    S1 = _np_group_scale_step(X, W, s1, Q0 - np.repeat(Z0, gs, axis=0), gs)
    np.testing.assert_allclose(hist[2], _np_f(X, W, s1, _np_deq(Q0, S1, Z0, gs)), rtol=1e-3)
    # the half-steps are exact minimisations: each lowers the objective
    assert hist[1] < hist[0] and hist[2] < hist[1], hist
    # the last step requantizes W / s^c with the returned s^c (checked above): plain RTN
    s_ret = np.asarray(s, np.float64)
    Q1, S1r, Z1 = _np_rtn(W64 / s_ret[:, None], bits, gs)
    Q, S, Z, U = _returned(qa, gs)
    assert np.mean(Q == Q1) >= 0.995
    np.testing.assert_allclose(S, S1r, rtol=1e-5)
    np.testing.assert_array_equal(Z, Z1)
    np.testing.assert_allclose(hist[3], _np_f(X, W, s_ret, U), rtol=1e-4)


def test_one_round_with_gptq_requant_matches_numpy():
    """``init="ones"``: the initial quantization is GPTQ of ``W`` on ``H`` (float64 GPTQ oracle);
    after the s^c step the requantization is GPTQ of ``W / s^c`` on the activation-scaled Hessian
    ``diag(s^c) H diag(s^c)``."""
    bits, gs = 3, 32
    X, W = _problem(k=64, n=32, tokens=512, seed=3)
    H = X.T @ X
    qa, s, info = dsq(jnp.asarray(W), jnp.asarray(H), jq.QuantSpec(bits=bits, group_size=gs),
                      iters=1, init="ones", requant="gptq", monotone=False, blocksize=32)
    hist = np.asarray(info["history"], np.float64)
    W64 = W.astype(np.float64)
    Q0, S0, Z0, _, _ = numpy_gptq(W64.T, H, bits, gs, False)
    U0 = _np_deq(Q0.T, S0, Z0, gs)
    np.testing.assert_allclose(hist[0], _np_f(X, W, np.ones(64), U0), rtol=1e-4)
    s1 = _np_scale_step(X, W, U0, np.ones(64))
    np.testing.assert_allclose(np.asarray(s), s1, rtol=2e-3)
    np.testing.assert_allclose(hist[1], _np_f(X, W, s1, U0), rtol=1e-3)
    s_ret = np.asarray(s, np.float64)
    Hs = H.astype(np.float64) * s_ret[:, None] * s_ret[None, :]
    Q1, S1, Z1, _, _ = numpy_gptq((W64 / s_ret[:, None]).T, Hs, bits, gs, False)
    Q, S, Z, U = _returned(qa, gs)
    assert np.mean(Q == Q1.T) >= 0.995
    np.testing.assert_allclose(S, S1, rtol=1e-4)
    np.testing.assert_array_equal(Z, Z1)
    np.testing.assert_allclose(hist[3], _np_f(X, W, s_ret, U), rtol=1e-4)


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


@functools.cache
def _outlier_run(bits):
    """Weights whose input rows differ in magnitude by ``exp(N(0, 1))`` (per-input-channel
    outliers), and DSQ on them (``init="wmax"``, otherwise its defaults: GPTQ requantization, the
    safeguard, 5 rounds)."""
    X, W = _problem(k=256, n=64, tokens=2048, seed=10 + bits, row_spread=1.0)
    H = jnp.asarray(X.T @ X)
    spec = jq.QuantSpec(bits=bits, group_size=64)
    qa, s, info = dsq(jnp.asarray(W), H, spec, iters=5, init="wmax")
    return X, W, spec, qa, np.asarray(s, np.float64), info


@pytest.mark.parametrize("bits", [2, 3])
def test_dsq_beats_single_scale_gptq_and_rtn_on_channel_outliers(bits):
    X, W, spec, qa, s, _ = _outlier_run(bits)
    H = jnp.asarray(X.T @ X)
    _, _, _, U = _returned(qa, 64)
    Xd, Wd = X.astype(np.float64), W.astype(np.float64)

    def err(W_hat):
        return float(np.linalg.norm(Xd @ (Wd - W_hat)) / np.linalg.norm(Xd @ Wd))

    e_dsq = err(s[:, None] * U)
    e_gptq = err(_returned(gptq(jnp.asarray(W), H, spec)[0], 64)[3])
    e_rtn = err(_np_deq(*_np_rtn(Wd, bits, 64), 64))
    assert e_dsq < 0.8 * e_gptq and e_dsq < 0.8 * e_rtn, (e_dsq, e_gptq, e_rtn)


@pytest.mark.parametrize("bits", [2, 3])
def test_reported_objective_is_that_of_the_returned_weights(bits):
    """``history[-1]`` and ``rel_error`` equal ‖X(W − diag(s^c) S(Q − Z))‖² (and its ratio to
    ‖XW‖²) recomputed in float64 from X and the returned codes, scales, zeros and s^c; and
    :func:`dsq_dequantize` is that same ``diag(s^c) S(Q − Z)``."""
    X, W, _, qa, s, info = _outlier_run(bits)
    Q, _, Z, U = _returned(qa, 64)
    assert np.all(Q == np.round(Q)) and Q.min() >= 0 and Q.max() <= 2**bits - 1
    assert np.all(Z == np.round(Z)) and Z.min() >= 0 and Z.max() <= 2**bits - 1
    f = _np_f(X, W, s, U)
    np.testing.assert_allclose(float(info["history"][-1]), f, rtol=1e-3)
    Xd = X.astype(np.float64)
    np.testing.assert_allclose(float(info["rel_error"]),
                               np.sqrt(f / np.sum((Xd @ W.astype(np.float64)) ** 2)), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(dsq_dequantize(qa, jnp.asarray(s, jnp.float32))),
                               s[:, None] * U, rtol=1e-6, atol=1e-7 * np.abs(U).max())


def test_fold_into_up_proj_is_exact():
    """With the codes fixed, silu(x Wg) ⊙ (x Ŵ_up diag(s)) Ŵ_down equals the unfolded
    silu(x Wg) ⊙ (x Ŵ_up) diag(s) Ŵ_down, the dequantized weights built in numpy from the codes."""
    rng = np.random.default_rng(3)
    d, f = 64, 96
    x = rng.standard_normal((40, d)).astype(np.float32)
    Wg = rng.standard_normal((d, f)).astype(np.float32) / 8
    Wu = rng.standard_normal((d, f)).astype(np.float32) / 8
    Wd = rng.standard_normal((f, d)).astype(np.float32) / 8
    s = np.exp(0.5 * rng.standard_normal(f)).astype(np.float32)
    spec = jq.QuantSpec(bits=3, group_size=32)
    q_up = jq.quantize(jnp.asarray(Wu), spec)
    q_down = jq.quantize(jnp.asarray(Wd / s[:, None]), spec)
    folded = fold_channel_scale(q_up, jnp.asarray(s))
    np.testing.assert_array_equal(np.asarray(folded.packed), np.asarray(q_up.packed))
    assert folded.scale.dtype == q_up.scale.dtype

    from jaxquant.models.common.config import DecoderConfig
    from jaxquant.models.common.layers import MLP

    cfg = DecoderConfig(family="llama", vocab_size=8, hidden_size=d, intermediate_size=f,
                        num_layers=1, num_heads=4, num_kv_heads=4, head_dim=16)
    params = {"gate_proj": {"kernel": jnp.asarray(Wg)}, "up_proj": {"kernel": folded},
              "down_proj": {"kernel": q_down}}
    y = np.asarray(MLP(cfg).apply({"params": params}, jnp.asarray(x)), np.float64)

    def silu(z):
        return z / (1 + np.exp(-z))

    up_hat = _returned(q_up, 32)[3]
    down_hat = s[:, None].astype(np.float64) * _returned(q_down, 32)[3]  # diag(s) Ŵ_down
    x64 = x.astype(np.float64)
    y_ref = (silu(x64 @ Wg.astype(np.float64)) * (x64 @ up_hat)) @ down_hat
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
