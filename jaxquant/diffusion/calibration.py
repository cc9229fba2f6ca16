"""Calibration data for diffusion transformers: the model inputs along sampler trajectories.

:func:`trajectory_batch` samples class-conditional DDIM trajectories of the fp model (fixed
noise, classifier-free guidance as at inference) and returns every step's model input as one
calibration sample: ``latents`` ``[S*B, C, H, W]``, ``timesteps``, ``class_labels`` and ``group``
(the step index, so statistics can be kept per timestep). With guidance the null-class half of
each step is included too, since the model runs on it at inference.
"""

from __future__ import annotations

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


def sample_dit(cfg, params, schedule: NoiseSchedule, labels, *, steps: int = 50,
               guidance: float = 1.5, seed: int = 0, x_T=None, return_trajectory: bool = False):
    """DDIM samples ``[B, C, H, W]`` of a class-conditional DiT for ``labels`` ``[B]`` from the
    noise of ``seed`` (or ``x_T``): the same call for an fp and a quantized ``params``."""
    labels = jnp.asarray(labels).astype(jnp.int32)
    b = labels.shape[0]
    shape = (b, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    if x_T is None:
        x_T = initial_noise(jax.random.PRNGKey(seed), shape)
    learned = cfg.out_channels == 2 * cfg.in_channels
    base = dit_model_fn(cfg, params)
    if guidance > 1.0:
        fn = classifier_free_guidance(base, guidance, cfg.num_classes, learned_sigma=learned,
                                      channel_axis=1)
    else:
        fn = base
    return ddim_sample(fn, schedule, jnp.asarray(x_T), steps, cond=labels, learned_sigma=learned,
                       channel_axis=1, return_trajectory=return_trajectory)


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
