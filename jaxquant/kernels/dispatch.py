"""Which implementation runs a quantized matmul: by backend, shape and dtype.

Each kernel has a ``can_use_*(x, qa, platform) -> (ok, reason)`` predicate. :func:`quant_matmul`
tries them in order (Pallas TPU on TPU; Pallas GPU, then jax-triton, on CUDA) and falls back to
the XLA dequantize-then-matmul path, logging the reason once per distinct reason.

``set_kernel_mode``: ``"auto"`` (default), ``"xla"`` (never a kernel), or ``"interpret"`` (run the
Pallas kernel of ``interpret_platform`` in interpret mode on any backend: how CPU tests run the
kernel path through a whole model).
"""

from __future__ import annotations

import contextlib
import logging

import jax
import jax.numpy as jnp

from jaxquant.core.qarray import QArray
from jaxquant.kernels import dequant_matmul as dm

log = logging.getLogger(__name__)
_MODES = ("auto", "xla", "interpret")
_state = {"mode": "auto", "interpret_platform": "tpu"}
_logged: set[str] = set()


def set_kernel_mode(mode: str, *, interpret_platform: str = "tpu") -> None:
    if mode not in _MODES:
        raise ValueError(f"kernel mode must be one of {_MODES}, got {mode!r}")
    if interpret_platform not in ("tpu", "gpu"):
        raise ValueError(f"interpret_platform must be 'tpu' or 'gpu', got {interpret_platform!r}")
    _state["mode"] = mode
    _state["interpret_platform"] = interpret_platform


@contextlib.contextmanager
def kernel_mode(mode: str, *, interpret_platform: str = "tpu"):
    old = dict(_state)
    set_kernel_mode(mode, interpret_platform=interpret_platform)
    try:
        yield
    finally:
        _state.update(old)


def _common(x, qa) -> str | None:
    try:
        dm.check_kernel_qarray(qa)
    except ValueError as e:
        return str(e)
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        return f"activation dtype {x.dtype} (kernels take float32 / bfloat16)"
    if x.shape[-1] != qa.shape[0]:
        return f"x has {x.shape[-1]} features, the weight {qa.shape[0]}"
    return None


def can_use_pallas_tpu(x, qa: QArray, platform: str) -> tuple[bool, str]:
    if platform != "tpu":
        return False, f"backend {platform!r} is not TPU"
    why = _common(x, qa)
    return (why is None), why or "ok"


GPU_MAX_M = 64  # above this many rows the GEMM is compute-bound: dequantize once + cuBLAS wins


def _rows(x) -> int:
    m = 1
    for d in x.shape[:-1]:
        m *= d
    return m


def can_use_pallas_gpu(x, qa: QArray, platform: str) -> tuple[bool, str]:
    if platform not in ("gpu", "cuda"):
        return False, f"backend {platform!r} is not a CUDA GPU"
    why = _common(x, qa)
    if why is None and _rows(x) > GPU_MAX_M:
        why = (f"M = {_rows(x)} > {GPU_MAX_M} rows: compute-bound prefill, XLA dequantize + "
               "cuBLAS GEMM is the faster path")
    return (why is None), why or "ok"


def can_use_jax_triton(x, qa: QArray, platform: str) -> tuple[bool, str]:
    if platform not in ("gpu", "cuda"):
        return False, f"backend {platform!r} is not a CUDA GPU"
    try:  # this kernel implements the uniform codebook only
        dm.check_kernel_qarray(qa, binary=False)
    except ValueError as e:
        return False, str(e)
    try:
        import jax_triton  # noqa: F401
    except ImportError as e:  # the optional extra 'gpu'
        return False, f"jax_triton is not importable ({e})"
    why = _common(x, qa)
    return (why is None), why or "ok"


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def quant_matmul(x: jax.Array, qa: QArray, *, platform: str | None = None) -> jax.Array:
    """``x [..., K] @ qa [K, N]`` through the best available implementation."""
    mode = _state["mode"]
    if mode == "xla":
        return dm.dequant_matmul_xla(x, qa)
    if mode == "interpret":
        p = _state["interpret_platform"]
        ok, why = (can_use_pallas_tpu if p == "tpu" else can_use_pallas_gpu)(x, qa, p)
        if ok:
            f = dm.dequant_matmul_pallas_tpu if p == "tpu" else dm.dequant_matmul_pallas_gpu
            return f(x, qa, interpret=True)
        _log_once(f"quant_matmul: XLA fallback for {qa.shape} {qa.spec.bits}-bit: {why}")
        return dm.dequant_matmul_xla(x, qa)
    platform = platform or jax.default_backend()
    reasons = []
    for name, pred, fn in (
        ("pallas_tpu", can_use_pallas_tpu, dm.dequant_matmul_pallas_tpu),
        ("pallas_gpu", can_use_pallas_gpu, dm.dequant_matmul_pallas_gpu),
    ):
        ok, why = pred(x, qa, platform)
        if ok:
            return fn(x, qa)
        reasons.append(f"{name}: {why}")
    _log_once(f"quant_matmul: XLA dequantize+matmul for {qa.shape} {qa.spec.bits}-bit on "
              f"{platform} ({'; '.join(reasons)})")
    return dm.dequant_matmul_xla(x, qa)


# ----------------------------------------------------------------------------- W·A integer path
def can_use_int(qa: QArray, act_bits: int) -> tuple[bool, str]:
    """Whether the integer kernels can take ``qa`` with ``act_bits``-bit activations."""
    from jaxquant.kernels import int_matmul as im

    try:
        im.check_int_qarray(qa, act_bits)
    except ValueError as e:
        return False, str(e)
    return True, ""


def int_quant_matmul(x: jax.Array, qa: QArray, *, act_bits: int, act_clip: float = 1.0,
                     platform: str | None = None) -> jax.Array:
    """``x [..., K] @ qa [K, N]`` with ``x`` quantized per token to ``act_bits`` and integer
    products: the Pallas TPU / GPU integer kernel where it applies (interpret mode under
    ``kernel_mode("interpret")``), else XLA's int8 GEMM (:func:`int_matmul_xla`). A QArray the
    integer kernels cannot take (asymmetric, 2/3-bit, binary-coded) raises ValueError naming why;
    :func:`jaxquant.nn.linear.linear` checks :func:`can_use_int` first and falls back to the
    fake-quant path with a logged reason."""
    from jaxquant.kernels import int_matmul as im

    mode = _state["mode"]
    if mode == "xla":
        return im.int_matmul_xla(x, qa, act_bits=act_bits, act_clip=act_clip)
    if mode == "interpret":
        p = _state["interpret_platform"]
        f = im.int_matmul_pallas_tpu if p == "tpu" else im.int_matmul_pallas_gpu
        try:
            return f(x, qa, act_bits=act_bits, act_clip=act_clip, interpret=True)
        except ValueError as e:
            _log_once(f"int_quant_matmul: XLA int8 GEMM for {qa.shape} W{qa.spec.bits}A{act_bits}:"
                      f" {e}")
            return im.int_matmul_xla(x, qa, act_bits=act_bits, act_clip=act_clip)
    platform = platform or jax.default_backend()
    if platform == "tpu" or platform == "gpu" or platform == "cuda":
        f = im.int_matmul_pallas_tpu if platform == "tpu" else im.int_matmul_pallas_gpu
        try:
            return f(x, qa, act_bits=act_bits, act_clip=act_clip)
        except ValueError as e:
            _log_once(f"int_quant_matmul: XLA int8 GEMM for {qa.shape} W{qa.spec.bits}A{act_bits}"
                      f" on {platform}: {e}")
    return im.int_matmul_xla(x, qa, act_bits=act_bits, act_clip=act_clip)
