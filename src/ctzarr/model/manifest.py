"""The commit record of a case and of the collection: every stored object with its size and
digests, and digests of every metadata document an answer depends on.

Written at conversion into the case's ``zarr.json`` (and, for the collection table and the
collection itself, into their ``zarr.json``); strict reads (:mod:`ctzarr.io.strict`) and
``ctzarr verify`` check stored objects and documents against it, so that a missing, truncated,
replaced, forged or swapped object or document is an error naming the array and the chunk.

Why digests, and why these:

- Format 1 kept a crc32c of each whole object. Every object ctzarr stores already *ends in its
  own crc32c* (the codec chain's last step, and the shard index's): the crc32c of bytes that end
  in their own crc32c is a constant residue (0x48674BC7 for crc32c), whatever the bytes are. Those
  records therefore checked sizes only: a chunk re-encoded to the same size, or a same-size
  object swapped in from another case, passed. A crc is also linear: anyone can forge a chunk
  with a chosen crc in microseconds. It detects accidental flips inside one chunk, nothing more.
- Format 2 records a cryptographic digest (BLAKE3 from the PyPI ``blake3`` package, the BLAKE3
  team's own binding, 16 bytes of output) of every object, of every shard index and of every
  inner chunk. BLAKE3 rather than hashlib's SHA-256 or BLAKE2b: a conversion hashes every
  stored byte twice (inner chunks and whole objects) and a crop every inner chunk it reads,
  and on the 2-core development machine BLAKE3 ran 6.7 GB/s on 150 KB chunks against 1.7 GB/s
  for SHA-256 (SHA-NI) and 0.9 GB/s for BLAKE2b: with SHA-256 the digests cost a warm crop
  ~1.4 ms (12 %) and a conversion ~8 %. 128 bits keep a second preimage (what a forger of one
  chunk needs) at 2^128 work, and the manifest small (an inner chunk costs 22 characters of
  base64).
- Inner-chunk digests let a crop check exactly the bytes it reads (a few inner chunks of a
  shard, never the whole shard): the shard index is checked against its digest, then each inner
  chunk read against its own.
- Metadata documents (the case's attributes: affine, scaling, geometry; each array's metadata
  with its chunk records; each group's attributes: label names, index tables) are digested as
  canonical JSON and **bound to their owner** (the case id, the collection table, the
  collection), so a document copied from another case, or a case's objects and documents
  swapped with another's, fail the check although each is internally valid.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import crc32c as _crc32c
import numpy as np
from blake3 import blake3

from ctzarr.errors import MetadataError

#: version of the manifest block (1: sizes and crc32c; 2: sizes and digests)
MANIFEST_VERSION = 2

#: the digest of format 2: 16 bytes of BLAKE3 output (see the module docstring)
DIGEST_ALGORITHM = "blake3-128"

DIGEST_BYTES = 16

#: node names ctzarr writes: segmentation names, levels, "labels", "index", "histogram", "nifti"
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_INDEX_ENTRY = 16  # (offset, nbytes) as two little-endian uint64
_EMPTY = 2**64 - 1
_CRC = 4


def crc32c(data: bytes | memoryview | np.ndarray) -> int:
    """crc32c of a buffer (hardware accelerated)."""
    return int(_crc32c.crc32c(data))


def digest(data: bytes | memoryview) -> bytes:
    """The format-2 digest of a buffer (16 bytes)."""
    return blake3(data).digest(DIGEST_BYTES)


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no spaces, tuples as lists."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str
    ).encode()


def _hex(data: bytes) -> str:
    return data.hex()


def _unhex(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * DIGEST_BYTES:
        raise ValueError(f"{what}: expected {2 * DIGEST_BYTES} hex digits, got {value!r}")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError(f"{what}: expected hex digits, got {value!r}") from None


# -- the manifest -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardRecord:
    """One stored object (a shard, or a whole chunk of an unsharded array).

    Format 1 records carry ``crc32c`` and ``index_crc32c`` (sizes only, in effect: see the module
    docstring); format 2 records carry ``digest`` (the whole object), ``index_digest`` (the shard
    index) and ``inner`` (the digests of the stored inner chunks, concatenated in index order).
    """

    nbytes: int
    crc32c: int | None = None
    index_crc32c: int | None = None
    digest: bytes | None = None
    index_digest: bytes | None = None
    inner: bytes | None = None

    @property
    def has_digests(self) -> bool:
        return self.digest is not None

    def inner_digest(self, rank: int) -> bytes | None:
        """Digest of the ``rank``-th stored inner chunk (None: not recorded)."""
        if self.inner is None:
            return None
        d = self.inner[rank * DIGEST_BYTES : (rank + 1) * DIGEST_BYTES]
        return d if len(d) == DIGEST_BYTES else None

    def to_json(self) -> list[Any]:
        if self.digest is None:
            return [self.nbytes, self.crc32c, self.index_crc32c]
        return [
            self.nbytes,
            _hex(self.digest),
            None if self.index_digest is None else _hex(self.index_digest),
            None if self.inner is None else base64.b64encode(self.inner).decode("ascii"),
        ]

    @classmethod
    def from_json(cls, value: Any, version: int = MANIFEST_VERSION) -> ShardRecord:
        if version == 1:
            if (
                not isinstance(value, list)
                or len(value) != 3
                or not all(isinstance(v, int) and v >= 0 for v in value[:2])
                or not (value[2] is None or (isinstance(value[2], int) and value[2] >= 0))
            ):
                raise ValueError(f"malformed manifest record {value!r}")
            return cls(int(value[0]), int(value[1]), None if value[2] is None else int(value[2]))
        if (
            not isinstance(value, list)
            or len(value) != 4
            or isinstance(value[0], bool)
            or not isinstance(value[0], int)
            or value[0] < 0
        ):
            raise ValueError(f"malformed manifest record {str(value)[:80]!r}")
        inner = None
        if value[3] is not None:
            try:
                inner = base64.b64decode(value[3], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise ValueError("malformed inner chunk digests") from None
            if len(inner) % DIGEST_BYTES:
                raise ValueError("malformed inner chunk digests")
        return cls(
            int(value[0]),
            digest=_unhex(value[1], "digest"),
            index_digest=None if value[2] is None else _unhex(value[2], "index digest"),
            inner=inner,
        )


@dataclass(frozen=True)
class Manifest:
    """Every object of a case: array path (relative to the case) -> chunk key -> record."""

    arrays: Mapping[str, Mapping[str, ShardRecord]]
    version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "arrays": {
                path: {key: rec.to_json() for key, rec in sorted(recs.items())}
                for path, recs in sorted(self.arrays.items())
            },
        }

    @classmethod
    def from_dict(cls, value: Any, where: str = "") -> Manifest:
        """Parse a stored manifest; raises :class:`~ctzarr.errors.MetadataError` (a
        :class:`~ctzarr.errors.ChunkCorruptError`) when it is malformed."""
        path = key = None
        try:
            version = value.get("version") if isinstance(value, dict) else None
            if version not in (1, 2):
                raise ValueError("unknown manifest version")
            arrays = value["arrays"]
            if not isinstance(arrays, dict):
                raise ValueError("no arrays")
            parsed = {}
            for path, recs in arrays.items():
                check_relative_path(path)
                if not isinstance(recs, dict):
                    raise ValueError("not a mapping")
                out = {}
                for key, rec in recs.items():
                    if not _CHUNK_KEY.fullmatch(key):
                        raise ValueError("bad chunk key")
                    out[key] = ShardRecord.from_json(rec, version)
                parsed[path] = out
                key = None
        except (KeyError, TypeError, ValueError) as exc:
            at = (
                ""
                if path is None
                else f"array {path!r} " + ("" if key is None else f"chunk {key}: ")
            )
            raise MetadataError(
                where, "ctzarr.manifest", f"malformed chunk manifest: {at}{exc}"
            ) from exc
        return cls(parsed, version)

    def records(self, array_path: str) -> Mapping[str, ShardRecord]:
        return self.arrays.get(array_path, {})


_CHUNK_KEY = re.compile(r"c(/[0-9]{1,9}){1,8}")  # ASCII digits (\d takes any script's)


def inner_digests(data: bytes, index_nbytes: int) -> bytes:
    """Digests of the stored inner chunks of a shard, concatenated in index order."""
    entries = np.frombuffer(data[-index_nbytes:-_CRC], dtype="<u8").reshape(-1, 2)
    out = bytearray()
    for off, n in entries.tolist():
        if off == _EMPTY and n == _EMPTY:
            continue
        out += digest(memoryview(data)[off : off + n])
    return bytes(out)


def shard_record(data: bytes, index_nbytes: int | None) -> ShardRecord:
    """The format-2 record of one stored object."""
    if index_nbytes is None:
        return ShardRecord(len(data), digest=digest(data))
    return ShardRecord(
        len(data),
        digest=digest(data),
        index_digest=digest(data[-index_nbytes:]),
        inner=inner_digests(data, index_nbytes),
    )


class ManifestBuilder:
    """Collects the records of the objects a case writer stores (thread-safe)."""

    def __init__(self) -> None:
        self._arrays: dict[str, dict[str, ShardRecord]] = {}
        self._lock = threading.Lock()

    def add(self, array_path: str, key: str, data: bytes | None, index_nbytes: int | None) -> None:
        """Record one stored object (``data`` None: the object was not stored, all fill)."""
        rec = None if data is None else shard_record(data, index_nbytes)
        with self._lock:
            recs = self._arrays.setdefault(array_path, {})
            if rec is None:
                recs.pop(key, None)
            else:
                recs[key] = rec

    def build(self) -> Manifest:
        with self._lock:
            return Manifest({p: dict(r) for p, r in self._arrays.items()})


def check_relative_path(path: str) -> None:
    """Raise ValueError unless ``path`` is a plain relative node path (no ``..``, no ``__``)."""
    parts = path.split("/")
    if not path or any(not NODE_NAME.fullmatch(p) or p.startswith("__") for p in parts):
        raise ValueError(f"node path {path!r} is not a plain relative name")


# -- digests of metadata documents ---------------------------------------------------------------
@dataclass(frozen=True)
class Integrity:
    """The digests a commit record keeps (``ctzarr.integrity`` of a case, the collection table
    or the collection).

    ``digest`` covers the document itself (its attributes except the manifest, which the node
    digests cover) and the maps below, bound to the owner (case id, ``"index"``, or the
    collection); ``nodes`` holds one digest per member node (its metadata and, for arrays, its
    chunk records); ``documents`` the digests of the member ``zarr.json`` files as stored
    (readers use the consolidated copy; ``verify`` checks both); the collection's record also
    names the table it lists (``table``, ``update``); the table's carries its chunk manifest.
    """

    digest: str
    nodes: Mapping[str, str] = field(default_factory=dict)
    documents: Mapping[str, str] = field(default_factory=dict)
    table: str | None = None
    update: str | None = None
    manifest: Manifest | None = None
    algorithm: str = DIGEST_ALGORITHM

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "algorithm": self.algorithm,
            "digest": self.digest,
            "nodes": dict(sorted(self.nodes.items())),
            "documents": dict(sorted(self.documents.items())),
        }
        if self.table is not None:
            out["table"] = self.table
        if self.update is not None:
            out["update"] = self.update
        if self.manifest is not None:
            out["manifest"] = self.manifest.to_dict()
        return out

    @classmethod
    def from_dict(cls, value: Any, where: str = "", key: str = "ctzarr.integrity") -> Integrity:
        try:
            if not isinstance(value, Mapping):
                raise ValueError("expected a JSON object")
            if value.get("algorithm") != DIGEST_ALGORITHM:
                raise ValueError(f"unknown digest algorithm {value.get('algorithm')!r}")
            maps = {}
            for name in ("nodes", "documents"):
                m = value.get(name, {})
                if not isinstance(m, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in m.items()
                ):
                    raise ValueError(f"{name}: expected a mapping of strings")
                maps[name] = dict(m)
            digest_ = value.get("digest")
            if not isinstance(digest_, str):
                raise ValueError("digest: missing")
            table, update = value.get("table"), value.get("update")
            if not (table is None or isinstance(table, str)) or not (
                update is None or isinstance(update, str)
            ):
                raise ValueError("table/update: expected strings")
        except ValueError as exc:
            raise MetadataError(where, key, str(exc)) from None
        manifest = value.get("manifest")
        return cls(
            digest=digest_,
            nodes=maps["nodes"],
            documents=maps["documents"],
            table=table,
            update=update,
            manifest=None if manifest is None else Manifest.from_dict(manifest, where),
        )

    @classmethod
    def parse(cls, value: Any, where: str = "", key: str = "ctzarr.integrity") -> Integrity | None:
        """``from_dict``, or None when the block is absent (format 1)."""
        return None if value is None else cls.from_dict(value, where, key)


def document_digest(kind: str, owner: str, attributes: Mapping[str, Any], seal: Integrity) -> str:
    """Digest of a group's attributes (a commit record), bound to ``kind`` and ``owner``.

    Covers every attribute except ``ctzarr.manifest`` (covered per array by the node digests)
    and ``ctzarr.integrity`` itself, of which it covers the node and document digests and the
    table it names.
    """
    block = attributes.get("ctzarr")
    doc = dict(attributes)
    if isinstance(block, Mapping):
        doc["ctzarr"] = {k: v for k, v in block.items() if k not in ("integrity", "manifest")}
    body = [
        "ctzarr",
        kind,
        owner,
        seal.algorithm,
        doc,
        dict(seal.nodes),
        dict(seal.documents),
        seal.table,
        seal.update,
    ]
    return _hex(digest(canonical_json(body)))


def node_digest(owner: str, path: str, node: Mapping[str, Any], records: Any) -> str:
    """Digest of one member node's metadata (and, for an array, its chunk records as stored),
    bound to the owner and the node's path."""
    return _hex(digest(canonical_json(["ctzarr-node", owner, path, node, records])))


def raw_digest(data: bytes) -> str:
    """Digest of a stored document's bytes (hex)."""
    return _hex(digest(data))


def seal(
    kind: str,
    owner: str,
    attributes: Mapping[str, Any],
    *,
    nodes: Mapping[str, str] | None = None,
    documents: Mapping[str, str] | None = None,
    table: str | None = None,
    update: str | None = None,
    manifest: Manifest | None = None,
) -> Integrity:
    """The integrity block of a commit record about to be written (``attributes`` without it)."""
    stored = json.loads(json.dumps(attributes, default=str))  # as a reader will parse it
    bare = Integrity("", dict(nodes or {}), dict(documents or {}), table, update, manifest)
    return replace(bare, digest=document_digest(kind, owner, stored, bare))
