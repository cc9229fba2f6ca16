"""W{2,3,4,8}A16 group-wise dequant-matmul ``y = x @ (S (Q − Z))`` on the core packing.

Four implementations of one function, each taking ``x [..., K]`` and a :class:`~jaxquant.QArray`
``[K, N]``:

* :func:`dequant_matmul_reference` -- pure jnp: unpack, dequantize, one float32 matmul. The oracle.
* :func:`dequant_matmul_xla` -- what CPU uses: dequantize to the activation dtype, XLA matmul.
* :func:`dequant_matmul_pallas_tpu` -- a Pallas TPU (Mosaic) kernel.
* :func:`dequant_matmul_pallas_gpu` -- a Pallas GPU kernel (Triton backend).

How the kernels read the core packing without repacking it. For ``b`` in {2, 4, 8} a word never
splits a code: packed row ``R`` holds input rows ``p·R + i`` (``p = 32/b``, code ``i`` at bits
``[b·i, b·i + b)``). Shifting a whole tile of words by ``b·i`` gives *plane* ``i``: the codes of
rows ``i, p + i, 2p + i, ...``. The kernel multiplies plane ``i`` with the matching activation
columns, which the wrapper gathers beforehand into a plane-major copy of ``x``
(``x3[i, m, r] = x[m, p·r + i]`` per K tile), so every in-kernel access is a contiguous block and
``Σ_i x3[i] @ deq(plane_i)`` is exactly ``x @ W``. For 3 bits a 32-code chunk spans 3 words and
codes 10 and 21 straddle words: the kernel loads word ``w`` of every chunk with a stride-3 row
load, builds the 32 planes (``j``: rows ``32c + j``) by shifts and ors, and ``x3`` is ordered by
``j`` instead.

Group scales: in plane ``i`` the row ``r`` belongs to group ``r // (g/p)`` (``g // 32`` chunks per
group for 3 bits), the same for every plane. The TPU kernel expands a tile's ``[G_t, bn]`` scales
to plane rows with a 0/1 matrix product (exact); the GPU kernel steps K one group at a time, so
its scale is one broadcast row.

Binary-coded weights (``spec.codebook == "binary"``, D²Quant's DSQ): the code of every entry is
its sign bits, stored in the same words (bit ``p`` of the code is sign plane ``p``), and
``ŵ = Σ_p r_p (2·bit_p − 1) = Σ_p (2 r_p)·bit_p − Σ_p r_p`` with plane scales ``r`` per (group,
output channel). The wrappers pass ``2r`` as a ``[bits, G, N]`` scale operand and ``Σ_p r_p`` in the
place of ``scale·zero``; the kernels take the code's bits with shifts and sum the planes with
their expanded scales. Same words, same activation layout, one extra scale row per plane.

Shapes that do not fill a block are zero-padded by the wrappers (M, N, K; padded codes meet zero
activations and zero scales) and sliced back. Group sizes must be multiples of 32 (a chunk never
spans two groups) or ``-1`` (per output channel), else the kernels refuse with a ValueError.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxquant.core import packing
from jaxquant.core.qarray import QArray, dequantize

HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- references
def dequant_matmul_reference(x: jax.Array, qa: QArray) -> jax.Array:
    """``x @ Ŵ`` in float32 (HIGHEST precision), returned in ``x.dtype``."""
    w = dequantize(qa, dtype=jnp.float32)
    y = jnp.matmul(x.astype(jnp.float32), w, precision=HIGHEST)
    return y.astype(x.dtype)


def dequant_matmul_xla(x: jax.Array, qa: QArray) -> jax.Array:
    """The XLA path: dequantize to the activation dtype, then an XLA matmul (CPU's path)."""
    return jnp.matmul(x, dequantize(qa, dtype=x.dtype))


# ----------------------------------------------------------------------------- shared prep
def check_kernel_qarray(qa: QArray, *, binary: bool = True) -> None:
    """Raise ValueError when ``qa`` is outside what the kernels implement (``binary=False``: a
    kernel that implements only the uniform codebook)."""
    if not isinstance(qa, QArray):
        raise ValueError(f"expected a QArray kernel, got {type(qa).__name__}")
    if qa.ndim != 2:
        raise ValueError(f"the kernels take one [K, N] matrix, got a QArray of shape {qa.shape}")
    if qa.spec.bits not in (2, 3, 4, 8):
        raise ValueError(f"the kernels implement 2, 3, 4 and 8 bits, not {qa.spec.bits}")
    if qa.spec.per_tensor:
        raise ValueError("the kernels take group-wise or per-channel scales, not per_tensor")
    if qa.spec.codebook not in (("uniform", "binary") if binary else ("uniform",)):
        raise ValueError(f"this kernel implements the uniform codebook, not "
                         f"{qa.spec.codebook!r} (a binary-coded DSQ weight runs on the Pallas "
                         "kernels or the XLA dequantize path)")
    gs = qa.spec.group_size
    if gs != -1 and gs % 32:
        raise ValueError(f"group_size {gs} is not a multiple of 32: a 32-code packing chunk would "
                         "span two groups; use group_size 32/64/128/... or -1")


def round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _pad2(a, rows: int, cols: int):
    return jnp.pad(a, ((0, rows - a.shape[0]), (0, cols - a.shape[1])))


def _prepare(qa: QArray, *, eff_gs: int, bn: int, kp: int):
    """Packed words, float32 scale and scale·zero padded to ``kp`` input rows and a multiple of
    ``bn`` columns, with the scales re-expressed for groups of ``eff_gs`` rows (a per-channel or
    larger group's row is repeated; exact). Binary-coded: the scale is ``2r`` ``[bits, G, N]``
    and the offset ``Σ_p r_p`` ``[G, N]`` (returned in the place of scale·zero)."""
    b = qa.spec.bits
    _, n = qa.shape
    gs = qa.spec.group_size
    if qa.spec.codebook == "binary":
        r = qa.scale.astype(jnp.float32)  # [G, N, bits]
        s, off = jnp.moveaxis(2.0 * r, -1, 0), jnp.sum(r, axis=-1)  # [bits, G, N], [G, N]
    else:
        s = qa.scale.astype(jnp.float32)
        off = s * qa.zero_point()
        s = s[None]
    # group rows -> rows of eff_gs input channels (a per-channel / larger group repeated; exact)
    rep = kp // eff_gs if gs == -1 else gs // eff_gs
    if gs != -1 and gs % eff_gs:
        raise ValueError(f"group_size {gs} is not a multiple of the kernel's {eff_gs}")
    s, off = jnp.repeat(s, rep, axis=1), jnp.repeat(off, rep, axis=0)
    np_ = round_up(n, bn)
    words = _pad2(qa.packed, kp * b // 32, np_)
    g = kp // eff_gs
    s = jnp.stack([_pad2(sp, g, np_) for sp in s])
    return words, (s if qa.spec.codebook == "binary" else s[0]), _pad2(off, g, np_), np_


def _x_planes(x2, *, bits: int, bk: int, kp: int, mp: int):
    """``x [M, K] -> x3 [planes, Mp, Kp/planes]``: per K tile, the columns each plane multiplies."""
    m, k = x2.shape
    x2 = jnp.pad(x2, ((0, mp - m), (0, kp - k)))
    p = 32 if bits == 3 else 32 // bits  # planes
    rows = bk // p
    x4 = x2.reshape(mp, kp // bk, rows, p)  # column t·bk + p·r + i  ->  [t, r, i]
    return x4.transpose(3, 0, 1, 2).reshape(p, mp, kp // p)


def planes_from_words(words, bits: int):
    """The integer planes of a tile of words (b in {2,4,8}: words ``[rows, bn]``; b = 3: a list
    of the 3 word rows of every chunk, each ``[C, bn]``). Returns a list of uint32 planes."""
    mask = jnp.uint32((1 << bits) - 1)
    if bits != 3:
        return [(words >> jnp.uint32(bits * i)) & mask for i in range(32 // bits)]
    out = []
    for j in range(32):
        w0, sh = divmod(3 * j, 32)
        v = words[w0] >> jnp.uint32(sh)
        if sh + 3 > 32:
            v = v | (words[w0 + 1] << jnp.uint32(32 - sh))
        out.append(v & mask)
    return out


def dequant_plane(q, s_rows, sz_rows):
    """One plane's dequantized tile (float32) from its integer codes ``q`` (uint32): uniform
    ``q·s − s·z`` with ``s_rows`` one array; binary-coded ``Σ_p bit_p(q)·(2 r_p) − Σ_p r_p`` with
    ``s_rows`` the list of the planes' ``2 r_p``."""
    if not isinstance(s_rows, list):
        return q.astype(jnp.float32) * s_rows - sz_rows
    deq = -sz_rows
    for p, sp in enumerate(s_rows):
        deq = deq + ((q >> jnp.uint32(p)) & jnp.uint32(1)).astype(jnp.float32) * sp
    return deq


# ----------------------------------------------------------------------------- TPU (Mosaic)
def _tpu_kernel(x_ref, w_ref, s_ref, sz_ref, o_ref, acc_ref, *, bits, gs, bk, nk, binary):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    p = 32 if bits == 3 else 32 // bits
    rows = bk // p
    if bits == 3:
        words = [w_ref[pl.ds(w, rows, stride=3), :] for w in range(3)]
        per = gs // 32
    else:
        words = w_ref[...]
        per = gs // p
    g_t = bk // gs
    # 0/1 expansion of the tile's group rows to plane rows (exact in float32)
    # (lax.div: iota is non-negative, and jnp's floor division lowers through sign)
    r = jax.lax.div(jax.lax.broadcasted_iota(jnp.int32, (rows, g_t), 0), jnp.int32(per))
    g = jax.lax.broadcasted_iota(jnp.int32, (rows, g_t), 1)
    e = (r == g).astype(jnp.float32)
    if binary:  # one expanded 2·r row block per sign plane
        s_rows = [jnp.dot(e, s_ref[p], precision=HIGHEST, preferred_element_type=jnp.float32)
                  for p in range(bits)]
    else:
        s_rows = jnp.dot(e, s_ref[...], precision=HIGHEST, preferred_element_type=jnp.float32)
    sz_rows = jnp.dot(e, sz_ref[...], precision=HIGHEST, preferred_element_type=jnp.float32)
    cdt = x_ref.dtype
    prec = HIGHEST if cdt == jnp.float32 else None
    acc = acc_ref[...]
    for i, q in enumerate(planes_from_words(words, bits)):
        deq = dequant_plane(q, s_rows, sz_rows).astype(cdt)
        acc += jnp.dot(x_ref[i], deq, precision=prec, preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(kk == nk - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def tpu_block_sizes(qa: QArray, m: int) -> dict:
    """Static block sizes for the TPU kernel from the tuned table (see :mod:`.tuning`)."""
    from jaxquant.kernels.tuning import lookup

    return lookup("pallas_tpu", bits=qa.spec.bits, m=m, k=qa.shape[0], n=qa.shape[1])


@functools.partial(jax.jit, static_argnames=("bm", "bn", "bk", "interpret"))
def _tpu_call(x2, qa, *, bm, bn, bk, interpret):
    bits = qa.spec.bits
    m, _ = x2.shape
    k, n = qa.shape
    kp = round_up(packing.padded_in_features(k), bk)
    mp = round_up(m, bm)
    nk = kp // bk
    gs = qa.spec.group_size
    if gs == -1 or gs > bk:  # >= 8 scale rows per K block when there are several blocks
        gs = bk if nk == 1 else bk // 8
    words, s, sz, np_ = _prepare(qa, eff_gs=gs, bn=bn, kp=kp)
    x3 = _x_planes(x2, bits=bits, bk=bk, kp=kp, mp=mp)
    p = x3.shape[0]
    binary = qa.spec.codebook == "binary"
    s_spec = (pl.BlockSpec((bits, bk // gs, bn), lambda i, j, kk: (0, kk, j)) if binary
              else pl.BlockSpec((bk // gs, bn), lambda i, j, kk: (kk, j)))
    from jax.experimental.pallas import tpu as pltpu

    out = pl.pallas_call(
        functools.partial(_tpu_kernel, bits=bits, gs=gs, bk=bk, nk=nk, binary=binary),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x2.dtype),
        grid=(mp // bm, np_ // bn, nk),
        in_specs=[
            pl.BlockSpec((p, bm, bk // p), lambda i, j, kk: (0, i, kk)),
            pl.BlockSpec((bk * bits // 32, bn), lambda i, j, kk: (kk, j)),
            s_spec,
            pl.BlockSpec((bk // gs, bn), lambda i, j, kk: (kk, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j)),
        scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=f"jaxquant_w{bits}a16{'_bc' if binary else ''}_tpu",
    )(x3, words, s, sz)
    return out[:m, :n]


def _kernel_blocks(qa: QArray, m: int, x_dtype, *, bm, bn, bk, gpu: bool) -> tuple[int, int, int]:
    k, n = qa.shape
    bits = qa.spec.bits
    kp32 = packing.padded_in_features(k)
    sub = 16 if jnp.dtype(x_dtype).itemsize == 2 else 8
    if gpu:
        bm = bm or 16
        bn = bn or 64
        gs = qa.spec.group_size
        bk = bk or (gs if gs != -1 and gs <= 128 else 128)
        return bm, bn, bk
    p = 32 if bits == 3 else 32 // bits
    gs = qa.spec.group_size
    bm = bm or min(round_up(m, sub), 256)
    bn = bn or (n if n < 256 else 256)
    if bk is None:
        # several K steps need lane-dense plane rows (bk/p a multiple of 128) and scale blocks
        # of >= 8 group rows; a K that fits is done in one step with whole-array blocks
        bk = 128 * p if gs == -1 else math.lcm(128 * p, 8 * gs)
        if kp32 <= bk:
            bk = kp32 if gs == -1 else round_up(kp32, math.lcm(32, gs))
    if bk % 32 or (qa.spec.group_size != -1 and qa.spec.group_size <= bk
                   and bk % qa.spec.group_size):
        raise ValueError(f"K block {bk} must be a multiple of 32 and of the group size "
                         f"{qa.spec.group_size}")
    return bm, bn, bk


def dequant_matmul_pallas_tpu(x: jax.Array, qa: QArray, *, bm: int | None = None,
                              bn: int | None = None, bk: int | None = None,
                              interpret: bool = False) -> jax.Array:
    """``x [..., K] @ qa [K, N]`` with the Pallas TPU kernel. Block sizes are static, keyword
    only; None takes the tuned table's entry or a shape-derived default."""
    check_kernel_qarray(qa)
    *lead, k = x.shape
    if k != qa.shape[0]:
        raise ValueError(f"x has {k} input features, the QArray {qa.shape[0]}")
    m = math.prod(lead) if lead else 1
    if bm is None and bn is None and bk is None:
        t = tpu_block_sizes(qa, m)
        bm, bn, bk = t.get("bm"), t.get("bn"), t.get("bk")
    bm, bn, bk = _kernel_blocks(qa, m, x.dtype, bm=bm, bn=bn, bk=bk, gpu=False)
    y = _tpu_call(x.reshape(m, k), qa, bm=bm, bn=bn, bk=bk, interpret=interpret)
    return y.reshape(*lead, qa.shape[1])


# ----------------------------------------------------------------------------- GPU (Triton)
def _gpu_kernel(x_ref, w_ref, s_ref, sz_ref, o_ref, *, bits, gs, nk, binary):
    """One program per (M block, N block); loops over K one group at a time."""
    p = 32 if bits == 3 else 32 // bits
    rows = gs // p
    wrows = gs * bits // 32

    def body(kk, acc):
        if bits == 3:
            words = [w_ref[pl.ds(kk * wrows + w, rows, stride=3), :] for w in range(3)]
        else:
            words = w_ref[pl.ds(kk * wrows, wrows), :]
        if binary:
            s = [s_ref[p, pl.ds(kk, 1), :] for p in range(bits)]
        else:
            s = s_ref[pl.ds(kk, 1), :]
        sz = sz_ref[pl.ds(kk, 1), :]
        for i, q in enumerate(planes_from_words(words, bits)):
            deq = dequant_plane(q, s, sz)  # [rows, bn]
            xi = x_ref[i, :, pl.ds(kk * rows, rows)].astype(jnp.float32)  # [bm, rows]
            if rows >= 16:
                acc += jnp.dot(xi, deq)
            else:  # tl.dot needs K >= 16: a broadcast multiply-reduce instead
                acc += jnp.sum(xi[:, :, None] * deq[None, :, :], axis=1)
        return acc

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def gpu_operands(x2, qa: QArray, *, bm: int, bn: int):
    """The GPU kernels' padded operands (Pallas GPU and jax-triton share them): K is stepped one
    group at a time (per-channel: 128 rows), ``x`` is plane-major per group. Returns
    ``(x3, words, s, sz, gs, kp, mp, np)``."""
    gs = 128 if qa.spec.group_size == -1 else qa.spec.group_size
    kp = round_up(packing.padded_in_features(qa.shape[0]), gs)
    mp = round_up(x2.shape[0], bm)
    words, s, sz, np_ = _prepare(qa, eff_gs=gs, bn=bn, kp=kp)
    x3 = _x_planes(x2, bits=qa.spec.bits, bk=gs, kp=kp, mp=mp)
    return x3, words, s, sz, gs, kp, mp, np_


@functools.partial(jax.jit, static_argnames=("bm", "bn", "interpret", "num_warps",
                                             "num_stages"))
def _gpu_call(x2, qa, *, bm, bn, interpret, num_warps, num_stages):
    from jax.experimental.pallas import triton as pltr

    bits = qa.spec.bits
    m, _ = x2.shape
    n = qa.shape[1]
    x3, words, s, sz, gs, kp, mp, np_ = gpu_operands(x2, qa, bm=bm, bn=bn)
    p = x3.shape[0]
    binary = qa.spec.codebook == "binary"
    s_spec = (pl.BlockSpec((bits, kp // gs, bn), lambda i, j: (0, 0, j)) if binary
              else pl.BlockSpec((kp // gs, bn), lambda i, j: (0, j)))
    out = pl.pallas_call(
        functools.partial(_gpu_kernel, bits=bits, gs=gs, nk=kp // gs, binary=binary),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x2.dtype),
        grid=(mp // bm, np_ // bn),
        in_specs=[
            pl.BlockSpec((p, bm, kp // p), lambda i, j: (0, i, 0)),
            pl.BlockSpec((kp * bits // 32, bn), lambda i, j: (0, j)),
            s_spec,
            pl.BlockSpec((kp // gs, bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        compiler_params=pltr.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"jaxquant_w{bits}a16{'_bc' if binary else ''}_gpu",
    )(x3, words, s, sz)
    return out[:m, :n]


def dequant_matmul_pallas_gpu(x: jax.Array, qa: QArray, *, bm: int | None = None,
                              bn: int | None = None, num_warps: int = 4, num_stages: int = 2,
                              interpret: bool = False) -> jax.Array:
    """``x [..., K] @ qa [K, N]`` with the Pallas GPU (Triton backend) kernel."""
    check_kernel_qarray(qa)
    *lead, k = x.shape
    if k != qa.shape[0]:
        raise ValueError(f"x has {k} input features, the QArray {qa.shape[0]}")
    m = math.prod(lead) if lead else 1
    if bm is None and bn is None:
        from jaxquant.kernels.tuning import lookup

        t = lookup("pallas_gpu", bits=qa.spec.bits, m=m, k=k, n=qa.shape[1])
        bm, bn = t.get("bm"), t.get("bn")
    bm, bn, _ = _kernel_blocks(qa, m, x.dtype, bm=bm, bn=bn, bk=None, gpu=True)
    y = _gpu_call(x.reshape(m, k), qa, bm=bm, bn=bn, interpret=interpret,
                  num_warps=num_warps, num_stages=num_stages)
    return y.reshape(*lead, qa.shape[1])
