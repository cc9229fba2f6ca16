"""AWQ against an independent float64 numpy AWQ: the activation-aware scale search (plain
``s = x̄^α`` and duo scaling ``s = x̄^α / w̄^(1-α)``, α on the documented grid, ``s = 1`` kept when no
α beats it), the per-(group, output channel) clip search, the registered pipeline (scale, clip,
RTN of ``diag(s) W`` on the inputs ``X / s``), and AWQ's claim: a lower output error than RTN when
a few input channels carry large activations."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.algorithms import registry
from jaxquant.algorithms.awq import awq_clip, awq_search_scale

BITS, GS = 3, 32


# ----------------------------------------------------------------------------- numpy oracle
def _np_rtn(W, bits, gs, tie_z=None, tie_q=None):
    """Asymmetric min-max RTN per group of ``gs`` input rows of ``W`` ``[K, N]``, float64 (0 always
    in the range; ``S = (max − min)/maxq``, ``Z = round(−min/S)``, ``Q = clip(round(W/S) + Z)``).
    Returns ``(Ŵ, Q, S, Z)``.

    Rounding ties: a group clipped to exactly ``±L`` puts ``−min/S`` and ``±L/S`` at ``maxq/2``, a
    tie that float32 arithmetic resolves either way. With ``tie_z``/``tie_q`` in {0, 1}, values
    within 1e-5 of a tie round down (0) or up (1) instead of to even."""
    k, n = W.shape
    maxq = 2**bits - 1
    Wg = np.asarray(W, np.float64).reshape(k // gs, gs, n)
    lo, hi = np.minimum(Wg.min(1), 0.0), np.maximum(Wg.max(1), 0.0)
    empty = lo == hi
    lo, hi = np.where(empty, -1.0, lo), np.where(empty, 1.0, hi)
    S = (hi - lo) / maxq

    def rnd(t, choice):
        if choice is None:
            return np.round(t)
        at_tie = np.abs(t - np.floor(t) - 0.5) < 1e-5
        return np.where(at_tie, np.floor(t) + choice, np.round(t))

    Z = np.clip(rnd(-lo / S, tie_z), 0, maxq)
    Q = np.clip(rnd(Wg / S[:, None], tie_q) + Z[:, None], 0, maxq)
    return (S[:, None] * (Q - Z[:, None])).reshape(k, n), Q.reshape(k, n), S, Z


_TIE_CHOICES = [(z, q) for z in (0, 1) for q in (0, 1)]


def _np_w_mean(Ws, gs):
    """AWQ's w̄ (AutoAWQ ``_search_best_scale``): the linears' weights side by side (all their
    output channels), ``|W|`` divided by its (group, output channel) max (+1e-6), averaged over
    every output channel: ``[K]``."""
    Wc = np.abs(np.concatenate(Ws, axis=1))
    k, n = Wc.shape
    A = Wc.reshape(k // gs, gs, n)
    return (A / (A.max(1, keepdims=True) + 1e-6)).reshape(k, n).mean(1)


def _np_search_scale(X, Ws, bits, gs, n_grid, duo):
    """Brute force over ``α ∈ {0, 1/n, ..., (n-1)/n}`` of ``Σ_i ‖X W_i − (X/s) Q(diag(s) W_i)‖²``
    with ``s = x̄^α [/ w̄^(1-α)]``, ``s /= sqrt(max s · min s)``; ``s = 1`` wins unless some α is
    strictly better. Returns ``(s, α or None, errors over the grid)``."""
    X = X.astype(np.float64)
    Ws = [W.astype(np.float64) for W in Ws]
    x_mean = np.abs(X).mean(0)
    w_mean = _np_w_mean(Ws, gs)

    def err(s):
        return sum(np.sum(((X / s) @ _np_rtn(W * s[:, None], bits, gs)[0] - X @ W) ** 2)
                   for W in Ws)

    errs, scales = [], []
    for i in range(n_grid):
        a = i / n_grid
        s = x_mean**a / w_mean ** (1 - a) if duo else x_mean**a
        scales.append(s / np.sqrt(s.max() * s.min()))
        errs.append(err(scales[-1]))
    best = int(np.argmin(errs))
    if err(np.ones_like(x_mean)) <= errs[best]:
        return np.ones_like(x_mean), None, np.array(errs)
    return scales[best], best / n_grid, np.array(errs)


def _np_clip(X, W, bits, gs, n_grid, max_shrink):
    """AWQ's clip search by brute force: per (group g, output channel o) the ratio
    ``r ∈ {1 − i/n_grid : i < max_shrink·n_grid}`` minimising
    ``mean_t (X_g (Q(clip(W_g, ±r·max|W_g|)) − W_g))²``, the largest ``r`` winning ties.

    Every ratio is evaluated under each resolution of the rounding ties (see :func:`_np_rtn`).
    Returns the ratios ``[R]``, ``valid`` ``[R, G, N]`` (``r`` is the minimiser under some tie
    resolution: its best error is not above any other ratio's worst), and per ratio and tie
    resolution the codes ``[R, 4, K, N]`` and zeros ``[R, 4, G, N]``."""
    X, W = X.astype(np.float64), W.astype(np.float64)
    k, n = W.shape
    g = k // gs
    wmax = np.abs(W).reshape(g, gs, n).max(1)  # [G, N]
    ratios = 1.0 - np.arange(max(1, int(max_shrink * n_grid))) / n_grid
    errs, codes, zeros = [], [], []
    for r in ratios:
        lim = np.repeat(r * wmax, gs, axis=0)
        Wc = np.clip(W, -lim, lim)
        e_r, q_r, z_r = [], [], []
        for tz, tq in _TIE_CHOICES:
            W_hat, Q, _, Z = _np_rtn(Wc, bits, gs, tz, tq)
            dW = (W_hat - W).reshape(g, gs, n)
            e_r.append([np.mean((X[:, j * gs:(j + 1) * gs] @ dW[j]) ** 2, axis=0)
                        for j in range(g)])
            q_r.append(Q)
            z_r.append(Z)
        errs.append(e_r)
        codes.append(q_r)
        zeros.append(z_r)
    errs = np.asarray(errs)  # [R, 4, G, N]
    e_min, e_max = errs.min(1), errs.max(1)
    tol = 1e-5  # float32 accumulation in the code's errors
    valid = np.stack([np.all([e_min[i] <= e_max[j] * (1 + tol) for j in range(len(ratios))
                              if j != i], axis=0) for i in range(len(ratios))])
    return ratios, valid, np.asarray(codes), np.asarray(zeros)


def _salient(k=128, tokens=512, seed=0):
    """Activations where a few input channels are much larger than the rest (AWQ's setting)."""
    rng = np.random.default_rng(seed)
    mag = np.exp(0.5 * rng.standard_normal(k))
    mag[rng.choice(k, 6, replace=False)] *= 20
    return (rng.standard_normal((tokens, k)) * mag).astype(np.float32)


def _codes(qa):
    return (np.asarray(qa.codes(), np.float64), np.asarray(qa.scale, np.float64),
            np.asarray(qa.zero, np.float64))


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("duo", [False, True])
def test_scale_search_on_one_matrix_matches_numpy(duo):
    X = _salient(seed=1)
    W = np.random.default_rng(2).standard_normal((128, 64)).astype(np.float32)
    spec = jq.QuantSpec(bits=BITS, group_size=GS)
    s, errs = awq_search_scale(jnp.asarray(X), (jnp.asarray(W),), spec, n_grid=20,
                               duo_scaling=duo)
    s_ref, alpha, errs_ref = _np_search_scale(X, [W], BITS, GS, 20, duo)
    # the objective at every grid point (the code reports it as a mean over X W's entries)
    np.testing.assert_allclose(np.asarray(errs, np.float64) * X.shape[0] * W.shape[1], errs_ref,
                               rtol=1e-4)
    assert alpha is not None and alpha > 0, alpha  # not vacuous: a real α beats s = 1
    np.testing.assert_allclose(np.asarray(s, np.float64), s_ref, rtol=1e-5)


@pytest.mark.parametrize("widths", [(48, 48), (64, 32, 32)], ids=["gate_up", "q_k_v"])
def test_scale_search_for_linears_sharing_an_input_matches_numpy(widths):
    """Several linears read one input (gate/up; q/k/v with grouped-query attention, where q is
    wider): one ``s`` for all, w̄ over all their output channels, errors summed."""
    X = _salient(seed=3)
    rng = np.random.default_rng(4)
    Ws = [rng.standard_normal((128, n)).astype(np.float32) for n in widths]
    spec = jq.QuantSpec(bits=BITS, group_size=GS)
    s, _ = awq_search_scale(jnp.asarray(X), tuple(jnp.asarray(w) for w in Ws), spec, n_grid=20)
    s_ref, alpha, _ = _np_search_scale(X, Ws, BITS, GS, 20, duo=True)
    assert alpha is not None and alpha > 0, alpha
    np.testing.assert_allclose(np.asarray(s, np.float64), s_ref, rtol=1e-5)


def test_clip_search_matches_numpy():
    X = _salient(seed=5)
    rng = np.random.default_rng(6)
    W = rng.standard_normal((128, 64)).astype(np.float32)
    W[rng.random(W.shape) < 0.01] *= 6  # a few outlier weights: clipping them pays off
    spec = jq.QuantSpec(bits=BITS, group_size=GS)
    got = np.asarray(awq_clip(jnp.asarray(X), jnp.asarray(W), spec, n_grid=20, max_shrink=0.5),
                     np.float64).reshape(4, GS, 64)
    ratios, valid, _, _ = _np_clip(X, W, BITS, GS, 20, 0.5)
    # which ratio the code applied to each (group, output channel): clip(W, ±r·max|W|)
    Wg = W.astype(np.float64).reshape(4, GS, 64)
    wmax = np.abs(Wg).max(1, keepdims=True)
    applied = np.stack([np.isclose(got, np.clip(Wg, -r * wmax, r * wmax), rtol=1e-6,
                                   atol=0).all(1) for r in ratios])  # [R, G, N]
    assert np.all(applied.sum(0) == 1)  # exactly one grid ratio per (group, channel)
    assert np.mean(applied[1:].any(0)) > 0.3  # not vacuous: many groups are clipped
    ok = (applied & valid).any(0)
    assert np.mean(ok) >= 0.99, np.mean(ok)


def test_registered_awq_matches_numpy_and_beats_rtn():
    """The registry's ``input_scale`` then ``quantize`` on ``diag(s) W`` and the inputs ``X / s``
    (what the engine does after folding ``1/s`` into the producer), with the default options,
    against the numpy pipeline; and the end-to-end output error is below plain RTN's."""
    X = _salient(seed=7)
    rng = np.random.default_rng(8)
    W = rng.standard_normal((128, 64)).astype(np.float32)
    spec = jq.QuantSpec(bits=BITS, group_size=GS)
    algo = registry.get("awq")
    opts = algo.resolve({}, spec)
    assert X.shape[0] <= opts["clip_tokens"]  # the clip search sees every token here
    s = np.asarray(algo.input_scale(jnp.asarray(X), [jnp.asarray(W)], spec, **opts), np.float32)
    s_ref, _, _ = _np_search_scale(X, [W], BITS, GS, opts["n_grid"], duo=True)
    np.testing.assert_allclose(s, s_ref, rtol=1e-5)
    Ws, Xs = W * s[:, None], X / s[None, :]
    qa, _ = algo.quantize(jnp.asarray(Ws), {"tokens": jnp.asarray(Xs)}, spec, **opts)
    _, valid, codes, zeros = _np_clip(Xs, Ws, BITS, GS, opts["clip_grid"], opts["max_shrink"])
    Q, S, Z = _codes(qa)
    # per (group, output channel): the codes and zero are those of RTN after a clip ratio that is
    # the search's minimiser under some resolution of the rounding ties
    same_q = (codes == Q).reshape(*codes.shape[:2], 4, GS, 64).all(3)  # [R, 4, G, N]
    match = (same_q & (zeros == Z)).any(1) & valid
    assert np.mean(match.any(0)) >= 0.99, np.mean(match.any(0))
    # AWQ's claim, in float64 from the codes: y = (X / s) S(Q − Z) is closer to X W than RTN's
    X64, W64 = X.astype(np.float64), W.astype(np.float64)
    W_hat = np.repeat(S, GS, axis=0) * (Q - np.repeat(Z, GS, axis=0))
    e_awq = np.linalg.norm((X64 / s) @ W_hat - X64 @ W64)
    e_rtn = np.linalg.norm(X64 @ _np_rtn(W64, BITS, GS)[0] - X64 @ W64)
    assert e_awq < 0.8 * e_rtn, (e_awq, e_rtn)
