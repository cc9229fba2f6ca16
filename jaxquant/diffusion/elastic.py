"""Elastic-dLLM (arXiv 2605.18165): position-preserving [MASK] compression and a protected
terminal [MASK] for masked-diffusion decoding (LLaDA's semi-autoregressive blocks).

:func:`generate_compressed` decodes exactly like :func:`jaxquant.diffusion.masked.generate`
(same blocks, step schedule, low-confidence / random remasking, Gumbel noise, classifier-free
guidance, left-padded batches) except for what the mask predictor sees at each step. While block
``b`` is decoded the forward processes only the *kept* positions of the sequence:

- the prompt and every position before the current block (the decoded blocks),
- the whole current block,
- ``keep_far`` of the far [MASK] positions (those after the current block), spread evenly over
  the far region and always including the sequence's last position: the far region of ``n``
  positions is cut into ``k = min(keep_far, n)`` contiguous segments, the first ``n % k`` of them
  one longer (``numpy.array_split``), and the last position of each segment is kept;
- with ``terminal_mask=True``, one protected terminal [MASK] appended after the generation at
  position id ``P + gen_length``: always kept, never decoded.

Each kept token keeps its original position id (RoPE by the explicit ``positions`` the model
takes), so the model still "sees" where the answer window ends; far masks that are not kept take
no part in attention. The logits of the kept positions are scattered back to the full-length
confidence computation; positions that are not kept are far masks, which the schedule never
commits in this block anyway. ``keep_far=None`` (or ``>=`` the far count) keeps everything: the
decode is then the baseline decode, bit for bit.

Fixed shapes: the kept set has a static size per block (``P + (b + 1) · block_length + k_far(b)
(+ 1)``), which grows from block to block. Padding every block to the largest size would process
``P + gen_length`` tokens at the last block and save nothing, so the blocks are instead unrolled
in Python inside one ``jax.jit``: each block's steps are one ``lax.scan`` at that block's own
static length (the model is traced once per block; compile time grows linearly with the number of
blocks, nothing recompiles per step, and a second prompt of the same shape reuses the program).

The mask predictor must take positions: ``logits_fn(params, ids [B, T], attention_mask [B, T] |
None, positions=[B, T]) -> logits [B, T, V]`` (e.g. :class:`jaxquant.models.llada.LogitsFn`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.diffusion.masked import (
    check_decode_args,
    num_transfer_tokens,
    report_block,
    top_k_mask,
)


# -------------------------------------------------------------------- keep sets (static, numpy)
def far_keep_offsets(n_far: int, keep_far: int | None) -> np.ndarray:
    """Offsets in ``[0, n_far)`` of the far masks kept: the last position of each of ``k =
    min(keep_far, n_far)`` contiguous segments (the first ``n_far % k`` one longer), so the last
    far position is always kept; ``keep_far=None`` keeps all, ``0`` none."""
    k = n_far if keep_far is None else min(int(keep_far), n_far)
    if k <= 0:
        return np.zeros((0,), np.int64)
    j = np.arange(1, k + 1)
    return j * (n_far // k) + np.minimum(j, n_far % k) - 1


def keep_indices(prompt_len: int, gen_length: int, block_length: int, keep_far: int | None,
                 *, terminal_mask: bool = False, fold_window: int | None = None
                 ) -> list[np.ndarray]:
    """The positions the forward sees while each block is decoded: per block ``b`` a sorted int
    array of original position ids: ``0 .. P + (b+1)·block_length - 1`` (prompt, decoded blocks,
    the current block), the kept far masks (:func:`far_keep_offsets`), and the terminal
    ``P + gen_length`` with ``terminal_mask``.

    ``fold_window=W`` (context folding) caps every set at ``W`` tokens: the prompt, the current
    block, the kept far masks and the terminal always stay; of the decoded tokens only the most
    recent ``W - (those)`` are kept, the older ones are folded away (their positions are simply
    skipped, the kept tokens keep their ids). A window at least the set's size folds nothing.
    """
    length = prompt_len + gen_length
    out = []
    for b in range(gen_length // block_length):
        start = prompt_len + b * block_length
        end = start + block_length
        far = end + far_keep_offsets(length - end, keep_far)
        tail = [far, np.array([length])] if terminal_mask else [far]
        decoded = np.arange(prompt_len, start)
        if fold_window is not None:
            fixed = prompt_len + block_length + sum(t.size for t in tail)
            budget = int(fold_window) - fixed
            if budget < 0:
                raise ValueError(
                    f"fold_window={fold_window} is smaller than what every forward must see at "
                    f"block {b}: prompt {prompt_len} + block_length {block_length} + kept far "
                    f"masks {far.size}{' + terminal 1' if terminal_mask else ''} = {fixed}")
            decoded = decoded[max(0, decoded.size - budget):]
        parts = [np.arange(prompt_len), decoded, np.arange(start, end), *tail]
        out.append(np.concatenate(parts).astype(np.int64))
    return out


def _check_keep_sets(keep_sets, prompt_len: int, gen_length: int, block_length: int,
                     terminal_mask: bool) -> list[np.ndarray]:
    """Validate explicit per-block keep sets (positions in ``[0, P + gen_length)``; the terminal is
    appended here) and return them sorted, terminal included."""
    num_blocks = gen_length // block_length
    length = prompt_len + gen_length
    if isinstance(keep_sets, str | bytes) or len(keep_sets) != num_blocks:
        raise ValueError(f"keep_sets must hold one index set per block ({num_blocks} = "
                         f"gen_length / block_length), got {len(keep_sets)}")
    out = []
    for b, ks in enumerate(keep_sets):
        name = f"keep_sets[{b}]"
        ks = np.asarray(ks)
        if ks.ndim != 1 or (ks.size and not np.issubdtype(ks.dtype, np.integer)):
            raise ValueError(f"{name} must be a 1-D set of integer positions, got "
                             f"shape {ks.shape} dtype {ks.dtype}")
        ks = ks.astype(np.int64)
        if ks.size and (ks.min() < 0 or ks.max() >= length):
            raise ValueError(f"{name} has positions outside [0, {length}) (prompt + gen_length; "
                             f"the terminal [MASK] is appended by terminal_mask=True)")
        if np.unique(ks).size != ks.size:
            raise ValueError(f"{name} repeats positions")
        start, end = prompt_len + b * block_length, prompt_len + (b + 1) * block_length
        have = set(ks.tolist())
        drop_block = [i for i in range(start, end) if i not in have]
        if drop_block:
            raise ValueError(f"{name} drops the current block (block {b}: positions {start}.."
                             f"{end - 1}), missing {drop_block}")
        drop_ctx = [i for i in range(start) if i not in have]
        if drop_ctx:
            raise ValueError(f"{name} drops prompt/decoded positions {drop_ctx} (every position "
                             f"before the current block must be kept)")
        if not terminal_mask and (length - 1) not in have:
            raise ValueError(f"{name} drops the terminal position {length - 1} (the last one); "
                             f"keep it or use terminal_mask=True")
        ks = np.sort(ks)
        out.append(np.concatenate([ks, [length]]) if terminal_mask else ks)
    return out


# -------------------------------------------------------------------- the decode
def _kept_logits(logits_fn, params, xc, amc, pos, prompt_c, cfg_scale, *, use_cfg: bool,
                 mask_id: int):
    if not use_cfg:
        return logits_fn(params, xc, amc, positions=pos).astype(jnp.float32)
    un = jnp.where(prompt_c, jnp.asarray(mask_id, xc.dtype), xc)
    am2 = None if amc is None else jnp.concatenate([amc, amc])
    both = logits_fn(params, jnp.concatenate([xc, un]), am2,
                     positions=jnp.concatenate([pos, pos])).astype(jnp.float32)
    cond, un = both[: xc.shape[0]], both[xc.shape[0]:]
    return un + (cfg_scale + 1.0) * (cond - un)


@functools.partial(jax.jit, static_argnames=(
    "logits_fn", "keep", "gen_length", "block_length", "steps_per_block", "remasking", "mask_id",
    "use_noise", "use_cfg", "terminal_mask", "return_steps", "progress"))
def _decode_compressed(logits_fn, params, prompt_ids, attention_mask, key, temperature, cfg_scale,
                       *, keep: tuple, gen_length: int, block_length: int, steps_per_block: int,
                       remasking: str, mask_id: int, use_noise: bool, use_cfg: bool,
                       terminal_mask: bool, return_steps: bool, progress=None):
    b, p = prompt_ids.shape
    n_tail = gen_length + int(terminal_mask)
    length = p + n_tail
    x = jnp.concatenate([prompt_ids, jnp.full((b, n_tail), mask_id, prompt_ids.dtype)], 1)
    if attention_mask is not None:
        attention_mask = jnp.concatenate(
            [attention_mask, jnp.ones((b, n_tail), attention_mask.dtype)], axis=1)
    prompt_index = x != mask_id
    col = jnp.arange(length, dtype=jnp.int32)[None, :]
    k_max = -(-block_length // steps_per_block)
    neg_inf = jnp.float32(-jnp.inf)
    terminal = p + gen_length  # == length - 1 with terminal_mask (else outside the sequence)

    xs = []
    for blk, idx_t in enumerate(keep):
        idx = np.asarray(idx_t, np.int32)  # static: this block's kept positions
        start = p + blk * block_length
        end = start + block_length
        pos = jnp.broadcast_to(jnp.asarray(idx), (b, idx.size))
        amc = None if attention_mask is None else jnp.take(attention_mask, idx, axis=1)
        prompt_c = jnp.take(prompt_index, idx, axis=1)
        in_block = x[:, start:end] == mask_id
        n_transfer = num_transfer_tokens(jnp.sum(in_block, axis=1, dtype=jnp.int32),
                                         steps_per_block)

        def step_body(carry, i, idx=idx, pos=pos, amc=amc, prompt_c=prompt_c, end=end,
                      n_transfer=n_transfer):
            x, key = carry
            key, k_noise, k_rand = jax.random.split(key, 3)
            mask_index = x == mask_id
            xc = jnp.take(x, idx, axis=1)
            logits = _kept_logits(logits_fn, params, xc, amc, pos, prompt_c, cfg_scale,
                                  use_cfg=use_cfg, mask_id=mask_id)  # [B, T_kept, V]
            noisy = logits
            if use_noise:
                g = jax.random.gumbel(k_noise, logits.shape, jnp.float32, mode="high")
                noisy = logits + temperature * g
            x0c = jnp.argmax(noisy, axis=-1).astype(x.dtype)
            x0 = x.at[:, idx].set(x0c)  # not kept: unchanged (far masks, never committed here)
            if remasking == "low_confidence":
                prob = jax.nn.softmax(logits, axis=-1)
                pc = jnp.take_along_axis(prob, x0c[..., None], axis=-1)[..., 0]
                x0_p = jnp.full(x.shape, neg_inf).at[:, idx].set(pc)
            else:
                x0_p = jax.random.uniform(k_rand, x.shape, jnp.float32)
            x0_p = jnp.where(col >= end, neg_inf, x0_p)  # the terminal is always past `end`
            x0 = jnp.where(mask_index, x0, x)
            confidence = jnp.where(mask_index, x0_p, neg_inf)
            k = jax.lax.dynamic_index_in_dim(n_transfer, i, axis=1, keepdims=False)
            x_new = jnp.where(top_k_mask(confidence, k, k_max), x0, x)
            if terminal_mask:  # protected: never decoded
                x_new = jnp.where(col == terminal, x, x_new)
            return (x_new, key), (x if return_steps else None)

        (x, key), xb = jax.lax.scan(step_body, (x, key),
                                    jnp.arange(steps_per_block, dtype=jnp.int32))
        if progress is not None:
            x = report_block(progress, jnp.int32(blk), x)
        xs.append(xb)
    steps_in = jnp.concatenate(xs, axis=0) if return_steps else None
    return x, steps_in


def generate_compressed(
    logits_fn: Callable,
    params,
    prompt_ids,
    *,
    gen_length: int = 128,
    block_length: int = 128,
    steps: int = 128,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int,
    attention_mask=None,
    key: jax.Array | None = None,
    return_steps: bool = False,
    keep_far: int | None = None,
    keep_sets: Sequence[Sequence[int]] | None = None,
    terminal_mask: bool = False,
    fold_window: int | None = None,
    max_length: int | None = None,
    return_stats: bool = False,
    progress: Callable[[int], None] | None = None,
):
    """LLaDA masked-diffusion decoding with Elastic-dLLM [MASK] compression.

    Takes every argument of :func:`jaxquant.diffusion.masked.generate` (same meaning; the
    ``logits_fn`` must also accept ``positions=``), plus:

    Args:
      keep_far: how many far [MASK] positions (after the current block) the forward sees, spread
        evenly and always including the sequence's last position; ``None`` or ``>=`` the far
        count keeps all. ``0`` (only the prompt, decoded tokens and current block) needs
        ``terminal_mask=True``, so that a terminal position is still seen.
      keep_sets: instead of ``keep_far``, one explicit set of positions (in ``[0, P +
        gen_length)``) per block; each must contain every position up to the end of its block
        and, without ``terminal_mask``, the last position.
      terminal_mask: append one protected terminal [MASK] at position ``P + gen_length``: always
        kept, never decoded. It is **returned, still masked**, as the last column.
      fold_window: context folding (:func:`keep_indices`): no forward sees more than this many
        tokens; the oldest decoded tokens beyond it are dropped, positions preserved. Lets a
        target longer than the model's maximum input length decode.
      max_length: the model's maximum input length (``config.max_sequence_length``): a forward
        that would see more tokens is refused (pass ``fold_window``).
      return_stats: also return a dict: ``tokens_per_step`` (``[steps]`` int, the sequence
        length of each step's forward = the kept set size; with CFG each forward runs it for
        ``2 B`` rows), ``kept`` (per block, the kept position ids), ``full_length`` (the
        uncompressed sequence length) and ``tokens_total`` / ``tokens_full`` (summed over steps).
      progress: a host function called with the block index as each block finishes.

    Returns:
      ``[B, P + gen_length (+ 1 terminal)]`` int32 ids; then, as requested, ``step_inputs
      [steps, B, P + gen_length (+ 1)]`` (the full sequence before each step) and the stats dict,
      in that order, as a tuple.
    """
    if not isinstance(terminal_mask, bool | np.bool_):
        raise ValueError(f"terminal_mask={terminal_mask!r} must be a bool")
    prompt_ids, attention_mask, num_blocks, use_noise = check_decode_args(
        prompt_ids, attention_mask, gen_length=gen_length, block_length=block_length,
        steps=steps, remasking=remasking, temperature=temperature, cfg_scale=cfg_scale, key=key)
    p = prompt_ids.shape[1]
    if fold_window is not None:
        if isinstance(fold_window, bool) or not isinstance(fold_window, int | np.integer) \
                or fold_window <= 0:
            raise ValueError(f"fold_window={fold_window!r} must be a positive int or None")
        if max_length is not None and fold_window > max_length:
            raise ValueError(f"fold_window={fold_window} exceeds the model's "
                             f"max_sequence_length {max_length}")
    if keep_sets is not None:
        if keep_far is not None or fold_window is not None:
            raise ValueError("give keep_sets, or keep_far / fold_window, not both")
        keep = _check_keep_sets(keep_sets, p, gen_length, block_length, bool(terminal_mask))
    else:
        if keep_far is not None:
            if isinstance(keep_far, bool) or not isinstance(keep_far, int | np.integer):
                raise ValueError(f"keep_far={keep_far!r} must be an int or None")
            if keep_far < 0:
                raise ValueError(f"keep_far={keep_far} must be >= 0 (None keeps every far "
                                 f"[MASK])")
            if keep_far == 0 and not terminal_mask:
                raise ValueError("keep_far=0 drops the terminal (last) position of the "
                                 "sequence; use keep_far >= 1 or terminal_mask=True")
        keep = keep_indices(p, gen_length, block_length, keep_far,
                            terminal_mask=bool(terminal_mask), fold_window=fold_window)
    biggest = max(k.size for k in keep)
    if max_length is not None and biggest > max_length:
        raise ValueError(
            f"gen_length={gen_length}: a forward would see {biggest} tokens (prompt {p}, decoded "
            f"and kept masks), above the model's max_sequence_length {max_length}; pass "
            f"fold_window<={max_length} (context folding) or a smaller keep_far / gen_length")
    if key is None:
        key = jax.random.key(0)  # unused: the decode is deterministic
    steps_per_block = int(steps) // num_blocks
    x, xs = _decode_compressed(
        logits_fn, params, prompt_ids, attention_mask, key, jnp.float32(temperature),
        jnp.float32(cfg_scale), keep=tuple(tuple(int(i) for i in k) for k in keep),
        gen_length=int(gen_length), block_length=int(block_length),
        steps_per_block=steps_per_block, remasking=remasking, mask_id=int(mask_id),
        use_noise=bool(use_noise), use_cfg=bool(cfg_scale > 0),
        terminal_mask=bool(terminal_mask), return_steps=bool(return_steps), progress=progress)
    out = [x]
    if return_steps:
        out.append(xs)
    if return_stats:
        full = p + gen_length + int(bool(terminal_mask))
        per_step = np.repeat([k.size for k in keep], steps_per_block).astype(np.int64)
        out.append({"tokens_per_step": per_step, "kept": keep, "full_length": full,
                    "tokens_total": int(per_step.sum()), "tokens_full": full * int(steps)})
    return out[0] if len(out) == 1 else tuple(out)


__all__ = ["far_keep_offsets", "generate_compressed", "keep_indices"]
