"""Pure-function layers shared by the diffusion transformers (DiT, PixArt-α).

Shapes: ``B`` batch, ``C`` latent channels, ``H``/``W`` latent height/width, ``p`` patch size,
``h = H/p``, ``w = W/p``, ``T = h*w`` image tokens, ``S`` text tokens, ``D`` hidden width,
``nh`` heads, ``hd`` head dim.

Parameters are nested dicts named by the diffusers module paths; a linear is
``{"kernel": [in, out], "bias": [out]}`` (bias optional, the kernel may be a QArray) and runs
through :func:`jaxquant.nn.linear.linear`. A linear's *path* is its '/'-joined key path, e.g.
``"attn1/to_out.0"`` or ``"ff/net.0/proj"`` (the diffusers module name with '.' -> '/' except inside
``to_out.0`` / ``net.0`` / ``net.2``). The 2-D sin-cos position table is computed in numpy exactly
as diffusers computes it (float32 grid, float64 frequencies and sin / cos, then float32), at
trace time, for whatever ``(h, w)`` the input has.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models.blockspec import get_path
from jaxquant.nn.linear import apply_linear


def lin(p: dict, path: str, x: jax.Array) -> jax.Array:
    """Apply the linear at ``path`` of ``p`` to ``x`` ``[..., in]`` -> ``[..., out]`` (dense or
    QArray kernel, with its activation quantizer and input scale when it carries them)."""
    return apply_linear(x, get_path(p, path))


def layer_norm(x: jax.Array, eps: float, p: dict | None = None) -> jax.Array:
    """LayerNorm over the last axis of ``x`` ``[..., D]`` (biased variance, as torch), with the
    affine ``p = {"scale": [D], "bias": [D]}`` when given. Computed in float32."""
    x32 = x.astype(jnp.float32)
    mu = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mu), axis=-1, keepdims=True)
    y = (x32 - mu) * jax.lax.rsqrt(var + eps)
    if p is not None:
        shape = (1,) * (y.ndim - 1) + (y.shape[-1],)
        y = y * p["scale"].astype(jnp.float32).reshape(shape)
        if "bias" in p:
            y = y + p["bias"].astype(jnp.float32).reshape(shape)
    return y.astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int = 256, *, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 1.0, max_period: float = 10000.0):
    """Sinusoidal embedding ``[N, dim]`` (float32) of (possibly fractional) timesteps ``t`` ``[N]``:
    frequencies ``exp(-ln(max_period) * i / (dim/2 - shift))``, ``[cos, sin]`` when flipped.

    The frequencies are constants: their float32 exponent (as diffusers computes it) goes through
    a float64 ``exp`` rounded once to float32, so they do not depend on a backend's float32 ``exp``
    (large timesteps, e.g. Flux's ``1000 * guidance``, amplify a one-ulp frequency error)."""
    half = dim // 2
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) \
        / np.float32(half - downscale_freq_shift)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    ang = t.astype(jnp.float32)[:, None] * freqs[None, :]
    sin, cos = jnp.sin(ang), jnp.cos(ang)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def timestep_mlp(p: dict, e: jax.Array) -> jax.Array:
    """diffusers' ``TimestepEmbedding``: ``linear_2(silu(linear_1(e)))``; ``e`` ``[N, 256]``."""
    return lin(p, "linear_2", jax.nn.silu(lin(p, "linear_1", e)))


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """``[M, dim]`` float64: ``[sin(pos ω), cos(pos ω)]`` with ``ω_i = 10000^(-2i/dim)``."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=64)
def sincos_pos_embed_2d(dim: int, h: int, w: int, base_size: int,
                        interpolation_scale: float = 1.0) -> np.ndarray:
    """diffusers' 2-D sin-cos position table ``[h*w, dim]`` (float32, read-only) for an ``h x w``
    token grid (row-major, as the patchified tokens): the grid is ``arange / (n / base_size) /
    interpolation_scale`` in float32; the first ``dim/2`` channels encode the column (w) coordinate
    and the last ``dim/2`` the row (h) coordinate."""
    if dim % 4:
        raise ValueError("the 2-D sin-cos position embedding needs a hidden size divisible by 4, "
                         f"got {dim}")
    f32 = np.float32
    gh = np.arange(h, dtype=f32) / f32(h / base_size) / f32(interpolation_scale)
    gw = np.arange(w, dtype=f32) / f32(w / base_size) / f32(interpolation_scale)
    col, row = np.meshgrid(gw, gh, indexing="xy")  # both [h, w]
    emb = np.concatenate([_sincos_1d(dim // 2, col), _sincos_1d(dim // 2, row)], axis=1)
    out = emb.astype(np.float32)
    out.flags.writeable = False
    return out


def patchify(x: jax.Array, p: int) -> jax.Array:
    """``x`` ``[B, C, H, W]`` -> patches ``[B, h*w, C*p*p]`` (row-major tokens; each patch flattened
    as ``(c, i, j)``, the order of a ``[D, C, p, p]`` conv weight reshaped to ``[D, C*p*p]``)."""
    b, c, hh, ww = x.shape
    h, w = hh // p, ww // p
    x = x.reshape(b, c, h, p, w, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, h * w, c * p * p)


def unpatchify(x: jax.Array, h: int, w: int, p: int, c: int) -> jax.Array:
    """Tokens ``[B, h*w, p*p*c]`` (each as ``(i, j, c)``) -> image ``[B, c, h*p, w*p]``."""
    b = x.shape[0]
    x = x.reshape(b, h, w, p, p, c).transpose(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h * p, w * p)


def patch_embed(p: dict, x: jax.Array, patch: int, base_size: int,
                interpolation_scale: float) -> jax.Array:
    """diffusers' ``PatchEmbed``: the stride-``patch`` conv as patchify + matmul with ``p["proj"]``
    (kernel ``[C*p*p, D]``), plus the sin-cos table of this input's grid. ``x`` ``[B, C, H, W]`` ->
    ``[B, T, D]``."""
    _, _, hh, ww = x.shape
    h, w = hh // patch, ww // patch
    tokens = lin(p, "proj", patchify(x, patch))
    d = tokens.shape[-1]
    pos = jnp.asarray(sincos_pos_embed_2d(d, h, w, base_size, float(interpolation_scale)))
    return tokens + pos.astype(tokens.dtype)[None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
              key_bias: jax.Array | None = None) -> jax.Array:
    """Multi-head softmax attention in float32 with scale ``hd^-0.5``.

    ``q`` ``[B, T, nh*hd]``, ``k``/``v`` ``[B, S, nh*hd]``; ``key_bias`` ``[B, S]`` is added to
    every score (diffusers' encoder-mask bias: 0 keep, -10000 drop). Returns ``[B, T, nh*hd]``.
    """
    b, t, inner = q.shape
    s = k.shape[1]
    hd = inner // num_heads
    qh = q.astype(jnp.float32).reshape(b, t, num_heads, hd)
    kh = k.astype(jnp.float32).reshape(b, s, num_heads, hd)
    vh = v.astype(jnp.float32).reshape(b, s, num_heads, hd)
    scores = jnp.einsum("bthd,bshd->bhts", qh, kh) * (hd**-0.5)
    if key_bias is not None:
        scores = scores + key_bias.astype(jnp.float32)[:, None, None, :]
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, vh).reshape(b, t, inner).astype(q.dtype)


def attn_block(p: dict, x: jax.Array, num_heads: int, context: jax.Array | None = None,
               key_bias: jax.Array | None = None) -> jax.Array:
    """diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``): ``x`` ``[B, T, D]``
    attends to ``context`` ``[B, S, Dc]`` (``x`` itself when None). Returns ``[B, T, D]``."""
    kv = x if context is None else context
    ctx = attention(lin(p, "to_q", x), lin(p, "to_k", kv), lin(p, "to_v", kv), num_heads, key_bias)
    return lin(p, "to_out.0", ctx)


def gelu(x: jax.Array, activation_fn: str) -> jax.Array:
    """``"gelu"``: exact (erf) GELU; ``"gelu-approximate"``: the tanh approximation."""
    return jax.nn.gelu(x, approximate=(activation_fn == "gelu-approximate"))


def feed_forward(p: dict, x: jax.Array, activation_fn: str) -> jax.Array:
    """diffusers' ``FeedForward`` with a GELU: ``net.2(gelu(net.0.proj(x)))``; ``x``
    ``[B, T, D]``."""
    return lin(p, "net.2", gelu(lin(p, "net.0/proj", x), activation_fn))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift``; ``x`` ``[B, T, D]``, ``shift``/``scale`` ``[B, 1, D]``."""
    return x * (1 + scale) + shift
