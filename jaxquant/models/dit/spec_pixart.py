"""The PixArt-α block (``PixArtTransformer2DModel``'s ``BasicTransformerBlock``, ada_norm_single)
as a calibration :class:`~jaxquant.models.blockspec.BlockSpec`, and its model adapter.

Stages, in true-sequential order (each linear reads ``state[input]``; ``mod`` is the block's
``scale_shift_table + temb``, chunks shift/scale/gate for attention (0-2) and the MLP (3-5))::

    attn1_in  [attn1/to_q, to_k, to_v]  reads h   = LN(x)(1+scale)+shift              [n, T, D]
    attn1_out [attn1/to_out.0]          reads o   = attention(q, k, v)                 [n, T, D]
    attn2_q   [attn2/to_q]              reads x   = x + gate·to_out(o) (the stream: PixArt
                                                    applies no norm before cross-attention)
    attn2_kv  [attn2/to_k, to_v]        reads ctx = the projected caption              [n, S, D]
    attn2_out [attn2/to_out.0]          reads o   = attention(to_q(x), to_k(ctx), to_v(ctx))
    ff_in     [ff/net.0/proj]           reads h   = LN(x + to_out(o))(1+scale')+shift'
    ff_out    [ff/net.2]                reads a   = gelu(net.0(h))
    finish                              x + gate'·net.2(a)

Producers (exact folds): ``attn1/to_v`` for ``attn1/to_out.0`` and ``attn2/to_v`` for
``attn2/to_out.0``. The modulated norms have none: their shift and scale are the block's table
plus adaLN-single's ``temb``, which every block shares, so a per-block channel scale cannot be
folded into them exactly; the caption context is shared by all blocks too.

The shared conditioning (adaLN-single's ``[n, 6D]`` modulation, the caption projection and the
key bias of the caption mask) runs outside the blocks and stays in floating point: the adapter
computes it once, in :meth:`PixArtAdapter.make_batch`, as the derived per-sample batch fields
``temb`` ``[n, 6D]``, ``context`` ``[n, S, D]`` and ``context_bias`` ``[n, S]`` (with a mask).
Caption tokens the mask drops are zeroed in ``context``: attention gives them zero weight
(their score is biased by -10000), so the block computes the same function, while the statistics
of ``attn2/to_k`` and ``to_v`` see only the kept tokens (zero rows add nothing to ``XᵀX``).

The calibration data is a dict of per-sample fields: ``latents`` ``[n, C, H, W]`` (the sampler's
``x_t``), ``timesteps`` ``[n]``, ``encoder_hidden_states`` ``[n, S, caption_channels]``, optional
``encoder_attention_mask`` ``[n, S]`` (1 keep, 0 drop), ``resolution`` ``[n, 2]`` and
``aspect_ratio`` ``[n, 1]`` (exactly when the config uses additional conditions), and optionally
``group`` ``[n]`` (a timestep group) and ``sample_weight`` ``[n]``. The patch embedding and the
output layer stay in floating point.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models.blockspec import BlockSpec, Producer, Stage
from jaxquant.models.dit.config import DiTConfig
from jaxquant.models.dit.layers import attention, gelu, layer_norm, lin, modulate, patch_embed
from jaxquant.models.dit.model import ATTN1, FF, block_params, num_blocks
from jaxquant.models.dit.pixart import (
    ATTN2,
    PIXART_BLOCK_LINEARS,
    adaln_single,
    caption_projection,
    encoder_key_bias,
)

_REQUIRED = ("latents", "timesteps", "encoder_hidden_states")
_EXTRA = ("resolution", "aspect_ratio")
_FIELDS = (*_REQUIRED, "encoder_attention_mask", *_EXTRA, "group", "sample_weight")


def _mod(p, temb, d):
    """The block's six modulation chunks ``[n, 1, D]`` (shift, scale, gate; twice)."""
    n = temb.shape[0]
    m = p["scale_shift_table"].astype(jnp.float32)[None] + temb.reshape(n, 6, d)
    return [m[:, i:i + 1] for i in range(6)]


@functools.lru_cache(maxsize=16)
def pixart_block_spec(cfg: DiTConfig) -> BlockSpec:
    """The calibration block spec of a PixArt-α transformer with config ``cfg``."""
    if cfg.kind != "pixart":
        raise ValueError(f"pixart_block_spec: a {cfg.kind!r} model is not a PixArt transformer")
    d, nh = cfg.hidden_size, cfg.num_heads

    def attn1_in(p, s, batch):
        shift, scale = _mod(p, batch["temb"], d)[:2]
        return {"x": s["x"], "h": modulate(layer_norm(s["x"], cfg.norm_eps, p.get("norm1")),
                                           shift, scale)}

    def attn1_out(p, s, batch):
        h = s["h"]
        o = attention(lin(p, ATTN1[0], h), lin(p, ATTN1[1], h), lin(p, ATTN1[2], h), nh)
        return {"x": s["x"], "o": o}

    def attn2_q(p, s, batch):
        gate = _mod(p, batch["temb"], d)[2]
        return {"x": s["x"] + gate * lin(p, ATTN1[3], s["o"])}

    def attn2_kv(p, s, batch):
        return {"x": s["x"], "ctx": batch["context"].astype(jnp.float32)}

    def attn2_out(p, s, batch):
        x, ctx = s["x"], s["ctx"]
        o = attention(lin(p, ATTN2[0], x), lin(p, ATTN2[1], ctx), lin(p, ATTN2[2], ctx), nh,
                      batch.get("context_bias"))
        return {"x": x, "o": o}

    def ff_in(p, s, batch):
        shift, scale = _mod(p, batch["temb"], d)[3:5]
        x = s["x"] + lin(p, ATTN2[3], s["o"])
        return {"x": x, "h": modulate(layer_norm(x, cfg.norm_eps, p.get("norm2")), shift, scale)}

    def ff_out(p, s, batch):
        return {"x": s["x"], "a": gelu(lin(p, FF[0], s["h"]), cfg.activation_fn)}

    def finish(p, s, batch):
        gate = _mod(p, batch["temb"], d)[5]
        return {"x": s["x"] + gate * lin(p, FF[1], s["a"])}

    return BlockSpec(
        stages=(
            Stage("attn1_in", ATTN1[:3], "h", attn1_in),
            Stage("attn1_out", ATTN1[3:], "o", attn1_out, Producer("linear", (ATTN1[2],))),
            Stage("attn2_q", ATTN2[:1], "x", attn2_q),
            Stage("attn2_kv", ATTN2[1:3], "ctx", attn2_kv),
            Stage("attn2_out", ATTN2[3:], "o", attn2_out, Producer("linear", (ATTN2[2],))),
            Stage("ff_in", FF[:1], "h", ff_in),
            Stage("ff_out", FF[1:], "a", ff_out),
        ),
        finish=finish,
        linears=PIXART_BLOCK_LINEARS,
        batch_fields=("temb", "context"),
    )


# ---------------------------------------------------------------------------- batches
def _float_field(calib, name, shape, n):
    """``calib[name]`` as finite float32 of ``shape`` (``None``: any size), or ValueError."""
    a = np.asarray(calib[name])
    if a.dtype == object or not (np.issubdtype(a.dtype, np.floating)
                                 or np.issubdtype(a.dtype, np.integer)
                                 or np.issubdtype(a.dtype, np.bool_)):
        raise ValueError(f"calibration batch field {name!r} must be numeric, got dtype {a.dtype}")
    if a.ndim != len(shape) or any(w is not None and w != g for w, g in zip(shape, a.shape,
                                                                            strict=True)):
        want = ", ".join("*" if w is None else str(w) for w in shape)
        raise ValueError(f"calibration batch field {name!r} must be [{want}] (n = {n} samples), "
                         f"got {a.shape}")
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"calibration batch field {name!r} has NaN/Inf")
    return a


def check_common(calib, fields, required, family, n_samples, latents_shape, hint):
    """Shared checks of a diffusion calibration batch: a dict, no unknown field, the required
    ones present, ``latents`` of ``latents_shape``, enough samples, ``timesteps`` / ``group`` /
    ``sample_weight`` ``[n]``. Returns ``(n, {latents, timesteps, group?, sample_weight?})``
    (all samples; the caller slices)."""
    if not isinstance(calib, dict):
        raise ValueError(f"{family} calibration data must be a dict of per-sample fields ({hint})")
    unknown = sorted(set(calib) - set(fields))
    if unknown:
        raise ValueError(f"calibration batch: unknown field(s) {unknown} for a {family} (known: "
                         f"{list(fields)})")
    for k in required:
        if k not in calib:
            raise ValueError(f"calibration batch: a {family} needs the field {k!r} ({hint})")
    n = int(np.shape(calib["latents"])[0]) if np.ndim(calib["latents"]) else 0
    out = {"latents": _float_field(calib, "latents", (n, *latents_shape), n)}
    if n < n_samples:
        raise ValueError(f"calibration batch has {n} samples; the recipe asks for {n_samples}")
    out["timesteps"] = _float_field(calib, "timesteps", (n,), n)
    if "group" in calib:
        g = np.asarray(calib["group"])
        if g.shape != (n,) or not np.issubdtype(g.dtype, np.integer) or g.min() < 0:
            raise ValueError(f"calibration batch field 'group' must be [{n}] non-negative "
                             f"integers, got {g.shape} {g.dtype}")
        out["group"] = g.astype(np.int32)
    if "sample_weight" in calib:
        w = _float_field(calib, "sample_weight", (n,), n)
        if w.min() < 0:
            raise ValueError("calibration batch field 'sample_weight' must be >= 0")
        out["sample_weight"] = w
    return n, out


def check_timesteps(t, hi):
    if t.min() < 0 or (hi is not None and t.max() >= hi):
        raise ValueError(f"calibration batch field 'timesteps' must lie in [0, "
                         f"{hi if hi is not None else 'inf'}), got [{t.min()}, {t.max()}]")


@functools.partial(jax.jit, static_argnums=0)
def _conditioning(cfg, params, t, caption, res, ar):
    temb, _ = adaln_single(cfg, params, t, res, ar)
    return temb, caption_projection(params, caption)


@functools.partial(jax.jit, static_argnums=0)
def _embed(cfg, pos_embed, latents):
    return patch_embed(pos_embed, latents.astype(jnp.float32), cfg.patch_size, cfg.base_size,
                       cfg.interpolation_scale)


def pixart_batch(cfg: DiTConfig, params: dict, calib, *, n_samples: int) -> dict:
    """Validate a PixArt calibration batch (see the module docstring), take its first
    ``n_samples`` samples and add the shared conditioning fields ``temb``, ``context`` (and
    ``context_bias`` with a mask), computed in floating point from ``params``."""
    extra = cfg.use_additional_conditions
    required = (*_REQUIRED, *(_EXTRA if extra else ()))
    hint = ("'latents' [n, C, H, W], 'timesteps' [n], 'encoder_hidden_states' [n, S, "
            "caption_channels], optionally 'encoder_attention_mask' [n, S]"
            + (", 'resolution' [n, 2] and 'aspect_ratio' [n, 1]" if extra else ""))
    n, out = check_common(calib, _FIELDS, required, "PixArt", n_samples,
                          (cfg.in_channels, None, None), hint)
    if not extra:
        for k in _EXTRA:
            if k in calib:
                raise ValueError(f"calibration batch field {k!r} is for a PixArt with additional "
                                 "conditions; this model has use_additional_conditions false")
    hh, ww = out["latents"].shape[2:]
    p = cfg.patch_size
    if hh % p or ww % p or hh < p or ww < p:
        raise ValueError(f"calibration batch field 'latents' must be [n, {cfg.in_channels}, H, W] "
                         f"with H, W divisible by the patch size {p}, got {out['latents'].shape}")
    check_timesteps(out["timesteps"], cfg.num_train_timesteps)
    want = cfg.caption_channels if cfg.caption_channels is not None else cfg.cross_attention_dim
    cap = _float_field(calib, "encoder_hidden_states", (n, None, want), n)
    keep = None
    if "encoder_attention_mask" in calib:
        keep = _float_field(calib, "encoder_attention_mask", (n, cap.shape[1]), n)
        if not np.all((keep == 0) | (keep == 1)):
            raise ValueError("calibration batch field 'encoder_attention_mask' must be a keep-mask "
                             "of 0 (drop) and 1 (keep)")
        if np.any(keep.sum(axis=1) == 0):
            raise ValueError("calibration batch field 'encoder_attention_mask' drops every caption "
                             "token of some sample; keep at least one")
    res = ar = None
    if extra:
        res = _float_field(calib, "resolution", (n, 2), n)
        a = np.asarray(calib["aspect_ratio"])
        ar = _float_field(calib, "aspect_ratio", (n, 1) if a.ndim == 2 else (n,), n).reshape(n, 1)
    sl = slice(0, n_samples)
    out = {k: v[sl] for k, v in out.items()}
    shared = {k: params[k] for k in ("adaln_single", "caption_projection") if k in params}
    temb, ctx = _conditioning(cfg, shared, jnp.asarray(out["timesteps"]), jnp.asarray(cap[sl]),
                              None if res is None else jnp.asarray(res[sl]),
                              None if ar is None else jnp.asarray(ar[sl]))
    out["temb"], ctx = np.asarray(temb, np.float32), np.asarray(ctx, np.float32)
    if keep is not None:
        k = keep[sl]
        ctx = ctx * k[..., None]
        out["context_bias"] = np.asarray(encoder_key_bias(jnp.asarray(k)), np.float32)
    out["context"] = ctx
    return out


class PixArtAdapter:
    """Calibration adapter over a loaded PixArt-α (:class:`DiffusionTransformer`, fp params in
    memory). The shared conditioning, the patch embedding and the output layer stay fp."""

    def __init__(self, model):
        if model.config.kind != "pixart":
            raise ValueError(f"{model.path}: PixArtAdapter needs a PixArt transformer, got a "
                             f"{model.config.kind!r} model")
        self.model = model
        self.config: DiTConfig = model.config
        self.params = model.params
        self.spec = pixart_block_spec(self.config)
        self.num_blocks = num_blocks(self.params)

    def check(self) -> None:
        for key in ("pos_embed", "adaln_single", "transformer_blocks", "scale_shift_table",
                    "proj_out"):
            if key not in self.params:
                raise ValueError(f"{self.model.path}: PixArt params miss {key!r}")

    def read_block(self, b: int) -> dict:
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), block_params(self.params, b))

    def make_batch(self, calib, *, n_samples: int, seqlen: int | None = None) -> dict:
        return pixart_batch(self.config, self.params, calib, n_samples=n_samples)

    def first_input(self, batch: dict):
        return _embed(self.config, self.params["pos_embed"], jnp.asarray(batch["latents"]))

    def assemble(self, blocks: list) -> dict:
        return {**{k: v for k, v in self.params.items() if k != "transformer_blocks"},
                "transformer_blocks": list(blocks)}

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr(self.config).encode())
        for path in ("attn1/to_q", "attn2/to_k"):
            a, b = path.split("/")
            w = block_params(self.params, 0)[a][b]["kernel"]
            h.update(np.ascontiguousarray(np.asarray(w, np.float32).ravel()[::7]).tobytes())
        return h.hexdigest()[:16]
