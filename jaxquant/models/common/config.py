"""`DecoderConfig`: the one config of jaxquant's decoder-only transformer (Llama, Qwen2, Qwen3).

Family-specific parsing of Hugging Face ``config.json`` / GGUF metadata lives in each family's
``convert.py``; this dataclass is what the shared layers read. It is frozen and hashable so it can
be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``rope_type`` is ``"default"`` or ``"llama3"`` (with its four knobs)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shapes and switches of a decoder-only transformer.

    Attributes:
      family: ``"llama"``, ``"qwen2"`` or ``"qwen3"`` (informational; behaviour is in the flags).
      attention_bias: biases on q/k/v projections (Qwen2); o_proj never has one here.
      qk_norm: RMSNorm over each head of q and k before RoPE (Qwen3).
      norm_bias: RMSNorms carry a bias (D²Quant's deviation-aware correction adds one).
      causal: causal self-attention (False for masked-diffusion LMs such as LLaDA).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    norm_bias: bool = False
    causal: bool = True
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} must be a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)
