"""A tiny random class-conditional DiT in the diffusers layout, built in-process, with
trajectory calibration and held-out batches (shared by the DiT engine tests)."""

import jax
import numpy as np

from jaxquant import models
from jaxquant.diffusion.calibration import trajectory_batch
from jaxquant.diffusion.schedules import NoiseSchedule
from jaxquant.diffusion.train_fmnist import SCHEDULER
from jaxquant.models.dit.config import DiTConfig
from jaxquant.models.dit.export import init_dit_params, save_dit_diffusers


def tiny_config(num_layers: int = 2) -> DiTConfig:
    return DiTConfig(kind="dit", num_heads=2, head_dim=32, in_channels=1, out_channels=1,
                     num_layers=num_layers, sample_size=8, patch_size=2, num_classes=10,
                     num_train_timesteps=1000)


def make_tiny_dit(d, cfg: DiTConfig):
    """``(model, calib, held)``: the DiT saved under ``d`` and loaded back, its calibration batch
    (2 per class, 8 steps) and a held-out batch from other noise."""
    p = init_dit_params(cfg, jax.random.PRNGKey(0))
    g = np.random.default_rng(1)  # adaLN-Zero starts at zero: give every path a signal
    p = jax.tree.map(lambda a: np.asarray(a + g.normal(0, 0.05, a.shape), np.float32), p)
    save_dit_diffusers(cfg, p, d)
    m = models.load(d)
    sched = NoiseSchedule.from_config(SCHEDULER)
    calib = trajectory_batch(m.config, m.params, sched, n_per_class=2, steps=8, seed=0)
    held = trajectory_batch(m.config, m.params, sched, n_per_class=1, steps=8, seed=1)
    return m, calib, held
