"""Quantization algorithms, one method per file, each on ONE weight matrix (+ its statistics)."""

from jaxquant.algorithms.rtn import rtn

__all__ = ["rtn"]
