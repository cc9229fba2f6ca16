"""GPTAQ (GPTQv2) and GAR ordering: an independent float64 numpy GPTAQ with the authors' blocked
loop, the identity GPTAQ = GPTQ when the fp and quantized inputs agree, GPTAQ's claim (a lower
error against the fp target when the inputs drift), and GAR's permutation by brute force."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.algorithms import registry
from jaxquant.algorithms.gptq import gar_permutation, gptq


def _inputs(n_tokens, k, seed, drift=0.3):
    """fp inputs ``X`` and quantized-stream inputs ``X̃ = X + a correlated drift``."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    X = rng.standard_normal((n_tokens, k)) @ A * (1 + 3 * rng.random(k))
    D = rng.standard_normal((n_tokens, k)) @ (rng.standard_normal((k, k)) / np.sqrt(k))
    Xt = X + drift * D * X.std(0) + 0.2 * drift * X.std(0) * rng.standard_normal(k)
    return X.astype(np.float32), Xt.astype(np.float32)


def _np_minmax(blk, bits):
    """Asymmetric min-max scale/zero per row of ``blk`` ``[N, g]`` (0 inside the range)."""
    maxq = 2**bits - 1
    lo, hi = np.minimum(blk.min(1), 0.0), np.maximum(blk.max(1), 0.0)
    empty = hi == lo
    lo, hi = np.where(empty, -1.0, lo), np.where(empty, 1.0, hi)
    s = (hi - lo) / maxq
    return s, np.clip(np.round(-lo / s), 0, maxq)


def np_gar(h_diag, g):
    """GAR by plain sorting: groups by their largest diagonal, columns within by diagonal."""
    k = len(h_diag)
    groups = [list(range(i, i + g)) for i in range(0, k, g)]
    groups.sort(key=lambda cols: -max(h_diag[c] for c in cols))
    return np.array([c for cols in groups for c in sorted(cols, key=lambda c: -h_diag[c])])


def numpy_gptaq(W, H, dXXT, bits, g, *, block, alpha=0.25, damp=0.01, gar=False):
    """GPTAQ as the authors' loop runs it, float64, paper layout ``W [N, K]``, dynamic groups fitted
    at each group start, lazy blocks of ``block`` columns: inside a block the column update is
    ``err ⊗ U[j, j:] − w ⊗ P[j, j:]`` (``w`` before quantization); after it, the later columns get
    ``Err1 U[blk, later] − W1 P[blk, later]`` with ``W1`` the block after its loop."""
    W, H, dXXT = (a.astype(np.float64).copy() for a in (W, H, dXXT))
    n, k = W.shape
    maxq = 2**bits - 1
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    dXXT[:, dead] = 0.0
    perm = np_gar(np.diag(H), g) if gar else np.arange(k)
    W, H, dXXT = W[:, perm], H[np.ix_(perm, perm)], dXXT[np.ix_(perm, perm)]
    U = np.linalg.cholesky(np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(k))).T
    P = alpha * np.triu(dXXT @ U.T, 1) @ U
    Q = np.zeros((n, k))
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if j % g == 0:
                s, z = _np_minmax(W1[:, i:i + g], bits)  # on the error-updated columns
            w = W1[:, i].copy()
            q = np.clip(np.round(w / s) + z, 0, maxq)
            Q[:, j] = q
            err = (w - s * (q - z)) / U[j, j]
            W1[:, i:] -= np.outer(err, U[j, j:i2]) - np.outer(w, P[j, j:i2])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:] - W1 @ P[i1:i2, i2:]
    out = np.empty_like(Q)
    out[:, perm] = Q
    return out


SPEC3 = jq.QuantSpec(bits=3, group_size=32, symmetric=False)


@pytest.mark.parametrize("gar", [False, True])
def test_gptaq_matches_float64_numpy_gptaq(gar):
    k, n = 128, 48
    X, Xt = _inputs(1024, k, seed=1)
    W = np.random.default_rng(2).standard_normal((k, n)).astype(np.float32)
    H = Xt.T.astype(np.float64) @ Xt
    dXXT = (X - Xt).T.astype(np.float64) @ Xt
    qa, _ = gptq(jnp.asarray(W), jnp.asarray(H, jnp.float32), SPEC3, blocksize=64, gar=gar,
                 cross=jnp.asarray(dXXT, jnp.float32))
    want = numpy_gptaq(W.T, H, dXXT, 3, 32, block=64, gar=gar)  # codes [N, K]
    got = np.asarray(jq.dequantize(qa))
    g = W.reshape(k // 32, 32, n)
    s, z = np.asarray(qa.scale, np.float64)[:, None, :], np.asarray(qa.zero, np.float64)[:, None, :]
    codes = np.round(got.reshape(g.shape) / s + z).reshape(k, n)
    agree = np.mean(codes == want.T)
    assert agree > 0.99, agree  # float32 vs float64: a few rounding ties may flip


def test_gptaq_with_equal_streams_is_gptq():
    k, n = 96, 40
    X, _ = _inputs(512, k, seed=3)
    W = jnp.asarray(np.random.default_rng(4).standard_normal((k, n)), jnp.float32)
    H = jnp.asarray(X.T @ X)
    a, _ = gptq(W, H, SPEC3, blocksize=32)
    b, _ = gptq(W, H, SPEC3, blocksize=32, cross=jnp.zeros_like(H))  # X − X̃ = 0
    np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))  # the same codes
    # the same group scales up to float32 rounding (the fused update order may differ by an ulp)
    np.testing.assert_allclose(np.asarray(a.scale), np.asarray(b.scale), rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptaq_error_against_the_fp_target_is_below_gptq(seed):
    """‖WX − ŴX̃‖: GPTQ fits Ŵ to X̃ alone, GPTAQ also corrects towards the fp output WX."""
    k, n = 128, 64
    X, Xt = _inputs(2048, k, seed=seed, drift=0.4)
    W = np.random.default_rng(10 + seed).standard_normal((k, n)).astype(np.float32)
    H = jnp.asarray(Xt.T @ Xt)
    cross = jnp.asarray((X - Xt).T @ Xt)
    spec = jq.QuantSpec(bits=4, group_size=32, symmetric=False)
    errs = {}
    for name, c in (("gptq", None), ("gptaq", cross)):
        qa, _ = gptq(jnp.asarray(W), H, spec, blocksize=32, cross=c)
        W_hat = np.asarray(jq.dequantize(qa), np.float64)
        errs[name] = np.linalg.norm(X @ W - Xt @ W_hat)
    assert errs["gptaq"] < errs["gptq"], errs


def test_gar_permutation_round_trips_and_keeps_groups():
    rng = np.random.default_rng(5)
    for k, g in ((128, 32), (96, 16), (64, 64)):
        d = rng.random(k).astype(np.float32)
        perm = np.asarray(gar_permutation(jnp.asarray(d), g))
        assert sorted(perm.tolist()) == list(range(k))  # a permutation
        inv = np.argsort(perm)
        np.testing.assert_array_equal(perm[inv], np.arange(k))
        for p in range(0, k, g):  # each run of g positions is one original group
            assert len({c // g for c in perm[p:p + g]}) == 1
        np.testing.assert_array_equal(perm, np_gar(d, g))


def test_gptaq_bad_options_and_recipe_without_reference():
    with pytest.raises(registry.OptionError, match=r"gar and options\.act_order"):
        registry.get("gptaq").resolve({"gar": True, "act_order": True}, SPEC3)
    with pytest.raises(registry.OptionError, match="alpha"):
        registry.get("gptaq").resolve({"alpha": -1.0}, SPEC3)
    W = jnp.ones((32, 8))
    with pytest.raises(ValueError, match="cross must be"):
        gptq(W, jnp.eye(32), SPEC3, cross=jnp.eye(16))
