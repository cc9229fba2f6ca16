"""`Linear`: ``y = x @ W + b`` where ``W`` is a dense kernel or a :class:`~jaxquant.QArray`.

A quantized kernel goes through :func:`jaxquant.kernels.dispatch.quant_matmul`: the packed Pallas
kernels on TPU / GPU when their ``can_use_*`` predicates hold, else XLA dequantize-then-matmul
(logged with the reason). An optional dynamic per-token activation quantizer
(``act_bits``) gives the W4A4 / W8A8 fake-quant path used by the DiT methods.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxquant.core.activations import fake_quant_per_token
from jaxquant.core.qarray import QArray, dequantize
from jaxquant.kernels.dispatch import quant_matmul


def bcast_last(v: jax.Array, ndim: int) -> jax.Array:
    """Reshape a ``[D]`` vector to rank ``ndim`` for explicit (rank-strict) broadcasting."""
    return v.reshape((1,) * (ndim - 1) + (v.shape[-1],))


def linear(
    x: jax.Array,
    kernel: jax.Array | QArray,
    bias: jax.Array | None = None,
    *,
    act_bits: int | None = None,
    precision: Any = None,
) -> jax.Array:
    """``x`` ``[..., K]`` times ``kernel`` ``[K, N]`` (dense or QArray) plus ``bias`` ``[N]``."""
    if act_bits is not None:
        x = fake_quant_per_token(x, act_bits)
    if isinstance(kernel, QArray) and precision is None:
        y = quant_matmul(x, kernel)
    else:
        w = dequantize(kernel, dtype=x.dtype) if isinstance(kernel, QArray) \
            else kernel.astype(x.dtype)
        y = jnp.matmul(x, w, precision=precision)
    if bias is not None:
        y = y + bcast_last(bias.astype(y.dtype), y.ndim)
    return y


class Linear(nn.Module):
    """A dense layer whose ``kernel`` parameter may be a QArray (Flax layout ``[in, out]``)."""

    features: int
    use_bias: bool = False
    act_bits: int | None = None
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.has_variable("params", "kernel"):
            # get_variable: a QArray kernel has other leaf shapes than the dense init would
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        return linear(x, kernel, bias, act_bits=self.act_bits)


QuantLinear = Linear  # the same layer: it runs whichever kernel its parameters hold
