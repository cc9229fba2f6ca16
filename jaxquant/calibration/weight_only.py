"""Data-free weight-only quantization of a decoder's linears (RTN over the stacked blocks)."""

from __future__ import annotations

import re

from jaxquant.algorithms.rtn import rtn
from jaxquant.calibration.capture import INPUT_GROUPS
from jaxquant.core.spec import QuantSpec

# parameter paths of the block linears, relative to params["layers"]
LINEAR_PATHS = tuple(p for group in INPUT_GROUPS for p in group)


def quantize_linears_rtn(params: dict, spec: QuantSpec, *, include: str = ".*") -> dict:
    """A copy of ``params`` whose block linear kernels (``[L, in, out]``) are RTN QArrays.

    ``include`` is a regex on ``"self_attn/q_proj"``-style paths; the embedding, the final norm
    and the LM head stay in floating point.
    """
    layers = dict(params["layers"])
    for path in LINEAR_PATHS:
        if not re.fullmatch(include, path):
            continue
        group, name = path.split("/")
        layers[group] = dict(layers[group])
        lin = dict(layers[group][name])
        lin["kernel"] = rtn(lin["kernel"], spec)
        layers[group][name] = lin
    return {**params, "layers": layers}
