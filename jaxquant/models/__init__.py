"""Models: HF / GGUF checkpoints as Flax decoders (Llama, Qwen2, Qwen3)."""

from jaxquant.models.common.config import DecoderConfig, RopeConfig
from jaxquant.models.common.decoder import (
    DecoderBlock,
    block_apply,
    forward,
    init_cache,
    layer_params,
)
from jaxquant.models.common.hf_config import UnsupportedConfigError
from jaxquant.models.loading import (
    SUPPORTED_MODEL_TYPES,
    LoadedModel,
    config_from_hf,
    from_pretrained,
    load,
    open_source,
)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "DecoderBlock",
    "DecoderConfig",
    "LoadedModel",
    "RopeConfig",
    "UnsupportedConfigError",
    "block_apply",
    "config_from_hf",
    "forward",
    "from_pretrained",
    "init_cache",
    "layer_params",
    "load",
    "open_source",
]
