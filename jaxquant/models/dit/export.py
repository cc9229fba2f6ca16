"""jaxquant DiT params → a diffusers ``DiTTransformer2DModel`` directory, and a fresh init.

The inverse of :func:`jaxquant.models.dit.convert.params_from_diffusers`: kernels ``[in, out]``
become ``weight [out, in]``, the patch kernel ``[C*p*p, D]`` becomes the conv weight
``[D, C, p, p]``, embedding tables and LayerNorm scales become ``weight``; every other leaf keeps
its name. The directory holds ``config.json`` (with ``_class_name``) and
``diffusion_pytorch_model.safetensors``, so diffusers' ``from_pretrained`` and :func:`jaxquant.load`
both read it. A training run (``jaxquant.diffusion.train_fmnist``) starts from
:func:`init_dit_params`: DiT's initialisation (adaLN-Zero: the modulation and the output
projections start at zero).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxquant.models.dit.config import DiTConfig


def dit_diffusers_config(cfg: DiTConfig) -> dict:
    """The ``config.json`` of a diffusers ``DiTTransformer2DModel`` with ``cfg``'s shapes."""
    if cfg.kind != "dit":
        raise ValueError(f"export of a {cfg.kind!r} model is not implemented (only 'dit')")
    return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": "0.42.1",
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
            "num_layers": cfg.num_layers, "dropout": 0.0, "norm_num_groups": 32,
            "attention_bias": cfg.attention_bias, "sample_size": cfg.sample_size,
            "patch_size": cfg.patch_size, "activation_fn": cfg.activation_fn,
            "num_embeds_ada_norm": cfg.num_classes, "upcast_attention": False,
            "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": cfg.norm_elementwise_affine, "norm_eps": cfg.norm_eps}


def _flatten(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, tree


def to_diffusers_state_dict(cfg: DiTConfig, params: dict) -> dict[str, np.ndarray]:
    """diffusers tensor names → float32 arrays for a dense (not quantized) DiT ``params``."""
    out: dict[str, np.ndarray] = {}
    d, p = cfg.hidden_size, cfg.patch_size
    for path, leaf in _flatten(params):
        if not hasattr(leaf, "shape") or hasattr(leaf, "spec"):
            raise TypeError(f"{path}: only dense arrays can be exported to diffusers "
                            f"(got {type(leaf).__name__})")
        a = np.asarray(leaf, np.float32)
        head, _, last = path.rpartition(".")
        if path == "pos_embed.proj.kernel":
            out["pos_embed.proj.weight"] = np.ascontiguousarray(
                a.T.reshape(d, cfg.in_channels, p, p))
        elif last == "kernel":
            out[f"{head}.weight"] = np.ascontiguousarray(a.T)
        elif last in ("embedding", "scale"):
            out[f"{head}.weight"] = a
        else:
            out[path] = a
    return out


def save_dit_diffusers(cfg: DiTConfig, params: dict, out_dir: str | os.PathLike) -> None:
    """Write ``out_dir/config.json`` and ``out_dir/diffusion_pytorch_model.safetensors``."""
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(to_diffusers_state_dict(cfg, params),
              os.path.join(out_dir, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dit_diffusers_config(cfg), f, indent=1)


def init_dit_params(cfg: DiTConfig, key: jax.Array) -> dict:
    """DiT's initialisation for ``cfg`` (``kind == "dit"``): Xavier-uniform linears with zero
    biases, N(0, 0.02) class tables and timestep MLPs, the patch kernel Xavier on its flattened
    shape, and zeros for every adaLN modulation and both output projections (adaLN-Zero)."""
    if cfg.kind != "dit":
        raise ValueError(f"init of a {cfg.kind!r} model is not implemented (only 'dit')")
    d, p, f = cfg.hidden_size, cfg.patch_size, 4 * cfg.hidden_size
    keys = iter(jax.random.split(key, 16 * cfg.num_layers + 8))

    def xavier(n_in, n_out):
        lim = np.sqrt(6.0 / (n_in + n_out))
        return {"kernel": np.asarray(jax.random.uniform(next(keys), (n_in, n_out), minval=-lim,
                                                        maxval=lim)),
                "bias": np.zeros((n_out,), np.float32)}

    def normal(shape, std=0.02):
        return np.asarray(jax.random.normal(next(keys), shape)) * np.float32(std)

    def zeros(n_in, n_out):
        return {"kernel": np.zeros((n_in, n_out), np.float32), "bias": np.zeros(n_out, np.float32)}

    def attn_lin(n_in, n_out):
        lin = xavier(n_in, n_out)
        if not cfg.attention_bias:
            lin.pop("bias")
        return lin

    blocks = []
    for _ in range(cfg.num_layers):
        bp = {"norm1": {"emb": {"timestep_embedder": {
                  "linear_1": {"kernel": normal((256, d)), "bias": np.zeros(d, np.float32)},
                  "linear_2": {"kernel": normal((d, d)), "bias": np.zeros(d, np.float32)}},
                  "class_embedder": {"embedding_table": {
                      "embedding": normal((cfg.num_classes + 1, d))}}},
                  "linear": zeros(d, 6 * d)},
              "attn1": {"to_q": attn_lin(d, d), "to_k": attn_lin(d, d), "to_v": attn_lin(d, d),
                        "to_out.0": xavier(d, d)},
              "ff": {"net.0": {"proj": xavier(d, f)}, "net.2": xavier(f, d)}}
        if cfg.norm_elementwise_affine:
            bp["norm3"] = {"scale": np.ones(d, np.float32), "bias": np.zeros(d, np.float32)}
        blocks.append(bp)
    params = {"pos_embed": {"proj": xavier(cfg.in_channels * p * p, d)},
              "transformer_blocks": blocks,
              "proj_out_1": zeros(d, 2 * d),
              "proj_out_2": zeros(d, p * p * cfg.out_channels)}
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)
