"""Strict JAX harness for every test.

* 8 fake CPU devices (set before jax is imported), so sharding tests run anywhere.
* Strict dtype promotion and rank promotion that raises: silent upcasts and accidental
  broadcasting are bugs.
* ``tpu`` / ``gpu`` markers skip, with a reason, where that backend is absent.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax
import pytest

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", False)
# No persistent compilation cache, also not the CLI's (in-process `main()` calls and subprocesses
# inherit this): fresh-clone CI runs had xdist workers segfault inside jax's cache write and read
# (compilation_cache.put_executable_and_time / get_executable_and_time) of a shared directory.
os.environ["JAXQUANT_XLA_CACHE"] = ""


def _has_backend(name: str) -> bool:
    try:
        return len(jax.devices(name)) > 0
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tpu" in item.keywords and not _has_backend("tpu"):
            item.add_marker(pytest.mark.skip(reason="needs a TPU backend (none attached)"))
        if "gpu" in item.keywords and not _has_backend("gpu"):
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU backend (none attached)"))
