"""AdaTSQ's two parts (jaxquant.algorithms.adatsq), against exhaustive search and explicit sums.

Claims: (1) on a synthetic problem with a known optimum (each step's option adds its own error,
so the best policy under the budget is found by enumerating every policy) the beam search returns
the brute-force policy and error; (2) its pruning never drops a prefix that is Pareto-optimal and
feasible among all prefixes of its length (exhaustive enumeration at every depth); (3) the
Pareto front is the set of non-dominated points (brute force); (4) the weighted Hessian equals
the explicit Σ_t α_t X_tᵀX_t and α normalises (mean 1, ordering kept, τ = 0 uniform); (5) bad
budgets are refused by name.
"""

import itertools

import numpy as np
import pytest

from jaxquant.algorithms.adatsq import (
    beam_search,
    exhaustive,
    fisher_weights,
    pareto_front,
    weighted_hessian,
)

COSTS = (8.0, 4.0, 3.0)


def _additive(seed, T, n_opt=3):
    rng = np.random.default_rng(seed)
    # lower bits -> larger error, with step-dependent sensitivity (some steps barely care)
    sens = rng.uniform(0.05, 3.0, size=T)
    base = np.array([0.01, 0.3, 1.0])[:n_opt]
    E = sens[:, None] * base[None, :] * rng.uniform(0.7, 1.3, size=(T, n_opt))
    return E


def _search(E, budget, beam_width, on_depth=None):
    T = E.shape[0]
    return beam_search(T, COSTS, budget, lambda s, i, k: s + E[i, k],
                       lambda s, i, pol: s, 0.0, beam_width=beam_width, progress=False,
                       on_depth=on_depth)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("budget", [3.4, 4.0, 5.0])
def test_beam_search_finds_the_brute_force_optimum(seed, budget):
    T = 6
    E = _additive(seed, T)
    pol, err = exhaustive(T, COSTS, budget, lambda p: sum(E[i, k] for i, k in enumerate(p)))
    for width in (None, 64):
        res = _search(E, budget, width)
        assert res.avg_bits <= budget + 1e-9
        np.testing.assert_allclose(res.error, err, rtol=1e-12)
        assert res.policy == pol or np.isclose(sum(E[i, k] for i, k in enumerate(res.policy)),
                                               err)
    # the best uniform policy within the budget is worse than the search (sensitivity varies)
    uni = min(E[:, k].sum() for k, c in enumerate(COSTS) if c <= budget)
    assert res.error <= uni


@pytest.mark.parametrize("seed", range(3))
def test_pruning_keeps_every_pareto_optimal_feasible_prefix(seed):
    T, budget = 5, 4.0
    E = _additive(seed, T)
    kept = {}
    _search(E, budget, None, on_depth=lambda d, beam: kept.__setitem__(
        d, [(c.cost, c.error) for c in beam]))
    for d in range(1, T + 1):
        pts = []
        for p in itertools.product(range(3), repeat=d):
            cost = sum(COSTS[k] for k in p)
            if cost + (T - d) * min(COSTS) <= budget * T + 1e-9:  # can still meet the budget
                pts.append((cost, sum(E[i, k] for i, k in enumerate(p))))
        front = [pts[i] for i in pareto_front(pts)]
        missing = [f for f in front if not any(abs(f[0] - c) < 1e-9 and abs(f[1] - e) < 1e-9
                                               for c, e in kept[d])]
        assert not missing and len(front) >= 2, (d, missing)


def test_pareto_front_is_the_non_dominated_set():
    rng = np.random.default_rng(0)
    pts = [tuple(p) for p in rng.integers(0, 8, size=(60, 2)).astype(float)]
    got = {pts[i] for i in pareto_front(pts)}
    brute = {p for p in pts if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in pts)}
    assert got == brute


def test_a_narrow_beam_still_returns_a_feasible_policy():
    E = _additive(7, 12)
    res = _search(E, 4.0, 2)
    assert res.avg_bits <= 4.0 + 1e-9 and len(res.policy) == 12
    assert max(res.per_step) <= 2
    b = [f[0] for f in res.front]
    assert b == sorted(b) and all(f[0] <= 4.0 + 1e-9 for f in res.front)


def test_weighted_hessian_is_the_explicit_weighted_sum():
    rng = np.random.default_rng(1)
    T, K = 5, 12
    Xs = [rng.normal(size=(rng.integers(3, 9), K)) for _ in range(T)]
    H_groups = np.stack([X.T @ X for X in Xs])
    alpha = rng.uniform(0.1, 3.0, size=T)
    explicit = sum(a * X.T @ X for a, X in zip(alpha, Xs, strict=True))
    np.testing.assert_allclose(np.asarray(weighted_hessian(H_groups, alpha)), explicit,
                               rtol=1e-5)
    with pytest.raises(ValueError, match="4 timestep weights for 5 timestep groups"):
        weighted_hessian(H_groups, alpha[:4])


def test_fisher_weights_normalise():
    rng = np.random.default_rng(2)
    I = rng.uniform(0.0, 5.0, size=(7, 25))
    for tau in (0.5, 1.0, 2.0):
        a = np.asarray(fisher_weights(I, temperature=tau))
        np.testing.assert_allclose(a.mean(-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(a, 25 * I**tau / (I**tau).sum(-1, keepdims=True), rtol=1e-4)
        assert np.all(np.argsort(a, -1) == np.argsort(I, -1))  # more sensitive, more weight
    np.testing.assert_array_equal(np.asarray(fisher_weights(I, temperature=0.0)), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        fisher_weights(I, temperature=-1.0)


def test_bad_budgets_are_refused_by_name():
    E = _additive(0, 4)
    for budget in (2.5, 9.0):
        with pytest.raises(ValueError, match=rf"budget {budget:g} is outside .* \[3, 8\]"):
            _search(E, budget, 4)
    with pytest.raises(ValueError, match="beam_width"):
        _search(E, 4.0, 0)
