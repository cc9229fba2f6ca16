"""LLaDA (masked-diffusion LM, ``model_type: llada``): a bidirectional Llama-style mask predictor.

``load_llada(path)`` reads an HF checkpoint directory (``config.json`` + safetensors, the layout
``LLaDAModelLM.save_pretrained`` writes) into a :class:`LLaDAModel`, called as
``model(input_ids, attention_mask=None) -> logits``; ``jaxquant.load`` dispatches here for a LLaDA
config. The forward is a pure, jittable function of ``(config, params, ...)``
(:func:`forward`); each block runs alone through :func:`block_apply`. Decoding lives in
:mod:`jaxquant.diffusion.masked`.
"""

from jaxquant.models.llada.config import LLaDAConfig
from jaxquant.models.llada.convert import (
    MODEL_TYPES,
    config_from_hf,
    config_to_hf,
    expected_shapes,
    is_llada_config,
    is_llada_dir,
    load_llada,
    params_from_safetensors,
    params_to_safetensors,
    read_config,
    save_llada,
)
from jaxquant.models.llada.model import (
    BLOCK_LINEARS,
    BLOCK_NORMS,
    LLaDAModel,
    LogitsFn,
    block_apply,
    block_params,
    embed,
    forward,
    head,
    init_params,
    key_mask,
)

__all__ = [
    "BLOCK_LINEARS",
    "BLOCK_NORMS",
    "MODEL_TYPES",
    "LLaDAConfig",
    "LLaDAModel",
    "LogitsFn",
    "block_apply",
    "block_params",
    "config_from_hf",
    "config_to_hf",
    "embed",
    "expected_shapes",
    "forward",
    "head",
    "init_params",
    "is_llada_config",
    "is_llada_dir",
    "key_mask",
    "load_llada",
    "params_from_safetensors",
    "params_to_safetensors",
    "read_config",
    "save_llada",
]
