"""HF ``LlamaConfig`` / ``MistralConfig`` -> :class:`DecoderConfig`, refusing what we don't run."""

from __future__ import annotations

from jaxquant.models.common.config import DecoderConfig
from jaxquant.models.common.hf_config import UnsupportedConfigError, common_fields, require

MODEL_TYPES = ("llama", "mistral")


def config_from_hf(cfg: dict) -> DecoderConfig:
    family = cfg.get("model_type", "llama")
    require(cfg, "attention_bias", (False, None), family=family)
    require(cfg, "mlp_bias", (False, None), family=family)
    if cfg.get("sliding_window") is not None:
        raise UnsupportedConfigError(
            f"{family} config field 'sliding_window' = {cfg['sliding_window']!r}: sliding-window "
            "attention is not supported (only full attention)"
        )
    return DecoderConfig(family="llama", **common_fields(cfg, family=family))
