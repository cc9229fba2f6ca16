"""Residual-stream rotation (QuaRot-style, offline only): a model transform that leaves the fp
function unchanged and spreads outliers across channels before quantization.

With an orthogonal ``Q`` ``[D, D]`` (``Q Qᵀ = I``) the stream ``x`` becomes ``x Q``:

* every norm of the stream is fused first: its gain ``g`` moves into the rows of the linears that
  read it (``W ← diag(g) W``, Flax layout ``[in, out]``) and becomes 1. An RMSNorm commutes with
  ``Q`` (``‖x Q‖ = ‖x‖``), so ``norm(x Q) = norm(x) Q``; the readers then undo ``Q``:
  ``W ← Qᵀ W``;
* the linears that write into the stream (``residual_writers`` of the block spec) rotate their
  output: ``W ← W Q``, ``b ← b Q``;
* the embedding rows rotate (``E ← E Q``) and the final norm fuses into the LM head
  (``W_head ← Qᵀ diag(g) W_head``), which unties a tied head.

A norm with a bias cannot be fused this way (its bias would have to live in the rotated basis
before the gain); it is refused by name. ``Q`` is a randomized Hadamard rotation of the full
width, or a block-diagonal one whose block equals the quantization group size ("groupwise"), from
:mod:`jaxquant.core.hadamard`. :class:`RotatedAdapter` applies the transform to any family's
:class:`~jaxquant.models.blockspec.ModelAdapter` block by block, so a streamed checkpoint is
rotated as it is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core import hadamard
from jaxquant.models.blockspec import BlockSpec, get_path, set_path

KINDS = ("block_hadamard", "hadamard")
_HI = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class RotationSpec:
    """``kind``: ``"block_hadamard"`` (blocks of ``block`` channels) or ``"hadamard"`` (full
    width); ``seed``: the random signs."""

    kind: str = "block_hadamard"
    block: int | None = 64
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"rotation.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "block_hadamard" and (not isinstance(self.block, int) or self.block < 1):
            raise ValueError(f"rotation.block must be a positive int for block_hadamard, got "
                             f"{self.block!r}")

    def matrix(self, dim: int) -> np.ndarray:
        """The orthogonal ``[dim, dim]`` (float64)."""
        if self.kind == "hadamard":
            return hadamard.random_hadamard(dim, self.seed)
        return hadamard.block_hadamard(dim, self.block, self.seed)


def stream_norms(spec: BlockSpec) -> list[tuple[str, tuple[str, ...]]]:
    """``(norm path, linears reading it)`` for each norm of the stream in a block."""
    return [(st.producer.paths[0], st.linears) for st in spec.stages
            if st.producer is not None and st.producer.kind == "norm"]


def check_rotatable(spec: BlockSpec, bp: dict) -> None:
    if not spec.residual_writers:
        raise ValueError("rotation: this model's block spec declares no residual_writers, so its "
                         "residual stream cannot be rotated")
    for norm, _ in stream_norms(spec):
        p = get_path(bp, norm)
        if "bias" in p:
            raise ValueError(f"rotation: the norm {norm!r} has a bias, which cannot be fused into "
                             "the linears that read it; rotate before adding norm biases (DAC)")
        if "scale" not in p:
            raise ValueError(f"rotation: the norm {norm!r} has no 'scale' to fuse (params: "
                             f"{sorted(p)})")


def rotate_block(spec: BlockSpec, bp: dict, Q) -> dict:
    """One block's fp params with its norms fused and its stream rotated by ``Q`` ``[D, D]``."""
    check_rotatable(spec, bp)
    Q = jnp.asarray(Q, jnp.float32)
    for norm, readers in stream_norms(spec):
        g = jnp.asarray(get_path(bp, norm)["scale"], jnp.float32)
        for lin in readers:
            W = jnp.asarray(get_path(bp, f"{lin}/kernel"), jnp.float32)
            bp = set_path(bp, f"{lin}/kernel", jnp.matmul(Q.T, g[:, None] * W, precision=_HI))
        bp = set_path(bp, f"{norm}/scale", jnp.ones_like(g))
    for lin in spec.residual_writers:
        W = jnp.asarray(get_path(bp, f"{lin}/kernel"), jnp.float32)
        bp = set_path(bp, f"{lin}/kernel", jnp.matmul(W, Q, precision=_HI))
        b = get_path(bp, lin).get("bias")
        if b is not None:
            b = jnp.matmul(jnp.asarray(b, jnp.float32), Q, precision=_HI)
            bp = set_path(bp, f"{lin}/bias", b)
    return bp


class RotatedAdapter:
    """``inner`` (any family's adapter) seen through the rotation ``rot``. The family provides
    ``stream_dim`` (the residual width), ``rotate_top(params, Q)`` (embedding, final norm, head)
    and ``rotated_config()`` (its config after the head is untied)."""

    def __init__(self, inner: Any, rot: RotationSpec):
        for attr in ("stream_dim", "rotate_top", "rotated_config"):
            if not hasattr(inner, attr):
                raise ValueError(f"rotation: the {type(inner).__name__} model adapter does not "
                                 f"support rotation (it lacks {attr!r})")
        self.inner, self.rot = inner, rot
        self.spec = inner.spec
        self.num_blocks = inner.num_blocks
        self.config = inner.rotated_config()
        self.Q = jnp.asarray(rot.matrix(inner.stream_dim), jnp.float32)

    def check(self) -> None:
        self.inner.check()

    def make_batch(self, calib, **kw) -> dict:
        return self.inner.make_batch(calib, **kw)

    def read_block(self, b: int) -> dict:
        bp = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), self.inner.read_block(b))
        return rotate_block(self.spec, bp, self.Q)

    def first_input(self, batch: dict):
        x = self.inner.first_input(batch)
        return jnp.matmul(x.astype(jnp.float32), self.Q, precision=_HI).astype(x.dtype)

    def assemble(self, blocks: list):
        return self.inner.rotate_top(self.inner.assemble(blocks), self.Q)

    def final_norm(self, x):
        """The rotated model's last norm: its gain is fused into the head (1 here)."""
        return self.inner.final_norm(x, gain=jnp.ones((x.shape[-1],), jnp.float32))

    def add_final_norm_bias(self, params: dict, mu) -> dict:
        return self.inner.add_final_norm_bias(params, mu)

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.inner.fingerprint().encode())
        h.update(repr(self.rot).encode())
        return h.hexdigest()[:16]


def rotate_params(adapter: Any, rot: RotationSpec) -> tuple[Any, dict]:
    """``(config, params)`` of the whole fp model rotated (for evaluation and tests)."""
    r = RotatedAdapter(adapter, rot)
    return r.config, r.assemble([r.read_block(b) for b in range(r.num_blocks)])
