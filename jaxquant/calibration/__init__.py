"""Model-level loops that feed the algorithms (capture, statistics, sequential driver)."""

from jaxquant.calibration.weight_only import LINEAR_PATHS, quantize_linears_rtn

__all__ = ["LINEAR_PATHS", "quantize_linears_rtn"]
