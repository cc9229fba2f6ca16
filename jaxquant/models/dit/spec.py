"""The DiT block (``DiTTransformer2DModel``) as a calibration
:class:`~jaxquant.models.blockspec.BlockSpec`, and its model adapter over a loaded DiT.

Stages, in true-sequential order (each linear reads ``state[input]``)::

    t_in     [norm1/emb/timestep_embedder/linear_1]  reads tsin = sinusoid(t)        [n, 256]
    t_out    [norm1/emb/timestep_embedder/linear_2]  reads th   = silu(linear_1)     [n, D]
    ada      [norm1/linear]                          reads c    = silu(temb + table[y]) [n, D]
    attn_in  [attn1/to_q, to_k, to_v]                reads h    = LN(x)(1+scale)+shift [n, T, D]
    attn_out [attn1/to_out.0]                        reads ctx  = attention(q, k, v)
    mlp_in   [ff/net.0/proj]                         reads h    = LN(x + g·o)(1+scale')+shift'
    mlp_out  [ff/net.2]                              reads a    = gelu(net.0)
    finish                                           x + g'·net.2(a)

Producers (for exact folds: SmoothQuant's 1/s, AWQ's scales): the adaLN modulation ``norm1/linear``
(chunks shift/scale 0/1 before attention, 3/4 before the MLP) and ``to_v`` for ``to_out.0``; the
conditioning linears and ``ff/net.2`` have none (SmoothQuant keeps ``act_scale`` there).

The first three stages are the block's conditioning path (per sample, not per token): recipes give
them their own rules (by default 8-bit). The batch is a pytree of per-sample fields: ``latents``
``[n, C, H, W]`` (the sampler's ``x_t``), ``timesteps`` ``[n]``, ``class_labels`` ``[n]``, and
optionally ``group`` ``[n]`` (a timestep group, for per-timestep statistics) and
``sample_weight`` ``[n]``. The patch embedding and the output layer stay in floating point.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models.blockspec import BlockSpec, Producer, Stage
from jaxquant.models.dit.config import DiTConfig
from jaxquant.models.dit.layers import (
    attention,
    gelu,
    layer_norm,
    lin,
    modulate,
    timestep_embedding,
)
from jaxquant.models.dit.model import (
    ADA_EPS,
    ATTN1,
    DIT_BLOCK_LINEARS,
    FF,
    block_params,
    dit_embed,
    num_blocks,
)

T1, T2, ADA = DIT_BLOCK_LINEARS[:3]
_FIELDS = ("latents", "timesteps", "class_labels", "group", "sample_weight")


@functools.lru_cache(maxsize=16)
def dit_block_spec(cfg: DiTConfig) -> BlockSpec:
    """The calibration block spec of a class-conditional DiT with config ``cfg``."""
    if cfg.kind != "dit":
        raise ValueError(f"dit_block_spec: a {cfg.kind!r} model is not a class-conditional DiT")

    def t_in(p, s, batch):
        return {"x": s["x"], "tsin": timestep_embedding(batch["timesteps"], 256,
                                                        flip_sin_to_cos=True,
                                                        downscale_freq_shift=1.0)}

    def t_out(p, s, batch):
        return {"x": s["x"], "th": jax.nn.silu(lin(p, T1, s["tsin"]))}

    def ada(p, s, batch):
        table = p["norm1"]["emb"]["class_embedder"]["embedding_table"]["embedding"]
        y = jnp.take(table, batch["class_labels"].astype(jnp.int32), axis=0)
        return {"x": s["x"], "c": jax.nn.silu(lin(p, T2, s["th"]) + y.astype(jnp.float32))}

    def attn_in(p, s, batch):
        mod = lin(p, ADA, s["c"])[:, None, :]  # [n, 1, 6D]
        shift, scale = mod[..., :cfg.hidden_size], mod[..., cfg.hidden_size:2 * cfg.hidden_size]
        return {"x": s["x"], "mod": mod, "h": modulate(layer_norm(s["x"], ADA_EPS), shift, scale)}

    def attn_out(p, s, batch):
        h = s["h"]
        ctx = attention(lin(p, ATTN1[0], h), lin(p, ATTN1[1], h), lin(p, ATTN1[2], h),
                        cfg.num_heads)
        return {"x": s["x"], "mod": s["mod"], "ctx": ctx}

    def mlp_in(p, s, batch):
        d = cfg.hidden_size
        _, _, gate, shift, scale, _ = (s["mod"][..., i * d:(i + 1) * d] for i in range(6))
        x = s["x"] + gate * lin(p, ATTN1[3], s["ctx"])
        h = modulate(layer_norm(x, cfg.norm_eps, p.get("norm3")), shift, scale)
        return {"x": x, "mod": s["mod"], "h": h}

    def mlp_out(p, s, batch):
        return {"x": s["x"], "mod": s["mod"], "a": gelu(lin(p, FF[0], s["h"]), cfg.activation_fn)}

    def finish(p, s, batch):
        gate = s["mod"][..., 5 * cfg.hidden_size:]
        return {"x": s["x"] + gate * lin(p, FF[1], s["a"])}

    return BlockSpec(
        stages=(
            Stage("t_in", (T1,), "tsin", t_in),
            Stage("t_out", (T2,), "th", t_out),
            Stage("ada", (ADA,), "c", ada),
            Stage("attn_in", ATTN1[:3], "h", attn_in, Producer("modulation", (ADA,),
                                                               chunks=(6, 0, 1))),
            Stage("attn_out", ATTN1[3:], "ctx", attn_out, Producer("linear", (ATTN1[2],))),
            Stage("mlp_in", FF[:1], "h", mlp_in, Producer("modulation", (ADA,),
                                                          chunks=(6, 3, 4))),
            Stage("mlp_out", FF[1:], "a", mlp_out),
        ),
        finish=finish,
        linears=DIT_BLOCK_LINEARS,
        batch_fields=("timesteps", "class_labels"),
    )


def dit_batch(cfg: DiTConfig, calib, *, n_samples: int) -> dict:
    """Validate a DiT calibration batch ``{"latents", "timesteps", "class_labels", ...}`` and take
    its first ``n_samples`` samples."""
    if not isinstance(calib, dict):
        raise ValueError("DiT calibration data must be a dict with 'latents' [n, C, H, W], "
                         "'timesteps' [n] and 'class_labels' [n] (see "
                         "jaxquant.diffusion.calibration.trajectory_batch)")
    unknown = sorted(set(calib) - set(_FIELDS))
    if unknown:
        raise ValueError(f"calibration batch: unknown field(s) {unknown} for a DiT (known: "
                         f"{list(_FIELDS)})")
    for k in ("latents", "timesteps", "class_labels"):
        if k not in calib:
            raise ValueError(f"calibration batch: a DiT needs the field {k!r} (the sampler's "
                             "latents, their timesteps and class labels)")
    x = np.asarray(calib["latents"], np.float32)
    n = x.shape[0]
    if x.ndim != 4 or x.shape[1] != cfg.in_channels or x.shape[2] % cfg.patch_size \
            or x.shape[2] != x.shape[3]:
        raise ValueError(f"calibration batch field 'latents' must be [n, {cfg.in_channels}, H, H] "
                         f"with H divisible by the patch size {cfg.patch_size}, got {x.shape}")
    if n < n_samples:
        raise ValueError(f"calibration batch has {n} samples; the recipe asks for {n_samples}")
    if not np.all(np.isfinite(x)):
        raise ValueError("calibration batch field 'latents' has NaN/Inf")
    out = {"latents": x[:n_samples]}
    for k in ("timesteps", "class_labels", "group", "sample_weight"):
        if k in calib:
            v = np.asarray(calib[k])
            if v.shape != (n,):
                raise ValueError(f"calibration batch field {k!r} must be [{n}], got {v.shape}")
            out[k] = v[:n_samples]
    t = out["timesteps"]
    hi = cfg.num_train_timesteps
    if not np.all(np.isfinite(t)) or t.min() < 0 or (hi is not None and t.max() >= hi):
        raise ValueError(f"calibration batch field 'timesteps' must lie in [0, "
                         f"{hi if hi is not None else 'inf'}), got [{t.min()}, {t.max()}]")
    y = out["class_labels"].astype(np.int32)
    if y.min() < 0 or y.max() > cfg.num_classes:
        raise ValueError(f"calibration batch field 'class_labels' must lie in [0, "
                         f"{cfg.num_classes}] ({cfg.num_classes} = the null class), got "
                         f"[{y.min()}, {y.max()}]")
    out["class_labels"] = y
    out["timesteps"] = t.astype(np.float32)
    if "group" in out:
        out["group"] = out["group"].astype(np.int32)
    if "sample_weight" in out:
        out["sample_weight"] = out["sample_weight"].astype(np.float32)
    return out


class DiTAdapter:
    """Calibration adapter over a loaded DiT (:class:`DiffusionTransformer`, fp params in
    memory: a DiT is small next to its calibration activations)."""

    def __init__(self, model):
        self.model = model
        self.config: DiTConfig = model.config
        self.params = model.params
        self.spec = dit_block_spec(self.config)
        self.num_blocks = num_blocks(self.params)

    def check(self) -> None:
        for key in ("pos_embed", "transformer_blocks", "proj_out_1", "proj_out_2"):
            if key not in self.params:
                raise ValueError(f"{self.model.path}: DiT params miss {key!r}")

    def read_block(self, b: int) -> dict:
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), block_params(self.params, b))

    def make_batch(self, calib, *, n_samples: int, seqlen: int | None = None) -> dict:
        return dit_batch(self.config, calib, n_samples=n_samples)

    def first_input(self, batch: dict):
        return dit_embed(self.config, self.params, jnp.asarray(batch["latents"]))

    def assemble(self, blocks: list) -> dict:
        return {**{k: v for k, v in self.params.items() if k != "transformer_blocks"},
                "transformer_blocks": list(blocks)}

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr(self.config).encode())
        w = block_params(self.params, 0)["attn1"]["to_q"]["kernel"]
        h.update(np.ascontiguousarray(np.asarray(w, np.float32).ravel()[::7]).tobytes())
        return h.hexdigest()[:16]
