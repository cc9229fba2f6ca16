"""Multi-process (multi-host) plumbing for the calibration engine.

One calibration job can span several processes (the hosts of a TPU pod slice, or several
processes on one machine with the CPU collectives), started with ``jax.distributed``. Every
process runs the same program on the same recipe, model and calibration token ids; the
activations live sharded over a global mesh, so each host holds only its share of the samples,
and the statistics the algorithms read (Hessians, means) are all-reduced by XLA.

What needs care outside XLA is collected here:

* :func:`agree`: the processes must see the same model, recipe and data; a job whose processes
  disagree is refused, on every process, before any calibration work.
* :func:`put`: a host array becomes a global array (each process places only its own shards).
* :func:`to_host`: a block's quantized params, replicated, become host arrays on every process.
* :func:`check_shared_dir`: checkpoints of a multi-process job need a directory every process
  sees (NFS, gcsfuse): orbax writes every shard once, from the process that holds it.

On one process every function degrades to the obvious single-process operation.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class DistributedMismatchError(ValueError):
    """The processes of one multi-process job were given different inputs."""


def is_multi() -> bool:
    return jax.process_count() > 1


def is_writer() -> bool:
    """The process that writes the job's single-copy files (JSON, reports)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    if is_multi():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _allgather(a: np.ndarray) -> np.ndarray:
    """``[P, ...]``: every process's ``a`` (same shape and dtype everywhere)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(a, tiled=False))


def agree(values: dict[str, str], *, job: str = "calibration") -> None:
    """Refuse (on every process) a job whose processes see different ``values`` (fingerprints
    of the model, recipe, data, ...): the error names the field and the processes."""
    if not is_multi():
        return
    keys = sorted(values)
    digests = np.stack([np.frombuffer(hashlib.sha256(str(values[k]).encode()).digest(),
                                      np.uint8) for k in keys])
    every = _allgather(digests)  # [P, K, 32]
    bad = []
    for ki, k in enumerate(keys):
        odd = [p for p in range(every.shape[0]) if not np.array_equal(every[p, ki], every[0, ki])]
        if odd:
            bad.append(f"{k} (processes {odd} differ from process 0)")
    if bad:
        raise DistributedMismatchError(
            f"this {job} runs on {jax.process_count()} processes that were given different "
            f"inputs: {'; '.join(bad)}. Every process must run the same command on the same "
            "files; refusing to start.")


def check_mesh(mesh: Mesh | None) -> None:
    """A multi-process job needs a mesh over every process's devices."""
    if not is_multi():
        return
    if mesh is None:
        raise ValueError(f"a multi-process run ({jax.process_count()} processes) needs a mesh "
                         "over all their devices (mesh=...; the CLI builds one with "
                         "--distributed)")
    procs = {d.process_index for d in mesh.devices.flat}
    if len(procs) != jax.process_count():
        raise ValueError(f"mesh: its devices belong to processes {sorted(procs)}, but the job "
                         f"has {jax.process_count()} processes; the mesh must span all of them")


def put(a, sharding: NamedSharding | None):
    """A global array from the host array ``a`` (the same on every process); each process
    materializes only the shards its devices hold."""
    if sharding is None:
        return jnp.asarray(a)
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def put_tree(tree, sharding: NamedSharding | None):
    return jax.tree.map(lambda a: put(a, sharding), tree)


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def to_host(tree, mesh: Mesh | None):
    """Host (numpy) copies of ``tree``'s arrays on every process: sharded leaves are gathered
    (all-gathered by XLA to a replicated layout) first."""
    if mesh is None or not is_multi():
        return tree
    rep = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
    return jax.tree.map(np.asarray, rep)


def shard_columns(W, mesh: Mesh | None, axis: str | None):
    """``W [in, out]`` with its output columns split over ``mesh``'s ``axis`` (GPTQ and RTN
    treat columns independently, so XLA partitions them without communication); unchanged
    where the columns do not divide evenly."""
    if mesh is None or axis is None or mesh.shape[axis] == 1 or W.shape[-1] % mesh.shape[axis]:
        return W
    spec = PartitionSpec(*([None] * (W.ndim - 1)), axis)
    return jax.device_put(W, NamedSharding(mesh, spec))


def check_shared_dir(path: str) -> None:
    """A multi-process job's checkpoint directory must be the same directory on every process
    (a shared filesystem); refuse, on every process, one that is not."""
    if not is_multi():
        return
    os.makedirs(path, exist_ok=True)
    marker = os.path.join(path, "shared.check")
    token = uuid.uuid4().hex if is_writer() else ""
    if is_writer():
        with open(marker + ".tmp", "w") as f:
            f.write(token)
        os.replace(marker + ".tmp", marker)
    barrier("jaxquant-shared-dir-write")
    seen = open(marker).read() if os.path.isfile(marker) else ""
    digest = np.frombuffer(hashlib.sha256(seen.encode()).digest(), np.uint8)
    every = _allgather(digest)
    barrier("jaxquant-shared-dir-read")
    if any(not np.array_equal(every[p], every[0]) for p in range(every.shape[0])) or not seen:
        raise ValueError(f"{path}: the checkpoint directory of a multi-process job must be one "
                         "directory that every process sees (NFS, a gcsfuse bucket mount); "
                         "the processes see different contents here")
