"""Per-timestep quantization policies on a tiny DiT, and AdaTSQ's Fisher-weighted Hessian through
the engine.

Claims: (1) a uniform policy samples exactly what the uniform model samples; (2) a mixed policy
equals running the steps one at a time, each with its chosen model, the latent handed from step
to step (the in-loop option switch does what an explicit per-step loop does); (3) the search's
score of a full policy is the end-to-end error of that policy; (4) in the engine, GPTQ on
``Σ_t α_t H_t`` with one-hot α on timestep group g equals GPTQ calibrated on group g's samples
only, and uniform α equals plain GPTQ; (5) the Fisher scores are positive per timestep and layer;
(6) bad policies are refused by name.
"""

import jax
import numpy as np
import pytest

from jaxquant.calibration.engine import calibrate
from jaxquant.core.qarray import dequantize
from jaxquant.diffusion.calibration import sample_dit, sample_dit_policy
from jaxquant.diffusion.schedules import NoiseSchedule
from jaxquant.diffusion.train_fmnist import SCHEDULER
from jaxquant.models.loading import adapter_for
from jaxquant.recipes import load_recipe
from tests.calibration.tiny_dit import make_tiny_dit, tiny_config

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    m, calib, _ = make_tiny_dit(tmp_path_factory.mktemp("tinydit_pol"), tiny_config(2))
    sched = NoiseSchedule.from_config(SCHEDULER)
    opts = []
    for bits in (8, 3):
        r = load_recipe({"name": f"w{bits}", "rules": [
            {"pattern": r"layers/\d+/(attn1|ff)/.*", "algorithm": "rtn",
             "spec": {"bits": bits, "group_size": -1, "symmetric": True},
             "activations": {"bits": bits, "mode": "fake"}}]})
        opts.append(calibrate(adapter_for(m), r, None, progress=False).params)
    labels = np.arange(10, dtype=np.int32) % 10
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (10, 1, 8, 8)))
    return m, calib, sched, opts, labels, x_T


def _sample(m, sched, params, labels, x_T, **kw):
    return np.asarray(sample_dit(m.config, params, sched, labels, steps=STEPS, guidance=1.5,
                                 x_T=x_T, **kw))


def test_uniform_policy_equals_uniform_model(setup):
    m, _, sched, opts, labels, x_T = setup
    for k, p in enumerate(opts):
        got = np.asarray(sample_dit_policy(m.config, opts, sched, labels, [k] * STEPS,
                                           steps=STEPS, guidance=1.5, x_T=x_T))
        np.testing.assert_allclose(got, _sample(m, sched, p, labels, x_T), atol=1e-5)
    a, b = (_sample(m, sched, p, labels, x_T) for p in opts)
    assert np.abs(a - b).max() > 1e-2  # the options really differ


def test_mixed_policy_equals_steps_one_at_a_time(setup):
    m, _, sched, opts, labels, x_T = setup
    policy = [1, 0, 0, 1, 1, 0]
    got = np.asarray(sample_dit_policy(m.config, opts, sched, labels, policy, steps=STEPS,
                                       guidance=1.5, x_T=x_T))
    x = x_T
    for i, k in enumerate(policy):  # one step at a time, each with its model
        x = _sample(m, sched, opts[k], labels, x, step_range=(i, i + 1))
    np.testing.assert_allclose(got, x, atol=1e-5)
    # and the step range really is a partial run: the first half then the second half
    half = _sample(m, sched, opts[0], labels, x_T, step_range=(0, 3))
    np.testing.assert_allclose(_sample(m, sched, opts[0], labels, half, step_range=(3, STEPS)),
                               _sample(m, sched, opts[0], labels, x_T), atol=1e-5)
    uni = [np.asarray(sample_dit_policy(m.config, opts, sched, labels, [k] * STEPS, steps=STEPS,
                                        guidance=1.5, x_T=x_T)) for k in (0, 1)]
    assert min(np.abs(got - u).max() for u in uni) > 1e-3


def test_policy_per_group_of_layers(setup):
    """A per-(step, layer group) policy: with every group on one option it is that option's
    uniform policy; with block 0 on option 0 and block 1 on option 1 at every step it equals the
    explicitly assembled model (block 0's params from option 0, block 1's from option 1)."""
    m, _, sched, opts, labels, x_T = setup
    groups = [[0], [1]]

    def run(policy2d):
        return np.asarray(sample_dit_policy(m.config, opts, sched, labels, policy2d, steps=STEPS,
                                            guidance=1.5, x_T=x_T, groups=groups))

    for k in (0, 1):
        np.testing.assert_allclose(run(np.full((STEPS, 2), k)),
                                   _sample(m, sched, opts[k], labels, x_T), atol=1e-5)
    mixed = {**opts[0], "transformer_blocks": [opts[0]["transformer_blocks"][0],
                                               opts[1]["transformer_blocks"][1]]}
    got = run(np.stack([np.zeros(STEPS, int), np.ones(STEPS, int)], axis=1))
    np.testing.assert_allclose(got, _sample(m, sched, mixed, labels, x_T), atol=1e-5)
    with pytest.raises(ValueError, match=r"shape .* layer groups"):
        run(np.zeros(STEPS, int))
    with pytest.raises(ValueError, match="cover the 2 blocks once each"):
        sample_dit_policy(m.config, opts, sched, labels, np.zeros((STEPS, 1), int), steps=STEPS,
                          x_T=x_T, groups=[[0]])


def test_search_scores_a_full_policy_by_its_end_to_end_error(setup):
    from jaxquant.diffusion.policy_search import policy_error, search_policy

    m, _, sched, opts, labels, x_T = setup
    res = search_policy(m.config, opts, [8.0, 3.0], 5.5, m.params, sched, labels, x_T,
                        steps=STEPS, beam_width=3, progress=False)
    assert len(res.policy) == STEPS and res.avg_bits <= 5.5 + 1e-9
    e = policy_error(m.config, opts, list(res.policy), m.params, sched, labels, x_T,
                     steps=STEPS)
    np.testing.assert_allclose(res.error, e, rtol=1e-4)
    e3 = policy_error(m.config, opts, [1] * STEPS, m.params, sched, labels, x_T, steps=STEPS)
    assert res.error < e3  # spending the budget beats the uniform low-bit policy


def test_bad_policies_are_refused(setup):
    m, _, sched, opts, labels, x_T = setup
    with pytest.raises(ValueError, match="5 entries for a sampler of 6 steps"):
        sample_dit_policy(m.config, opts, sched, labels, [0] * 5, steps=STEPS, x_T=x_T)
    with pytest.raises(ValueError, match=r"option\(s\) \[2\] out of range; there are 2"):
        sample_dit_policy(m.config, opts, sched, labels, [0, 1, 2, 0, 0, 0], steps=STEPS,
                          x_T=x_T)
    with pytest.raises(ValueError, match="no options"):
        sample_dit_policy(m.config, [], sched, labels, [0] * STEPS, steps=STEPS, x_T=x_T)


def _gptq_recipe(n):
    return load_recipe({"name": "g", "rules": [
        {"pattern": r"layers/0/attn1/to_(q|k|v)", "algorithm": "gptq",
         "spec": {"bits": 3, "group_size": -1, "symmetric": True}}],
        "calibration": {"n_samples": n, "seqlen": 1, "batch_size": 8}})


def _kernels(res):
    a = res.params["transformer_blocks"][0]["attn1"]
    return [np.asarray(dequantize(a[k]["kernel"])) for k in ("to_q", "to_k", "to_v")]


def test_fisher_weighted_hessian_through_the_engine(setup):
    m, calib, *_ = setup
    n = 320
    groups = calib["group"][:n]
    G = int(groups.max()) + 1
    paths = [f"layers/0/attn1/{k}" for k in ("to_q", "to_k", "to_v")]
    g = int(np.bincount(groups).argmax())
    onehot = np.eye(G)[g]
    got = _kernels(calibrate(adapter_for(m), _gptq_recipe(n), calib, progress=False,
                             group_weights={p: onehot for p in paths}))
    sel = groups == g
    only_g = {k: v[:n][sel] for k, v in calib.items()}
    ref = _kernels(calibrate(adapter_for(m), _gptq_recipe(int(sel.sum())), only_g,
                             progress=False))
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    uni = _kernels(calibrate(adapter_for(m), _gptq_recipe(n), calib, progress=False,
                             group_weights={p: np.ones(G) for p in paths}))
    plain = _kernels(calibrate(adapter_for(m), _gptq_recipe(n), calib, progress=False))
    for a, b in zip(uni, plain, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(got, plain, strict=True)) > 1e-4
    with pytest.raises(ValueError, match=r"group_weights\['layers/0/attn1/to_q'\]: \(3,\)"):
        calibrate(adapter_for(m), _gptq_recipe(n), calib, progress=False,
                  group_weights={paths[0]: np.ones(3)})


def test_temporal_fisher_scores(setup):
    from jaxquant.algorithms.adatsq import fisher_weights
    from jaxquant.diffusion.fisher import temporal_fisher

    m, _, sched, _, labels, x_T = setup
    x0 = _sample(m, sched, m.params, labels, x_T)
    I = temporal_fisher(m.config, m.params, sched, x0, labels, steps=STEPS, n_per_step=4)
    assert len(I) == 2 * 9 and all(v.shape == (STEPS,) and np.all(v > 0) for v in I.values())
    a = np.asarray(fisher_weights(np.stack(list(I.values()))))
    np.testing.assert_allclose(a.mean(-1), 1.0, rtol=1e-5)
    assert np.std(np.log(np.stack(list(I.values()))), axis=1).max() > 0.05  # varies over t
