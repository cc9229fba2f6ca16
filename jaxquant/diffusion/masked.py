"""Masked-diffusion LM decoding (LLaDA, arXiv 2502.09992): semi-autoregressive blocks with
low-confidence or random remasking, as one jitted function.

The answer window (``gen_length`` positions after the prompt) starts as all [MASK]. It is split
into ``gen_length / block_length`` blocks, decoded left to right, each in ``steps / num_blocks``
steps. At a step the mask predictor scores the whole sequence; every masked position gets a
candidate token ``x0 = argmax(logits + temperature · Gumbel)`` and a confidence (``low_confidence``:
the softmax probability of ``x0`` under the un-noised logits; ``random``: a uniform draw). Positions
after the current block get confidence ``-inf``, unmasked positions too, and the ``k`` most
confident positions of each row are committed. ``k`` spreads the block's masked count evenly over
its steps (the first ``count % steps`` steps take one more), so the linear noise schedule unmasks
the same expected number per step. This follows LLaDA's public ``generate.py``.

Classifier-free guidance (``cfg_scale > 0``) also scores the sequence with the whole prompt
masked (``un``) and uses ``un + (cfg_scale + 1) · (cond - un)``. A left-padded batch passes its
prompt ``attention_mask`` ``[B, P]``; the generated part is attended everywhere.

Shapes are fixed: the whole decode is one ``jax.jit`` of two nested ``lax.scan`` (blocks, steps),
so nothing recompiles per step; the mask predictor is a static ``logits_fn(params, ids,
attention_mask) -> logits [B, L, V]`` (e.g. :class:`jaxquant.models.llada.LogitsFn`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

REMASKING = ("low_confidence", "random")


def num_transfer_tokens(mask_count: jax.Array, steps: int) -> jax.Array:
    """Tokens to commit at each of ``steps`` steps: ``[B]`` masked counts -> ``[B, steps]``,
    ``count // steps`` each, plus one in the first ``count % steps`` steps."""
    base = mask_count // steps
    rem = mask_count % steps
    i = jnp.arange(steps, dtype=mask_count.dtype)
    return base[:, None] + (i[None, :] < rem[:, None]).astype(mask_count.dtype)


def top_k_mask(confidence: jax.Array, k: jax.Array, k_max: int) -> jax.Array:
    """Boolean ``[B, L]``: the ``k[b]`` (``<= k_max``) largest entries of each row of
    ``confidence`` ``[B, L]`` (ties: the lower index first)."""
    b = confidence.shape[0]
    _, idx = jax.lax.top_k(confidence, k_max)  # [B, k_max], descending
    take = jnp.arange(k_max, dtype=k.dtype)[None, :] < k[:, None]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], idx.shape)
    return jnp.zeros(confidence.shape, jnp.bool_).at[rows, idx].set(take)


def _step_logits(logits_fn, params, x, attention_mask, prompt_index, cfg_scale, *, use_cfg: bool,
                 mask_id: int):
    if not use_cfg:
        return logits_fn(params, x, attention_mask).astype(jnp.float32)
    un_x = jnp.where(prompt_index, jnp.asarray(mask_id, x.dtype), x)
    am = None if attention_mask is None else jnp.concatenate([attention_mask, attention_mask])
    both = logits_fn(params, jnp.concatenate([x, un_x]), am).astype(jnp.float32)
    cond, un = both[: x.shape[0]], both[x.shape[0]:]
    return un + (cfg_scale + 1.0) * (cond - un)


@functools.partial(jax.jit, static_argnames=(
    "logits_fn", "gen_length", "block_length", "steps_per_block", "remasking", "mask_id",
    "use_noise", "use_cfg", "return_steps", "progress"))
def _decode(logits_fn, params, prompt_ids, attention_mask, key, temperature, cfg_scale, *,
            gen_length: int, block_length: int, steps_per_block: int, remasking: str,
            mask_id: int, use_noise: bool, use_cfg: bool, return_steps: bool, progress=None):
    b, p = prompt_ids.shape
    length = p + gen_length
    x = jnp.concatenate([prompt_ids, jnp.full((b, gen_length), mask_id, prompt_ids.dtype)], 1)
    if attention_mask is not None:
        attention_mask = jnp.concatenate(
            [attention_mask, jnp.ones((b, gen_length), attention_mask.dtype)], axis=1)
    prompt_index = x != mask_id
    col = jnp.arange(length, dtype=jnp.int32)[None, :]
    k_max = -(-block_length // steps_per_block)  # the most tokens one step commits
    neg_inf = jnp.float32(-jnp.inf)

    def block_body(carry, blk):
        x, key = carry
        start = p + blk * block_length
        in_block = jax.lax.dynamic_slice_in_dim(x, start, block_length, axis=1) == mask_id
        n_transfer = num_transfer_tokens(jnp.sum(in_block, axis=1, dtype=jnp.int32),
                                         steps_per_block)  # [B, steps]

        def step_body(carry, i):
            x, key = carry
            key, k_noise, k_rand = jax.random.split(key, 3)
            mask_index = x == mask_id
            logits = _step_logits(logits_fn, params, x, attention_mask, prompt_index, cfg_scale,
                                  use_cfg=use_cfg, mask_id=mask_id)
            noisy = logits
            if use_noise:  # Gumbel-max: argmax(l + T·g) ~ softmax(l / T)
                g = jax.random.gumbel(k_noise, logits.shape, jnp.float32, mode="high")
                noisy = logits + temperature * g
            x0 = jnp.argmax(noisy, axis=-1).astype(x.dtype)
            if remasking == "low_confidence":
                prob = jax.nn.softmax(logits, axis=-1)
                x0_p = jnp.take_along_axis(prob, x0[..., None], axis=-1)[..., 0]
            else:
                x0_p = jax.random.uniform(k_rand, x.shape, jnp.float32)
            x0_p = jnp.where(col >= start + block_length, neg_inf, x0_p)
            x0 = jnp.where(mask_index, x0, x)
            confidence = jnp.where(mask_index, x0_p, neg_inf)
            k = jax.lax.dynamic_index_in_dim(n_transfer, i, axis=1, keepdims=False)
            x_new = jnp.where(top_k_mask(confidence, k, k_max), x0, x)
            return (x_new, key), (x if return_steps else None)

        (x, key), xs = jax.lax.scan(step_body, (x, key),
                                    jnp.arange(steps_per_block, dtype=jnp.int32))
        if progress is not None:
            x = report_block(progress, blk, x)
        return (x, key), xs

    num_blocks = gen_length // block_length
    (x, _), xs = jax.lax.scan(block_body, (x, key), jnp.arange(num_blocks, dtype=jnp.int32))
    if return_steps:
        xs = xs.reshape(num_blocks * steps_per_block, b, length)
    return x, xs


def report_block(progress, blk, x):
    """Call the host function ``progress(block_index)`` once block ``blk`` is decoded (ordered
    after the block's steps: the call's result is threaded through ``x``)."""
    def cb(b, x_host):
        progress(int(b))
        return x_host

    return jax.pure_callback(cb, jax.ShapeDtypeStruct(x.shape, x.dtype), blk, x)


def check_length(prompt_len: int, gen_length: int, max_length: int | None, *,
                 terminal: bool = False) -> None:
    """Refuse ``P + gen_length`` (+ a terminal [MASK]) above the model's ``max_length`` (None: no
    limit): whole-sequence decoders see every position at once; context folding
    (``generate_compressed(fold_window=...)``) is the way past the limit."""
    total = prompt_len + gen_length + int(terminal)
    if max_length is not None and total > max_length:
        raise ValueError(f"gen_length={gen_length}: prompt {prompt_len} + gen_length"
                         f"{' + terminal 1' if terminal else ''} = {total} tokens exceed the "
                         f"model's max_sequence_length {max_length}; decode it with "
                         "jaxquant.diffusion.elastic.generate_compressed(fold_window=...) "
                         "(context folding)")


def check_decode_args(prompt_ids, attention_mask, *, gen_length, block_length, steps,
                      remasking, temperature, cfg_scale, key):
    """Validate the decoding arguments (errors name them); returns ``(prompt_ids,
    attention_mask, num_blocks, use_noise)`` as the decoders use them."""
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(f"block_length={block_length} must be positive and divide "
                         f"gen_length={gen_length}")
    num_blocks = gen_length // block_length
    if steps <= 0 or steps % num_blocks:
        raise ValueError(f"steps={steps} must be a positive multiple of the number of blocks "
                         f"(gen_length / block_length = {gen_length} / {block_length} = "
                         f"{num_blocks})")
    if remasking not in REMASKING:
        raise ValueError(f"remasking={remasking!r}: expected one of {REMASKING}")
    if temperature < 0 or cfg_scale < 0:
        raise ValueError(f"temperature={temperature} and cfg_scale={cfg_scale} must be >= 0")
    use_noise = temperature > 0
    if (use_noise or remasking == "random") and key is None:
        raise ValueError("temperature > 0 and remasking='random' need a PRNG key (key=...)")
    prompt_ids = jnp.asarray(prompt_ids, dtype=jnp.int32)
    if prompt_ids.ndim != 2:
        raise ValueError(f"prompt_ids must be [B, P], got shape {prompt_ids.shape}")
    if attention_mask is not None:
        attention_mask = jnp.asarray(attention_mask, dtype=jnp.int32)
        if attention_mask.shape != prompt_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != prompt_ids shape "
                             f"{prompt_ids.shape}")
    return prompt_ids, attention_mask, num_blocks, use_noise


def generate(
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
    max_length: int | None = None,
    progress: Callable[[int], None] | None = None,
):
    """LLaDA masked-diffusion decoding.

    Args:
      logits_fn: the mask predictor ``logits_fn(params, ids [B, L], attention_mask [B, L] | None)
        -> logits [B, L, V]``; a static jit argument, so pass the same hashable object each
        time (e.g. ``LLaDAModel.logits_fn``) to reuse the compiled decode.
      params: its parameters (a jit argument, not baked in).
      prompt_ids: ``[B, P]`` int prompt ids (left-padded in a batch).
      gen_length: generated positions after the prompt.
      block_length: semi-autoregressive block; must divide ``gen_length``.
      steps: total denoising steps, split evenly over the ``gen_length / block_length`` blocks
        (must be divisible by their number).
      temperature: 0 takes the argmax (deterministic); > 0 adds Gumbel noise (needs ``key``).
      cfg_scale: classifier-free guidance strength (0: off); the unconditional pass masks the
        whole prompt (pads included), as LLaDA does.
      remasking: ``"low_confidence"`` (commit the most probable predictions) or ``"random"``
        (commit random masked positions; needs ``key``).
      mask_id: the [MASK] token id (LLaDA-8B: 126336; a loaded model's ``config.mask_token_id``).
      attention_mask: ``[B, P]`` prompt mask (1 attend, 0 pad) or None; extended with ones.
      key: PRNG key for the noise / random remasking.
      return_steps: also return the sequence fed to the model at every step.
      max_length: the model's maximum input length (``config.max_sequence_length``);
        ``P + gen_length`` above it is refused (Elastic-dLLM context folding,
        ``generate_compressed(fold_window=...)``, decodes such targets).
      progress: a host function called with the block index as each block finishes (a static
        argument: pass the same object to reuse the compiled decode).

    Returns:
      ``[B, P + gen_length]`` int32 ids: the prompt followed by the generation; with
      ``return_steps``, ``(ids, step_inputs [steps, B, P + gen_length])``.
    """
    prompt_ids, attention_mask, num_blocks, use_noise = check_decode_args(
        prompt_ids, attention_mask, gen_length=gen_length, block_length=block_length,
        steps=steps, remasking=remasking, temperature=temperature, cfg_scale=cfg_scale, key=key)
    check_length(prompt_ids.shape[1], gen_length, max_length)
    if key is None:
        key = jax.random.key(0)  # unused: the decode is deterministic
    x, xs = _decode(logits_fn, params, prompt_ids, attention_mask, key,
                    jnp.float32(temperature), jnp.float32(cfg_scale),
                    gen_length=int(gen_length), block_length=int(block_length),
                    steps_per_block=int(steps) // num_blocks, remasking=remasking,
                    mask_id=int(mask_id), use_noise=bool(use_noise), use_cfg=bool(cfg_scale > 0),
                    return_steps=bool(return_steps), progress=progress)
    return (x, xs) if return_steps else x


__all__ = ["REMASKING", "check_decode_args", "check_length", "generate", "num_transfer_tokens",
           "report_block", "top_k_mask"]
