"""Packed low-bit matmul kernels, each beside its pure-jnp reference.

``dequant_matmul`` (W{2,3,4,8}A16, group-wise asymmetric): reference, XLA, Pallas TPU (Mosaic),
Pallas GPU (Triton backend), and jax-triton (optional extra ``gpu``). ``int_matmul`` (W8A8 /
W4A4 with per-token dynamic activation scales): reference, XLA int8, Pallas TPU and Pallas GPU.
:mod:`.dispatch` picks one per backend, shape and dtype.
"""

from jaxquant.kernels.dequant_matmul import (
    check_kernel_qarray,
    dequant_matmul_pallas_gpu,
    dequant_matmul_pallas_tpu,
    dequant_matmul_reference,
    dequant_matmul_xla,
)
from jaxquant.kernels.int_matmul import (
    int_matmul_pallas_gpu,
    int_matmul_pallas_tpu,
    int_matmul_reference,
    int_matmul_xla,
)

__all__ = [
    "check_kernel_qarray",
    "dequant_matmul_pallas_gpu",
    "dequant_matmul_pallas_tpu",
    "dequant_matmul_reference",
    "dequant_matmul_xla",
    "int_matmul_pallas_gpu",
    "int_matmul_pallas_tpu",
    "int_matmul_reference",
    "int_matmul_xla",
]
