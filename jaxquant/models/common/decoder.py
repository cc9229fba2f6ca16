"""The decoder-only transformer shared by Llama, Qwen2 and Qwen3.

Parameters (Flax layout, kernels ``[in, out]``)::

    {"embed_tokens": {"embedding": [V, D]},
     "layers": <block params, each leaf with a leading [L] axis>,   # stacked (scan) form
     "norm": {"scale": [D]},
     "lm_head": {"kernel": [D, V]}}                                # absent when tied

    block = {"input_layernorm": {"scale", ("bias")},
             "self_attn": {"q_proj": {"kernel", ("bias")}, "k_proj", "v_proj", "o_proj",
                           ("q_norm", "k_norm")},
             "post_attention_layernorm": {"scale", ("bias")},
             "mlp": {"gate_proj", "up_proj", "down_proj"}}

The same stacked parameters run either as a ``lax.scan`` over layers (``scan_layers=True``, one
compiled block: fast compiles, what TPU pods want) or as a Python loop over per-block slices; and
each block runs on its own via :func:`block_apply`, which the sequential calibration driver uses.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.models.common.config import DecoderConfig
from jaxquant.models.common.layers import MLP, Attention, RMSNorm, attention_mask
from jaxquant.nn.linear import Linear


class DecoderBlock(nn.Module):
    cfg: DecoderConfig
    act_bits: int | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        c = self.cfg
        h = RMSNorm(c.rms_norm_eps, c.norm_bias, name="input_layernorm")(x)
        a, new_cache = Attention(c, self.act_bits, name="self_attn")(
            h, positions, mask, cache, cache_index
        )
        x = x + a
        h = RMSNorm(c.rms_norm_eps, c.norm_bias, name="post_attention_layernorm")(x)
        x = x + MLP(c, self.act_bits, name="mlp")(h)
        return x, new_cache


class _ScanBlock(nn.Module):
    """Adapter giving DecoderBlock the ``(carry, xs) -> (carry, ys)`` signature of nn.scan."""

    cfg: DecoderConfig
    act_bits: int | None = None

    @nn.compact
    def __call__(self, x, layer_cache, positions, mask, cache_index):
        x, new_cache = DecoderBlock(self.cfg, self.act_bits, name="block")(
            x, positions, mask, layer_cache, cache_index
        )
        return x, new_cache


def block_apply(cfg: DecoderConfig, block_params, x, positions, mask=None, *, act_bits=None):
    """Run one decoder block (no cache). ``x`` ``[B, T, D]``, ``positions`` ``[B, T]``.

    ``mask`` defaults to the config's causal (or full) mask over ``T`` keys; a custom mask of a
    causal config must not open keys after a query's slot (cache-less causal attention skips
    the blocks above the diagonal).
    """
    if mask is None:
        idx = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), positions.shape)
        mask = attention_mask(idx, idx, None, causal=cfg.causal)
    y, _ = DecoderBlock(cfg, act_bits).apply({"params": block_params}, x, positions, mask)
    return y


def _default_mask(cfg: DecoderConfig, x, positions):
    idx = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), positions.shape)
    return attention_mask(idx, idx, None, causal=cfg.causal)


def attn_half(cfg: DecoderConfig, block_params, x, positions, mask=None):
    """The first half of a block: ``r = x + attn(input_layernorm(x))`` (no cache). With
    :func:`mlp_half`, ``mlp_half(cfg, p, attn_half(cfg, p, x, pos)) == block_apply(cfg, p, x,
    pos)``; the calibration driver runs the halves separately (attention before MLP)."""
    if mask is None:
        mask = _default_mask(cfg, x, positions)
    h = RMSNorm(cfg.rms_norm_eps, cfg.norm_bias).apply(
        {"params": block_params["input_layernorm"]}, x)
    a, _ = Attention(cfg).apply({"params": block_params["self_attn"]}, h, positions, mask)
    return x + a


def post_attn_norm(cfg: DecoderConfig, block_params, r):
    """``post_attention_layernorm(r)`` (with its bias when the params carry one)."""
    return RMSNorm(cfg.rms_norm_eps, cfg.norm_bias).apply(
        {"params": block_params["post_attention_layernorm"]}, r)


def mlp_half(cfg: DecoderConfig, block_params, r):
    """The second half of a block: ``r + mlp(post_attention_layernorm(r))``."""
    return r + MLP(cfg).apply({"params": block_params["mlp"]}, post_attn_norm(cfg, block_params, r))


def layer_params(params, i: int):
    """The parameters of block ``i``: sliced out of the stacked ``params["layers"]``, or item ``i``
    when ``layers`` is a list (blocks with different structures, e.g. mixed precision)."""
    if isinstance(params["layers"], list | tuple):
        return params["layers"][i]
    return jax.tree.map(lambda a: a[i], params["layers"])


def embed(params, tokens: jax.Array, dtype=jnp.float32) -> jax.Array:
    return jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0).astype(dtype)


def head(cfg: DecoderConfig, params, x: jax.Array) -> jax.Array:
    """Final norm and LM head: ``[B, T, D] -> [B, T, V]`` logits (float32)."""
    h = RMSNorm(cfg.rms_norm_eps, name="norm").apply({"params": params["norm"]}, x)
    if cfg.tie_word_embeddings:
        w = params["embed_tokens"]["embedding"]
        return jnp.einsum("btd,vd->btv", h.astype(jnp.float32), w.astype(jnp.float32))
    return Linear(cfg.vocab_size).apply({"params": params["lm_head"]}, h.astype(jnp.float32))


def init_cache(cfg: DecoderConfig, batch: int, max_len: int, dtype=jnp.float32):
    """An empty stacked KV cache: ``(k, v)`` each ``[L, B, max_len, KV, hd]``."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def forward(
    cfg: DecoderConfig,
    params,
    tokens: jax.Array,
    positions: jax.Array | None = None,
    *,
    key_valid: jax.Array | None = None,
    cache=None,
    cache_index: jax.Array | int = 0,
    scan_layers: bool = True,
    act_bits: int | None = None,
    dtype=jnp.float32,
):
    """Logits of the model.

    Args:
      tokens: ``[B, T]`` int token ids.
      positions: ``[B, T]`` RoPE positions (default ``cache_index + arange(T)``).
      key_valid: ``[B, S]`` bool, keys that may be attended (padding off); ``S`` is ``T``
        without a cache and the cache length with one.
      cache: stacked ``(k, v)`` from :func:`init_cache`; new keys are written at ``cache_index``.
      scan_layers: ``lax.scan`` over the stacked layers (True) or a Python loop (False).

    Returns:
      ``(logits [B, T, V] float32, new cache or None)``.
    """
    b, t = tokens.shape
    q_index = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
    if positions is None:
        positions = q_index
    if cache is None:  # no cache: the T tokens are slots 0..T-1 (cache_index only moves RoPE)
        q_index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    s = t if cache is None else cache[0].shape[2]
    k_index = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    mask = attention_mask(q_index, k_index, key_valid, causal=cfg.causal)
    x = embed(params, tokens, dtype)

    if scan_layers and not isinstance(params["layers"], list | tuple):
        scan = nn.scan(
            _ScanBlock,
            variable_axes={"params": 0},
            split_rngs={"params": False},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            out_axes=0,
            length=cfg.num_layers,
        )
        x, new_cache = scan(cfg, act_bits).apply(
            {"params": {"block": params["layers"]}}, x, cache, positions, mask, cache_index
        )
    else:
        ks, vs = [], []
        for i in range(cfg.num_layers):
            layer_cache = None if cache is None else (cache[0][i], cache[1][i])
            x, nc = DecoderBlock(cfg, act_bits).apply(
                {"params": layer_params(params, i)}, x, positions, mask, layer_cache, cache_index
            )
            if nc is not None:
                ks.append(nc[0])
                vs.append(nc[1])
        new_cache = (jnp.stack(ks), jnp.stack(vs)) if ks else None
    return head(cfg, params, x), new_cache
