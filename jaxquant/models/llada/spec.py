"""The LLaDA block as a calibration :class:`~jaxquant.models.blockspec.BlockSpec`, its model
adapter, and masked calibration batches (the mask ratio carried like a DiT's timestep).

Stages, in true-sequential order::

    attn_in  [q_proj, k_proj, v_proj]  reads h   = attn_norm(x)                 producer: that norm
    attn_out [attn_out]                reads ctx = attention(q, k, v)           producer: v_proj*
    mlp_in   [ff_proj, up_proj]        reads h   = ff_norm(x + attn_out(ctx))   producer: that norm
    mlp_out  [ff_out]                  reads a   = silu(ff_proj h) ⊙ up_proj h   producer: up_proj

(* only without grouped KV heads.) Attention is bidirectional, RoPE at the batch's ``positions``;
``finish`` after the last stage equals :func:`jaxquant.models.llada.model.block_apply`.

A dLLM's input is a *masked* sequence: :func:`masked_calibration_batch` masks text windows at
several mask ratios (each sample at one ratio ``t``, like one diffusion timestep) and records the
ratio per sample (``mask_ratio``) and its index (``group``), so the engine keeps per-ratio
statistics and a recipe may weight them (``group_weights``, as AdaTSQ does for timesteps).
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models.blockspec import BlockSpec, Producer, Stage
from jaxquant.models.common.layers import grouped_attention
from jaxquant.models.llada.config import LLaDAConfig
from jaxquant.models.llada.model import (
    block_params,
    embed,
    key_mask,
    qkv,
    rms_norm,
)
from jaxquant.nn.linear import apply_linear

ATTN = ("q_proj", "k_proj", "v_proj", "attn_out")
MLP = ("ff_proj", "up_proj", "ff_out")
LINEARS = ATTN + MLP
_FIELDS = ("tokens", "positions", "mask_ratio", "group", "sample_weight")


@functools.lru_cache(maxsize=16)
def llada_block_spec(cfg: LLaDAConfig) -> BlockSpec:
    """The block spec of a LLaDA model with config ``cfg``."""

    def attn_in(p, s, batch):
        return {"x": s["x"], "h": rms_norm(s["x"], p["attn_norm"], cfg.rms_norm_eps)}

    def attn_out(p, s, batch):
        h, pos = s["h"], batch["positions"]
        q, k, v = qkv(cfg, p, h, pos)
        mask = key_mask(None, h.shape[0], h.shape[1])
        ctx = grouped_attention(q, k, v, mask, cfg.n_kv_heads)
        return {"x": s["x"], "ctx": ctx.astype(h.dtype)}

    def mlp_in(p, s, batch):
        x = s["x"] + apply_linear(s["ctx"], p["attn_out"])
        return {"x": x, "h": rms_norm(x, p["ff_norm"], cfg.rms_norm_eps)}

    def mlp_out(p, s, batch):
        h = s["h"]
        return {"x": s["x"], "a": jax.nn.silu(apply_linear(h, p["ff_proj"]))
                * apply_linear(h, p["up_proj"])}

    def finish(p, s, batch):
        return {"x": s["x"] + apply_linear(s["a"], p["ff_out"])}

    v_fold = Producer("linear", ("v_proj",)) if cfg.n_kv_heads == cfg.n_heads else None
    return BlockSpec(
        stages=(
            Stage("attn_in", ATTN[:3], "h", attn_in, Producer("norm", ("attn_norm",))),
            Stage("attn_out", ATTN[3:], "ctx", attn_out, v_fold),
            Stage("mlp_in", MLP[:2], "h", mlp_in, Producer("norm", ("ff_norm",))),
            Stage("mlp_out", MLP[2:], "a", mlp_out, Producer("linear", ("up_proj",),
                                                              "gated_mlp")),
        ),
        finish=finish,
        linears=LINEARS,
        batch_fields=("positions",),
        residual_writers=("attn_out", "ff_out"),
    )


# ---------------------------------------------------------------------------- batches
def masked_calibration_batch(windows, mask_ratios, *, mask_id: int, seed: int = 0) -> dict:
    """Masked calibration inputs: window ``i`` ``[n, T]`` is masked at ratio
    ``mask_ratios[i % R]`` (each token independently, as the forward process does).

    Returns ``{"tokens", "positions", "mask_ratio" [n], "group" [n] (the ratio's index)}``."""
    windows = np.asarray(windows, np.int32)
    ratios = np.asarray(mask_ratios, np.float32).reshape(-1)
    if windows.ndim != 2:
        raise ValueError(f"windows must be [n, T] token ids, got shape {windows.shape}")
    if ratios.size == 0 or not np.all((ratios > 0) & (ratios <= 1)):
        raise ValueError(f"mask_ratios must be in (0, 1], got {ratios.tolist()}")
    n, t = windows.shape
    group = np.arange(n) % ratios.size
    r = ratios[group]
    u = np.random.default_rng(seed).random((n, t))
    tokens = np.where(u < r[:, None], mask_id, windows).astype(np.int32)
    return {"tokens": tokens,
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (n, t)).copy(),
            "mask_ratio": r.astype(np.float32), "group": group.astype(np.int32)}


def llada_batch(cfg: LLaDAConfig, calib, *, n_samples: int, seqlen: int) -> dict:
    """Validated batch fields from token ids ``[n, T]`` (used as given, e.g. already masked) or a
    dict with ``tokens`` and optional ``positions`` / ``mask_ratio`` / ``group`` /
    ``sample_weight``, cut to ``n_samples x seqlen``."""
    fields = dict(calib) if isinstance(calib, dict) else {"tokens": calib}
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise ValueError(f"calibration batch: unknown field(s) {unknown} for LLaDA (known: "
                         f"{', '.join(_FIELDS)})")
    if "tokens" not in fields:
        raise ValueError("calibration batch: LLaDA needs the field 'tokens' [n, T]")
    tokens = np.asarray(fields["tokens"])
    if tokens.ndim != 2 or tokens.shape[0] < n_samples or tokens.shape[1] < seqlen:
        raise ValueError(f"calibration tokens have shape {tokens.shape}; the recipe asks for "
                         f"{n_samples} x {seqlen}")
    tokens = tokens[:n_samples, :seqlen].astype(np.int32)
    if tokens.min() < 0 or tokens.max() >= cfg.embedding_size:
        raise ValueError(f"calibration token ids must lie in [0, {cfg.embedding_size}); got "
                         f"[{tokens.min()}, {tokens.max()}]")
    out = {"tokens": tokens}
    pos = fields.get("positions")
    out["positions"] = (np.broadcast_to(np.arange(seqlen, dtype=np.int32), tokens.shape).copy()
                        if pos is None else np.asarray(pos)[:n_samples, :seqlen].astype(np.int32))
    for name, dtype in (("mask_ratio", np.float32), ("group", np.int32),
                        ("sample_weight", np.float32)):
        if name in fields:
            v = np.asarray(fields[name])[:n_samples]
            if v.shape != (n_samples,) or not np.all(np.isfinite(v)) or np.any(v < 0):
                raise ValueError(f"calibration batch field {name!r} must be [{n_samples}] "
                                 "finite and >= 0")
            out[name] = v.astype(dtype)
    return out


# ---------------------------------------------------------------------------- adapter
class LLaDAAdapter:
    """A LLaDA model in memory (fp params) for :func:`jaxquant.calibration.engine.calibrate`."""

    def __init__(self, model):
        self.model = model
        self.config: LLaDAConfig = model.config
        self.params = model.params
        self.spec = llada_block_spec(self.config)
        self.num_blocks = self.config.n_layers

    def check(self) -> None:
        for key in ("wte", "ln_f", "blocks"):
            if key not in self.params:
                raise ValueError(f"LLaDA params: missing {key!r}")

    def read_block(self, b: int) -> dict:
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), block_params(self.params, b))

    def make_batch(self, calib, *, n_samples: int, seqlen: int) -> dict:
        return llada_batch(self.config, calib, n_samples=n_samples, seqlen=seqlen)

    def first_input(self, batch: dict):
        return embed(self.params, jnp.asarray(batch["tokens"]))

    def assemble(self, blocks: list) -> dict:
        from jaxquant.models.common.decoder_spec import stack_or_list

        return {**{k: v for k, v in self.params.items() if k != "blocks"},
                "blocks": stack_or_list(blocks)}

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr(self.config).encode())
        w = block_params(self.params, 0)["q_proj"]["kernel"]
        h.update(np.ascontiguousarray(np.asarray(w, np.float32).ravel()[::97]).tobytes())
        return h.hexdigest()[:16]


__all__ = ["LINEARS", "LLaDAAdapter", "llada_batch", "llada_block_spec",
           "masked_calibration_batch"]
