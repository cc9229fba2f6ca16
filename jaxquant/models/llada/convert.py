"""LLaDA HF checkpoint (``config.json`` + ``model.safetensors``) -> :class:`LLaDAConfig` + params.

The checkpoint layout is the one ``LLaDAModelLM.save_pretrained`` writes (torch ``Linear``
weights ``[out, in]``)::

    model.transformer.wte.weight                      [E, D]
    model.transformer.blocks.N.attn_norm.weight       [D]
    model.transformer.blocks.N.{q,k,v}_proj.weight    [H*hd | KV*hd, D]
    model.transformer.blocks.N.attn_out.weight        [D, H*hd]
    model.transformer.blocks.N.ff_norm.weight         [D]
    model.transformer.blocks.N.{ff_proj,up_proj}.weight  [F, D]
    model.transformer.blocks.N.ff_out.weight          [D, F]
    model.transformer.ln_f.weight                     [D]
    model.transformer.ff_out.weight                   [E, D]   (absent when weight_tying)

A field missing from ``config.json`` takes the default of LLaDA's ``ModelConfig`` (as the HF
config class would), except ``mask_token_id``, which must be given. Settings this model does not
implement are refused with :class:`UnsupportedConfigError` (a ValueError) naming the field and
the file. Weights are read with jaxquant's numpy safetensors reader (no torch; sharded
checkpoints work), and every tensor's shape is checked.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from jaxquant.models.common.hf_config import UnsupportedConfigError
from jaxquant.models.common.safetensors_io import SafetensorsDir
from jaxquant.models.llada.config import LLaDAConfig
from jaxquant.models.llada.model import BLOCK_LINEARS, BLOCK_NORMS, LLaDAModel

MODEL_TYPES = ("llada",)
PREFIX = "model.transformer."

# LLaDA's ModelConfig defaults, for the fields read here (a config.json may omit any of them)
_DEFAULTS = {
    "block_type": "sequential", "activation_type": "swiglu", "layer_norm_type": "default",
    "layer_norm_with_affine": True, "bias_for_layer_norm": None, "include_bias": False,
    "include_qkv_bias": False, "alibi": False, "rope": False, "attention_layer_norm": False,
    "input_emb_norm": False, "scale_logits": False, "block_group_size": 1,
    "multi_query_attention": None, "n_kv_heads": None, "mlp_ratio": 4, "mlp_hidden_size": None,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "weight_tying": True, "embedding_size": 50304,
    "max_sequence_length": 1024,
}

# field -> the values implemented (anything else is refused)
_IMPLEMENTED = {
    "block_type": ("llama",),
    "activation_type": ("silu",),
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "bias_for_layer_norm": (None, False),
    "include_bias": (False,),
    "include_qkv_bias": (False, None),
    "alibi": (False,),
    "rope": (True,),
    "attention_layer_norm": (False,),
    "input_emb_norm": (False,),
    "scale_logits": (False,),
    "block_group_size": (1,),
}


def is_llada_config(cfg: dict) -> bool:
    """Whether an HF config dict describes a LLaDA model (``model_type: llada``, the
    ``LLaDAModelLM`` architecture, or LLaDA's own field names ``d_model`` + ``block_type`` +
    ``mask_token_id``)."""
    if not isinstance(cfg, dict):
        return False
    if cfg.get("model_type") in MODEL_TYPES or "LLaDAModelLM" in (cfg.get("architectures") or ()):
        return True
    return all(k in cfg for k in ("d_model", "block_type", "mask_token_id"))


def is_llada_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory whose ``config.json`` is a LLaDA config (False for
    anything unreadable: the generic loader reports that)."""
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not (os.path.isdir(path) and os.path.isfile(cfg_path)):
        return False
    try:
        with open(cfg_path) as f:
            return is_llada_config(json.load(f))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _field(cfg: dict, key: str):
    return cfg.get(key, _DEFAULTS.get(key))


def _int_field(cfg: dict, key: str, source: str) -> int:
    value = _field(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UnsupportedConfigError(f"{source}: LLaDA config field {key!r} = {value!r} must be a "
                                     "positive integer")
    return value


def config_from_hf(cfg: dict, *, source: str = "config.json") -> LLaDAConfig:
    """Read a LLaDA HF config dict, refusing what this model does not implement."""
    for key, allowed in _IMPLEMENTED.items():
        value = _field(cfg, key)
        if not any(type(value) is type(a) and value == a for a in allowed):
            absent = "" if key in cfg else " (absent: LLaDA's default)"
            raise UnsupportedConfigError(
                f"{source}: LLaDA config field {key!r} = {value!r}{absent} is not supported "
                f"(supported: {', '.join(repr(a) for a in allowed)})")
    if cfg.get("mask_token_id") is None:
        raise UnsupportedConfigError(
            f"{source}: LLaDA config field 'mask_token_id' is missing (the [MASK] token id is "
            "needed for masked-diffusion decoding; LLaDA-8B uses 126336)")
    mask_id = cfg["mask_token_id"]
    if isinstance(mask_id, bool) or not isinstance(mask_id, int):
        raise UnsupportedConfigError(f"{source}: LLaDA config field 'mask_token_id' = "
                                     f"{mask_id!r} must be an integer token id")

    d_model = _int_field(cfg, "d_model", source)
    n_heads = _int_field(cfg, "n_heads", source)
    n_layers = _int_field(cfg, "n_layers", source)
    vocab = _int_field(cfg, "vocab_size", source)
    # LLaDA's effective_n_kv_heads
    kv, mqa = _field(cfg, "n_kv_heads"), _field(cfg, "multi_query_attention")
    if kv is None:
        kv = 1 if mqa is True else n_heads
    elif mqa is not None and kv != (1 if mqa else n_heads):
        raise UnsupportedConfigError(
            f"{source}: LLaDA config fields 'n_kv_heads' = {kv!r} and 'multi_query_attention' = "
            f"{mqa!r} contradict each other")
    kv = _int_field({"n_kv_heads": kv}, "n_kv_heads", source)
    hidden = _field(cfg, "mlp_hidden_size")
    hidden = _int_field(cfg, "mlp_hidden_size", source) if hidden is not None \
        else _int_field(cfg, "mlp_ratio", source) * d_model
    emb = _field(cfg, "embedding_size")
    emb = vocab if emb is None else _int_field(cfg, "embedding_size", source)
    if d_model % n_heads or n_heads % kv or (d_model // n_heads) % 2:
        raise UnsupportedConfigError(
            f"{source}: LLaDA config fields 'd_model' = {d_model}, 'n_heads' = {n_heads}, "
            f"'n_kv_heads' = {kv}: d_model must be a multiple of n_heads, n_heads of n_kv_heads, "
            "and the head dim must be even")
    if not 0 <= mask_id < emb:
        raise UnsupportedConfigError(
            f"{source}: LLaDA config field 'mask_token_id' = {mask_id} is not a row of the "
            f"embedding (embedding_size {emb})")
    return LLaDAConfig(
        vocab_size=vocab, embedding_size=emb, d_model=d_model, n_heads=n_heads, n_kv_heads=kv,
        n_layers=n_layers, mlp_hidden_size=hidden, mask_token_id=mask_id,
        rms_norm_eps=float(_field(cfg, "rms_norm_eps")),
        rope_theta=float(_field(cfg, "rope_theta")),
        weight_tying=bool(_field(cfg, "weight_tying")),
        max_sequence_length=int(_field(cfg, "max_sequence_length")),
        eos_token_id=cfg.get("eos_token_id"), pad_token_id=cfg.get("pad_token_id"),
    )


def expected_shapes(cfg: LLaDAConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> torch shape ``[out, in]`` (norms ``[D]``)."""
    d, f, hd, e = cfg.d_model, cfg.mlp_hidden_size, cfg.head_dim, cfg.embedding_size
    block = {"attn_norm": (d,), "ff_norm": (d,), "q_proj": (cfg.n_heads * hd, d),
             "k_proj": (cfg.n_kv_heads * hd, d), "v_proj": (cfg.n_kv_heads * hd, d),
             "attn_out": (d, cfg.n_heads * hd), "ff_proj": (f, d), "up_proj": (f, d),
             "ff_out": (d, f)}
    shapes = {f"{PREFIX}wte.weight": (e, d), f"{PREFIX}ln_f.weight": (d,)}
    for i in range(cfg.n_layers):
        shapes |= {f"{PREFIX}blocks.{i}.{n}.weight": s for n, s in block.items()}
    if not cfg.weight_tying:
        shapes[f"{PREFIX}ff_out.weight"] = (e, d)
    return shapes


def params_from_safetensors(cfg: LLaDAConfig, src, dtype=np.float32, *,
                            where: str = "checkpoint") -> dict:
    """Stacked Flax-layout params (see :mod:`jaxquant.models.llada.model`) from a safetensors
    source with ``keys()``, ``shape(name)`` and ``get(name)`` (e.g. :class:`SafetensorsDir`)."""
    shapes = expected_shapes(cfg)
    have = set(src.keys())
    missing = sorted(set(shapes) - have)
    if missing:
        raise ValueError(f"{where}: missing LLaDA tensors {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}")
    unexpected = sorted(have - set(shapes))
    if unexpected:
        raise ValueError(f"{where}: tensors this LLaDA config does not use (biases, q/k norms, "
                         f"a tied head?): {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for name, shape in shapes.items():
        if tuple(src.shape(name)) != shape:
            raise ValueError(f"{where}: tensor {name!r} has shape {tuple(src.shape(name))}, the "
                             f"config implies {shape}")
    dtype = np.dtype(dtype)

    def get(name):
        return np.asarray(src.get(PREFIX + name), dtype=dtype)

    def stack(fn):
        return jnp.asarray(np.stack([fn(i) for i in range(cfg.n_layers)]))

    blocks = {n: {"kernel": stack(lambda i, n=n: get(f"blocks.{i}.{n}.weight").T)}
              for n in BLOCK_LINEARS}
    blocks |= {n: {"scale": stack(lambda i, n=n: get(f"blocks.{i}.{n}.weight"))}
               for n in BLOCK_NORMS}
    params = {"wte": {"embedding": jnp.asarray(get("wte.weight"))},
              "blocks": blocks,
              "ln_f": {"scale": jnp.asarray(get("ln_f.weight"))}}
    if not cfg.weight_tying:
        params["ff_out"] = {"kernel": jnp.asarray(get("ff_out.weight").T)}
    return params


def read_config(path: str | os.PathLike) -> tuple[LLaDAConfig, str]:
    """``(config, config.json path)`` of a LLaDA checkpoint directory."""
    cfg_path = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path}: no config.json (expected a LLaDA HF model directory)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object")
    return config_from_hf(cfg, source=cfg_path), cfg_path


def load_llada(path: str | os.PathLike, *, dtype=jnp.float32) -> LLaDAModel:
    """Load a LLaDA HF directory (``config.json`` + ``model.safetensors`` or shards) as a callable
    :class:`LLaDAModel` with float32 (or ``dtype``) params."""
    path = os.fspath(path)
    cfg, _ = read_config(path)
    src = SafetensorsDir(path)
    params = params_from_safetensors(cfg, src, np.dtype(jnp.dtype(dtype)), where=path)
    return LLaDAModel(cfg, params, path)


# -------------------------------------------------------------------- writing the HF layout
def config_to_hf(cfg: LLaDAConfig, **extra) -> dict:
    """The LLaDA ``config.json`` dict of ``cfg`` (LLaDA's own field names, every implemented
    setting written out, so :func:`config_from_hf` reads back the same config); ``extra`` fields
    (e.g. ``bos_token_id``) are added."""
    out = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada",
        "block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
        "layer_norm_with_affine": True, "bias_for_layer_norm": False, "include_bias": False,
        "include_qkv_bias": False, "alibi": False, "rope": True, "rope_full_precision": True,
        "attention_layer_norm": False, "input_emb_norm": False, "scale_logits": False,
        "block_group_size": 1, "flash_attention": False, "use_cache": False,
        "d_model": cfg.d_model, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "n_layers": cfg.n_layers, "mlp_hidden_size": cfg.mlp_hidden_size,
        "mlp_ratio": max(1, cfg.mlp_hidden_size // cfg.d_model),
        "vocab_size": cfg.vocab_size, "embedding_size": cfg.embedding_size,
        "mask_token_id": cfg.mask_token_id, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "weight_tying": cfg.weight_tying,
        "max_sequence_length": cfg.max_sequence_length,
        "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "dtype": "float32",
    }
    return out | extra


def params_to_safetensors(cfg: LLaDAConfig, params: dict) -> dict[str, np.ndarray]:
    """Checkpoint tensors (torch ``[out, in]`` layout, float32) of stacked or listed Flax-layout
    params; the inverse of :func:`params_from_safetensors`. QArray kernels are refused."""
    from jaxquant.models.llada.model import block_params

    def arr(x, name):
        if not hasattr(x, "shape") or not hasattr(x, "dtype") or type(x).__name__ == "QArray":
            raise ValueError(f"params {name!r} is not a plain array (quantized params are "
                             f"exported by jaxquant.export, not saved here)")
        return np.ascontiguousarray(np.asarray(x, np.float32))

    out = {f"{PREFIX}wte.weight": arr(params["wte"]["embedding"], "wte"),
           f"{PREFIX}ln_f.weight": arr(params["ln_f"]["scale"], "ln_f")}
    for i in range(cfg.n_layers):
        bp = block_params(params, i)
        for n in BLOCK_LINEARS:
            out[f"{PREFIX}blocks.{i}.{n}.weight"] = arr(bp[n]["kernel"], f"blocks.{i}.{n}").T.copy()
        for n in BLOCK_NORMS:
            out[f"{PREFIX}blocks.{i}.{n}.weight"] = arr(bp[n]["scale"], f"blocks.{i}.{n}")
    if not cfg.weight_tying:
        out[f"{PREFIX}ff_out.weight"] = arr(params["ff_out"]["kernel"], "ff_out").T.copy()
    shapes = expected_shapes(cfg)
    for name, shape in shapes.items():
        if out[name].shape != shape:
            raise ValueError(f"params: {name!r} has shape {out[name].shape}, the config implies "
                             f"{shape}")
        if not np.isfinite(out[name]).all():
            raise ValueError(f"params: {name!r} holds NaN/inf; refusing to write it")
    return out


def save_llada(path: str | os.PathLike, cfg: LLaDAConfig, params: dict, **extra_config) -> str:
    """Write ``config.json`` + ``model.safetensors`` in the LLaDA HF layout (what
    ``LLaDAModelLM.save_pretrained`` writes, so :func:`load_llada` and LLaDA's modeling code
    read it). Returns the directory."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = params_to_safetensors(cfg, params)
    tmp = os.path.join(path, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, **extra_config), f, indent=2)
    return path
