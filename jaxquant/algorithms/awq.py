"""AWQ (Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"), on the linears that share ONE input.

Scale search. For input channel ``k`` let ``x̄_k = mean_t |X[t, k]|`` and ``w̄_k`` the mean over the
group-normalised ``|W|`` of the linears. For a grid ``α ∈ {0, 1/n, ..., (n-1)/n}``::

    s = x̄^α / w̄^(1-α)   (duo scaling; s = x̄^α without it),  s /= sqrt(max s · min s)

and the chosen ``s`` minimises ``Σ_i ‖X W_i − (X / s) Q(diag(s) W_i)‖²``. Scaling input channel
``k`` of every ``W_i`` by ``s_k`` and dividing the previous operation's output channel ``k`` by
``s_k`` (the RMSNorm gain, or ``up_proj``'s output column) leaves the fp function unchanged.

Clip search. Per group and output channel, the clipping ratio ``r`` of ``max |W|`` (``r`` on a grid
down to ``1 - max_shrink``) minimising that group's output error ``‖X_g (Q(clip(W_g, ±r·max)) −
W_g)‖²`` on a token subsample.

Weights are ``[K, N]`` (Flax layout); activations ``X`` are ``[T, K]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxquant.algorithms.registry import Algorithm, register
from jaxquant.algorithms.rtn import rtn
from jaxquant.core.qarray import quantize_dequantize
from jaxquant.core.spec import QuantSpec


def _w_mean(Ws: list[jax.Array], spec: QuantSpec) -> jax.Array:
    """Mean of group-normalised ``|W|`` over the output channels of all the linears side by side
    (``[K, ΣN_i]``, as AutoAWQ concatenates them), per input channel ``[K]``."""
    parts = []
    for W in Ws:
        k, n = W.shape
        gl = spec.group_len(k)
        a = jnp.abs(W.astype(jnp.float32)).reshape(k // gl, gl, n)
        parts.append((a / (jnp.max(a, axis=1, keepdims=True) + 1e-6)).reshape(k, n))
    return jnp.mean(jnp.concatenate(parts, axis=1), axis=1)


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "duo_scaling"))
def awq_search_scale(
    X: jax.Array, Ws: tuple[jax.Array, ...], spec: QuantSpec, *, n_grid: int = 20,
    duo_scaling: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """The AWQ input-channel scale ``s`` ``[K]`` for linears ``Ws`` (each ``[K, N_i]``) sharing
    input ``X`` ``[T, K]``. Returns ``(s, errors over the grid [n_grid])``; ``α = 0`` (``s = 1``
    without duo scaling) is in the grid, so the choice is never worse than plain RTN on ``X``."""
    X = X.astype(jnp.float32)
    x_mean = jnp.mean(jnp.abs(X), axis=0)
    w_mean = _w_mean(list(Ws), spec)
    refs = [X @ W.astype(jnp.float32) for W in Ws]
    n_out = X.shape[0] * sum(W.shape[1] for W in Ws)  # the error: a mean over all outputs

    def err_for(alpha):
        if duo_scaling:
            s = jnp.power(jnp.maximum(x_mean, 1e-4), alpha) / jnp.power(
                jnp.maximum(w_mean, 1e-4), 1.0 - alpha)
        else:
            s = jnp.power(jnp.maximum(x_mean, 1e-4), alpha)
        s = jnp.maximum(s, 1e-4)
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
        e = 0.0
        for W, ref in zip(Ws, refs, strict=True):
            Wq = quantize_dequantize(W.astype(jnp.float32) * s[:, None], spec) / s[:, None]
            e = e + jnp.sum((X @ Wq - ref) ** 2)
        return s, e / n_out

    alphas = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    ss, errs = jax.lax.map(err_for, alphas)
    # without duo scaling α=0 gives s=1 (plain RTN); with it, also compare against s=1 explicitly
    s_one, e_one = jnp.ones_like(x_mean), sum(
        jnp.sum((X @ quantize_dequantize(W.astype(jnp.float32), spec) - r) ** 2)
        for W, r in zip(Ws, refs, strict=True)) / n_out
    best = jnp.argmin(errs)
    use_one = e_one <= errs[best]
    return jnp.where(use_one, s_one, ss[best]), errs


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "max_shrink"))
def awq_clip(
    X: jax.Array, W: jax.Array, spec: QuantSpec, *, n_grid: int = 20, max_shrink: float = 0.5
) -> jax.Array:
    """``W`` ``[K, N]`` with each (group, output channel) clipped to ``±r·max|W|`` at the ratio
    ``r`` minimising the group's output error on ``X`` ``[T, K]``. ``r = 1`` is in the grid."""
    k, n = W.shape
    gl = spec.group_len(k)
    g = k // gl
    W = W.astype(jnp.float32)
    Xg = X.astype(jnp.float32).reshape(-1, g, gl)
    Wg = W.reshape(g, gl, n)
    wmax = jnp.max(jnp.abs(Wg), axis=1, keepdims=True)  # [G, 1, N]

    def err_for(r):
        Wc = jnp.clip(Wg, -r * wmax, r * wmax).reshape(k, n)
        dW = (quantize_dequantize(Wc, spec) - W).reshape(g, gl, n)
        out = jnp.einsum("tgk,gkn->tgn", Xg, dW)
        return jnp.mean(out * out, axis=0)  # [G, N]

    n_steps = max(1, int(max_shrink * n_grid))
    ratios = 1.0 - jnp.arange(n_steps, dtype=jnp.float32) / n_grid
    errs = jax.lax.map(err_for, ratios)  # [R, G, N]
    best_r = ratios[jnp.argmin(errs, axis=0)]  # [G, N]
    lim = best_r[:, None, :] * wmax
    return jnp.clip(Wg, -lim, lim).reshape(k, n)


def _input_scale(X, Ws, spec: QuantSpec, **opts):
    return awq_search_scale(X, tuple(Ws), spec, n_grid=opts["n_grid"])[0]


def _quantize(W, stats, spec: QuantSpec, **opts):
    """RTN of ``W`` (already multiplied by the folded scale), after the clip search on a
    subsample of the (equally scaled) inputs."""
    if opts["clip_search"]:
        X = stats["tokens"]
        n = min(opts["clip_tokens"], X.shape[0])
        X = X[:: max(1, X.shape[0] // n)][:n]
        W = awq_clip(X, W, spec, n_grid=opts["clip_grid"], max_shrink=opts["max_shrink"])
    return rtn(W, spec), {}


def _check(opts: dict, spec) -> None:
    for k in ("n_grid", "search_tokens", "clip_grid", "clip_tokens"):
        if opts[k] < 1:
            raise ValueError(f"options.{k} must be >= 1, got {opts[k]}")
    if not 0.0 <= opts["max_shrink"] < 1.0:
        raise ValueError(f"options.max_shrink must lie in [0, 1), got {opts['max_shrink']}")


register(Algorithm(
    "awq", _quantize, needs=frozenset({"tokens"}),
    options={"n_grid": 20, "search_tokens": 4096, "clip_search": True, "clip_grid": 20,
             "max_shrink": 0.5, "clip_tokens": 512},
    check=_check, input_scale=_input_scale, token_budget=lambda o: o["search_tokens"],
    doc="AWQ (Lin et al. 2024): activation-aware input-channel scales folded into the producer, "
        "clip search, RTN"))
