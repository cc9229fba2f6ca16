"""Dynamic per-token activation quantization (the "A" of W4A4 / W8A8 / W3A3).

Each token (a row along the last axis, the hidden dimension) gets its own symmetric scale at run
time: ``s_t = clip_ratio * max_j |x[t, j]| / qmax`` with ``qmax = 2**(bits-1) - 1``, and
``q[t, j] = clamp(round(x[t, j] / s_t), -qmax, qmax)``. int4 codes are held in an int8 container.
A row of zeros gets ``s_t = 1`` (finite, and its codes are zeros).

``fake_quant_per_token`` is the quantize-dequantize used in calibration and in the reference
(non-kernel) forward, with a straight-through gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_ALLOWED_ACT_BITS = (2, 3, 4, 5, 6, 7, 8)  # the integer kernels take 4 and 8


def _check(bits: int, clip_ratio: float) -> None:
    if bits not in _ALLOWED_ACT_BITS:
        raise ValueError(f"activation bits must be one of {_ALLOWED_ACT_BITS}, got {bits!r}")
    if not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"activation clip_ratio must be in (0, 1], got {clip_ratio!r}")


def quantize_per_token(
    x: jax.Array, *, bits: int = 8, clip_ratio: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Quantize ``x`` (``[..., D]``) per token.

    Returns:
      ``(q, s)``: ``q`` int8 ``[..., D]`` with values in ``[-qmax, qmax]``, and ``s`` float32
      ``[..., 1]`` per-token scales.
    """
    _check(bits, clip_ratio)
    qmax = (1 << (bits - 1)) - 1
    x32 = x.astype(jnp.float32)
    amax = clip_ratio * jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    s = jnp.where(amax > 0, amax / qmax, 1.0)
    q = jnp.clip(jnp.round(x32 / s), -qmax, qmax).astype(jnp.int8)
    return q, s


def dequantize_per_token(q: jax.Array, s: jax.Array, *, dtype=jnp.float32) -> jax.Array:
    """``x̂ = s * q`` for per-token codes ``q`` ``[..., D]`` and scales ``s`` ``[..., 1]``."""
    return (q.astype(jnp.float32) * s).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def fake_quant_per_token(x: jax.Array, bits: int = 8, clip_ratio: float = 1.0) -> jax.Array:
    """Per-token quantize-dequantize of ``x`` (``[..., D]``) in ``x.dtype``; straight-through grad."""
    q, s = quantize_per_token(x, bits=bits, clip_ratio=clip_ratio)
    return dequantize_per_token(q, s, dtype=x.dtype)


def _fwd(x, bits, clip_ratio):
    return fake_quant_per_token(x, bits, clip_ratio), None


def _bwd(bits, clip_ratio, _, g):
    del bits, clip_ratio
    return (g,)


fake_quant_per_token.defvjp(_fwd, _bwd)


def fake_quant_per_token_traced(x: jax.Array, bits: int, clip_ratio: jax.Array) -> jax.Array:
    """:func:`fake_quant_per_token` with a traced (array) ``clip_ratio``, for searches that vmap
    over candidate ratios (no gradient; ``clip_ratio`` is not range-checked here)."""
    if bits not in _ALLOWED_ACT_BITS:
        raise ValueError(f"activation bits must be one of {_ALLOWED_ACT_BITS}, got {bits!r}")
    qmax = (1 << (bits - 1)) - 1
    x32 = x.astype(jnp.float32)
    amax = jnp.asarray(clip_ratio, jnp.float32) * jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    s = jnp.where(amax > 0, amax / qmax, 1.0)
    return (jnp.clip(jnp.round(x32 / s), -qmax, qmax) * s).astype(x.dtype)
