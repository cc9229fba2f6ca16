"""`QuantSpec`: the static description of a uniform affine weight quantizer.

Vocabulary used throughout jaxquant (defined once, here):

* **group** -- a run of ``group_size`` consecutive *input* channels of a weight that share one
  scale (and zero point). Weights are stored in the Flax layout ``[..., in, out]`` (``y = x @ W``),
  so a group runs along axis ``-2``.
* ``group_size == -1`` -- one group spans the whole input dimension: one scale per output channel.
* ``per_tensor=True`` -- one scale for the whole matrix (per leading batch index).

A spec is a frozen, hashable dataclass, so it can be a static argument of ``jax.jit`` and static
metadata of the :class:`~jaxquant.core.qarray.QArray` pytree.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp
import numpy as np

ScaleMethod = Literal["minmax", "mse"]

_ALLOWED_SCALE_DTYPES = ("float32", "bfloat16", "float16")
CODEBOOKS = ("uniform", "binary")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight matrix.

    Attributes:
      bits: integer width of each code, 2..8.
      group_size: input channels per scale; ``-1`` = per output channel. Must divide the input
        dimension of every weight it is applied to (checked by :func:`quantize`).
      symmetric: symmetric codes (zero point fixed at ``2**(bits-1)``, GPTQ convention) or
        asymmetric (a zero point per group, range includes 0).
      clip_ratio: shrink the min/max range by this factor before computing scales (``1.0`` = no
        clipping). With ``scale_method="mse"`` this is the *smallest* ratio searched.
      scale_dtype: storage dtype of the scales: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
      scale_method: ``"minmax"`` (range of each group) or ``"mse"`` (per group, pick the clip ratio
        on a grid in ``[clip_ratio, 1]`` that minimises ``sum |w - ŵ|**mse_norm``, as GPTQ's
        ``Quantizer`` does with ``maxshrink``).
      mse_grid: number of grid points of the MSE search.
      mse_norm: the exponent of the MSE search's error (GPTQ uses 2.4).
      per_tensor: one scale for the whole tensor (overrides ``group_size``).
      codebook: ``"uniform"`` (the affine grid above) or ``"binary"``: a binary-coded quantizer
        (D²Quant's DSQ as its public code does it) whose ``bits`` code bits are sign planes
        ``B_p = 2·bit_p − 1`` with one scale per plane, group and output channel,
        ``Ŵ = Σ_p r_p B_p`` (no zero point; the per-input-channel scale is folded elsewhere).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    clip_ratio: float = 1.0
    scale_dtype: str = "float32"
    scale_method: ScaleMethod = "minmax"
    mse_grid: int = 100
    mse_norm: float = 2.4
    per_tensor: bool = False
    codebook: str = "uniform"

    def __post_init__(self):
        if not isinstance(self.bits, int | np.integer) or not 2 <= int(self.bits) <= 8:
            raise ValueError(f"QuantSpec.bits must be an integer in 2..8, got {self.bits!r}")
        if not isinstance(self.group_size, int | np.integer) or (
            self.group_size != -1 and self.group_size < 1
        ):
            raise ValueError(
                "QuantSpec.group_size must be -1 (per output channel) or a positive integer, "
                f"got {self.group_size!r}"
            )
        if not (0.0 < float(self.clip_ratio) <= 1.0):
            raise ValueError(f"QuantSpec.clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if self.scale_dtype not in _ALLOWED_SCALE_DTYPES:
            raise ValueError(
                f"QuantSpec.scale_dtype must be one of {_ALLOWED_SCALE_DTYPES}, "
                f"got {self.scale_dtype!r}"
            )
        if self.scale_method not in ("minmax", "mse"):
            raise ValueError(
                f"QuantSpec.scale_method must be 'minmax' or 'mse', got {self.scale_method!r}"
            )
        if self.scale_method == "mse" and self.clip_ratio >= 1.0:
            raise ValueError(
                "QuantSpec.scale_method='mse' searches clip ratios in [clip_ratio, 1]; with "
                "clip_ratio=1.0 there is nothing to search. Set clip_ratio < 1 (e.g. 0.8; the "
                "GPTQ reference's maxshrink=0.8 searches down to 0.2)"
            )
        if self.codebook not in CODEBOOKS:
            raise ValueError(f"QuantSpec.codebook must be one of {CODEBOOKS}, got "
                             f"{self.codebook!r}")
        if self.codebook == "binary" and self.per_tensor:
            raise ValueError("QuantSpec.codebook='binary' keeps plane scales per group and output "
                             "channel; it cannot be per_tensor")
        if self.mse_grid < 1:
            raise ValueError(f"QuantSpec.mse_grid must be >= 1, got {self.mse_grid!r}")
        if self.mse_norm <= 0:
            raise ValueError(f"QuantSpec.mse_norm must be > 0, got {self.mse_norm!r}")

    # ------------------------------------------------------------------ derived quantities
    @property
    def maxq(self) -> int:
        """Largest code, ``2**bits - 1``; codes live in ``[0, maxq]``."""
        return (1 << self.bits) - 1

    @property
    def sym_zero(self) -> int:
        """The fixed zero point of symmetric codes, ``2**(bits-1)``."""
        return 1 << (self.bits - 1)

    @property
    def jnp_scale_dtype(self):
        return jnp.dtype(self.scale_dtype)

    def num_groups(self, in_features: int) -> int:
        """Number of scale rows for a weight with ``in_features`` input channels."""
        if self.per_tensor or self.group_size == -1:
            return 1
        return in_features // self.group_size

    def group_len(self, in_features: int) -> int:
        """Input channels per group for a weight with ``in_features`` input channels."""
        if self.per_tensor or self.group_size == -1:
            return in_features
        return self.group_size

    def check_weight_shape(self, shape: tuple[int, ...], *, name: str = "w") -> None:
        """Raise ValueError unless ``shape`` is ``[..., in, out]`` and groups tile ``in``."""
        if len(shape) < 2:
            raise ValueError(
                f"{name} must have rank >= 2 with layout [..., in_features, out_features], "
                f"got shape {tuple(shape)}"
            )
        k = shape[-2]
        if not self.per_tensor and self.group_size != -1 and k % self.group_size != 0:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size} does not divide the input dimension "
                f"{k} of {name} (shape {tuple(shape)}); use a group size that divides {k} "
                "or group_size=-1 (per output channel)"
            )

    def replace(self, **changes) -> QuantSpec:
        return dataclasses.replace(self, **changes)
