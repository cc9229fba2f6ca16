"""Bit packing of integer codes into ``uint32`` words, in the GPTQ layout.

Codes are packed along the **input** dimension (axis ``-2`` of a Flax ``[in, out]`` kernel), which
is exactly the layout of GPTQ's ``qweight`` (``[in * bits / 32, out]``, int32). Every run of 32
consecutive input channels becomes ``bits`` words: the 32 codes are laid end to end as one
``32 * bits``-bit little-endian bit stream, code ``k`` at stream bits ``[k*bits, (k+1)*bits)``,
low bits first. Word ``w`` holds stream bits ``[32w, 32w + 32)``.

For 2, 4 and 8 bits a code never straddles two words (16, 8 and 4 codes per word)::

    4-bit, one output column, input channels c0..c7 -> one uint32 word

      bit 31                                                      bit 0
      +-------+-------+-------+-------+-------+-------+-------+-------+
      |  c7   |  c6   |  c5   |  c4   |  c3   |  c2   |  c1   |  c0   |
      +-------+-------+-------+-------+-------+-------+-------+-------+

For 3 bits, 32 codes fill 3 words (96 bits) and codes 10 and 21 straddle word boundaries, as in
GPTQ's 3-bit kernels::

      word 0: c0..c9 in bits 0..29, low 2 bits of c10 in bits 30..31
      word 1: high bit of c10 in bit 0, c11..c20 in bits 1..30, low bit of c21 in bit 31
      word 2: high 2 bits of c21 in bits 0..1, c22..c31 in bits 2..31

The same stream rule covers 5, 6 and 7 bits. The input dimension is zero-padded up to a multiple
of 32 (see :func:`packed_rows`); the logical size is kept by the caller.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CHUNK = 32  # codes per packing chunk; a chunk of b-bit codes is exactly b uint32 words


def padded_in_features(in_features: int) -> int:
    """The input dimension rounded up to a multiple of 32."""
    return -(-in_features // CHUNK) * CHUNK


def packed_rows(in_features: int, bits: int) -> int:
    """Rows of the packed ``uint32`` array for ``in_features`` input channels."""
    return padded_in_features(in_features) // CHUNK * bits


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8 for packing, got {bits}")


@functools.partial(jax.jit, static_argnames="bits")
def pack(q: jnp.ndarray, bits: int) -> jnp.ndarray:
    """Pack integer codes along axis -2 into uint32 words.

    Args:
      q: ``[..., K, N]`` integer codes in ``[0, 2**bits)`` (any integer dtype).
      bits: code width, 2..8.

    Returns:
      ``[..., packed_rows(K, bits), N]`` uint32.
    """
    _check_bits(bits)
    *batch, k, n = q.shape
    kp = padded_in_features(k)
    q = q.astype(jnp.uint32)
    if kp != k:
        pad = [(0, 0)] * len(batch) + [(0, kp - k), (0, 0)]
        q = jnp.pad(q, pad)
    q = q.reshape(*batch, kp // CHUNK, CHUNK, n)
    words = [jnp.zeros((*batch, kp // CHUNK, n), jnp.uint32) for _ in range(bits)]
    for c in range(CHUNK):
        code = q[..., c, :]
        word, shift = divmod(c * bits, 32)
        words[word] = words[word] | (code << jnp.uint32(shift))
        if shift + bits > 32:  # the code straddles into the next word
            words[word + 1] = words[word + 1] | (code >> jnp.uint32(32 - shift))
    out = jnp.stack(words, axis=-2)  # [..., K/32, bits, N]
    return out.reshape(*batch, kp // CHUNK * bits, n)


@functools.partial(jax.jit, static_argnames=("bits", "in_features"))
def unpack(packed: jnp.ndarray, bits: int, in_features: int) -> jnp.ndarray:
    """Inverse of :func:`pack`.

    Args:
      packed: ``[..., packed_rows(K, bits), N]`` uint32.
      bits: code width, 2..8.
      in_features: the logical K (padding rows are dropped).

    Returns:
      ``[..., K, N]`` uint8 codes.
    """
    _check_bits(bits)
    *batch, rows, n = packed.shape
    if rows != packed_rows(in_features, bits):
        raise ValueError(
            f"packed has {rows} rows, expected {packed_rows(in_features, bits)} for "
            f"in_features={in_features} at {bits} bits"
        )
    chunks = rows // bits
    w = packed.astype(jnp.uint32).reshape(*batch, chunks, bits, n)
    mask = jnp.uint32((1 << bits) - 1)
    codes = []
    for c in range(CHUNK):
        word, shift = divmod(c * bits, 32)
        v = w[..., word, :] >> jnp.uint32(shift)
        if shift + bits > 32:
            v = v | (w[..., word + 1, :] << jnp.uint32(32 - shift))
        codes.append(v & mask)
    q = jnp.stack(codes, axis=-2).reshape(*batch, chunks * CHUNK, n)
    return q[..., :in_features, :].astype(jnp.uint8)
