"""`DiTConfig`: the config of a diffusers diffusion transformer (DiT, PixArt-α), read from its
``config.json`` with refusals.

Supported ``_class_name`` values: ``DiTTransformer2DModel``, ``PixArtTransformer2DModel`` and the
legacy ``Transformer2DModel`` with ``patch_size`` set and ``norm_type`` ``ada_norm_zero`` (remapped
to DiT) or ``ada_norm_single`` (remapped to PixArt), as diffusers itself remaps it;
``FluxTransformer2DModel`` is handed to :mod:`jaxquant.models.dit.flux`. Every field of the file
is either read, known to be irrelevant for inference (``dropout``, ``norm_num_groups``,
``upcast_attention``: jaxquant computes attention in float32 anyway), or checked against the
values jaxquant implements; anything else raises :class:`UnsupportedConfigError` naming the file,
the field and what is supported. The dataclass is frozen and hashable (a static ``jax.jit``
argument).
"""

from __future__ import annotations

import dataclasses

from jaxquant.models.common.hf_config import UnsupportedConfigError

DIT = "DiTTransformer2DModel"
PIXART = "PixArtTransformer2DModel"
LEGACY = "Transformer2DModel"
FLUX = "FluxTransformer2DModel"
SUPPORTED_CLASS_NAMES = (DIT, PIXART, FLUX, LEGACY)
ACTIVATIONS = ("gelu", "gelu-approximate")

# fields that change nothing at inference in float32
_IRRELEVANT = ("dropout", "norm_num_groups", "upcast_attention")
# fields of each class that are read (or checked) below
_DIT_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
               "num_layers", "attention_bias", "sample_size", "patch_size", "activation_fn",
               "num_embeds_ada_norm", "norm_type", "norm_elementwise_affine", "norm_eps")
_PIXART_FIELDS = (*_DIT_FIELDS, "cross_attention_dim", "interpolation_scale",
                  "use_additional_conditions", "caption_channels", "attention_type")
# legacy Transformer2DModel switches and the only values a patched DiT / PixArt may have
_LEGACY_FIXED = {"num_vector_embeds": (None,), "use_linear_projection": (False,),
                 "only_cross_attention": (False,), "double_self_attention": (False,)}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Shapes and switches of a DiT / PixArt transformer.

    Attributes:
      kind: ``"dit"`` (class-conditional, adaLN-Zero per block) or ``"pixart"`` (text-conditional,
        adaLN-single, cross-attention).
      num_heads, head_dim: attention heads; the hidden width is ``num_heads * head_dim``.
      in_channels, out_channels: latent channels in and out (``out = 2 * in`` with learned sigma).
      sample_size: the training latent height = width; with ``patch_size`` it sets the
        pos-embed's ``base_size = sample_size // patch_size``.
      interpolation_scale: divides the pos-embed grid (1 for DiT).
      num_classes: rows of the class table minus the null (CFG) class; DiT only.
      num_train_timesteps: from a sibling ``scheduler/scheduler_config.json`` when there is one;
        inputs are then checked to lie in ``[0, num_train_timesteps)``.
      cross_attention_dim, caption_channels, use_additional_conditions: PixArt only.
    """

    kind: str
    num_heads: int
    head_dim: int
    in_channels: int
    out_channels: int
    num_layers: int
    sample_size: int
    patch_size: int
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5
    interpolation_scale: float = 1.0
    num_classes: int | None = None
    num_train_timesteps: int | None = None
    cross_attention_dim: int | None = None
    caption_channels: int | None = None
    use_additional_conditions: bool = False

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def base_size(self) -> int:
        return self.sample_size // self.patch_size

    @property
    def class_name(self) -> str:
        return DIT if self.kind == "dit" else PIXART

    def replace(self, **changes) -> DiTConfig:
        return dataclasses.replace(self, **changes)


def _refuse(source: str, key: str, value, supported) -> UnsupportedConfigError:
    return UnsupportedConfigError(
        f"{source}: config field {key!r} = {value!r} is not supported (supported: {supported})")


def _int(cfg: dict, key: str, source: str, default=None) -> int:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _refuse(source, key, v, "a positive integer")
    return v


def _bool(cfg: dict, key: str, source: str, default: bool) -> bool:
    v = cfg.get(key, default)
    if not isinstance(v, bool):
        raise _refuse(source, key, v, "true or false")
    return v


def config_from_diffusers(cfg: dict, *, source: str = "config.json",
                          num_train_timesteps: int | None = None):
    """A :class:`DiTConfig` (a :class:`~jaxquant.models.dit.flux.FluxConfig` for Flux) from a
    diffusers transformer ``config.json`` dict ``cfg``.

    ``source`` names the file in error messages; ``num_train_timesteps`` comes from the scheduler
    config, if the caller found one (DiT / PixArt check their timesteps against it).
    """
    cls = cfg.get("_class_name")
    if cls not in SUPPORTED_CLASS_NAMES:
        raise UnsupportedConfigError(
            f"{source}: _class_name {cls!r} is not supported (supported: "
            f"{', '.join(SUPPORTED_CLASS_NAMES)})")
    if cls == FLUX:
        from jaxquant.models.dit.flux import flux_config_from_diffusers

        return flux_config_from_diffusers(cfg, source=source)
    norm_type = cfg.get("norm_type", {DIT: "ada_norm_zero", PIXART: "ada_norm_single"}.get(cls))
    if cls == LEGACY:
        if cfg.get("patch_size") is None:
            raise _refuse(source, "patch_size", None,
                          "an integer: Transformer2DModel is read only as a patched DiT / PixArt")
        if norm_type not in ("ada_norm_zero", "ada_norm_single"):
            raise _refuse(source, "norm_type", norm_type,
                          "'ada_norm_zero' (DiT) or 'ada_norm_single' (PixArt) for "
                          "Transformer2DModel")
        for key, allowed in _LEGACY_FIXED.items():
            if cfg.get(key, allowed[0]) not in allowed:
                raise _refuse(source, key, cfg[key], allowed)
        cls = DIT if norm_type == "ada_norm_zero" else PIXART
    kind = "dit" if cls == DIT else "pixart"
    want_norm = "ada_norm_zero" if kind == "dit" else "ada_norm_single"
    if norm_type != want_norm:
        raise _refuse(source, "norm_type", norm_type, f"{want_norm!r} for {cls}")

    known = (_DIT_FIELDS if kind == "dit" else _PIXART_FIELDS) + _IRRELEVANT
    if cfg.get("_class_name") == LEGACY:  # the legacy class carries every field of both
        known = _PIXART_FIELDS + _IRRELEVANT + tuple(_LEGACY_FIXED)
    for key in cfg:
        if not key.startswith("_") and key not in known:
            raise UnsupportedConfigError(
                f"{source}: config field {key!r} is not supported for {cls} (supported fields: "
                f"{', '.join(sorted(known))})")

    act = cfg.get("activation_fn", "gelu-approximate")
    if act not in ACTIVATIONS:
        raise _refuse(source, "activation_fn", act, ", ".join(ACTIVATIONS))
    if cfg.get("num_embeds_ada_norm", 1000) is None:
        raise _refuse(source, "num_embeds_ada_norm", None, f"an integer for {cls}")
    eps = cfg.get("norm_eps", 1e-5 if kind == "dit" else 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or eps <= 0:
        raise _refuse(source, "norm_eps", eps, "a positive number")
    sample = _int(cfg, "sample_size", source, 32 if kind == "dit" else 128)
    patch = _int(cfg, "patch_size", source, 2)
    in_ch = _int(cfg, "in_channels", source, 4)
    out_default = in_ch if kind == "dit" else 8
    out_ch = cfg.get("out_channels", out_default)
    out_ch = in_ch if out_ch is None else _int(cfg, "out_channels", source, out_default)
    common = dict(
        num_heads=_int(cfg, "num_attention_heads", source, 16),
        head_dim=_int(cfg, "attention_head_dim", source, 72),
        in_channels=in_ch, out_channels=out_ch,
        num_layers=_int(cfg, "num_layers", source, 28),
        sample_size=sample, patch_size=patch,
        attention_bias=_bool(cfg, "attention_bias", source, True),
        activation_fn=act,
        norm_elementwise_affine=_bool(cfg, "norm_elementwise_affine", source, False),
        norm_eps=float(eps),
        num_train_timesteps=num_train_timesteps,
    )
    if sample < patch:
        raise _refuse(source, "sample_size", sample, f"at least patch_size = {patch}")
    hidden = common["num_heads"] * common["head_dim"]
    if hidden % 4:  # the 2-D sin-cos table splits the width in 4
        raise _refuse(source, "attention_head_dim", common["head_dim"],
                      f"num_attention_heads * attention_head_dim (here {hidden}) a multiple of 4")
    if kind == "dit":
        # DiTTransformer2DModel builds its PatchEmbed with interpolation_scale 1 (a legacy
        # config's interpolation_scale is ignored by diffusers too)
        return DiTConfig(kind="dit", num_classes=_int(cfg, "num_embeds_ada_norm", source, 1000),
                         **common)

    attn_type = cfg.get("attention_type", "default")
    if attn_type not in ("default", None):
        raise _refuse(source, "attention_type", attn_type, "'default'")
    cross = cfg.get("cross_attention_dim", 1152)
    if cross is None:
        raise _refuse(source, "cross_attention_dim", None,
                      "an integer: PixArt blocks always cross-attend")
    cross = _int(cfg, "cross_attention_dim", source)
    caption = cfg.get("caption_channels")
    caption = None if caption is None else _int(cfg, "caption_channels", source)
    interp = cfg.get("interpolation_scale")
    if interp is None:
        interp = max(sample // 64, 1)
    elif isinstance(interp, bool) or not isinstance(interp, int | float) or interp <= 0:
        raise _refuse(source, "interpolation_scale", interp, "a positive number or null")
    extra = cfg.get("use_additional_conditions")
    extra = (sample == 128) if extra is None else _bool(cfg, "use_additional_conditions",
                                                         source, False)
    if extra and hidden % 3:
        raise _refuse(source, "use_additional_conditions", True,
                      f"only when the hidden size (here {hidden}) is a multiple of 3")
    return DiTConfig(kind="pixart", interpolation_scale=float(interp), cross_attention_dim=cross,
                     caption_channels=caption, use_additional_conditions=extra, **common)
