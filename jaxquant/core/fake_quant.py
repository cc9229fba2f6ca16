"""Fake quantization with a straight-through gradient, for methods that learn through rounding.

``fake_quant(w, spec)`` returns ``Ŵ = S (clamp(round(W/S) + Z) - Z)`` in the forward pass; its
gradient with respect to ``w`` is the identity (the straight-through estimator of Bengio et al.
2013), so ``jax.grad`` flows through rounding. Scales are recomputed from ``w`` and treated as
constants in the backward pass.
"""

from __future__ import annotations

import functools

import jax

from jaxquant.core.qarray import quantize_dequantize
from jaxquant.core.spec import QuantSpec


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fake_quant(w: jax.Array, spec: QuantSpec) -> jax.Array:
    """Quantize-dequantize ``w`` (``[..., K, N]``) with ``spec``; straight-through gradient."""
    return quantize_dequantize(w, spec)


def _fwd(w, spec):
    return quantize_dequantize(w, spec), None


def _bwd(spec, _, g):
    del spec
    return (g,)


fake_quant.defvjp(_fwd, _bwd)
