"""Shared transformer layers: RMSNorm (with optional bias), rotary embeddings, attention, MLP.

Shapes: ``B`` batch, ``T`` query length, ``S`` key length, ``D`` hidden, ``H`` query heads,
``KV`` key/value heads, ``hd`` head dim. Attention takes explicit ``positions`` ``[B, T]`` for RoPE
(so sequences may be compressed with their original positions kept, as Elastic-dLLM needs), and an
optional key mask ``[B, S]``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.models.common.config import DecoderConfig, RopeConfig
from jaxquant.nn.linear import Linear, bcast_last


# -------------------------------------------------------------------- norms
class RMSNorm(nn.Module):
    """``y = g ⊙ x / sqrt(mean(x²) + eps) (+ β)``; the bias ``β`` is D²Quant's DAC correction."""

    eps: float = 1e-6
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        g = self.param("scale", nn.initializers.ones, (d,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = y * bcast_last(g.astype(jnp.float32), y.ndim)
        if self.use_bias or self.has_variable("params", "bias"):
            b = self.param("bias", nn.initializers.zeros, (d,))
            y = y + bcast_last(b.astype(jnp.float32), y.ndim)
        return y.astype(x.dtype)


# -------------------------------------------------------------------- rotary embeddings
def rope_inv_freq(head_dim: int, rope: RopeConfig) -> jax.Array:
    """Inverse frequencies ``[hd/2]`` (float32), with Llama-3 frequency scaling if asked."""
    inv = 1.0 / (rope.theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope.rope_type == "default":
        return inv
    if rope.rope_type != "llama3":
        raise ValueError(f"rope_type {rope.rope_type!r} is not supported (default, llama3)")
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * jnp.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_cos_sin(positions: jax.Array, head_dim: int, rope: RopeConfig):
    """``cos, sin`` ``[B, T, 1, hd]`` for integer ``positions`` ``[B, T]`` (HF half-rotation)."""
    inv = rope_inv_freq(head_dim, rope)
    ang = positions.astype(jnp.float32)[..., None] * inv.reshape(1, 1, -1)
    ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``[B, T, heads, hd]`` (computed in float32)."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rot * sin).astype(x.dtype)


# -------------------------------------------------------------------- attention
def attention_mask(
    q_index: jax.Array, k_index: jax.Array, key_valid: jax.Array | None, *, causal: bool
) -> jax.Array:
    """Boolean mask ``[B, 1, 1, T, S]``: key ``s`` visible to query ``t``.

    ``q_index`` ``[B, T]`` and ``k_index`` ``[B, S]`` are slot indices in the (cached) sequence;
    causality compares slots, so compressed sequences with gapped RoPE positions stay causal.
    """
    m = jnp.ones((q_index.shape[0], q_index.shape[1], k_index.shape[1]), jnp.bool_)
    if causal:
        m = m & (k_index[:, None, :] <= q_index[:, :, None])
    if key_valid is not None:
        m = m & key_valid[:, None, :]
    return m[:, None, None, :, :]


def _attend(qg, kt, vt, mask, hd: int):
    """Softmax attention of grouped queries ``qg`` ``[B, KV, T, G, hd]`` over ``kt``/``vt``
    ``[B, KV, S, hd]`` with ``mask`` ``[B, 1, 1, T, S]`` (or ``[B, 1, T, 1, S]``-broadcastable).

    The queries sharing a KV head form one ``[T*G, S]`` score matrix per KV head (one batched
    matmul, which XLA:CPU runs ~2.5x faster than a 5-D einsum). Returns ``[B, KV, T, G, hd]``.
    """
    b, kv, t, g, _ = qg.shape
    s = kt.shape[2]
    scores = jnp.einsum("bkqd,bksd->bkqs", qg.reshape(b, kv, t * g, hd), kt) * (hd**-0.5)
    scores = jnp.where(mask, scores.reshape(b, kv, t, g, s), jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(scores, axis=-1).reshape(b, kv, t * g, s)
    return jnp.einsum("bkqs,bksd->bkqd", p, vt).reshape(b, kv, t, g, hd)


def grouped_attention(q, k, v, mask, num_kv_heads: int, *, causal_blocks: int = 1) -> jax.Array:
    """Softmax attention with grouped KV heads (MHA, GQA, MQA), computed in float32.

    ``q`` ``[B, T, H, hd]``, ``k``/``v`` ``[B, S, KV, hd]``, ``mask`` ``[B, 1, 1, T, S]``.
    Returns ``[B, T, H*hd]``.

    ``causal_blocks=n > 1`` declares that ``mask`` is causal over slots ``0..T-1`` (a cache-less
    causal call, ``T == S``): the queries are split into ``n`` blocks and block ``i`` only scores
    the keys up to its last slot, skipping the ``(n-1)/2n`` of the score matrix that the mask
    zeroes anyway (the result is the same; other masks are still applied inside each block).
    It falls back to one block when ``T`` is not a multiple of ``n``.
    """
    b, t, h, hd = q.shape
    s, g = k.shape[1], h // num_kv_heads
    # [B, KV, T, G, hd]: query heads grouped under their KV head
    qg = q.astype(jnp.float32).reshape(b, t, num_kv_heads, g, hd).transpose(0, 2, 1, 3, 4)
    kt = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, KV, S, hd]
    vt = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    m = mask.reshape(b, 1, t, 1, s)
    n = causal_blocks if (causal_blocks > 1 and t == s and t % causal_blocks == 0) else 1
    c = t // n
    o = jnp.concatenate(
        [_attend(qg[:, :, i * c : (i + 1) * c], kt[:, :, : (i + 1) * c], vt[:, :, : (i + 1) * c],
                 m[:, :, i * c : (i + 1) * c, :, : (i + 1) * c] if n > 1 else m, hd)
         for i in range(n)], axis=2) if n > 1 else _attend(qg, kt, vt, m, hd)
    return o.transpose(0, 2, 1, 3, 4).reshape(b, t, h * hd)


def heads_with_rope(cfg: DecoderConfig, q, k, v, positions, q_norm=None, k_norm=None):
    """Projected ``q`` ``[B, T, H*hd]``, ``k``/``v`` ``[B, T, KV*hd]`` -> per-head ``q``, ``k``
    (qk-normed by the callables ``q_norm``/``k_norm`` when given, then rotated) and ``v``."""
    b, t, _ = q.shape
    q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


# query blocks of a cache-less causal attention (see grouped_attention's causal_blocks)
CAUSAL_BLOCKS = 4


class Attention(nn.Module):
    cfg: DecoderConfig
    act_bits: int | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        """``x`` ``[B, T, D]``; ``mask`` ``[B,1,1,T,S]``; ``cache`` = (k, v) ``[B, S, KV, hd]``
        written at ``cache_index`` (a scalar). Returns ``(y [B, T, D], new cache or None)``."""
        c = self.cfg
        ab = self.act_bits
        q = Linear(c.num_heads * c.head_dim, use_bias=c.attention_bias, act_bits=ab, name="q_proj")(x)
        k = Linear(c.num_kv_heads * c.head_dim, use_bias=c.attention_bias, act_bits=ab,
                   name="k_proj")(x)
        v = Linear(c.num_kv_heads * c.head_dim, use_bias=c.attention_bias, act_bits=ab,
                   name="v_proj")(x)
        qn = RMSNorm(c.rms_norm_eps, name="q_norm") if c.qk_norm else None
        kn = RMSNorm(c.rms_norm_eps, name="k_norm") if c.qk_norm else None
        q, k, v = heads_with_rope(c, q, k, v, positions, qn, kn)
        new_cache = None
        if cache is not None:
            k_cache, v_cache = cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            new_cache = (k, v)
        # without a cache the mask is causal over slots 0..T-1 (attention_mask): skip the blocks
        # of the score matrix above the diagonal
        blocks = CAUSAL_BLOCKS if (cache is None and c.causal) else 1
        o = grouped_attention(q, k, v, mask, c.num_kv_heads, causal_blocks=blocks).astype(x.dtype)
        y = Linear(c.hidden_size, act_bits=ab, name="o_proj")(o)
        return y, new_cache


class MLP(nn.Module):
    """Gated MLP: ``down(silu(gate x) ⊙ up x)``."""

    cfg: DecoderConfig
    act_bits: int | None = None

    @nn.compact
    def __call__(self, x):
        c, ab = self.cfg, self.act_bits
        g = Linear(c.intermediate_size, act_bits=ab, name="gate_proj")(x)
        u = Linear(c.intermediate_size, act_bits=ab, name="up_proj")(x)
        return Linear(c.hidden_size, act_bits=ab, name="down_proj")(jax.nn.silu(g) * u)
