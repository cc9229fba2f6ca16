"""Greedy and sampled generation with a KV cache; prefill and decode each one jitted call.

The decode loop is a ``lax.scan`` over new tokens, so a whole generation compiles once per
(prompt length, max_new_tokens). Sampling: temperature, then optional top-k and top-p (nucleus)
filtering; ``temperature == 0`` is greedy. Tokens after an EOS are replaced by EOS.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.models.common.config import DecoderConfig
from jaxquant.models.common.decoder import forward, init_cache


def filter_logits(logits: jax.Array, top_k: int | None, top_p: float | None) -> jax.Array:
    """Mask logits ``[B, V]`` outside the top-k and the top-p nucleus with -inf."""
    neg = jnp.finfo(jnp.float32).min
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p is not None:
        sorted_lg = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_lg, axis=-1), axis=-1)
        # the smallest logit still inside the nucleus (always keep the top token)
        keep = jnp.concatenate([jnp.ones_like(cum[:, :1], jnp.bool_), cum[:, :-1] < top_p], -1)
        cutoff = jnp.min(jnp.where(keep, sorted_lg, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return logits


def _pick(logits, key, temperature, top_k, top_p):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    lg = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(key, lg, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id")
)
def generate(
    cfg: DecoderConfig,
    params,
    prompt: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
) -> jax.Array:
    """Continue ``prompt`` ``[B, T]`` by ``max_new_tokens``; returns ``[B, max_new_tokens]``."""
    b, t = prompt.shape
    cache = init_cache(cfg, b, t + max_new_tokens)
    logits, cache = forward(cfg, params, prompt, cache=cache, cache_index=0)
    key, sub = jax.random.split(key)
    first = _pick(logits[:, -1], sub, temperature, top_k, top_p)

    def step(carry, _):
        tok, cache, idx, key, done = carry
        key, sub = jax.random.split(key)
        lg, cache = forward(cfg, params, tok[:, None], cache=cache, cache_index=idx)
        nxt = _pick(lg[:, -1], sub, temperature, top_k, top_p)
        if eos_id is not None:
            done = done | (tok == eos_id)
            nxt = jnp.where(done, eos_id, nxt)
        return (nxt, cache, idx + 1, key, done), tok

    init = (first, cache, jnp.asarray(t, jnp.int32), key, jnp.zeros((b,), jnp.bool_))
    _, toks = jax.lax.scan(step, init, None, length=max_new_tokens)
    return toks.T
