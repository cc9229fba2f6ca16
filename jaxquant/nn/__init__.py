"""Inference layers that consume QArrays: `Linear` (dense or quantized kernel) and `linear`."""

from jaxquant.nn.linear import Linear, QuantLinear, linear

__all__ = ["Linear", "QuantLinear", "linear"]
