"""GPTQ: its claim (output error below RTN's on correlated inputs), identities, and an independent
float64 numpy oracle (the textbook column-by-column algorithm, min-max and MSE-searched scales)."""

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


# ----------------------------------------------------------------------------- numpy oracle
def _np_scale_zero(blk, bits, sym, ratio=1.0):
    """Min-max scale/zero per row of ``blk`` ``[N, g]`` (rows = output channels), float64, with the
    documented conventions (0 always in the range; symmetric: ``S = 2 max|w| / maxq``,
    ``Z = 2**(bits-1)``; an all-zero row gets the range [-1, 1]); the range is shrunk by
    ``ratio``."""
    maxq = 2**bits - 1
    lo, hi = np.minimum(blk.min(1), 0.0), np.maximum(blk.max(1), 0.0)
    if sym:
        hi = np.maximum(-lo, hi)
        lo = -hi
    empty = hi == lo
    lo, hi = np.where(empty, -1.0, lo) * ratio, np.where(empty, 1.0, hi) * ratio
    if sym:
        return 2 * hi / maxq, np.full(hi.shape, 2.0 ** (bits - 1))
    s = (hi - lo) / maxq
    return s, np.clip(np.round(-lo / s), 0, maxq)


def _np_params(blk, bits, sym, mse=None):
    """Min-max, or (``mse = (lowest ratio, grid points, norm p)``) the brute-force search over the
    shrink ratios ``linspace(1, lowest, grid)`` of ``Σ |w - ŵ|^p`` per row; the first ratio wins
    ties (a later one must be strictly better). Returns scales, zeros and the chosen ratios."""
    if mse is None:
        return (*_np_scale_zero(blk, bits, sym), np.ones(blk.shape[0]))
    lowest, grid, p = mse
    maxq = 2**bits - 1
    best = None
    for r in np.linspace(1.0, lowest, grid):
        s, z = _np_scale_zero(blk, bits, sym, r)
        q = np.clip(np.round(blk / s[:, None]) + z[:, None], 0, maxq)
        e = np.sum(np.abs(s[:, None] * (q - z[:, None]) - blk) ** p, axis=1)
        cand = (s, z, e, np.full(e.shape, r))
        if best is None:
            best = cand
        else:
            better = e < best[2]
            best = tuple(np.where(better, c, b) for c, b in zip(cand, best, strict=True))
    return best[0], best[1], best[3]


def numpy_gptq(W, H, bits, gs, sym, *, act_order=False, static_groups=False, damp=0.01,
                mse=None, follow_ties=None):
    """Textbook GPTQ (Frantar et al.) in float64, paper layout ``W [N, K]``: one column at a time,
    the full update ``W[:, j:] -= err ⊗ Hinv[j, j:]`` after each (no lazy blocks), ``Hinv`` the
    upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``; a group's scales are
    fitted on the error-updated weights when its first column is reached (static groups, act-order
    and per-channel: on the original weights).

    ``follow_ties`` (codes ``[N, K]``): where ``w/S`` lies within 1e-4 of a rounding tie (the
    extreme of a symmetric grid lands exactly on one) both neighbours are correct; the oracle takes
    the given code there, if it is one of the two, so both trajectories stay comparable. Returns
    codes ``[N, K]``, scales, zeros and chosen shrink ratios ``[G, N]``, and the number of ties
    followed."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    n, k = W.shape
    maxq = 2**bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    g = k if gs == -1 else gs
    static = static_groups or act_order or gs == -1
    if static:
        fixed = [_np_params(W[:, i:i + g], bits, sym, mse) for i in range(0, k, g)]
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(k)
    W, H = W[:, perm], H[np.ix_(perm, perm)]
    U = np.linalg.cholesky(np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(k))).T
    Q = np.zeros((n, k))
    S, Z, R = np.zeros((k // g, n)), np.zeros((k // g, n)), np.ones((k // g, n))
    ties = 0
    for j in range(k):
        if static:
            s, z, r = fixed[perm[j] // g]
        elif j % g == 0:
            s, z, r = _np_params(W[:, j:j + g], bits, sym, mse)
        S[perm[j] // g], Z[perm[j] // g], R[perm[j] // g] = s, z, r
        t = W[:, j] / s
        q = np.clip(np.round(t) + z, 0, maxq)
        if follow_ties is not None:
            tie = np.abs(np.abs(t - np.floor(t)) - 0.5) < 1e-4
            other = follow_ties[:, perm[j]].astype(np.float64)
            use = tie & ((other == np.clip(np.floor(t) + z, 0, maxq)) |
                         (other == np.clip(np.ceil(t) + z, 0, maxq)))
            ties += int(np.sum(use & (other != q)))
            q = np.where(use, other, q)
        Q[:, j] = q
        err = (W[:, j] - s * (q - z)) / U[j, j]
        W[:, j:] -= np.outer(err, U[j, j:])
    Q_out = np.empty_like(Q)
    Q_out[:, perm] = Q
    return Q_out, S, Z, R, ties


def _compare_with_oracle(X, W, spec, *, act_order=False, static_groups=False, blocksize=32):
    k = W.shape[0]
    H = X.T @ X
    qa, _ = gptq(jnp.asarray(W), jnp.asarray(H), spec, blocksize=blocksize, act_order=act_order,
                 static_groups=static_groups)
    codes = np.asarray(qa.codes(), np.float64)  # [K, N]
    mse = (None if spec.scale_method == "minmax"
           else (spec.clip_ratio, spec.mse_grid, spec.mse_norm))
    Q, S, Z, R, ties = numpy_gptq(W.T, H, spec.bits, spec.group_size, spec.symmetric,
                                act_order=act_order, static_groups=static_groups, mse=mse,
                                follow_ties=codes.T)
    Q = Q.T
    g = spec.group_len(k)
    same = np.mean(codes == Q)
    # float32 against float64 may flip a rare code that is not at an exact tie, and a flip
    # changes the rest of that row's trajectory: the codes must still agree almost everywhere
    assert same >= 0.995, (same, ties)
    zero = np.asarray(qa.zero_point(), np.float64)
    np.testing.assert_allclose(np.asarray(qa.scale, np.float64), S, rtol=1e-4)
    np.testing.assert_array_equal(zero, Z)
    ours = np.asarray(jq.dequantize(qa), np.float64)
    ref = np.repeat(S, g, axis=0) * (Q - np.repeat(Z, g, axis=0))
    X64, W64 = X.astype(np.float64), W.astype(np.float64)
    f_ours = np.sum((X64 @ (W64 - ours)) ** 2)
    f_ref = np.sum((X64 @ (W64 - ref)) ** 2)
    assert abs(f_ours - f_ref) <= 5e-3 * f_ref, (f_ours, f_ref)
    return qa, R


@pytest.mark.parametrize(
    ("bits", "sym", "gs", "act_order", "static_groups", "dead"),
    [(3, False, 32, False, False, ()),   # groups fitted on the error-updated weights
     (3, True, 32, False, False, ()),    # symmetric grid (its extreme is a rounding tie)
     (4, False, -1, False, False, ()),   # per output channel
     (3, False, 32, True, False, (3, 10)),  # act-order (static groups) with dead inputs
     (2, True, 64, False, True, ())])    # static groups
def test_matches_float64numpy_gptq(bits, sym, gs, act_order, static_groups, dead):
    k, n = 128, 64
    X = _correlated(512, k, seed=5, dead=dead)
    W = np.random.default_rng(2).standard_normal((k, n)).astype(np.float32)
    spec = jq.QuantSpec(bits=bits, group_size=gs, symmetric=sym)
    qa, _ = _compare_with_oracle(X, W, spec, act_order=act_order, static_groups=static_groups)
    if dead:
        assert np.all(np.asarray(jq.dequantize(qa))[list(dead)] == 0.0)


@pytest.mark.parametrize(("bits", "sym", "act_order"), [(3, False, False), (4, True, True)])
def test_matches_float64numpy_gptq_with_mse_searched_scales(bits, sym, act_order):
    """``scale_method="mse"``: per group (when it is reached, on the error-updated weights) the
    shrink ratio in ``linspace(1, clip_ratio, mse_grid)`` minimising ``Σ|w - ŵ|^mse_norm``."""
    k, n = 128, 64
    X = _correlated(512, k, seed=6)
    W = np.random.default_rng(3).standard_normal((k, n)).astype(np.float32)
    W[:: 7] *= 4  # heavy rows: clipping them pays off, so the search has something to find
    spec = jq.QuantSpec(bits=bits, group_size=32, symmetric=sym, scale_method="mse",
                        clip_ratio=0.3, mse_grid=40, mse_norm=2.4)
    _, ratios = _compare_with_oracle(X, W, spec, act_order=act_order)
    # not vacuous: the search shrinks the range of many groups (the scales matched above)
    assert np.mean(ratios < 1.0) > 0.2, np.mean(ratios < 1.0)


# every width, act-order on two of them (each case is one compile; the oracle tests above check
# act-order's result exactly)
@pytest.mark.parametrize(("bits", "act_order"), [(2, False), (3, True), (4, False), (8, True)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, act_order):
    k, n = 256, 48
    X = _correlated(1024, k, seed=bits)
    W = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    spec = jq.QuantSpec(bits=bits, group_size=64)
    qa, _ = gptq(jnp.asarray(W), jnp.asarray(X.T @ X), spec, act_order=act_order)
    e_gptq = _out_err(X, W, np.asarray(jq.dequantize(qa)))
    e_rtn = _out_err(X, W, np.asarray(jq.dequantize(jq.quantize(jnp.asarray(W), spec))))
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    assert qa.shape == (k, n) and qa.scale.shape == (4, n)


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
    H = jnp.asarray(X.T @ X)
    a = np.asarray(jq.dequantize(gptq(jnp.asarray(W), H, spec, blocksize=64)[0]))
    b = np.asarray(jq.dequantize(gptq(jnp.asarray(W), H, spec, blocksize=256)[0]))
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


def test_an_indefinite_hessian_raises_the_dampening_once_and_is_logged(caplog):
    """H + λ0 I not positive definite (numpy's Cholesky refuses it), H + 10 λ0 I is: GPTQ's
    positive-definiteness check fails at λ0, retries at 10 λ0, and the engine logs the retry."""
    import logging

    from jaxquant.calibration.engine import _hessian_check
    from jaxquant.core.spec import QuantSpec

    k = 32
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.standard_normal((k, k)))
    e = np.linspace(1.0, 2.0, k)
    e[0] = -0.05
    H = (Q * e) @ Q.T
    lam0 = 0.01 * np.mean(np.diag(H))
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(H + lam0 * np.eye(k))
    np.linalg.cholesky(H + 10 * lam0 * np.eye(k))
    W = rng.standard_normal((k, 16)).astype(np.float32)
    _, diag = gptq(jnp.asarray(W), jnp.asarray(H, jnp.float32), QuantSpec(bits=4, group_size=16))
    np.testing.assert_allclose(float(diag["damp"]), 10 * lam0, rtol=1e-4)
    assert bool(diag["pd"])
    with caplog.at_level(logging.WARNING):
        info = _hessian_check("layers/0/mlp/down_proj", diag)
    assert info["damp_retries"] == 1 and info["hessian_pd"]
    assert "not positive definite" in caplog.text and "raised 1 time" in caplog.text
