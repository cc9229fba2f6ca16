"""PixArt-α (``PixArtTransformer2DModel``): text-conditional diffusion transformer with adaLN-single
and cross-attention, as pure jittable functions over a nested-dict parameter pytree.

Parameters (kernels ``[in, out]``; ``(…)`` optional)::

    {"pos_embed": {"proj": {"kernel": [C*p*p, D], "bias": [D]}},
     "adaln_single": {"emb": {"timestep_embedder": {"linear_1": [256, D], "linear_2": [D, D]},
                              ("resolution_embedder": {"linear_1": [256, D/3], "linear_2"},
                               "aspect_ratio_embedder": {...})},     # iff use_additional_conditions
                      "linear": {"kernel": [D, 6D], "bias"}},
     ("caption_projection": {"linear_1": [Ccap, D], "linear_2": [D, D]}),   # iff caption_channels
     "transformer_blocks": [block, ...],
     "scale_shift_table": [2, D],
     "proj_out": {"kernel": [D, p*p*Cout], "bias"}}

    block = {"scale_shift_table": [6, D],
             ("norm1": {"scale", "bias"}), ("norm2": {...}),        # iff norm_elementwise_affine
             "attn1": {"to_q", "to_k", "to_v", "to_out.0"},
             "attn2": {"to_q": [D, D], "to_k": [Dc, D], "to_v": [Dc, D], "to_out.0"},
             "ff": {"net.0": {"proj"}, "net.2"}}

The block's linears are :data:`PIXART_BLOCK_LINEARS`. The shared conditioning (adaLN-single's
``[B, 6D]`` modulation, the projected caption and its key bias) is computed once by
:func:`pixart_prepare`; each block then runs alone through :func:`pixart_block_apply`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.models.dit.config import DiTConfig
from jaxquant.models.dit.layers import (
    attn_block,
    feed_forward,
    layer_norm,
    lin,
    modulate,
    patch_embed,
    timestep_embedding,
    timestep_mlp,
    unpatchify,
)
from jaxquant.models.dit.model import ATTN1, FF, block_params, broadcast_batch, num_blocks

ATTN2 = ("attn2/to_q", "attn2/to_k", "attn2/to_v", "attn2/to_out.0")
PIXART_BLOCK_LINEARS = ATTN1 + ATTN2 + FF
OUT_EPS = 1e-6  # norm_out


def encoder_key_bias(mask: jax.Array) -> jax.Array:
    """diffusers' encoder-mask bias ``[B, S]``: ``(1 - mask) * -10000`` from a keep-mask ``[B, S]``
    (1 / True keep), or a ready bias ``[B, 1, S]`` passed through."""
    if mask.ndim == 3:
        return mask[:, 0, :].astype(jnp.float32)
    return (1.0 - mask.astype(jnp.float32)) * -10000.0


def adaln_single(cfg: DiTConfig, params: dict, timestep: jax.Array,
                 resolution: jax.Array | None = None,
                 aspect_ratio: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``AdaLayerNormSingle``: ``(linear(silu(e)) [B, 6D], e [B, D])`` where ``e`` embeds
    ``timestep`` ``[B]`` (plus ``resolution`` ``[B, 2]`` and ``aspect_ratio`` ``[B, 1]`` when the
    config uses additional conditions)."""
    a = params["adaln_single"]
    e = a["emb"]
    temb = timestep_mlp(e["timestep_embedder"],
                        timestep_embedding(timestep, 256, flip_sin_to_cos=True,
                                           downscale_freq_shift=0.0))
    if cfg.use_additional_conditions:
        b = temb.shape[0]

        def size_emb(name, v):
            s = timestep_embedding(v.reshape(-1), 256, flip_sin_to_cos=True,
                                   downscale_freq_shift=0.0)
            return timestep_mlp(e[name], s).reshape(b, -1)

        temb = temb + jnp.concatenate([size_emb("resolution_embedder", resolution),
                                       size_emb("aspect_ratio_embedder", aspect_ratio)], axis=1)
    return lin(a, "linear", jax.nn.silu(temb)), temb


def caption_projection(params: dict, caption: jax.Array) -> jax.Array:
    """``PixArtAlphaTextProjection``: ``linear_2(gelu_tanh(linear_1(c)))``; ``caption``
    ``[B, S, Ccap]`` -> ``[B, S, D]`` (identity when the model has no caption projection)."""
    if "caption_projection" not in params:
        return caption
    p = params["caption_projection"]
    return lin(p, "linear_2", jax.nn.gelu(lin(p, "linear_1", caption), approximate=True))


def pixart_prepare(cfg: DiTConfig, params: dict, hidden_states: jax.Array, timestep: jax.Array,
                   encoder_hidden_states: jax.Array,
                   encoder_attention_mask: jax.Array | None = None,
                   resolution: jax.Array | None = None,
                   aspect_ratio: jax.Array | None = None) -> dict:
    """Everything the blocks read, computed once.

    Args:
      hidden_states: latents ``[B, C, H, W]``.
      timestep: ``[B]`` or a scalar.
      encoder_hidden_states: captions ``[B, S, Ccap]`` (``[B, S, Dc]`` without a projection).
      encoder_attention_mask: keep-mask ``[B, S]`` or bias ``[B, 1, S]``, optional.
      resolution, aspect_ratio: ``[B, 2]`` and ``[B, 1]`` (additional conditions only).

    Returns:
      ``{"x": [B, T, D], "temb": [B, 6D], "embedded_timestep": [B, D], "context": [B, S, D],
      "context_bias": [B, S] or None}``.
    """
    b = hidden_states.shape[0]
    x = patch_embed(params["pos_embed"], hidden_states.astype(jnp.float32), cfg.patch_size,
                    cfg.base_size, cfg.interpolation_scale)
    t = broadcast_batch(timestep, b)
    temb, embedded = adaln_single(cfg, params, t, resolution, aspect_ratio)
    context = caption_projection(params, encoder_hidden_states.astype(jnp.float32))
    bias = None if encoder_attention_mask is None else encoder_key_bias(encoder_attention_mask)
    return {"x": x, "temb": temb, "embedded_timestep": embedded, "context": context,
            "context_bias": bias}


def pixart_block_apply(cfg: DiTConfig, bp: dict, x: jax.Array, temb: jax.Array,
                       context: jax.Array, context_bias: jax.Array | None = None) -> jax.Array:
    """One ``BasicTransformerBlock`` (ada_norm_single).

    ``x`` ``[B, T, D]``, ``temb`` ``[B, 6D]`` (adaLN-single), ``context`` ``[B, S, Dc]``,
    ``context_bias`` ``[B, S]`` (see :func:`encoder_key_bias`). Returns ``[B, T, D]``.
    """
    b, _, d = x.shape
    mod = bp["scale_shift_table"].astype(jnp.float32)[None] + temb.reshape(b, 6, d)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)
    h = modulate(layer_norm(x, cfg.norm_eps, bp.get("norm1")), shift_msa, scale_msa)
    x = x + gate_msa * attn_block(bp["attn1"], h, cfg.num_heads)
    # PixArt applies no norm before the cross-attention
    x = x + attn_block(bp["attn2"], x, cfg.num_heads, context, context_bias)
    h = modulate(layer_norm(x, cfg.norm_eps, bp.get("norm2")), shift_mlp, scale_mlp)
    return x + gate_mlp * feed_forward(bp["ff"], h, cfg.activation_fn)


def pixart_head(cfg: DiTConfig, params: dict, x: jax.Array, embedded_timestep: jax.Array,
                h: int, w: int) -> jax.Array:
    """Output layer: ``norm_out`` modulated by ``scale_shift_table + embedded_timestep``,
    ``proj_out``, unpatchify. ``x`` ``[B, T, D]``, ``embedded_timestep`` ``[B, D]`` ->
    ``[B, Cout, h*p, w*p]``."""
    table = params["scale_shift_table"].astype(jnp.float32)[None]  # [1, 2, D]
    shift, scale = jnp.split(table + embedded_timestep[:, None, :], 2, axis=1)
    y = lin(params, "proj_out", modulate(layer_norm(x, OUT_EPS), shift, scale))
    return unpatchify(y, h, w, cfg.patch_size, cfg.out_channels)


@functools.partial(jax.jit, static_argnums=0)
def pixart_forward(cfg: DiTConfig, params: dict, hidden_states: jax.Array, timestep: jax.Array,
                   encoder_hidden_states: jax.Array,
                   encoder_attention_mask: jax.Array | None = None,
                   resolution: jax.Array | None = None,
                   aspect_ratio: jax.Array | None = None) -> jax.Array:
    """diffusers ``PixArtTransformer2DModel(...).sample`` (float32, no input checks; see
    :class:`jaxquant.models.dit.DiffusionTransformer` for the checked call).

    Args:
      hidden_states: latents ``[B, C, H, W]`` (``H``, ``W`` divisible by the patch size).
      timestep: ``[B]`` or a scalar.
      encoder_hidden_states: ``[B, S, caption_channels]``.
      encoder_attention_mask: ``[B, S]`` keep-mask or ``[B, 1, S]`` bias, optional.
      resolution, aspect_ratio: ``[B, 2]``, ``[B, 1]`` when ``use_additional_conditions``.

    Returns:
      ``[B, out_channels, H, W]`` float32.
    """
    _, _, hh, ww = hidden_states.shape
    s = pixart_prepare(cfg, params, hidden_states, timestep, encoder_hidden_states,
                       encoder_attention_mask, resolution, aspect_ratio)
    x = s["x"]
    for i in range(num_blocks(params)):
        x = pixart_block_apply(cfg, block_params(params, i), x, s["temb"], s["context"],
                               s["context_bias"])
    return pixart_head(cfg, params, x, s["embedded_timestep"], hh // cfg.patch_size,
                       ww // cfg.patch_size)
