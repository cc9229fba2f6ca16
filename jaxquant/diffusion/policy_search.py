"""AdaTSQ's policy search on a real DiT sampler (the search itself is
:func:`jaxquant.algorithms.adatsq.beam_search`; this is its plumbing).

The error of a policy is the mean squared difference between its final samples and the fp
model's from the same calibration noise and classes. A prefix's state is its cached latent; an
expansion runs one step from it (``step_range``), and a prefix is scored by rolling the remaining
steps out with the ``rollout`` option (default ``"budget"``: the costliest option within the
budget, so a prefix's score is the error of the whole policy it would be if the rest stayed at the
budget's uniform width; ``"fp"``: the damage the prefix itself does) under one compiled function
whatever the prefix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.algorithms.adatsq import SearchResult, beam_search
from jaxquant.diffusion.calibration import sample_dit, sample_dit_policy
from jaxquant.diffusion.schedules import NoiseSchedule


def search_policy(cfg, option_params: list, costs, budget: float, fp_params: dict,
                  schedule: NoiseSchedule, labels, x_T, *, steps: int, guidance: float = 1.5,
                  beam_width: int | None = 4, rollout: str | int = "budget", names=None,
                  progress: bool = True) -> SearchResult:
    """The lowest-error per-step policy over ``option_params`` (costs = average bits) within the
    average ``budget``; see the module docstring. ``rollout``: ``"budget"`` (the costliest
    option within the budget: a prefix is scored as the whole policy it would be if the rest
    stayed at the budget's uniform width), ``"fp"``, or an option index."""
    n_opt = len(option_params)
    if n_opt != len(costs):
        raise ValueError(f"{n_opt} options but {len(costs)} costs")
    opts = [*option_params, fp_params]  # the last: the fp model
    if rollout == "budget":
        within = [k for k in range(n_opt) if costs[k] <= budget + 1e-9]
        rollout = max(within, key=lambda k: costs[k]) if within else "fp"
    r = n_opt if rollout == "fp" else int(rollout)
    if not 0 <= r <= n_opt:
        raise ValueError(f"rollout must be 'fp' or an option index < {n_opt}, got {rollout!r}")
    labels = jnp.asarray(labels, jnp.int32)
    x_T = jnp.asarray(x_T, jnp.float32)
    ref = jax.jit(lambda: sample_dit(cfg, fp_params, schedule, labels, steps=steps,
                                     guidance=guidance, x_T=x_T))()

    @jax.jit
    def advance(x, lo, hi, policy):
        return sample_dit_policy(cfg, opts, schedule, labels, policy, steps=steps,
                                 guidance=guidance, x_T=x, step_range=(lo, hi))

    @jax.jit
    def mse(x):
        return jnp.mean(jnp.square(jnp.clip(x, -1.0, 1.0) - jnp.clip(ref, -1.0, 1.0)))

    def expand(x, i, k):
        pol = np.full(steps, r, np.int32)
        pol[i] = k
        return advance(x, jnp.int32(i), jnp.int32(i + 1), jnp.asarray(pol))

    def score(x, i, policy):
        if i < steps:
            x = advance(x, jnp.int32(i), jnp.int32(steps), jnp.full((steps,), r, jnp.int32))
        return float(mse(x))

    def evaluate(policy):
        return score(advance(x_T, jnp.int32(0), jnp.int32(steps), jnp.asarray(policy,
                                                                              jnp.int32)),
                     steps, policy)

    return beam_search(steps, costs, budget, expand, score, x_T, beam_width=beam_width,
                       progress=progress, names=names, evaluate=evaluate)


def policy_error(cfg, option_params: list, policy, fp_params: dict, schedule: NoiseSchedule,
                 labels, x_T, *, steps: int, guidance: float = 1.5) -> float:
    """The end-to-end error of a whole policy (as the search scores a full policy)."""
    labels = jnp.asarray(labels, jnp.int32)
    ref = sample_dit(cfg, fp_params, schedule, labels, steps=steps, guidance=guidance, x_T=x_T)
    x = sample_dit_policy(cfg, option_params, schedule, labels, policy, steps=steps,
                          guidance=guidance, x_T=x_T)
    return float(jnp.mean(jnp.square(jnp.clip(x, -1, 1) - jnp.clip(ref, -1, 1))))


def plot_front(result: SearchResult, path: str, *, budget: float, names=None, costs=None,
               extra: dict | None = None) -> None:
    """The Pareto front (error against average bits) of the full policies the search scored,
    the chosen policy, and ``extra`` reference points ``{label: (avg bits, error)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4))
    fr = np.array([(b, e) for b, e, _ in result.front])
    a0.plot(fr[:, 0], fr[:, 1], "o-", color="tab:blue", label="Pareto front (searched)")
    a0.plot([result.avg_bits], [result.error], "r*", ms=14, label="chosen")
    a0.axvline(budget, color="k", ls="--", lw=1, label=f"budget {budget:g} bits")
    for lab, (b, e) in (extra or {}).items():
        a0.plot([b], [e], "s", label=lab)
    a0.set_xlabel("average bits per step")
    a0.set_ylabel("MSE of the final samples vs fp")
    a0.set_yscale("log")
    a0.legend(fontsize=7)
    pol = np.asarray(result.policy)
    a1.step(np.arange(len(pol)), [costs[k] for k in pol] if costs else pol, where="mid")
    a1.set_xlabel("sampler step (0 = pure noise)")
    a1.set_ylabel("bits at the step")
    if names:
        a1.set_title("chosen policy: " + " ".join(str(names[k]) for k in pol), fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
