"""CLQ (Liu et al. 2025, "CLQ: Cross-Layer Guided Orthogonal-based Quantization for Diffusion
Transformers", arXiv 2509.24416): W4A4 PTQ for DiTs in three parts (methods.md §3).

* **Cross-block calibration (CBC)**: every block is calibrated on the inputs its quantized prefix
  (weights *and* activations quantized) produces, over timesteps drawn across the sampling
  trajectory. This is the calibration engine's default stream (true-sequential); a recipe's
  ``calibration: {inputs: fp}`` calibrates on the fp model's activations instead (the ablation).
* **Orthogonal-based smoothing (OBS)**: ``X W = (X G)(Gᵀ W)`` with ``G = P · H_block``, an
  outlier-aware channel permutation ``P`` and a block-diagonal Hadamard ``H_block``; the math is
  in :mod:`jaxquant.core.orthogonal`, the plumbing in the engine (a rule's ``transform`` key): the
  weight becomes ``Gᵀ W`` offline and the linear's input transform slot applies ``x G`` online,
  before the per-token activation quantizer, on the fake-quant and the integer path alike.
* **Cross-layer parameter search (CLPS)** (:func:`clps_search`): the weight clip ratio ``l`` and
  the activation clip ratio ``r`` of a stage's linears, searched on a grid
  ``l, r = argmin ‖Y_t − Ŷ_t(l, r)‖²`` where ``Y_t`` is the fp output at the *target* downstream
  point: the point (a later stage's input inside the block, or the block output) where the error
  that quantizing this stage causes peaks (found with the unsearched quantizer ``l = r = 1``), not
  the layer's own output. The later layers run in fp on the same (quantized-prefix) input, as in
  the paper's figure. Grid, downstream choice (``max``, ``first``: the nearest point, ``last``:
  the block output) and cost (``rel``: ‖Y − Ŷ‖² / ‖Y‖², ``mse``) are recipe parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.core.qarray import (
    _grouped,
    _range,
    dequantize_codes,
    quantize_codes,
    scale_zero_from_range,
)
from jaxquant.core.spec import QuantSpec
from jaxquant.models.blockspec import get_path, set_path

DOWNSTREAM = ("max", "first", "last")
COSTS = ("rel", "mse")


def fake_quant_weight(W: jax.Array, spec: QuantSpec, clip: jax.Array) -> jax.Array:
    """``Ŵ`` of the min-max quantizer ``spec`` with its range times a traced ``clip`` (the same
    codes as ``quantize(W, replace(spec, clip_ratio=clip))``), float32 ``[K, N]``."""
    if spec.scale_method != "minmax" or spec.codebook != "uniform":
        raise ValueError(f"CLPS searches the min-max uniform quantizer's clip ratio, got "
                         f"scale_method={spec.scale_method!r} codebook={spec.codebook!r}")
    spec.check_weight_shape(W.shape)
    wg = _grouped(W.astype(jnp.float32), spec)
    xmin, xmax = _range(wg, spec)
    c = jnp.asarray(clip, jnp.float32)
    s, z = scale_zero_from_range(c * xmin, c * xmax, spec)
    return dequantize_codes(quantize_codes(wg, s, z, spec), s, z).reshape(W.shape)


def point_errors(Y: Sequence[jax.Array], Y_hat: Sequence[jax.Array], cost: str) -> jax.Array:
    """The error at each downstream point ``[L]``: ``‖Y − Ŷ‖² / ‖Y‖²`` (``rel``) or the mean
    squared error (``mse``)."""
    out = []
    for y, yh in zip(Y, Y_hat, strict=True):
        d = jnp.sum(jnp.square((yh - y).astype(jnp.float32)))
        out.append(d / jnp.maximum(jnp.sum(jnp.square(y.astype(jnp.float32))), 1e-30)
                   if cost == "rel" else d / y.size)
    return jnp.stack(out)


def select(errors: np.ndarray, base: np.ndarray, downstream: str) -> tuple[int, int]:
    """``(best candidate, target point)``: the target is the point where the unsearched
    quantizer's error ``base`` ``[L]`` peaks (``max``), the nearest point (``first``) or the block
    output (``last``); the best candidate minimises ``errors[:, target]`` (first on ties)."""
    if downstream not in DOWNSTREAM:
        raise ValueError(f"CLPS downstream must be one of {DOWNSTREAM}, got {downstream!r}")
    errors = np.asarray(errors)
    target = {"max": int(np.argmax(base)), "first": 0, "last": errors.shape[1] - 1}[downstream]
    return int(np.argmin(errors[:, target])), target


@dataclasses.dataclass
class CLPSResult:
    weight_clip: float
    act_clip: float
    target: int  # index of the downstream point searched on
    errors: np.ndarray  # [C, L]: every candidate at every downstream point
    base: np.ndarray  # [L]: the unsearched quantizer (1, 1)
    grid: list  # [(l, r)] in the order of errors' rows


@functools.partial(jax.jit, static_argnames=("run", "linears", "spec", "act_bits", "cost"))
def _errors_all(params, inputs, cw, ca, *, run, linears, spec, act_bits, cost):
    from jaxquant.nn.linear import ActQuant

    Y = run(params, inputs)
    act = ActQuant(act_bits, 1.0, "fake")

    def one(c):
        wc, ac = c
        p = params
        for lin in linears:
            node = get_path(params, lin)
            node = dict(node, kernel=fake_quant_weight(node["kernel"], spec, wc), act=act,
                        act_clip=ac)
            p = set_path(p, lin, node)
        return point_errors(Y, run(p, inputs), cost)

    return jax.lax.map(one, (cw, ca))


def clps_search(
    run: Callable[[dict, Any], list],
    params: dict,
    inputs: Any,
    linears: Sequence[str],
    spec: QuantSpec,
    act_bits: int,
    grid_w: Sequence[float],
    grid_a: Sequence[float],
    *,
    downstream: str = "max",
    cost: str = "rel",
) -> CLPSResult:
    """Search one weight clip ratio and one activation clip ratio for the ``linears`` of ``params``
    (fp kernels; they share one input) on the grid ``grid_w × grid_a``.

    ``run(params, inputs) -> [Y_1, ..., Y_L]`` evaluates the downstream points (everything after
    these linears runs in fp in ``params``); it is a static argument of a jit, so pass the same
    function object for the same structure (compiled once). Candidates run one after another
    (``lax.map``): memory stays that of one forward."""
    if cost not in COSTS:
        raise ValueError(f"CLPS cost must be one of {COSTS}, got {cost!r}")
    if downstream not in DOWNSTREAM:
        raise ValueError(f"CLPS downstream must be one of {DOWNSTREAM}, got {downstream!r}")
    grid = [(float(w), float(a)) for w in grid_w for a in grid_a]
    if not grid or not all(0.0 < v <= 1.0 for g in grid for v in g):
        raise ValueError(f"CLPS grid must be non-empty ratios in (0, 1], got {grid_w}, {grid_a}")
    grid_all = [*grid, (1.0, 1.0)]  # the last row: the unsearched quantizer
    cw = jnp.asarray([g[0] for g in grid_all], jnp.float32)
    ca = jnp.asarray([g[1] for g in grid_all], jnp.float32)
    E = np.asarray(_errors_all(params, inputs, cw, ca, run=run, linears=tuple(linears),
                               spec=spec, act_bits=int(act_bits), cost=cost))
    if not np.all(np.isfinite(E)):
        raise FloatingPointError("CLPS: non-finite downstream errors (broken inputs?)")
    best, target = select(E[:-1], E[-1], downstream)
    return CLPSResult(grid[best][0], grid[best][1], target, E[:-1], E[-1], grid)
