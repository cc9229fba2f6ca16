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
from jaxquant.nn.linear import Linear, _bcast_last


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
        y = y * _bcast_last(g.astype(jnp.float32), y.ndim)
        if self.use_bias or self.has_variable("params", "bias"):
            b = self.param("bias", nn.initializers.zeros, (d,))
            y = y + _bcast_last(b.astype(jnp.float32), y.ndim)
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


def grouped_attention(q, k, v, mask, num_kv_heads: int) -> jax.Array:
    """Softmax attention with grouped KV heads (MHA, GQA, MQA), computed in float32.

    ``q`` ``[B, T, H, hd]``, ``k``/``v`` ``[B, S, KV, hd]``, ``mask`` ``[B, 1, 1, T, S]``.
    Queries sharing a KV head are folded into one ``[G*T, S]`` score matrix per KV head (one
    batched matmul, which XLA:CPU runs ~2.5x faster than the 5-D einsum). Returns ``[B, T, H*hd]``.
    """
    b, t, h, hd = q.shape
    s, g = k.shape[1], h // num_kv_heads
    qg = q.astype(jnp.float32).reshape(b, t, num_kv_heads, g, hd).transpose(0, 2, 3, 1, 4)
    qg = qg.reshape(b, num_kv_heads, g * t, hd)
    kt = k.astype(jnp.float32).transpose(0, 2, 1, 3)  # [B, KV, S, hd]
    vt = v.astype(jnp.float32).transpose(0, 2, 1, 3)
    scores = jnp.einsum("bkqd,bksd->bkqs", qg, kt) * (hd**-0.5)
    scores = scores.reshape(b, num_kv_heads, g, t, s)
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(scores, axis=-1).reshape(b, num_kv_heads, g * t, s)
    o = jnp.einsum("bkqs,bksd->bkqd", p, vt).reshape(b, num_kv_heads, g, t, hd)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)


class Attention(nn.Module):
    cfg: DecoderConfig
    act_bits: int | None = None

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        """``x`` ``[B, T, D]``; ``mask`` ``[B,1,1,T,S]``; ``cache`` = (k, v) ``[B, S, KV, hd]``
        written at ``cache_index`` (a scalar). Returns ``(y [B, T, D], new cache or None)``."""
        c = self.cfg
        b, t, _ = x.shape
        ab = self.act_bits
        q = Linear(c.num_heads * c.head_dim, use_bias=c.attention_bias, act_bits=ab, name="q_proj")(x)
        k = Linear(c.num_kv_heads * c.head_dim, use_bias=c.attention_bias, act_bits=ab,
                   name="k_proj")(x)
        v = Linear(c.num_kv_heads * c.head_dim, use_bias=c.attention_bias, act_bits=ab,
                   name="v_proj")(x)
        q = q.reshape(b, t, c.num_heads, c.head_dim)
        k = k.reshape(b, t, c.num_kv_heads, c.head_dim)
        v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, name="k_norm")(k)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        if cache is not None:
            k_cache, v_cache = cache
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0))
            new_cache = (k, v)
        o = grouped_attention(q, k, v, mask, c.num_kv_heads).astype(x.dtype)
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
