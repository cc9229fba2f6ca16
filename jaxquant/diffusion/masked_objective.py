"""The LLaDA masked-diffusion objective (arXiv 2502.09992, eq. 3) and its held-out NLL bound.

Forward process: draw ``t ~ U(0, 1)`` per sequence, mask each token independently with probability
``p = (1 - eps) t + eps`` (the ``eps`` floor keeps ``1/p`` finite). The mask predictor sees the
masked sequence and is scored on the masked tokens only::

    L = E_t E_{x_t} [ (1 / p) · Σ_{i masked} -log p_θ(x_i | x_t) ] / T

``L`` upper-bounds the per-token negative log-likelihood (nats); :func:`nll_bound` estimates it on
held-out windows with stratified ``t`` and fixed keys, so two models are scored on the same draws.
Pure functions of ``(logits_fn, params, ids, key)``; jittable.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def mask_tokens(key: jax.Array, ids: jax.Array, p_mask: jax.Array, mask_id: int):
    """Mask each token of ``ids`` ``[B, T]`` with probability ``p_mask`` ``[B]``; returns
    ``(noisy_ids, masked [B, T] bool)``."""
    u = jax.random.uniform(key, ids.shape, jnp.float32)
    masked = u < p_mask[:, None]
    return jnp.where(masked, jnp.asarray(mask_id, ids.dtype), ids), masked


def masked_token_nll(logits_fn: Callable, params, ids: jax.Array, noisy: jax.Array,
                     masked: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """``[B, T]`` ``-log p_θ(x_i | x_t)`` at the masked positions (0 elsewhere)."""
    if positions is None:
        logits = logits_fn(params, noisy, None)
    else:
        logits = logits_fn(params, noisy, None, positions=positions)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]
    return jnp.where(masked, nll, 0.0)


def llada_loss(logits_fn: Callable, params, ids: jax.Array, key: jax.Array, *, mask_id: int,
               eps: float = 1e-3, positions: jax.Array | None = None) -> jax.Array:
    """One Monte-Carlo draw of the LLaDA pre-training loss of ``ids`` ``[B, T]`` (a scalar:
    masked-token cross-entropy weighted by ``1/p``, averaged over all ``B·T`` tokens)."""
    kt, km = jax.random.split(key)
    t = jax.random.uniform(kt, (ids.shape[0],), jnp.float32)
    p_mask = (1.0 - eps) * t + eps
    noisy, masked = mask_tokens(km, ids, p_mask, mask_id)
    nll = masked_token_nll(logits_fn, params, ids, noisy, masked, positions)
    return jnp.sum(nll / p_mask[:, None]) / ids.size


@functools.partial(jax.jit, static_argnames=("logits_fn", "mask_id"))
def _bound_at(logits_fn, params, ids, key, p_mask, *, mask_id):
    noisy, masked = mask_tokens(key, ids, jnp.full((ids.shape[0],), p_mask), mask_id)
    nll = masked_token_nll(logits_fn, params, ids, noisy, masked)
    return jnp.sum(nll), jnp.sum(masked)


def nll_bound(logits_fn: Callable, params, windows, *, mask_id: int, n_t: int = 8,
              batch_size: int = 8, seed: int = 0, eps: float = 1e-3) -> dict:
    """Held-out masked-diffusion NLL bound (nats per token) of ``windows`` ``[N, T]``.

    ``t`` is stratified: ``t_k = (k + 1/2) / n_t``; each window is masked once at each ``t_k``
    with keys from ``seed``, so the estimate is deterministic and paired across models.

    Returns ``{"nll_bound": nats/token, "bits_per_token", "masked_ce": {t_k: mean CE over
    the masked tokens}, "n_windows", "n_t"}``.
    """
    windows = np.asarray(windows, np.int32)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [N, T], got shape {windows.shape}")
    n, t_len = windows.shape
    total = 0.0
    per_t = {}
    base = jax.random.key(seed)
    for k in range(n_t):
        t = (k + 0.5) / n_t
        p = (1.0 - eps) * t + eps
        s_nll, s_cnt = 0.0, 0
        for j in range(0, n, batch_size):
            key = jax.random.fold_in(jax.random.fold_in(base, k), j)
            a, c = _bound_at(logits_fn, params, jnp.asarray(windows[j:j + batch_size]), key,
                             jnp.float32(p), mask_id=int(mask_id))
            s_nll += float(a)
            s_cnt += int(c)
        per_t[round(t, 4)] = s_nll / max(s_cnt, 1)
        total += s_nll / p / (n * t_len)
    bound = total / n_t
    return {"nll_bound": bound, "bits_per_token": bound / np.log(2), "masked_ce": per_t,
            "n_windows": int(n), "n_t": int(n_t)}


__all__ = ["llada_loss", "mask_tokens", "masked_token_nll", "nll_bound"]
