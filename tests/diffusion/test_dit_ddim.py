"""The DiT side end to end against diffusers: (1) a jaxquant-initialised DiT exported to a diffusers
directory is read by diffusers' own ``from_pretrained`` and computes what jaxquant computes; (2) on
a tiny random DiT, jaxquant's jitted DDIM sampler (with classifier-free guidance) follows
diffusers' ``DDIMScheduler`` driving the diffusers model, step by step, within 1e-4."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxquant import models  # noqa: E402
from jaxquant.diffusion.samplers import classifier_free_guidance, ddim_sample  # noqa: E402
from jaxquant.diffusion.schedules import NoiseSchedule  # noqa: E402
from jaxquant.models.dit.config import DiTConfig  # noqa: E402
from jaxquant.models.dit.export import init_dit_params, save_dit_diffusers  # noqa: E402
from jaxquant.models.dit.model import dit_forward  # noqa: E402

TOL = 1e-4


def _random_dit(tmp_path, seed=0):
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16,
                                        in_channels=1, out_channels=2, num_layers=2,
                                        sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    g = np.random.default_rng(seed)
    with torch.no_grad():  # diffusers zero-inits the adaLN and output layers: redraw all
        for p in m.parameters():
            p.normal_(0.0, float(g.uniform(0.02, 0.15)))
    m.save_pretrained(tmp_path, safe_serialization=True)
    return m.eval()


def test_exported_dit_is_read_by_diffusers_and_computes_the_same(tmp_path):
    cfg = DiTConfig(kind="dit", num_heads=2, head_dim=16, in_channels=1, out_channels=1,
                    num_layers=2, sample_size=8, patch_size=2, num_classes=10)
    params = init_dit_params(cfg, jax.random.PRNGKey(0))
    # adaLN-Zero starts at zero, which would hide a wrong transpose: perturb every leaf
    leaves, tree = jax.tree.flatten(params)
    g = np.random.default_rng(1)
    params = jax.tree.unflatten(tree, [np.asarray(a + g.normal(0, 0.1, a.shape), np.float32)
                                       for a in leaves])
    save_dit_diffusers(cfg, params, tmp_path)
    m = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    x = g.standard_normal((3, 1, 8, 8)).astype(np.float32)
    t, y = np.array([1, 500, 999]), np.array([0, 4, 10])
    with torch.no_grad():
        ref = m(torch.from_numpy(x), timestep=torch.from_numpy(t),
                class_labels=torch.from_numpy(y)).sample.numpy()
    ours = np.asarray(dit_forward(cfg, jax.tree.map(jnp.asarray, params), jnp.asarray(x),
                                  jnp.asarray(t), jnp.asarray(y)))
    assert np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    # and jaxquant's own loader reads the directory back to the same function
    jm = models.load(tmp_path)
    np.testing.assert_allclose(np.asarray(jm(x, timestep=t, class_labels=y)), ref, atol=TOL,
                               rtol=0)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddim_on_the_dit_follows_diffusers_step_by_step(tmp_path, guidance):
    m = _random_dit(tmp_path)
    jm = models.load(tmp_path)
    sched_cfg = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4,
                 "beta_end": 0.02, "clip_sample": False, "set_alpha_to_one": False,
                 "prediction_type": "epsilon", "timestep_spacing": "leading"}
    steps, b = 8, 2
    x_T = np.random.default_rng(0).standard_normal((b, 1, 8, 8)).astype(np.float32)
    labels = np.array([3, 7])

    # diffusers: the DiTPipeline loop (CFG on the first C channels, learned sigma dropped)
    ds = diffusers.DDIMScheduler(**sched_cfg)
    ds.set_timesteps(steps)
    x = torch.from_numpy(x_T)
    ref = []
    with torch.no_grad():
        for t in ds.timesteps:
            xin = torch.cat([x, x]) if guidance > 1 else x
            yin = torch.cat([torch.from_numpy(labels), torch.full((b,), 10)]) if guidance > 1 \
                else torch.from_numpy(labels)
            out = m(xin, timestep=t.expand(xin.shape[0]), class_labels=yin).sample[:, :1]
            if guidance > 1:
                c, u = out.chunk(2)
                out = u + guidance * (c - u)
            x = ds.step(out, t, x).prev_sample
            ref.append(x.numpy())

    cfg, params = jm.config, jm.params

    def model_fn(x, t, y):
        return dit_forward(cfg, params, x, t, y)

    fn = classifier_free_guidance(model_fn, guidance, 10, learned_sigma=True, channel_axis=1) \
        if guidance > 1 else (lambda x, t, y: model_fn(x, t, y)[:, :1])
    sched = NoiseSchedule.from_config(sched_cfg)
    x0, traj = jax.jit(lambda xT, y: ddim_sample(fn, sched, xT, steps, cond=y,
                                                 learned_sigma=guidance > 1, channel_axis=1,
                                                 return_trajectory=True))(
        jnp.asarray(x_T), jnp.asarray(labels))
    lat = np.asarray(traj.latents)
    np.testing.assert_array_equal(np.asarray(traj.timesteps), ds.timesteps.numpy())
    # the trajectory holds x_t entering each step; diffusers' list holds each step's output
    for i in range(steps - 1):
        np.testing.assert_allclose(lat[i + 1], ref[i], atol=TOL, rtol=0, err_msg=f"step {i}")
    np.testing.assert_allclose(np.asarray(x0), ref[-1], atol=TOL, rtol=0)
    assert np.abs(ref[-1] - x_T).max() > 0.1  # the sampler moved
