"""Reading a diffusers transformer directory (``config.json`` + ``*.safetensors``) without torch.

Tensors are read with jaxquant's safetensors reader (memory-mapped numpy, no unpickling) under
diffusers' file names (``diffusion_pytorch_model[.variant].safetensors`` or its sharded
``*.safetensors.index.json``; ``model.safetensors`` too). torch ``Linear`` weights ``[out, in]``
become kernels ``[in, out]``; the patchify ``Conv2d`` weight ``[D, C, p, p]`` becomes the kernel
``[C*p*p, D]`` of :func:`jaxquant.models.dit.layers.patchify`'s patches. Every tensor of the
checkpoint must be used and every expected tensor must be there, with the shape the config implies;
otherwise the error names the file and the tensor.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxquant.models.common.hf_config import UnsupportedConfigError
from jaxquant.models.common.safetensors_io import SafetensorsDir
from jaxquant.models.dit.config import DiTConfig, config_from_diffusers

WEIGHTS_NAME = "diffusion_pytorch_model"


class DiffusersSafetensors(SafetensorsDir):
    """The tensors of a diffusers model directory (single file or sharded with an index); an
    HF-named ``model.safetensors`` is accepted when no diffusers-named file exists."""

    def __init__(self, directory: str | os.PathLike, variant: str | None = None):
        stem = WEIGHTS_NAME + (f".{variant}" if variant else "")
        d = os.fspath(directory)
        if variant is None and not any(os.path.isfile(os.path.join(d, f"{stem}{ext}"))
                                       for ext in (".safetensors", ".safetensors.index.json")) \
                and any(os.path.isfile(os.path.join(d, f"model{ext}"))
                        for ext in (".safetensors", ".safetensors.index.json")):
            stem = "model"
        super().__init__(d, stem)


class _Reader:
    """Takes tensors from a source by diffusers name, checking shapes and recording use."""

    def __init__(self, src, dtype):
        self.src, self.dtype, self.used = src, np.dtype(dtype), set()

    def where(self) -> str:
        return getattr(self.src, "directory", "checkpoint")

    def has(self, name: str) -> bool:
        return name in self.src

    def get(self, name: str, shape: tuple) -> np.ndarray:
        if name not in self.src:
            raise ValueError(f"{self.where()}: checkpoint has no tensor {name!r} (expected shape "
                             f"{shape})")
        got = tuple(self.src.shape(name))
        if got != tuple(shape):
            raise ValueError(f"{self.where()}: tensor {name!r} has shape {got}, the config "
                             f"implies {tuple(shape)}")
        self.used.add(name)
        return np.asarray(self.src.get(name), dtype=self.dtype)

    def linear(self, prefix: str, n_in: int, n_out: int, bias: bool | None = True) -> dict:
        """``{"kernel": [in, out], ("bias": [out])}``; ``bias=None``: take it if present."""
        d = {"kernel": np.ascontiguousarray(self.get(f"{prefix}.weight", (n_out, n_in)).T)}
        if bias or (bias is None and self.has(f"{prefix}.bias")):
            d["bias"] = self.get(f"{prefix}.bias", (n_out,))
        return d

    def norm(self, prefix: str, dim: int, affine: bool) -> dict | None:
        if not affine:
            return None
        return {"scale": self.get(f"{prefix}.weight", (dim,)),
                "bias": self.get(f"{prefix}.bias", (dim,))}


def _timestep_embedder(r: _Reader, prefix: str, dim: int) -> dict:
    return {"linear_1": r.linear(f"{prefix}.linear_1", 256, dim),
            "linear_2": r.linear(f"{prefix}.linear_2", dim, dim)}


def _attention(r: _Reader, prefix: str, cfg: DiTConfig, kv_dim: int) -> dict:
    d, b = cfg.hidden_size, cfg.attention_bias
    return {"to_q": r.linear(f"{prefix}.to_q", d, d, b),
            "to_k": r.linear(f"{prefix}.to_k", kv_dim, d, b),
            "to_v": r.linear(f"{prefix}.to_v", kv_dim, d, b),
            "to_out.0": r.linear(f"{prefix}.to_out.0", d, d, True)}


def _ff(r: _Reader, prefix: str, d: int) -> dict:
    w = f"{prefix}.net.0.proj.weight"
    inner = r.src.shape(w)[0] if r.has(w) else 4 * d
    return {"net.0": {"proj": r.linear(f"{prefix}.net.0.proj", d, inner)},
            "net.2": r.linear(f"{prefix}.net.2", inner, d)}


def _put(tree: dict, key: str, value) -> None:
    if value is not None:
        tree[key] = value


def params_from_diffusers(cfg, src, dtype=np.float32) -> dict:
    """The nested params of ``cfg``'s model (:class:`DiTConfig` or
    :class:`~jaxquant.models.dit.flux.FluxConfig`) from a tensor source (``keys``, ``shape``,
    ``get``).

    Raises ValueError naming the tensor when one is missing, has another shape than the config
    implies, or is left over (a variant of the architecture jaxquant does not implement)."""
    r = _Reader(src, dtype)
    if isinstance(cfg, DiTConfig):
        params = _dit_pixart_params(cfg, r)
    else:
        from jaxquant.models.dit.flux import flux_params_from_diffusers

        params = flux_params_from_diffusers(cfg, r)
    left = sorted(set(src.keys()) - r.used)
    if left:
        more = f" (and {len(left) - 8} more)" if len(left) > 8 else ""
        raise ValueError(f"{r.where()}: tensors the {cfg.class_name} config does not account for: "
                         f"{', '.join(left[:8])}{more}")
    return params


def _dit_pixart_params(cfg: DiTConfig, r: _Reader) -> dict:
    d, p = cfg.hidden_size, cfg.patch_size
    conv = r.get("pos_embed.proj.weight", (d, cfg.in_channels, p, p))
    params: dict = {"pos_embed": {"proj": {
        "kernel": np.ascontiguousarray(conv.reshape(d, -1).T),
        "bias": r.get("pos_embed.proj.bias", (d,))}}}
    blocks = []
    for i in range(cfg.num_layers):
        pre = f"transformer_blocks.{i}"
        bp: dict = {"attn1": _attention(r, f"{pre}.attn1", cfg, d), "ff": _ff(r, f"{pre}.ff", d)}
        if cfg.kind == "dit":
            rows = cfg.num_classes + 1  # LabelEmbedding keeps a null class for CFG
            bp["norm1"] = {
                "emb": {"timestep_embedder": _timestep_embedder(
                            r, f"{pre}.norm1.emb.timestep_embedder", d),
                        "class_embedder": {"embedding_table": {"embedding": r.get(
                            f"{pre}.norm1.emb.class_embedder.embedding_table.weight",
                            (rows, d))}}},
                "linear": r.linear(f"{pre}.norm1.linear", d, 6 * d)}
            _put(bp, "norm3", r.norm(f"{pre}.norm3", d, cfg.norm_elementwise_affine))
        else:
            bp["scale_shift_table"] = r.get(f"{pre}.scale_shift_table", (6, d))
            bp["attn2"] = _attention(r, f"{pre}.attn2", cfg, cfg.cross_attention_dim)
            _put(bp, "norm1", r.norm(f"{pre}.norm1", d, cfg.norm_elementwise_affine))
            _put(bp, "norm2", r.norm(f"{pre}.norm2", d, cfg.norm_elementwise_affine))
        blocks.append(bp)
    params["transformer_blocks"] = blocks
    out = p * p * cfg.out_channels
    if cfg.kind == "dit":
        params["proj_out_1"] = r.linear("proj_out_1", d, 2 * d)
        params["proj_out_2"] = r.linear("proj_out_2", d, out)
    else:
        emb = {"timestep_embedder": _timestep_embedder(r, "adaln_single.emb.timestep_embedder", d)}
        if cfg.use_additional_conditions:
            for name in ("resolution_embedder", "aspect_ratio_embedder"):
                pre = f"adaln_single.emb.{name}"
                emb[name] = {"linear_1": r.linear(f"{pre}.linear_1", 256, d // 3),
                             "linear_2": r.linear(f"{pre}.linear_2", d // 3, d // 3)}
        params["adaln_single"] = {"emb": emb, "linear": r.linear("adaln_single.linear", d, 6 * d)}
        if cfg.caption_channels is not None:
            params["caption_projection"] = {
                "linear_1": r.linear("caption_projection.linear_1", cfg.caption_channels, d),
                "linear_2": r.linear("caption_projection.linear_2", d, d)}
        params["scale_shift_table"] = r.get("scale_shift_table", (2, d))
        params["proj_out"] = r.linear("proj_out", d, out)
    return params


def read_config(path: str | os.PathLike):
    """``(config, model_dir)`` of a diffusers transformer directory, or of a pipeline directory
    with a ``transformer/`` subfolder. ``num_train_timesteps`` is taken from the pipeline's
    ``scheduler/scheduler_config.json`` when there is one."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a diffusers model directory)")
    model_dir = path
    if not os.path.isfile(os.path.join(path, "config.json")) and \
            os.path.isfile(os.path.join(path, "transformer", "config.json")):
        model_dir = os.path.join(path, "transformer")
    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a diffusers model directory)")
    try:
        with open(cfg_path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    return config_from_diffusers(raw, source=cfg_path,
                                 num_train_timesteps=_num_train_timesteps(model_dir)), model_dir


def _num_train_timesteps(model_dir: str) -> int | None:
    sched = os.path.join(os.path.dirname(os.path.normpath(model_dir)), "scheduler",
                         "scheduler_config.json")
    if not os.path.isfile(sched):
        return None
    try:
        with open(sched) as f:
            n = json.load(f).get("num_train_timesteps")
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{sched}: not a valid scheduler config") from None
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
        raise UnsupportedConfigError(f"{sched}: num_train_timesteps = {n!r} is not a positive "
                                     "integer")
    return n
