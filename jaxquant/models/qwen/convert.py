"""HF ``Qwen2Config`` / ``Qwen3Config`` -> :class:`DecoderConfig`, refusing what we don't run."""

from __future__ import annotations

from jaxquant.models.common.config import DecoderConfig
from jaxquant.models.common.hf_config import UnsupportedConfigError, common_fields, require

MODEL_TYPES = ("qwen2", "qwen3")


def _refuse_sliding(cfg: dict, family: str) -> None:
    if cfg.get("use_sliding_window"):
        raise UnsupportedConfigError(
            f"{family} config field 'use_sliding_window' = True is not supported "
            "(only full attention)"
        )
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise UnsupportedConfigError(
            f"{family} config field 'layer_types' contains {sorted(set(layer_types))}; "
            "only 'full_attention' is supported"
        )


def config_from_hf(cfg: dict) -> DecoderConfig:
    family = cfg.get("model_type")
    if family not in MODEL_TYPES:
        raise UnsupportedConfigError(f"model_type {family!r} is not a Qwen2/Qwen3 config")
    _refuse_sliding(cfg, family)
    if family == "qwen2":
        # Qwen2 always has q/k/v biases (and no o_proj bias)
        return DecoderConfig(family="qwen2", attention_bias=True, **common_fields(cfg, family=family))
    require(cfg, "attention_bias", (False, None), family=family)
    return DecoderConfig(family="qwen3", qk_norm=True, **common_fields(cfg, family=family))
