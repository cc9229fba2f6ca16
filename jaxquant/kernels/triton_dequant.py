"""The W{2,3,4,8}A16 dequant-matmul as a hand-written Triton kernel called through jax-triton.

Optional: ``pip install jaxquant[gpu]`` (jax-triton, triton); importing this module needs a GPU
jaxlib. Same algorithm and input layout as the Pallas GPU kernel in :mod:`.dequant_matmul` (bit
planes of the core packing, plane-major activations, K stepped one group at a time), written
directly in Triton so the block loop, the unpacking and the broadcast multiply-reduce are explicit.
"""

from __future__ import annotations

import functools
import math

import jax
import jax_triton as jt
import triton
import triton.language as tl

from jaxquant.core.qarray import QArray
from jaxquant.kernels.dequant_matmul import check_kernel_qarray, gpu_operands


@triton.jit
def _w_dequant_kernel(x_ptr, w_ptr, s_ptr, sz_ptr, o_ptr, MP, NP, KP,
                      BITS: tl.constexpr, GS: tl.constexpr, P: tl.constexpr, ROWS: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    r = tl.arange(0, ROWS)
    kpp = KP // P  # columns of one plane of x
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    mask = (1 << BITS) - 1
    for g in range(0, KP // GS):
        s = tl.load(s_ptr + g * NP + offs_n)
        sz = tl.load(sz_ptr + g * NP + offs_n)
        for i in tl.static_range(P):
            if BITS == 3:
                base = (g * ROWS + r) * 3
                w0: tl.constexpr = (3 * i) // 32
                sh: tl.constexpr = (3 * i) % 32
                lo = tl.load(w_ptr + (base + w0)[:, None] * NP + offs_n[None, :])
                q = lo >> sh
                if sh + 3 > 32:
                    hi = tl.load(w_ptr + (base + w0 + 1)[:, None] * NP + offs_n[None, :])
                    q = q | (hi << (32 - sh))
                q = q & mask
            else:
                w = tl.load(w_ptr + (g * ROWS + r)[:, None] * NP + offs_n[None, :])
                q = (w >> (BITS * i)) & mask
            deq = q.to(tl.float32) * s[None, :] - sz[None, :]
            xi = tl.load(x_ptr + i * MP * kpp + offs_m[:, None] * kpp
                         + (g * ROWS + r)[None, :]).to(tl.float32)
            if ROWS >= 16:
                acc += tl.dot(xi, deq, allow_tf32=False)
            else:
                acc += tl.sum(xi[:, :, None] * deq[None, :, :], axis=1)
    tl.store(o_ptr + offs_m[:, None] * NP + offs_n[None, :], acc.to(o_ptr.dtype.element_ty))


@functools.partial(jax.jit, static_argnames=("bm", "bn", "num_warps", "num_stages"))
def _call(x2, qa, *, bm, bn, num_warps, num_stages):
    bits = qa.spec.bits
    m, _ = x2.shape
    n = qa.shape[1]
    x3, words, s, sz, gs, kp, mp, np_ = gpu_operands(x2, qa, bm=bm, bn=bn)
    p = x3.shape[0]
    out = jt.triton_call(
        x3, words, s, sz, mp, np_, kp,
        kernel=_w_dequant_kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), x2.dtype),
        grid=(mp // bm, np_ // bn),
        num_warps=num_warps, num_stages=num_stages,
        BITS=bits, GS=gs, P=p, ROWS=gs // p if bits != 3 else gs // 32, BM=bm, BN=bn,
    )
    return out[:m, :n]


def dequant_matmul_jax_triton(x: jax.Array, qa: QArray, *, bm: int = 16, bn: int = 64,
                              num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """``x [..., K] @ qa [K, N]`` through the jax-triton kernel (CUDA only)."""
    check_kernel_qarray(qa, binary=False)
    *lead, k = x.shape
    if k != qa.shape[0]:
        raise ValueError(f"x has {k} input features, the QArray {qa.shape[0]}")
    m = math.prod(lead) if lead else 1
    y = _call(x.reshape(m, k), qa, bm=bm, bn=bn, num_warps=num_warps, num_stages=num_stages)
    return y.reshape(*lead, qa.shape[1])
