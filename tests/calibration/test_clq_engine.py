"""CLQ through the calibration engine on a tiny random DiT (diffusers layout, built in-process).

Claims: (1) cross-block calibration: the inputs the engine calibrates block b on are what an
explicit run of the already-quantized prefix (the model's own block forward, weights and
activations quantized) produces, and with ``calibration.inputs: fp`` what the fp prefix produces;
(2) the OBS input transform keeps the fp function (the folded model with the transform slot and no
quantization equals the fp DiT); (3) the integer path (int GEMM, and the Pallas TPU kernel in
interpret mode) honours the input transform and the searched activation clip: linear by linear it
equals the fake-quant path; (4) the quantized model saves and restores with its transforms;
(5) bad recipes and transforms are refused by name.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxquant.calibration.engine import calibrate
from jaxquant.kernels.dispatch import kernel_mode
from jaxquant.models.dit.model import dit_block_apply, dit_embed
from jaxquant.models.dit.transformer import DiffusionTransformer
from jaxquant.models.loading import adapter_for
from jaxquant.nn.linear import ActQuant, InputTransform, apply_linear
from jaxquant.recipes import RecipeError, load_recipe
from tests.calibration.tiny_dit import make_tiny_dit, tiny_config

CFG = tiny_config(3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinydit_clq")
    return make_tiny_dit(d, CFG)


def clq(bits=4, *, inputs="quantized", transform=None, clps=True, wbits=4, **extra):
    tr = {"block": 16, "permute": True} if transform is None else transform
    rule = {"pattern": r"layers/\d+/(attn1|ff)/.*", "algorithm": "gptq",
            "spec": {"bits": wbits, "group_size": -1, "symmetric": True},
            "activations": {"bits": bits}}
    if tr:
        rule["transform"] = tr
    d = {"name": "clq_test", "rules": [
        {"pattern": r"layers/\d+/norm1/.*", "algorithm": "rtn",
         "spec": {"bits": 8, "group_size": -1, "symmetric": True}, "activations": {"bits": 8}},
        rule],
        "calibration": {"n_samples": 320, "seqlen": 1, "batch_size": 32, "inputs": inputs},
        **extra}
    if clps:
        d["clps"] = {"grid_w": [1.0, 0.9], "grid_a": [1.0, 0.9, 0.8], "n_samples": 64}
    return load_recipe(d)


def _swap(tree, mode):
    if isinstance(tree, ActQuant):
        return dataclasses.replace(tree, mode=mode)
    if isinstance(tree, dict):
        return {k: _swap(v, mode) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_swap(v, mode) for v in tree]
    return tree


def _out(m, params, held):
    qm = DiffusionTransformer(m.config, params, m.path)
    return np.asarray(qm(held["latents"], timestep=held["timesteps"],
                         class_labels=held["class_labels"]))


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("inputs", ["quantized", "fp"])
def test_cross_block_calibration_inputs(tiny, inputs):
    m, calib, _ = tiny
    seen = {}
    res = calibrate(adapter_for(m), clq(inputs=inputs), calib, progress=False,
                    on_block_end=lambda b, info: seen.__setitem__(b, np.asarray(info["input"])))
    n = 320
    t = jnp.asarray(calib["timesteps"][:n], jnp.float32)
    y = jnp.asarray(calib["class_labels"][:n])
    x_q = x_fp = dit_embed(m.config, m.params, jnp.asarray(calib["latents"][:n]))
    blocks_q = _swap(res.params["transformer_blocks"], "fake")
    for b in range(CFG.num_layers):
        engine = seen[b]
        if b:
            d_q, d_fp = _rel(engine, x_q), _rel(engine, x_fp)
            gap = _rel(x_q, x_fp)  # how far the quantized prefix's stream has drifted
            assert gap > 1e-2
            if inputs == "quantized":  # CBC: the quantized prefix, not the fp one
                assert d_q < 0.02 * gap, (b, d_q, gap)
            else:
                assert d_fp < 1e-5 and d_q > 0.5 * gap, (b, d_fp, d_q, gap)
        fp_block = jax.tree.map(jnp.asarray, m.params["transformer_blocks"][b])
        x_q = dit_block_apply(m.config, blocks_q[b], x_q, t, y)
        x_fp = dit_block_apply(m.config, fp_block, x_fp, t, y)


@pytest.fixture(scope="module")
def clq_w4a4(tiny):
    m, calib, _ = tiny
    return calibrate(adapter_for(m), clq(), calib, progress=False)


def test_transform_slots_and_searched_clips(tiny, clq_w4a4):
    res = clq_w4a4
    blk = res.params["transformer_blocks"][0]
    for lin in (blk["attn1"]["to_q"], blk["attn1"]["to_out.0"], blk["ff"]["net.2"]):
        assert isinstance(lin["transform"], InputTransform) and lin["transform"].block == 16
        assert lin["in_perm"].shape == (lin["kernel"].shape[0],)
    assert "transform" not in blk["norm1"]["linear"]  # the 8-bit conditioning path: no OBS
    # q, k, v read one input: one permutation
    np.testing.assert_array_equal(blk["attn1"]["to_q"]["in_perm"], blk["attn1"]["to_v"]["in_perm"])
    searched = [r for r in res.report if r.algorithm == "clps"]
    assert len(searched) == CFG.num_layers * 7
    assert all(r.info["weight_clip"] in (1.0, 0.9) and r.info["act_clip"] in (1.0, 0.9, 0.8)
               for r in searched)


def test_obs_keeps_the_fp_function(tiny):
    """Transforms folded, nothing quantized (8-bit weights replaced by the fp transformed
    kernel): the DiT with its transform slots equals the fp DiT."""
    m, calib, held = tiny
    res = calibrate(adapter_for(m), clq(wbits=8, bits=8, clps=False), calib, progress=False)
    from jaxquant.core import orthogonal as O

    blocks = []
    for b, blk in enumerate(res.params["transformer_blocks"]):
        fp = m.params["transformer_blocks"][b]
        new = jax.tree.map(jnp.asarray, fp)
        for path in ("attn1/to_q", "attn1/to_k", "attn1/to_v", "attn1/to_out.0", "ff/net.0/proj",
                     "ff/net.2"):
            from jaxquant.models.blockspec import get_path, set_path

            q = get_path(blk, path)
            W = jnp.asarray(get_path(fp, path)["kernel"])
            gw = O.fold_weight(W, jnp.asarray(q["transform"].blocks()), q["in_perm"])
            new = set_path(new, path, {**get_path(new, path), "kernel": gw,
                                       "transform": q["transform"], "in_perm": q["in_perm"]})
        blocks.append(new)
    params = {**m.params, "transformer_blocks": blocks}
    ref = _out(m, m.params, held)
    np.testing.assert_allclose(_out(m, params, held), ref, atol=2e-5 * np.abs(ref).max())


def test_integer_path_honours_transform_and_clip(tiny, clq_w4a4):
    m, _, held = tiny
    res = clq_w4a4
    x = np.random.default_rng(0).standard_normal((64, CFG.hidden_size)).astype(np.float32)
    x[:, [2, 9]] *= 20.0
    checked = 0
    for b in range(CFG.num_layers):
        blk = res.params["transformer_blocks"][b]
        for p in (blk["attn1"]["to_q"], blk["ff"]["net.0"]["proj"]):
            fake = np.asarray(apply_linear(x, _swap(p, "fake")))
            tol = 1e-5 * np.abs(fake).max()
            np.testing.assert_allclose(np.asarray(apply_linear(x, p)), fake, atol=tol, rtol=0)
            with kernel_mode("interpret", interpret_platform="tpu"):
                np.testing.assert_allclose(np.asarray(apply_linear(x, p)), fake, atol=tol,
                                           rtol=0)
            checked += 1
    assert checked == 2 * CFG.num_layers
    # the whole model: int and fake agree far inside the quantization error
    fake, integer, fp = (_out(m, _swap(res.params, "fake"), held), _out(m, res.params, held),
                         _out(m, m.params, held))
    assert _rel(integer, fake) < 0.25 * _rel(fake, fp)


def test_save_and_restore_with_transforms(tiny, clq_w4a4, tmp_path):
    from jaxquant.models.quantized import load_tree, save_tree

    m, _, held = tiny
    save_tree(tmp_path / "q", clq_w4a4.params)
    back = load_tree(tmp_path / "q")
    assert isinstance(back["transformer_blocks"][1]["ff"]["net.2"]["transform"], InputTransform)
    np.testing.assert_array_equal(_out(m, back, held), _out(m, clq_w4a4.params, held))


def test_bad_clq_recipes_and_transforms(tiny):
    m, calib, _ = tiny
    with pytest.raises(ValueError, match=r"block size 48 does not divide layers/0/attn1/to_q"):
        calibrate(adapter_for(m), clq(transform={"block": 48}, clps=False), calib,
                  progress=False)
    # the same with padding: 64 -> 96 channels (zero rows in the weights), and it runs
    res = calibrate(adapter_for(m), clq(transform={"block": 48, "pad": True}, clps=False),
                    calib, progress=False)
    assert res.params["transformer_blocks"][0]["attn1"]["to_q"]["kernel"].shape[0] == 96
    with pytest.raises(RecipeError, match=r"transform: an input transform .* quantizes none"):
        load_recipe({"name": "x", "rules": [{"pattern": ".*", "algorithm": "rtn",
                                             "spec": {"bits": 4, "symmetric": True},
                                             "transform": {"block": 16}}]})
    with pytest.raises(RecipeError, match="already rotates its input"):
        load_recipe({"name": "x", "rules": [{"pattern": ".*", "algorithm": "rtn",
                                             "spec": {"bits": 4, "symmetric": True},
                                             "activations": {"bits": 4, "rotate": -1},
                                             "transform": {"block": 16}}]})
    with pytest.raises(RecipeError, match=r"transform\.block: must be a Hadamard order"):
        clq(transform={"block": 6})
    with pytest.raises(RecipeError, match=r"transform\.statistic"):
        clq(transform={"block": 16, "statistic": "kurtosis"})
    with pytest.raises(RecipeError, match=r"calibration\.inputs must be one of"):
        load_recipe({**clq().to_dict(), "calibration": {"inputs": "int"}})
    with pytest.raises(RecipeError, match=r"clps\.grid_a must be a non-empty list"):
        load_recipe({**clq().to_dict(), "clps": {"grid_a": [1.5]}})
    with pytest.raises(RecipeError, match=r"'clps' searches .* no rule quantizes activations"):
        load_recipe({"name": "x", "clps": True,
                     "rules": [{"pattern": ".*", "algorithm": "rtn",
                                "spec": {"bits": 4, "symmetric": True}}]})
    with pytest.raises(ValueError, match="not a multiple of the weight's group_size 64"):
        bad = clq(transform={"block": 48, "pad": True}, clps=False).to_dict()
        bad["rules"][1]["spec"]["group_size"] = 64
        calibrate(adapter_for(m), load_recipe(bad), calib, progress=False)
