"""LLaDA: a bidirectional mask-predictor transformer, as pure jittable functions over a params dict.

The network is a Llama-style stack without a causal mask: every position attends to every
unpadded position. Parameters (Flax layout, kernels ``[in, out]``; names follow the LLaDA
checkpoint)::

    {"wte": {"embedding": [E, D]},                     # E = embedding_size (rows incl. [MASK])
     "blocks": <block params, each leaf with a leading [L] axis>   # stacked; or a list of blocks
     "ln_f": {"scale": [D]},
     "ff_out": {"kernel": [D, E]}}                     # the LM head; absent when weight_tying

    block = {"attn_norm": {"scale": [D]},
             "q_proj": {"kernel": [D, H*hd]}, "k_proj": {"kernel": [D, KV*hd]},
             "v_proj": {"kernel": [D, KV*hd]}, "attn_out": {"kernel": [H*hd, D]},
             "ff_norm": {"scale": [D]},
             "ff_proj": {"kernel": [D, F]},            # the gate (through SiLU)
             "up_proj": {"kernel": [D, F]},
             "ff_out": {"kernel": [F, D]}}

One block: ``h = x + attn_out(Attn(attn_norm(x)))``, ``y = h + ff_out(silu(ff_proj(n)) ⊙
up_proj(n))`` with ``n = ff_norm(h)``. RoPE (half rotation) is applied to q and k by explicit
``positions`` ``[B, T]`` (default: the column index, so left padding does not renumber), and an
optional ``attention_mask`` ``[B, T]`` (1 attend, 0 padded key) closes keys for every query.
Linears go through :func:`jaxquant.nn.linear.apply_linear`, so QArray kernels run as well.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp

from jaxquant.models.common.layers import (
    apply_rope,
    attention_mask,
    grouped_attention,
    rope_cos_sin,
)
from jaxquant.models.llada.config import LLaDAConfig
from jaxquant.nn.linear import apply_linear, bcast_last

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
BLOCK_NORMS = ("attn_norm", "ff_norm")


# -------------------------------------------------------------------- layers
def rms_norm(x: jax.Array, p: dict, eps: float) -> jax.Array:
    """``x / sqrt(mean(x²) + eps) ⊙ scale`` over the last axis, in float32. ``x`` ``[..., D]``."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    y = y * bcast_last(p["scale"].astype(jnp.float32), y.ndim)
    if "bias" in p:  # only a calibration correction adds one (D²Quant's DAC); LLaDA has none
        y = y + bcast_last(p["bias"].astype(jnp.float32), y.ndim)
    return y.astype(x.dtype)


def qkv(cfg: LLaDAConfig, bp: dict, h: jax.Array, positions: jax.Array):
    """Projected and rotated ``q`` ``[B, T, H, hd]``, ``k`` / ``v`` ``[B, T, KV, hd]`` of the
    normed input ``h`` ``[B, T, D]`` at RoPE ``positions`` ``[B, T]``."""
    b, t, _ = h.shape
    hd = cfg.head_dim
    q = apply_linear(h, bp["q_proj"]).reshape(b, t, cfg.n_heads, hd)
    k = apply_linear(h, bp["k_proj"]).reshape(b, t, cfg.n_kv_heads, hd)
    v = apply_linear(h, bp["v_proj"]).reshape(b, t, cfg.n_kv_heads, hd)
    cos, sin = rope_cos_sin(positions, hd, cfg.rope)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def attention(cfg: LLaDAConfig, bp: dict, h: jax.Array, positions: jax.Array,
              mask: jax.Array) -> jax.Array:
    """Bidirectional GQA self-attention of the normed input ``h`` ``[B, T, D]`` with RoPE at
    ``positions`` ``[B, T]`` and the boolean key mask ``mask`` ``[B, 1, 1, T, T]``.
    Query head ``i`` reads KV head ``i // (H / KV)`` (LLaDA's ``repeat_interleave``)."""
    q, k, v = qkv(cfg, bp, h, positions)
    o = grouped_attention(q, k, v, mask, cfg.n_kv_heads).astype(h.dtype)
    return apply_linear(o, bp["attn_out"])


def mlp(bp: dict, n: jax.Array) -> jax.Array:
    """``ff_out(silu(ff_proj(n)) ⊙ up_proj(n))`` of ``n`` ``[B, T, D]``."""
    gate = jax.nn.silu(apply_linear(n, bp["ff_proj"]))
    return apply_linear(gate * apply_linear(n, bp["up_proj"]), bp["ff_out"])


def key_mask(attention_mask_bt: jax.Array | None, b: int, t: int) -> jax.Array:
    """The boolean ``[B, 1, 1, T, T]`` mask: every query sees every key whose
    ``attention_mask`` ``[B, T]`` is nonzero (all keys when it is None). No causal part."""
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    valid = None if attention_mask_bt is None else attention_mask_bt.astype(jnp.bool_)
    return attention_mask(idx, idx, valid, causal=False)


def block_apply(cfg: LLaDAConfig, bp: dict, x: jax.Array, positions: jax.Array,
                mask: jax.Array | None = None) -> jax.Array:
    """One LLaDA block on ``x`` ``[B, T, D]``; ``mask`` ``[B, 1, 1, T, T]`` (default: all keys)."""
    if mask is None:
        mask = key_mask(None, x.shape[0], x.shape[1])
    h = x + attention(cfg, bp, rms_norm(x, bp["attn_norm"], cfg.rms_norm_eps), positions, mask)
    return h + mlp(bp, rms_norm(h, bp["ff_norm"], cfg.rms_norm_eps))


def block_params(params: dict, i: int) -> dict:
    """Block ``i``'s params: item ``i`` of a list, or slice ``i`` of stacked ``[L, ...]`` leaves."""
    blocks = params["blocks"]
    if isinstance(blocks, list | tuple):
        return blocks[i]
    return jax.tree.map(lambda a: a[i], blocks)


def embed(params: dict, input_ids: jax.Array, dtype=jnp.float32) -> jax.Array:
    """``wte[input_ids]``: ``[B, T]`` ids -> ``[B, T, D]`` (no scaling, no position embedding)."""
    return jnp.take(params["wte"]["embedding"], input_ids, axis=0).astype(dtype)


def head(cfg: LLaDAConfig, params: dict, x: jax.Array) -> jax.Array:
    """``ln_f`` then the LM head: ``[B, T, D]`` -> logits ``[B, T, E]`` (float32)."""
    h = rms_norm(x, params["ln_f"], cfg.rms_norm_eps).astype(jnp.float32)
    if cfg.weight_tying:
        w = params["wte"]["embedding"].astype(jnp.float32)
        return jnp.einsum("btd,ed->bte", h, w)
    return apply_linear(h, params["ff_out"]).astype(jnp.float32)


def forward(cfg: LLaDAConfig, params: dict, input_ids: jax.Array,
            attention_mask: jax.Array | None = None, positions: jax.Array | None = None,
            *, attn_mask: jax.Array | None = None, dtype=jnp.float32) -> jax.Array:
    """Logits of the mask predictor.

    Args:
      input_ids: ``[B, T]`` int token ids ([MASK] is ``cfg.mask_token_id``).
      attention_mask: ``[B, T]`` (1 = attend, 0 = padded key) or None (all keys). Padded
        queries still get logits (they attend to the unpadded keys).
      positions: ``[B, T]`` RoPE positions; default ``0..T-1`` in every row.
      attn_mask: optional boolean ``[B, T, T]`` (query, key) visibility, and-ed with
        ``attention_mask`` (e.g. the block-causal mask of block diffusion).

    Returns:
      logits ``[B, T, embedding_size]`` float32.
    """
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = key_mask(attention_mask, b, t)
    if attn_mask is not None:
        mask = mask & jnp.asarray(attn_mask, jnp.bool_)[:, None, None]
    x = embed(params, input_ids, dtype)
    blocks = params["blocks"]
    if isinstance(blocks, list | tuple):
        for bp in blocks:
            x = block_apply(cfg, bp, x, positions, mask)
    else:
        def body(x, bp):
            return block_apply(cfg, bp, x, positions, mask), None

        x, _ = jax.lax.scan(body, x, blocks)
    return head(cfg, params, x)


def forward_cached(cfg: LLaDAConfig, params: dict, input_ids: jax.Array, positions: jax.Array,
                   cache_k: jax.Array, cache_v: jax.Array, cache_valid: jax.Array,
                   self_mask: jax.Array | None = None, *, dtype=jnp.float32):
    """Logits of ``input_ids`` ``[B, T]`` attending to a KV cache and to each other.

    The ``T`` new tokens attend bidirectionally among themselves (where ``self_mask`` ``[B, T,
    T]`` allows; default all) and to the cache slots with ``cache_valid`` ``[B, S]`` set.
    ``cache_k`` / ``cache_v`` ``[L, B, S, KV, hd]`` hold rotated keys and values, as this
    function returns them for the new tokens, so a caller writes them in to extend the cache.

    Returns ``(logits [B, T, E] float32, k_new [L, B, T, KV, hd], v_new [L, B, T, KV, hd])``.
    """
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    if self_mask is None:
        self_mask = jnp.ones((b, t, t), jnp.bool_)
    vis = jnp.concatenate([jnp.broadcast_to(cache_valid[:, None, :], (b, t, cache_k.shape[2])),
                           self_mask], axis=-1)[:, None, None]  # [B, 1, 1, T, S + T]
    x = embed(params, input_ids, dtype)
    blocks = params["blocks"]
    if isinstance(blocks, list | tuple):
        blocks = jax.tree.map(lambda *a: jnp.stack(a), *blocks)

    def body(x, layer):
        bp, ck, cv = layer
        h_in = rms_norm(x, bp["attn_norm"], cfg.rms_norm_eps)
        q, k, v = qkv(cfg, bp, h_in, positions)
        kk = jnp.concatenate([ck.astype(k.dtype), k], axis=1)
        vv = jnp.concatenate([cv.astype(v.dtype), v], axis=1)
        o = grouped_attention(q, kk, vv, vis, cfg.n_kv_heads).astype(x.dtype)
        h = x + apply_linear(o, bp["attn_out"])
        y = h + mlp(bp, rms_norm(h, bp["ff_norm"], cfg.rms_norm_eps))
        return y, (k, v)

    x, (k_new, v_new) = jax.lax.scan(body, x, (blocks, cache_k, cache_v))
    return head(cfg, params, x), k_new, v_new


def empty_cache(cfg: LLaDAConfig, batch: int, length: int, dtype=jnp.float32):
    """Zeroed ``(cache_k, cache_v)`` ``[L, B, length, KV, hd]`` for :func:`forward_cached`."""
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


_forward_jit = jax.jit(forward, static_argnums=0, static_argnames="dtype")


# -------------------------------------------------------------------- random init (tests, demos)
def init_params(cfg: LLaDAConfig, key: jax.Array, *, dtype=jnp.float32) -> dict:
    """Random stacked params of ``cfg``: kernels ``N(0, 1/fan_in)``, norm scales
    ``1 + N(0, 0.2²)``, embedding ``N(0, 1)``."""
    d, f, hd = cfg.d_model, cfg.mlp_hidden_size, cfg.head_dim
    n_layers = cfg.n_layers
    shapes = {"q_proj": (d, cfg.n_heads * hd), "k_proj": (d, cfg.n_kv_heads * hd),
              "v_proj": (d, cfg.n_kv_heads * hd), "attn_out": (cfg.n_heads * hd, d),
              "ff_proj": (d, f), "up_proj": (d, f), "ff_out": (f, d)}
    keys = iter(jax.random.split(key, len(shapes) + len(BLOCK_NORMS) + 4))

    def kernel(shape):
        return (jax.random.normal(next(keys), shape, jnp.float32)
                * (shape[-2] ** -0.5)).astype(dtype)

    def scale(shape):
        return (1.0 + 0.2 * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    blocks = {n: {"kernel": kernel((n_layers, *s))} for n, s in shapes.items()}
    blocks |= {n: {"scale": scale((n_layers, d))} for n in BLOCK_NORMS}
    params = {"wte": {"embedding": jax.random.normal(next(keys), (cfg.embedding_size, d),
                                                     jnp.float32).astype(dtype)},
              "blocks": blocks, "ln_f": {"scale": scale((d,))}}
    if not cfg.weight_tying:
        params["ff_out"] = {"kernel": kernel((d, cfg.embedding_size))}
    return params


# -------------------------------------------------------------------- the model object
@dataclasses.dataclass(frozen=True)
class LogitsFn:
    """``fn(params, input_ids, attention_mask=None) -> logits`` of one config: hashable by the
    config, so it can be a static argument of a jitted sampler without recompiling per model."""

    config: LLaDAConfig

    def __call__(self, params, input_ids, attention_mask=None, positions=None, attn_mask=None):
        return forward(self.config, params, input_ids, attention_mask, positions,
                       attn_mask=attn_mask)

    def cached(self, params, input_ids, positions, cache_k, cache_v, cache_valid,
               self_mask=None):
        """:func:`forward_cached` of this config (block diffusion with a KV cache)."""
        return forward_cached(self.config, params, input_ids, positions, cache_k, cache_v,
                              cache_valid, self_mask)

    def empty_cache(self, batch: int, length: int, dtype=jnp.float32):
        return empty_cache(self.config, batch, length, dtype)

    @property
    def max_length(self) -> int:
        return self.config.max_sequence_length


@dataclasses.dataclass
class LLaDAModel:
    """A loaded LLaDA checkpoint: ``config``, stacked ``params``, the ``path`` it came from.

    ``model(input_ids, attention_mask=None)`` returns float32 logits ``[B, T, E]`` (jitted);
    ``model.generate(prompt_ids, ...)`` runs masked-diffusion decoding
    (:func:`jaxquant.diffusion.masked.generate`) with the config's ``mask_token_id``.
    """

    config: LLaDAConfig
    params: Any = dataclasses.field(repr=False)
    path: str = ""

    def __call__(self, input_ids, attention_mask=None, positions=None) -> jax.Array:
        ids = jnp.asarray(input_ids, dtype=jnp.int32)
        am = None if attention_mask is None else jnp.asarray(attention_mask, dtype=jnp.int32)
        pos = None if positions is None else jnp.asarray(positions, dtype=jnp.int32)
        return _forward_jit(self.config, self.params, ids, am, pos)

    @functools.cached_property
    def logits_fn(self) -> LogitsFn:
        return LogitsFn(self.config)

    def generate(self, prompt_ids, **kw) -> jax.Array:
        """Masked-diffusion decoding; see :func:`jaxquant.diffusion.masked.generate`."""
        from jaxquant.diffusion.masked import generate

        kw.setdefault("mask_id", self.config.mask_token_id)
        kw.setdefault("max_length", self.config.max_sequence_length)
        return generate(self.logits_fn, self.params, prompt_ids, **kw)

    def generate_compressed(self, prompt_ids, **kw):
        """Decoding with Elastic-dLLM [MASK] compression / a protected terminal [MASK]; see
        :func:`jaxquant.diffusion.elastic.generate_compressed`."""
        from jaxquant.diffusion.elastic import generate_compressed

        kw.setdefault("mask_id", self.config.mask_token_id)
        kw.setdefault("max_length", self.config.max_sequence_length)
        return generate_compressed(self.logits_fn, self.params, prompt_ids, **kw)

    def generate_block(self, prompt_ids, **kw):
        """Block-diffusion decoding with a KV cache / protected terminal [MASK]; see
        :func:`jaxquant.diffusion.block.generate_block`."""
        from jaxquant.diffusion.block import generate_block

        kw.setdefault("mask_id", self.config.mask_token_id)
        kw.setdefault("max_length", self.config.max_sequence_length)
        return generate_block(self.logits_fn, self.params, prompt_ids, **kw)

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))
