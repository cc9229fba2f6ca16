"""Llama 2/3/3.1 (and SmolLM, Mistral without sliding window)."""

from jaxquant.models.llama.convert import config_from_hf

__all__ = ["config_from_hf"]
