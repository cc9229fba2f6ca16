"""Orbax checkpoints of parameter trees that hold QArrays, restorable without a target.

Orbax restores a custom pytree only given a target structure. Beside every checkpoint we write
``tree.json`` describing the tree (dicts, lists, dense arrays by shape/dtype, QArrays by spec,
logical ``in_features`` and leaf shapes), from which the abstract target is rebuilt. Restores are
bit-exact; the checkpoint itself is written atomically by orbax (temporary directory + rename).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxquant.core.qarray import QArray
from jaxquant.core.spec import QuantSpec
from jaxquant.models.common.config import DecoderConfig, RopeConfig

TREE_FILE = "tree.json"


def _leaf(x) -> dict:
    return {"shape": list(x.shape), "dtype": np.dtype(x.dtype).name}


def tree_spec(tree: Any) -> Any:
    """A JSON description of ``tree`` (see module docstring)."""
    if isinstance(tree, QArray):
        return {"__qarray__": {
            "spec": dataclasses.asdict(tree.spec), "in_features": tree.in_features,
            "dtype": tree.dtype, "packed": _leaf(tree.packed), "scale": _leaf(tree.scale),
            "zero": None if tree.zero is None else _leaf(tree.zero)}}
    from jaxquant.nn.linear import ActQuant, InputTransform

    if isinstance(tree, ActQuant):  # a static node: no arrays, only its settings
        return {"__act__": dataclasses.asdict(tree)}
    if isinstance(tree, InputTransform):
        return {"__transform__": dataclasses.asdict(tree)}
    if isinstance(tree, dict):
        return {"__dict__": {k: tree_spec(v) for k, v in tree.items()}}
    if isinstance(tree, list | tuple):
        return {"__list__": [tree_spec(v) for v in tree]}
    if tree is None:
        return None
    return {"__array__": _leaf(tree)}


def _sds(d: dict) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(d["shape"]), np.dtype(d["dtype"]) if d["dtype"] != "bfloat16"
                                else jax.numpy.bfloat16)


def abstract_tree(spec: Any) -> Any:
    """The abstract target (ShapeDtypeStructs, QArrays of them) described by :func:`tree_spec`."""
    if spec is None:
        return None
    if "__qarray__" in spec:
        q = spec["__qarray__"]
        return QArray(_sds(q["packed"]), _sds(q["scale"]),
                      None if q["zero"] is None else _sds(q["zero"]),
                      QuantSpec(**q["spec"]), q["in_features"], q["dtype"])
    if "__act__" in spec:
        from jaxquant.nn.linear import ActQuant

        return ActQuant(**spec["__act__"])
    if "__transform__" in spec:
        from jaxquant.nn.linear import InputTransform

        return InputTransform(**spec["__transform__"])
    if "__dict__" in spec:
        return {k: abstract_tree(v) for k, v in spec["__dict__"].items()}
    if "__list__" in spec:
        return [abstract_tree(v) for v in spec["__list__"]]
    return _sds(spec["__array__"])


def _write_meta(path: str, obj, **json_kw) -> None:
    """Atomically write a JSON file, once: by process 0 of a multi-process job."""
    if jax.process_index() != 0:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, **json_kw)
    os.replace(tmp, path)


def save_tree(path: str | os.PathLike, tree: Any) -> None:
    """Save ``tree`` under directory ``path`` (overwriting)."""
    path = os.path.abspath(os.fspath(path))
    if jax.process_count() > 1:  # host-local arrays (the same on every process) go as numpy
        tree = jax.tree.map(lambda a: np.asarray(a) if isinstance(a, jax.Array)
                            and a.is_fully_addressable else a, tree)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "state"), tree, force=True)
    ckpt.wait_until_finished()
    _write_meta(os.path.join(path, TREE_FILE), tree_spec(tree))  # orbax wrote every shard once


def load_tree(path: str | os.PathLike, *, sharding=None) -> Any:
    """Restore a tree saved by :func:`save_tree` (host arrays; with ``sharding``, global arrays
    of that sharding, each process reading only its shards)."""
    path = os.path.abspath(os.fspath(path))
    meta = os.path.join(path, TREE_FILE)
    if not os.path.isfile(meta):
        raise FileNotFoundError(f"{path}: not a jaxquant checkpoint (no {TREE_FILE})")
    with open(meta) as f:
        target = abstract_tree(json.load(f))
    if sharding is not None:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                              target)
    return ocp.StandardCheckpointer().restore(os.path.join(path, "state"), target)


# ---------------------------------------------------------------------------- quantized models
MODEL_FILE = "jaxquant.json"
FORMAT = "jaxquant-quantized-v1"


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict):
    d = dict(d)
    if d.get("kind") in ("dit", "pixart"):
        from jaxquant.models.dit.config import DiTConfig

        return DiTConfig(**d)
    if "mask_token_id" in d and "d_model" in d:  # a LLaDA masked-diffusion LM
        from jaxquant.models.llada.config import LLaDAConfig

        return LLaDAConfig(**d)
    d["rope"] = RopeConfig(**d["rope"])
    if isinstance(d.get("eos_token_id"), list):
        d["eos_token_id"] = tuple(d["eos_token_id"])
    return DecoderConfig(**d)


def save_quantized(out_dir: str | os.PathLike, config, params, *, recipe: dict,
                   fingerprints: dict | None = None, source: str | None = None,
                   extra: dict | None = None) -> None:
    """Save a quantized model: params (orbax, packed QArrays), config and recipe."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    save_tree(os.path.join(out_dir, "params"), params)
    meta = {"format": FORMAT, "config": config_to_dict(config), "recipe": recipe,
            "fingerprints": fingerprints or {}, "source": source, **(extra or {})}
    _write_meta(os.path.join(out_dir, MODEL_FILE), meta, indent=1)


BLOCKS_DIR, TOP_DIR = "blocks", "top"


def save_quantized_blocks(out_dir: str | os.PathLike, config, top_parts: list, block_dirs: list,
                          blocks_key: str, *, recipe: dict, source: str | None = None,
                          extra: dict | None = None) -> None:
    """Save a quantized model whose blocks are already on disk (the engine's per-block
    checkpoints, moved, not copied) and whose other params come one entry at a time
    (``top_parts``: ``[(key, load)]``): nothing but one table is ever in memory. The layout:
    ``top/<key>/`` and ``blocks/block_NNNN/`` orbax trees; :func:`load_quantized` assembles."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(os.path.join(out_dir, BLOCKS_DIR), exist_ok=True)
    for key, load in top_parts:
        save_tree(os.path.join(out_dir, TOP_DIR, key), load())
    for b, d in enumerate(block_dirs):
        dst = os.path.join(out_dir, BLOCKS_DIR, f"block_{b:04d}")
        if os.path.abspath(d) != dst:
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(d, dst)
    layout = {"blocks_key": blocks_key, "num_blocks": len(block_dirs),
              "top": [k for k, _ in top_parts],
              "assemble": "stack" if blocks_key in ("layers", "blocks") else "list"}
    meta = {"format": FORMAT, "config": config_to_dict(config), "recipe": recipe,
            "fingerprints": {}, "source": source, "layout": layout, **(extra or {})}
    _write_meta(os.path.join(out_dir, MODEL_FILE), meta, indent=1)


def _load_blocked(path: str, layout: dict) -> dict:
    import ml_dtypes

    from jaxquant.models.common.decoder_spec import stack_or_list

    def up(a):  # the tables were stored in the source's half precision: exact in float32
        return np.asarray(a, np.float32) if isinstance(a, np.ndarray) and a.dtype in (
            np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)) else a

    params = {k: jax.tree.map(up, load_tree(os.path.join(path, TOP_DIR, k)))
              for k in layout["top"]}
    blocks = [load_tree(os.path.join(path, BLOCKS_DIR, f"block_{b:04d}"))
              for b in range(int(layout["num_blocks"]))]
    params[layout["blocks_key"]] = stack_or_list(blocks) if layout["assemble"] == "stack" \
        else blocks
    return params


def is_quantized_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MODEL_FILE))


def load_quantized(path: str | os.PathLike) -> tuple[Any, Any, dict]:
    """``(config, params, metadata)`` of a model saved by :func:`save_quantized`."""
    path = os.fspath(path)
    with open(os.path.join(path, MODEL_FILE)) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}/{MODEL_FILE}: corrupt ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}/{MODEL_FILE}: unknown format {meta.get('format')!r}, "
                         f"expected {FORMAT!r}")
    if "layout" in meta:  # written block by block (calibrate(offload=True))
        return config_from_dict(meta["config"]), _load_blocked(path, meta["layout"]), meta
    return config_from_dict(meta["config"]), load_tree(os.path.join(path, "params")), meta
