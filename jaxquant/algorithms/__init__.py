"""Quantization algorithms, one method per file, each on ONE weight matrix (+ its statistics)."""

from jaxquant.algorithms.awq import awq_clip, awq_search_scale
from jaxquant.algorithms.gptq import gptq
from jaxquant.algorithms.rtn import rtn
from jaxquant.algorithms.smoothquant import apply_smoothing, smoothquant_scales

__all__ = ["apply_smoothing", "awq_clip", "awq_search_scale", "gptq", "rtn", "smoothquant_scales"]
