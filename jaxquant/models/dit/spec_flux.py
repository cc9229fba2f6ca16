"""Flux (``FluxTransformer2DModel``) blocks as calibration
:class:`~jaxquant.models.blockspec.BlockSpec` s, and its model adapter.

Flux has two kinds of blocks: ``num_layers`` double-stream blocks (image and text tokens with
their own weights, one joint attention) followed by ``num_single_layers`` single-stream blocks
(the joined tokens, one set of weights). The engine (:func:`jaxquant.calibration.engine.calibrate`)
reads ``model.spec`` once and runs that one spec over ``model.num_blocks`` blocks, so a model
is calibrated in two passes over one adapter class, one per stack::

    r1 = calibrate(FluxAdapter(m, part="double"), recipe, calib)
    m1 = DiffusionTransformer(m.config, r1.params, m.path)       # double blocks quantized
    r2 = calibrate(FluxAdapter(m1, part="single"), recipe, calib)  # r2.params: the whole model

The ``"single"`` adapter's first input is the double stack's output, computed by running the
double blocks *of the model it is given* (the first pass's quantized blocks, with their
activation quantizers) over the calibration batch; its fingerprint covers them, so a resumed
second pass refuses a different first pass. Recipe paths are block-local in each pass
(``layers/{b}/attn/to_q`` is double block ``b`` in the first pass and single block ``b`` in the
second), and every rule of a recipe must match a linear of the stack it calibrates (use one
recipe per pass when they differ). With ``reference: fp_prefix`` the second pass's fp reference
stream starts from the quantized double stack's output, not the fp model's. A single pass over
both stacks would need the engine to take a spec per block (``model.spec_of(b)``), with a stream
layout the two kinds share -- they do share one (below), so only the engine is missing.

The stream (``state["x"]``) of both kinds is the joined tokens ``[n, L + N, D]``, text first
(``[ctx; x]``, as the single blocks join them); the split size ``L`` is static, the text length
of ``batch["encoder_hidden_states"]``.

Double-stream block stages (``m`` / ``mc`` = the image / text modulation, 6 chunks each:
shift, scale, gate before attention, then before the MLP)::

    ada         [norm1/linear, norm1_context/linear]       reads c  = silu(temb)          [n, D]
    img_qkv     [attn/to_q, to_k, to_v]                    reads h  = LN(x)(1+m1)+m0
    txt_qkv     [attn/add_q_proj, add_k_proj, add_v_proj]  reads hc = LN(ctx)(1+mc1)+mc0
    img_out     [attn/to_out.0]     reads oi = the joint attention's image rows
    txt_out     [attn/to_add_out]   reads ot = its text rows (computed with oi)
    img_mlp_in  [ff/net.0/proj]          reads LN(x + m2·to_out(oi))(1+m4)+m3
    img_mlp_out [ff/net.2]               reads gelu(ff/net.0)
    txt_mlp_in  [ff_context/net.0/proj]  reads LN(ctx + mc2·to_add_out(ot))(1+mc4)+mc3
    txt_mlp_out [ff_context/net.2]       reads gelu(ff_context/net.0)
    finish      [ctx + mc5·ff_context(...); x + m5·ff(...)]

Producers: the modulations for the qkv and MLP-input stages (shift/scale chunks 0/1 and 3/4
of ``norm1/linear`` for the image, of ``norm1_context/linear`` for the text). The attention
outputs have none: channel ``j`` of both ``oi`` and ``ot`` is proportional to value channel
``j`` of the image *and* text keys, so a scale folded into ``to_v`` and ``add_v_proj`` for one
of ``to_out.0`` / ``to_add_out`` would rescale the other's input too, and the engine only
compensates the rows of the stage's own linears. The conditioning linears and the MLP outputs
have none either.

Single-stream block stages::

    ada      [norm/linear]                              reads c = silu(temb)               [n, D]
    attn_in  [attn/to_q, to_k, to_v, proj_mlp]          reads h = LN(x)(1+scale)+shift
    out      [proj_out]                                 reads a = [attention; gelu(proj_mlp)]
    finish   x + gate·proj_out(a)

Producers: the modulation ``norm/linear`` (3 chunks: shift 0, scale 1) for ``attn_in``;
``proj_out`` reads a mix of attention and GELU channels and has none.

The calibration data is a dict of per-sample fields: ``latents`` ``[n, N, in_channels]`` (packed
latents, the model's ``hidden_states``), ``timesteps`` ``[n]`` (as the pipeline passes them:
``t / 1000``), ``encoder_hidden_states`` ``[n, L, joint_attention_dim]``,
``pooled_projections`` ``[n, pooled_projection_dim]``, ``img_ids`` ``[N, 3]`` or ``[n, N, 3]``,
``txt_ids`` ``[L, 3]`` or ``[n, L, 3]``, ``guidance`` ``[n]`` exactly when the model embeds it,
and optionally ``group`` and ``sample_weight`` ``[n]``. The time / text embedding (shared by all
blocks) runs once in floating point in :meth:`FluxAdapter.make_batch`, giving the derived field
``temb`` ``[n, D]``; the rotary tables become per-sample fields ``rope_cos`` / ``rope_sin``
``[n, L + N, head_dim]``. The input embedders and the output layer stay in floating point.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.qarray import QArray, dequantize
from jaxquant.models.blockspec import BlockSpec, Producer, Stage
from jaxquant.models.dit.flux import (
    EPS,
    FLUX_DOUBLE_LINEARS,
    FLUX_SINGLE_LINEARS,
    FluxConfig,
    _heads,
    flux_prepare,
    flux_rope,
)
from jaxquant.models.dit.layers import attention, gelu, layer_norm, lin, modulate
from jaxquant.models.dit.model import FF, block_params, num_blocks
from jaxquant.models.dit.spec_pixart import _float_field, check_common, check_timesteps

FF_CTX = ("ff_context/net.0/proj", "ff_context/net.2")
IMG_QKV = ("attn/to_q", "attn/to_k", "attn/to_v")
TXT_QKV = ("attn/add_q_proj", "attn/add_k_proj", "attn/add_v_proj")
_REQUIRED = ("latents", "timesteps", "encoder_hidden_states", "pooled_projections", "img_ids",
             "txt_ids")
_FIELDS = (*_REQUIRED, "guidance", "group", "sample_weight")
PARTS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}


def _rope(x, cos, sin):
    """:func:`~jaxquant.models.dit.flux.apply_rope` with per-sample tables ``[B, S, hd]``."""
    b, s, h, hd = x.shape
    pairs = x.reshape(b, s, h, hd // 2, 2)
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(b, s, h, hd)
    return x * cos[:, :, None, :] + rot * sin[:, :, None, :]


def _attend(cfg, q, k, v, batch):
    """Rotated attention of heads ``[B, S, nh, hd]`` -> ``[B, S, D]``."""
    cos, sin = batch["rope_cos"], batch["rope_sin"]
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    b = q.shape[0]
    return attention(q.reshape(b, q.shape[1], -1), k.reshape(b, k.shape[1], -1),
                     v.reshape(b, v.shape[1], -1), cfg.num_heads)


def _chunks(m, n, d):
    return [m[..., i * d:(i + 1) * d] for i in range(n)]


@functools.lru_cache(maxsize=16)
def flux_double_spec(cfg: FluxConfig) -> BlockSpec:
    """The calibration block spec of Flux's double-stream blocks (``FluxTransformerBlock``)."""
    d = cfg.hidden_size

    def n_txt(batch):
        return batch["encoder_hidden_states"].shape[1]

    def ada(p, s, batch):
        return {"x": s["x"], "c": jax.nn.silu(batch["temb"].astype(jnp.float32))}

    def img_qkv(p, s, batch):
        m = lin(p, "norm1/linear", s["c"])[:, None, :]
        mc = lin(p, "norm1_context/linear", s["c"])[:, None, :]
        img = s["x"][:, n_txt(batch):]
        return {"x": s["x"], "m": m, "mc": mc,
                "h": modulate(layer_norm(img, EPS), m[..., :d], m[..., d:2 * d])}

    def txt_qkv(p, s, batch):
        mc = s["mc"]
        txt = s["x"][:, :n_txt(batch)]
        return {**s, "hc": modulate(layer_norm(txt, EPS), mc[..., :d], mc[..., d:2 * d])}

    def joint(p, s, batch):
        a = p["attn"]
        qi, ki, vi = _heads(cfg, a, s["h"], "to_q", "to_k", "to_v", "norm_q", "norm_k")
        qt, kt, vt = _heads(cfg, a, s["hc"], "add_q_proj", "add_k_proj", "add_v_proj",
                            "norm_added_q", "norm_added_k")
        return _attend(cfg, jnp.concatenate([qt, qi], 1), jnp.concatenate([kt, ki], 1),
                       jnp.concatenate([vt, vi], 1), batch)

    def img_out(p, s, batch):
        L = n_txt(batch)
        o = joint(p, s, batch)
        return {"x": s["x"], "m": s["m"], "mc": s["mc"], "oi": o[:, L:], "ot": o[:, :L]}

    def txt_out(p, s, batch):
        L = n_txt(batch)
        txt, img = s["x"][:, :L], s["x"][:, L:]
        img = img + _chunks(s["m"], 6, d)[2] * lin(p, "attn/to_out.0", s["oi"])
        return {"x": jnp.concatenate([txt, img], 1), "m": s["m"], "mc": s["mc"], "ot": s["ot"]}

    def img_mlp_in(p, s, batch):
        L = n_txt(batch)
        txt, img = s["x"][:, :L], s["x"][:, L:]
        txt = txt + _chunks(s["mc"], 6, d)[2] * lin(p, "attn/to_add_out", s["ot"])
        _, _, _, shift, scale, _ = _chunks(s["m"], 6, d)
        return {"x": jnp.concatenate([txt, img], 1), "m": s["m"], "mc": s["mc"],
                "hi": modulate(layer_norm(img, EPS), shift, scale)}

    def img_mlp_out(p, s, batch):
        return {"x": s["x"], "m": s["m"], "mc": s["mc"],
                "a": gelu(lin(p, FF[0], s["hi"]), "gelu-approximate")}

    def txt_mlp_in(p, s, batch):
        L = n_txt(batch)
        txt, img = s["x"][:, :L], s["x"][:, L:]
        img = img + _chunks(s["m"], 6, d)[5] * lin(p, FF[1], s["a"])
        _, _, _, shift, scale, _ = _chunks(s["mc"], 6, d)
        return {"x": jnp.concatenate([txt, img], 1), "mc": s["mc"],
                "hc": modulate(layer_norm(txt, EPS), shift, scale)}

    def txt_mlp_out(p, s, batch):
        return {"x": s["x"], "mc": s["mc"],
                "a": gelu(lin(p, FF_CTX[0], s["hc"]), "gelu-approximate")}

    def finish(p, s, batch):
        L = n_txt(batch)
        txt, img = s["x"][:, :L], s["x"][:, L:]
        txt = txt + _chunks(s["mc"], 6, d)[5] * lin(p, FF_CTX[1], s["a"])
        return {"x": jnp.concatenate([txt, img], 1)}

    def modulation(path, i_shift):
        return Producer("modulation", (path,), chunks=(6, i_shift, i_shift + 1))

    return BlockSpec(
        stages=(
            Stage("ada", ("norm1/linear", "norm1_context/linear"), "c", ada),
            Stage("img_qkv", IMG_QKV, "h", img_qkv, modulation("norm1/linear", 0)),
            Stage("txt_qkv", TXT_QKV, "hc", txt_qkv, modulation("norm1_context/linear", 0)),
            Stage("img_out", ("attn/to_out.0",), "oi", img_out),
            Stage("txt_out", ("attn/to_add_out",), "ot", txt_out),
            Stage("img_mlp_in", FF[:1], "hi", img_mlp_in, modulation("norm1/linear", 3)),
            Stage("img_mlp_out", FF[1:], "a", img_mlp_out),
            Stage("txt_mlp_in", FF_CTX[:1], "hc", txt_mlp_in,
                  modulation("norm1_context/linear", 3)),
            Stage("txt_mlp_out", FF_CTX[1:], "a", txt_mlp_out),
        ),
        finish=finish,
        linears=FLUX_DOUBLE_LINEARS,
        batch_fields=("temb", "rope_cos", "rope_sin", "encoder_hidden_states"),
    )


@functools.lru_cache(maxsize=16)
def flux_single_spec(cfg: FluxConfig) -> BlockSpec:
    """The calibration block spec of Flux's single-stream blocks
    (``FluxSingleTransformerBlock``)."""
    d = cfg.hidden_size

    def ada(p, s, batch):
        return {"x": s["x"], "c": jax.nn.silu(batch["temb"].astype(jnp.float32))}

    def attn_in(p, s, batch):
        m = lin(p, "norm/linear", s["c"])[:, None, :]
        shift, scale, _ = _chunks(m, 3, d)
        return {"x": s["x"], "m": m, "h": modulate(layer_norm(s["x"], EPS), shift, scale)}

    def out(p, s, batch):
        h = s["h"]
        o = _attend(cfg, *_heads(cfg, p["attn"], h, "to_q", "to_k", "to_v", "norm_q", "norm_k"),
                    batch)
        mlp = jax.nn.gelu(lin(p, "proj_mlp", h), approximate=True)
        return {"x": s["x"], "m": s["m"], "a": jnp.concatenate([o, mlp], axis=-1)}

    def finish(p, s, batch):
        return {"x": s["x"] + _chunks(s["m"], 3, d)[2] * lin(p, "proj_out", s["a"])}

    return BlockSpec(
        stages=(
            Stage("ada", ("norm/linear",), "c", ada),
            Stage("attn_in", ("attn/to_q", "attn/to_k", "attn/to_v", "proj_mlp"), "h", attn_in,
                  Producer("modulation", ("norm/linear",), chunks=(3, 0, 1))),
            Stage("out", ("proj_out",), "a", out),
        ),
        finish=finish,
        linears=FLUX_SINGLE_LINEARS,
        batch_fields=("temb", "rope_cos", "rope_sin"),
    )


# ---------------------------------------------------------------------------- batches
@functools.partial(jax.jit, static_argnums=0)
def _embed(cfg, params, latents, caption, pooled, t, guidance):
    return flux_prepare(cfg, params, latents, caption, pooled, t, guidance)


def _top(params: dict) -> dict:
    """The params outside the blocks (the embedders and the head)."""
    return {k: v for k, v in params.items() if k not in PARTS.values()}


def _ids(calib, name, count, axes, n):
    a = np.asarray(calib[name])
    shape = (n, count, axes) if a.ndim == 3 else (count, axes)
    return _float_field(calib, name, shape, n)


def flux_batch(cfg: FluxConfig, params: dict, calib, *, n_samples: int) -> dict:
    """Validate a Flux calibration batch (see the module docstring), take its first
    ``n_samples`` samples and add the derived fields ``temb``, ``rope_cos`` and ``rope_sin``."""
    required = (*_REQUIRED, *(("guidance",) if cfg.guidance_embeds else ()))
    hint = ("'latents' [n, N, in_channels], 'timesteps' [n], 'encoder_hidden_states' [n, L, "
            "joint_attention_dim], 'pooled_projections' [n, P], 'img_ids' [N, 3], 'txt_ids' "
            "[L, 3]" + (", 'guidance' [n]" if cfg.guidance_embeds else ""))
    n, out = check_common(calib, _FIELDS, required, "Flux", n_samples, (None, cfg.in_channels),
                          hint)
    if "guidance" in calib and not cfg.guidance_embeds:
        raise ValueError("calibration batch field 'guidance' is not an input of this Flux model "
                         "(guidance_embeds is false)")
    check_timesteps(out["timesteps"], cfg.num_train_timesteps)
    cap = _float_field(calib, "encoder_hidden_states", (n, None, cfg.joint_attention_dim), n)
    pooled = _float_field(calib, "pooled_projections", (n, cfg.pooled_projection_dim), n)
    g = _float_field(calib, "guidance", (n,), n) if cfg.guidance_embeds else None
    axes = len(cfg.axes_dims_rope)
    txt_ids = _ids(calib, "txt_ids", cap.shape[1], axes, n)
    img_ids = _ids(calib, "img_ids", out["latents"].shape[1], axes, n)
    sl = slice(0, n_samples)
    out = {k: v[sl] for k, v in out.items()}
    out["encoder_hidden_states"] = cap[sl]
    if txt_ids.ndim == 2 and img_ids.ndim == 2:
        cos, sin = flux_rope(cfg, txt_ids, img_ids)
        cos = np.broadcast_to(cos, (n_samples, *cos.shape))
        sin = np.broadcast_to(sin, (n_samples, *sin.shape))
    else:
        t3 = np.broadcast_to(txt_ids, (n, *txt_ids.shape[-2:]))
        i3 = np.broadcast_to(img_ids, (n, *img_ids.shape[-2:]))
        cs = [flux_rope(cfg, t3[i], i3[i]) for i in range(n_samples)]
        cos, sin = np.stack([c for c, _ in cs]), np.stack([s for _, s in cs])
    out["rope_cos"], out["rope_sin"] = np.ascontiguousarray(cos), np.ascontiguousarray(sin)
    # the time / text embedding only (the token embedders run again in first_input)
    e = _embed(cfg, _top(params), jnp.zeros((n_samples, 1, cfg.in_channels), jnp.float32),
               jnp.zeros((n_samples, 1, cfg.joint_attention_dim), jnp.float32),
               jnp.asarray(pooled[sl]), jnp.asarray(out["timesteps"]),
               None if g is None else jnp.asarray(g[sl]))
    out["temb"] = np.asarray(e["temb"], np.float32)
    return out


def _run_block(spec: BlockSpec, bp, x, batch):
    s = {spec.stream: x}
    for st in spec.stages:
        s = st.fn(bp, s, batch)
    return spec.finish(bp, s, batch)[spec.stream]


@functools.partial(jax.jit, static_argnums=0)
def _double_stack(cfg, blocks, x, batch):
    spec = flux_double_spec(cfg)
    for bp in blocks:
        x = _run_block(spec, bp, x, batch)
    return x


def _has_q(tree) -> bool:
    return any(isinstance(a, QArray) for a in jax.tree.leaves(
        tree, is_leaf=lambda a: isinstance(a, QArray)))


class FluxAdapter:
    """Calibration adapter over one block stack of a loaded Flux (:class:`DiffusionTransformer`,
    params in memory): ``part="double"`` (fp params) or ``"single"`` (its double blocks fp or
    already quantized by a first pass; see the module docstring)."""

    replay_chunk = 8  # samples per jitted call when the single pass replays the double stack

    def __init__(self, model, part: str = "double"):
        if model.config.kind != "flux":
            raise ValueError(f"{model.path}: FluxAdapter needs a Flux transformer, got a "
                             f"{model.config.kind!r} model")
        if part not in PARTS:
            raise ValueError(f"FluxAdapter: part must be one of {list(PARTS)}, got {part!r}")
        self.model = model
        self.part = part
        self.key = PARTS[part]
        self.config: FluxConfig = model.config
        self.params = model.params
        self.spec = (flux_double_spec if part == "double" else flux_single_spec)(self.config)
        self.num_blocks = num_blocks(self.params, self.key)

    def check(self) -> None:
        for key in ("x_embedder", "context_embedder", "time_text_embed", *PARTS.values(),
                    "norm_out", "proj_out"):
            if key not in self.params:
                raise ValueError(f"{self.model.path}: Flux params miss {key!r}")
        if _has_q(self.params[self.key]):
            raise ValueError(f"{self.model.path}: the {self.part}-stream blocks are already "
                             "quantized; calibrate them from fp params")

    def read_block(self, b: int) -> dict:
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                            block_params(self.params, b, self.key))

    def make_batch(self, calib, *, n_samples: int, seqlen: int | None = None) -> dict:
        return flux_batch(self.config, self.params, calib, n_samples=n_samples)

    def first_input(self, batch: dict):
        """The stream entering the first block of this part: ``[ctx; x]`` ``[n, L + N, D]``
        embedded (``"double"``), then through this model's double blocks (``"single"``)."""
        cfg = self.config
        n = batch["latents"].shape[0]
        dummy_pooled = jnp.zeros((n, cfg.pooled_projection_dim), jnp.float32)
        g = jnp.zeros((n,), jnp.float32) if cfg.guidance_embeds else None
        e = _embed(cfg, _top(self.params), jnp.asarray(batch["latents"]),
                   jnp.asarray(batch["encoder_hidden_states"]), dummy_pooled,
                   jnp.zeros((n,), jnp.float32), g)
        x = jnp.concatenate([e["ctx"], e["x"]], axis=1)
        if self.part == "double":
            return x
        blocks = [block_params(self.params, i, PARTS["double"])
                  for i in range(num_blocks(self.params, PARTS["double"]))]
        fields = (*self.spec.batch_fields, "encoder_hidden_states")
        outs = []
        for i in range(0, n, self.replay_chunk):
            sl = slice(i, i + self.replay_chunk)
            bt = {k: jnp.asarray(batch[k][sl]) for k in fields}
            outs.append(_double_stack(cfg, blocks, x[sl], bt))
        return jnp.concatenate(outs, axis=0)

    def assemble(self, blocks: list) -> dict:
        return {**self.params, self.key: list(blocks)}

    def fingerprint(self) -> str:
        h = hashlib.sha256(repr(self.config).encode() + self.part.encode())
        for key in PARTS.values():  # the single pass's input depends on the double blocks
            if num_blocks(self.params, key) == 0:
                continue
            w = block_params(self.params, 0, key)["attn"]["to_q"]["kernel"]
            w = dequantize(w, dtype=jnp.float32) if isinstance(w, QArray) else w
            h.update(np.ascontiguousarray(np.asarray(w, np.float32).ravel()[::7]).tobytes())
        return h.hexdigest()[:16]
