"""The decoder block (Llama, Qwen2, Qwen3) as a calibration
:class:`~jaxquant.models.blockspec.BlockSpec`,
and its model adapters over a checkpoint (streaming) or over parameters in memory.

Stages, in true-sequential order (see :mod:`jaxquant.models.blockspec`)::

    attn_in  [q_proj, k_proj, v_proj]  reads h   = input_layernorm(x)          producer: that norm
    attn_out [o_proj]                  reads ctx = attention(q, k, v)          producer: v_proj*
    mlp_in   [gate_proj, up_proj]      reads h   = post_attention_layernorm(x) producer: that norm
    mlp_out  [down_proj]               reads a   = silu(gate h) ⊙ up h          producer: up_proj

(* v_proj only without grouped KV heads: then o_proj's input channel j is v_proj's output j.)

The stage functions are the decoder's own layers (:mod:`jaxquant.models.common.layers`) cut at the
linears; ``finish`` after the last stage equals :func:`~jaxquant.models.common.decoder.block_apply`.
"""

from __future__ import annotations

import functools
import hashlib
import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxquant.models.blockspec import BlockSpec, Producer, Stage
from jaxquant.models.common.config import DecoderConfig
from jaxquant.models.common.decoder import embed, layer_params
from jaxquant.models.common.hf_weights import block_params_from_source, check_tensor, read_tensor
from jaxquant.models.common.layers import (
    CAUSAL_BLOCKS,
    RMSNorm,
    attention_mask,
    grouped_attention,
    heads_with_rope,
)
from jaxquant.nn.linear import linear

ATTN = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj")
MLP = ("mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
LINEARS = ATTN + MLP


def _lin(p, path, x):
    g, n = path.split("/")
    d = p[g][n]
    return linear(x, d["kernel"], d.get("bias"))


def _norm(cfg, p, x):
    return RMSNorm(cfg.rms_norm_eps, cfg.norm_bias).apply({"params": p}, x)


@functools.lru_cache(maxsize=32)
def decoder_block_spec(cfg: DecoderConfig) -> BlockSpec:
    """The block spec of a Llama / Qwen2 / Qwen3 decoder with config ``cfg``."""

    def attn_in(p, s, batch):
        return {"x": s["x"], "h": _norm(cfg, p["input_layernorm"], s["x"])}

    def attn_out(p, s, batch):
        h, pos = s["h"], batch["positions"]
        q, k, v = (_lin(p, path, h) for path in ATTN[:3])
        qn = kn = None
        if cfg.qk_norm:
            qn = functools.partial(_norm_plain, cfg, p["self_attn"]["q_norm"])
            kn = functools.partial(_norm_plain, cfg, p["self_attn"]["k_norm"])
        q, k, v = heads_with_rope(cfg, q, k, v, pos, qn, kn)
        idx = jnp.broadcast_to(jnp.arange(h.shape[1], dtype=jnp.int32), pos.shape)
        mask = attention_mask(idx, idx, None, causal=cfg.causal)
        ctx = grouped_attention(q, k, v, mask, cfg.num_kv_heads,
                                causal_blocks=CAUSAL_BLOCKS if cfg.causal else 1)
        return {"x": s["x"], "ctx": ctx.astype(h.dtype)}

    def mlp_in(p, s, batch):
        x = s["x"] + _lin(p, "self_attn/o_proj", s["ctx"])
        return {"x": x, "h": _norm(cfg, p["post_attention_layernorm"], x)}

    def mlp_out(p, s, batch):
        h = s["h"]
        a = jax.nn.silu(_lin(p, "mlp/gate_proj", h)) * _lin(p, "mlp/up_proj", h)
        return {"x": s["x"], "a": a}

    def finish(p, s, batch):
        return {"x": s["x"] + _lin(p, "mlp/down_proj", s["a"])}

    # o_proj's input channel j is v_proj's output channel j only without grouped KV heads
    v_fold = Producer("linear", ("self_attn/v_proj",)) if cfg.num_kv_heads == cfg.num_heads \
        else None
    return BlockSpec(
        stages=(
            Stage("attn_in", ATTN[:3], "h", attn_in, Producer("norm", ("input_layernorm",))),
            Stage("attn_out", ATTN[3:], "ctx", attn_out, v_fold),
            Stage("mlp_in", MLP[:2], "h", mlp_in, Producer("norm", ("post_attention_layernorm",))),
            Stage("mlp_out", MLP[2:], "a", mlp_out,
                  Producer("linear", ("mlp/up_proj",), "gated_mlp")),
        ),
        finish=finish,
        linears=LINEARS,
        batch_fields=("positions",),
        residual_writers=("self_attn/o_proj", "mlp/down_proj"),
    )


def _norm_plain(cfg, p, x):
    return RMSNorm(cfg.rms_norm_eps).apply({"params": p}, x)


# ---------------------------------------------------------------------------- batches
def decoder_batch(cfg: DecoderConfig, calib, *, n_samples: int, seqlen: int) -> dict:
    """``{"tokens", "positions"[, "sample_weight"]}`` from token ids ``[n, T]`` or a dict with
    ``tokens`` (and optional ``positions`` / ``sample_weight``), cut to the recipe's
    ``n_samples x seqlen``."""
    fields = dict(calib) if isinstance(calib, dict) else {"tokens": calib}
    if "tokens" not in fields:
        raise ValueError(f"calibration batch: a decoder needs the field 'tokens' [n, T]; got "
                         f"fields {sorted(fields)}")
    tokens = np.asarray(fields.pop("tokens"))
    if tokens.ndim != 2:
        raise ValueError(f"calibration tokens must be [n_samples, seqlen], got {tokens.shape}")
    if tokens.shape[0] < n_samples or tokens.shape[1] < seqlen:
        raise ValueError(
            f"calibration data has {tokens.shape[0]} x {tokens.shape[1]} tokens, shorter than the "
            f"recipe asks for ({n_samples} x {seqlen})")
    tokens = tokens[:n_samples, :seqlen]
    if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
        raise ValueError(f"calibration token ids must lie in [0, {cfg.vocab_size}); got "
                         f"[{tokens.min()}, {tokens.max()}]")
    out = {"tokens": tokens.astype(np.int32)}
    pos = fields.pop("positions", None)
    out["positions"] = (np.broadcast_to(np.arange(seqlen, dtype=np.int32), tokens.shape).copy()
                        if pos is None else np.asarray(pos)[:n_samples, :seqlen].astype(np.int32))
    if "sample_weight" in fields:
        w = np.asarray(fields.pop("sample_weight"), np.float32)[:n_samples]
        if w.shape != (n_samples,) or not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError(f"calibration batch field 'sample_weight' must be [{n_samples}] "
                             "finite and >= 0")
        out["sample_weight"] = w
    if fields:
        raise ValueError(f"calibration batch: unknown field(s) {sorted(fields)} for a decoder "
                         "(known: tokens, positions, sample_weight)")
    return out


# ---------------------------------------------------------------------------- adapters
_EMBED, _NORM, _HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class _DecoderAdapter:
    def __init__(self, cfg: DecoderConfig):
        self.config = cfg
        self.spec = decoder_block_spec(cfg)
        self.num_blocks = cfg.num_layers

    def make_batch(self, calib, *, n_samples: int, seqlen: int) -> dict:
        return decoder_batch(self.config, calib, n_samples=n_samples, seqlen=seqlen)

    # the model's last norm (D²Quant's final DAC)
    def final_norm(self, x, *, gain=None):
        """The last RMSNorm's output for the stream ``x`` ``[..., D]`` (its gain: the model's, or
        ``gain``), float32."""
        g = self._final_norm_gain() if gain is None else gain
        return RMSNorm(self.config.rms_norm_eps).apply(
            {"params": {"scale": jnp.asarray(g, jnp.float32)}}, x.astype(jnp.float32))

    def add_final_norm_bias(self, params: dict, mu) -> dict:
        norm = dict(params["norm"])
        norm["bias"] = jnp.asarray(norm.get("bias", 0.0), jnp.float32) + jnp.asarray(mu)
        return {**params, "norm": norm}

    # residual rotation (jaxquant.models.rotation)
    @property
    def stream_dim(self) -> int:
        return self.config.hidden_size

    def rotated_config(self) -> DecoderConfig:
        return self.config.replace(tie_word_embeddings=False)  # the head gets the final norm

    def rotate_top(self, params: dict, Q) -> dict:
        """Embedding rows ``E Q``; the final norm's gain fused into an (untied) head
        ``Qᵀ diag(g) W_head``; the final norm's gain set to 1."""
        if "bias" in params["norm"]:
            raise ValueError("rotation: the final norm 'norm' has a bias, which cannot be fused "
                             "into the LM head")
        hi = jax.lax.Precision.HIGHEST
        E = jnp.asarray(params["embed_tokens"]["embedding"], jnp.float32)
        g = jnp.asarray(params["norm"]["scale"], jnp.float32)
        W = E.T if "lm_head" not in params else jnp.asarray(params["lm_head"]["kernel"],
                                                             jnp.float32)
        return {**params, "embed_tokens": {"embedding": jnp.matmul(E, Q, precision=hi)},
                "norm": {"scale": jnp.ones_like(g)},
                "lm_head": {"kernel": jnp.matmul(Q.T, g[:, None] * W, precision=hi)}}


class DecoderSourceAdapter(_DecoderAdapter):
    """A decoder streamed from a checkpoint source (:class:`SafetensorsDir`, :class:`GGUFSource`):
    one block's tensors are read at a time, and the ``[V, D]`` table only when needed."""

    def __init__(self, cfg: DecoderConfig, src, cfg_dict: dict):
        super().__init__(cfg)
        self.src, self.cfg_dict = src, cfg_dict

    def _top_tensors(self) -> dict[str, tuple[int, ...]]:
        v, d = self.config.vocab_size, self.config.hidden_size
        out = {_EMBED: (v, d), _NORM: (d,)}
        if not self.config.tie_word_embeddings:
            out[_HEAD] = (v, d)
        return out

    def check(self) -> None:
        from jaxquant.models.common.hf_weights import check_layout

        check_layout(self.config, self.src, self.config.family)
        for name, shape in self._top_tensors().items():
            check_tensor(self.src, name, shape)

    def read_block(self, b: int) -> dict:
        return block_params_from_source(self.config, self.src, b, np.float32)

    def _final_norm_gain(self):
        return read_tensor(self.src, _NORM, (self.config.hidden_size,), np.float32)

    def first_input(self, batch: dict):
        tokens = np.asarray(batch["tokens"])
        if hasattr(self.src, "get_rows"):  # only the rows of the tokens at hand
            check_tensor(self.src, _EMBED, self._top_tensors()[_EMBED])
            rows, inv = np.unique(tokens, return_inverse=True)
            table = np.asarray(self.src.get_rows(_EMBED, rows), np.float32)
            if not np.all(np.isfinite(table)):
                raise ValueError(f"{_EMBED}: NaN/Inf in the embedding rows of the calibration "
                                 "tokens")
            return jnp.asarray(table)[jnp.asarray(inv.reshape(tokens.shape))]
        table = read_tensor(self.src, _EMBED, self._top_tensors()[_EMBED], np.float32)
        return embed({"embed_tokens": {"embedding": jnp.asarray(table)}}, jnp.asarray(tokens))

    def top_parts(self) -> tuple[list, str]:
        """``([(key, load)], blocks key)``: the params outside the blocks, one top-level entry at
        a time (``load()`` reads it), each tensor in the checkpoint's own float dtype (bf16
        stays bf16: exact, half of float32; the loader upcasts). Lets a caller write a model
        whose tables alone exceed its memory budget one table at a time."""
        sh = self._top_tensors()

        def dtype_of(name):
            dt = np.dtype(self.src.get_rows(name, [0]).dtype) if hasattr(self.src, "get_rows") \
                else np.dtype(np.float32)
            return dt if dt in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16),
                                np.dtype(np.float16)) else np.dtype(np.float32)

        def rd(name):
            return read_tensor(self.src, name, sh[name], dtype_of(name))

        def head():  # [V, D] -> [D, V], a slab of rows at a time (never two copies)
            check_tensor(self.src, _HEAD, sh[_HEAD])
            v, d = sh[_HEAD]
            if not hasattr(self.src, "get_rows"):
                return {"kernel": rd(_HEAD).T.copy()}
            out = np.empty((d, v), dtype_of(_HEAD))
            for r0 in range(0, v, 8192):
                rows = np.arange(r0, min(v, r0 + 8192))
                out[:, r0:r0 + rows.size] = self.src.get_rows(_HEAD, rows).T
            return {"kernel": out}

        parts = [("embed_tokens", lambda: {"embedding": rd(_EMBED)}),
                 ("norm", lambda: {"scale": rd(_NORM)})]
        if _HEAD in sh:
            parts.append(("lm_head", head))
        return parts, "layers"

    def assemble(self, blocks: list) -> dict:
        t = {n: jnp.asarray(read_tensor(self.src, n, s, np.float32))
             for n, s in self._top_tensors().items()}
        top = {"embed_tokens": {"embedding": t[_EMBED]}, "norm": {"scale": t[_NORM]}}
        if _HEAD in t:
            top["lm_head"] = {"kernel": t[_HEAD].T}
        return {**top, "layers": stack_or_list(blocks)}

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(self.cfg_dict, sort_keys=True, default=str).encode())
        for name in sorted(self.src.keys()):
            h.update(f"{name}:{tuple(self.src.shape(name))}".encode())
        first = "model.layers.0.self_attn.q_proj.weight"
        if first in self.src:  # content, cheaply: a strided sample of one linear
            h.update(np.ascontiguousarray(np.asarray(self.src.get(first)).ravel()[::97]).tobytes())
        return h.hexdigest()[:16]


class DecoderParamsAdapter(_DecoderAdapter):
    """A decoder whose (fp) parameters are in memory."""

    def __init__(self, cfg: DecoderConfig, params: dict):
        super().__init__(cfg)
        self.params = params

    def check(self) -> None:
        for key in ("embed_tokens", "norm", "layers"):
            if key not in self.params:
                raise ValueError(f"model params: missing {key!r}")

    def read_block(self, b: int) -> dict:
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), layer_params(self.params, b))

    def _final_norm_gain(self):
        return self.params["norm"]["scale"]

    def first_input(self, batch: dict):
        return embed(self.params, jnp.asarray(batch["tokens"]))

    def assemble(self, blocks: list) -> dict:
        return {**{k: v for k, v in self.params.items() if k != "layers"},
                "layers": stack_or_list(blocks)}

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr(self.config).encode())
        w = layer_params(self.params, 0)["self_attn"]["q_proj"]["kernel"]
        h.update(np.ascontiguousarray(np.asarray(w, np.float32).ravel()[::97]).tobytes())
        return h.hexdigest()[:16]


def stack_or_list(blocks: list):
    """Stack blocks into the scan layout when their structures agree, else keep a list."""
    if len({jax.tree.structure(b) for b in blocks}) == 1:
        return jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return list(blocks)
