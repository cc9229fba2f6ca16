"""HF tensor names -> jaxquant's stacked Flax parameter tree, with shape checks.

A *source* is anything with ``get(name) -> np.ndarray`` (HF ``[out, in]`` layout), ``shape(name)``
and ``__contains__``: :class:`SafetensorsDir` and :class:`GGUFSource` both are. Block tensors are
read one block at a time (:func:`block_params_from_source`), which is what lets the calibration
driver stream a model that does not fit in memory.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxquant.models.common.config import DecoderConfig

_LINEARS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def _linear_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """Expected HF ``[out, in]`` shape of every linear of a block."""
    d, hd = cfg.hidden_size, cfg.head_dim
    return {
        "q_proj": (cfg.num_heads * hd, d),
        "k_proj": (cfg.num_kv_heads * hd, d),
        "v_proj": (cfg.num_kv_heads * hd, d),
        "o_proj": (d, cfg.num_heads * hd),
        "gate_proj": (cfg.intermediate_size, d),
        "up_proj": (cfg.intermediate_size, d),
        "down_proj": (d, cfg.intermediate_size),
    }


def check_tensor(src, name: str, shape: tuple[int, ...]) -> None:
    """Raise ValueError (naming the file and tensor) if ``name`` is missing or not ``shape``."""
    if name not in src:
        raise ValueError(f"{_where(src)}: checkpoint is missing tensor {name!r}")
    got = tuple(src.shape(name))
    if got != tuple(shape):
        raise ValueError(
            f"{_where(src)}: tensor {name!r} has shape {got}, but the config implies {tuple(shape)}"
        )


def read_tensor(src, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    check_tensor(src, name, shape)
    a = np.asarray(src.get(name)).astype(dtype, copy=False)  # get() returns a fresh array
    if not np.isfinite(a).all():  # in the tensor's own dtype (bf16 too): no float32 copy
        raise ValueError(f"{_where(src)}: tensor {name!r} holds NaN/Inf values")
    return a


def _where(src) -> str:
    return getattr(src, "path", None) or getattr(src, "directory", "checkpoint")


def block_tensor_shapes(cfg: DecoderConfig, i: int) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor block ``i`` needs (linears, norms, q/k norms, biases)."""
    p = f"model.layers.{i}."
    out = {}
    for group, names in _LINEARS.items():
        for n in names:
            out[f"{p}{group}.{n}.weight"] = _linear_shapes(cfg)[n]
            if cfg.attention_bias and n in ("q_proj", "k_proj", "v_proj"):
                out[f"{p}{group}.{n}.bias"] = (_linear_shapes(cfg)[n][0],)
    for norm in ("input_layernorm", "post_attention_layernorm"):
        out[f"{p}{norm}.weight"] = (cfg.hidden_size,)
    if cfg.qk_norm:
        for n in ("q_norm", "k_norm"):
            out[f"{p}self_attn.{n}.weight"] = (cfg.head_dim,)
    return out


def check_layout(cfg: DecoderConfig, src, family: str) -> None:
    """Every block's tensors are present with the config's shapes (headers only, nothing read):
    a truncated checkpoint or one of another architecture is refused before a long run starts,
    naming what is missing and what the checkpoint holds instead."""
    missing = []
    for i in range(cfg.num_layers):
        for name, shape in block_tensor_shapes(cfg, i).items():
            if name not in src:
                missing.append(name)
            else:
                check_tensor(src, name, shape)
    if not missing:
        return
    names = list(src.keys())
    if not any(n.startswith("model.layers.") for n in names):
        raise ValueError(
            f"{_where(src)}: the config says a {family} model, but the checkpoint's tensors are "
            f"of another architecture: none is named model.layers.* (it holds e.g. "
            f"{sorted(names)[:3]}); expected e.g. {missing[0]!r}")
    raise ValueError(f"{_where(src)}: checkpoint is missing {len(missing)} block tensor(s) the "
                     f"config implies, e.g. {missing[:3]}")


def block_params_from_source(cfg: DecoderConfig, src, i: int, dtype=np.float32) -> dict:
    """Parameters of block ``i`` (unstacked), kernels transposed to ``[in, out]``."""
    p = f"model.layers.{i}."
    shapes = _linear_shapes(cfg)
    d = cfg.hidden_size
    block: dict = {"self_attn": {}, "mlp": {}}
    for group, names in _LINEARS.items():
        for n in names:
            w = read_tensor(src, f"{p}{group}.{n}.weight", shapes[n], dtype)
            block[group][n] = {"kernel": np.ascontiguousarray(w.T)}
            bias_name = f"{p}{group}.{n}.bias"
            wants_bias = cfg.attention_bias and n in ("q_proj", "k_proj", "v_proj")
            if wants_bias:
                block[group][n]["bias"] = read_tensor(src, bias_name, (shapes[n][0],), dtype)
            elif bias_name in src:
                raise ValueError(
                    f"{_where(src)}: unexpected tensor {bias_name!r}: the config has no bias there"
                )
    for norm in ("input_layernorm", "post_attention_layernorm"):
        block[norm] = {"scale": read_tensor(src, f"{p}{norm}.weight", (d,), dtype)}
        if f"{p}{norm}.bias" in src or cfg.norm_bias:
            block[norm]["bias"] = read_tensor(src, f"{p}{norm}.bias", (d,), dtype)
    if cfg.qk_norm:
        for n in ("q_norm", "k_norm"):
            block["self_attn"][n] = {
                "scale": read_tensor(src, f"{p}self_attn.{n}.weight", (cfg.head_dim,), dtype)
            }
    return block


def stack_blocks(blocks: list[dict]) -> dict:
    """List of per-block trees -> one tree with a leading ``[L]`` axis on every leaf."""
    import jax

    return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *blocks)


def params_from_source(cfg: DecoderConfig, src, dtype=np.float32) -> dict:
    """The full stacked parameter tree of a decoder (see :mod:`jaxquant.models.common.decoder`)."""
    v, d = cfg.vocab_size, cfg.hidden_size
    table = read_tensor(src, "model.embed_tokens.weight", (v, d), dtype)
    params = {
        "embed_tokens": {"embedding": jnp.asarray(table)},
        "layers": stack_blocks(
            [block_params_from_source(cfg, src, i, dtype) for i in range(cfg.num_layers)]
        ),
        "norm": {"scale": jnp.asarray(read_tensor(src, "model.norm.weight", (d,), dtype))},
    }
    if not cfg.tie_word_embeddings:
        head = read_tensor(src, "lm_head.weight", (v, d), dtype)
        params["lm_head"] = {"kernel": jnp.asarray(head.T)}
    if f"model.layers.{cfg.num_layers}.input_layernorm.weight" in src:
        raise ValueError(
            f"{_where(src)}: checkpoint has more blocks than num_hidden_layers={cfg.num_layers}"
        )
    return params
