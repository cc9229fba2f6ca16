"""GGUF checkpoints (llama.cpp) through the ``gguf`` package, exposed with Hugging Face names.

Tensors are dequantized on demand (every type ``gguf.quants.dequantize`` supports: F32, F16, BF16,
Q4_0/Q4_1/Q5_x/Q8_0, the K-quants, IQ types...) to float32, in the PyTorch ``[out, in]`` layout,
under their HF names (``model.layers.3.self_attn.q_proj.weight`` ...). llama.cpp's converter
permutes the rows of ``attn_q`` / ``attn_k`` of Llama-architecture models for its RoPE layout;
that permutation is undone here (the same inverse transformers applies).
"""

from __future__ import annotations

import os
import re

import numpy as np

_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_MAP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# GGUF architecture -> HF model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _hf_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        sub = _LAYER_MAP.get(m.group(2))
        return None if sub is None else f"model.layers.{m.group(1)}.{sub}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_MAP:
        return f"{_TOP_MAP[m.group(1)]}.{m.group(2)}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a ``[out, in]`` q/k weight (or ``[out]`` bias)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """A GGUF file as a source of HF-named float32 tensors, its config and its tokenizer."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises assorted errors on truncated/corrupt files
            raise ValueError(
                f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                "the file may be truncated or corrupt"
            ) from None
        self.arch = self.field("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise ValueError(
                f"{self.path}: GGUF architecture {self.arch!r} is not supported "
                f"(supported: {sorted(ARCHITECTURES)})"
            )
        self._tensors = {}
        for t in self._reader.tensors:
            name = _hf_name(t.name)
            if name is not None:
                self._tensors[name] = t

    # -- metadata --------------------------------------------------------------------------
    def field(self, key: str, default=None):
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def config_dict(self) -> dict:
        """An HF-style ``config.json`` dict built from the GGUF metadata."""
        a = self.arch
        n_layers = self.field(f"{a}.block_count")
        hidden = self.field(f"{a}.embedding_length")
        n_heads = self.field(f"{a}.attention.head_count")
        missing = [k for k, v in (("block_count", n_layers), ("embedding_length", hidden),
                                  ("attention.head_count", n_heads)) if v is None]
        if missing:
            raise ValueError(f"{self.path}: GGUF metadata lacks {a}.{missing[0]}")
        vocab = self.field(f"{a}.vocab_size") or len(self.field("tokenizer.ggml.tokens", []))
        cfg = {
            "model_type": ARCHITECTURES[a],
            "vocab_size": int(vocab),
            "hidden_size": int(hidden),
            "intermediate_size": int(self.field(f"{a}.feed_forward_length")),
            "num_hidden_layers": int(n_layers),
            "num_attention_heads": int(n_heads),
            "num_key_value_heads": int(self.field(f"{a}.attention.head_count_kv", n_heads)),
            "rms_norm_eps": float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": float(self.field(f"{a}.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.field(f"{a}.context_length", 4096)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "hidden_act": "silu",
            "bos_token_id": self.field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.field("tokenizer.ggml.eos_token_id"),
        }
        key_len = self.field(f"{a}.attention.key_length")
        if key_len is not None:
            cfg["head_dim"] = int(key_len)
        if self.field(f"{a}.rope.scaling.type") not in (None, "none"):
            cfg["rope_scaling"] = {"rope_type": self.field(f"{a}.rope.scaling.type")}
        if a == "qwen2":
            cfg["attention_bias"] = True
        return cfg

    def tokenizer(self):
        """The tokenizer embedded in the file (built by transformers' GGUF converter)."""
        from transformers import AutoTokenizer

        d, name = os.path.split(os.path.abspath(self.path))
        return AutoTokenizer.from_pretrained(d, gguf_file=name)

    # -- tensors ---------------------------------------------------------------------------
    def keys(self):
        return iter(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(s) for s in reversed(self._tensors[name].shape))

    def get(self, name: str) -> np.ndarray:
        """Dequantized float32 tensor in the HF ``[out, in]`` layout."""
        from gguf.quants import dequantize

        if name not in self._tensors:
            raise KeyError(f"{self.path}: GGUF has no tensor for {name!r}")
        t = self._tensors[name]
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(
                f"{self.path}: cannot dequantize tensor {t.name} of type {t.tensor_type.name}: {e}"
            ) from None
        w = w.reshape(self.shape(name))
        if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            cfg_heads = self.field(f"{self.arch}.attention.head_count")
            if ".k_proj." in name:
                cfg_heads = self.field(f"{self.arch}.attention.head_count_kv", cfg_heads)
            w = _unpermute(w, int(cfg_heads))
        return w
