"""DDIM, DDPM (ancestral) and flow-matching Euler samplers, and classifier-free guidance.

Every sampler is a pure function of its array arguments: the schedule's tables are host-side
constants, the steps run in one ``jax.lax.scan`` with fixed shapes, and the noise comes from an
explicit key or array. Wrap a sampler in ``jax.jit`` with the model function, the schedule and
the step count static (``functools.partial``) to compile it once.

Shapes: ``x_T`` is the initial latent ``[B, ...]`` (any layout; ``channel_axis`` names the
channel axis where channels matter, ``-1`` for NHWC, ``1`` for diffusers' NCHW). A model function
is ``model_fn(x [B, ...], t [B]) -> out`` or, with ``cond``, ``model_fn(x, t, cond)``; ``t`` is
int32 (the discrete timestep) for DDIM / DDPM and float32 (``sigma * num_train_timesteps``) for
flow matching. ``out`` has ``x``'s shape, or twice its channels when ``learned_sigma`` (DiT-style
models that also predict the variance: the sampler uses the first half, as diffusers'
``DiTPipeline`` does, and DDPM's ``"learned"`` / ``"learned_range"`` variance types read the
second half).

Fixed noise: :func:`initial_noise` draws ``x_T`` from a key, so a float and a quantized model can
be sampled from the same ``x_T`` (and the same per-step noise: the same ``key`` or ``noise``).
``return_trajectory=True`` also returns the model inputs of every step (a :class:`Trajectory`,
``latents [steps, B, ...]`` and ``timesteps [steps]``), e.g. as calibration data.

The state is kept in float32 whatever ``x_T``'s dtype; the model sees it cast to ``x_T``'s dtype
and the result is returned in ``x_T``'s dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.diffusion.schedules import FlowMatchSchedule, NoiseSchedule

Array = jax.Array
_F32 = jnp.float32


class Trajectory(NamedTuple):
    """The model inputs of every sampling step.

    ``latents`` ``[steps, B, ...]``: ``x_t`` fed to the model at each step (``latents[0]`` is
    ``x_T``); ``timesteps`` ``[steps]``: the model's timestep at each step (int32 for DDIM /
    DDPM, float32 ``sigma * T`` for flow matching).
    """

    latents: Array
    timesteps: Array


def initial_noise(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """Standard normal ``x_T`` of ``shape`` from ``key`` (the same key gives the same noise)."""
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a float dtype, got {dtype}")
    return jax.random.normal(key, tuple(int(s) for s in shape), dtype)


def step_noise(key: Array, step: int | Array, shape: tuple[int, ...]) -> Array:
    """The float32 noise a stochastic sampler adds at step ``step`` (0-based) when given ``key``:
    ``normal(fold_in(key, step), shape)``."""
    return jax.random.normal(jax.random.fold_in(key, step), tuple(shape), _F32)


# --- input checks -------------------------------------------------------------------------------


def _check_latents(x_T: Array, name: str = "x_T") -> Array:
    x_T = jnp.asarray(x_T)
    if not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array, got dtype {x_T.dtype}")
    if x_T.ndim < 1 or x_T.shape[0] < 1:
        raise ValueError(f"{name} must be [B, ...] with B >= 1, got shape {x_T.shape}")
    if not isinstance(x_T, jax.core.Tracer):
        finite = np.isfinite(np.asarray(x_T, np.float32))
        if not finite.all():
            bad = "NaN" if np.isnan(np.asarray(x_T, np.float32)).any() else "inf"
            raise ValueError(f"{name} contains {bad} ({int((~finite).sum())} non-finite values)")
    return x_T


def _check_noise(noise: Array | None, key: Array | None, n: int, shape: tuple[int, ...],
                 needed: bool, who: str) -> Array | None:
    if noise is None:
        if needed and key is None:
            raise ValueError(f"{who} adds noise: pass key (a PRNG key) or noise "
                             f"[{n}, *x_T.shape]")
        return None
    if key is not None:
        raise ValueError("pass either key or noise, not both")
    noise = jnp.asarray(noise)
    if noise.shape != (n, *shape):
        raise ValueError(f"noise must have shape {(n, *shape)} ([num_inference_steps, "
                         f"*x_T.shape]), got {noise.shape}")
    if not jnp.issubdtype(noise.dtype, jnp.floating):
        raise ValueError(f"noise must be a float array, got dtype {noise.dtype}")
    return noise.astype(_F32)


def _axis(channel_axis: int, ndim: int) -> int:
    ax = channel_axis + ndim if channel_axis < 0 else channel_axis
    if not 1 <= ax < ndim:
        raise ValueError(f"channel_axis={channel_axis} is not a non-batch axis of a rank-{ndim} "
                         "latent")
    return ax


def _split_output(out: Array, x: Array, learned_sigma: bool, channel_axis: int
                  ) -> tuple[Array, Array | None]:
    """The prediction (x's shape) and, for learned-sigma models, the variance half."""
    if not learned_sigma:
        if out.shape != x.shape:
            raise ValueError(f"model_fn returned shape {out.shape} for input {x.shape}; a model "
                             "that also predicts the variance needs learned_sigma=True")
        return out, None
    ax = _axis(channel_axis, x.ndim)
    want = x.shape[:ax] + (2 * x.shape[ax],) + x.shape[ax + 1:]
    if out.shape != want:
        raise ValueError(f"learned_sigma=True needs model_fn to return {want} (twice the "
                         f"channels on axis {channel_axis}), got {out.shape}")
    c = x.shape[ax]
    return (jax.lax.slice_in_dim(out, 0, c, axis=ax),
            jax.lax.slice_in_dim(out, c, 2 * c, axis=ax))


def _caller(model_fn: Callable, cond: Any) -> Callable[[Array, Array], Array]:
    if cond is None:
        return model_fn
    return lambda x, t: model_fn(x, t, cond)


def _predict(call, x, s, B, dtype, pt, clip, r, learned_sigma, channel_axis):
    """One model call of a DDIM / DDPM step: ``(x_in, x0, eps, variance half)`` with x0 clipped
    to ``±r`` when the schedule clips."""
    x_in = x.astype(dtype)
    out, v = _split_output(call(x_in, jnp.broadcast_to(s["t"], (B,))), x_in, learned_sigma,
                           channel_axis)
    x0, eps = _x0_and_eps(pt, out.astype(_F32), x, s["sa"], s["sb"])
    if clip:
        x0 = jnp.clip(x0, -r, r)
    return x_in, x0, eps, v


def _x0_and_eps(prediction_type: str, out: Array, x: Array, sa: Array, sb: Array
                ) -> tuple[Array, Array]:
    """(predicted x_0, predicted eps) from the model output; ``sa = sqrt(alpha_bar_t)``,
    ``sb = sqrt(1 - alpha_bar_t)`` (float32 scalars)."""
    if prediction_type == "epsilon":
        return (x - sb * out) / sa, out
    if prediction_type == "sample":
        return out, (x - sa * out) / sb
    return sa * x - sb * out, sa * out + sb * x  # v_prediction


def _finish(x: Array, dtype: Any, traj: tuple[Array, Array] | None, return_trajectory: bool):
    x = x.astype(dtype)
    if return_trajectory:
        return x, Trajectory(*traj)
    return x


# --- DDIM ---------------------------------------------------------------------------------------


def ddim_sample(model_fn: Callable, schedule: NoiseSchedule, x_T: Array,
                num_inference_steps: int, *, cond: Any = None, eta: float = 0.0,
                key: Array | None = None, noise: Array | None = None,
                use_clipped_model_output: bool = False, learned_sigma: bool = False,
                channel_axis: int = -1, return_trajectory: bool = False,
                step_range: tuple[Any, Any] | None = None):
    """DDIM sampling from ``x_T`` ``[B, ...]`` to ``x_0`` ``[B, ...]``.

    ``step_range = (lo, hi)`` (ints or traced int scalars) runs only steps ``lo <= i < hi`` of the
    ``num_inference_steps`` (the others pass ``x`` through without calling the model): ``x_T`` is
    then the latent before step ``lo`` and the result the latent after step ``hi - 1``, so a
    trajectory can be resumed from a cached prefix under one compilation.

    Step ``i`` at timestep ``t`` with ``a = alpha_bar[t]``, ``a' = alpha_bar[t - T // n]`` (the
    final alpha past 0): predicted ``x0`` and ``eps`` by ``schedule.prediction_type``, ``x0``
    clipped to ``±clip_sample_range`` if ``clip_sample``,
    ``sigma = eta * sqrt((1 - a') / (1 - a) * (1 - a / a'))`` and
    ``x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z``.

    ``eta`` (a Python float in [0, 1]): 0 is deterministic; > 0 needs ``key`` (``z`` at step
    ``i`` is :func:`step_noise` ``(key, i, x_T.shape)``) or explicit ``noise``
    ``[n, *x_T.shape]``. ``use_clipped_model_output`` recomputes ``eps`` from the clipped
    ``x0``. Returns ``x_0``, or ``(x_0, Trajectory)`` with ``return_trajectory``.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    x_T = _check_latents(x_T)
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    tab = schedule.ddim_tables(num_inference_steps)
    n = tab["timesteps"].shape[0]
    noise = _check_noise(noise, key, n, x_T.shape, eta > 0, "ddim_sample with eta > 0")
    if eta == 0.0:
        noise, key = None, None

    a, ap = tab["alpha_t"], tab["alpha_prev"]
    one = np.float32(1.0)
    var = (one - ap) / (one - a) * (one - a / ap)
    std = (np.float32(eta) * np.sqrt(var)).astype(np.float32)
    xs = {
        "i": np.arange(n, dtype=np.int32),
        "t": tab["timesteps"],
        "sa": np.sqrt(a), "sb": np.sqrt(one - a),
        "sap": np.sqrt(ap),
        "c_eps": np.sqrt(np.maximum(one - ap - std * std, np.float32(0.0))).astype(np.float32),
        "std": std,
    }
    if noise is not None:
        xs["z"] = noise
    call = _caller(model_fn, cond)
    pt, clip, r = schedule.prediction_type, schedule.clip_sample, float(schedule.clip_sample_range)
    B, dtype = x_T.shape[0], x_T.dtype

    def step(x, s):
        x_in, x0, eps, _ = _predict(call, x, s, B, dtype, pt, clip, r, learned_sigma,
                                    channel_axis)
        if use_clipped_model_output:
            eps = (x - s["sa"] * x0) / s["sb"]
        x_new = s["sap"] * x0 + s["c_eps"] * eps
        if eta > 0:
            z = s["z"] if "z" in s else step_noise(key, s["i"], x.shape)
            x_new = x_new + s["std"] * z
        return x_new, x_in

    def body(x, s):
        if step_range is None:
            x_new, x_in = step(x, s)
        else:  # skipped steps run no model (lax.cond executes one branch)
            lo, hi = step_range
            x_new, x_in = jax.lax.cond((s["i"] >= lo) & (s["i"] < hi), step,
                                       lambda x, s: (x, x.astype(dtype)), x, s)
        return x_new, ((x_in, s["t"]) if return_trajectory else None)

    x, traj = jax.lax.scan(body, x_T.astype(_F32), xs)
    return _finish(x, dtype, traj, return_trajectory)


# --- DDPM ---------------------------------------------------------------------------------------


def ddpm_sample(model_fn: Callable, schedule: NoiseSchedule, x_T: Array,
                num_inference_steps: int, *, cond: Any = None, key: Array | None = None,
                noise: Array | None = None, learned_sigma: bool = False,
                channel_axis: int = -1, return_trajectory: bool = False):
    """DDPM ancestral sampling from ``x_T`` ``[B, ...]`` to ``x_0`` ``[B, ...]``.

    Step ``i`` at timestep ``t`` with ``a = alpha_bar[t]``, ``a'`` = ``alpha_bar`` at the next
    inference timestep (1 after the last), ``beta = 1 - a / a'``: predicted (and optionally
    clipped) ``x0``, posterior mean
    ``mu = sqrt(a') beta / (1 - a) x0 + sqrt(a / a') (1 - a') / (1 - a) x`` and
    ``x' = mu + s z`` for ``t > 0`` (no noise at ``t = 0``), where ``s`` by
    ``schedule.variance_type``: ``"fixed_small"`` / ``"fixed_small_log"``
    ``sqrt(max(beta (1 - a') / (1 - a), 1e-20))``, ``"fixed_large"`` ``sqrt(beta)``,
    ``"learned"`` ``sqrt(v)`` and ``"learned_range"``
    ``exp(((v + 1) / 2 log beta + (1 - v) / 2 log var_small) / 2)`` with ``v`` the model's
    variance half (both need ``learned_sigma``).

    ``z`` at step ``i`` is :func:`step_noise` ``(key, i, x_T.shape)``, or ``noise[i]`` from an
    explicit ``noise`` ``[n, *x_T.shape]``. Returns ``x_0``, or ``(x_0, Trajectory)``.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise ValueError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
    x_T = _check_latents(x_T)
    vt = schedule.variance_type
    if vt in ("learned", "learned_range") and not learned_sigma:
        raise ValueError(f"variance_type={vt!r} reads the model's predicted variance: it needs "
                         "learned_sigma=True (a model with twice the channels)")
    tab = schedule.ddpm_tables(num_inference_steps)
    n = tab["timesteps"].shape[0]
    noisy = bool((tab["timesteps"] > 0).any())
    noise = _check_noise(noise, key, n, x_T.shape, noisy, "ddpm_sample")

    a, ap = tab["alpha_t"], tab["alpha_prev"]
    one = np.float32(1.0)
    cur_a = a / ap
    beta = one - cur_a
    var_small = np.maximum((one - ap) / (one - a) * beta, np.float32(1e-20)).astype(np.float32)
    if vt in ("fixed_small", "fixed_small_log"):
        std = np.sqrt(var_small)
    elif vt == "fixed_large":
        std = np.sqrt(beta)
    else:
        std = np.zeros_like(a)  # computed from the model's output
    xs = {
        "i": np.arange(n, dtype=np.int32),
        "t": tab["timesteps"],
        "sa": np.sqrt(a), "sb": np.sqrt(one - a),
        "c_x0": (np.sqrt(ap) * beta / (one - a)).astype(np.float32),
        "c_x": (np.sqrt(cur_a) * (one - ap) / (one - a)).astype(np.float32),
        "std": std.astype(np.float32),
        "log_small": np.log(var_small), "log_beta": np.log(np.maximum(beta, np.float32(1e-20))),
        "add": (tab["timesteps"] > 0),
    }
    if noise is not None:
        xs["z"] = noise
    call = _caller(model_fn, cond)
    pt, clip, r = schedule.prediction_type, schedule.clip_sample, float(schedule.clip_sample_range)
    B, dtype = x_T.shape[0], x_T.dtype

    def body(x, s):
        x_in, x0, _, v = _predict(call, x, s, B, dtype, pt, clip, r, learned_sigma,
                                  channel_axis)
        mean = s["c_x0"] * x0 + s["c_x"] * x
        if vt == "learned":
            std = jnp.sqrt(v.astype(_F32))
        elif vt == "learned_range":
            frac = (v.astype(_F32) + 1.0) / 2.0
            std = jnp.exp(0.5 * (frac * s["log_beta"] + (1.0 - frac) * s["log_small"]))
        else:
            std = s["std"]
        z = s["z"] if "z" in s else step_noise(key, s["i"], x.shape)
        x_new = jnp.where(s["add"], mean + std * z, mean)
        return x_new, ((x_in, s["t"]) if return_trajectory else None)

    if not noisy:  # a single step at t = 0: no noise at all, no key needed
        key = None
        xs["z"] = np.zeros((n, *x_T.shape), np.float32)
    x, traj = jax.lax.scan(body, x_T.astype(_F32), xs)
    return _finish(x, dtype, traj, return_trajectory)


# --- flow matching ------------------------------------------------------------------------------


def flow_match_euler_sample(model_fn: Callable, schedule: FlowMatchSchedule, x_T: Array,
                            num_inference_steps: int, *, cond: Any = None,
                            mu: float | None = None, sigmas=None,
                            return_trajectory: bool = False):
    """Euler integration of a flow-matching model from ``x_T`` (noise, ``sigma = 1``) to
    ``x_0`` ``[B, ...]``, as diffusers' ``FlowMatchEulerDiscreteScheduler``.

    ``model_fn(x, t)`` predicts the velocity ``dx/dsigma`` (``noise - x0``) at
    ``t = sigma * T`` (float32 ``[B]``; Flux's transformer takes ``t / 1000``: divide in the
    model function). Step ``i``: ``x' = x + (sigma_{i+1} - sigma_i) v``. ``mu`` is required with
    dynamic shifting (:func:`~jaxquant.diffusion.schedules.dynamic_shift_mu`); ``sigmas``
    (length ``n``) overrides the unshifted sigmas (Flux passes ``linspace(1, 1 / n, n)``).
    Returns ``x_0``, or ``(x_0, Trajectory)`` with ``return_trajectory``.
    """
    if not isinstance(schedule, FlowMatchSchedule):
        raise ValueError(f"schedule must be a FlowMatchSchedule, got {type(schedule).__name__}")
    x_T = _check_latents(x_T)
    ts, sig = schedule.sigmas(num_inference_steps, mu=mu, sigmas=sigmas)
    xs = {"t": ts, "dt": (sig[1:] - sig[:-1]).astype(np.float32)}
    call = _caller(model_fn, cond)
    B, dtype = x_T.shape[0], x_T.dtype

    def body(x, s):
        x_in = x.astype(dtype)
        v, _ = _split_output(call(x_in, jnp.broadcast_to(s["t"], (B,))), x_in, False, -1)
        x_new = x + s["dt"] * v.astype(_F32)
        return x_new, ((x_in, s["t"]) if return_trajectory else None)

    x, traj = jax.lax.scan(body, x_T.astype(_F32), xs)
    return _finish(x, dtype, traj, return_trajectory)


# --- classifier-free guidance -------------------------------------------------------------------


def classifier_free_guidance(model_fn: Callable, guidance_scale: float, null_cond: Any, *,
                             learned_sigma: bool = False, channel_axis: int = -1,
                             skip_unconditional_at_one: bool = True) -> Callable:
    """``guided(x, t, cond) = u + w (c - u)``, ``c = model_fn(x, t, cond)``,
    ``u = model_fn(x, t, null_cond)``, with the two branches in one batch of ``2B``.

    ``x`` ``[B, ...]``, ``t`` ``[B]``, ``cond`` ``[B, ...]``; ``null_cond`` is broadcast to
    ``cond``'s shape and dtype (DiT: the class label ``num_classes``; text models: the empty
    prompt's embedding). ``guidance_scale`` ``w >= 1`` (a Python float; 1 is the conditional
    model, and then the unconditional branch is skipped unless
    ``skip_unconditional_at_one=False``). With ``learned_sigma`` the model returns twice the
    channels on ``channel_axis``: only the first half is guided, the second (the variance) is
    the conditional branch's, as diffusers' ``DiTPipeline`` does.
    """
    w = float(guidance_scale)
    if not np.isfinite(w) or w < 1.0:
        raise ValueError(f"guidance_scale must be >= 1 (1 is the conditional model; below 1 "
                         f"moves towards the unconditional one), got {guidance_scale}")
    if skip_unconditional_at_one and w == 1.0:
        return lambda x, t, cond: model_fn(x, t, cond)

    def guided(x: Array, t: Array, cond: Any) -> Array:
        B = x.shape[0]
        t = jnp.asarray(t)
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) for x of shape {x.shape}, got {t.shape}")
        cond_a = jnp.asarray(cond)
        null = jnp.broadcast_to(jnp.asarray(null_cond).astype(cond_a.dtype), cond_a.shape)
        out = model_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0),
                       jnp.concatenate([cond_a, null], axis=0))
        c, u = out[:B], out[B:]
        if learned_sigma:
            ax = _axis(channel_axis, c.ndim)
            h = c.shape[ax] // 2
            if c.shape[ax] != 2 * h:
                raise ValueError(f"learned_sigma=True needs an even channel count on axis "
                                 f"{channel_axis}, got {c.shape}")
            ce, cv = jax.lax.slice_in_dim(c, 0, h, axis=ax), jax.lax.slice_in_dim(c, h, 2 * h,
                                                                                  axis=ax)
            ue = jax.lax.slice_in_dim(u, 0, h, axis=ax)
            ge = ue + jnp.asarray(w, ce.dtype) * (ce - ue)
            return jnp.concatenate([ge, cv], axis=ax)
        return u + jnp.asarray(w, c.dtype) * (c - u)

    return guided
