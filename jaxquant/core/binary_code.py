"""The binary-coded quantizer of one group block (D²Quant's DSQ as its public code does it).

A group block ``W`` ``[n, g]`` (paper layout: ``n`` output rows, ``g`` input columns of one group)
is approximated as::

    Ŵ[i, j] = c[j] · Σ_p r_p[i] · B_p[i, j],      B_p ∈ {−1, +1},  p = 0 .. b−1

with ``b`` sign planes (``b`` = the bit width: 2 planes give the levels ``±r0 ± r1``), one scale
per (row, plane) ``r`` ``[n, b]`` and one scale per input column ``c`` ``[g]`` (the "absorbable"
channel scale, folded into the producer of the input).

Code ``s`` ∈ ``[0, 2^b)`` stands for the signs ``B_p = 2·bit_p(s) − 1``; :data:`signs_table`
gives them and ``levels = r @ signs_tableᵀ`` the ``2^b`` candidate values of a row.

Fit (:func:`bc_fit`):

1. ``c`` = the column mean of ``|W|``; planes greedily on the residual: ``B_p = sign(R)``,
   ``r_p`` by least squares (``r_p[i] = Σ_j c_j R_ij B_ij / Σ_j c_j²``), ``R −= c r_p B_p``;
2. ``iters`` rounds of: the joint least-squares solve of the ``r`` of each row (``b x b`` normal
   equations, a tiny ridge; signs folded so every ``r_p ≥ 0``), the closed-form per-column
   ``c_j = ⟨W_j, S_j⟩ / ⟨S_j, S_j⟩`` with ``S = Σ_p r_p B_p``, and the reassignment of every
   ``B`` to the nearest of its row's ``2^b`` candidates ``c_j · levels``.

Pure and jittable (``bits`` and ``iters`` static).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_TINY = 1e-12


def signs_table(bits: int) -> np.ndarray:
    """``[2^bits, bits]`` float32: row ``s`` holds ``2·bit_p(s) − 1`` for each plane ``p``."""
    s = np.arange(1 << bits)[:, None]
    return (2.0 * ((s >> np.arange(bits)[None, :]) & 1) - 1.0).astype(np.float32)


def levels(r: jax.Array, bits: int) -> jax.Array:
    """The candidate values ``[..., 2^bits]`` of plane scales ``r`` ``[..., bits]``."""
    return r @ jnp.asarray(signs_table(bits)).T


def nearest_code(w: jax.Array, c: jax.Array, r: jax.Array, bits: int) -> tuple[jax.Array,
                                                                             jax.Array]:
    """Per entry of ``w`` ``[n, ...]``, the code of the nearest candidate ``c · levels(r)``
    (``c`` broadcast against ``w``, ``r`` ``[n, bits]``). Returns ``(codes int32, values)``."""
    L = levels(r, bits)  # [n, 2^b]
    L = L.reshape(L.shape[:1] + (1,) * (w.ndim - 1) + L.shape[1:])
    cand = jnp.expand_dims(c, -1) * L
    code = jnp.argmin(jnp.abs(w[..., None] - cand), axis=-1)
    return code.astype(jnp.int32), jnp.take_along_axis(cand, code[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnames=("bits", "iters"))
def bc_fit(W: jax.Array, *, bits: int, iters: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Fit ``(c [g], r [n, bits], codes [n, g])`` to one group block ``W`` ``[n, g]``."""
    W = W.astype(jnp.float32)
    T = jnp.asarray(signs_table(bits))
    c = jnp.maximum(jnp.mean(jnp.abs(W), axis=0), _TINY)
    # greedy planes on the residual
    R = W
    rs, Bs = [], []
    for _ in range(bits):
        B = jnp.where(R >= 0, 1.0, -1.0)
        r = jnp.sum(R * B * c[None, :], axis=1) / jnp.sum(c * c)
        R = R - c[None, :] * r[:, None] * B
        rs.append(r)
        Bs.append(B)
    r = jnp.stack(rs, axis=-1)  # [n, b]
    B = jnp.stack(Bs, axis=-1)  # [n, g, b]

    def one_round(_, state):
        r, B, c = state
        c2 = c * c
        A = jnp.einsum("j,njp,njq->npq", c2, B, B)
        ridge = 1e-6 * jnp.trace(A, axis1=1, axis2=2)[:, None, None] / bits + _TINY
        A = A + ridge * jnp.eye(bits)[None]
        rhs = jnp.einsum("j,nj,njp->np", c, W, B)
        r = jnp.linalg.solve(A, rhs[..., None])[..., 0]
        flip = jnp.where(r < 0, -1.0, 1.0)  # keep every plane scale >= 0
        r, B = r * flip, B * flip[:, None, :]
        S = jnp.einsum("np,njp->nj", r, B)
        den = jnp.sum(S * S, axis=0)
        c = jnp.where(den > _TINY, jnp.sum(W * S, axis=0) / jnp.maximum(den, _TINY), c)
        code, _ = nearest_code(W, c[None, :], r, bits)
        return r, T[code], c

    r, B, c = jax.lax.fori_loop(0, iters, one_round, (r, B, c))
    code, _ = nearest_code(W, c[None, :], r, bits)
    return c, r, code
