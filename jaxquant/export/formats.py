"""Writers of a quantized decoder in the peers' formats.

* ``compressed-tensors``: the ``pack-quantized`` format of the compressed-tensors specification
  (what vLLM's ``CompressedTensorsWNA16`` scheme and transformers' compressed-tensors quantizer
  read). Per linear ``P``: ``P.weight_packed`` int32 ``[out, ceil(in·b/32)]`` (the unsigned code
  ``q + 2^(b-1)`` of each signed value, packed along ``in``, lowest bits first, codes may straddle
  words), ``P.weight_scale`` ``[out, groups]``, ``P.weight_shape`` int64 ``[out, in]`` and, for an
  asymmetric scheme, ``P.weight_zero_point`` int32 ``[ceil(out·b/32), groups]`` (packed along
  ``out``). ``Ŵ = (q - zp) · scale``. One config group per distinct (bits, group size,
  symmetric); 2, 3, 4 and 8 bits.
* ``gptq``: the AutoGPTQ / GPTQModel v1 layout: ``qweight`` int32 ``[in·b/32, out]`` (jaxquant's
  own packing), ``qzeros`` int32 ``[groups, out·b/32]`` holding ``zero − 1`` (v1), ``scales`` fp16
  ``[groups, out]``, ``g_idx`` int32 ``[in]`` (``i // group_size``: jaxquant's act-order keeps
  static groups, so groups stay contiguous), ``quantization_config`` with ``checkpoint_format:
  gptq``. One bits / group size for the whole model (the format has no per-layer scheme).

Both write ``config.json`` (the HF architecture plus ``quantization_config``) and
``model.safetensors``; dense tensors (embeddings, norms, an fp head) in ``dtype``.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxquant.core.qarray import QArray
from jaxquant.export.bits import pack_rows
from jaxquant.export.decoder import (
    UnsupportedExportError,
    codes_scale_zero,
    group_index,
    hf_config,
    linears,
)

DTYPES = {"float16": np.float16, "float32": np.float32}


def _write(out: str, tensors: dict, config: dict) -> str:
    from safetensors.numpy import save_file

    os.makedirs(out, exist_ok=True)
    for k, v in tensors.items():
        if v.dtype.kind == "f" and not np.isfinite(v).all():
            raise ValueError(f"export: tensor {k!r} holds NaN/inf; refusing to write it")
    tmp = os.path.join(out, "model.safetensors.tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out


def _dtype(dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def export_compressed_tensors(cfg, params, out: str, *, dtype: str = "float16") -> str:
    """Write ``out/`` in compressed-tensors ``pack-quantized`` (see the module doc)."""
    fmt = "compressed-tensors pack-quantized"
    dt = _dtype(dtype)
    lins, dense, flags = linears(cfg, params, fmt=fmt)
    tensors = {k: v.astype(dt) for k, v in dense.items()}
    schemes: dict[tuple, list[str]] = {}
    ignore = ["lm_head"]
    for lin in lins:
        if lin.bias is not None:
            tensors[f"{lin.name}.bias"] = lin.bias.astype(dt)
        if not isinstance(lin.kernel, QArray):
            tensors[f"{lin.name}.weight"] = np.ascontiguousarray(lin.kernel.T).astype(dt)
            ignore.append(lin.name)
            continue
        qa = lin.kernel
        b = qa.spec.bits
        if b not in (2, 3, 4, 8):
            raise UnsupportedExportError(f"{lin.name}: {b}-bit codes; pack-quantized is read by "
                                         "vLLM at 2, 3, 4 and 8 bits")
        q, s, z = codes_scale_zero(qa)  # [K, N], [G, N], [G, N]
        k, n = q.shape
        gs, g = group_index(qa)
        tensors[f"{lin.name}.weight_packed"] = pack_rows(q.T, b)
        tensors[f"{lin.name}.weight_scale"] = np.ascontiguousarray(s.T).astype(dt)
        tensors[f"{lin.name}.weight_shape"] = np.array([n, k], np.int64)
        if not qa.spec.symmetric:
            tensors[f"{lin.name}.weight_zero_point"] = np.ascontiguousarray(
                pack_rows(z, b).T)  # [ceil(N·b/32), G]: packed along the output axis
        key = (b, -1 if g == 1 else gs, bool(qa.spec.symmetric))
        schemes.setdefault(key, []).append(lin.name)
    groups = {}
    for i, ((b, gs, sym), names) in enumerate(sorted(schemes.items())):
        w = {"num_bits": b, "type": "int", "symmetric": sym, "dynamic": False,
             "strategy": "channel" if gs == -1 else "group",
             "group_size": None if gs == -1 else gs, "actorder": None, "observer": "minmax"}
        groups[f"group_{i}"] = {"targets": names, "weights": w, "input_activations": None,
                                "output_activations": None, "format": "pack-quantized"}
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized",
          "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
          "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
          "global_compression_ratio": None, "producer": "jaxquant"}
    config = hf_config(cfg, dtype=dtype, **flags) | {"quantization_config": qc}
    return _write(out, tensors, config)


def export_gptq(cfg, params, out: str, *, dtype: str = "float16") -> str:
    """Write ``out/`` in the GPTQ v1 layout (see the module doc)."""
    fmt = "GPTQ (v1)"
    dt = _dtype(dtype)
    lins, dense, flags = linears(cfg, params, fmt=fmt)
    tensors = {k: v.astype(dt) for k, v in dense.items()}
    scheme = None
    for lin in lins:
        if lin.bias is not None:
            tensors[f"{lin.name}.bias"] = lin.bias.astype(np.float16)
        if not isinstance(lin.kernel, QArray):
            raise UnsupportedExportError(f"{lin.name}: kept in floating point; the GPTQ format "
                                         "quantizes every block linear (use compressed-tensors)")
        qa = lin.kernel
        b = qa.spec.bits
        q, s, z = codes_scale_zero(qa)
        k, n = q.shape
        gs, g = group_index(qa)
        this = (b, -1 if g == 1 else gs, bool(qa.spec.symmetric))
        if scheme is None:
            scheme = this
        elif this != scheme:
            raise UnsupportedExportError(
                f"{lin.name}: scheme (bits, group, sym) = {this} differs from {scheme}; the GPTQ "
                "format has one scheme per model (use compressed-tensors)")
        if b not in (2, 3, 4, 8) or k % 32 or n % 32:
            raise UnsupportedExportError(
                f"{lin.name}: GPTQ needs 2/3/4/8 bits and in/out features divisible by 32 "
                f"(got {b} bits, [{k}, {n}])")
        if (z < 1).any():
            raise UnsupportedExportError(
                f"{lin.name}: a zero point of 0 cannot be stored in GPTQ v1 (it stores zero - 1); "
                "use compressed-tensors")
        tensors[f"{lin.name}.qweight"] = np.ascontiguousarray(pack_rows(q.T, b).T)
        tensors[f"{lin.name}.qzeros"] = pack_rows(z - 1, b)
        tensors[f"{lin.name}.scales"] = s.astype(np.float16)
        tensors[f"{lin.name}.g_idx"] = (np.arange(k) // gs).astype(np.int32)
    b, gs, sym = scheme
    qc = {"quant_method": "gptq", "bits": b, "group_size": gs, "desc_act": False, "sym": sym,
          "true_sequential": True, "static_groups": False, "damp_percent": 0.01,
          "checkpoint_format": "gptq", "pack_dtype": "int32",
          "meta": {"quantizer": ["jaxquant"]}}
    config = hf_config(cfg, dtype=dtype, **flags) | {"quantization_config": qc}
    return _write(out, tensors, config)
