"""Flux (``FluxTransformer2DModel``): the MMDiT of FLUX.1, as pure jittable functions, with its
config reader and checkpoint converter.

Shapes: ``B`` batch, ``N`` image tokens (packed latents), ``L`` text tokens, ``S = L + N``,
``D`` hidden (``nh * hd``), ``Cin`` packed latent channels, ``J`` joint_attention_dim, ``P``
pooled_projection_dim.

Parameters (kernels ``[in, out]``, every linear with a bias; RMSNorm gains ``{"scale": [hd]}``)::

    {"x_embedder": [Cin, D], "context_embedder": [J, D],
     "time_text_embed": {"timestep_embedder": {"linear_1": [256, D], "linear_2": [D, D]},
                         ("guidance_embedder": {...}),                  # iff guidance_embeds
                         "text_embedder": {"linear_1": [P, D], "linear_2": [D, D]}},
     "transformer_blocks": [double, ...], "single_transformer_blocks": [single, ...],
     "norm_out": {"linear": [D, 2D]}, "proj_out": [D, p*p*Cout]}

    double = {"norm1": {"linear": [D, 6D]}, "norm1_context": {"linear": [D, 6D]},
              "attn": {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                       "add_v_proj", "to_add_out", "norm_q", "norm_k", "norm_added_q",
                       "norm_added_k"},
              "ff": {"net.0": {"proj"}, "net.2"}, "ff_context": {"net.0": {"proj"}, "net.2"}}
    single = {"norm": {"linear": [D, 3D]}, "proj_mlp": [D, F],
              "attn": {"to_q", "to_k", "to_v", "norm_q", "norm_k"}, "proj_out": [D + F, D]}

The rotary table is computed on the host in float64 from the position ids, as diffusers does
(:func:`flux_rope`), and passed to the jitted forward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.models.common.hf_config import UnsupportedConfigError
from jaxquant.models.dit.layers import (
    attention,
    feed_forward,
    layer_norm,
    lin,
    modulate,
    timestep_embedding,
    timestep_mlp,
)
from jaxquant.models.dit.model import FF, block_params, num_blocks

FLUX = "FluxTransformer2DModel"
_FIELDS = ("patch_size", "in_channels", "out_channels", "num_layers", "num_single_layers",
           "attention_head_dim", "num_attention_heads", "joint_attention_dim",
           "pooled_projection_dim", "guidance_embeds", "axes_dims_rope")
_JOINT = ("attn/to_q", "attn/to_k", "attn/to_v", "attn/add_q_proj", "attn/add_k_proj",
          "attn/add_v_proj", "attn/to_out.0", "attn/to_add_out")
FLUX_DOUBLE_LINEARS = ("norm1/linear", "norm1_context/linear", *_JOINT, *FF,
                       "ff_context/net.0/proj", "ff_context/net.2")
FLUX_SINGLE_LINEARS = ("norm/linear", "attn/to_q", "attn/to_k", "attn/to_v", "proj_mlp",
                       "proj_out")
EPS = 1e-6  # every LayerNorm and qk-RMSNorm of Flux


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Shapes and switches of a Flux transformer (hashable: a static ``jax.jit`` argument)."""

    num_heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    num_layers: int
    num_single_layers: int
    joint_attention_dim: int
    pooled_projection_dim: int
    patch_size: int = 1
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = 10000.0
    kind: str = "flux"
    num_train_timesteps: int | None = None

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def class_name(self) -> str:
        return FLUX


def flux_config_from_diffusers(cfg: dict, *, source: str = "config.json") -> FluxConfig:
    """A :class:`FluxConfig` from a ``FluxTransformer2DModel`` ``config.json`` dict; unknown fields
    or values raise :class:`UnsupportedConfigError` naming ``source`` and the field."""
    for key in cfg:
        if not key.startswith("_") and key not in _FIELDS:
            raise UnsupportedConfigError(f"{source}: config field {key!r} is not supported for "
                                         f"{FLUX} (supported fields: {', '.join(_FIELDS)})")

    def pos_int(key, default):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise UnsupportedConfigError(f"{source}: config field {key!r} = {v!r} is not "
                                         "supported (supported: a positive integer)")
        return v

    heads, hd = pos_int("num_attention_heads", 24), pos_int("attention_head_dim", 128)
    axes = cfg.get("axes_dims_rope", (16, 56, 56))
    if not (isinstance(axes, list | tuple) and all(isinstance(a, int) and a > 0 and a % 2 == 0
                                                   for a in axes) and sum(axes) == hd):
        raise UnsupportedConfigError(f"{source}: config field 'axes_dims_rope' = {axes!r} is not "
                                     "supported (supported: even sizes summing to "
                                     f"attention_head_dim = {hd})")
    guidance = cfg.get("guidance_embeds", False)
    if not isinstance(guidance, bool):
        raise UnsupportedConfigError(f"{source}: config field 'guidance_embeds' = {guidance!r} "
                                     "is not supported (supported: true or false)")
    def count(key, default):
        v = cfg.get(key, default)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UnsupportedConfigError(f"{source}: config field {key!r} = {v!r} is not "
                                         "supported (supported: a non-negative integer)")
        return v

    in_ch = pos_int("in_channels", 64)
    out_ch = in_ch if cfg.get("out_channels") is None else pos_int("out_channels", None)
    return FluxConfig(
        num_heads=heads, head_dim=hd, in_channels=in_ch, out_channels=out_ch,
        num_layers=count("num_layers", 19), num_single_layers=count("num_single_layers", 38),
        joint_attention_dim=pos_int("joint_attention_dim", 4096),
        pooled_projection_dim=pos_int("pooled_projection_dim", 768),
        patch_size=pos_int("patch_size", 1), guidance_embeds=guidance, axes_dims_rope=tuple(axes))


def flux_params_from_diffusers(cfg: FluxConfig, r) -> dict:
    """The nested params from a :class:`jaxquant.models.dit.convert._Reader` ``r``."""
    d, hd = cfg.hidden_size, cfg.head_dim

    def mlp2(pre, n_in):
        return {"linear_1": r.linear(f"{pre}.linear_1", n_in, d),
                "linear_2": r.linear(f"{pre}.linear_2", d, d)}

    def ff(pre):
        inner = r.src.shape(f"{pre}.net.0.proj.weight")[0] if r.has(f"{pre}.net.0.proj.weight") \
            else 4 * d
        return {"net.0": {"proj": r.linear(f"{pre}.net.0.proj", d, inner)},
                "net.2": r.linear(f"{pre}.net.2", inner, d)}

    def attn(pre, names, norms):
        a = {n: r.linear(f"{pre}.{n}", d, d) for n in names}
        a.update({n: {"scale": r.get(f"{pre}.{n}.weight", (hd,))} for n in norms})
        return a

    tte = {"timestep_embedder": mlp2("time_text_embed.timestep_embedder", 256),
           "text_embedder": mlp2("time_text_embed.text_embedder", cfg.pooled_projection_dim)}
    if cfg.guidance_embeds:
        tte["guidance_embedder"] = mlp2("time_text_embed.guidance_embedder", 256)
    params = {"x_embedder": r.linear("x_embedder", cfg.in_channels, d),
              "context_embedder": r.linear("context_embedder", cfg.joint_attention_dim, d),
              "time_text_embed": tte}
    params["transformer_blocks"] = [{
        "norm1": {"linear": r.linear(f"transformer_blocks.{i}.norm1.linear", d, 6 * d)},
        "norm1_context": {"linear": r.linear(f"transformer_blocks.{i}.norm1_context.linear", d,
                                             6 * d)},
        "attn": attn(f"transformer_blocks.{i}.attn", [p.split("/")[1] for p in _JOINT],
                     ("norm_q", "norm_k", "norm_added_q", "norm_added_k")),
        "ff": ff(f"transformer_blocks.{i}.ff"),
        "ff_context": ff(f"transformer_blocks.{i}.ff_context"),
    } for i in range(cfg.num_layers)]
    singles = []
    for i in range(cfg.num_single_layers):
        pre = f"single_transformer_blocks.{i}"
        w = f"{pre}.proj_mlp.weight"
        f = r.src.shape(w)[0] if r.has(w) else 4 * d
        singles.append({"norm": {"linear": r.linear(f"{pre}.norm.linear", d, 3 * d)},
                        "proj_mlp": r.linear(f"{pre}.proj_mlp", d, f),
                        "attn": attn(f"{pre}.attn", ("to_q", "to_k", "to_v"),
                                     ("norm_q", "norm_k")),
                        "proj_out": r.linear(f"{pre}.proj_out", d + f, d)})
    params["single_transformer_blocks"] = singles
    params["norm_out"] = {"linear": r.linear("norm_out.linear", d, 2 * d)}
    params["proj_out"] = r.linear("proj_out", d, cfg.patch_size**2 * cfg.out_channels)
    return params


# -------------------------------------------------------------------- layers
def flux_rope(cfg: FluxConfig, txt_ids, img_ids) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` ``[L+N, hd]`` float32 for position ids ``txt_ids`` ``[L, n_axes]`` and
    ``img_ids`` ``[N, n_axes]``: per axis ``k``, angles ``pos * theta^(-2i/axes_dims_rope[k])`` in
    float64, each repeated twice (interleaved pairs), axes concatenated."""
    ids = np.concatenate([np.asarray(txt_ids), np.asarray(img_ids)], axis=0).astype(np.float32)
    cos, sin = [], []
    for k, dim in enumerate(cfg.axes_dims_rope):
        freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        ang = np.outer(ids[:, k].astype(np.float64), freqs)
        cos.append(np.repeat(np.cos(ang), 2, axis=1))
        sin.append(np.repeat(np.sin(ang), 2, axis=1))
    return (np.concatenate(cos, axis=1).astype(np.float32),
            np.concatenate(sin, axis=1).astype(np.float32))


def rms_norm(x: jax.Array, p: dict, eps: float = EPS) -> jax.Array:
    """``x / sqrt(mean(x²) + eps) * scale`` over the last axis (``x`` ``[..., hd]``)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * p["scale"].astype(jnp.float32).reshape((1,) * (y.ndim - 1) + (-1,))).astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of ``x`` ``[B, S, nh, hd]`` by ``cos``/``sin`` ``[S, hd]``."""
    b, s, h, hd = x.shape
    pairs = x.reshape(b, s, h, hd // 2, 2)
    rot = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(b, s, h, hd)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


def _heads(cfg: FluxConfig, p: dict, x: jax.Array, q: str, k: str, v: str, nq: str, nk: str):
    """Projected, qk-normed heads ``[B, T, nh, hd]`` of ``x`` ``[B, T, D]``."""
    b, t, _ = x.shape

    def split(y):
        return y.reshape(b, t, cfg.num_heads, cfg.head_dim)

    return (rms_norm(split(lin(p, q, x)), p[nq]), rms_norm(split(lin(p, k, x)), p[nk]),
            split(lin(p, v, x)))


def _attend(cfg: FluxConfig, q, k, v, cos, sin) -> jax.Array:
    """Rotated attention of heads ``[B, S, nh, hd]`` -> ``[B, S, D]``."""
    b, s = q.shape[:2]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    return attention(q.reshape(b, s, -1), k.reshape(b, s, -1), v.reshape(b, s, -1), cfg.num_heads)


# -------------------------------------------------------------------- blocks
def flux_double_block_apply(cfg: FluxConfig, bp: dict, x: jax.Array, ctx: jax.Array,
                            temb: jax.Array, cos: jax.Array, sin: jax.Array):
    """``FluxTransformerBlock``: image tokens ``x`` ``[B, N, D]`` and text tokens ``ctx``
    ``[B, L, D]`` attend jointly (text first); ``temb`` ``[B, D]``; ``cos``/``sin`` ``[L+N, hd]``.
    Returns ``(ctx, x)``."""
    m = jnp.split(lin(bp, "norm1/linear", jax.nn.silu(temb))[:, None, :], 6, axis=-1)
    c = jnp.split(lin(bp, "norm1_context/linear", jax.nn.silu(temb))[:, None, :], 6, axis=-1)
    h, hc = modulate(layer_norm(x, EPS), m[0], m[1]), modulate(layer_norm(ctx, EPS), c[0], c[1])
    a = bp["attn"]
    qi, ki, vi = _heads(cfg, a, h, "to_q", "to_k", "to_v", "norm_q", "norm_k")
    qt, kt, vt = _heads(cfg, a, hc, "add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q",
                        "norm_added_k")
    o = _attend(cfg, jnp.concatenate([qt, qi], 1), jnp.concatenate([kt, ki], 1),
                jnp.concatenate([vt, vi], 1), cos, sin)
    n_txt = ctx.shape[1]
    x = x + m[2] * lin(a, "to_out.0", o[:, n_txt:])
    x = x + m[5] * feed_forward(bp["ff"], modulate(layer_norm(x, EPS), m[3], m[4]),
                                "gelu-approximate")
    ctx = ctx + c[2] * lin(a, "to_add_out", o[:, :n_txt])
    ctx = ctx + c[5] * feed_forward(bp["ff_context"], modulate(layer_norm(ctx, EPS), c[3], c[4]),
                                    "gelu-approximate")
    return ctx, x


def flux_single_block_apply(cfg: FluxConfig, bp: dict, x: jax.Array, ctx: jax.Array,
                            temb: jax.Array, cos: jax.Array, sin: jax.Array):
    """``FluxSingleTransformerBlock`` over the joined ``[ctx; x]`` ``[B, L+N, D]`` (``x``
    ``[B, N, D]``, ``ctx`` ``[B, L, D]``, ``temb`` ``[B, D]``). Returns ``(ctx, x)``."""
    n_txt = ctx.shape[1]
    hs = jnp.concatenate([ctx, x], axis=1)
    shift, scale, gate = jnp.split(lin(bp, "norm/linear", jax.nn.silu(temb))[:, None, :], 3,
                                   axis=-1)
    h = modulate(layer_norm(hs, EPS), shift, scale)
    mlp = jax.nn.gelu(lin(bp, "proj_mlp", h), approximate=True)
    o = _attend(cfg, *_heads(cfg, bp["attn"], h, "to_q", "to_k", "to_v", "norm_q", "norm_k"),
                cos, sin)
    hs = hs + gate * lin(bp, "proj_out", jnp.concatenate([o, mlp], axis=-1))
    return hs[:, :n_txt], hs[:, n_txt:]


# -------------------------------------------------------------------- the model
def flux_prepare(cfg: FluxConfig, params: dict, hidden_states: jax.Array,
                 encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
                 timestep: jax.Array, guidance: jax.Array | None = None) -> dict:
    """Embedded inputs: ``hidden_states`` ``[B, N, Cin]``, ``encoder_hidden_states``
    ``[B, L, J]``, ``pooled_projections`` ``[B, P]``, ``timestep`` / ``guidance`` ``[B]`` (both
    scaled by 1000 here, as diffusers does). Returns ``{"x": [B, N, D], "ctx": [B, L, D],
    "temb": [B, D]}``."""
    tte = params["time_text_embed"]

    def t_emb(name, t):
        e = timestep_embedding(t.astype(jnp.float32) * 1000.0, 256, flip_sin_to_cos=True,
                               downscale_freq_shift=0.0)
        return timestep_mlp(tte[name], e)

    temb = t_emb("timestep_embedder", timestep)
    if guidance is not None:
        temb = temb + t_emb("guidance_embedder", guidance)
    tp = tte["text_embedder"]
    temb = temb + lin(tp, "linear_2", jax.nn.silu(lin(tp, "linear_1",
                                                     pooled_projections.astype(jnp.float32))))
    return {"x": lin(params, "x_embedder", hidden_states.astype(jnp.float32)),
            "ctx": lin(params, "context_embedder", encoder_hidden_states.astype(jnp.float32)),
            "temb": temb}


def flux_head(cfg: FluxConfig, params: dict, x: jax.Array, temb: jax.Array) -> jax.Array:
    """``AdaLayerNormContinuous`` (scale first, then shift) and ``proj_out``: ``x`` ``[B, N, D]``,
    ``temb`` ``[B, D]`` -> ``[B, N, p*p*Cout]``."""
    scale, shift = jnp.split(lin(params, "norm_out/linear", jax.nn.silu(temb))[:, None, :], 2,
                             axis=-1)
    return lin(params, "proj_out", modulate(layer_norm(x, EPS), shift, scale))


@functools.partial(jax.jit, static_argnums=0)
def flux_forward(cfg: FluxConfig, params: dict, hidden_states: jax.Array,
                 encoder_hidden_states: jax.Array, pooled_projections: jax.Array,
                 timestep: jax.Array, rope_cos: jax.Array, rope_sin: jax.Array,
                 guidance: jax.Array | None = None) -> jax.Array:
    """diffusers ``FluxTransformer2DModel(...).sample`` (float32, no input checks).

    Args:
      hidden_states: packed latents ``[B, N, Cin]``.
      encoder_hidden_states: ``[B, L, J]``; pooled_projections: ``[B, P]``.
      timestep: ``[B]`` (diffusers' pipeline passes ``t / 1000``); guidance: ``[B]`` or None.
      rope_cos, rope_sin: ``[L+N, hd]`` from :func:`flux_rope`.

    Returns:
      ``[B, N, p*p*out_channels]`` float32.
    """
    s = flux_prepare(cfg, params, hidden_states, encoder_hidden_states, pooled_projections,
                     timestep, guidance)
    x, ctx, temb = s["x"], s["ctx"], s["temb"]
    for i in range(num_blocks(params)):
        ctx, x = flux_double_block_apply(cfg, block_params(params, i), x, ctx, temb, rope_cos,
                                         rope_sin)
    for i in range(num_blocks(params, "single_transformer_blocks")):
        ctx, x = flux_single_block_apply(cfg, block_params(params, i, "single_transformer_blocks"),
                                         x, ctx, temb, rope_cos, rope_sin)
    return flux_head(cfg, params, x, temb)
