"""Noise schedules of the discrete-time (DDPM / DDIM) and flow-matching samplers.

The tables are computed on the host in numpy, once per configuration, with the same arithmetic
(and float32 rounding) as diffusers' ``DDPMScheduler`` / ``DDIMScheduler`` and
``FlowMatchEulerDiscreteScheduler``, so a model sampled here and through diffusers sees the same
timesteps and coefficients. The samplers in :mod:`jaxquant.diffusion.samplers` turn them into
per-step constants of a ``lax.scan``.

Discrete-time schedule (:class:`NoiseSchedule`), ``T = num_train_timesteps``:

* ``betas`` ``[T]``: ``"linear"`` (``linspace(beta_start, beta_end)``), ``"scaled_linear"``
  (``linspace(sqrt(beta_start), sqrt(beta_end)) ** 2``), ``"squaredcos_cap_v2"`` (the cosine
  ``alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2`` discretized, each beta capped at
  0.999), or explicit ``trained_betas``.
* ``alphas_cumprod`` ``[T]``: ``prod_{s <= t} (1 - beta_s)``, float32.
* inference timesteps ``[n]`` (descending) by ``timestep_spacing``: ``"leading"``
  (``arange(n) * (T // n)`` reversed, plus ``steps_offset``), ``"trailing"``
  (``round(arange(T, 0, -T / n)) - 1``) or ``"linspace"`` (``round(linspace(0, T - 1, n))``
  reversed).

Flow-matching schedule (:class:`FlowMatchSchedule`): sigmas ``[n + 1]`` from 1 towards 0 (the
last one exactly 0), shifted by ``shift * s / (1 + (shift - 1) * s)`` or, with dynamic shifting,
by ``exp(mu) / (exp(mu) + (1 / s - 1))`` (``"exponential"``) / ``mu / (mu + (1 / s - 1))``
(``"linear"``); the model's timestep is ``sigma * T``.

Both are built from a diffusers ``scheduler_config.json`` dict with :func:`schedule_from_config`
(or the classes' ``from_config``); a field that changes the math in a way not implemented here is
refused with a ``ValueError`` naming it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
TIME_SHIFT_TYPES = ("exponential", "linear")

_DISCRETE_CLASSES = ("DDIMScheduler", "DDPMScheduler")
_FLOW_CLASSES = ("FlowMatchEulerDiscreteScheduler",)

# config fields accepted only at the value that does not change the math: field -> allowed values
_DISCRETE_INERT = {
    "thresholding": (False, None),
    "rescale_betas_zero_snr": (False, None),
}
# fields that only matter when a refused option is on: accepted with any value
_DISCRETE_IGNORED = ("dynamic_thresholding_ratio", "sample_max_value")

_FLOW_INERT = {
    "invert_sigmas": (False, None),
    "shift_terminal": (None, 0, 0.0),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "stochastic_sampling": (False, None),
}


def _check_steps(num_inference_steps: int, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps,
                                                               (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {n}")
    if n > num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={n} is larger than num_train_timesteps={num_train_timesteps}: "
            "the model was trained on only that many timesteps"
        )
    return n


def _split_config(config: Mapping[str, Any], known: Sequence[str], inert: Mapping[str, tuple],
                  ignored: Sequence[str], owner: str, ignore_unknown: bool) -> dict[str, Any]:
    """Keyword arguments for ``owner`` from a diffusers config, refusing what is not supported."""
    if not isinstance(config, Mapping):
        raise ValueError(f"{owner}.from_config needs a dict (scheduler_config.json), got "
                         f"{type(config).__name__}")
    kw = {}
    for name, value in config.items():
        if name.startswith("_"):  # _class_name, _diffusers_version, ...
            continue
        if name in known:
            kw[name] = value
        elif name in inert:
            if value not in inert[name]:
                raise ValueError(
                    f"scheduler config field {name!r}={value!r} is not supported by {owner} "
                    f"(supported: {inert[name][0]!r})"
                )
        elif name in ignored:
            continue
        elif not ignore_unknown:
            raise ValueError(f"scheduler config field {name!r} is not supported by {owner}")
    return kw


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """A DDPM / DDIM discrete-time schedule (the fields of diffusers' scheduler config).

    Defaults are diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` defaults (they agree).
    ``set_alpha_to_one`` is used by DDIM only, ``variance_type`` by DDPM only.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    variance_type: str = "fixed_small"

    def __post_init__(self):
        if self.trained_betas is not None:
            tb = tuple(float(b) for b in np.asarray(self.trained_betas, np.float64).reshape(-1))
            object.__setattr__(self, "trained_betas", tb)
            object.__setattr__(self, "num_train_timesteps", len(tb))
            if not all(0.0 < b < 1.0 for b in tb):
                raise ValueError("trained_betas must all lie in (0, 1)")
        if int(self.num_train_timesteps) < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        object.__setattr__(self, "num_train_timesteps", int(self.num_train_timesteps))
        if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got "
                             f"{self.beta_schedule!r}")
        if self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got "
                             f"{self.timestep_spacing!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got "
                             f"{self.prediction_type!r}")
        if self.variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type must be one of {VARIANCE_TYPES}, got "
                             f"{self.variance_type!r}")
        if not float(self.clip_sample_range) > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_sample_range}")
        if int(self.steps_offset) < 0:
            raise ValueError(f"steps_offset must be >= 0, got {self.steps_offset}")
        object.__setattr__(self, "steps_offset", int(self.steps_offset))

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, ignore_unknown: bool = False
                    ) -> NoiseSchedule:
        """From a diffusers ``DDIMScheduler`` / ``DDPMScheduler`` config dict.

        Keys starting with ``_`` are metadata. ``thresholding`` and ``rescale_betas_zero_snr``
        are accepted only off; any other unknown key raises ``ValueError`` naming it unless
        ``ignore_unknown`` (e.g. to run DDIM on a model whose config names another scheduler).
        """
        name = config.get("_class_name") if isinstance(config, Mapping) else None
        if name is not None and name in _FLOW_CLASSES:
            raise ValueError(f"_class_name {name!r} is a flow-matching scheduler: use "
                             "FlowMatchSchedule.from_config")
        known = [f.name for f in dataclasses.fields(cls)]
        kw = _split_config(config, known, _DISCRETE_INERT, _DISCRETE_IGNORED, cls.__name__,
                           ignore_unknown)
        if kw.get("trained_betas") is not None:
            kw["trained_betas"] = tuple(np.asarray(kw["trained_betas"], np.float64).tolist())
        return cls(**kw)

    # --- tables -------------------------------------------------------------------------------

    def betas(self) -> np.ndarray:
        """float32 ``[T]``."""
        T = self.num_train_timesteps
        if self.trained_betas is not None:
            return np.asarray(self.trained_betas, np.float32)
        if self.beta_schedule == "linear":
            return np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64).astype(
                np.float32)
        if self.beta_schedule == "scaled_linear":
            r = np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T,
                            dtype=np.float64).astype(np.float32)
            return r * r
        # squaredcos_cap_v2: discretized cosine alpha_bar, in float64 then float32

        def abar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        b = [min(1.0 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
        return np.asarray(b, np.float32)

    def alphas_cumprod(self) -> np.ndarray:
        """``prod_{s <= t} (1 - beta_s)``, float32 ``[T]`` (cumulated in float32)."""
        return np.cumprod(np.float32(1.0) - self.betas(), dtype=np.float32)

    def timesteps(self, num_inference_steps: int) -> np.ndarray:
        """The inference timesteps, int32 ``[n]``, descending."""
        T = self.num_train_timesteps
        n = _check_steps(num_inference_steps, T)
        if self.timestep_spacing == "linspace":
            ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + self.steps_offset
        else:  # trailing
            ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
        if ts.shape != (n,):
            # arange with the float step T / n overshoots by one for some (T, n): diffusers then
            # runs n + 1 steps, the last at timestep -1 (which wraps to alphas_cumprod[-1])
            raise ValueError(
                f"num_inference_steps={n} with timestep_spacing='trailing' and "
                f"num_train_timesteps={T} gives {ts.shape[0]} timesteps (the last {int(ts[-1])}) "
                "by diffusers' float arithmetic; choose another num_inference_steps"
            )
        if ts.max() >= T or ts.min() < 0:
            raise ValueError(
                f"steps_offset={self.steps_offset} puts timestep {int(ts.max())} outside "
                f"[0, {T - 1}] (num_train_timesteps={T}, num_inference_steps={n})"
            )
        return ts.astype(np.int32)

    def final_alpha_cumprod(self) -> np.float32:
        """DDIM's ``alpha_bar`` after the last step: 1, or ``alphas_cumprod[0]``."""
        if self.set_alpha_to_one:
            return np.float32(1.0)
        return self.alphas_cumprod()[0]

    def ddim_tables(self, num_inference_steps: int) -> dict[str, np.ndarray]:
        """Per-step DDIM tables, each ``[n]``: ``timesteps`` (int32), ``alpha_t`` and
        ``alpha_prev`` (float32 ``alpha_bar`` at the step and at ``t - T // n``, the final
        alpha where that is negative), as diffusers' ``DDIMScheduler.step`` indexes them."""
        ts = self.timesteps(num_inference_steps)
        ac = self.alphas_cumprod()
        prev = ts.astype(np.int64) - self.num_train_timesteps // int(num_inference_steps)
        a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], self.final_alpha_cumprod())
        return {"timesteps": ts, "alpha_t": ac[ts], "alpha_prev": a_prev.astype(np.float32)}

    def ddpm_tables(self, num_inference_steps: int) -> dict[str, np.ndarray]:
        """Per-step DDPM tables, each ``[n]``: ``timesteps`` (int32), ``alpha_t`` and
        ``alpha_prev`` (``alpha_bar`` at the next inference timestep, 1 after the last), as
        diffusers' ``DDPMScheduler.step`` indexes them."""
        ts = self.timesteps(num_inference_steps)
        ac = self.alphas_cumprod()
        a_prev = np.concatenate([ac[ts[1:]], np.ones((1,), np.float32)])
        return {"timesteps": ts, "alpha_t": ac[ts], "alpha_prev": a_prev.astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class FlowMatchSchedule:
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` (plain Euler, no stochastic sampling).

    ``use_dynamic_shifting`` (Flux) needs ``mu`` at sampling time; :func:`dynamic_shift_mu`
    computes Flux's ``mu`` from the image sequence length.
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if int(self.num_train_timesteps) < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        object.__setattr__(self, "num_train_timesteps", int(self.num_train_timesteps))
        if not float(self.shift) > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got "
                             f"{self.time_shift_type!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any], *, ignore_unknown: bool = False
                    ) -> FlowMatchSchedule:
        """From a diffusers ``FlowMatchEulerDiscreteScheduler`` config dict.

        ``invert_sigmas``, ``shift_terminal``, ``use_karras_sigmas``,
        ``use_exponential_sigmas``, ``use_beta_sigmas`` and ``stochastic_sampling`` are accepted
        only off; any other unknown key raises ``ValueError`` naming it unless
        ``ignore_unknown``.
        """
        name = config.get("_class_name") if isinstance(config, Mapping) else None
        if name is not None and name in _DISCRETE_CLASSES:
            raise ValueError(f"_class_name {name!r} is a discrete-time scheduler: use "
                             "NoiseSchedule.from_config")
        known = [f.name for f in dataclasses.fields(cls)]
        kw = _split_config(config, known, _FLOW_INERT, (), cls.__name__, ignore_unknown)
        for k in ("base_shift", "max_shift"):
            if k in kw and kw[k] is None:
                del kw[k]
        return cls(**kw)

    def _train_sigma_range(self) -> tuple[float, float]:
        """(sigma_max, sigma_min) of the training sigmas, float32-rounded as diffusers has them."""
        T = self.num_train_timesteps
        s = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
        if not self.use_dynamic_shifting:
            sh = np.float32(self.shift)
            s = sh * s / (np.float32(1.0) + (sh - np.float32(1.0)) * s)
        s = s.astype(np.float32)
        return float(s[0]), float(s[-1])

    def _time_shift(self, mu: float, s: np.ndarray) -> np.ndarray:
        if self.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / s - 1))
        return mu / (mu + (1 / s - 1))

    def sigmas(self, num_inference_steps: int, *, mu: float | None = None,
               sigmas: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(timesteps [n], sigmas [n + 1])``, float32; ``sigmas[n] = 0``.

        ``sigmas`` (length ``n``) replaces the default ``linspace(sigma_max, sigma_min, n)``
        before shifting, as Flux's pipeline passes ``linspace(1, 1 / n, n)``.
        """
        T = self.num_train_timesteps
        n = _check_steps(num_inference_steps, T)
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("mu is required when use_dynamic_shifting=True "
                                 "(see dynamic_shift_mu)")
            mu = float(mu)
            if not math.isfinite(mu):
                raise ValueError(f"mu must be finite, got {mu}")
        elif mu is not None:
            raise ValueError("mu is only used with use_dynamic_shifting=True; this schedule "
                             f"uses the fixed shift={self.shift}")
        if sigmas is None:
            smax, smin = self._train_sigma_range()
            s = np.linspace(smax * T, smin * T, n) / T
        else:
            s = np.asarray(sigmas, dtype=np.float64).reshape(-1).astype(np.float32)
            if s.shape != (n,):
                raise ValueError(f"sigmas has {s.shape[0]} entries, num_inference_steps={n}")
            if not (np.all(s > 0) and np.all(s <= 1)):
                raise ValueError("sigmas must lie in (0, 1]")
        if self.use_dynamic_shifting:
            s = self._time_shift(mu, s)
        else:
            s = self.shift * s / (1 + (self.shift - 1) * s)
        s = np.asarray(s).astype(np.float32)
        timesteps = s * np.float32(T)
        return timesteps.astype(np.float32), np.concatenate([s, np.zeros((1,), np.float32)])


def dynamic_shift_mu(schedule: FlowMatchSchedule, image_seq_len: int) -> float:
    """Flux's ``mu``: linear in the image token count, ``base_shift`` at
    ``base_image_seq_len`` and ``max_shift`` at ``max_image_seq_len``."""
    slope = (schedule.max_shift - schedule.base_shift) / (
        schedule.max_image_seq_len - schedule.base_image_seq_len)
    return float(image_seq_len * slope + schedule.base_shift - slope * schedule.base_image_seq_len)


def schedule_from_config(config: Mapping[str, Any], *, ignore_unknown: bool = False
                         ) -> NoiseSchedule | FlowMatchSchedule:
    """A schedule from a diffusers ``scheduler_config.json`` dict, by its ``_class_name``.

    ``DDIMScheduler`` / ``DDPMScheduler`` give a :class:`NoiseSchedule`,
    ``FlowMatchEulerDiscreteScheduler`` a :class:`FlowMatchSchedule`; without ``_class_name``
    the fields decide (``shift`` means flow matching). Other classes are refused.
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"schedule_from_config needs a dict, got {type(config).__name__}")
    name = config.get("_class_name")
    if name in _FLOW_CLASSES or (name is None and "shift" in config):
        return FlowMatchSchedule.from_config(config, ignore_unknown=ignore_unknown)
    if name is None or name in _DISCRETE_CLASSES:
        return NoiseSchedule.from_config(config, ignore_unknown=ignore_unknown)
    raise ValueError(f"_class_name {name!r} is not supported; supported schedulers: "
                     f"{_DISCRETE_CLASSES + _FLOW_CLASSES}")
