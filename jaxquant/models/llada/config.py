"""`LLaDAConfig`: the shapes and ids of a LLaDA masked-diffusion LM that the JAX model reads.

Only what the implemented variant needs is kept (Llama-style blocks, RMSNorm, RoPE, no biases);
:func:`jaxquant.models.llada.convert.config_from_hf` reads an HF ``config.json`` into it and
refuses every setting outside that variant. Frozen and hashable, so it can be a static argument
of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses

from jaxquant.models.common.config import RopeConfig


@dataclasses.dataclass(frozen=True)
class LLaDAConfig:
    """A LLaDA model (``block_type: llama``).

    Attributes:
      vocab_size: the tokenizer's vocabulary (informational).
      embedding_size: rows of the token embedding = width of the logits (may exceed
        ``vocab_size``, padded for throughput).
      d_model: hidden width ``D``; ``head_dim = d_model // n_heads``.
      n_heads / n_kv_heads: query heads ``H`` and key/value heads ``KV`` (GQA when fewer).
      mlp_hidden_size: the MLP's inner width ``F`` (gate ``ff_proj`` and ``up_proj``).
      mask_token_id: the [MASK] id. The network never reads it (it is one embedding row); the
        masked-diffusion sampler does.
      weight_tying: the LM head is the token embedding (no ``ff_out`` head tensor).
    """

    vocab_size: int
    embedding_size: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    mlp_hidden_size: int
    mask_token_id: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    weight_tying: bool = False
    max_sequence_length: int = 4096
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} (d_model // n_heads) must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope(self) -> RopeConfig:
        return RopeConfig(theta=self.rope_theta)

    def replace(self, **changes) -> LLaDAConfig:
        return dataclasses.replace(self, **changes)
