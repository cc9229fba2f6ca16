"""GGUF checkpoints (llama.cpp) through the ``gguf`` package, exposed with Hugging Face names.

Tensors are dequantized on demand (every type ``gguf.quants.dequantize`` supports: F32, F16, BF16,
Q4_0/Q4_1/Q5_x/Q8_0, the K-quants, IQ types...) to float32, in the PyTorch ``[out, in]`` layout,
under their HF names (``model.layers.3.self_attn.q_proj.weight`` ...). llama.cpp's converter
permutes the rows of ``attn_q`` / ``attn_k`` of Llama-architecture models for its RoPE layout;
that permutation is undone here (the same inverse transformers applies).
"""

from __future__ import annotations

import mmap
import os
import re
import struct

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


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Header:
    """A minimal, lazy GGUF (v2/v3) header parser: metadata scalars and strings are decoded,
    arrays are skipped and only their length kept (the tokenizer's 50k-entry arrays would cost
    ~150 MB as Python objects and seconds of parsing), tensor infos are recorded."""

    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")
        self.pos = 0
        if bytes(self._mm[:4]) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (bad magic)")
        self.pos = 4
        self.version = self._scalar(4)
        if self.version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {self.version} is not supported (2, 3)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        self.fields: dict = {}
        self.array_lens: dict[str, int] = {}
        for _ in range(n_kv):
            key = self._string()
            vtype = self._scalar(4)
            if vtype == _ARRAY:
                etype, count = self._scalar(4), self._scalar(10)
                self.array_lens[key] = count
                if etype == _STRING:
                    for _ in range(count):
                        self.pos += 8 + self._u64_at(self.pos)
                elif etype in _SCALAR:
                    self.pos += count * struct.calcsize(_SCALAR[etype])
                else:
                    raise ValueError(f"{path}: metadata {key!r} has nested arrays")
            elif vtype == _STRING:
                self.fields[key] = self._string()
            elif vtype in _SCALAR:
                self.fields[key] = self._scalar(vtype)
            else:
                raise ValueError(f"{path}: metadata {key!r} has unknown type {vtype}")
        self.tensors: dict[str, tuple[tuple[int, ...], int, int]] = {}
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar(4)
            dims = tuple(self._scalar(10) for _ in range(n_dims))
            ttype, offset = self._scalar(4), self._scalar(10)
            self.tensors[name] = (dims, ttype, offset)
        align = int(self.fields.get("general.alignment", 32))
        self.data_start = -(-self.pos // align) * align

    def _check(self, n: int) -> None:
        if self.pos + n > self.size:
            raise ValueError(f"{self.path}: GGUF header runs past the end of the file; the file "
                             "is truncated or corrupt")

    def _u64_at(self, pos: int) -> int:
        if pos + 8 > self.size:
            raise ValueError(f"{self.path}: truncated GGUF metadata")
        return int(self._mm[pos : pos + 8].view("<u8")[0])

    def _scalar(self, vtype: int):
        fmt = _SCALAR[vtype]
        n = struct.calcsize(fmt)
        self._check(n)
        (v,) = struct.unpack(fmt, bytes(self._mm[self.pos : self.pos + n]))
        self.pos += n
        return v

    def _string(self) -> str:
        n = self._scalar(10)
        self._check(n)
        v = bytes(self._mm[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return v

    def _span(self, name: str) -> tuple[int, int, tuple[int, ...], int]:
        """``(file offset, byte length, ggml dims, ggml type)`` of a tensor."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        dims, ttype, offset = self.tensors[name]
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
        except (KeyError, ValueError):
            raise ValueError(f"{self.path}: tensor {name} has unknown ggml type {ttype}") from None
        n = int(np.prod(dims, dtype=np.int64))
        return self.data_start + offset, n // block * type_size, dims, ttype

    def tensor_bytes(self, name: str) -> tuple[np.ndarray, tuple[int, ...], int]:
        """``(raw uint8 bytes, ggml dims, ggml type)`` of a tensor, memory-mapped."""
        start, nbytes, dims, ttype = self._span(name)
        if start + nbytes > self.size:
            raise ValueError(f"{self.path}: tensor {name} lies beyond the end of the file; the "
                             "file is truncated or corrupt")
        return self._mm[start : start + nbytes], dims, ttype

    def release(self, name: str) -> None:
        """Drop the resident pages of a tensor already read (``MADV_DONTNEED`` on its byte
        range; the file stays mapped and a later read pages it in again). Streaming a large
        GGUF block by block then keeps one block's bytes resident, not the whole file's."""
        mm = getattr(self._mm, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start, nbytes, _, _ = self._span(name)
        lo = start - start % mmap.PAGESIZE
        hi = min(self.size, start + nbytes)
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


class GGUFSource:
    """A GGUF file as a source of HF-named float32 tensors, its config and its tokenizer."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            self._header = _Header(self.path)
        except (struct.error, UnicodeDecodeError, OverflowError, IndexError) as e:
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
        for gname in self._header.tensors:
            name = _hf_name(gname)
            if name is not None:
                self._tensors[name] = gname

    # -- metadata --------------------------------------------------------------------------
    def field(self, key: str, default=None):
        return self._header.fields.get(key, default)

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
        vocab = self.field(f"{a}.vocab_size") or self._header.array_lens.get("tokenizer.ggml.tokens")
        if not vocab:
            raise ValueError(f"{self.path}: GGUF metadata has neither {a}.vocab_size nor "
                             "tokenizer.ggml.tokens")
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
        return tuple(int(s) for s in reversed(self._header.tensors[self._tensors[name]][0]))

    def get(self, name: str) -> np.ndarray:
        """Dequantized float32 tensor in the HF ``[out, in]`` layout."""
        from gguf.quants import dequantize

        if name not in self._tensors:
            raise KeyError(f"{self.path}: GGUF has no tensor for {name!r}")
        from gguf.constants import GGMLQuantizationType

        gname = self._tensors[name]
        raw, dims, ttype = self._header.tensor_bytes(gname)
        qtype = GGMLQuantizationType(ttype)
        shape = self.shape(name)
        try:
            if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                dt = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
                w = raw.view(dt).reshape(shape).astype(np.float32)
            else:
                rows = int(np.prod(shape[:-1], dtype=np.int64))
                w = np.asarray(dequantize(np.asarray(raw).reshape(rows, -1), qtype), np.float32)
        except (NotImplementedError, ValueError) as e:
            raise ValueError(
                f"{self.path}: cannot dequantize tensor {gname} of type {qtype.name}: {e}"
            ) from None
        w = w.reshape(shape)
        if self.arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            cfg_heads = self.field(f"{self.arch}.attention.head_count")
            if ".k_proj." in name:
                cfg_heads = self.field(f"{self.arch}.attention.head_count_kv", cfg_heads)
            w = _unpermute(w, int(cfg_heads))
        self._header.release(gname)  # w is a copy: the mapped bytes need not stay resident
        return w
