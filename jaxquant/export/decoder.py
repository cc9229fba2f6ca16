"""A quantized decoder (Llama / Qwen2 / Qwen3) as Hugging Face tensors and config: the part the
peer formats share.

:func:`linears` walks every block linear in HF naming (``model.layers.N.self_attn.q_proj``) with
its packed :class:`~jaxquant.core.qarray.QArray` (or dense kernel) and bias, after folding
D²Quant's norm biases exactly into the readers' biases (``(h + μ) Ŵ = h Ŵ + μ Ŵ``): the input
norm's into q/k/v (``attention_bias``), the post-attention norm's into gate/up (``mlp_bias``).
What the HF architecture cannot express (a bias on the final norm, an MLP bias on Qwen, per-token
activation quantization, input transforms, binary-coded DSQ codes) is refused with the reason.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxquant.core.qarray import QArray, dequantize
from jaxquant.models.common.config import DecoderConfig
from jaxquant.models.common.decoder import layer_params

GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
          "mlp": ("gate_proj", "up_proj", "down_proj")}
ARCH = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2"),
        "qwen3": ("Qwen3ForCausalLM", "qwen3")}


class UnsupportedExportError(ValueError):
    """The model holds something the target format cannot express."""


@dataclasses.dataclass
class Linear:
    name: str                    # HF module path, e.g. model.layers.0.mlp.down_proj
    kernel: QArray | np.ndarray  # [in, out]
    bias: np.ndarray | None      # [out] float32


def _np(a) -> np.ndarray:
    return np.asarray(a, np.float32)


def _check_leaf(name: str, leaf: dict, fmt: str) -> None:
    extra = sorted(set(leaf) - {"kernel", "bias"})
    if extra:
        raise UnsupportedExportError(
            f"{name}: has {extra} (activation quantization / an input transform); {fmt} stores "
            "weight-only linears")
    k = leaf["kernel"]
    if isinstance(k, QArray) and k.spec.codebook != "uniform":
        raise UnsupportedExportError(
            f"{name}: {k.spec.codebook}-coded codes (D²Quant's DSQ sign planes) have no {fmt} "
            "layout (its kernels dequantize an affine grid (q - z) * s); export as orbax")


def hf_config(cfg: DecoderConfig, *, dtype: str, attention_bias: bool, mlp_bias: bool) -> dict:
    """The HF ``config.json`` of ``cfg`` (transformers 5 field names)."""
    if cfg.family not in ARCH:
        raise UnsupportedExportError(f"family {cfg.family!r}: no HF architecture to export to")
    if not cfg.causal:
        raise UnsupportedExportError("a bidirectional (masked-diffusion) decoder has no HF "
                                     "causal-LM architecture")
    arch, mtype = ARCH[cfg.family]
    r = cfg.rope
    rope = {"rope_type": r.rope_type, "rope_theta": r.theta}
    if r.rope_type == "llama3":
        rope |= {"factor": r.factor, "low_freq_factor": r.low_freq_factor,
                 "high_freq_factor": r.high_freq_factor,
                 "original_max_position_embeddings": r.original_max_position_embeddings}
    elif r.rope_type != "default":
        raise UnsupportedExportError(f"rope_type {r.rope_type!r} is not exported")
    eos = cfg.eos_token_id
    out = {"architectures": [arch], "model_type": mtype, "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
           "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
           "rms_norm_eps": cfg.rms_norm_eps, "rope_parameters": rope,
           "max_position_embeddings": cfg.max_position_embeddings,
           "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
           "bos_token_id": cfg.bos_token_id,
           "eos_token_id": list(eos) if isinstance(eos, tuple) else eos, "dtype": dtype}
    if cfg.family == "llama":
        out |= {"attention_bias": attention_bias, "mlp_bias": mlp_bias}
    elif cfg.family == "qwen3":
        out |= {"attention_bias": attention_bias}
    return out


def linears(cfg: DecoderConfig, params, *, fmt: str) -> tuple[list[Linear], dict, dict]:
    """``(linears, dense tensors {HF name: float32 array}, config flags)`` of a quantized decoder.

    Flags: ``attention_bias`` / ``mlp_bias`` set when biases must be written there (norm biases
    folded, or the family's own q/k/v biases)."""
    if "bias" in params["norm"]:
        raise UnsupportedExportError(
            "the final norm 'norm' has a bias (D²Quant's final DAC); the HF LM head has no bias "
            f"to fold it into, so {fmt} cannot express this model; export as orbax")
    n = cfg.num_layers
    blocks = [layer_params(params, i) for i in range(n)]
    attn_fold = any("bias" in b["input_layernorm"] for b in blocks)
    mlp_fold = any("bias" in b["post_attention_layernorm"] for b in blocks)
    if mlp_fold and cfg.family != "llama":
        raise UnsupportedExportError(
            f"{cfg.family}: the post-attention norm has a bias (D²Quant's DAC) but the HF "
            f"{cfg.family} MLP has no biases to fold it into; export as orbax")
    attention_bias = cfg.attention_bias or attn_fold
    out: list[Linear] = []
    dense: dict[str, np.ndarray] = {}
    for i, bp in enumerate(blocks):
        pre = f"model.layers.{i}."
        folds = {"self_attn": bp["input_layernorm"].get("bias"),
                 "mlp": bp["post_attention_layernorm"].get("bias")}
        for group, names in GROUPS.items():
            for name in names:
                leaf = bp[group][name]
                full = f"{pre}{group}.{name}"
                _check_leaf(full, leaf, fmt)
                k = leaf["kernel"]
                bias = None if leaf.get("bias") is None else _np(leaf["bias"])
                mu = folds[group]
                reads_norm = name not in ("o_proj", "down_proj")
                if mu is not None and reads_norm:
                    w = _np(dequantize(k)) if isinstance(k, QArray) else _np(k)
                    extra = _np(mu) @ w
                    bias = extra if bias is None else bias + extra
                if bias is None and ((group == "mlp" and mlp_fold) or
                                     (group == "self_attn" and attention_bias
                                      and (name != "o_proj" or cfg.family != "qwen2"))):
                    bias = np.zeros(k.shape[-1], np.float32)
                out.append(Linear(full, k if isinstance(k, QArray) else _np(k), bias))
        dense[f"{pre}input_layernorm.weight"] = _np(bp["input_layernorm"]["scale"])
        dense[f"{pre}post_attention_layernorm.weight"] = _np(bp["post_attention_layernorm"]
                                                            ["scale"])
        if cfg.qk_norm:
            for nn in ("q_norm", "k_norm"):
                dense[f"{pre}self_attn.{nn}.weight"] = _np(bp["self_attn"][nn]["scale"])
    dense["model.embed_tokens.weight"] = _np(params["embed_tokens"]["embedding"])
    dense["model.norm.weight"] = _np(params["norm"]["scale"])
    if "lm_head" in params and not cfg.tie_word_embeddings:
        head = params["lm_head"]["kernel"]
        if isinstance(head, QArray):
            raise UnsupportedExportError(f"a quantized lm_head is not exported to {fmt}")
        dense["lm_head.weight"] = _np(head).T.copy()
    flags = {"attention_bias": bool(attention_bias), "mlp_bias": bool(mlp_fold)}
    return out, dense, flags


def group_index(qa: QArray) -> tuple[int, int]:
    """``(group_size, number of groups)`` of a QArray's input axis."""
    k = qa.in_features
    gs = qa.spec.group_size
    gs = k if gs in (-1, None) else int(gs)
    return gs, k // gs


def codes_scale_zero(qa: QArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unsigned codes ``Q`` ``[K, N]`` uint8, scales ``S`` ``[G, N]`` float32 and zero points
    ``Z`` ``[G, N]`` (``2**(bits-1)`` for symmetric specs) of a 2-D QArray: ``Ŵ = S (Q - Z)``."""
    if qa.packed.ndim != 2:
        raise ValueError(f"expected one 2-D QArray, got packed shape {qa.packed.shape}")
    q = np.asarray(qa.codes())
    s = np.asarray(qa.scale, np.float32)
    _, g = group_index(qa)
    if s.shape[0] != g:
        s = np.broadcast_to(s, (g, q.shape[1])).copy()
    z = (np.full(s.shape, 1 << (qa.spec.bits - 1), np.int32) if qa.zero is None
         else np.asarray(qa.zero, np.int32).reshape(s.shape))
    return q, s, z

