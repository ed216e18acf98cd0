"""The per-case manifest: every stored object of a case with its size and checksums.

Written at conversion into the case's ``zarr.json``; strict reads (:mod:`ctzarr.io.strict`) and
``ctzarr verify`` check stored objects against it, so that a missing, truncated, replaced or
swapped object is an error naming the array and the chunk.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c
import numpy as np

from ctzarr.errors import MetadataError

MANIFEST_VERSION = 1


#: node names ctzarr writes: segmentation names, levels, "labels", "index", "histogram", "nifti"
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """crc32c of a buffer (hardware accelerated)."""
    return int(_crc32c.crc32c(data))


# -- the manifest -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardRecord:
    """One stored object (a shard, or a whole chunk of an unsharded array)."""

    nbytes: int
    crc32c: int
    index_crc32c: int | None  # crc32c of the shard index (its last bytes); None: not sharded

    def to_json(self) -> list[int | None]:
        return [self.nbytes, self.crc32c, self.index_crc32c]

    @classmethod
    def from_json(cls, value: Any) -> ShardRecord:
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, int) and v >= 0 for v in value[:2])
            or not (value[2] is None or (isinstance(value[2], int) and value[2] >= 0))
        ):
            raise ValueError(f"malformed manifest record {value!r}")
        return cls(int(value[0]), int(value[1]), None if value[2] is None else int(value[2]))


@dataclass(frozen=True)
class Manifest:
    """Every object of a case: array path (relative to the case) -> chunk key -> record."""

    arrays: Mapping[str, Mapping[str, ShardRecord]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            "arrays": {
                path: {key: rec.to_json() for key, rec in sorted(recs.items())}
                for path, recs in sorted(self.arrays.items())
            },
        }

    @classmethod
    def from_dict(cls, value: Any, where: str = "") -> Manifest:
        """Parse a stored manifest; raises :class:`~ctzarr.errors.MetadataError` (a
        :class:`~ctzarr.errors.ChunkCorruptError`) when it is malformed."""
        try:
            if not isinstance(value, dict) or value.get("version") != MANIFEST_VERSION:
                raise ValueError("unknown manifest version")
            arrays = value["arrays"]
            if not isinstance(arrays, dict):
                raise ValueError("no arrays")
            parsed = {}
            for path, recs in arrays.items():
                check_relative_path(path)
                if not isinstance(recs, dict):
                    raise ValueError(f"array {path!r}: not a mapping")
                for key in recs:
                    if not _CHUNK_KEY.match(key):
                        raise ValueError(f"array {path!r}: bad chunk key {key!r}")
                parsed[path] = {k: ShardRecord.from_json(v) for k, v in recs.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise MetadataError(
                where, "ctzarr.manifest", f"malformed chunk manifest: {exc}"
            ) from exc
        return cls(parsed)

    def records(self, array_path: str) -> Mapping[str, ShardRecord]:
        return self.arrays.get(array_path, {})


_CHUNK_KEY = re.compile(r"^c(/\d{1,9}){1,8}$")


class ManifestBuilder:
    """Collects the records of the objects a case writer stores (thread-safe)."""

    def __init__(self) -> None:
        self._arrays: dict[str, dict[str, ShardRecord]] = {}
        self._lock = threading.Lock()

    def add(self, array_path: str, key: str, data: bytes | None, index_nbytes: int | None) -> None:
        """Record one stored object (``data`` None: the object was not stored, all fill)."""
        with self._lock:
            recs = self._arrays.setdefault(array_path, {})
            if data is None:
                recs.pop(key, None)
                return
            index_crc = None if index_nbytes is None else crc32c(data[-index_nbytes:])
            recs[key] = ShardRecord(len(data), crc32c(data), index_crc)

    def build(self) -> Manifest:
        with self._lock:
            return Manifest({p: dict(r) for p, r in self._arrays.items()})


def check_relative_path(path: str) -> None:
    """Raise ValueError unless ``path`` is a plain relative node path (no ``..``, no ``__``)."""
    parts = path.split("/")
    if not path or any(not NODE_NAME.match(p) or p.startswith("__") for p in parts):
        raise ValueError(f"node path {path!r} is not a plain relative name")
