"""DiT / PixArt-α parity with diffusers: tiny random models saved with ``save_pretrained`` (safe
serialization), loaded by jaxquant without torch, ``.sample`` compared in float32.

diffusers zero-initialises the adaLN modulation and output projections; every parameter is redrawn
(normal, std 0.02..0.2) so that each path of the model contributes and a wrong one fails.
"""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from jaxquant import models  # noqa: E402
from jaxquant.models import dit  # noqa: E402
from jaxquant.models.common.hf_config import UnsupportedConfigError  # noqa: E402

TOL = 1e-4


def _randomize(model, seed: int):
    torch.manual_seed(seed)
    gen = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, float(gen.uniform(0.02, 0.2)))
    return model.eval()


def _dit(tmp_path, *, patch=2, sample=8, learned_sigma=True, seed=0, **kw):
    torch.manual_seed(seed)
    m = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4,
        out_channels=8 if learned_sigma else None, num_layers=2, sample_size=sample,
        patch_size=patch, num_embeds_ada_norm=10, **kw)
    _randomize(m, seed)
    m.save_pretrained(tmp_path, safe_serialization=True)
    return m


def _pixart(tmp_path, *, extra, caption=20, seed=0, **kw):
    torch.manual_seed(seed)
    m = diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=18, in_channels=4, out_channels=8, num_layers=2,
        sample_size=8, patch_size=2, cross_attention_dim=36, caption_channels=caption,
        use_additional_conditions=extra, **kw)
    _randomize(m, seed)
    m.save_pretrained(tmp_path, safe_serialization=True)
    return m


def _dit_inputs(b, hw, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, hw, hw, generator=g)
    t = torch.tensor([0, 999, 500, 17][:b])
    y = torch.tensor([3, 10, 0, 9][:b])  # 10 = the null class (num_classes)
    return x, t, y


def _dit_ref(m, x, t, y):
    with torch.no_grad():
        return m(x, timestep=t, class_labels=y).sample.numpy()


# -------------------------------------------------------------------- DiT
@pytest.mark.parametrize("patch", [2, 4])
@pytest.mark.parametrize("learned_sigma", [True, False])
def test_dit_matches_diffusers(tmp_path, patch, learned_sigma):
    sample = 4 * patch
    m = _dit(tmp_path, patch=patch, sample=sample, learned_sigma=learned_sigma)
    jm = models.load(tmp_path)  # dispatches on config.json's _class_name
    assert isinstance(jm, dit.DiffusionTransformer) and jm.config.kind == "dit"
    assert jm.config.out_channels == (8 if learned_sigma else 4)
    # the training size and another one (the sin-cos table is recomputed for the new grid)
    for hw in (sample, sample + 2 * patch):
        x, t, y = _dit_inputs(3, hw)
        out = np.asarray(jm(x.numpy(), timestep=t.numpy(), class_labels=y.numpy()))
        ref = _dit_ref(m, x, t, y)
        assert out.shape == ref.shape == (3, jm.config.out_channels, hw, hw)
        assert np.max(np.abs(out - ref)) <= TOL


def test_dit_affine_norm_exact_gelu_no_qkv_bias(tmp_path):
    m = _dit(tmp_path, norm_elementwise_affine=True, activation_fn="gelu", attention_bias=False,
             norm_eps=1e-4, seed=3)
    jm = dit.load_diffusers(tmp_path)
    assert "norm3" in dit.block_params(jm.params, 0)
    assert "bias" not in jm.params["transformer_blocks"][0]["attn1"]["to_q"]
    x, t, y = _dit_inputs(2, 8, seed=1)
    out = np.asarray(jm(x.numpy(), timestep=t.numpy(), class_labels=y.numpy()))
    assert np.max(np.abs(out - _dit_ref(m, x, t, y))) <= TOL


def test_dit_block_by_block_and_stacked_params(tmp_path):
    m = _dit(tmp_path, seed=1)
    jm = dit.load_diffusers(tmp_path)
    cfg, params = jm.config, jm.params
    x, t, y = _dit_inputs(2, 8)
    ref = _dit_ref(m, x, t, y)
    tj, yj = jax.numpy.asarray(t.numpy()), jax.numpy.asarray(y.numpy())
    h = dit.dit_embed(cfg, params, jax.numpy.asarray(x.numpy()))
    for i in range(dit.num_blocks(params)):
        h = dit.dit_block_apply(cfg, dit.block_params(params, i), h, tj, yj)
    cond0 = dit.dit_block_cond(cfg, dit.block_params(params, 0), tj, yj)
    out = np.asarray(dit.dit_head(cfg, params, h, cond0, 4, 4))
    assert np.max(np.abs(out - ref)) <= TOL
    stacked = {**params, "transformer_blocks": jax.tree.map(
        lambda *a: jax.numpy.stack(a), *params["transformer_blocks"])}
    out = np.asarray(dit.dit_forward(cfg, stacked, x.numpy(), t.numpy(), y.numpy()))
    assert np.max(np.abs(out - ref)) <= TOL
    # set_block_params: a copy with one block replaced, the original untouched
    blk = jax.tree.map(lambda a: a * 0, dit.block_params(params, 1))
    new = dit.set_block_params(stacked, 1, blk)
    assert isinstance(new["transformer_blocks"], list) and len(new["transformer_blocks"]) == 2
    kernel = params["transformer_blocks"][1]["ff"]["net.2"]["kernel"]
    assert float(np.abs(np.asarray(kernel)).sum()) > 0
    paths = {"/".join(str(k.key) for k in kp[:-1]) for kp, _ in
             jax.tree_util.tree_flatten_with_path(params["transformer_blocks"][0])[0]
             if kp[-1].key == "kernel"}
    assert paths == set(dit.DIT_BLOCK_LINEARS)


def test_legacy_transformer2d_config_is_remapped(tmp_path):
    m = _dit(tmp_path, seed=2)
    cfg_path = tmp_path / "config.json"
    raw = json.loads(cfg_path.read_text())
    raw.update(_class_name="Transformer2DModel", num_vector_embeds=None,
               use_linear_projection=False, only_cross_attention=False,
               double_self_attention=False, cross_attention_dim=None)
    cfg_path.write_text(json.dumps(raw))
    jm = models.load(tmp_path)
    assert jm.config.kind == "dit"
    x, t, y = _dit_inputs(2, 8)
    out = np.asarray(jm(x.numpy(), timestep=t.numpy(), class_labels=y.numpy()))
    assert np.max(np.abs(out - _dit_ref(m, x, t, y))) <= TOL


def test_pos_embed_is_diffusers_exactly():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for (h, w), base, interp in [((4, 4), 4, 1.0), ((3, 5), 4, 2.0), ((6, 2), 16, 1.0)]:
        ref = get_2d_sincos_pos_embed(32, (h, w), base_size=base, interpolation_scale=interp,
                                      output_type="pt").float().numpy()
        np.testing.assert_array_equal(dit.sincos_pos_embed_2d(32, h, w, base, interp), ref)


# -------------------------------------------------------------------- PixArt
def _pixart_inputs(b, hh, ww, s=5, caption=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, hh, ww, generator=g)
    t = torch.tensor([1.0, 999.0, 250.5][:b])
    c = torch.randn(b, s, caption, generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, 3:] = 0
    return x, t, c, mask


@pytest.mark.parametrize("extra", [True, False])
def test_pixart_matches_diffusers(tmp_path, extra):
    m = _pixart(tmp_path, extra=extra, seed=4)
    jm = models.load(tmp_path)
    assert jm.config.kind == "pixart" and jm.config.use_additional_conditions == extra
    for hh, ww in ((8, 8), (8, 12)):
        x, t, c, mask = _pixart_inputs(2, hh, ww)
        ack = {"resolution": torch.tensor([[64.0, 96.0], [32.0, 32.0]]),
               "aspect_ratio": torch.tensor([[1.5], [1.0]])} if extra else None
        for msk in (mask, None):
            with torch.no_grad():
                ref = m(x, encoder_hidden_states=c, timestep=t, added_cond_kwargs=ack,
                        encoder_attention_mask=msk).sample.numpy()
            out = np.asarray(jm(
                x.numpy(), timestep=t.numpy(), encoder_hidden_states=c.numpy(),
                encoder_attention_mask=None if msk is None else msk.numpy(),
                added_cond_kwargs=None if ack is None else {k: v.numpy() for k, v in ack.items()}))
            assert out.shape == ref.shape == (2, 8, hh, ww)
            assert np.max(np.abs(out - ref)) <= TOL


def test_pixart_no_caption_projection_affine_norms(tmp_path):
    m = _pixart(tmp_path, extra=False, caption=None, norm_elementwise_affine=True, seed=5)
    jm = dit.load_diffusers(tmp_path)
    assert "caption_projection" not in jm.params and "norm2" in jm.params["transformer_blocks"][0]
    x, t, c, mask = _pixart_inputs(2, 8, 8, caption=36)
    with torch.no_grad():
        ref = m(x, encoder_hidden_states=c, timestep=t, encoder_attention_mask=mask).sample.numpy()
    out = np.asarray(jm(x.numpy(), timestep=t.numpy(), encoder_hidden_states=c.numpy(),
                        encoder_attention_mask=mask.numpy()))
    assert np.max(np.abs(out - ref)) <= TOL
    # block by block
    cfg, params = jm.config, jm.params
    s = dit.pixart_prepare(cfg, params, x.numpy(), t.numpy(), c.numpy(), mask.numpy())
    h = s["x"]
    for i in range(dit.num_blocks(params)):
        h = dit.pixart_block_apply(cfg, dit.block_params(params, i), h, s["temb"], s["context"],
                                   s["context_bias"])
    out = np.asarray(dit.pixart_head(cfg, params, h, s["embedded_timestep"], 4, 4))
    assert np.max(np.abs(out - ref)) <= TOL


# -------------------------------------------------------------------- bad inputs and configs
@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    _dit(root / "transformer", seed=6)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000}))
    return dit.load_diffusers(root)  # a pipeline directory: its transformer/ is read


def test_dit_bad_inputs(tiny_dit):
    m = tiny_dit
    assert m.config.num_train_timesteps == 1000
    x = np.zeros((2, 4, 8, 8), np.float32)
    t, y = np.array([1, 2]), np.array([0, 10])
    assert np.asarray(m(x, timestep=t, class_labels=y)).shape == (2, 8, 8, 8)
    cases = [
        (dict(hidden_states=np.zeros((2, 4, 9, 9), np.float32)), "divisible by the patch size"),
        (dict(hidden_states=np.zeros((2, 3, 8, 8), np.float32)), "in_channels"),
        (dict(hidden_states=np.zeros((2, 4, 8, 12), np.float32)), "square"),
        (dict(hidden_states=np.zeros((4, 8, 8), np.float32)), "hidden_states"),
        (dict(hidden_states=np.where(np.arange(512).reshape(2, 4, 8, 8) == 5, np.nan, x)), "NaN"),
        (dict(class_labels=np.array([0, 11])), "class_labels must lie in [0, 10]"),
        (dict(class_labels=np.array([-1, 0])), "class_labels"),
        (dict(class_labels=np.array([0.0, 1.0])), "class_labels must be integers"),
        (dict(class_labels=None), "class_labels is required"),
        (dict(timestep=np.array([-1, 0])), "timestep values must lie in [0, 1000)"),
        (dict(timestep=np.array([0, 1000])), "timestep values must lie in [0, 1000)"),
        (dict(timestep=np.array([0, 1, 2])), "timestep must be a scalar or of shape"),
        (dict(timestep=None), "timestep is required"),
        (dict(encoder_hidden_states=np.zeros((2, 3, 8), np.float32)), "encoder_hidden_states"),
    ]
    for kw, msg in cases:
        args = {"hidden_states": x, "timestep": t, "class_labels": y, **kw}
        with pytest.raises(ValueError, match=None) as e:
            m(**args)
        assert msg in str(e.value), (kw, str(e.value))


def test_timestep_without_scheduler_only_nonnegative(tmp_path):
    _dit(tmp_path, seed=7)
    m = dit.load_diffusers(tmp_path)
    assert m.config.num_train_timesteps is None
    x = np.zeros((1, 4, 8, 8), np.float32)
    assert np.isfinite(np.asarray(m(x, timestep=5000, class_labels=1))).all()
    with pytest.raises(ValueError, match=r"timestep values must lie in >= 0"):
        m(x, timestep=-3, class_labels=1)


def test_pixart_bad_inputs(tmp_path):
    _pixart(tmp_path, extra=True, seed=8)
    m = dit.load_diffusers(tmp_path)
    x, t, c, mask = (a.numpy() for a in _pixart_inputs(2, 8, 8))
    ack = {"resolution": np.ones((2, 2), np.float32), "aspect_ratio": np.ones((2, 1), np.float32)}
    with pytest.raises(ValueError, match="encoder_hidden_states is required"):
        m(x, timestep=t, added_cond_kwargs=ack)
    with pytest.raises(ValueError, match="added_cond_kwargs needs 'resolution'"):
        m(x, timestep=t, encoder_hidden_states=c)
    with pytest.raises(ValueError, match=r"encoder_attention_mask must have shape"):
        m(x, timestep=t, encoder_hidden_states=c, encoder_attention_mask=mask[:, :3],
          added_cond_kwargs=ack)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must have shape \[batch=2"):
        m(x, timestep=t, encoder_hidden_states=c[..., :7], added_cond_kwargs=ack)
    with pytest.raises(ValueError, match="class_labels is not an input"):
        m(x, timestep=t, encoder_hidden_states=c, class_labels=np.array([1, 2]),
          added_cond_kwargs=ack)


def _write_config(tmp_path, **changes):
    raw = json.loads((tmp_path / "config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            raw.pop(k)
        else:
            raw[k] = v
    (tmp_path / "config.json").write_text(json.dumps(raw))


_DROP = object()


@pytest.mark.parametrize(("changes", "msg"), [
    (dict(_class_name="UNet2DConditionModel"),
     "_class_name 'UNet2DConditionModel' is not supported (supported: DiTTransformer2DModel"),
    (dict(norm_type="ada_norm"), "'norm_type' = 'ada_norm' is not supported"),
    (dict(activation_fn="geglu"), "'activation_fn' = 'geglu' is not supported"),
    (dict(shiny_new_option=3), "config field 'shiny_new_option' is not supported"),
    (dict(_class_name="Transformer2DModel", only_cross_attention=True),
     "'only_cross_attention' = True is not supported"),
    (dict(num_embeds_ada_norm=None), "'num_embeds_ada_norm' = None is not supported"),
])
def test_unsupported_configs_name_file_and_field(tmp_path, changes, msg):
    _dit(tmp_path, seed=9)
    _write_config(tmp_path, **changes)
    with pytest.raises(UnsupportedConfigError) as e:
        models.load(tmp_path)
    assert msg in str(e.value) and str(tmp_path / "config.json") in str(e.value)


def test_checkpoint_tensor_errors(tmp_path):
    _dit(tmp_path, seed=10)
    _write_config(tmp_path, num_layers=3)  # the checkpoint has 2 blocks
    with pytest.raises(ValueError, match=r"no tensor 'transformer_blocks\.2\.attn1\.to_q\.weight'"):
        dit.load_diffusers(tmp_path)
    _write_config(tmp_path, num_layers=1)  # block 1's tensors are left over
    with pytest.raises(ValueError, match=r"does not account for: transformer_blocks\.1\."):
        dit.load_diffusers(tmp_path)
    _write_config(tmp_path, num_layers=2, num_embeds_ada_norm=12)
    with pytest.raises(ValueError, match=r"embedding_table\.weight' has shape \(11, 32\), "
                                         r"the config implies \(13, 32\)"):
        dit.load_diffusers(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no diffusion_pytorch_model\.safetensors"):
        dit.load_diffusers(tmp_path)


# -------------------------------------------------------------------- Flux
def _flux(tmp_path, *, guidance, seed=0):
    torch.manual_seed(seed)
    m = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
        guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    _randomize(m, seed)
    m.save_pretrained(tmp_path, safe_serialization=True)
    return m


def _flux_inputs(b=2, side=4, n_txt=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.zeros(side, side, 3)
    img[..., 1] += torch.arange(side)[:, None]
    img[..., 2] += torch.arange(side)[None, :]
    return {"hidden_states": torch.randn(b, side * side, 8, generator=g),
            "encoder_hidden_states": torch.randn(b, n_txt, 24, generator=g),
            "pooled_projections": torch.randn(b, 12, generator=g),
            "timestep": torch.tensor([0.3, 1.0][:b]),
            "img_ids": img.reshape(side * side, 3), "txt_ids": torch.zeros(n_txt, 3)}


@pytest.mark.parametrize("guidance", [False, True])
def test_flux_matches_diffusers(tmp_path, guidance):
    m = _flux(tmp_path, guidance=guidance, seed=11)
    jm = models.load(tmp_path)
    assert jm.config.kind == "flux" and jm.config.guidance_embeds == guidance
    kw = _flux_inputs()
    if guidance:
        kw["guidance"] = torch.tensor([3.5, 1.0])
    with torch.no_grad():
        ref = m(**kw).sample.numpy()
    out = np.asarray(jm(**{k: v.numpy() for k, v in kw.items()}))
    assert out.shape == ref.shape == (2, 16, 8)
    assert np.max(np.abs(out - ref)) <= TOL
    # block by block
    cfg, params = jm.config, jm.params
    n = {k: v.numpy() for k, v in kw.items()}
    s = dit.flux_prepare(cfg, params, n["hidden_states"], n["encoder_hidden_states"],
                         n["pooled_projections"], n["timestep"], n.get("guidance"))
    cos, sin = dit.flux_rope(cfg, n["txt_ids"], n["img_ids"])
    x, ctx = s["x"], s["ctx"]
    for i in range(dit.num_blocks(params)):
        ctx, x = dit.flux_double_block_apply(cfg, dit.block_params(params, i), x, ctx, s["temb"],
                                             cos, sin)
    key = "single_transformer_blocks"
    for i in range(dit.num_blocks(params, key)):
        ctx, x = dit.flux_single_block_apply(cfg, dit.block_params(params, i, key), x, ctx,
                                             s["temb"], cos, sin)
    assert np.max(np.abs(np.asarray(dit.flux_head(cfg, params, x, s["temb"])) - ref)) <= TOL
    for blocks, names in ((params["transformer_blocks"], dit.FLUX_DOUBLE_LINEARS),
                          (params[key], dit.FLUX_SINGLE_LINEARS)):
        paths = {"/".join(str(k.key) for k in kp[:-1]) for kp, _ in
                 jax.tree_util.tree_flatten_with_path(blocks[0])[0] if kp[-1].key == "kernel"}
        assert paths == set(names)


def test_flux_bad_inputs_and_config(tmp_path):
    _flux(tmp_path, guidance=True, seed=12)
    m = dit.load_diffusers(tmp_path)
    kw = {k: v.numpy() for k, v in _flux_inputs().items()} | {"guidance": np.array([3.5, 1.0])}
    cases = [
        (dict(pooled_projections=None), "pooled_projections is required"),
        (dict(guidance=None), "guidance is required"),
        (dict(img_ids=kw["img_ids"][:10]), "img_ids must have shape [16, 3]"),
        (dict(txt_ids=np.zeros((5, 2), np.float32)), "txt_ids must have shape [5, 3]"),
        (dict(hidden_states=kw["hidden_states"][..., :7]), "hidden_states must have shape"),
        (dict(encoder_hidden_states=np.full((2, 5, 24), np.nan, np.float32)), "NaN"),
        (dict(timestep=np.array([-0.1, 0.5])), "timestep values must lie in >= 0"),
        (dict(class_labels=np.array([1, 2])), "class_labels is not an input"),
    ]
    for change, msg in cases:
        with pytest.raises(ValueError) as e:
            m(**{**kw, **change})
        assert msg in str(e.value), (change, str(e.value))
    _write_config(tmp_path, axes_dims_rope=[4, 6, 8])
    with pytest.raises(UnsupportedConfigError, match=r"'axes_dims_rope' = \[4, 6, 8\]"):
        dit.load_diffusers(tmp_path)
    _write_config(tmp_path, axes_dims_rope=[4, 6, 6], qk_norm="layer_norm")
    with pytest.raises(UnsupportedConfigError, match="'qk_norm' is not supported for Flux"):
        dit.load_diffusers(tmp_path)
