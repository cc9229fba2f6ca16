"""The staged block pipeline (recipe ``sequential: attn_mlp``): attention, then D²Quant's DAC, then
the MLP, each half of the block run once per pass.

For block ``b`` with input ``X`` (quantized prefix) and, for ``dac.reference: fp_prefix``, the fp
model's own activations ``X_ref``::

    [fp_prefix]  X_ref' = fp_block(X_ref), collecting Σ input_norm(X_ref) and Σ post_norm(...)
    [DAC input]  input_layernorm.bias += mean input_norm_fp(X_ref) − mean input_norm(X)
    pass A       fp block on X: H of the q/k/v and o_proj inputs (and Σ of the fp post-norm
                 output, the DAC reference for same_input)
                 -> quantize q, k, v, o
    pass B       R = X + attn_q(input_norm(X)) for every token (kept), Σ post_norm(R)
    [DAC post]   post_attention_layernorm.bias += mean(fp post-norm) − mean(post_norm(R))
    pass C       MLP statistics from R through the corrected norm: H of gate/up and down_proj inputs
                 -> quantize gate, up, down (DSQ folds s^c into up_proj)
    propagate    X' = R + mlp_q(post_norm(R))

so the quantized attention runs once (pass B) and its output feeds DAC, the MLP statistics and
the propagation. With a ``mesh``, pass A is sharded over its ``data`` axis like the block
pipeline's statistics; passes B and C and the propagation run as single-device programs.
"""

from __future__ import annotations

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.calibration.capture import (
    ATTN_STATS,
    MLP_STATS,
    _stats_of,
    block_stats_all,
    merge_stats,
)
from jaxquant.models.common.decoder import attn_half, mlp_half, post_attn_norm
from jaxquant.models.common.layers import MLP, RMSNorm
from jaxquant.nn.linear import Linear


def _batched(a, bs):
    return a.reshape(a.shape[0] // bs, bs, *a.shape[1:])


def _input_norm(cfg, bp, x):
    return RMSNorm(cfg.rms_norm_eps, cfg.norm_bias).apply({"params": bp["input_layernorm"]}, x)


def _tok_sum(a):
    a = a.astype(jnp.float32)
    return jnp.sum(a.reshape(-1, a.shape[-1]), axis=0)


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
def fp_reference_pass(cfg, bp, x_ref, positions, bs):
    """``(fp_block(x_ref), Σ input_norm(x_ref), Σ post_norm(r_ref), Σ ‖post_norm(r_ref)‖²)``."""

    def one(a):
        x, p = a
        r = attn_half(cfg, bp, x, p)
        h = post_attn_norm(cfg, bp, r).astype(jnp.float32)
        return mlp_half(cfg, bp, r), (_tok_sum(_input_norm(cfg, bp, x)), _tok_sum(h),
                                      jnp.sum(h * h))

    y, sums = jax.lax.map(one, (_batched(x_ref, bs), _batched(positions, bs)))
    return y.reshape(x_ref.shape), *(jnp.sum(s, axis=0) for s in sums)


@functools.partial(jax.jit, static_argnums=0)
def input_norm_sum(cfg, bp, x):
    return _tok_sum(_input_norm(cfg, bp, x))


@functools.partial(jax.jit, static_argnums=(0, 4))
def attn_pass(cfg, qbp, x, positions, bs):
    """Pass B: ``R = x + attn_q(input_norm(x))`` for all tokens and ``Σ post_norm(R)``."""

    def one(a):
        x, p = a
        r = attn_half(cfg, qbp, x, p)
        return r, _tok_sum(post_attn_norm(cfg, qbp, r))

    r, sums = jax.lax.map(one, (_batched(x, bs), _batched(positions, bs)))
    return r.reshape(x.shape), jnp.sum(sums, axis=0)


def _mlp_capture(cfg, bp, r):
    seen = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            seen["mlp/" + "/".join(context.module.path)] = args[0]
        return next_fun(*args, **kwargs)

    h = post_attn_norm(cfg, bp, r)
    with nn.intercept_methods(interceptor):
        MLP(cfg).apply({"params": bp["mlp"]}, h)
    return seen


@functools.partial(jax.jit, static_argnums=(0, 3))
def mlp_stats(cfg, bp, r, bs):
    """Pass C: statistics of the gate/up and down_proj inputs, from the attention output ``R``."""
    rs = _batched(r, bs)

    def stats(x):
        seen = _mlp_capture(cfg, bp, x)
        return {k: _stats_of(seen[k]) for k in MLP_STATS}

    def body(acc, x):
        return merge_stats(acc, stats(x)), None

    acc, _ = jax.lax.scan(body, stats(rs[0]), rs[1:])
    return acc


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=(2,))
def mlp_pass(cfg, qbp, r, bs):
    """``X' = R + mlp_q(post_norm(R))``."""
    y = jax.lax.map(lambda x: mlp_half(cfg, qbp, x), _batched(r, bs))
    return y.reshape(r.shape)


def staged_block(cfg, recipe, b, bp, X, X_ref, positions, bs, mesh, *, quantize, add_bias,
                 check_stats, report):
    """Run one block through the staged pipeline.

    ``quantize(bp, stats)`` -> ``(bp, reports)`` quantizes the linears whose statistics are given;
    ``add_bias(bp, norm, mu)``; ``check_stats(stats)``; ``report(norm, rel, seconds)`` -> a report
    row. Returns ``(quantized block params, reports, X', X_ref')``.
    """
    if X.shape[0] % bs:
        bs = 1
    dac = recipe.dac
    norms = dac["norms"] if dac else ()
    fp_prefix = bool(dac) and dac["reference"] == "fp_prefix"
    reports = []
    n_tok = X.shape[0] * X.shape[1]

    if fp_prefix:  # the fp model's own path, and its norm-output sums, before anything changes
        X_ref_next, in_sum_fp, post_sum_fp, post_sq_fp = fp_reference_pass(
            cfg, bp, X_ref, positions, bs)
    else:
        X_ref_next = None

    def dac_row(norm, mu, rms, t0):
        if not bool(jnp.all(jnp.isfinite(mu))):
            raise FloatingPointError(f"block {b}: the DAC mean shift at {norm} is not finite")
        rel = float(jnp.sqrt(jnp.mean(mu * mu)) / jnp.maximum(rms, 1e-30))
        reports.append(report(norm, rel, time.perf_counter() - t0))

    if "input_layernorm" in norms:  # only with fp_prefix (the recipe loader enforces it)
        t0 = time.perf_counter()
        mu = (in_sum_fp - input_norm_sum(cfg, bp, X)) / n_tok
        # the input norm's rms is its gain's scale; report the shift against the post-norm rms
        dac_row("input_layernorm", mu, jnp.sqrt(post_sq_fp / (n_tok * mu.shape[0])), t0)
        bp = add_bias(bp, "input_layernorm", mu)

    which = ATTN_STATS + (("mlp/gate_proj",) if ("post_attention_layernorm" in norms
                                                and not fp_prefix) else ())
    stats = block_stats_all(cfg, bp, X, positions, batch_size=bs, mesh=mesh, which=which)
    check_stats(stats)
    if not fp_prefix and "mlp/gate_proj" in stats:
        g = stats.pop("mlp/gate_proj")
        post_sum_fp = g["sum"]
        post_sq_fp = jnp.trace(g["H"])
    bp, rep = quantize(bp, stats)
    reports.extend(rep)
    del stats

    R, post_sum_q = attn_pass(cfg, bp, X, positions, bs)
    if "post_attention_layernorm" in norms:
        t0 = time.perf_counter()
        mu = (post_sum_fp - post_sum_q) / n_tok
        dac_row("post_attention_layernorm", mu, jnp.sqrt(post_sq_fp / (n_tok * mu.shape[0])), t0)
        bp = add_bias(bp, "post_attention_layernorm", mu)
    stats = mlp_stats(cfg, bp, R, bs)
    check_stats(stats)
    bp, rep = quantize(bp, stats)
    reports.extend(rep)
    del stats
    X_next = mlp_pass(cfg, bp, R, bs)
    return bp, reports, X_next, X_ref_next
