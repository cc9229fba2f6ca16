"""Import quantized Hugging Face checkpoints (GPTQ v1/v2, AWQ GEMM, compressed-tensors
pack-quantized) into packed :class:`~jaxquant.core.qarray.QArray` kernels without dequantizing:
the codes, scales and zero points are re-laid into jaxquant's packing, so the model runs through
jaxquant's kernels and ``Ŵ = S (Q − Z)`` is exactly the checkpoint's.

Every field is checked against the tensors: bits and group size against ``qweight`` /
``weight_packed`` / ``scales`` shapes, ``g_idx`` against contiguous groups, the zero points'
range; a mismatch names the field and the tensor.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from jaxquant.core import packing
from jaxquant.core.qarray import QArray
from jaxquant.core.spec import QuantSpec
from jaxquant.export.bits import unpack_rows, words_per_row
from jaxquant.export.decoder import GROUPS
from jaxquant.models.common.hf_weights import read_tensor


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint whose config and tensors disagree, or a scheme not imported."""


def _qarray(q_kn: np.ndarray, s_gn: np.ndarray, z_gn: np.ndarray | None, bits: int, gs: int,
            sym: bool) -> QArray:
    k = q_kn.shape[0]
    spec = QuantSpec(bits=bits, group_size=-1 if gs == k else gs, symmetric=sym)
    return QArray(packed=packing.pack(jnp.asarray(q_kn), bits),
                  scale=jnp.asarray(s_gn, jnp.float32),
                  zero=None if z_gn is None else jnp.asarray(z_gn, jnp.uint8),
                  spec=spec, in_features=int(k), dtype="float32")


def _get(src, name, where):
    if name not in src:
        raise QuantizedCheckpointError(f"{where}: checkpoint is missing tensor {name!r}")
    return np.asarray(src.get(name))


def gptq_linear(src, prefix: str, qc: dict, k: int, n: int, where: str) -> QArray:
    """A GPTQ linear (``qweight``/``qzeros``/``scales``/``g_idx``) as a QArray."""
    bits = qc.get("bits")
    if bits not in (2, 3, 4, 8):
        raise QuantizedCheckpointError(f"{where}: quantization_config.bits={bits!r}: expected "
                                       "2, 3, 4 or 8")
    gs = qc.get("group_size", -1)
    gs = k if gs in (-1, None) else int(gs)
    if k % gs:
        raise QuantizedCheckpointError(f"{where}: quantization_config.group_size={gs} does not "
                                       f"divide in_features {k} of {prefix}")
    g = k // gs
    qweight = _get(src, f"{prefix}.qweight", where)
    if qweight.shape != (words_per_row(k, bits), n):
        raise QuantizedCheckpointError(
            f"{where}: {prefix}.qweight has shape {qweight.shape}, quantization_config.bits="
            f"{bits} implies {(words_per_row(k, bits), n)}")
    scales = _get(src, f"{prefix}.scales", where).astype(np.float32)
    if scales.shape != (g, n):
        raise QuantizedCheckpointError(
            f"{where}: {prefix}.scales has shape {scales.shape}, quantization_config.group_size="
            f"{qc.get('group_size')} implies {(g, n)}")
    qzeros = _get(src, f"{prefix}.qzeros", where)
    z = unpack_rows(qzeros, bits, n).astype(np.int32)  # [G, N]
    fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
    if fmt not in ("gptq", "gptq_v2"):
        raise QuantizedCheckpointError(f"{where}: quantization_config.checkpoint_format={fmt!r}: "
                                       "expected 'gptq' or 'gptq_v2'")
    if fmt == "gptq":
        z = z + 1  # v1 stores zero - 1
    if (z > (1 << bits) - 1).any():
        raise QuantizedCheckpointError(f"{where}: {prefix}.qzeros decode outside [0, "
                                       f"{(1 << bits) - 1}] (checkpoint_format {fmt!r}?)")
    if f"{prefix}.g_idx" in src:
        g_idx = np.asarray(src.get(f"{prefix}.g_idx"))
        if not np.array_equal(g_idx, np.arange(k) // gs):
            raise QuantizedCheckpointError(
                f"{where}: {prefix}.g_idx is not contiguous groups (desc_act with permuted groups)"
                "; jaxquant's QArray stores contiguous groups; not imported")
    q = unpack_rows(qweight.T.copy(), bits, k).T  # [K, N]
    sym = bool(qc.get("sym", False)) and bool((z == (1 << (bits - 1))).all())
    return _qarray(q, scales, None if sym else z, bits, gs, sym)


# AutoAWQ GEMM: 8 int4 codes per int32 along the output axis, output column 8j + AWQ_ORDER[i] in
# nibble i (so nibble i holds column 8j + AWQ_ORDER[i]); qzeros likewise, stored as is.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _awq_unpack(packed: np.ndarray, n: int) -> np.ndarray:
    """``[R, n/8]`` int32 AWQ-packed -> ``[R, n]`` uint8 codes in column order."""
    p = packed.view(np.uint32)
    out = np.empty((p.shape[0], n), np.uint8)
    for i, col in enumerate(AWQ_ORDER):
        out[:, col::8] = (p >> np.uint32(4 * i)) & np.uint32(15)
    return out


def awq_linear(src, prefix: str, qc: dict, k: int, n: int, where: str) -> QArray:
    """An AutoAWQ GEMM linear (``qweight`` [in, out/8], ``qzeros`` [G, out/8], ``scales``
    [G, out]) as a QArray."""
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise QuantizedCheckpointError(f"{where}: quantization_config.bits={bits!r}: AWQ GEMM "
                                       "checkpoints are 4-bit")
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise QuantizedCheckpointError(f"{where}: quantization_config.version={version!r}: only "
                                       "the GEMM layout is imported")
    if not qc.get("zero_point", True):
        raise QuantizedCheckpointError(f"{where}: quantization_config.zero_point=false is not "
                                       "imported")
    gs = qc.get("group_size", qc.get("q_group_size", 128))
    gs = k if gs in (-1, None) else int(gs)
    if k % gs or n % 8:
        raise QuantizedCheckpointError(f"{where}: {prefix}: group_size={gs} must divide in "
                                       f"{k} and out {n} must be a multiple of 8")
    g = k // gs
    qweight = _get(src, f"{prefix}.qweight", where)
    if qweight.shape != (k, n // 8):
        raise QuantizedCheckpointError(f"{where}: {prefix}.qweight has shape {qweight.shape}, "
                                       f"quantization_config.bits=4 implies {(k, n // 8)}")
    scales = _get(src, f"{prefix}.scales", where).astype(np.float32)
    if scales.shape != (g, n):
        raise QuantizedCheckpointError(f"{where}: {prefix}.scales has shape {scales.shape}, "
                                       f"quantization_config.group_size={gs} implies {(g, n)}")
    qzeros = _get(src, f"{prefix}.qzeros", where)
    if qzeros.shape != (g, n // 8):
        raise QuantizedCheckpointError(f"{where}: {prefix}.qzeros has shape {qzeros.shape}, "
                                       f"expected {(g, n // 8)}")
    return _qarray(_awq_unpack(qweight, n), scales, _awq_unpack(qzeros, n), 4, gs, False)


def ct_linear(src, prefix: str, w: dict, k: int, n: int, where: str) -> QArray:
    """A compressed-tensors pack-quantized linear as a QArray."""
    bits = w.get("num_bits")
    if w.get("type", "int") != "int" or bits not in range(2, 9):
        raise QuantizedCheckpointError(f"{where}: weights num_bits={bits!r} type="
                                       f"{w.get('type')!r}: expected int, 2..8 bits")
    strategy = w.get("strategy")
    gs = w.get("group_size")
    if strategy == "channel" or gs in (None, -1):
        gs = k
    elif strategy != "group":
        raise QuantizedCheckpointError(f"{where}: weights strategy={strategy!r}: expected "
                                       "'group' or 'channel'")
    if k % gs:
        raise QuantizedCheckpointError(f"{where}: weights group_size={gs} does not divide "
                                       f"in_features {k} of {prefix}")
    if w.get("actorder") not in (None, "weight", "static"):
        raise QuantizedCheckpointError(f"{where}: weights actorder={w.get('actorder')!r} "
                                       "(permuted groups) is not imported")
    g = k // gs
    shape = _get(src, f"{prefix}.weight_shape", where)
    if tuple(int(x) for x in shape) != (n, k):
        raise QuantizedCheckpointError(f"{where}: {prefix}.weight_shape = {shape.tolist()}, the "
                                       f"model config implies {[n, k]}")
    packed = _get(src, f"{prefix}.weight_packed", where)
    if packed.shape != (n, words_per_row(k, bits)):
        raise QuantizedCheckpointError(
            f"{where}: {prefix}.weight_packed has shape {packed.shape}, num_bits={bits} implies "
            f"{(n, words_per_row(k, bits))}")
    scale = _get(src, f"{prefix}.weight_scale", where).astype(np.float32)
    if scale.shape != (n, g):
        raise QuantizedCheckpointError(f"{where}: {prefix}.weight_scale has shape {scale.shape}, "
                                       f"group_size={w.get('group_size')} implies {(n, g)}")
    q = unpack_rows(packed, bits, k).T  # [K, N] unsigned codes q + 2^(b-1)
    sym = bool(w.get("symmetric", True))
    if sym:
        z = None
    else:
        zp = _get(src, f"{prefix}.weight_zero_point", where)
        if zp.shape != (words_per_row(n, bits), g):
            raise QuantizedCheckpointError(
                f"{where}: {prefix}.weight_zero_point has shape {zp.shape}, expected "
                f"{(words_per_row(n, bits), g)}")
        z = unpack_rows(np.ascontiguousarray(zp.T), bits, n)  # [G, N]
    return _qarray(q, scale.T.copy(), z, bits, gs, sym)


def _ct_scheme_for(qc: dict, name: str, where: str) -> dict | None:
    import re

    def hit(t):
        return t == name or t == "Linear" or (t.startswith("re:") and re.match(t[3:], name))

    if any(hit(t) and t != "Linear" for t in qc.get("ignore", [])):
        return None
    for gname, grp in qc.get("config_groups", {}).items():
        if any(hit(t) for t in grp.get("targets", [])):
            fmt = grp.get("format", qc.get("format"))
            if fmt != "pack-quantized":
                raise QuantizedCheckpointError(f"{where}: config_groups.{gname}.format={fmt!r}: "
                                               "only 'pack-quantized' is imported")
            if grp.get("input_activations"):
                raise QuantizedCheckpointError(f"{where}: config_groups.{gname} quantizes "
                                               "activations; only weight-only schemes are imported")
            return grp["weights"]
    return None


def load_hf_quantized(path: str | os.PathLike):
    """A GPTQ or compressed-tensors checkpoint directory as a :class:`LoadedModel` with QArray
    kernels (dense tensors in float32)."""
    from jaxquant.models.common.decoder_spec import stack_or_list
    from jaxquant.models.common.hf_weights import _linear_shapes
    from jaxquant.models.common.safetensors_io import SafetensorsDir
    from jaxquant.models.loading import LoadedModel, config_from_hf

    path = os.fspath(path)
    where = os.path.join(path, "config.json")
    with open(where) as f:
        cfg_dict = json.load(f)
    qc = cfg_dict.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method not in ("gptq", "awq", "compressed-tensors"):
        raise QuantizedCheckpointError(f"{where}: quantization_config.quant_method={method!r}: "
                                       "imported are 'gptq', 'awq' and 'compressed-tensors'")
    if method == "compressed-tensors" and qc.get("quantization_status", "compressed") \
            != "compressed":
        raise QuantizedCheckpointError(f"{where}: quantization_config.quantization_status="
                                       f"{qc.get('quantization_status')!r}: expected 'compressed'")
    base = {k: v for k, v in cfg_dict.items() if k != "quantization_config"}
    cfg = config_from_hf(base, source=where)
    src = SafetensorsDir(path)
    shapes = _linear_shapes(cfg)
    d = cfg.hidden_size
    blocks = []
    for i in range(cfg.num_layers):
        pre = f"model.layers.{i}."
        bp: dict = {"self_attn": {}, "mlp": {}}
        for group, names in GROUPS.items():
            for name in names:
                prefix = f"{pre}{group}.{name}"
                n, k = shapes[name]
                if method == "gptq":
                    kern = gptq_linear(src, prefix, qc, k, n, where)
                elif method == "awq":
                    kern = awq_linear(src, prefix, qc, k, n, where)
                else:
                    w = _ct_scheme_for(qc, prefix, where)
                    kern = (ct_linear(src, prefix, w, k, n, where) if w is not None else
                            jnp.asarray(read_tensor(src, f"{prefix}.weight", (n, k),
                                                    np.float32).T))
                leaf = {"kernel": kern}
                if f"{prefix}.bias" in src:
                    leaf["bias"] = jnp.asarray(read_tensor(src, f"{prefix}.bias", (n,),
                                                           np.float32))
                bp[group][name] = leaf
        for norm in ("input_layernorm", "post_attention_layernorm"):
            bp[norm] = {"scale": jnp.asarray(read_tensor(src, f"{pre}{norm}.weight", (d,),
                                                         np.float32))}
        if cfg.qk_norm:
            for nn in ("q_norm", "k_norm"):
                bp["self_attn"][nn] = {"scale": jnp.asarray(read_tensor(
                    src, f"{pre}self_attn.{nn}.weight", (cfg.head_dim,), np.float32))}
        blocks.append(bp)
    params = {"embed_tokens": {"embedding": jnp.asarray(read_tensor(
                  src, "model.embed_tokens.weight", (cfg.vocab_size, d), np.float32))},
              "norm": {"scale": jnp.asarray(read_tensor(src, "model.norm.weight", (d,),
                                                        np.float32))},
              "layers": stack_or_list(blocks)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": jnp.asarray(read_tensor(
            src, "lm_head.weight", (cfg.vocab_size, d), np.float32).T)}
    return LoadedModel(cfg, params, path, src)


def is_hf_quantized_dir(path) -> bool:
    f = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(f):
        return False
    try:
        with open(f) as fh:
            return bool(json.load(fh).get("quantization_config"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False
