"""Reading the parts of an HF ``config.json`` that every decoder family shares, with refusals."""

from __future__ import annotations

from jaxquant.models.common.config import RopeConfig


class UnsupportedConfigError(ValueError):
    """A config setting jaxquant does not implement (named in the message)."""


def require(cfg: dict, key: str, allowed, *, family: str, default=None) -> None:
    value = cfg.get(key, default)
    if value not in allowed:
        raise UnsupportedConfigError(
            f"{family} config field {key!r} = {value!r} is not supported (supported: {allowed})"
        )


def get(cfg: dict, key: str, *, family: str):
    if cfg.get(key) is None:
        raise UnsupportedConfigError(f"{family} config is missing the required field {key!r}")
    return cfg[key]


def rope_from_hf(cfg: dict, *, family: str) -> RopeConfig:
    """RoPE from ``rope_parameters`` (transformers >= 5) or ``rope_theta`` + ``rope_scaling``."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "llama3":
        return RopeConfig(
            theta=theta,
            rope_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedConfigError(
        f"{family} config field 'rope_scaling' has rope_type {rope_type!r}; "
        "supported: 'default', 'llama3'"
    )


def common_fields(cfg: dict, *, family: str) -> dict:
    """The DecoderConfig fields every family reads the same way."""
    require(cfg, "hidden_act", ("silu",), family=family, default="silu")
    hidden = int(get(cfg, "hidden_size", family=family))
    heads = int(get(cfg, "num_attention_heads", family=family))
    kv = cfg.get("num_key_value_heads") or heads
    eos = cfg.get("eos_token_id")
    return {
        "vocab_size": int(get(cfg, "vocab_size", family=family)),
        "hidden_size": hidden,
        "intermediate_size": int(get(cfg, "intermediate_size", family=family)),
        "num_layers": int(get(cfg, "num_hidden_layers", family=family)),
        "num_heads": heads,
        "num_kv_heads": int(kv),
        "head_dim": int(cfg.get("head_dim") or hidden // heads),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "rope": rope_from_hf(cfg, family=family),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 4096)),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": tuple(eos) if isinstance(eos, list) else eos,
    }
