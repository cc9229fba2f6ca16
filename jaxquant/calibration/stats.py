"""Statistics of a linear's input, accumulated chunk by chunk (pure, jittable).

For inputs ``x`` ``[B, ..., K]`` with per-sample weights ``w`` ``[B]`` (1 when absent), every token
``t`` of sample ``i`` weighs ``w_i``::

    H        = Σ_t w_t x_t x_tᵀ                  [K, K]   (GPTQ's Hessian up to the factor 2)
    sum      = Σ_t w_t x_t,  count = Σ_t w_t      [K], []
    max, min = per channel over all tokens        [K]      (unweighted)
    cross    = Σ_t w_t (x_t^ref − x_t) x_tᵀ       [K, K]   (GPTAQ; with the reference input x^ref)
    sum_ref  = Σ_t w_t x_t^ref                    [K]
    H_groups = Σ_{i in group g} w_i Σ_t x x ᵀ     [G, K, K] (per timestep group; Σ_g α_g H_g is a
                                                           weighted Hessian without a second pass)

:func:`shift` and :func:`rescale` update the statistics of ``x + μ`` and ``x / s`` exactly, so a
correction (a DAC bias, an AWQ fold) needs no second pass over the data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# float32 statistics must not be accumulated through bf16 passes (TPU's default matmul precision)
_PRECISION = jax.lax.Precision.HIGHEST if jax.default_backend() == "tpu" else None


def _gram(a, b):
    return jnp.matmul(a.T, b, precision=_PRECISION)


# from this many channels on, H = xᵀx is computed as its upper 4x4 blocks (10 of 16 products)
_SYM_MIN_K, _SYM_SPLIT = 1024, 4


def _sym_gram(x):
    """``xᵀx`` for ``x`` ``[T, K]``, exploiting its symmetry when ``K`` is large."""
    k = x.shape[-1]
    if k < _SYM_MIN_K or k % _SYM_SPLIT:
        return _gram(x, x)
    c = k // _SYM_SPLIT
    xs = [x[:, i * c:(i + 1) * c] for i in range(_SYM_SPLIT)]
    up = {(i, j): _gram(xs[i], xs[j]) for i in range(_SYM_SPLIT) for j in range(i, _SYM_SPLIT)}
    return jnp.block([[up[i, j] if i <= j else up[j, i].T for j in range(_SYM_SPLIT)]
                      for i in range(_SYM_SPLIT)])


def chunk_stats(x, *, needs: frozenset = frozenset({"H"}), w=None, x_ref=None, group=None,
                n_groups: int = 0) -> dict:
    """Statistics of one chunk ``x`` ``[B, ..., K]`` (see the module docstring)."""
    b, k = x.shape[0], x.shape[-1]
    x2 = x.reshape(b, -1, k).astype(jnp.float32)
    t = x2.shape[1]
    ws = jnp.ones((b,), jnp.float32) if w is None else w.astype(jnp.float32)
    wt = jnp.repeat(ws, t)[:, None]  # [B*T, 1]
    flat = x2.reshape(-1, k)
    xw = flat if w is None else flat * wt
    out = {
        "sum": jnp.sum(xw, axis=0),
        "count": jnp.sum(wt),
        "max": jnp.max(flat, axis=0),
        "min": jnp.min(flat, axis=0),
        "finite": jnp.all(jnp.isfinite(flat)),
    }
    if "H" in needs:
        out["H"] = _sym_gram(flat) if w is None else _gram(xw, flat)
    if "H_groups" in needs:
        onehot = jax.nn.one_hot(group, n_groups, dtype=jnp.float32) * ws[:, None]  # [B, G]
        out["H_groups"] = jnp.einsum("bg,bti,btj->gij", onehot, x2, x2, precision=_PRECISION)
    if x_ref is not None:
        r = x_ref.reshape(-1, k).astype(jnp.float32)
        out["sum_ref"] = jnp.sum(r * wt, axis=0)
        if "cross" in needs:
            out["cross"] = _gram((r - flat) * wt, flat)
    return out


def merge(a: dict | None, b: dict) -> dict:
    """Statistics of two chunks together."""
    if a is None:
        return b
    out = {}
    for k, v in b.items():
        if k == "max":
            out[k] = jnp.maximum(a[k], v)
        elif k == "min":
            out[k] = jnp.minimum(a[k], v)
        elif k == "finite":
            out[k] = a[k] & v
        else:
            out[k] = a[k] + v
    return out


def mean(stats: dict, *, ref: bool = False) -> jax.Array:
    """The (weighted) mean input ``[K]`` (of the reference stream with ``ref``)."""
    return stats["sum_ref" if ref else "sum"] / jnp.maximum(stats["count"], 1e-30)


def shift(stats: dict, mu: jax.Array) -> dict:
    """Statistics of ``x + μ`` (the reference input unchanged) from those of ``x``."""
    s, n = stats["sum"], stats["count"]
    out = dict(stats, sum=s + n * mu, max=stats["max"] + mu, min=stats["min"] + mu)
    if "H" in stats:
        out["H"] = stats["H"] + jnp.outer(s, mu) + jnp.outer(mu, s) + n * jnp.outer(mu, mu)
    if "cross" in stats:  # Σ (r − x − μ)(x + μ)ᵀ
        d = stats["sum_ref"] - s
        out["cross"] = (stats["cross"] + jnp.outer(d, mu) - jnp.outer(mu, s)
                        - n * jnp.outer(mu, mu))
    if "tokens" in stats:
        out["tokens"] = stats["tokens"] + mu[None, :]
    if "H_groups" in stats:
        raise NotImplementedError("shifting per-group Hessians needs per-group sums")
    return out


def rescale(stats: dict, s: jax.Array) -> dict:
    """Statistics of ``x / s`` (and ``x^ref / s``) for a positive per-channel ``s`` ``[K]``."""
    inv = 1.0 / s
    out = dict(stats, sum=stats["sum"] * inv, max=stats["max"] * inv, min=stats["min"] * inv)
    if "sum_ref" in stats:
        out["sum_ref"] = stats["sum_ref"] * inv
    outer = jnp.outer(inv, inv)
    for k in ("H", "cross"):
        if k in stats:
            out[k] = stats[k] * outer
    if "H_groups" in stats:
        out["H_groups"] = stats["H_groups"] * outer[None]
    if "tokens" in stats:
        out["tokens"] = stats["tokens"] * inv[None, :]
    return out
