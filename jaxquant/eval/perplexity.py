"""Perplexity and KL divergence over token windows, jitted and batched.

Protocol (docs/protocol.md): each window ``[T]`` predicts its positions ``1..T-1`` from its own
prefix; ``PPL = exp(mean NLL)`` over all predicted positions of all windows, in float32.

Both functions take a ``logits_fn(tokens [B, T]) -> logits [B, T, V]``, so an fp model, a
quantized model or any other callable are evaluated the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxquant.models.common.decoder import forward

log = logging.getLogger(__name__)
LogitsFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelFn:
    """A logits function ``apply(params, tokens)`` with its ``params``.

    Calling it gives logits; :func:`perplexity` and :func:`kl_divergence` also fuse their scoring
    into the same jitted program (no ``[B, T, V]`` logits leave the device), with ``params``
    passed as arguments rather than baked in as constants.
    """

    apply: Callable
    params: Any

    def __call__(self, tokens):
        return _jit_apply(self.apply)(self.params, tokens)


@functools.cache
def _jit_apply(apply):
    return jax.jit(apply)


def model_logits_fn(cfg, params, **forward_kw) -> ModelFn:
    """The logits function of a decoder with ``params`` (dense or quantized)."""
    return ModelFn(_forward_logits(cfg, tuple(sorted(forward_kw.items()))), params)


@functools.cache
def _forward_logits(cfg, forward_kw: tuple):
    kw = dict(forward_kw)
    return lambda p, t: forward(cfg, p, t, **kw)[0]


def _fused(fn, score: Callable):
    """A jitted ``tokens -> score(logits, tokens)`` (params as arguments for a ModelFn)."""
    if isinstance(fn, ModelFn):
        jitted = jax.jit(lambda p, t: score(fn.apply(p, t), t))
        return lambda t: jitted(fn.params, t)
    jitted = jax.jit(score)
    return lambda t: jitted(fn(t), t)


def nll_per_window(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Sum of next-token NLL over positions ``1..T-1`` of each window: ``[B]``.

    ``logits`` ``[B, T, V]``, ``tokens`` ``[B, T]``. Computed as ``logsumexp(z) - z[target]``
    (no ``[B, T, V]`` log-probabilities are materialized).
    """
    z = logits[:, :-1].astype(jnp.float32)
    tgt = jnp.take_along_axis(z, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(jax.nn.logsumexp(z, axis=-1) - tgt, axis=-1)


def nll_sum_and_count(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of next-token NLL over positions ``1..T-1`` of all windows, and how many there were.

    ``logits`` ``[B, T, V]``, ``tokens`` ``[B, T]``.
    """
    nll = nll_per_window(logits, tokens)
    return jnp.sum(nll), jnp.asarray(tokens.shape[0] * (tokens.shape[1] - 1), jnp.float32)


def _batches(windows: np.ndarray, batch_size: int):
    for i in range(0, len(windows), batch_size):
        yield windows[i : i + batch_size]


def _check_windows(windows: np.ndarray, vocab_size: int | None) -> np.ndarray:
    w = np.asarray(windows)
    if w.ndim != 2 or w.shape[1] < 2:
        raise ValueError(f"windows must be [n, seqlen >= 2] token ids, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.integer):
        raise ValueError(f"windows must be integer token ids, got dtype {w.dtype}")
    if vocab_size is not None and (w.min() < 0 or w.max() >= vocab_size):
        raise ValueError(
            f"token ids must lie in [0, {vocab_size}); got range [{w.min()}, {w.max()}]"
        )
    return w.astype(np.int32)


def _data_parallel(mesh: Mesh | None, data_axis: str, batch_size: int, fn):
    """``(batch_size, put_tokens, fn)`` for sharding windows over ``mesh``'s ``data_axis``:
    the batch becomes a multiple of the axis size and a ModelFn's params are replicated."""
    if mesh is None:
        return batch_size, jnp.asarray, fn
    if data_axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {data_axis!r} (axes: {tuple(mesh.shape)})")
    n = mesh.shape[data_axis]
    batch_size = -(-batch_size // n) * n
    rows = NamedSharding(mesh, PartitionSpec(data_axis, None))
    if isinstance(fn, ModelFn):
        fn = ModelFn(fn.apply, jax.device_put(fn.params, NamedSharding(mesh, PartitionSpec())))
    return batch_size, lambda b: jax.device_put(jnp.asarray(b), rows), fn


def perplexity(
    logits_fn: LogitsFn,
    windows: np.ndarray,
    *,
    batch_size: int = 4,
    vocab_size: int | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> dict:
    """Perplexity of ``logits_fn`` over ``windows`` ``[n, T]``.

    With ``mesh``, each batch of windows is sharded over its ``data_axis`` (data-parallel
    evaluation: the chips of a TPU host or GPU node, or CPU host devices, see
    ``jax_num_cpu_devices``); ``batch_size`` is rounded up to a multiple of the axis size and a
    short last batch is padded with repeats whose NLL is dropped.

    Returns:
      ``{"ppl", "nll", "tokens" (predicted positions), "seconds"}``.
    """
    w = _check_windows(windows, vocab_size)
    batch_size, put, logits_fn = _data_parallel(mesh, data_axis, batch_size, logits_fn)
    score = _fused(logits_fn, nll_per_window)
    total = 0.0
    t0 = time.perf_counter()
    batches = list(_batches(w, batch_size))
    for batch in tqdm(batches, desc="ppl", unit="batch", disable=not progress):
        n_valid = batch.shape[0]
        if mesh is not None and n_valid < batch_size:  # same shape: no recompile, no bad split
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - n_valid, 0)])
        total += float(np.sum(np.asarray(score(put(batch)), np.float64)[:n_valid]))
    count = w.shape[0] * (w.shape[1] - 1)
    nll = total / count
    return {"ppl": float(np.exp(nll)), "nll": nll, "tokens": int(count),
            "seconds": time.perf_counter() - t0}


def kl_divergence(
    ref_logits_fn: LogitsFn,
    logits_fn: LogitsFn,
    windows: np.ndarray,
    *,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Mean over predicted positions of ``KL(p_ref || p)`` of the next-token distributions.

    The same pass also scores both models on the windows' next tokens, so a comparison needs one
    forward of each model.

    Returns:
      ``{"kl" (nats/token), "ppl" (of ``logits_fn``'s model), "ppl_ref", "tokens", "seconds"}``.
    """
    w = _check_windows(windows, None)

    def kl_sum(ref, lg, t):
        lp_ref = jax.nn.log_softmax(ref[:, :-1].astype(jnp.float32), axis=-1)
        lp = jax.nn.log_softmax(lg[:, :-1].astype(jnp.float32), axis=-1)
        kl = jnp.sum(jnp.exp(lp_ref) * (lp_ref - lp), axis=-1)
        tgt = t[:, 1:, None]
        nll = -jnp.take_along_axis(lp, tgt, axis=-1)
        nll_ref = -jnp.take_along_axis(lp_ref, tgt, axis=-1)
        return jnp.stack([jnp.sum(kl), jnp.sum(nll), jnp.sum(nll_ref),
                          jnp.asarray(kl.size, jnp.float32)])

    if isinstance(ref_logits_fn, ModelFn) and isinstance(logits_fn, ModelFn):
        both = jax.jit(lambda pr, p, t: kl_sum(ref_logits_fn.apply(pr, t), logits_fn.apply(p, t),
                                               t))
        fused = lambda t: both(ref_logits_fn.params, logits_fn.params, t)  # noqa: E731
    else:
        jk = jax.jit(kl_sum)
        fused = lambda t: jk(ref_logits_fn(t), logits_fn(t), t)  # noqa: E731
    acc = np.zeros(4, np.float64)
    t0 = time.perf_counter()
    for batch in tqdm(list(_batches(w, batch_size)), desc="kl", unit="batch", disable=not progress):
        acc += np.asarray(fused(jnp.asarray(batch)), np.float64)
    kl, nll, nll_ref, count = acc
    return {"kl": kl / count, "ppl": math.exp(nll / count), "ppl_ref": math.exp(nll_ref / count),
            "tokens": int(count), "seconds": time.perf_counter() - t0}
