"""Dense little-endian bit packing of unsigned codes into int32 words along the last axis: the
packing of compressed-tensors' ``pack-quantized`` format (0.18+) and, transposed, GPTQ's.

Row ``r`` of ``u`` ``[R, C]`` is one bit stream: code ``c`` takes stream bits ``[c·b, c·b + b)``,
word ``w`` holds stream bits ``[32w, 32w + 32)`` with the lowest bit first, so a code may straddle
two words (3, 5, 6, 7 bits). Words per row: ``ceil(C · b / 32)``; unused high bits are zero.
"""

from __future__ import annotations

import numpy as np


def words_per_row(cols: int, bits: int) -> int:
    return -(-cols * bits // 32)


def pack_rows(u, bits: int) -> np.ndarray:
    """``[R, C]`` codes in ``[0, 2**bits)`` -> ``[R, ceil(C·bits/32)]`` int32."""
    u = np.asarray(u)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: expected 1..8")
    if u.ndim != 2:
        raise ValueError(f"codes must be [rows, cols], got shape {u.shape}")
    if u.size and (u.min() < 0 or u.max() >= (1 << bits)):
        raise ValueError(f"codes outside [0, {1 << bits}) for {bits} bits")
    r, c = u.shape
    nw = words_per_row(c, bits)
    out = np.zeros((r, nw + 1), np.uint64)  # one spare word for the straddling tail
    u = u.astype(np.uint64)
    for j in range(c):
        w, s = divmod(j * bits, 32)
        out[:, w] |= (u[:, j] << np.uint64(s)) & np.uint64(0xFFFFFFFF)
        if s + bits > 32:
            out[:, w + 1] |= u[:, j] >> np.uint64(32 - s)
    return out[:, :nw].astype(np.uint32).view(np.int32)


def unpack_rows(packed, bits: int, cols: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: ``[R, W]`` int32 -> ``[R, cols]`` uint8 codes."""
    p = np.asarray(packed)
    if p.ndim != 2 or p.shape[1] != words_per_row(cols, bits):
        raise ValueError(f"packed shape {p.shape}: expected [rows, {words_per_row(cols, bits)}] "
                         f"for {cols} codes of {bits} bits")
    w = np.concatenate([p.view(np.uint32).astype(np.uint64),
                        np.zeros((p.shape[0], 1), np.uint64)], axis=1)
    mask = np.uint64((1 << bits) - 1)
    out = np.empty((p.shape[0], cols), np.uint8)
    for j in range(cols):
        k, s = divmod(j * bits, 32)
        v = w[:, k] >> np.uint64(s)
        if s + bits > 32:
            v |= w[:, k + 1] << np.uint64(32 - s)
        out[:, j] = (v & mask).astype(np.uint8)
    return out
