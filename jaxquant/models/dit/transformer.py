"""`load_diffusers(path) -> DiffusionTransformer`: a loaded DiT / PixArt / Flux called like the
diffusers model (same keyword arguments, arrays in, the ``.sample`` array out).

The call checks its inputs eagerly on the host (shapes, dtypes, ranges, NaN / inf), outside of
``jit``, and raises ValueError naming the argument; then it runs the jitted pure forward
(:func:`~jaxquant.models.dit.model.dit_forward` or
:func:`~jaxquant.models.dit.pixart.pixart_forward`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models.dit.config import DiTConfig
from jaxquant.models.dit.convert import DiffusersSafetensors, params_from_diffusers, read_config
from jaxquant.models.dit.flux import (
    FLUX_DOUBLE_LINEARS,
    FluxConfig,
    flux_forward,
    flux_rope,
)
from jaxquant.models.dit.model import DIT_BLOCK_LINEARS, dit_forward
from jaxquant.models.dit.pixart import PIXART_BLOCK_LINEARS, pixart_forward


def _array(name: str, v) -> np.ndarray:
    try:
        a = np.asarray(v)
    except Exception as e:
        raise ValueError(f"{name}: cannot be read as an array ({e})") from None
    if a.dtype == object:
        raise ValueError(f"{name}: cannot be read as a numeric array (got {type(v).__name__})")
    return a


def _finite(name: str, a: np.ndarray) -> None:
    if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
        bad = "NaN" if np.any(np.isnan(a)) else "inf"
        raise ValueError(f"{name} contains {bad} values ({int(np.sum(~np.isfinite(a)))} of "
                         f"{a.size} entries are not finite)")


def _per_sample(name: str, a: np.ndarray, batch: int) -> np.ndarray:
    """A scalar or ``[B]`` (or ``[1]``) per-sample array, returned as ``[B]``."""
    if a.size == 1 and a.ndim <= 1:
        return np.broadcast_to(a.reshape(-1), (batch,))
    if a.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or of shape [batch] = ({batch},), got shape "
                         f"{a.shape}")
    return a


def check_latents(cfg: DiTConfig, hidden_states) -> np.ndarray:
    """``hidden_states`` ``[B, C, H, W]`` as float32 numpy, or ValueError naming the problem."""
    x = _array("hidden_states", hidden_states)
    if x.ndim != 4:
        raise ValueError("hidden_states must be latents [batch, channels, height, width], got "
                         f"shape {x.shape}")
    b, c, hh, ww = x.shape
    if c != cfg.in_channels:
        raise ValueError(f"hidden_states has {c} channels, the model's in_channels is "
                         f"{cfg.in_channels}")
    p = cfg.patch_size
    if hh % p or ww % p or hh < p or ww < p or b < 1:
        raise ValueError(f"hidden_states latent shape {hh}x{ww} is not divisible by the patch size "
                         f"{p} (batch {b})")
    if cfg.kind == "dit" and hh != ww:
        raise ValueError(f"hidden_states latent shape {hh}x{ww} is not square; "
                         "DiTTransformer2DModel (as diffusers) unpatchifies square latents only")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"hidden_states must be a float array, got dtype {x.dtype}")
    _finite("hidden_states", x)
    return x.astype(np.float32)


def check_timestep(cfg: DiTConfig, timestep, batch: int) -> np.ndarray:
    """``timestep`` as ``[B]`` float32 in ``[0, num_train_timesteps)`` (``>= 0`` when unknown)."""
    if timestep is None:
        raise ValueError("timestep is required (a scalar or [batch] diffusion timesteps)")
    t = _array("timestep", timestep)
    if not (np.issubdtype(t.dtype, np.floating) or np.issubdtype(t.dtype, np.integer)):
        raise ValueError(f"timestep must be numeric, got dtype {t.dtype}")
    t = _per_sample("timestep", t, batch)
    _finite("timestep", t)
    n = cfg.num_train_timesteps
    if np.any(t < 0) or (n is not None and np.any(t >= n)):
        rng = f"[0, {n})" if n is not None else ">= 0"
        raise ValueError(f"timestep values must lie in {rng}, got min {t.min()} max {t.max()}")
    return t.astype(np.float32)


def check_class_labels(cfg: DiTConfig, class_labels, batch: int) -> np.ndarray:
    """``class_labels`` as ``[B]`` int32 in ``[0, num_classes]`` (``num_classes``: null class)."""
    if class_labels is None:
        raise ValueError("class_labels is required for DiTTransformer2DModel (ints in "
                         f"[0, {cfg.num_classes}], {cfg.num_classes} = the null class)")
    y = _array("class_labels", class_labels)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"class_labels must be integers, got dtype {y.dtype}")
    y = _per_sample("class_labels", y, batch)
    if np.any(y < 0) or np.any(y > cfg.num_classes):
        raise ValueError(f"class_labels must lie in [0, {cfg.num_classes}] ({cfg.num_classes} = "
                         f"the null class), got min {y.min()} max {y.max()}")
    return y.astype(np.int32)


def _check_pixart(cfg: DiTConfig, batch: int, encoder_hidden_states, encoder_attention_mask,
                  added_cond_kwargs):
    if encoder_hidden_states is None:
        raise ValueError("encoder_hidden_states is required for PixArtTransformer2DModel "
                         "([batch, tokens, channels] caption embeddings)")
    ctx = _array("encoder_hidden_states", encoder_hidden_states)
    want = cfg.caption_channels if cfg.caption_channels is not None else cfg.cross_attention_dim
    if ctx.ndim != 3 or ctx.shape[0] != batch or ctx.shape[2] != want:
        raise ValueError(f"encoder_hidden_states must have shape [batch={batch}, tokens, {want}], "
                         f"got {ctx.shape}")
    _finite("encoder_hidden_states", ctx)
    mask = None
    if encoder_attention_mask is not None:
        mask = _array("encoder_attention_mask", encoder_attention_mask)
        s = ctx.shape[1]
        if mask.shape not in ((batch, s), (batch, 1, s)):
            raise ValueError("encoder_attention_mask must have shape [batch, tokens] = "
                             f"({batch}, {s}) (keep-mask) or ({batch}, 1, {s}) (bias), got "
                             f"{mask.shape}")
        _finite("encoder_attention_mask", mask)
        mask = mask.astype(np.float32)
    res = ar = None
    if cfg.use_additional_conditions:
        kw = added_cond_kwargs or {}
        res, ar = kw.get("resolution"), kw.get("aspect_ratio")
        if res is None or ar is None:
            raise ValueError("added_cond_kwargs needs 'resolution' [batch, 2] and 'aspect_ratio' "
                             "[batch, 1]: this PixArt model uses additional conditions")
        res, ar = _array("added_cond_kwargs['resolution']", res), \
            _array("added_cond_kwargs['aspect_ratio']", ar)
        if res.size != 2 * batch:
            raise ValueError("added_cond_kwargs['resolution'] must have shape [batch, 2] = "
                             f"({batch}, 2), got {res.shape}")
        if ar.size != batch:
            raise ValueError("added_cond_kwargs['aspect_ratio'] must have shape [batch, 1] = "
                             f"({batch}, 1), got {ar.shape}")
        _finite("added_cond_kwargs['resolution']", res)
        _finite("added_cond_kwargs['aspect_ratio']", ar)
        res, ar = res.astype(np.float32).reshape(batch, 2), ar.astype(np.float32).reshape(batch, 1)
    return ctx.astype(np.float32), mask, res, ar


def _shaped(name: str, v, shape: tuple, what: str) -> np.ndarray:
    """``v`` as a finite float32 array of ``shape`` (``None`` entries: any size)."""
    if v is None:
        raise ValueError(f"{name} is required ({what})")
    a = _array(name, v)
    if a.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, a.shape,
                                                                           strict=True)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name} must have shape [{want}] ({what}), got {a.shape}")
    _finite(name, a)
    return a.astype(np.float32)


def _flux_call(m: DiffusionTransformer, hidden_states, timestep, encoder_hidden_states,
               pooled_projections, img_ids, txt_ids, guidance) -> jax.Array:
    cfg: FluxConfig = m.config
    x = _shaped("hidden_states", hidden_states, (None, None, cfg.in_channels),
                "packed latents [batch, image tokens, in_channels]")
    b, n = x.shape[:2]
    t = check_timestep(cfg, timestep, b)
    ctx = _shaped("encoder_hidden_states", encoder_hidden_states,
                  (b, None, cfg.joint_attention_dim), "[batch, text tokens, joint_attention_dim]")
    pooled = _shaped("pooled_projections", pooled_projections, (b, cfg.pooled_projection_dim),
                     "[batch, pooled_projection_dim]")
    axes = len(cfg.axes_dims_rope)
    ids = []
    for name, v, count in (("txt_ids", txt_ids, ctx.shape[1]), ("img_ids", img_ids, n)):
        if v is not None and np.ndim(v) == 3:  # diffusers' deprecated batched ids: the first
            v = np.asarray(v)[0]
        ids.append(_shaped(name, v, (count, axes), f"[tokens, {axes}] position ids"))
    g = None
    if cfg.guidance_embeds:
        if guidance is None:
            raise ValueError("guidance is required: this Flux model embeds the guidance scale")
        g = _per_sample("guidance", _array("guidance", guidance), b).astype(np.float32)
        _finite("guidance", g)
    elif guidance is not None:
        raise ValueError("guidance is not an input of this Flux model (guidance_embeds is false)")
    cos, sin = flux_rope(cfg, *ids)
    return flux_forward(cfg, m.params, jnp.asarray(x), jnp.asarray(ctx), jnp.asarray(pooled),
                        jnp.asarray(t), jnp.asarray(cos), jnp.asarray(sin),
                        None if g is None else jnp.asarray(g))


def _opt(a):
    return None if a is None else jnp.asarray(a)


@dataclasses.dataclass
class DiffusionTransformer:
    """A loaded diffusers transformer: ``config``, nested ``params``, the directory it came from."""

    config: DiTConfig | FluxConfig
    params: Any
    path: str

    @property
    def block_linears(self) -> tuple[str, ...]:
        """Paths of the linears inside one block (Flux: its double-stream block's; the
        single-stream block's are ``FLUX_SINGLE_LINEARS``)."""
        return {"dit": DIT_BLOCK_LINEARS, "pixart": PIXART_BLOCK_LINEARS,
                "flux": FLUX_DOUBLE_LINEARS}[self.config.kind]

    def __call__(self, hidden_states, timestep=None, class_labels=None, encoder_hidden_states=None,
                 encoder_attention_mask=None, added_cond_kwargs=None, *, pooled_projections=None,
                 img_ids=None, txt_ids=None, guidance=None) -> jax.Array:
        """The diffusers forward's ``.sample``: ``[B, out_channels, H, W]`` float32 (Flux:
        ``[B, N, p*p*out_channels]``).

        Args:
          hidden_states: latents ``[B, in_channels, H, W]`` (Flux: packed ``[B, N, in_channels]``).
          timestep: a scalar or ``[B]`` (Flux: ``t / 1000``, as its pipeline passes it).
          class_labels: ``[B]`` ints (DiT only).
          encoder_hidden_states: ``[B, S, caption_channels]`` (PixArt), ``[B, S,
            joint_attention_dim]`` (Flux).
          encoder_attention_mask: ``[B, S]`` keep-mask or ``[B, 1, S]`` bias (PixArt only).
          added_cond_kwargs: ``{"resolution": [B, 2], "aspect_ratio": [B, 1]}`` (PixArt with
            additional conditions).
          pooled_projections, img_ids, txt_ids, guidance: Flux only: ``[B, P]``, ``[N, 3]``,
            ``[S, 3]``, ``[B]`` (guidance only with ``guidance_embeds``).
        """
        cfg = self.config
        flux_kw = {"pooled_projections": pooled_projections, "img_ids": img_ids,
                   "txt_ids": txt_ids, "guidance": guidance}
        if cfg.kind == "flux":
            for name, v in (("class_labels", class_labels),
                            ("encoder_attention_mask", encoder_attention_mask),
                            ("added_cond_kwargs", added_cond_kwargs)):
                if v is not None:
                    raise ValueError(f"{name} is not an input of FluxTransformer2DModel")
            return _flux_call(self, hidden_states, timestep, encoder_hidden_states, **flux_kw)
        for name, v in flux_kw.items():
            if v is not None:
                raise ValueError(f"{name} is not an input of {cfg.class_name} (Flux only)")
        x = check_latents(cfg, hidden_states)
        b = x.shape[0]
        t = check_timestep(cfg, timestep, b)
        if cfg.kind == "dit":
            for name, v in (("encoder_hidden_states", encoder_hidden_states),
                            ("encoder_attention_mask", encoder_attention_mask),
                            ("added_cond_kwargs", added_cond_kwargs)):
                if v is not None:
                    raise ValueError(f"{name} is not an input of DiTTransformer2DModel "
                                     "(class-conditional); pass class_labels")
            y = check_class_labels(cfg, class_labels, b)
            return dit_forward(cfg, self.params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(y))
        if class_labels is not None:
            raise ValueError("class_labels is not an input of PixArtTransformer2DModel "
                             "(text-conditional); pass encoder_hidden_states")
        ctx, mask, res, ar = _check_pixart(cfg, b, encoder_hidden_states, encoder_attention_mask,
                                           added_cond_kwargs)
        return pixart_forward(cfg, self.params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx),
                              _opt(mask), _opt(res), _opt(ar))

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def load_diffusers(path: str | os.PathLike, *, dtype=jnp.float32,
                   variant: str | None = None) -> DiffusionTransformer:
    """Load a diffusers ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel`` directory (or a
    pipeline directory with a ``transformer/`` subfolder) without torch.

    ``variant`` selects ``diffusion_pytorch_model.<variant>.safetensors``; weights are cast to
    ``dtype`` (the forward computes in float32).
    """
    cfg, model_dir = read_config(path)
    src = DiffusersSafetensors(model_dir, variant)
    params = params_from_diffusers(cfg, src, np.dtype(jnp.dtype(dtype)))
    return DiffusionTransformer(cfg, jax.tree.map(jnp.asarray, params), os.fspath(model_dir))
