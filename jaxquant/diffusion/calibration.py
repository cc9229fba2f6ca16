"""Calibration data for diffusion transformers: the model inputs along sampler trajectories.

:func:`trajectory_batch` samples class-conditional DDIM trajectories of the fp model (fixed
noise, classifier-free guidance as at inference) and returns every step's model input as one
calibration sample: ``latents`` ``[S*B, C, H, W]``, ``timesteps``, ``class_labels`` and ``group``
(the step index, so statistics can be kept per timestep). With guidance the null-class half of
each step is included too, since the model runs on it at inference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.diffusion.samplers import classifier_free_guidance, ddim_sample, initial_noise
from jaxquant.diffusion.schedules import NoiseSchedule


def dit_model_fn(cfg, params):
    """``model_fn(x, t, y)`` of a DiT (:func:`jaxquant.models.dit.dit_forward`)."""
    from jaxquant.models.dit.model import dit_forward

    def f(x, t, y):
        return dit_forward(cfg, params, x, t, y)

    return f


def check_policy(policy, steps: int, n_options: int, *, names=None) -> np.ndarray:
    """A per-step policy as int32 ``[steps]`` (option indices), refused by name when its length
    is not the sampler's steps or an entry names no option."""
    p = np.asarray(policy)
    if p.ndim != 1 or p.shape[0] != steps:
        raise ValueError(f"policy: {p.shape[0] if p.ndim == 1 else p.shape} entries for a "
                         f"sampler of {steps} steps (one option per step)")
    if not np.issubdtype(p.dtype, np.integer) or p.min() < 0 or p.max() >= n_options:
        bad = [int(v) for v in p if not 0 <= int(v) < n_options]
        raise ValueError(f"policy: option(s) {bad} out of range; there are {n_options} options"
                         + (f" ({list(names)})" if names else ""))
    return p.astype(np.int32)


def _step_table(schedule: NoiseSchedule, steps: int) -> jax.Array:
    """``table[t]`` = the index of the DDIM step whose timestep is ``t``."""
    ts = np.asarray(schedule.ddim_tables(steps)["timesteps"]).astype(np.int64)
    table = np.zeros(int(ts.max()) + 1, np.int32)
    table[ts] = np.arange(steps, dtype=np.int32)
    return jnp.asarray(table)


def policy_model_fn(cfg, option_params, schedule: NoiseSchedule, steps: int, policy,
                    groups=None):
    """``model_fn(x, t, y)`` that runs, at the sampler step whose timestep is ``t``, the option
    ``policy[step]`` of ``option_params`` (a list of param trees: all present, the choice made by
    ``lax.switch`` inside the jitted loop, so a policy change recompiles nothing). ``policy`` may
    be a traced int32 ``[steps]``.

    Per group of layers: ``groups`` (a list of lists of block indices covering every block once)
    and ``policy`` ``[steps, len(groups)]``: at each step each group's blocks run their own
    option (the embedding and the output layer, fp in every option, come from option 0)."""
    from jaxquant.models.dit.model import dit_forward

    if groups is not None:
        return _grouped_policy_fn(cfg, option_params, schedule, steps, policy, groups)

    table = _step_table(schedule, steps)
    branches = [functools.partial(lambda p, x, t, y: dit_forward(cfg, p, x, t, y), p)
                for p in option_params]

    def f(x, t, y):
        i = table[jnp.clip(t[0].astype(jnp.int32), 0, table.shape[0] - 1)]
        return jax.lax.switch(jnp.asarray(policy)[i], branches, x, t, y)

    return f


def _grouped_policy_fn(cfg, option_params, schedule, steps, policy, groups):
    from jaxquant.models.dit.model import (
        block_params,
        broadcast_batch,
        dit_block_apply_emb,
        dit_block_cond,
        dit_embed,
        dit_head,
        num_blocks,
    )

    nb = num_blocks(option_params[0])
    flat = sorted(b for g in groups for b in g)
    if flat != list(range(nb)):
        raise ValueError(f"groups must cover the {nb} blocks once each, got {groups}")
    group_of = {b: gi for gi, g in enumerate(groups) for b in g}
    table = _step_table(schedule, steps)

    def block_branch(bp):
        def run(x, t, y):
            emb = dit_block_cond(cfg, bp, t, y)
            return dit_block_apply_emb(cfg, bp, x, emb), emb
        return run

    branches = [[block_branch(block_params(p, b)) for p in option_params] for b in range(nb)]
    p0 = option_params[0]

    def f(latents, t, y):
        bsz, _, hh, ww = latents.shape
        t, y = broadcast_batch(t, bsz), broadcast_batch(y, bsz)
        i = table[jnp.clip(t[0].astype(jnp.int32), 0, table.shape[0] - 1)]
        row = jnp.asarray(policy)[i]
        x = dit_embed(cfg, p0, latents)
        cond0 = None
        for b in range(nb):
            x, emb = jax.lax.switch(row[group_of[b]], branches[b], x, t, y)
            cond0 = emb if cond0 is None else cond0
        return dit_head(cfg, p0, x, cond0, hh // cfg.patch_size, ww // cfg.patch_size)

    return f


def sample_dit_policy(cfg, option_params, schedule: NoiseSchedule, labels, policy, *,
                      steps: int = 50, guidance: float = 1.5, seed: int = 0, x_T=None,
                      step_range=None, groups=None):
    """:func:`sample_dit` with a per-step choice among ``option_params`` (e.g. the W8A8, W4A4 and
    W3A3 models): step ``i`` runs ``option_params[policy[i]]`` (with ``groups``: block group
    ``g`` runs ``option_params[policy[i, g]]``). ``step_range`` resumes a cached
    prefix (see :func:`jaxquant.diffusion.samplers.ddim_sample`)."""
    if not option_params:
        raise ValueError("sample_dit_policy: no options (a list of calibrated param trees)")
    want = (steps,) if groups is None else (steps, len(groups))
    if groups is not None:
        p = np.asarray(policy)
        if p.shape != want:
            raise ValueError(f"policy: shape {p.shape} for {steps} steps x {len(groups)} layer "
                             "groups")
        policy = np.stack([check_policy(p[:, g], steps, len(option_params))
                           for g in range(len(groups))], axis=1)
    elif isinstance(policy, list | tuple | np.ndarray):
        policy = check_policy(policy, steps, len(option_params))
    elif jnp.shape(policy) != want:
        raise ValueError(f"policy: shape {jnp.shape(policy)} for a sampler of {steps} steps")
    fn = policy_model_fn(cfg, option_params, schedule, steps, policy, groups)
    return sample_dit(cfg, None, schedule, labels, steps=steps, guidance=guidance, seed=seed,
                      x_T=x_T, model_fn=fn, step_range=step_range)


def sample_dit(cfg, params, schedule: NoiseSchedule, labels, *, steps: int = 50,
               guidance: float = 1.5, seed: int = 0, x_T=None, return_trajectory: bool = False,
               model_fn=None, step_range=None):
    """DDIM samples ``[B, C, H, W]`` of a class-conditional DiT for ``labels`` ``[B]`` from the
    noise of ``seed`` (or ``x_T``): the same call for an fp and a quantized ``params`` (or a
    ``model_fn(x, t, y)`` in their place, e.g. :func:`policy_model_fn`). ``step_range``: run
    only those steps, ``x_T`` being the latent before the first."""
    labels = jnp.asarray(labels).astype(jnp.int32)
    b = labels.shape[0]
    shape = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if x_T is None:
        x_T = initial_noise(jax.random.PRNGKey(seed), shape)
    learned = cfg.out_channels == 2 * cfg.in_channels
    base = dit_model_fn(cfg, params) if model_fn is None else model_fn
    if guidance > 1.0:
        fn = classifier_free_guidance(base, guidance, cfg.num_classes, learned_sigma=learned,
                                      channel_axis=1)
    else:
        fn = base
    return ddim_sample(fn, schedule, jnp.asarray(x_T), steps, cond=labels, learned_sigma=learned,
                       channel_axis=1, return_trajectory=return_trajectory,
                       step_range=step_range)


def trajectory_batch(cfg, params, schedule: NoiseSchedule, *, n_per_class: int = 4,
                     steps: int = 25, guidance: float = 1.5, seed: int = 0,
                     classes=None) -> dict:
    """The model inputs along fp DDIM trajectories: ``n_per_class`` samples per class, ``steps``
    steps each. Returns the calibration batch ``{"latents", "timesteps", "class_labels",
    "group"}`` with ``S * B`` samples (``2 S B`` with guidance: the null-class inputs too), in
    step-major order shuffled by ``seed`` so that any prefix covers every timestep."""
    classes = list(range(cfg.num_classes)) if classes is None else list(classes)
    labels = np.repeat(np.asarray(classes, np.int32), n_per_class)
    _, traj = jax.jit(lambda: sample_dit(cfg, params, schedule, labels, steps=steps,
                                         guidance=guidance, seed=seed,
                                         return_trajectory=True))()
    lat = np.asarray(traj.latents)  # [S, B, C, H, W]
    ts = np.asarray(traj.timesteps)  # [S]
    s, b = lat.shape[:2]
    y = np.broadcast_to(labels, (s, b))
    if guidance > 1.0:  # the null-class half of every step runs on the same latents
        lat = np.concatenate([lat, lat], axis=1)
        y = np.concatenate([y, np.full((s, b), cfg.num_classes, np.int32)], axis=1)
    n = lat.shape[1]
    out = {"latents": lat.reshape(s * n, *lat.shape[2:]).astype(np.float32),
           "timesteps": np.repeat(ts, n).astype(np.float32),
           "class_labels": y.reshape(-1).astype(np.int32),
           "group": np.repeat(np.arange(s, dtype=np.int32), n)}
    perm = np.random.default_rng(seed).permutation(s * n)
    return {k: v[perm] for k, v in out.items()}
