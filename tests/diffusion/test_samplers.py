"""Samplers against diffusers' schedulers, step by step, on the same deterministic stand-in
model (numpy on the torch side, jnp on the jax side), plus algebraic checks with oracle models."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.diffusion import (
    FlowMatchSchedule,
    NoiseSchedule,
    classifier_free_guidance,
    ddim_sample,
    ddpm_sample,
    dynamic_shift_mu,
    flow_match_euler_sample,
    initial_noise,
    schedule_from_config,
    step_noise,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

B, C, H, W = 3, 2, 4, 4
D = C * H * W
SHAPE = (B, C, H, W)  # diffusers' NCHW; channel_axis=1 where channels matter
_rng = np.random.default_rng(1234)
A = (_rng.standard_normal((D, 2 * D)) / np.sqrt(D)).astype(np.float32)
BVEC = _rng.standard_normal((2 * D,)).astype(np.float32)
X_T = _rng.standard_normal(SHAPE).astype(np.float32)
TOL = dict(rtol=1e-4, atol=1e-4)


def np_model(x, t, learned_sigma=False):
    """eps = tanh(x A + t/1000 b), numpy float32; ``2C`` channels with learned_sigma."""
    k = 2 * D if learned_sigma else D
    tt = t.astype(np.float32) / np.float32(1000)
    h = x.reshape(x.shape[0], D) @ A[:, :k] + tt[:, None] * BVEC[None, :k]
    out = np.tanh(h).astype(np.float32)
    return out.reshape((x.shape[0], 2 * C if learned_sigma else C, H, W))


def jax_model(x, t, learned_sigma=False):
    k = 2 * D if learned_sigma else D
    h = x.reshape(x.shape[0], D) @ jnp.asarray(A[:, :k]) + (
        t.astype(jnp.float32) / 1000.0)[:, None] * jnp.asarray(BVEC[None, :k])
    return jnp.tanh(h).reshape((x.shape[0], 2 * C if learned_sigma else C, H, W))


def run_diffusers(sched, n, *, learned_sigma=False, split_sigma=False, step_kw=None,
                  set_kw=None, noise=None):
    """The diffusers loop; returns the latents before each step and the final one."""
    sched.set_timesteps(n, **(set_kw or {}))
    x = torch.from_numpy(X_T.copy())
    xs = []
    for i, t in enumerate(sched.timesteps):
        xs.append(x.numpy().copy())
        out = np_model(x.numpy(), np.full((B,), float(t), np.float32), learned_sigma)
        if split_sigma:  # DiTPipeline: keep the first C channels
            out = out[:, :C]
        kw = dict(step_kw or {})
        if noise is not None and "eta" in kw:
            kw["variance_noise"] = torch.from_numpy(noise[i])
        x = sched.step(torch.from_numpy(out), t, x, **kw).prev_sample
    return np.stack(xs), x.numpy(), sched.timesteps.numpy()


def check_parity(ours, theirs):
    (x0, traj), (lat, final, ts) = ours, theirs
    assert traj.latents.shape == (len(ts), *SHAPE)
    assert traj.timesteps.shape == (len(ts),)
    np.testing.assert_allclose(np.asarray(traj.timesteps), ts, rtol=1e-6)
    for i in range(len(ts)):  # step by step
        np.testing.assert_allclose(np.asarray(traj.latents[i]), lat[i], **TOL, err_msg=f"step {i}")
    np.testing.assert_allclose(np.asarray(x0), final, **TOL)


# --- schedules ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", ["DDIMScheduler", "DDPMScheduler"])
@pytest.mark.parametrize("beta_schedule,bs,be", [("linear", 1e-4, 0.02),
                                                 ("scaled_linear", 0.00085, 0.012),
                                                 ("squaredcos_cap_v2", 1e-4, 0.02)])
def test_tables_from_config_match_diffusers(cls_name, beta_schedule, bs, be):
    sched = getattr(diffusers, cls_name)(beta_schedule=beta_schedule, beta_start=bs, beta_end=be,
                                         timestep_spacing="trailing")
    cfg = json.loads(sched.to_json_string())
    ours = schedule_from_config(cfg)
    assert isinstance(ours, NoiseSchedule) and ours.timestep_spacing == "trailing"
    np.testing.assert_allclose(ours.betas(), sched.betas.numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod(), sched.alphas_cumprod.numpy(), rtol=1e-5)
    for n in (1, 7, 50, 1000):
        sched.set_timesteps(n)
        np.testing.assert_array_equal(ours.timesteps(n), sched.timesteps.numpy())


def test_dit_style_config_and_refusals():
    dit = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0", "beta_end": 0.02,
           "beta_schedule": "linear", "beta_start": 0.0001, "clip_sample": False,
           "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True,
           "steps_offset": 0, "trained_betas": None}
    s = NoiseSchedule.from_config(dit)
    assert s.clip_sample is False and s.timestep_spacing == "leading"
    with pytest.raises(ValueError, match="solver_order"):
        NoiseSchedule.from_config({**dit, "solver_order": 2})
    assert NoiseSchedule.from_config({**dit, "solver_order": 2}, ignore_unknown=True) == s
    with pytest.raises(ValueError, match="thresholding"):
        NoiseSchedule.from_config({**dit, "thresholding": True})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        NoiseSchedule.from_config({**dit, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_config({**dit, "beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="timestep_spacing"):
        NoiseSchedule.from_config({**dit, "timestep_spacing": "karras"})
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_config({**dit, "prediction_type": "flow"})
    with pytest.raises(ValueError, match="_class_name"):
        schedule_from_config({**dit, "_class_name": "DPMSolverMultistepScheduler"})
    flow = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
            "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
    assert isinstance(schedule_from_config(flow), FlowMatchSchedule)
    for field, bad in [("use_karras_sigmas", True), ("stochastic_sampling", True),
                       ("invert_sigmas", True), ("shift_terminal", 0.1)]:
        with pytest.raises(ValueError, match=field):
            FlowMatchSchedule.from_config({**flow, field: bad})


def test_bad_inputs_name_the_parameter():
    s = NoiseSchedule(clip_sample=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ddim_sample(jax_model, s, X_T, 1001)
    with pytest.raises(ValueError, match="num_inference_steps"):
        flow_match_euler_sample(jax_model, FlowMatchSchedule(), X_T, 1001)
    bad = X_T.copy()
    bad[1, 0, 2, 3] = np.nan
    with pytest.raises(ValueError, match="x_T contains NaN"):
        ddim_sample(jax_model, s, bad, 10)
    with pytest.raises(ValueError, match="x_T contains NaN"):
        ddpm_sample(jax_model, s, bad, 10, key=jax.random.key(0))
    with pytest.raises(ValueError, match="guidance_scale"):
        classifier_free_guidance(lambda x, t, c: x, 0.5, 10)
    with pytest.raises(ValueError, match="key"):
        ddim_sample(jax_model, s, X_T, 10, eta=0.5)
    with pytest.raises(ValueError, match="key"):
        ddpm_sample(jax_model, s, X_T, 10)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(jax_model, s, X_T, 10, eta=-0.1)
    with pytest.raises(ValueError, match="noise"):
        ddim_sample(jax_model, s, X_T, 10, eta=1.0, noise=np.zeros((9, *SHAPE), np.float32))
    with pytest.raises(ValueError, match="learned_sigma"):
        ddim_sample(functools.partial(jax_model, learned_sigma=True), s, X_T, 10)
    with pytest.raises(ValueError, match="mu"):
        flow_match_euler_sample(jax_model, FlowMatchSchedule(use_dynamic_shifting=True), X_T, 4)
    with pytest.raises(ValueError, match="num_inference_steps=61"):
        NoiseSchedule(timestep_spacing="trailing").timesteps(61)


# --- DDIM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 10, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta0_matches_diffusers(n, spacing, pred, clip):
    kw = dict(timestep_spacing=spacing, prediction_type=pred, clip_sample=clip,
              clip_sample_range=1.5, steps_offset=1 if spacing == "leading" else 0)
    theirs = run_diffusers(diffusers.DDIMScheduler(**kw), n)
    ours = ddim_sample(jax_model, NoiseSchedule(**kw), jnp.asarray(X_T), n,
                       return_trajectory=True)
    check_parity(ours, theirs)


@pytest.mark.parametrize("kw", [
    dict(timestep_spacing="linspace", prediction_type="sample", set_alpha_to_one=False,
         clip_sample=True),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
         set_alpha_to_one=False),
    dict(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing="trailing"),
])
def test_ddim_eta0_other_configs(kw):
    theirs = run_diffusers(diffusers.DDIMScheduler(**kw), 20)
    ours = ddim_sample(jax_model, NoiseSchedule(**kw), jnp.asarray(X_T), 20,
                       return_trajectory=True)
    check_parity(ours, theirs)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_ddim_eta_positive_matches_diffusers_with_the_same_noise(eta):
    n = 12
    key = jax.random.key(7)
    noise = np.stack([np.asarray(step_noise(key, i, SHAPE)) for i in range(n)])
    kw = dict(clip_sample=False)
    theirs = run_diffusers(diffusers.DDIMScheduler(**kw), n, step_kw={"eta": eta}, noise=noise)
    ours = ddim_sample(jax_model, NoiseSchedule(**kw), jnp.asarray(X_T), n, eta=eta, key=key,
                       return_trajectory=True)
    check_parity(ours, theirs)
    explicit = ddim_sample(jax_model, NoiseSchedule(**kw), jnp.asarray(X_T), n, eta=eta,
                           noise=jnp.asarray(noise))
    np.testing.assert_allclose(np.asarray(explicit), np.asarray(ours[0]), rtol=1e-5, atol=1e-5)


def test_ddim_learned_sigma_takes_first_half_like_dit_pipeline():
    kw = dict(clip_sample=False)
    theirs = run_diffusers(diffusers.DDIMScheduler(**kw), 10, learned_sigma=True,
                           split_sigma=True)
    ours = ddim_sample(functools.partial(jax_model, learned_sigma=True), NoiseSchedule(**kw),
                       jnp.asarray(X_T), 10, learned_sigma=True, channel_axis=1,
                       return_trajectory=True)
    check_parity(ours, theirs)


def test_ddim_is_jittable_and_deterministic():
    s = NoiseSchedule(clip_sample=False)
    x_T = initial_noise(jax.random.key(3), SHAPE)
    np.testing.assert_array_equal(np.asarray(x_T), np.asarray(initial_noise(jax.random.key(3),
                                                                            SHAPE)))
    f = jax.jit(functools.partial(ddim_sample, jax_model, s, num_inference_steps=8))
    np.testing.assert_allclose(np.asarray(f(x_T)), np.asarray(ddim_sample(jax_model, s, x_T, 8)),
                               rtol=1e-5, atol=1e-5)
    key = jax.random.key(4)
    g = jax.jit(lambda x, k: ddpm_sample(jax_model, s, x, 6, key=k))
    np.testing.assert_allclose(np.asarray(g(x_T, key)),
                               np.asarray(ddpm_sample(jax_model, s, x_T, 6, key=key)),
                               rtol=1e-5, atol=1e-5)
    # bf16 latents: the model sees bf16, the result comes back in bf16
    seen = []

    def bf16_model(x, t):
        seen.append(x.dtype)
        return jax_model(x.astype(jnp.float32), t).astype(x.dtype)

    xb = ddim_sample(bf16_model, s, x_T.astype(jnp.bfloat16), 4)
    assert seen and all(d == jnp.bfloat16 for d in seen)
    assert xb.dtype == jnp.bfloat16 and xb.shape == SHAPE


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("n", [5, 50])
def test_ddim_oracle_recovers_x0(pred, n):
    """x_T = sqrt(a) x0 + sqrt(1 - a) eps; a model that knows x0 predicts the true eps (or v,
    or x0) at every x_t: DDIM with eta = 0 stays on that line and ends at x0."""
    s = NoiseSchedule(clip_sample=False, prediction_type=pred)
    ac = jnp.asarray(s.alphas_cumprod())
    rng = np.random.default_rng(5)
    x0 = jnp.asarray(rng.uniform(-1, 1, SHAPE).astype(np.float32))
    eps = jnp.asarray(rng.standard_normal(SHAPE).astype(np.float32))
    a = float(s.alphas_cumprod()[s.timesteps(n)[0]])
    x_T = np.float32(np.sqrt(a)) * x0 + np.float32(np.sqrt(1 - a)) * eps

    def oracle(x, t):
        at = jnp.take(ac, t)[:, None, None, None]
        e = (x - jnp.sqrt(at) * x0) / jnp.sqrt(1.0 - at)
        if pred == "epsilon":
            return e
        if pred == "sample":
            return jnp.broadcast_to(x0, x.shape)
        return jnp.sqrt(at) * e - jnp.sqrt(1.0 - at) * x0

    out = ddim_sample(oracle, s, x_T, n)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-4)


# --- DDPM ---------------------------------------------------------------------------------------


def run_ddpm_diffusers(monkeypatch, sched, n, noise, learned_sigma=False):
    """diffusers' DDPM loop with its per-step noise replaced by ``noise[i]``."""
    import diffusers.schedulers.scheduling_ddpm as mod

    state = {"i": 0}

    def injected_randn(shape, generator=None, device=None, dtype=None, **_):
        assert tuple(shape) == SHAPE
        return torch.from_numpy(noise[state["i"]].copy())

    monkeypatch.setattr(mod, "randn_tensor", injected_randn)
    sched.set_timesteps(n)
    x = torch.from_numpy(X_T.copy())
    xs = []
    for i, t in enumerate(sched.timesteps):
        state["i"] = i
        xs.append(x.numpy().copy())
        out = np_model(x.numpy(), np.full((B,), float(t), np.float32), learned_sigma)
        x = sched.step(torch.from_numpy(out), t, x).prev_sample
    return np.stack(xs), x.numpy(), sched.timesteps.numpy()


@pytest.mark.parametrize("kw,n", [
    (dict(clip_sample=False), 10),
    (dict(clip_sample=True, prediction_type="v_prediction", timestep_spacing="trailing"), 25),
    (dict(clip_sample=False, variance_type="fixed_large", timestep_spacing="linspace"), 8),
    (dict(clip_sample=True, variance_type="fixed_small_log", steps_offset=1), 20),
    (dict(clip_sample=False, beta_schedule="squaredcos_cap_v2"), 1000),
])
def test_ddpm_ancestral_matches_diffusers_with_injected_noise(monkeypatch, kw, n):
    key = jax.random.key(11)
    noise = np.stack([np.asarray(step_noise(key, i, SHAPE)) for i in range(n)])
    theirs = run_ddpm_diffusers(monkeypatch, diffusers.DDPMScheduler(**kw), n, noise)
    ours = ddpm_sample(jax_model, NoiseSchedule(**kw), jnp.asarray(X_T), n, key=key,
                       return_trajectory=True)
    check_parity(ours, theirs)


def test_ddpm_learned_range_reads_the_variance_half(monkeypatch):
    n = 10
    key = jax.random.key(2)
    noise = np.stack([np.asarray(step_noise(key, i, SHAPE)) for i in range(n)])
    kw = dict(clip_sample=False, variance_type="learned_range")
    theirs = run_ddpm_diffusers(monkeypatch, diffusers.DDPMScheduler(**kw), n, noise,
                                learned_sigma=True)
    ours = ddpm_sample(functools.partial(jax_model, learned_sigma=True), NoiseSchedule(**kw),
                       jnp.asarray(X_T), n, noise=jnp.asarray(noise), learned_sigma=True,
                       channel_axis=1, return_trajectory=True)
    check_parity(ours, theirs)


def test_ddpm_zero_noise_is_the_posterior_mean_chain():
    """With z = 0 each step is the posterior mean; check one step by the closed form."""
    s = NoiseSchedule(clip_sample=False)
    n = 4
    x1 = ddpm_sample(jax_model, s, jnp.asarray(X_T), n,
                     noise=jnp.zeros((n, *SHAPE)), return_trajectory=True)[1].latents[1]
    ts = s.timesteps(n)
    ac = s.alphas_cumprod().astype(np.float64)
    a, ap = ac[ts[0]], ac[ts[1]]
    eps = np_model(X_T, np.full((B,), ts[0], np.float32)).astype(np.float64)
    x0 = (X_T - np.sqrt(1 - a) * eps) / np.sqrt(a)
    beta = 1 - a / ap
    mean = np.sqrt(ap) * beta / (1 - a) * x0 + np.sqrt(a / ap) * (1 - ap) / (1 - a) * X_T
    np.testing.assert_allclose(np.asarray(x1), mean, rtol=1e-4, atol=1e-4)


# --- flow matching ------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg,n,flux_sigmas,seq_len", [
    (dict(shift=1.0), 10, False, None),
    (dict(shift=3.0), 28, False, None),
    (dict(shift=3.0), 1, False, None),
    (dict(shift=3.0, use_dynamic_shifting=True), 20, True, 1024),
    (dict(use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.5, max_shift=1.15),
     6, False, 4096),
])
def test_flow_match_euler_matches_diffusers(cfg, n, flux_sigmas, seq_len):
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    ours_s = FlowMatchSchedule.from_config(json.loads(sched.to_json_string()))
    mu = dynamic_shift_mu(ours_s, seq_len) if seq_len else None
    sig = np.linspace(1.0, 1 / n, n) if flux_sigmas else None
    set_kw = {}
    if mu is not None:
        set_kw["mu"] = mu
    if sig is not None:
        set_kw["sigmas"] = sig
    theirs = run_diffusers(sched, n, set_kw=set_kw)
    ts, sigmas = ours_s.sigmas(n, mu=mu, sigmas=sig)
    np.testing.assert_allclose(sigmas, sched.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    ours = flow_match_euler_sample(jax_model, ours_s, jnp.asarray(X_T), n, mu=mu, sigmas=sig,
                                   return_trajectory=True)
    check_parity(ours, theirs)


def test_flow_match_constant_velocity_recovers_x0():
    rng = np.random.default_rng(9)
    x0 = jnp.asarray(rng.uniform(-1, 1, SHAPE).astype(np.float32))
    z = jnp.asarray(X_T)
    s = FlowMatchSchedule(shift=3.0)
    out = flow_match_euler_sample(lambda x, t: z - x0, s, z, 7)
    np.testing.assert_allclose(np.asarray(out), np.asarray(x0), atol=1e-5)


# --- classifier-free guidance -------------------------------------------------------------------

NUM_CLASSES = 5
EMB = np.random.default_rng(3).standard_normal((NUM_CLASSES + 1, 2 * D)).astype(np.float32)


def class_model(x, t, y, learned_sigma=False):
    k = 2 * D if learned_sigma else D
    h = x.reshape(x.shape[0], D) @ jnp.asarray(A[:, :k]) + (
        t.astype(jnp.float32) / 1000.0)[:, None] * jnp.asarray(BVEC[None, :k]) + jnp.take(
        jnp.asarray(EMB[:, :k]), y, axis=0)
    return jnp.tanh(h).reshape((x.shape[0], 2 * C if learned_sigma else C, H, W))


def test_cfg_scale_one_is_the_conditional_model():
    x, t = jnp.asarray(X_T), jnp.asarray([999, 500, 3], jnp.int32)
    y = jnp.asarray([0, 4, 2], jnp.int32)
    c = np.asarray(class_model(x, t, y))
    g = classifier_free_guidance(class_model, 1.0, NUM_CLASSES)
    np.testing.assert_array_equal(np.asarray(g(x, t, y)), c)
    g2 = classifier_free_guidance(class_model, 1.0, NUM_CLASSES, skip_unconditional_at_one=False)
    np.testing.assert_allclose(np.asarray(g2(x, t, y)), c, rtol=1e-6, atol=1e-6)


def test_cfg_formula_batched_and_learned_sigma():
    x, t = jnp.asarray(X_T), jnp.asarray([999, 500, 3], jnp.int32)
    y = jnp.asarray([0, 4, 2], jnp.int32)
    null = jnp.full((B,), NUM_CLASSES, jnp.int32)
    w = 4.0
    c, u = np.asarray(class_model(x, t, y)), np.asarray(class_model(x, t, null))
    g = classifier_free_guidance(class_model, w, NUM_CLASSES)
    np.testing.assert_allclose(np.asarray(g(x, t, y)), u + w * (c - u), rtol=1e-5, atol=1e-5)

    ls = functools.partial(class_model, learned_sigma=True)
    c2, u2 = np.asarray(ls(x, t, y)), np.asarray(ls(x, t, null))
    g = classifier_free_guidance(ls, w, NUM_CLASSES, learned_sigma=True, channel_axis=1)
    out = np.asarray(g(x, t, y))
    np.testing.assert_allclose(out[:, :C], u2[:, :C] + w * (c2[:, :C] - u2[:, :C]), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(out[:, C:], c2[:, C:])
    # the guided model drives a sampler with cond
    x0, traj = ddim_sample(g, NoiseSchedule(clip_sample=False), x, 5, cond=y, learned_sigma=True,
                           channel_axis=1, return_trajectory=True)
    assert x0.shape == SHAPE and traj.latents.shape == (5, *SHAPE)
    assert np.isfinite(np.asarray(x0)).all()
