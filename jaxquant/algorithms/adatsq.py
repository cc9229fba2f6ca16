"""AdaTSQ (Zhang et al. 2026, "AdaTSQ: timestep-adaptive quantization of diffusion transformers",
arXiv 2602.09883; methods.md §2): two parts.

**Pareto-aware beam search over timesteps** (:func:`beam_search`). A policy chooses one option
``b_t`` (e.g. W8A8 / W4A4 / W3A3, with costs = average bits 8 / 4 / 3) per sampler step and
minimises the end-to-end error ``E2E(b)`` (the final sample against the fp sample from the same
noise) subject to ``(1/T) Σ_t cost(b_t) <= B``. The search walks the steps in sampling order:

* state: a policy prefix ``b_1..b_t`` with its cached latent (the trajectory after step ``t``), its
  summed cost and its error ``score(prefix)`` (the caller's evaluator: e.g. roll the remaining
  steps out with the highest option and compare the final sample; an expansion costs one step
  from the cached latent plus that rollout);
* expansion: every option for step ``t + 1``;
* pruning: prefixes that can no longer meet the budget (``cost + (T − t) · min cost > B · T``),
  then **Pareto pruning** on (cost, error) among prefixes of the same length (a prefix another
  one dominates — no more bits, no more error — is dropped), then the ``beam_width`` survivors
  spread evenly along the front by cost (the lowest-error one, and the lowest-error one whose own
  average is within the budget, always kept; ``None``: the whole front);
* result: the lowest-error full policy within the budget, and the Pareto front of every full
  policy evaluated.

With an additive error (each step's option adds its own error) Pareto pruning is exact: a
dominated prefix has no completion better than its dominator's; the tests check the search
against exhaustive enumeration there.

**Fisher-guided temporal calibration**: a per-timestep (per-layer) sensitivity ``I_{t,l}`` (the
empirical Fisher: mean squared per-sample gradient of the denoising loss at timestep ``t`` w.r.t.
layer ``l``'s weight; computed by :func:`jaxquant.diffusion.fisher.temporal_fisher`), normalised
to weights (:func:`fisher_weights`)::

    α_{t,l} = T · I_{t,l}^τ / Σ_t' I_{t',l}^τ        (mean over t is 1; τ = 0: uniform)

and the weighted Hessian ``H'_l = Σ_t α_{t,l} X_{t,l}ᵀ X_{t,l}`` (:func:`weighted_hessian`, from
the engine's per-timestep statistics ``H_groups``) replaces ``H`` in GPTQ.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


# ---------------------------------------------------------------------------- Fisher weights
def fisher_weights(I: jax.Array, *, temperature: float = 1.0, eps: float = 1e-30) -> jax.Array:
    """``α`` ``[..., T]`` from Fisher scores ``I`` ``[..., T]`` (the last axis: timesteps):
    ``α_t = T · I_t^τ / Σ_t' I_t'^τ``, so every row has mean 1 (``τ = 0`` gives all ones)."""
    if temperature < 0:
        raise ValueError(f"Fisher temperature must be >= 0, got {temperature}")
    I = jnp.maximum(jnp.asarray(I, jnp.float32), 0.0)
    if temperature == 0:
        return jnp.ones_like(I)
    p = jnp.power(jnp.maximum(I, eps), temperature)
    return I.shape[-1] * p / jnp.sum(p, axis=-1, keepdims=True)


def weighted_hessian(H_groups: jax.Array, alpha: jax.Array) -> jax.Array:
    """``H' = Σ_t α_t H_t`` for per-timestep Gram matrices ``H_groups`` ``[T, K, K]``."""
    alpha = jnp.asarray(alpha, jnp.float32)
    if alpha.shape != H_groups.shape[:1]:
        raise ValueError(f"{alpha.shape[0] if alpha.ndim else alpha.shape} timestep weights for "
                         f"{H_groups.shape[0]} timestep groups")
    return jnp.einsum("t,tij->ij", alpha, H_groups.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------- the beam search
@dataclasses.dataclass
class Candidate:
    policy: tuple[int, ...]
    cost: float  # summed option costs of the prefix
    error: float
    state: Any = None  # the cached latent after the prefix


@dataclasses.dataclass
class SearchResult:
    policy: tuple[int, ...]
    avg_bits: float
    error: float
    front: list[tuple[float, float, tuple[int, ...]]]  # (avg bits, error, policy), by bits
    evaluated: int  # prefixes scored
    seconds: float
    per_step: list[int]  # survivors after pruning at each depth


def pareto_front(points: Sequence[tuple[float, float]], tol: float = 1e-12) -> list[int]:
    """Indices of the non-dominated points (minimising both coordinates; of equal points the
    first is kept), sorted by the first coordinate."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    keep, best = [], np.inf
    for i in order:
        if points[i][1] < best - tol:
            keep.append(i)
            best = points[i][1]
    return keep


def prune(cands: list[Candidate], *, depth: int, n_steps: int, budget: float, min_cost: float,
          beam_width: int | None) -> list[Candidate]:
    """Budget-feasibility pruning, Pareto pruning on (cost, error), then the beam."""
    cap = budget * n_steps + 1e-9
    feas = [c for c in cands if c.cost + (n_steps - depth) * min_cost <= cap]
    front = [feas[i] for i in pareto_front([(c.cost, c.error) for c in feas])]
    if beam_width is None or len(front) <= beam_width:
        return front
    best = min(range(len(front)), key=lambda i: front[i].error)
    # on track: a prefix whose own average is within the budget
    on_track = [i for i in range(len(front)) if front[i].cost <= budget * depth + 1e-9]
    keep = {best} | ({min(on_track, key=lambda i: front[i].error)} if on_track else set())
    pick = set(np.round(np.linspace(0, len(front) - 1,
                                    max(beam_width - len(keep), 1))).astype(int).tolist())
    pick |= keep
    if len(pick) > beam_width:  # the spread points give way to the kept ones
        pick = keep | set(sorted(pick - keep, key=lambda i: front[i].error)[
            :max(beam_width - len(keep), 0)])
    i = 0
    while len(pick) < beam_width:  # rounding collisions: fill from the low-error end
        j = sorted(range(len(front)), key=lambda k: front[k].error)[i]
        pick.add(j)
        i += 1
    return [front[i] for i in sorted(pick)]


def beam_search(n_steps: int, costs: Sequence[float], budget: float,
                expand: Callable[[Any, int, int], Any],
                score: Callable[[Any, int, tuple[int, ...]], float], init_state: Any = None, *,
                beam_width: int | None = 4, progress: bool = True,
                names: Sequence[str] | None = None,
                on_depth: Callable[[int, list[Candidate]], None] | None = None,
                evaluate: Callable[[tuple[int, ...]], float] | None = None) -> SearchResult:
    """The lowest-error policy (one option per step) whose average cost is within ``budget``.

    ``expand(state, i, k)``: the state after running step ``i`` with option ``k`` from ``state``
    (the latent before step ``i``); ``score(state, i, policy)``: the error of the prefix
    ``policy`` (length ``i``) whose state is ``state`` (at ``i == n_steps``: the final error).
    ``on_depth(depth, survivors)`` sees the beam after each step's pruning. ``evaluate(policy)``
    (the error of a whole policy), when given, also scores every uniform policy within the
    budget, and the result is the best of those and the searched ones: the search never returns
    a policy worse, on its own data, than a uniform one it could have chosen.
    """
    costs = [float(c) for c in costs]
    if not costs:
        raise ValueError("beam_search: no options")
    lo, hi = min(costs), max(costs)
    label = ", ".join(f"{n}={c:g}" for n, c in zip(names or range(len(costs)), costs,
                                                    strict=True))
    if not lo - 1e-9 <= budget <= hi + 1e-9:
        raise ValueError(f"average-bit budget {budget:g} is outside what the options can meet: "
                         f"[{lo:g}, {hi:g}] (options {label})")
    if beam_width is not None and beam_width < 1:
        raise ValueError(f"beam_width must be >= 1 or None, got {beam_width}")
    t0 = time.perf_counter()
    beam = [Candidate((), 0.0, 0.0, init_state)]
    evaluated = 0
    per_step = []
    finals: list[Candidate] = []
    bar = tqdm(range(n_steps), desc="AdaTSQ search", unit="step", disable=not progress)
    for i in bar:
        cands = []
        for c in beam:
            for k, ck in enumerate(costs):
                cost = c.cost + ck
                if cost + (n_steps - i - 1) * lo > budget * n_steps + 1e-9:
                    continue  # cannot meet the budget any more: not even scored
                st = expand(c.state, i, k)
                pol = (*c.policy, k)
                cands.append(Candidate(pol, cost, float(score(st, i + 1, pol)), st))
                evaluated += 1
        if i == n_steps - 1:
            finals = cands
        beam = prune(cands, depth=i + 1, n_steps=n_steps, budget=budget, min_cost=lo,
                     beam_width=beam_width)
        per_step.append(len(beam))
        if on_depth is not None:
            on_depth(i + 1, beam)
        bar.set_postfix(best=f"{min(c.error for c in beam):.3g}", beam=len(beam))
    if not beam:
        raise RuntimeError("beam_search: no feasible policy (budget pruning emptied the beam)")
    if evaluate is not None:
        for k, ck in enumerate(costs):
            if ck <= budget + 1e-9:
                pol = (k,) * n_steps
                if not any(c.policy == pol for c in finals):
                    finals.append(Candidate(pol, ck * n_steps, float(evaluate(pol))))
                    beam.append(finals[-1])
                    evaluated += 1
    best = min(beam, key=lambda c: (c.error, c.cost))
    fr = [finals[j] for j in pareto_front([(c.cost, c.error) for c in finals])]
    return SearchResult(best.policy, best.cost / n_steps, best.error,
                        [(c.cost / n_steps, c.error, c.policy) for c in fr], evaluated,
                        time.perf_counter() - t0, per_step)


def exhaustive(n_steps: int, costs: Sequence[float], budget: float,
               error: Callable[[tuple[int, ...]], float]) -> tuple[tuple[int, ...], float]:
    """Brute force over every policy (for tests on small ``n_steps``)."""
    import itertools

    best, best_e = None, np.inf
    for pol in itertools.product(range(len(costs)), repeat=n_steps):
        if sum(costs[k] for k in pol) > budget * n_steps + 1e-9:
            continue
        e = error(pol)
        if e < best_e:
            best, best_e = pol, e
    return best, best_e
