"""Qwen2 / Qwen2.5 (q/k/v biases) and Qwen3 (q/k RMSNorm).

The calibration engine sees this family through its block spec (the shared decoder block: qk-norm
and biases are config switches) and its adapters over a checkpoint or params in memory.
"""

from jaxquant.models.common.decoder_spec import DecoderParamsAdapter as ParamsAdapter
from jaxquant.models.common.decoder_spec import DecoderSourceAdapter as SourceAdapter
from jaxquant.models.common.decoder_spec import decoder_block_spec as block_spec
from jaxquant.models.qwen.convert import MODEL_TYPES, config_from_hf

__all__ = ["MODEL_TYPES", "ParamsAdapter", "SourceAdapter", "block_spec", "config_from_hf"]
