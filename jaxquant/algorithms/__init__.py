"""Quantization algorithms, one method per file, each on ONE weight matrix (+ its statistics).

Importing this package registers every algorithm in :mod:`jaxquant.algorithms.registry`.
"""

from jaxquant.algorithms import d2quant  # noqa: F401  (registers dsq)
from jaxquant.algorithms.awq import awq_clip, awq_search_scale
from jaxquant.algorithms.gptq import gptq
from jaxquant.algorithms.registry import Algorithm, get, names, register
from jaxquant.algorithms.rtn import rtn
from jaxquant.algorithms.smoothquant import apply_smoothing, smoothquant_scales

__all__ = ["Algorithm", "apply_smoothing", "awq_clip", "awq_search_scale", "get", "gptq", "names",
           "register", "rtn", "smoothquant_scales"]
