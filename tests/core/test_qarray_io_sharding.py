"""QArray with orbax (bit-exact save/restore) and jax.sharding (8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, PartitionSpec

import jaxquant as jq
from jaxquant.core import qarray_partition_specs, shard_qarray


@pytest.mark.parametrize("sym", [False, True])
def test_orbax_round_trip_is_bit_exact(tmp_path, sym):
    spec = jq.QuantSpec(bits=3, group_size=32, symmetric=sym, scale_dtype="bfloat16")
    qa = jq.quantize(jax.random.normal(jax.random.key(0), (2, 96, 24), jnp.float32), spec)
    tree = {"layer": {"kernel": qa}}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "q", tree)
    ckpt.wait_until_finished()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    restored = ckpt.restore(tmp_path / "q", target)
    r = restored["layer"]["kernel"]
    assert isinstance(r, jq.QArray) and r.spec == spec and r.in_features == 96
    for a, b in zip(jax.tree.leaves(qa), jax.tree.leaves(r), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jq.dequantize(r)), np.asarray(jq.dequantize(qa)))


def _mesh(shape, names):
    devs = np.array(jax.devices("cpu")[:8]).reshape(shape)
    return Mesh(devs, names)


@pytest.mark.parametrize(
    ("mesh_shape", "names", "pspec"),
    [
        ((8,), ("model",), PartitionSpec(None, "model")),  # shard outputs
        ((8,), ("data",), PartitionSpec("data", None)),  # shard inputs: chunks and groups align
        ((2, 4), ("data", "model"), PartitionSpec("data", "model")),
    ],
)
def test_sharded_qarray_dequantizes_like_unsharded(mesh_shape, names, pspec):
    assert len(jax.devices("cpu")) >= 8, "conftest must fake 8 CPU devices"
    spec = jq.QuantSpec(bits=4, group_size=64)
    w = jax.random.normal(jax.random.key(1), (512, 64), jnp.float32)
    w = jax.device_put(w, jax.devices("cpu")[0])
    qa = jq.quantize(w, spec)
    mesh = _mesh(mesh_shape, names)
    sq = shard_qarray(qa, mesh, pspec)
    n_dev = int(np.prod(mesh_shape))
    assert len(sq.packed.sharding.device_set) == n_dev
    # packed rows and their scales are split along the same axis, the same number of ways
    assert sq.packed.sharding.spec == sq.scale.sharding.spec == sq.zero.sharding.spec
    shard_rows = {s.data.shape for s in sq.packed.addressable_shards}
    scale_rows = {s.data.shape for s in sq.scale.addressable_shards}
    assert len(shard_rows) == 1 and len(scale_rows) == 1
    out = jax.jit(jq.dequantize)(sq)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(jq.dequantize(qa)))


def test_sharding_that_splits_a_group_is_refused():
    spec = jq.QuantSpec(bits=4, group_size=128)
    qa = jq.quantize(jnp.ones((512, 8), jnp.float32), spec)
    with pytest.raises(ValueError, match="whole 32-channel packing chunks and whole groups"):
        qarray_partition_specs(qa, PartitionSpec("data", None), _mesh((8,), ("data",)))
