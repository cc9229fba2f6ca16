"""CLQ's orthogonal-based smoothing transform G = P · H_block (jaxquant.core.orthogonal).

Claims, each against an independent oracle (numpy dense matrices, exact identities, counting):
(1) (X G)(Gᵀ W) = X W on random and on outlier-heavy inputs, with and without the permutation and
with zero-padding; (2) permutations invert; (3) every supported Hadamard order up to 256 gives an
orthogonal block rotation; (4) on planted outliers the permutation puts at most ⌈k / n_blocks⌉ of
the k outliers in any block, where the identity order concentrates them; (5) the transform flattens
a planted outlier (the reason it exists); (6) bad inputs are refused by name.
"""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.core import orthogonal as O
from jaxquant.core.hadamard import hadamard_orders_supported
from jaxquant.nn.linear import InputTransform, apply_linear


def _outlier_x(rng, t, d, chans, mag=50.0):
    x = rng.normal(size=(t, d))
    x[:, chans] *= mag
    return x


@pytest.mark.parametrize("d,block,permute,pad", [(96, 32, False, False), (96, 48, True, False),
                                                  (128, 32, True, False), (100, 12, True, True),
                                                  (60, 20, True, False)])
@pytest.mark.parametrize("outliers", [False, True])
def test_xg_gtw_equals_xw(d, block, permute, pad, outliers):
    rng = np.random.default_rng(d + block)
    x = _outlier_x(rng, 64, d, [3, 7, 11, 40]) if outliers else rng.normal(size=(64, d))
    W = rng.normal(size=(d, 24))
    width = O.padded_width(d, block, pad=pad)
    perm = None
    if permute:
        s = np.concatenate([np.asarray(O.outlier_scores(jnp.asarray(np.abs(x).max(0)))),
                            np.full(width - d, -np.inf)])
        perm = O.outlier_permutation(s, block)
    blocks = jnp.asarray(O.hadamard_blocks(width, block, 3))
    xg = O.apply_transform(jnp.asarray(x, jnp.float32), blocks,
                           None if perm is None else jnp.asarray(perm))
    gw = O.fold_weight(jnp.asarray(W, jnp.float32), blocks,
                       None if perm is None else jnp.asarray(perm))
    ref = x @ W
    np.testing.assert_allclose(np.asarray(xg @ gw, np.float64), ref,
                               atol=2e-4 * np.abs(ref).max())
    # the same against the dense numpy G (x zero-padded): the fast path is G, not just "some" Q
    G = O.transform_matrix(d, block, perm, seed=3) if perm is not None else \
        O.transform_matrix(width, block, None, seed=3)
    xp = np.pad(x, [(0, 0), (0, width - d)])
    np.testing.assert_allclose(np.asarray(xg), xp @ G, atol=2e-4 * np.abs(xp).max())
    np.testing.assert_allclose(G @ G.T, np.eye(width), atol=1e-12)


def test_input_transform_slot_of_linear():
    """A linear's params with the transform slot compute x W (dense kernel Gᵀ W)."""
    rng = np.random.default_rng(0)
    d, block = 100, 20
    x = _outlier_x(rng, 32, d, [5, 50]).astype(np.float32)
    W = rng.normal(size=(d, 16)).astype(np.float32)
    width = O.padded_width(d, block, pad=True)
    assert width == 100
    perm = O.outlier_permutation(np.abs(x).max(0), block)
    t = InputTransform(block, width, 0)
    p = {"kernel": O.fold_weight(jnp.asarray(W), jnp.asarray(t.blocks()), jnp.asarray(perm)),
         "transform": t, "in_perm": jnp.asarray(perm)}
    np.testing.assert_allclose(np.asarray(apply_linear(jnp.asarray(x), p)), x @ W,
                               rtol=1e-4, atol=1e-3)
    bad = dict(p, in_perm=jnp.asarray(perm[:96]))
    with pytest.raises(ValueError, match="in_perm"):
        apply_linear(jnp.asarray(x), bad)


def test_permutations_invert():
    rng = np.random.default_rng(1)
    for d, block in ((64, 16), (96, 12), (20, 20)):
        perm = O.outlier_permutation(rng.normal(size=d), block, deal="snake")
        inv = O.invert_permutation(perm)
        x = rng.normal(size=(3, d))
        np.testing.assert_array_equal(x[:, perm][:, inv], x)
        np.testing.assert_array_equal(perm[inv], np.arange(d))
        P = np.zeros((d, d))
        P[perm, np.arange(d)] = 1.0
        np.testing.assert_array_equal(x @ P, x[:, perm])  # x P = x[..., perm]
        np.testing.assert_array_equal(P @ P.T, np.eye(d))


@pytest.mark.parametrize("n", [n for n in range(1, 257) if hadamard_orders_supported(n)])
def test_every_supported_order_gives_orthogonal_blocks(n):
    blocks = O.hadamard_blocks(2 * n, n, seed=n).astype(np.float64)
    for B in blocks:
        np.testing.assert_allclose(B @ B.T, np.eye(n), atol=1e-6)
        np.testing.assert_allclose(np.abs(B), 1 / np.sqrt(n), rtol=1e-6)  # ±1/√n entries


def test_supported_orders_include_non_powers_of_two():
    orders = [n for n in range(1, 257) if hadamard_orders_supported(n)]
    assert {12, 20, 24, 28, 36, 40, 44, 48, 96, 192} <= set(orders)
    assert not any(n % 4 for n in orders if n > 2)  # a Hadamard order is 1, 2 or 4m


@pytest.mark.parametrize("d,block,k", [(128, 32, 6), (128, 16, 8), (96, 12, 13), (120, 20, 5)])
@pytest.mark.parametrize("deal", ["round_robin", "snake"])
def test_planted_outliers_spread_evenly(d, block, k, deal):
    rng = np.random.default_rng(k)
    chans = rng.choice(d // 2, size=k, replace=False)  # clustered in the first half
    x = _outlier_x(rng, 256, d, chans)
    scores = np.asarray(O.outlier_scores(jnp.asarray(np.abs(x).max(0))))
    assert set(np.argsort(-scores)[:k]) == set(chans)  # the score finds them
    perm = O.outlier_permutation(scores, block, deal=deal)
    nb = d // block
    per_block = [np.isin(perm[i * block:(i + 1) * block], chans).sum() for i in range(nb)]
    assert sum(per_block) == k
    assert max(per_block) <= math.ceil(k / nb)
    ident = [np.isin(np.arange(d)[i * block:(i + 1) * block], chans).sum() for i in range(nb)]
    assert max(ident) > math.ceil(k / nb) or k <= nb  # without P they were concentrated


def test_transform_flattens_a_planted_outlier():
    """The per-token quantization error of x G is far below that of x when a few channels are
    huge (the point of the smoothing): measured with a numpy 4-bit per-token quantizer, in
    absolute Frobenius norm (G is orthogonal, so it is the error in x's own basis)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(512, 128))
    x[:, [1, 2, 3, 4]] += 30.0  # persistent outlier channels, as in DiT / LLM activations

    def q4_err(a):
        s = np.abs(a).max(-1, keepdims=True) / 7
        return np.linalg.norm(np.clip(np.round(a / s), -7, 7) * s - a)

    perm = O.outlier_permutation(np.abs(x).max(0), 32)
    xg = np.asarray(O.apply_transform(jnp.asarray(x, jnp.float32),
                                      jnp.asarray(O.hadamard_blocks(128, 32)), jnp.asarray(perm)))
    xg_noperm = np.asarray(O.apply_transform(jnp.asarray(x, jnp.float32),
                                             jnp.asarray(O.hadamard_blocks(128, 32))))
    assert q4_err(xg) < 0.5 * q4_err(x)
    # with the 4 outliers in one block of 32, the other 3 blocks' channels keep a coarse grid
    assert q4_err(xg) < q4_err(xg_noperm)


def test_bad_inputs_are_refused_by_name():
    with pytest.raises(ValueError, match=r"does not divide the input's 100 channels.*pad=True"):
        O.padded_width(100, 32)
    with pytest.raises(ValueError, match="Hadamard block size 6"):
        O.padded_width(96, 6)
    with pytest.raises(ValueError, match="permutation of 64 channels for a transform over 96"):
        O.check_permutation(np.arange(64), 96)
    with pytest.raises(ValueError, match="not a permutation"):
        O.invert_permutation(np.array([0, 0, 1]))
    with pytest.raises(ValueError, match="do not tile into blocks of 32"):
        O.outlier_permutation(np.ones(100), 32)
    with pytest.raises(ValueError, match="outlier statistic"):
        O.outlier_scores(jnp.ones(4), statistic="kurtosis")
    with pytest.raises(ValueError, match=r"InputTransform.block"):
        InputTransform(32, 100)
