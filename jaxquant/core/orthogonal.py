"""Orthogonal input transforms ``x ↦ x G`` with the weight ``W ↦ Gᵀ W`` folded offline, so that
``(x G)(Gᵀ W) = x W`` while ``x G`` is easier to quantize per token (CLQ's orthogonal-based
smoothing, QuaRot's online rotation).

CLQ's ``G = P · H_block`` (methods.md §3.2):

* **outlier score** of input channel ``j`` (:func:`outlier_scores`), from calibration statistics
  of the activation ``X`` ``[T, D]`` (``T`` tokens over every sample and timestep):

  ================== ===================================================================
  ``absmax_median``  ``max_t |X[t, j]| / median_i max_t |X[t, i]|`` (default)
  ``absmax_mean``    ``max_t |X[t, j]| / mean_i max_t |X[t, i]|``
  ``rms_median``     ``rms_t X[t, j] / median_i rms_t X[t, i]`` (``rms² = H_jj / T``)
  ================== ===================================================================

  A score of 1 is a typical channel; outlier channels score ≫ 1.
* **channel permutation** ``P`` (:func:`outlier_permutation`): channels sorted by score
  (descending) are dealt to the ``D / b`` Hadamard blocks in turn (``round_robin``: rank ``r`` to
  block ``r mod n_b``; ``snake``: back and forth, which also balances the blocks' score sums), so
  the ``k`` largest outliers land at most ``⌈k / n_b⌉`` to a block and every block's rotation has
  only a share of them to spread. ``perm[j]`` is the source channel of position ``j``:
  ``(x P)[..., j] = x[..., perm[j]]``.
* **block Hadamard** ``H_block``: block-diagonal, ``n_b`` blocks of a normalised Hadamard matrix of
  order ``b`` times a random ±1 diagonal (any order :mod:`jaxquant.core.hadamard` builds, powers of
  two or not: 12, 20, 48, 576, ...). Applied block by block: ``O(D · b)`` per token.

With ``pad=True`` a width ``D`` that ``b`` does not divide is padded with zero channels to the next
multiple ``D'`` (the weight gets zero rows): ``G`` is ``[D', D']`` and ``x`` is zero-padded first.
Every function here is pure jnp (or numpy for the offline constants) and jittable.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.hadamard import hadamard, hadamard_orders_supported

OUTLIER_STATISTICS = ("absmax_median", "absmax_mean", "rms_median")
DEALS = ("round_robin", "snake")


def padded_width(d: int, block: int, *, pad: bool = False, what: str = "the input") -> int:
    """The transformed width: ``d`` when ``block`` divides it, else the next multiple with
    ``pad=True`` (a ValueError naming ``what`` without)."""
    if block < 1 or not hadamard_orders_supported(block):
        raise ValueError(f"Hadamard block size {block} is not an order jaxquant can build "
                         "(1, 2 or a multiple of 4 from Sylvester/Paley/Kronecker factors)")
    if d % block == 0:
        return d
    if not pad:
        raise ValueError(f"Hadamard block size {block} does not divide {what}'s {d} channels; "
                         f"choose a divisor of {d} or pass pad=True (zero-pads to "
                         f"{math.ceil(d / block) * block})")
    return math.ceil(d / block) * block


def outlier_scores(absmax: jax.Array, sq_mean: jax.Array | None = None, *,
                   statistic: str = "absmax_median", eps: float = 1e-12) -> jax.Array:
    """Per-channel outlier scores ``[D]`` from ``absmax`` ``[D]`` (``max_t |X[t, j]|``) and, for
    ``rms_median``, ``sq_mean`` ``[D]`` (``mean_t X[t, j]²``); see the module docstring."""
    if statistic not in OUTLIER_STATISTICS:
        raise ValueError(f"outlier statistic must be one of {OUTLIER_STATISTICS}, got "
                         f"{statistic!r}")
    if statistic == "rms_median":
        if sq_mean is None:
            raise ValueError("outlier statistic 'rms_median' needs sq_mean (mean of x² per "
                             "channel)")
        v = jnp.sqrt(jnp.maximum(sq_mean.astype(jnp.float32), 0.0))
    else:
        v = jnp.abs(absmax.astype(jnp.float32))
    ref = jnp.mean(v) if statistic == "absmax_mean" else jnp.median(v)
    return v / jnp.maximum(ref, eps)


def outlier_permutation(scores, block: int, *, deal: str = "round_robin") -> np.ndarray:
    """The permutation ``perm`` ``[D]`` (int32) that deals channels, by descending score, over the
    ``D / block`` consecutive blocks of ``block`` positions (see the module docstring).
    ``len(scores)`` must be a multiple of ``block`` (pad the scores with ``-inf`` first)."""
    s = np.asarray(scores, np.float64)
    d = s.shape[0]
    if s.ndim != 1 or block < 1 or d % block:
        raise ValueError(f"outlier_permutation: {d} scores do not tile into blocks of {block}")
    if deal not in DEALS:
        raise ValueError(f"deal must be one of {DEALS}, got {deal!r}")
    nb = d // block
    order = np.argsort(-s, kind="stable")  # ranks: the largest score first
    r = np.arange(d)
    rnd, pos = r // nb, r % nb
    blk = pos if deal == "round_robin" else np.where(rnd % 2 == 0, pos, nb - 1 - pos)
    perm = np.empty(d, np.int64)
    perm[blk * block + rnd] = order  # rank r -> slot rnd of block blk
    return perm.astype(np.int32)


def invert_permutation(perm) -> np.ndarray:
    """``inv`` with ``inv[perm[j]] = j``: ``x[..., perm][..., inv] = x``."""
    perm = np.asarray(perm)
    if perm.ndim != 1 or not np.array_equal(np.sort(perm), np.arange(perm.shape[0])):
        raise ValueError(f"not a permutation of 0..{perm.shape[0] - 1}")
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=perm.dtype)
    return inv


def check_permutation(perm, width: int, *, what: str = "in_perm") -> None:
    """A clear error for a permutation over another channel count (or not a permutation)."""
    p = np.asarray(perm)
    if p.ndim != 1 or p.shape[0] != width:
        raise ValueError(f"{what}: a permutation of {p.shape[0] if p.ndim == 1 else p.shape} "
                         f"channels for a transform over {width} channels")
    if not np.array_equal(np.sort(p), np.arange(width)):
        raise ValueError(f"{what}: not a permutation of 0..{width - 1}")


@functools.lru_cache(maxsize=64)
def hadamard_blocks(d: int, block: int, seed: int = 0) -> np.ndarray:
    """The ``n_b = d / block`` diagonal blocks ``[n_b, b, b]`` (float32) of the block-diagonal
    orthogonal ``H_block``: ``H_b D_i / √b`` with a ±1 diagonal ``D_i`` per block drawn from
    ``seed`` (the same blocks as :func:`jaxquant.core.hadamard.block_hadamard`)."""
    if block < 1 or d % block:
        raise ValueError(f"hadamard_blocks: the block {block} must divide the width {d}")
    H = hadamard(block) / np.sqrt(block)
    rng = np.random.default_rng(seed)
    out = np.stack([H * rng.choice([-1.0, 1.0], size=block)[None, :]
                    for _ in range(d // block)])
    out.setflags(write=False)
    return out.astype(np.float32)


def transform_matrix(d_in: int, block: int, perm=None, *, seed: int = 0) -> np.ndarray:
    """The dense ``G = P · H_block`` ``[D', D']`` (float64; ``D' = len(perm)`` or ``d_in``), for
    offline folds and tests. ``P[perm[j], j] = 1``."""
    d = d_in if perm is None else len(perm)
    Hb = hadamard_blocks(d, block, seed).astype(np.float64)
    H = np.zeros((d, d))
    for i in range(d // block):
        H[i * block:(i + 1) * block, i * block:(i + 1) * block] = Hb[i]
    if perm is None:
        return H
    P = np.zeros((d, d))
    P[np.asarray(perm), np.arange(d)] = 1.0
    return P @ H


def apply_transform(x: jax.Array, blocks: jax.Array, perm: jax.Array | None = None) -> jax.Array:
    """``x G`` for ``x`` ``[..., D]``: zero-pad to ``D' = n_b · b``, permute (``perm``), then
    rotate block by block with ``blocks`` ``[n_b, b, b]``; float32 with full-precision products."""
    nb, b, _ = blocks.shape
    d = x.shape[-1]
    x = x.astype(jnp.float32)
    if d < nb * b:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * b - d)])
    if perm is not None:
        x = jnp.take(x, perm, axis=-1)
    xb = x.reshape(*x.shape[:-1], nb, b)
    y = jnp.einsum("...ni,nij->...nj", xb, blocks, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*x.shape[:-1], nb * b)


def fold_weight(W: jax.Array, blocks: jax.Array, perm: jax.Array | None = None) -> jax.Array:
    """``Gᵀ W`` for ``W`` ``[D, N]`` (zero rows appended to ``D'``): ``(x G)(Gᵀ W) = x W``."""
    nb, b, _ = blocks.shape
    W = W.astype(jnp.float32)
    d = W.shape[0]
    if d < nb * b:
        W = jnp.pad(W, [(0, nb * b - d), (0, 0)])
    if perm is not None:
        W = jnp.take(W, perm, axis=0)  # Pᵀ W
    Wb = W.reshape(nb, b, W.shape[-1])
    return jnp.einsum("nji,njk->nik", blocks, Wb,
                      precision=jax.lax.Precision.HIGHEST).reshape(nb * b, -1)


def fold_gram(H: jax.Array, blocks: jax.Array, perm: jax.Array | None = None) -> jax.Array:
    """``Gᵀ H G`` for a Gram matrix ``H = XᵀX`` ``[D, D]`` (that of ``X G``)."""
    return fold_weight(fold_weight(H, blocks, perm).T, blocks, perm).T
