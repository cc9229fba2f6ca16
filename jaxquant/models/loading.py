"""`load(path)`: an HF safetensors directory or a GGUF file -> config + Flax params (+ tokenizer).

Architectures dispatch on HF ``model_type`` to the family's ``convert.config_from_hf``; anything
else is refused with the list of supported types. Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models import llada, llama, qwen
from jaxquant.models.common.config import DecoderConfig
from jaxquant.models.common.gguf_io import GGUFSource
from jaxquant.models.common.hf_config import UnsupportedConfigError
from jaxquant.models.common.hf_weights import params_from_source
from jaxquant.models.common.safetensors_io import SafetensorsDir

# model_type -> the family package: config_from_hf, block_spec, SourceAdapter, ParamsAdapter
_FAMILIES = {t: llama for t in llama.MODEL_TYPES} | {t: qwen for t in qwen.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILIES))


def config_from_hf(cfg: dict, *, source: str = "config.json") -> DecoderConfig:
    """Dispatch an HF config dict to its family converter."""
    model_type = cfg.get("model_type")
    if model_type not in _FAMILIES:
        raise UnsupportedConfigError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    try:
        return _FAMILIES[model_type].config_from_hf(cfg)
    except UnsupportedConfigError as e:
        raise UnsupportedConfigError(f"{source}: {e}") from None


@dataclasses.dataclass
class LoadedModel:
    """A loaded checkpoint: ``config``, stacked ``params``, and the path it came from."""

    config: DecoderConfig
    params: Any
    path: str
    source: Any = dataclasses.field(repr=False, default=None)
    calibration: Any = dataclasses.field(repr=False, default=None)  # quantize_model's result

    @functools.cached_property
    def tokenizer(self):
        """The checkpoint's tokenizer (GGUF: embedded; HF / quantized dir: its tokenizer files)."""
        if isinstance(self.source, GGUFSource):
            return self.source.tokenizer()
        if os.path.isfile(self.path):  # quantized in memory from a .gguf: its embedded tokenizer
            return load_tokenizer(self.path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)

    def __call__(self, tokens, **forward_kw):
        """Logits ``[B, T, V]`` (float32) of token ids ``[B, T]`` (see :func:`forward`)."""
        from jaxquant.models.common.decoder import forward

        self._need_params()
        logits, _ = forward(self.config, self.params, jnp.asarray(tokens), **forward_kw)
        return logits

    def _need_params(self):
        if self.params is None:
            raise ValueError(f"{self.path}: this model was quantized with offload=True, its "
                             "parameters are on disk only; load them with jaxquant.load(path)")

    def generate(self, prompt, max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                 stop_at_eos: bool = True):
        """Continue ``prompt`` with the KV cache: a string (tokenized with the model's own
        tokenizer; returns the continuation as a string) or token ids ``[T]`` / ``[B, T]``
        (returns ids ``[B, max_new_tokens]``). Greedy at ``temperature=0``."""
        from jaxquant.models.common.generate import generate

        self._need_params()
        text = isinstance(prompt, str)
        tok = self.tokenizer if text else None
        ids = np.asarray(tok(prompt)["input_ids"] if text else prompt, np.int32)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"generate: prompt must be a string or token ids [T] / [B, T], got "
                             f"shape {ids.shape}")
        eos = getattr(tok, "eos_token_id", None) if (text and stop_at_eos) else None
        out = np.asarray(generate(self.config, self.params, jnp.asarray(ids),
                                  jax.random.key(seed), max_new_tokens=int(max_new_tokens),
                                  temperature=float(temperature), top_k=top_k, top_p=top_p,
                                  eos_id=eos))
        if not text:
            return out
        row = out[0].tolist()
        if eos is not None and eos in row:
            row = row[:row.index(eos)]
        return tok.decode(row)

    @property
    def quantized(self) -> bool:
        """Whether the params hold quantized kernels (a jaxquant checkpoint or an imported
        GPTQ / compressed-tensors one)."""
        if self.source == "jaxquant":
            return True
        from jaxquant.core.qarray import QArray

        layers = self.params.get("layers") if isinstance(self.params, dict) else None
        return any(isinstance(x, QArray) for x in jax.tree.leaves(
            layers, is_leaf=lambda x: isinstance(x, QArray)))

    @property
    def name(self) -> str:
        return os.path.basename(os.path.normpath(self.path))


def open_source(path: str | os.PathLike):
    """``(source, hf_config_dict)`` of an HF directory or a ``.gguf`` file (no weights read)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path}: no config.json (expected an HF model directory)")
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
        return SafetensorsDir(path), cfg
    if path.endswith(".gguf") or (os.path.isfile(path) and _is_gguf(path)):
        src = GGUFSource(path)
        return src, src.config_dict()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path not found: {path}")
    raise ValueError(f"{path}: expected an HF model directory or a .gguf file")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a checkpoint: embedded in a GGUF, or an HF directory's tokenizer files."""
    src, _ = open_source(path)
    if isinstance(src, GGUFSource):
        return src.tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(path))


def _is_diffusers_dir(path) -> bool:
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not (os.path.isdir(path) and os.path.isfile(cfg_path)):
        return False
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # open_source reports the bad JSON
    return isinstance(cfg, dict) and "_class_name" in cfg


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load(path: str | os.PathLike, *, dtype=jnp.float32) -> LoadedModel:
    """Load an HF safetensors directory, a GGUF file, or a jaxquant quantized directory.

    Returns:
      :class:`LoadedModel` with ``config`` (:class:`DecoderConfig`) and the stacked ``params``;
      for a diffusers model directory (``config.json`` with ``_class_name``) a
      :class:`jaxquant.models.dit.DiffusionTransformer` instead; for a LLaDA directory
      (``model_type: llada``) a :class:`jaxquant.models.llada.LLaDAModel`.
    """
    from jaxquant.models.quantized import is_quantized_dir, load_quantized

    if os.path.isdir(path) and is_quantized_dir(path):
        cfg, params, _ = load_quantized(path)
        if isinstance(cfg, llada.LLaDAConfig):  # a quantized masked-diffusion LM
            return llada.LLaDAModel(cfg, params, os.fspath(path))
        if not isinstance(cfg, DecoderConfig):  # a quantized diffusion transformer
            from jaxquant.models.dit.transformer import DiffusionTransformer

            return DiffusionTransformer(cfg, params, os.fspath(path))
        return LoadedModel(cfg, params, os.fspath(path), "jaxquant")
    if _is_diffusers_dir(path):  # a diffusers model (config.json with _class_name): DiT / PixArt
        from jaxquant.models import dit

        return dit.load_diffusers(path, dtype=dtype)
    if llada.is_llada_dir(path):  # a masked-diffusion LM (config.json with model_type llada)
        return llada.load_llada(path, dtype=dtype)
    from jaxquant.export.importers import is_hf_quantized_dir, load_hf_quantized

    if os.path.isdir(path) and is_hf_quantized_dir(path):  # GPTQ / compressed-tensors
        return load_hf_quantized(path)
    src, cfg_dict = open_source(path)
    where = os.path.join(os.fspath(path), "config.json") if os.path.isdir(path) else os.fspath(path)
    cfg = config_from_hf(cfg_dict, source=where)
    params = params_from_source(cfg, src, np.dtype(jnp.dtype(dtype)))
    return LoadedModel(cfg, params, os.fspath(path), src)


def from_pretrained(repo_id: str, *, revision: str | None = None, **kw) -> LoadedModel:
    """Download (safetensors + config + tokenizer files only) from the HF hub and :func:`load`."""
    from huggingface_hub import snapshot_download

    d = snapshot_download(
        repo_id, revision=revision,
        allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
    )
    return load(d, **kw)


def family_of(model_type: str):
    if model_type not in _FAMILIES:
        raise UnsupportedConfigError(f"model_type {model_type!r} is not supported "
                                     f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return _FAMILIES[model_type]


def adapter_for(model, *, part: str | None = None):
    """The calibration adapter of ``model``: a path (streamed from the checkpoint, one block at a
    time) or a :class:`LoadedModel` in memory (fp, not already quantized).

    ``part`` (Flux only): ``"double"`` (the default) or ``"single"``, the stack of blocks to
    calibrate (see :mod:`jaxquant.models.dit.spec_flux`)."""
    from jaxquant.models import dit

    if isinstance(model, dit.DiffusionTransformer):
        kind = model.config.kind
        if kind == "flux":
            from jaxquant.models.dit.spec_flux import FluxAdapter

            return FluxAdapter(model, part=part or "double")
        if part is not None:
            raise ValueError(f"adapter_for: part={part!r} is for a Flux transformer only")
        if kind == "pixart":
            from jaxquant.models.dit.spec_pixart import PixArtAdapter

            return PixArtAdapter(model)
        from jaxquant.models.dit.spec import DiTAdapter

        return DiTAdapter(model)
    if part is not None:
        raise ValueError(f"adapter_for: part={part!r} is for a Flux transformer only")
    if isinstance(model, llada.LLaDAModel):
        from jaxquant.models.llada.spec import LLaDAAdapter

        return LLaDAAdapter(model)
    if isinstance(model, LoadedModel):
        if model.quantized:
            raise ValueError(f"{model.path}: this model is already quantized; calibrate its fp "
                             "checkpoint")
        if not isinstance(model.config, DecoderConfig):
            raise TypeError(f"no calibration adapter for a {type(model.config).__name__}")
        # Llama, Qwen2 and Qwen3 share the decoder's block spec and adapters
        return llama.ParamsAdapter(model.config, model.params)
    src, cfg_dict = open_source(model)
    where = os.path.join(os.fspath(model), "config.json") if os.path.isdir(model) \
        else os.fspath(model)
    cfg = config_from_hf(cfg_dict, source=where)
    return family_of(cfg_dict.get("model_type")).SourceAdapter(cfg, src, cfg_dict)
