"""`Linear`: ``y = x @ W + b`` where ``W`` is a dense kernel or a :class:`~jaxquant.QArray`.

A quantized kernel goes through :func:`jaxquant.kernels.dispatch.quant_matmul`: the packed Pallas
kernels on TPU / GPU when their ``can_use_*`` predicates hold, else XLA dequantize-then-matmul
(logged with the reason). An optional dynamic per-token activation quantizer
(``act_bits``) gives the W4A4 / W8A8 fake-quant path used by the DiT methods.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.activations import fake_quant_per_token, fake_quant_per_token_traced
from jaxquant.core.hadamard import block_hadamard, hadamard_orders_supported
from jaxquant.core.orthogonal import apply_transform, hadamard_blocks
from jaxquant.core.qarray import QArray, dequantize
from jaxquant.kernels.dispatch import can_use_int, int_quant_matmul, quant_matmul

log = logging.getLogger(__name__)
_logged: set[str] = set()


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class ActQuant:
    """How a linear quantizes its input: dynamic per-token, ``bits`` (2..8; the integer path takes
    4 and 8), symmetric, the
    per-token range scaled by ``clip_ratio``. ``mode="int"`` runs integer products through the
    int kernels (:func:`jaxquant.kernels.dispatch.int_quant_matmul`) when the weight is a QArray
    they take; ``"fake"`` quantizes and dequantizes the activation, then multiplies in float.
    A static pytree node (no leaves): it rides in a linear's params as ``"act"``."""

    bits: int
    clip_ratio: float = 1.0
    mode: str = "int"
    # QuaRot's online rotation x ↦ x Q: a block-diagonal Hadamard of this order (-1: one of the
    # linear's whole input width; 0: none)
    rotate: int = 0

    def __post_init__(self):
        if self.rotate not in (0, -1) and (not isinstance(self.rotate, int) or self.rotate < 0
                                           or not hadamard_orders_supported(self.rotate)):
            raise ValueError(f"ActQuant.rotate must be 0 (off), -1 (the input width) or a "
                             f"Hadamard order jaxquant can build, got {self.rotate!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"ActQuant.bits must be an integer in 2..8, got {self.bits!r}")
        if self.mode == "int" and self.bits not in (4, 8):
            raise ValueError(f"ActQuant.bits must be 4 or 8 for mode 'int' (the integer "
                             f"kernels); got {self.bits!r}: use mode 'fake'")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"ActQuant.clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.mode not in ("int", "fake"):
            raise ValueError(f"ActQuant.mode must be 'int' or 'fake', got {self.mode!r}")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class InputTransform:
    """A linear's orthogonal input transform ``x ↦ x G``, ``G = P · H_block`` (CLQ's OBS; see
    :mod:`jaxquant.core.orthogonal`): the input is zero-padded to ``width`` channels, permuted by
    the linear's ``in_perm`` param (when it has one), and rotated by the block-diagonal randomized
    Hadamard of order ``block`` (seed ``seed``). The kernel holds ``Gᵀ W`` (``[width, N]``), so
    the product is unchanged in exact arithmetic. Applied before the activation quantizer, on the
    fake-quant and the integer path alike. A static pytree node; it rides in the linear's params
    as ``"transform"``."""

    block: int
    width: int
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.block, int) or self.block < 1 or self.width % self.block \
                or not hadamard_orders_supported(self.block):
            raise ValueError(f"InputTransform.block must be a Hadamard order jaxquant can build "
                             f"that divides the width {self.width}, got {self.block!r}")

    def blocks(self) -> np.ndarray:
        return hadamard_blocks(self.width, self.block, self.seed)


def transform_input(x: jax.Array, p: dict) -> jax.Array:
    """``x G`` of a linear with an :class:`InputTransform` (``x`` itself without one)."""
    t = p.get("transform")
    if t is None:
        return x
    perm = p.get("in_perm")
    if x.shape[-1] > t.width or (perm is not None and perm.shape[-1] != t.width):
        raise ValueError(f"input transform over {t.width} channels (in_perm "
                         f"{None if perm is None else perm.shape}) for an input of "
                         f"{x.shape[-1]} channels")
    return apply_transform(x, jnp.asarray(t.blocks()), perm).astype(x.dtype)


@functools.lru_cache(maxsize=64)
def online_rotation(n: int, block: int) -> np.ndarray:
    """The orthogonal ``[n, n]`` of an online rotation: block-diagonal randomized Hadamard of
    order ``block`` (``block == n``: a full one), float32, seed 0."""
    block = n if block == -1 else block
    if n % block or not hadamard_orders_supported(block):
        raise ValueError(f"online rotation: the Hadamard order {block} must divide the linear's "
                         f"input width {n} and be one jaxquant can build")
    return block_hadamard(n, block, seed=0).astype(np.float32)


def apply_linear(x: jax.Array, p: dict, *, precision: Any = None) -> jax.Array:
    """Apply a linear's params dict ``{"kernel", "bias"?, "act"?, "act_scale"?, "transform"?,
    "in_perm"?}`` to ``x``: ``act_scale`` ``[K]`` divides the input first (SmoothQuant's migration
    where it could not be folded into a producer), ``transform`` (:class:`InputTransform`, with
    ``in_perm``) rotates it, ``act`` (:class:`ActQuant`) quantizes it per token."""
    if "act_scale" in p:
        s = p["act_scale"]
        x = x / bcast_last(s.astype(x.dtype), x.ndim)
    x = transform_input(x, p)
    act = p.get("act")
    if act is not None and act.rotate:  # the weight holds Qᵀ W (rotated offline)
        Q = online_rotation(x.shape[-1], act.rotate)
        x = jnp.matmul(x.astype(jnp.float32), jnp.asarray(Q),
                       precision=jax.lax.Precision.HIGHEST).astype(x.dtype)
    if "act_clip" in p:  # a traced activation clip ratio (CLQ's parameter search)
        x = x if act is None else fake_quant_per_token_traced(x, act.bits, p["act_clip"])
        act = None
    return linear(x, p["kernel"], p.get("bias"), act=act, precision=precision)


def bcast_last(v: jax.Array, ndim: int) -> jax.Array:
    """Reshape a ``[D]`` vector to rank ``ndim`` for explicit (rank-strict) broadcasting."""
    return v.reshape((1,) * (ndim - 1) + (v.shape[-1],))


def linear(
    x: jax.Array,
    kernel: jax.Array | QArray,
    bias: jax.Array | None = None,
    *,
    act_bits: int | None = None,
    act: ActQuant | None = None,
    precision: Any = None,
) -> jax.Array:
    """``x`` ``[..., K]`` times ``kernel`` ``[K, N]`` (dense or QArray) plus ``bias`` ``[N]``.

    ``act_bits`` (fake-quant) or ``act`` (:class:`ActQuant`) quantize ``x`` per token; with
    ``act.mode == "int"`` and a QArray the integer kernels take, the product is integer."""
    if act is not None and act.mode == "int" and isinstance(kernel, QArray) \
            and precision is None:
        ok, why = can_use_int(kernel, act.bits)
        if ok:
            y = int_quant_matmul(x, kernel, act_bits=act.bits,
                                 act_clip=act.clip_ratio).astype(x.dtype)
            return y if bias is None else y + bcast_last(bias.astype(y.dtype), y.ndim)
        msg = f"linear: fake-quant W{kernel.spec.bits}A{act.bits} for {kernel.shape}: {why}"
        if msg not in _logged:
            _logged.add(msg)
            log.info(msg)
    if act is not None:
        x = fake_quant_per_token(x, act.bits, act.clip_ratio)
    elif act_bits is not None:
        x = fake_quant_per_token(x, act_bits)
    if isinstance(kernel, QArray) and precision is None:
        y = quant_matmul(x, kernel)
    else:
        w = dequantize(kernel, dtype=x.dtype) if isinstance(kernel, QArray) \
            else kernel.astype(x.dtype)
        y = jnp.matmul(x, w, precision=precision)
    if bias is not None:
        y = y + bcast_last(bias.astype(y.dtype), y.ndim)
    return y


class Linear(nn.Module):
    """A dense layer whose ``kernel`` parameter may be a QArray (Flax layout ``[in, out]``)."""

    features: int
    use_bias: bool = False
    act_bits: int | None = None
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.has_variable("params", "kernel"):
            # get_variable: a QArray kernel has other leaf shapes than the dense init would
            kernel = self.get_variable("params", "kernel")
        else:
            kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        return linear(x, kernel, bias, act_bits=self.act_bits)


QuantLinear = Linear  # the same layer: it runs whichever kernel its parameters hold
