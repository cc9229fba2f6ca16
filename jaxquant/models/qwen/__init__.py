"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm)."""

from jaxquant.models.qwen.convert import config_from_hf

__all__ = ["config_from_hf"]
