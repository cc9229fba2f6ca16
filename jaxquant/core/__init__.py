"""Pure quantization math: specs, the QArray pytree, packing, fake quantization, activations.

Imports jax (and numpy) only.
"""

from jaxquant.core.activations import (
    dequantize_per_token,
    fake_quant_per_token,
    quantize_per_token,
)
from jaxquant.core.fake_quant import fake_quant
from jaxquant.core.packing import pack, unpack
from jaxquant.core.qarray import (
    QArray,
    compute_scale_zero,
    dequantize,
    from_codes,
    qarray_partition_specs,
    quantize,
    quantize_dequantize,
    shard_qarray,
    split_columns,
)
from jaxquant.core.spec import QuantSpec

__all__ = [
    "QArray",
    "QuantSpec",
    "compute_scale_zero",
    "dequantize",
    "dequantize_per_token",
    "fake_quant",
    "fake_quant_per_token",
    "from_codes",
    "pack",
    "qarray_partition_specs",
    "quantize",
    "quantize_dequantize",
    "quantize_per_token",
    "shard_qarray",
    "split_columns",
    "unpack",
]
