"""Capture the input of every linear of a decoder block, and accumulate its statistics.

The block runs normally under ``flax.linen.intercept_methods``; each :class:`~jaxquant.nn.Linear`
call records its input under the module path (``self_attn/q_proj``...). Linears that read the same
array (q/k/v; gate/up) share one statistic, so a block needs four Hessians, not seven.

Statistics per distinct input ``x`` (``[..., K]``), accumulated in float32 over tokens:

* ``H = Σ x xᵀ`` ``[K, K]`` (GPTQ's Hessian up to the factor 2),
* ``absmax = max |x|`` ``[K]``, ``sum = Σ x`` ``[K]`` (means), and the token ``count``.

:func:`block_stats` is one jitted pass. Given a mesh, the batch axis of the activations is sharded
over its ``data`` axis and XLA reduces the partial statistics across devices; the result equals
the single-device one up to float32 summation order.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxquant.models.common.config import DecoderConfig
from jaxquant.models.common.decoder import DecoderBlock
from jaxquant.models.common.layers import attention_mask
from jaxquant.nn.linear import Linear

# linears that share one input: the first of each tuple names the statistic
INPUT_GROUPS = (
    ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"),
    ("self_attn/o_proj",),
    ("mlp/gate_proj", "mlp/up_proj"),
    ("mlp/down_proj",),
)
STAT_OF = {p: g[0] for g in INPUT_GROUPS for p in g}
ALL_STATS = tuple(g[0] for g in INPUT_GROUPS)
ATTN_STATS = ("self_attn/q_proj", "self_attn/o_proj")
MLP_STATS = ("mlp/gate_proj", "mlp/down_proj")
# float32 Hessians must not be accumulated through bf16 passes (TPU's default matmul precision);
# on CPU/GPU the default already is float32 and HIGHEST only selects a slower path.
_PRECISION = jax.lax.Precision.HIGHEST if jax.default_backend() == "tpu" else None


def run_block_capture(cfg: DecoderConfig, block_params, x, positions, *, act_bits=None):
    """``(y, {linear path: input})`` for one block (no cache). ``x`` ``[B, T, D]``."""
    seen: dict[str, jax.Array] = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            seen["/".join(context.module.path)] = args[0]
        return next_fun(*args, **kwargs)

    idx = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), positions.shape)
    mask = attention_mask(idx, idx, None, causal=cfg.causal)
    with nn.intercept_methods(interceptor):
        y, _ = DecoderBlock(cfg, act_bits).apply({"params": block_params}, x, positions, mask)
    return y, seen


def _stats_of(x: jax.Array) -> dict:
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    return {
        "H": jnp.matmul(x2.T, x2, precision=_PRECISION),
        "absmax": jnp.max(jnp.abs(x2), axis=0),
        "sum": jnp.sum(x2, axis=0),
        "count": jnp.asarray(x2.shape[0], jnp.float32),
        "finite": jnp.all(jnp.isfinite(x2)),
    }


@functools.partial(jax.jit, static_argnums=0, static_argnames="which")
def _block_stats(cfg, block_params, x, positions, which=ALL_STATS):
    # the block output is not returned, so XLA drops what no statistic needs (down_proj, ...)
    _, seen = run_block_capture(cfg, block_params, x, positions)
    return {k: _stats_of(seen[k]) for k in which}


def merge_stats(a: dict | None, b: dict) -> dict:
    """Combine statistics of two batches."""
    if a is None:
        return b
    out = {}
    for k in b:
        sa, sb = a[k], b[k]
        out[k] = {"H": sa["H"] + sb["H"], "absmax": jnp.maximum(sa["absmax"], sb["absmax"]),
                  "sum": sa["sum"] + sb["sum"], "count": sa["count"] + sb["count"],
                  "finite": sa["finite"] & sb["finite"]}
    return out


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _block_stats_scan(cfg, block_params, x, positions, batch_size, which=ALL_STATS):
    """All batches in one program: ``lax.scan`` over ``[n/bs, bs, T, D]`` summing statistics."""
    n, t, d = x.shape
    xs = x.reshape(n // batch_size, batch_size, t, d)
    ps = positions.reshape(n // batch_size, batch_size, t)
    first = _block_stats(cfg, block_params, xs[0], ps[0], which=which)

    def body(acc, xp):
        return merge_stats(acc, _block_stats(cfg, block_params, xp[0], xp[1], which=which)), None

    acc, _ = jax.lax.scan(body, first, (xs[1:], ps[1:]))
    return acc


def block_stats_all(cfg: DecoderConfig, block_params, x, positions, *, batch_size: int,
                    mesh: Mesh | None = None, which: tuple[str, ...] = ALL_STATS) -> dict:
    """Statistics of one block over all of ``x`` ``[n, T, D]``, ``batch_size`` rows at a time
    (one compiled program when ``batch_size`` divides ``n`` and no mesh is given). ``which``
    names the statistics (first linear of each input group) to compute."""
    if mesh is None and x.shape[0] % batch_size == 0:
        return _block_stats_scan(cfg, block_params, x, positions, batch_size, tuple(which))
    stats = None
    for i in range(0, x.shape[0], batch_size):
        stats = merge_stats(stats, block_stats(cfg, block_params, x[i : i + batch_size],
                                               positions[i : i + batch_size], mesh=mesh,
                                               which=tuple(which)))
    return stats


def block_stats(cfg: DecoderConfig, block_params, x, positions, *, mesh: Mesh | None = None,
                data_axis: str = "data", which: tuple[str, ...] = ALL_STATS):
    """Per-input statistics of one block for a batch ``x`` ``[B, T, D]``.

    With ``mesh``, ``x`` and ``positions`` are sharded over ``data_axis`` (B must divide evenly)
    and the statistics come back replicated.
    """
    if mesh is not None:
        n = mesh.shape[data_axis]
        if x.shape[0] % n:
            raise ValueError(f"batch {x.shape[0]} does not split over {n} '{data_axis}' devices")
        x = jax.device_put(x, NamedSharding(mesh, PartitionSpec(data_axis, None, None)))
        positions = jax.device_put(positions, NamedSharding(mesh, PartitionSpec(data_axis, None)))
        block_params = jax.device_put(block_params, NamedSharding(mesh, PartitionSpec()))
    return _block_stats(cfg, block_params, x, positions, which=tuple(which))
