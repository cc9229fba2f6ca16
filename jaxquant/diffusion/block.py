"""Block-diffusion decoding in the LLaDA2 style: causal across blocks, bidirectional within a
block, with a KV cache of the finished blocks; optionally Elastic-dLLM's protected terminal
[MASK] (terminal-aware augmentation for block models).

The prompt is block ``-1``; the answer window is ``gen_length / block_length`` blocks decoded
left to right, each in ``steps / num_blocks`` denoising steps with LLaDA's step schedule
(low-confidence or random remasking, Gumbel noise; :mod:`jaxquant.diffusion.masked`). A query in
block ``i`` sees the keys of blocks ``<= i``.

- ``use_cache=True``: the prompt is run once and its keys/values cached. Each step of block
  ``i`` runs only the block's ``block_length`` tokens (plus the terminal) against the cache;
  when the block is finished it is run once more, seeing only itself and the cache, and its keys
  and values are written to the cache. Per step the model processes ``block_length (+ 1)``
  tokens instead of the whole sequence.
- ``use_cache=False``: the reference: every step runs the whole sequence with the block-causal
  mask. Both produce the same tokens (the cache holds exactly the keys and values the block-causal
  forward computes for finished blocks).
- ``terminal_mask=True``: one [MASK] at position ``P + gen_length`` is visible to the block being
  decoded (and sees the blocks up to it); it is never decoded and never cached, so each step
  processes one extra token and the model knows where the answer ends.

Shapes are fixed (the cache is preallocated for the whole sequence and masked by slot), so the
whole decode is one ``jax.jit`` over a ``lax.scan`` of blocks and a ``lax.scan`` of steps. The
model is a static object with ``__call__(params, ids, attention_mask, positions=, attn_mask=)``,
``cached(params, ids, positions, cache_k, cache_v, cache_valid, self_mask)`` and
``empty_cache(batch, length)`` (e.g. :class:`jaxquant.models.llada.LogitsFn`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.diffusion.masked import (
    check_decode_args,
    check_length,
    num_transfer_tokens,
    report_block,
    top_k_mask,
)


def block_ids(prompt_len: int, gen_length: int, block_length: int, terminal: bool) -> jax.Array:
    """Block index of every slot: ``-1`` for the prompt, ``j`` for gen block ``j`` and, with
    ``terminal``, ``gen_length // block_length`` (past every block) for the terminal slot."""
    g = jnp.arange(gen_length, dtype=jnp.int32) // block_length
    parts = [jnp.full((prompt_len,), -1, jnp.int32), g]
    if terminal:
        parts.append(jnp.full((1,), gen_length // block_length, jnp.int32))
    return jnp.concatenate(parts)


def block_causal_mask(bid: jax.Array, current: jax.Array, terminal: bool) -> jax.Array:
    """``[T, T]`` (query, key) visibility of the uncached forward while block ``current`` is
    decoded: key block ``<=`` query block; with ``terminal`` the last slot is the terminal
    [MASK]: it is seen by the current block's queries and itself, and it sees blocks
    ``<= current``."""
    q, k = bid[:, None], bid[None, :]
    vis = k <= q
    if terminal:
        t = bid.shape[0] - 1
        is_t_q = jnp.arange(bid.shape[0])[:, None] == t
        is_t_k = jnp.arange(bid.shape[0])[None, :] == t
        vis = jnp.where(is_t_k, (q == current) | is_t_q, vis)
        vis = jnp.where(is_t_q & ~is_t_k, k <= current, vis)
    return vis


def _commit(x_blk, logits, key, temperature, k, k_max, *, remasking, use_noise, mask_id):
    """One LLaDA step inside a block: ``x_blk`` ``[B, Lb]``, ``logits`` ``[B, Lb, V]``."""
    k_noise, k_rand = jax.random.split(key)
    noisy = logits
    if use_noise:
        noisy = logits + temperature * jax.random.gumbel(k_noise, logits.shape, jnp.float32,
                                                         mode="high")
    x0 = jnp.argmax(noisy, axis=-1).astype(x_blk.dtype)
    if remasking == "low_confidence":
        prob = jax.nn.softmax(logits, axis=-1)
        x0_p = jnp.take_along_axis(prob, x0[..., None], axis=-1)[..., 0]
    else:
        x0_p = jax.random.uniform(k_rand, x_blk.shape, jnp.float32)
    mask_index = x_blk == mask_id
    conf = jnp.where(mask_index, x0_p, -jnp.inf)
    return jnp.where(top_k_mask(conf, k, k_max) & mask_index, x0, x_blk)


@functools.partial(jax.jit, static_argnames=(
    "model", "gen_length", "block_length", "steps_per_block", "remasking", "mask_id",
    "use_noise", "use_cache", "terminal_mask", "progress"))
def _decode_block(model, params, prompt_ids, attention_mask, key, temperature, *,
                  gen_length: int, block_length: int, steps_per_block: int, remasking: str,
                  mask_id: int, use_noise: bool, use_cache: bool, terminal_mask: bool,
                  progress=None):
    b, p = prompt_ids.shape
    n_tail = gen_length + int(terminal_mask)
    length = p + n_tail
    x = jnp.concatenate([prompt_ids, jnp.full((b, n_tail), mask_id, prompt_ids.dtype)], 1)
    valid = jnp.ones((b, length), jnp.bool_)
    if attention_mask is not None:
        valid = valid.at[:, :p].set(attention_mask.astype(jnp.bool_))
    num_blocks = gen_length // block_length
    k_max = -(-block_length // steps_per_block)
    bid = block_ids(p, gen_length, block_length, terminal_mask)
    pos_all = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))

    if use_cache:
        ck, cv = model.empty_cache(b, p + gen_length)
        slot = jnp.arange(p + gen_length, dtype=jnp.int32)[None, :]
        if p:
            pm = jnp.broadcast_to(valid[:, None, :p], (b, p, p))
            _, kp, vp = model.cached(params, x[:, :p], pos_all[:, :p], ck, cv,
                                     jnp.zeros((b, p + gen_length), jnp.bool_), pm)
            ck = ck.at[:, :, :p].set(kp.astype(ck.dtype))
            cv = cv.at[:, :, :p].set(vp.astype(cv.dtype))
        t_len = block_length + int(terminal_mask)

    def block_body(carry, blk):
        x, key, *cache = carry
        start = p + blk * block_length
        blk_x = jax.lax.dynamic_slice_in_dim(x, start, block_length, axis=1)
        n_transfer = num_transfer_tokens(jnp.sum(blk_x == mask_id, axis=1, dtype=jnp.int32),
                                         steps_per_block)
        if use_cache:
            ck, cv = cache
            cache_valid = (slot < start) & valid[:, : p + gen_length]
            pos = jnp.concatenate([start + jnp.arange(block_length, dtype=jnp.int32),
                                   jnp.full((int(terminal_mask),), p + gen_length, jnp.int32)])
            pos = jnp.broadcast_to(pos, (b, t_len))
        else:
            vis = block_causal_mask(bid, blk, terminal_mask)[None] & valid[:, None, :]

        def step_body(carry, i):
            x, key = carry
            key, k_step = jax.random.split(key)
            if use_cache:
                ids = jax.lax.dynamic_slice_in_dim(x, start, block_length, axis=1)
                if terminal_mask:
                    ids = jnp.concatenate([ids, x[:, -1:]], axis=1)
                logits, _, _ = model.cached(params, ids, pos, ck, cv, cache_valid)
                logits = logits[:, :block_length].astype(jnp.float32)
            else:
                logits = model(params, x, None, positions=pos_all, attn_mask=vis)
                logits = jax.lax.dynamic_slice_in_dim(logits.astype(jnp.float32), start,
                                                      block_length, axis=1)
            k = jax.lax.dynamic_index_in_dim(n_transfer, i, axis=1, keepdims=False)
            cur = jax.lax.dynamic_slice_in_dim(x, start, block_length, axis=1)
            new = _commit(cur, logits, k_step, temperature, k, k_max, remasking=remasking,
                          use_noise=use_noise, mask_id=mask_id)
            return (jax.lax.dynamic_update_slice_in_dim(x, new, start, axis=1), key), None

        (x, key), _ = jax.lax.scan(step_body, (x, key),
                                   jnp.arange(steps_per_block, dtype=jnp.int32))
        if progress is not None:
            x = report_block(progress, blk, x)
        if use_cache:  # the finished block, seeing itself and the cache: write its keys/values
            ids = jax.lax.dynamic_slice_in_dim(x, start, block_length, axis=1)
            _, kb, vb = model.cached(params, ids, pos[:, :block_length], ck, cv, cache_valid)
            ck = jax.lax.dynamic_update_slice_in_dim(ck, kb.astype(ck.dtype), start, axis=2)
            cv = jax.lax.dynamic_update_slice_in_dim(cv, vb.astype(cv.dtype), start, axis=2)
            return (x, key, ck, cv), None
        return (x, key), None

    init = (x, key, ck, cv) if use_cache else (x, key)
    out, _ = jax.lax.scan(block_body, init, jnp.arange(num_blocks, dtype=jnp.int32))
    return out[0]


def generate_block(
    model,
    params,
    prompt_ids,
    *,
    gen_length: int = 128,
    block_length: int = 32,
    steps: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int,
    attention_mask=None,
    key: jax.Array | None = None,
    use_cache: bool = True,
    terminal_mask: bool = False,
    max_length: int | None = None,
    progress=None,
):
    """Block-diffusion decoding (causal across blocks, bidirectional within), see the module doc.

    Args: as :func:`jaxquant.diffusion.masked.generate` (no classifier-free guidance), plus
      model: the static model object (``LogitsFn``-like: ``__call__``, ``cached``,
        ``empty_cache``).
      use_cache: cache the keys/values of the prompt and finished blocks (else recompute the
        whole sequence every step; same tokens).
      terminal_mask: append a protected terminal [MASK] at ``P + gen_length``; returned, still
        masked, as the last column.
      max_length: the model's maximum input length (e.g. ``config.max_sequence_length``):
        ``P + gen_length (+ 1)`` above it is refused.
      progress: a host function called with the block index as each block finishes.

    Returns:
      ``[B, P + gen_length (+ 1)]`` int32 ids.
    """
    prompt_ids, attention_mask, num_blocks, use_noise = check_decode_args(
        prompt_ids, attention_mask, gen_length=gen_length, block_length=block_length,
        steps=steps, remasking=remasking, temperature=temperature, cfg_scale=0.0, key=key)
    check_length(prompt_ids.shape[1], gen_length, max_length, terminal=bool(terminal_mask))
    if key is None:
        key = jax.random.key(0)
    return _decode_block(model, params, prompt_ids, attention_mask, key,
                         jnp.float32(temperature), gen_length=int(gen_length),
                         block_length=int(block_length),
                         steps_per_block=int(steps) // num_blocks, remasking=remasking,
                         mask_id=int(mask_id), use_noise=bool(use_noise),
                         use_cache=bool(use_cache), terminal_mask=bool(terminal_mask),
                         progress=progress)


__all__ = ["block_causal_mask", "block_ids", "generate_block"]
