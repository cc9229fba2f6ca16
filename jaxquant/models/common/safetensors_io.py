"""A torch-free safetensors reader with validating errors, one tensor (or row) at a time.

The format: 8 bytes little-endian header length ``n``, ``n`` bytes of JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``), then the raw
little-endian tensor bytes. We parse the header ourselves so that bfloat16 and float8 (through
``ml_dtypes``) work with plain numpy, each tensor is read only when asked for (``get_rows``: only
some rows of it), and every
inconsistency raises a ValueError that names the file and the tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """One ``.safetensors`` file: ``keys()``, ``shape(name)``, ``get(name)``, ``get_rows``."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{self.path}: corrupt safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError(
                    f"{self.path}: corrupt safetensors header (claims {n} header bytes, file has "
                    f"{size - 8})"
                )
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        data_len = size - self._base
        self._info = {}
        for name, info in header.items():
            try:
                dtype = np.dtype(_DTYPES[info["dtype"]])
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{self.path}: tensor {name!r} has a malformed header entry {info!r}"
                ) from None
            if end > data_len or begin > end:
                raise ValueError(
                    f"{self.path}: tensor {name!r} lies beyond the end of the file (bytes "
                    f"{begin}..{end} of {data_len}); the file is truncated or corrupt"
                )
            if (end - begin) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise ValueError(
                    f"{self.path}: tensor {name!r} has {end - begin} bytes, but shape {shape} "
                    f"of {info['dtype']} needs {int(np.prod(shape)) * dtype.itemsize}"
                )
            self._info[name] = (dtype, shape, begin)

    def keys(self) -> list[str]:
        return list(self._info)

    def __contains__(self, name: str) -> bool:
        return name in self._info

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor, read from the file into a fresh array. (Not a memory map: pages of a
        mapping stay resident and count in the process's RSS, so streaming a checkpoint larger
        than memory block by block would look, and on a loaded host act, like holding it.)"""
        if name not in self._info:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        dtype, shape, begin = self._info[name]
        count = int(np.prod(shape, dtype=np.int64))
        a = np.fromfile(self.path, dtype=dtype, count=count, offset=self._base + begin)
        return a.reshape(shape)

    def get_rows(self, name: str, rows) -> np.ndarray:
        """Rows ``rows`` of a tensor (an embedding table's, for the tokens at hand), read
        without the rest of it."""
        if name not in self._info:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        dtype, shape, begin = self._info[name]
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= shape[0]):
            raise ValueError(f"{self.path}: {name!r} has {shape[0]} rows; asked for row "
                             f"{int(rows.max() if rows.max() >= shape[0] else rows.min())}")
        per = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
        out = np.empty((rows.size, *shape[1:]), dtype)
        with open(self.path, "rb") as f:
            for i, r in enumerate(rows):
                f.seek(self._base + begin + int(r) * per)
                out[i] = np.frombuffer(f.read(per), dtype).reshape(shape[1:])
        return out


class SafetensorsDir:
    """All safetensors of an HF directory: single file, or sharded with ``*.index.json``."""

    def __init__(self, directory: str | os.PathLike, stem: str = "model"):
        """``stem``: the file name before ``.safetensors`` (diffusers: ``diffusion_pytorch_model``
        or ``diffusion_pytorch_model.<variant>``)."""
        self.directory = os.fspath(directory)
        index = os.path.join(self.directory, f"{stem}.safetensors.index.json")
        single = os.path.join(self.directory, f"{stem}.safetensors")
        self._where: dict[str, SafetensorsFile] = {}
        if os.path.isfile(index):
            with open(index) as f:
                try:
                    weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError):
                    raise ValueError(f"{index}: corrupt index (expected a 'weight_map')") from None
            files: dict[str, SafetensorsFile] = {}
            for name, fname in weight_map.items():
                if fname not in files:
                    shard = os.path.join(self.directory, fname)
                    if not os.path.isfile(shard):
                        held = sum(1 for f in weight_map.values() if f == fname)
                        raise FileNotFoundError(
                            f"{index}: shard {fname!r} (holding {held} tensors, e.g. {name!r}) "
                            f"is missing from {self.directory}")
                    files[fname] = SafetensorsFile(shard)
                if name not in files[fname]:
                    raise ValueError(f"{index}: tensor {name!r} is not in shard {fname}")
                self._where[name] = files[fname]
        elif os.path.isfile(single):
            st = SafetensorsFile(single)
            self._where = dict.fromkeys(st.keys(), st)
        else:
            found = sorted(f for f in os.listdir(self.directory) if f.endswith(".safetensors")) \
                if os.path.isdir(self.directory) else []
            raise FileNotFoundError(
                f"{self.directory}: no {stem}.safetensors or {stem}.safetensors.index.json "
                f"(safetensors files here: {found or 'none'}; pickled .bin checkpoints are not "
                "loaded)")

    def keys(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"{self.directory}: checkpoint has no tensor {name!r}")
        return self._where[name].get(name)

    def get_rows(self, name: str, rows) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"{self.directory}: checkpoint has no tensor {name!r}")
        return self._where[name].get_rows(name, rows)
