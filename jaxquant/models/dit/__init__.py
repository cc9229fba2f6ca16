"""Diffusion transformers read from diffusers checkpoints without torch: DiT
(``DiTTransformer2DModel``), PixArt-α (``PixArtTransformer2DModel``) and Flux
(``FluxTransformer2DModel``, :mod:`jaxquant.models.dit.flux`).

``load_diffusers(path)`` returns a :class:`DiffusionTransformer` called like the diffusers model.
The forwards are pure, jittable functions of ``(cfg, params, ...)`` (``cfg`` a frozen
:class:`DiTConfig`); each block also runs alone (``dit_block_apply``, ``pixart_block_apply``) and
``block_params`` / ``set_block_params`` get or replace one block's params, for block-by-block
calibration. Linears are named by their diffusers module paths (``attn1/to_q``,
``ff/net.0/proj``, ``norm1/linear``; see ``DIT_BLOCK_LINEARS``, ``PIXART_BLOCK_LINEARS``,
``FLUX_DOUBLE_LINEARS``, ``FLUX_SINGLE_LINEARS``).
"""

from jaxquant.models.dit.config import SUPPORTED_CLASS_NAMES, DiTConfig, config_from_diffusers
from jaxquant.models.dit.convert import DiffusersSafetensors, params_from_diffusers, read_config
from jaxquant.models.dit.flux import (
    FLUX_DOUBLE_LINEARS,
    FLUX_SINGLE_LINEARS,
    FluxConfig,
    flux_double_block_apply,
    flux_forward,
    flux_head,
    flux_prepare,
    flux_rope,
    flux_single_block_apply,
)
from jaxquant.models.dit.layers import lin, sincos_pos_embed_2d
from jaxquant.models.dit.model import (
    DIT_BLOCK_LINEARS,
    block_params,
    dit_block_apply,
    dit_block_apply_emb,
    dit_block_cond,
    dit_embed,
    dit_forward,
    dit_head,
    num_blocks,
    set_block_params,
)
from jaxquant.models.dit.pixart import (
    PIXART_BLOCK_LINEARS,
    adaln_single,
    encoder_key_bias,
    pixart_block_apply,
    pixart_forward,
    pixart_head,
    pixart_prepare,
)
from jaxquant.models.dit.transformer import DiffusionTransformer, load_diffusers

__all__ = [
    "DIT_BLOCK_LINEARS",
    "FLUX_DOUBLE_LINEARS",
    "FLUX_SINGLE_LINEARS",
    "PIXART_BLOCK_LINEARS",
    "SUPPORTED_CLASS_NAMES",
    "DiTConfig",
    "DiffusersSafetensors",
    "DiffusionTransformer",
    "FluxConfig",
    "adaln_single",
    "block_params",
    "config_from_diffusers",
    "dit_block_apply",
    "dit_block_apply_emb",
    "dit_block_cond",
    "dit_embed",
    "dit_forward",
    "dit_head",
    "encoder_key_bias",
    "flux_double_block_apply",
    "flux_forward",
    "flux_head",
    "flux_prepare",
    "flux_rope",
    "flux_single_block_apply",
    "lin",
    "load_diffusers",
    "num_blocks",
    "params_from_diffusers",
    "pixart_block_apply",
    "pixart_forward",
    "pixart_head",
    "pixart_prepare",
    "read_config",
    "set_block_params",
    "sincos_pos_embed_2d",
]
