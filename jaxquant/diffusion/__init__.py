"""Diffusion sampling: DDPM / DDIM / flow-matching schedules and samplers, classifier-free
guidance, fixed initial noise and trajectories for calibration.

Schedules follow diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` /
``FlowMatchEulerDiscreteScheduler`` configs (:func:`schedule_from_config`); the samplers are pure
``lax.scan`` loops over the steps (see :mod:`jaxquant.diffusion.samplers`).
"""

from jaxquant.diffusion.samplers import (
    Trajectory,
    classifier_free_guidance,
    ddim_sample,
    ddpm_sample,
    flow_match_euler_sample,
    initial_noise,
    step_noise,
)
from jaxquant.diffusion.schedules import (
    FlowMatchSchedule,
    NoiseSchedule,
    dynamic_shift_mu,
    schedule_from_config,
)

__all__ = [
    "FlowMatchSchedule",
    "NoiseSchedule",
    "Trajectory",
    "classifier_free_guidance",
    "ddim_sample",
    "ddpm_sample",
    "dynamic_shift_mu",
    "flow_match_euler_sample",
    "initial_noise",
    "schedule_from_config",
    "step_noise",
]
