"""W8A8 / W4A4 integer matmuls: per-token dynamic activation scales x per-channel or per-group
weight scales, for the W4A4 DiT methods.

``y[t, o] = s_x[t] · Σ_g S[g, o] · Σ_{i∈g} q_x[t, i] · (Q[i, o] − 2^(b−1))``

``q_x`` are the per-token codes of :func:`jaxquant.core.activations.quantize_per_token` (int8
container, ``[-qmax, qmax]``); the weight is a *symmetric* QArray (4 or 8 bits, zero point
``2^(b−1)``), so its signed codes fit int8. Every inner sum is an exact integer (int32) product; the
scales are applied once per group.

* :func:`int_matmul_reference` -- numpy-exact integer arithmetic in jnp (int32 einsum per group).
* :func:`int_matmul_xla` -- the same through ``lax.dot_general`` on int8 operands with int32
  accumulation (XLA's integer GEMM on CPU/GPU, the MXU's int8 path on TPU).
* :func:`int_matmul_pallas_tpu` -- a Pallas TPU kernel: bit planes of the packed codes (as the
  W-A16 kernel), int8 x int8 -> int32 dots per K tile of one group, scaled into a float32
  accumulator.
* :func:`int_matmul_pallas_gpu` -- a Pallas GPU (Triton) kernel: one program per (M, N) block
  stepping K one group at a time; per bit plane an int8 x int8 -> int32 ``tl.dot`` (a plane of
  fewer than 16 rows, W4 g64, uses an int32 multiply-reduce instead), the group's int32 sum
  scaled into a float32 accumulator, the per-token scale applied once at the end.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxquant.core import packing
from jaxquant.core.activations import quantize_per_token
from jaxquant.core.qarray import QArray
from jaxquant.kernels.dequant_matmul import gpu_operands, planes_from_words, round_up


def check_int_qarray(qa: QArray, act_bits: int) -> None:
    if not isinstance(qa, QArray) or qa.ndim != 2:
        raise ValueError("int_matmul takes one [K, N] QArray")
    if qa.spec.codebook != "uniform":
        raise ValueError(f"int_matmul implements the uniform integer grid, not the "
                         f"{qa.spec.codebook!r} codebook (its codes are not integers to multiply)")
    if not qa.spec.symmetric or qa.spec.bits not in (4, 8) or qa.spec.per_tensor:
        raise ValueError(f"int_matmul needs a symmetric 4- or 8-bit group-wise or per-channel "
                         f"QArray, got {qa.spec}")
    if act_bits not in (4, 8):
        raise ValueError(f"act_bits must be 4 or 8, got {act_bits}")
    gs = qa.spec.group_size
    if gs != -1 and gs % 32:
        raise ValueError(f"group_size {gs} is not a multiple of 32")


def _signed_codes(qa: QArray) -> jax.Array:
    return (qa.codes().astype(jnp.int32) - qa.spec.sym_zero).astype(jnp.int8)


def _grouped_int(xq, wq, s_w, gs):
    """``Σ_g S[g] ⊙ (xq_g @ wq_g)`` with an int32 product per group. xq ``[M, K]`` int8."""
    m, k = xq.shape
    n = wq.shape[1]
    gs = k if gs == -1 else gs
    g = k // gs
    acc = jax.lax.dot_general(
        xq.reshape(m, g, gs), wq.reshape(g, gs, n),
        dimension_numbers=(((2,), (1,)), ((1,), (0,))),
        preferred_element_type=jnp.int32)  # [G, M, N]
    return jnp.sum(acc.astype(jnp.float32) * s_w.astype(jnp.float32)[:, None, :], axis=0)


def int_matmul_reference(x: jax.Array, qa: QArray, *, act_bits: int = 8,
                         act_clip: float = 1.0) -> jax.Array:
    """The oracle: explicit per-token quantization, exact int32 group products, float32 scales."""
    check_int_qarray(qa, act_bits)
    *lead, k = x.shape
    xq, sx = quantize_per_token(x.reshape(-1, k), bits=act_bits, clip_ratio=act_clip)
    wq = _signed_codes(qa).astype(jnp.int32)
    gs = qa.spec.group_size
    gs = k if gs == -1 else gs
    acc = jnp.einsum("mgi,gin->gmn", xq.astype(jnp.int32).reshape(-1, k // gs, gs),
                     wq.reshape(k // gs, gs, -1))
    y = jnp.sum(acc.astype(jnp.float32) * qa.scale.astype(jnp.float32)[:, None, :], axis=0)
    return (y * sx).reshape(*lead, qa.shape[1]).astype(x.dtype)


def int_matmul_xla(x: jax.Array, qa: QArray, *, act_bits: int = 8,
                   act_clip: float = 1.0) -> jax.Array:
    check_int_qarray(qa, act_bits)
    *lead, k = x.shape
    xq, sx = quantize_per_token(x.reshape(-1, k), bits=act_bits, clip_ratio=act_clip)
    y = _grouped_int(xq, _signed_codes(qa), qa.scale, qa.spec.group_size) * sx
    return y.reshape(*lead, qa.shape[1]).astype(x.dtype)


def _int_tpu_kernel(x_ref, w_ref, s_ref, sx_ref, o_ref, acc_ref, *, bits, nk):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    off = jnp.int32(1 << (bits - 1))
    part = None
    for i, q in enumerate(planes_from_words(w_ref[...], bits)):
        qi = (q.astype(jnp.int32) - off).astype(jnp.int8)
        d = jnp.dot(x_ref[0, i], qi, preferred_element_type=jnp.int32)
        part = d if part is None else part + d
    acc_ref[...] += part.astype(jnp.float32) * s_ref[0]

    @pl.when(kk == nk - 1)
    def _():
        o_ref[...] = (acc_ref[...] * sx_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("act_bits", "act_clip", "bm", "bn", "interpret"))
def _int_tpu_call(x2, qa, *, act_bits, act_clip, bm, bn, interpret):
    from jax.experimental.pallas import tpu as pltpu

    bits = qa.spec.bits
    m, k = x2.shape
    n = qa.shape[1]
    p = 32 // bits
    gs = qa.spec.group_size
    kp32 = packing.padded_in_features(k)
    # one K tile per group (per-channel: tiles of up to 1024 with the same scale row)
    bk = gs if gs != -1 else min(round_up(kp32, 32 * p), 128 * p * 8)
    kp = round_up(kp32, bk)
    mp = round_up(m, bm)
    np_ = round_up(n, bn)
    xq, sx = quantize_per_token(x2, bits=act_bits, clip_ratio=act_clip)
    xq = jnp.pad(xq, ((0, mp - m), (0, kp - k)))
    sx = jnp.pad(sx, ((0, mp - m), (0, 0)), constant_values=1.0)
    rows = bk // p
    # x4[t, i, m, r] = xq[m, t·bk + p·r + i]
    x4 = xq.reshape(mp, kp // bk, rows, p).transpose(1, 3, 0, 2)
    words = jnp.pad(qa.packed, ((0, kp * bits // 32 - qa.packed.shape[0]), (0, np_ - n)))
    s = qa.scale.astype(jnp.float32)
    if gs == -1:
        s = jnp.repeat(s, kp // bk, axis=0)
    s = jnp.pad(s, ((0, kp // bk - s.shape[0]), (0, np_ - n)))[:, None, :]  # [T, 1, Np]
    nk = kp // bk
    out = pl.pallas_call(
        functools.partial(_int_tpu_kernel, bits=bits, nk=nk),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x2.dtype),
        grid=(mp // bm, np_ // bn, nk),
        in_specs=[
            pl.BlockSpec((1, p, bm, rows), lambda i, j, t: (t, 0, i, 0)),
            pl.BlockSpec((rows, bn), lambda i, j, t: (t, j)),
            pl.BlockSpec((1, 1, bn), lambda i, j, t: (t, 0, j)),
            pl.BlockSpec((bm, 1), lambda i, j, t: (i, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, t: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"jaxquant_w{bits}a{act_bits}_tpu",
    )(x4, words, s, sx)
    return out[:m, :n]


def int_matmul_pallas_tpu(x: jax.Array, qa: QArray, *, act_bits: int = 8, act_clip: float = 1.0,
                          bm: int | None = None, bn: int | None = None,
                          interpret: bool = False) -> jax.Array:
    """W8A8 / W4A4 through the Pallas TPU kernel (int8 MXU dots, int32 accumulation per group).

    Needs ``group_size / (32 / bits)`` to be a multiple of 8 (one tile of packed words per
    group): W8 g32+, W4 g64+ (or per-channel); others are refused with a ValueError."""
    check_int_qarray(qa, act_bits)
    gs = qa.spec.group_size
    p = 32 // qa.spec.bits
    if gs != -1 and (gs // p) % 8:
        raise ValueError(f"int_matmul_pallas_tpu: group_size {gs} gives {gs // p} packed rows per "
                         "group; needs a multiple of 8 (W8: g32+, W4: g64+, or per-channel)")
    *lead, k = x.shape
    if k != qa.shape[0]:
        raise ValueError(f"x has {k} input features, the QArray {qa.shape[0]}")
    m = math.prod(lead) if lead else 1
    bm = bm or min(round_up(m, 32), 256)  # int8 operands tile by 32 rows
    n = qa.shape[1]
    bn = bn or (n if n < 256 else 256)
    y = _int_tpu_call(x.reshape(m, k), qa, act_bits=act_bits, act_clip=act_clip, bm=bm, bn=bn,
                      interpret=interpret)
    return y.reshape(*lead, n)


# ----------------------------------------------------------------------------- GPU (Triton)
def _int_gpu_kernel(x_ref, w_ref, s_ref, sx_ref, o_ref, *, bits, gs, nk):
    p = 32 // bits
    rows = gs // p  # packed word rows of one group == plane rows
    off = jnp.int32(1 << (bits - 1))

    def body(kk, acc):
        words = w_ref[pl.ds(kk * rows, rows), :]
        part = None
        for i, q in enumerate(planes_from_words(words, bits)):
            qi = q.astype(jnp.int32) - off  # signed codes [rows, bn]
            xi = x_ref[i, :, pl.ds(kk * rows, rows)]  # int8 [bm, rows]
            if rows >= 16:
                d = jnp.dot(xi, qi.astype(jnp.int8), preferred_element_type=jnp.int32)
            else:  # tl.dot needs K >= 16
                d = jnp.sum(xi.astype(jnp.int32)[:, :, None] * qi[None, :, :], axis=1)
            part = d if part is None else part + d
        return acc + part.astype(jnp.float32) * s_ref[pl.ds(kk, 1), :]

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = (acc * sx_ref[...]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("act_bits", "act_clip", "bm", "bn", "interpret",
                                             "num_warps",
                                             "num_stages"))
def _int_gpu_call(x2, qa, *, act_bits, act_clip, bm, bn, interpret, num_warps, num_stages):
    from jax.experimental.pallas import triton as pltr

    bits = qa.spec.bits
    m, _ = x2.shape
    n = qa.shape[1]
    xq, sx = quantize_per_token(x2, bits=act_bits, clip_ratio=act_clip)
    # the W-A16 GPU kernel's operands, with int8 codes for x: [planes, Mp, Kp/planes]
    x3, words, s, _, gs, kp, mp, np_ = gpu_operands(xq, qa, bm=bm, bn=bn)
    sx = jnp.pad(sx, ((0, mp - m), (0, 0)), constant_values=1.0)
    planes = x3.shape[0]
    out = pl.pallas_call(
        functools.partial(_int_gpu_kernel, bits=bits, gs=gs, nk=kp // gs),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x2.dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((planes, bm, kp // planes), lambda i, j: (0, i, 0)),
            pl.BlockSpec((kp * bits // 32, bn), lambda i, j: (0, j)),
            pl.BlockSpec((kp // gs, bn), lambda i, j: (0, j)),
            pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"jaxquant_w{bits}a{act_bits}_gpu",
    )(x3, words, s, sx)
    return out[:m, :n]


def int_matmul_pallas_gpu(x: jax.Array, qa: QArray, *, act_bits: int = 8, act_clip: float = 1.0,
                          bm: int = 16,
                          bn: int = 64, num_warps: int = 4, num_stages: int = 2,
                          interpret: bool = False) -> jax.Array:
    """W8A8 / W4A4 through the Pallas GPU (Triton) kernel (int8 tensor-core dots, int32 sums per
    group). ``bm`` >= 16 (``tl.dot``'s minimum); any K, N, M (padded)."""
    check_int_qarray(qa, act_bits)
    if bm < 16 or bm & (bm - 1) or bn < 16 or bn & (bn - 1):
        raise ValueError(f"bm and bn must be powers of two >= 16 (Triton blocks), got {bm}, {bn}")
    *lead, k = x.shape
    if k != qa.shape[0]:
        raise ValueError(f"x has {k} input features, the QArray {qa.shape[0]}")
    m = math.prod(lead) if lead else 1
    y = _int_gpu_call(x.reshape(m, k), qa, act_bits=act_bits, act_clip=act_clip, bm=bm, bn=bn,
                      interpret=interpret,
                      num_warps=num_warps, num_stages=num_stages)
    return y.reshape(*lead, qa.shape[1])
