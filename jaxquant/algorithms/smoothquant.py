"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models"): migrate activation outliers into the weights.

For input channel ``j`` of the linears sharing an input ``X`` (``[T, K]``)::

    s_j = max_t |X[t, j]|^α / max_i max_n |W_i[j, n]|^(1-α)      (α = migration strength)

and ``X W = (X diag(s)⁻¹)(diag(s) W)``: dividing the previous operation's output channel ``j`` by
``s_j`` (an RMSNorm gain) and multiplying row ``j`` of each ``W`` by ``s_j`` leaves the fp function
unchanged, while the activations become easier to quantize per token (W8A8, W4A4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smoothquant_scales(
    act_absmax: jax.Array, Ws: tuple[jax.Array, ...] | list[jax.Array], *, alpha: float = 0.5,
    eps: float = 1e-5,
) -> jax.Array:
    """Smoothing scales ``s`` ``[K]`` from the per-channel activation abs-max ``[K]`` (a
    calibration statistic) and the weights ``[K, N_i]`` that read those channels."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w_absmax = jnp.max(jnp.stack([jnp.max(jnp.abs(W.astype(jnp.float32)), axis=1) for W in Ws]),
                       axis=0)
    a = jnp.maximum(act_absmax.astype(jnp.float32), eps)
    w = jnp.maximum(w_absmax, eps)
    return jnp.maximum(a**alpha / w ** (1.0 - alpha), eps)


def apply_smoothing(X: jax.Array, W: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(X diag(s)⁻¹, diag(s) W)`` for ``X`` ``[..., K]``, ``W`` ``[K, N]``, ``s`` ``[K]``."""
    return X / s.reshape((1,) * (X.ndim - 1) + (-1,)), W * s[:, None]
