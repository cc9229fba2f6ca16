"""Round-to-nearest (RTN): the plain uniform affine quantizer, no calibration data."""

from __future__ import annotations

import jax

from jaxquant.algorithms.registry import Algorithm, register
from jaxquant.core.qarray import QArray, quantize
from jaxquant.core.spec import QuantSpec


def rtn(w: jax.Array, spec: QuantSpec) -> QArray:
    """Quantize ``w`` (``[..., K, N]``, Flax layout) by rounding to the nearest code."""
    return quantize(w, spec)


def _quantize(W, stats, spec: QuantSpec):
    return rtn(W, spec), {}


register(Algorithm("rtn", _quantize, doc="round to nearest; no calibration data"))
