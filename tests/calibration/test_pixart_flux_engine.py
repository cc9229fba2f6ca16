"""The calibration engine on PixArt-α and Flux (block specs in ``jaxquant.models.dit.spec_pixart``
and ``spec_flux``), on tiny random diffusers models saved with ``save_pretrained`` and loaded by
jaxquant (every parameter redrawn, so no path is zero).

Claims: (1) each spec's stage functions followed by ``finish`` compute the model's own block
forward (``pixart_block_apply``, ``flux_double_block_apply``, ``flux_single_block_apply``), with a
caption mask for PixArt (whose dropped caption tokens the adapter zeroes), and every producer a
spec declares is an exact fold (the function is unchanged); (2) ``calibrate`` with
an all-linears RTN W8 recipe keeps the model output within a few percent, and GPTQ W3 beats RTN
W3 on the model output on held-out inputs (Flux: two passes, double then single blocks; the
quantized models run dequantized, which computes what their QArray kernels compute and reuses
the fp forward's compilation; the Flux single pass runs the quantized double blocks' QArrays);
(3) a batch missing a required field is refused, naming it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxquant import models  # noqa: E402
from jaxquant.calibration.engine import calibrate, dense_params, fold_into_producer  # noqa: E402
from jaxquant.models import dit  # noqa: E402
from jaxquant.models.blockspec import get_path, set_path  # noqa: E402
from jaxquant.models.dit.transformer import DiffusionTransformer  # noqa: E402
from jaxquant.models.loading import adapter_for  # noqa: E402
from jaxquant.recipes import load_recipe  # noqa: E402

N = 64  # calibration samples


def _randomize(model, seed: int):
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, float(gen.uniform(0.02, 0.2)))
    return model.eval()


def _recipe(algo, bits, cond=None):
    spec = {"bits": bits, "group_size": -1, "symmetric": True}
    rules = [{"pattern": r"layers/\d+/.*", "algorithm": algo, "spec": spec}]
    if cond:  # the adaLN conditioning linears: RTN W8, as the DiT recipes
        rules.insert(0, {"pattern": cond, "algorithm": "rtn",
                         "spec": {"bits": 8, "group_size": -1, "symmetric": True}})
    return load_recipe({"name": f"{algo}_w{bits}", "rules": rules,
                        "calibration": {"n_samples": N, "seqlen": 1, "batch_size": 16}})


@functools.partial(jax.jit, static_argnums=0)
def _run_stages(spec, bp, x, batch):
    """The spec's stage functions in sequence, then ``finish``: the block output."""
    st = {"x": x}
    for stage in spec.stages:
        st = stage.fn(bp, st, batch)
        assert all(v.shape[0] == x.shape[0] for v in st.values()), stage.name
    return spec.finish(bp, st, batch)["x"]


def _check_folds(spec, bp, x, batch, producers):
    """Every declared producer is an exact fold: ``1/s`` into the producer, ``s`` into the rows of
    the stage's linears, all at once, leaves the fp block's function unchanged."""
    assert {st.name for st in spec.stages if st.producer} == producers
    ref = np.asarray(_run_stages(spec, bp, x, batch))
    g = np.random.default_rng(2)
    for stage in spec.stages:
        if stage.producer is None:
            continue
        k = get_path(bp, f"{stage.linears[0]}/kernel").shape[0]
        sc = jnp.asarray(g.uniform(0.3, 3.0, k), jnp.float32)
        bp = fold_into_producer(bp, stage.producer, 1.0 / sc)
        for lin in stage.linears:
            bp = set_path(bp, f"{lin}/kernel", get_path(bp, f"{lin}/kernel") * sc[:, None])
    out = np.asarray(_run_stages(spec, bp, x, batch))
    np.testing.assert_allclose(out, ref, atol=2e-5 * np.abs(ref).max(), rtol=0)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -------------------------------------------------------------------- PixArt
def _pixart_data(n, seed):
    g = np.random.default_rng(seed)
    mask = (np.arange(6)[None, :] < g.integers(2, 7, n)[:, None]).astype(np.float32)
    return {"latents": g.standard_normal((n, 4, 8, 8)).astype(np.float32),
            "timesteps": g.uniform(0, 999, n).astype(np.float32),
            "encoder_hidden_states": g.standard_normal((n, 6, 20)).astype(np.float32),
            "encoder_attention_mask": mask,
            "resolution": np.tile([[64.0, 64.0]], (n, 1)).astype(np.float32),
            "aspect_ratio": np.ones((n, 1), np.float32)}


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinypixart")
    torch.manual_seed(0)
    m = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=48, caption_channels=20,
        use_additional_conditions=True)
    _randomize(m, 3).save_pretrained(d, safe_serialization=True)
    return models.load(d), _pixart_data(N, 0), _pixart_data(16, 1)


def _pixart_out(m, params, b):
    qm = DiffusionTransformer(m.config, params, m.path)
    return np.asarray(qm(b["latents"], timestep=b["timesteps"],
                         encoder_hidden_states=b["encoder_hidden_states"],
                         encoder_attention_mask=b["encoder_attention_mask"],
                         added_cond_kwargs={"resolution": b["resolution"],
                                            "aspect_ratio": b["aspect_ratio"]}))


def test_pixart_spec_stages_equal_the_block_forward(pixart):
    m, calib, _ = pixart
    ad = adapter_for(m)
    assert [s.name for s in ad.spec.stages] == ["attn1_in", "attn1_out", "attn2_q", "attn2_kv",
                                               "attn2_out", "ff_in", "ff_out"]
    batch = {k: jnp.asarray(v) for k, v in ad.make_batch(calib, n_samples=8).items()}
    cfg = m.config
    c = {k: v[:8] for k, v in calib.items()}
    s = dit.pixart_prepare(cfg, m.params, c["latents"], c["timesteps"],
                           c["encoder_hidden_states"], c["encoder_attention_mask"],
                           c["resolution"], c["aspect_ratio"])
    np.testing.assert_allclose(np.asarray(ad.first_input(batch)), np.asarray(s["x"]), atol=1e-6)
    x = s["x"]
    block = jax.jit(dit.pixart_block_apply, static_argnums=0)
    for b in range(ad.num_blocks):
        bp = ad.read_block(b)
        ref = block(cfg, bp, x, s["temb"], s["context"], s["context_bias"])
        out = _run_stages(ad.spec, bp, x, batch)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref),
                                   atol=1e-5 * float(np.abs(ref).max()), rtol=0)
        x = ref
    _check_folds(ad.spec, ad.read_block(0), s["x"], batch, {"attn1_out", "attn2_out"})


def test_pixart_calibrate_rtn_w8_and_gptq_beats_rtn_w3(pixart):
    m, calib, held = pixart
    fp = _pixart_out(m, m.params, held)
    res = calibrate(adapter_for(m), _recipe("rtn", 8), calib, progress=False)
    assert len(res.report) == 2 * 10 and not res.unmatched
    assert _rel(_pixart_out(m, dense_params(res.params), held), fp) < 0.03
    errs = {}
    for algo in ("rtn", "gptq"):
        res = calibrate(adapter_for(m), _recipe(algo, 3), calib, progress=False)
        errs[algo] = _rel(_pixart_out(m, dense_params(res.params), held), fp)
    assert errs["gptq"] < 0.85 * errs["rtn"], errs


def test_pixart_bad_batches(pixart):
    m, calib, _ = pixart
    rec = _recipe("gptq", 8)  # needs data
    bad = {k: v for k, v in calib.items() if k != "encoder_hidden_states"}
    with pytest.raises(ValueError, match="'encoder_hidden_states'"):
        calibrate(adapter_for(m), rec, bad, progress=False)
    bad = {k: v for k, v in calib.items() if k != "resolution"}
    with pytest.raises(ValueError, match="'resolution'"):
        calibrate(adapter_for(m), rec, bad, progress=False)
    with pytest.raises(ValueError, match="'encoder_attention_mask' drops every"):
        calibrate(adapter_for(m), rec, {**calib, "encoder_attention_mask":
                                        np.zeros_like(calib["encoder_attention_mask"])},
                  progress=False)
    with pytest.raises(ValueError, match="part='single' is for a Flux"):
        adapter_for(m, part="single")


# -------------------------------------------------------------------- Flux
def _flux_data(n, seed, side=4, n_txt=5):
    g = np.random.default_rng(seed)
    img = np.zeros((side, side, 3), np.float32)
    img[..., 1] += np.arange(side)[:, None]
    img[..., 2] += np.arange(side)[None, :]
    return {"latents": g.standard_normal((n, side * side, 8)).astype(np.float32),
            "timesteps": g.uniform(0, 1, n).astype(np.float32),
            "encoder_hidden_states": g.standard_normal((n, n_txt, 24)).astype(np.float32),
            "pooled_projections": g.standard_normal((n, 12)).astype(np.float32),
            "guidance": g.uniform(1, 5, n).astype(np.float32),
            "img_ids": img.reshape(side * side, 3), "txt_ids": np.zeros((n_txt, 3), np.float32)}


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinyflux")
    torch.manual_seed(0)
    m = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=24,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
        guidance_embeds=True, axes_dims_rope=(8, 8, 8))  # D = 48, as the PixArt: shared compiles
    _randomize(m, 11).save_pretrained(d, safe_serialization=True)
    return models.load(d), _flux_data(N, 0), _flux_data(16, 1)


def _flux_out(m, params, b):
    qm = DiffusionTransformer(m.config, params, m.path)
    return np.asarray(qm(b["latents"], timestep=b["timesteps"],
                         encoder_hidden_states=b["encoder_hidden_states"],
                         pooled_projections=b["pooled_projections"], img_ids=b["img_ids"],
                         txt_ids=b["txt_ids"], guidance=b["guidance"]))


def _flux_two_passes(m, recipe, calib):
    r1 = calibrate(adapter_for(m, part="double"), recipe, calib, progress=False)
    m1 = DiffusionTransformer(m.config, r1.params, m.path)
    r2 = calibrate(adapter_for(m1, part="single"), recipe, calib, progress=False)
    return r1, r2


def test_flux_specs_equal_the_block_forwards(flux):
    m, calib, _ = flux
    cfg = m.config
    dbl, sgl = adapter_for(m), adapter_for(m, part="single")
    assert [s.name for s in dbl.spec.stages] == [
        "ada", "img_qkv", "txt_qkv", "img_out", "txt_out", "img_mlp_in", "img_mlp_out",
        "txt_mlp_in", "txt_mlp_out"]
    assert [s.name for s in sgl.spec.stages] == ["ada", "attn_in", "out"]
    batch = {k: jnp.asarray(v) for k, v in dbl.make_batch(calib, n_samples=8).items()}
    c = {k: v if k.endswith("_ids") else v[:8] for k, v in calib.items()}
    s = dit.flux_prepare(cfg, m.params, c["latents"], c["encoder_hidden_states"],
                         c["pooled_projections"], c["timesteps"], c["guidance"])
    cos, sin = dit.flux_rope(cfg, c["txt_ids"], c["img_ids"])
    np.testing.assert_allclose(np.asarray(batch["temb"]), np.asarray(s["temb"]), atol=1e-5)
    stream = dbl.first_input(batch)
    _check_folds(dbl.spec, dbl.read_block(0), stream, batch,
                 {"img_qkv", "txt_qkv", "img_mlp_in", "txt_mlp_in"})
    _check_folds(sgl.spec, sgl.read_block(0), stream, batch, {"attn_in"})
    x, ctx = s["x"], s["ctx"]
    np.testing.assert_allclose(np.asarray(stream), np.concatenate([ctx, x], 1), atol=1e-6)
    for ad, apply in ((dbl, dit.flux_double_block_apply), (sgl, dit.flux_single_block_apply)):
        apply = jax.jit(apply, static_argnums=0)
        for b in range(ad.num_blocks):
            bp = ad.read_block(b)
            ctx, x = apply(cfg, bp, x, ctx, s["temb"], cos, sin)
            ref = np.concatenate([ctx, x], 1)
            stream = _run_stages(ad.spec, bp, stream, batch)
            np.testing.assert_allclose(np.asarray(stream), ref,
                                       atol=1e-5 * float(np.abs(ref).max()), rtol=0)
        if ad is dbl:  # the single pass's first input replays the double stack
            np.testing.assert_allclose(np.asarray(sgl.first_input(batch)), np.asarray(stream),
                                       atol=1e-5 * float(np.abs(stream).max()))


def test_flux_two_pass_calibrate_rtn_w8_and_gptq_beats_rtn_w3(flux):
    m, calib, held = flux
    fp = _flux_out(m, m.params, held)
    r1, r2 = _flux_two_passes(m, _recipe("rtn", 8), calib)
    assert len(r1.report) == 2 * 14 and len(r2.report) == 2 * 6
    assert _rel(_flux_out(m, dense_params(r2.params), held), fp) < 0.03
    cond = r"layers/\d+/(norm1|norm1_context|norm)/linear"
    errs = {}
    for algo in ("rtn", "gptq"):
        _, r2 = _flux_two_passes(m, _recipe(algo, 3, cond), calib)
        errs[algo] = _rel(_flux_out(m, dense_params(r2.params), held), fp)
    assert errs["gptq"] < 0.85 * errs["rtn"], errs
    with pytest.raises(ValueError, match="single-stream blocks are already quantized"):
        calibrate(adapter_for(DiffusionTransformer(m.config, r2.params, m.path), part="single"),
                  _recipe("gptq", 8), calib, progress=False)


def test_flux_bad_batches(flux):
    m, calib, _ = flux
    rec = _recipe("gptq", 8)
    for field in ("pooled_projections", "guidance", "txt_ids"):
        bad = {k: v for k, v in calib.items() if k != field}
        with pytest.raises(ValueError, match=f"'{field}'"):
            calibrate(adapter_for(m), rec, bad, progress=False)
    with pytest.raises(ValueError, match="'img_ids' must be"):
        calibrate(adapter_for(m), rec, {**calib, "img_ids": calib["img_ids"][:3]},
                  progress=False)
    with pytest.raises(ValueError, match="part must be one of"):
        adapter_for(m, part="both")
