"""DiT (``DiTTransformer2DModel``): class-conditional diffusion transformer with adaLN-Zero, as pure
jittable functions over a nested-dict parameter pytree.

Parameters (kernels ``[in, out]``; ``(…)`` optional)::

    {"pos_embed": {"proj": {"kernel": [C*p*p, D], "bias": [D]}},      # the patchify conv
     "transformer_blocks": [block, ...],                 # a list (or stacked: leaves [L, ...])
     "proj_out_1": {"kernel": [D, 2D], "bias"}, "proj_out_2": {"kernel": [D, p*p*Cout], "bias"}}

    block = {"norm1": {"emb": {"timestep_embedder": {"linear_1": [256, D], "linear_2": [D, D]},
                               "class_embedder": {"embedding_table": {"embedding": [K+1, D]}}},
                       "linear": {"kernel": [D, 6D], "bias"}},
             "attn1": {"to_q", "to_k", "to_v" (bias iff attention_bias), "to_out.0"},
             ("norm3": {"scale": [D], "bias": [D]}),       # iff norm_elementwise_affine
             "ff": {"net.0": {"proj": [D, F]}, "net.2": [F, D]}}

A block's linears (paths for :func:`jaxquant.models.dit.layers.lin`) are :data:`DIT_BLOCK_LINEARS`.
Every block owns its timestep / class embedder (diffusers builds one per block); the output layer
is conditioned on block 0's. Blocks run one at a time through :func:`dit_block_apply`, so a
calibration engine can quantize block by block (:func:`block_params` / :func:`set_block_params`).
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

ATTN1 = ("attn1/to_q", "attn1/to_k", "attn1/to_v", "attn1/to_out.0")
FF = ("ff/net.0/proj", "ff/net.2")
DIT_BLOCK_LINEARS = ("norm1/emb/timestep_embedder/linear_1",
                     "norm1/emb/timestep_embedder/linear_2", "norm1/linear", *ATTN1, *FF)
ADA_EPS = 1e-6  # AdaLayerNormZero's inner LayerNorm and norm_out


# -------------------------------------------------------------------- block params
def block_params(params: dict, i: int, key: str = "transformer_blocks") -> dict:
    """Block ``i``'s params: item ``i`` of the list ``params[key]``, or slice ``i`` of its leaves
    when stacked (every leaf with a leading ``[L]`` axis). ``key`` is ``"transformer_blocks"``
    (Flux also has ``"single_transformer_blocks"``)."""
    blocks = params[key]
    if isinstance(blocks, list | tuple):
        return blocks[i]
    return jax.tree.map(lambda a: a[i], blocks)


def set_block_params(params: dict, i: int, new_block: dict,
                     key: str = "transformer_blocks") -> dict:
    """A copy of ``params`` with block ``i`` of ``params[key]`` replaced by ``new_block`` (may hold
    QArray kernels); stacked blocks become a list. ``params`` itself is not modified."""
    blocks = params[key]
    if not isinstance(blocks, list | tuple):
        blocks = [block_params(params, j, key) for j in range(num_blocks(params, key))]
    blocks = list(blocks)
    blocks[i] = new_block
    return {**params, key: blocks}


def num_blocks(params: dict, key: str = "transformer_blocks") -> int:
    """The number of blocks in ``params[key]`` (a list, or stacked leaves ``[L, ...]``)."""
    blocks = params[key]
    if isinstance(blocks, list | tuple):
        return len(blocks)
    leaves = jax.tree.leaves(blocks)
    return leaves[0].shape[0] if leaves else 0


# -------------------------------------------------------------------- conditioning
def broadcast_batch(v: jax.Array, batch: int) -> jax.Array:
    """A scalar or ``[B]`` per-sample value as ``[B]``."""
    v = jnp.asarray(v)
    return jnp.broadcast_to(v.reshape(-1), (batch,)) if v.size == 1 else v.reshape(batch)


def dit_block_cond(cfg: DiTConfig, bp: dict, timestep: jax.Array,
                   class_labels: jax.Array) -> jax.Array:
    """A block's ``CombinedTimestepLabelEmbeddings``: ``TimestepEmbedding(sinusoid(t)) +
    table[label]`` ``[B, D]`` for ``timestep`` ``[B]`` (int or float) and ``class_labels`` ``[B]``
    (int; ``num_classes`` is the null class)."""
    e = bp["norm1"]["emb"]
    t = timestep_mlp(e["timestep_embedder"],
                     timestep_embedding(timestep, 256, flip_sin_to_cos=True,
                                        downscale_freq_shift=1.0))
    table = e["class_embedder"]["embedding_table"]["embedding"]
    return t + jnp.take(table, class_labels.astype(jnp.int32), axis=0).astype(t.dtype)


# -------------------------------------------------------------------- one block
def dit_block_apply_emb(cfg: DiTConfig, bp: dict, x: jax.Array, emb: jax.Array) -> jax.Array:
    """One ``BasicTransformerBlock`` (ada_norm_zero) given its conditioning ``emb`` ``[B, D]``
    (:func:`dit_block_cond`): ``x`` ``[B, T, D]`` -> ``[B, T, D]``."""
    mod = lin(bp, "norm1/linear", jax.nn.silu(emb))[:, None, :]  # [B, 1, 6D]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = modulate(layer_norm(x, ADA_EPS), shift_msa, scale_msa)
    x = x + gate_msa * attn_block(bp["attn1"], h, cfg.num_heads)
    h = modulate(layer_norm(x, cfg.norm_eps, bp.get("norm3")), shift_mlp, scale_mlp)
    return x + gate_mlp * feed_forward(bp["ff"], h, cfg.activation_fn)


def dit_block_apply(cfg: DiTConfig, bp: dict, x: jax.Array, timestep: jax.Array,
                    class_labels: jax.Array) -> jax.Array:
    """One DiT block with its own embedder: ``x`` ``[B, T, D]``, ``timestep`` ``[B]``,
    ``class_labels`` ``[B]`` -> ``[B, T, D]``."""
    return dit_block_apply_emb(cfg, bp, x, dit_block_cond(cfg, bp, timestep, class_labels))


# -------------------------------------------------------------------- input and output
def dit_embed(cfg: DiTConfig, params: dict, hidden_states: jax.Array) -> jax.Array:
    """Latents ``[B, C, H, W]`` -> tokens ``[B, T, D]`` (patch conv + sin-cos positions)."""
    return patch_embed(params["pos_embed"], hidden_states.astype(jnp.float32), cfg.patch_size,
                       cfg.base_size, 1.0)


def dit_head(cfg: DiTConfig, params: dict, x: jax.Array, cond: jax.Array, h: int,
             w: int) -> jax.Array:
    """Output layer: ``norm_out`` modulated by ``proj_out_1(silu(cond))``, ``proj_out_2``,
    unpatchify. ``x`` ``[B, T, D]``, ``cond`` ``[B, D]`` (block 0's conditioning) -> ``[B, Cout,
    h*p, w*p]``."""
    shift, scale = jnp.split(lin(params, "proj_out_1", jax.nn.silu(cond))[:, None, :], 2, axis=-1)
    y = lin(params, "proj_out_2", modulate(layer_norm(x, ADA_EPS), shift, scale))
    return unpatchify(y, h, w, cfg.patch_size, cfg.out_channels)


# -------------------------------------------------------------------- the model
@functools.partial(jax.jit, static_argnums=0)
def dit_forward(cfg: DiTConfig, params: dict, hidden_states: jax.Array, timestep: jax.Array,
                class_labels: jax.Array) -> jax.Array:
    """diffusers ``DiTTransformer2DModel(...).sample`` (float32, no input checks; see
    :class:`jaxquant.models.dit.DiffusionTransformer` for the checked call).

    Args:
      hidden_states: latents ``[B, C, H, W]`` with ``H == W`` divisible by the patch size.
      timestep: ``[B]`` or a scalar (int or float).
      class_labels: ``[B]`` or a scalar int in ``[0, num_classes]``.

    Returns:
      ``[B, out_channels, H, W]`` float32.
    """
    b, _, hh, ww = hidden_states.shape
    t = broadcast_batch(timestep, b)
    y = broadcast_batch(class_labels, b)
    x = dit_embed(cfg, params, hidden_states)
    cond0 = None
    for i in range(num_blocks(params)):
        bp = block_params(params, i)
        emb = dit_block_cond(cfg, bp, t, y)
        cond0 = emb if cond0 is None else cond0
        x = dit_block_apply_emb(cfg, bp, x, emb)
    return dit_head(cfg, params, x, cond0, hh // cfg.patch_size, ww // cfg.patch_size)
