"""Integrity of stored cases: the per-case manifest, strict reads and hostile-store checks.

What no library does for us, and why it is written here:

- zarr reads a missing chunk object as the fill value (a deleted shard of a CT reads as air);
  ``read_missing_chunks=False`` would also refuse the all-background shards our writer
  legitimately omits, and the Rust pipeline (``zarrs``) has no such switch. The **manifest**
  (written at conversion into the case's ``zarr.json``) lists every stored object with its
  size and digests (format 2: of the object, of its shard index, of each inner chunk; see
  :mod:`ctzarr.model.manifest`), so a missing, truncated, replaced, forged or swapped object is
  an error naming the array and the chunk, and absent shards cost no request. A read checks
  the digests of exactly the bytes it reads (the shard index and the inner chunks touched).
- The metadata an answer depends on (the case's attributes; each array's metadata and chunk
  records; each group's attributes) is checked against digests bound to the case id
  (:class:`CaseIntegrity`): a case document is checked when the case opens, a member node when
  it is first used.
- zarr, numcodecs and zarrs allocate whatever a blosc header declares before they check it
  against the chunk shape (measured with zarr-python: a 117 KB chunk peaks at
  2 GiB). Before any chunk is decoded we read its 16-byte blosc header and refuse a frame whose
  declared size is not exactly the chunk's size: **no decompression bomb reaches memory**.
- Array metadata of a case is validated before any graph is built: codec allowlist (exactly
  the chains ctzarr writes, each ending in crc32c), data types, shape and chunk-count caps, node
  names, and (local stores) no symlink leaving the store.

Local stores: a box read (every crop, every dask block) reads each shard index and inner chunk
it needs once, checks it, and decodes it directly (:mod:`ctzarr.io.chunks`); other selections
are checked the same way just before zarr reads them (:class:`CheckedArray`). Remote stores:
through :class:`StrictStore`, which sees every request.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.group import AsyncGroup, GroupMetadata
from zarr.storage import LocalStore, StorePath, WrapperStore

from ctzarr.errors import (
    ChunkCorruptError,
    ChunkMissingError,
    MetadataError,
    StoreCorruptError,
    StoreError,
    UnsafeStoreError,
)
from ctzarr.io import chunks
from ctzarr.io.chunks import box_of, squeeze_ints
from ctzarr.io.stores import codec_pipeline, read_key
from ctzarr.model.collection import is_collection
from ctzarr.model.manifest import (
    Integrity,
    Manifest,
    ShardRecord,
    check_relative_path,
    crc32c,
    digest,
    document_digest,
    node_digest,
    raw_digest,
    seal,
)

#: caps applied to every array of a case before anything is read (a whole-body CT at 0.5 mm is
#: ~2000 x 1024 x 1024 = 2^31 voxels)
MAX_ELEMENTS = 2**34


MAX_CHUNKS = 2**20


MAX_CHUNK_BYTES = 2**26  # one inner chunk, decoded (ours: 64^3 x 8 bytes at most = 2 MiB)


MAX_SHARD_CHUNKS = 2**14


ALLOWED_DTYPES = frozenset(
    ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64"]
)


_BLOSC_HEADER = struct.Struct(
    "<BBBBIII"
)  # version, versionlz, flags, typesize, nbytes, blocksize, cbytes


_CRC = 4  # bytes of the crc32c codec's trailer


_INDEX_ENTRY = 16  # (offset, nbytes) as two little-endian uint64


_EMPTY = 2**64 - 1


_PENDING_BYTES = 2**26  # stored bytes a direct read holds before decoding them


# -- array layouts: what each array of a case must look like -----------------------------------
@dataclass(frozen=True)
class ArrayLayout:
    """The facts the checks need about one array, taken from its (validated) metadata."""

    path: str  # relative to the case
    shape: tuple[int, ...]
    grid: tuple[int, ...]  # shape of one stored object (shard, or chunk when unsharded)
    inner: tuple[int, ...]  # shape of one encoded chunk
    itemsize: int
    blosc: bool  # inner chunks are blosc frames
    sharded: bool
    #: the stored data type with its byte order (``"<i2"``), and the fill value (for the
    #: direct reads of :meth:`CheckedArray.read_box`)
    stored_dtype: str = ""
    fill_value: Any = 0

    @property
    def inner_nbytes(self) -> int:
        return math.prod(self.inner) * self.itemsize

    @property
    def chunks_per_shard(self) -> tuple[int, ...]:
        return tuple(g // c for g, c in zip(self.grid, self.inner, strict=True))

    @property
    def index_nbytes(self) -> int | None:
        return math.prod(self.chunks_per_shard) * _INDEX_ENTRY + _CRC if self.sharded else None

    def _extents(self, selection: Any) -> list[tuple[int, int]] | None:
        """Per axis, the [start, stop) of elements a selection touches (None: nothing)."""
        sel = selection if isinstance(selection, tuple) else (selection,)
        sel = sel + (slice(None),) * (len(self.shape) - len(sel))
        out = []
        for k, n in zip(sel, self.shape, strict=False):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0:
                    start, stop = stop + 1, start + 1
                if stop <= start:
                    return None
                out.append((start, stop))
            elif isinstance(k, (int, np.integer)):
                i = int(k) % n if n else 0
                out.append((i, i + 1))
            else:  # fancy or ellipsis selections: the whole axis
                out.append((0, n))
        return out

    def touched(self, selection: Any) -> list[tuple[str, list[int]]]:
        """(key, flat indices of the inner chunks read) of each stored object a selection
        touches; unsharded objects have the one inner chunk 0."""
        extents = self._extents(selection)
        if extents is None:
            return []
        per_axis = [
            range(start // g, (stop - 1) // g + 1)
            for (start, stop), g in zip(extents, self.grid, strict=True)
        ]
        out = []
        for idx in itertools.product(*per_axis):
            inner_axes = []
            for (start, stop), i, g, c in zip(extents, idx, self.grid, self.inner, strict=True):
                lo, hi = max(start, i * g) - i * g, min(stop, (i + 1) * g) - i * g
                inner_axes.append(range(lo // c, (hi - 1) // c + 1))
            per_shard = self.chunks_per_shard
            flat = [int(np.ravel_multi_index(j, per_shard)) for j in itertools.product(*inner_axes)]
            out.append(("c/" + "/".join(map(str, idx)), flat))
        return out


def _dtype_name(meta: Any) -> str:
    return str(meta.data_type.to_native_dtype().newbyteorder("=").name)


def _layout(path: str, meta: Any, where: str) -> ArrayLayout:
    """Validate one array's metadata; return its layout."""
    from zarr.core.metadata import ArrayV3Metadata
    from zarr.core.metadata.v3 import RegularChunkGridMetadata

    def bad(why: str) -> UnsafeStoreError:
        return UnsafeStoreError(f"{where}: array {path!r}: {why}; refused before reading")

    if not isinstance(meta, ArrayV3Metadata):
        raise bad("not a Zarr v3 array")
    name = _dtype_name(meta)
    if name not in ALLOWED_DTYPES:
        raise bad(f"data type {name} is not one ctzarr writes")
    shape = tuple(int(s) for s in meta.shape)
    if not 1 <= len(shape) <= 3 or math.prod(shape) > MAX_ELEMENTS:
        raise bad(f"shape {shape} exceeds the caps ({MAX_ELEMENTS} elements, 3 dimensions)")
    if not isinstance(meta.chunk_grid, RegularChunkGridMetadata):
        raise bad("chunk grid is not regular")
    if meta.chunk_key_encoding.to_dict() != {
        "name": "default",
        "configuration": {"separator": "/"},
    }:
        raise bad("chunk key encoding is not the default '/'")
    grid = tuple(int(c) for c in meta.chunk_grid.chunk_shape)
    codecs = list(meta.codecs)
    sharded = len(codecs) == 1 and isinstance(codecs[0], ShardingCodec)
    if sharded:
        shard = codecs[0]
        assert isinstance(shard, ShardingCodec)  # for mypy: checked just above
        inner = tuple(int(c) for c in shard.chunk_shape)
        if str(getattr(shard.index_location, "value", shard.index_location)) != "end" or [
            type(c) for c in shard.index_codecs
        ] != [
            BytesCodec,
            Crc32cCodec,
        ]:
            raise bad("shard index is not (bytes, crc32c) at the end")
        if any(g % c for g, c in zip(grid, inner, strict=True)):
            raise bad(f"shard {grid} is not a multiple of its chunk {inner}")
        codecs = list(shard.codecs)
        if math.prod(g // c for g, c in zip(grid, inner, strict=True)) > MAX_SHARD_CHUNKS:
            raise bad("too many chunks per shard")
    else:
        inner = grid
    kinds = [type(c) for c in codecs]
    if kinds not in ([BytesCodec, BloscCodec, Crc32cCodec], [BytesCodec, Crc32cCodec]):
        names = [c.to_dict()["name"] if hasattr(c, "to_dict") else type(c).__name__ for c in codecs]
        raise bad(f"codec chain {names} is not in the allowlist (bytes, [blosc], crc32c)")
    native = meta.data_type.to_native_dtype()
    itemsize = int(native.itemsize)
    endian = next((getattr(c, "endian", None) for c in codecs if isinstance(c, BytesCodec)), None)
    big = str(getattr(endian, "value", endian)) == "big"
    stored = np.dtype(native).newbyteorder(">" if big else "<").str
    fill = meta.fill_value
    fill = fill.item() if isinstance(fill, np.generic) else fill
    n_chunks = math.prod(-(-s // c) for s, c in zip(shape, inner, strict=True))
    if n_chunks > MAX_CHUNKS or math.prod(inner) * itemsize > MAX_CHUNK_BYTES:
        raise bad(f"{n_chunks} chunks of {inner} exceed the caps")
    return ArrayLayout(
        path, shape, grid, inner, itemsize, BloscCodec in kinds, sharded, stored, fill
    )


def validate_case_metadata(group: zarr.Group, where: str) -> dict[str, ArrayLayout]:
    """Check every node of a case (from its consolidated metadata) before anything is read.

    Returns the layout of each array by path relative to the case. Raises
    :class:`UnsafeStoreError` naming the node and the rule it breaks.
    """
    consolidated = group.metadata.consolidated_metadata
    if consolidated is None:
        raise UnsafeStoreError(f"{where}: the case has no consolidated metadata")
    from zarr.core.group import GroupMetadata

    layouts = {}
    for path, meta in consolidated.flattened_metadata.items():
        try:
            check_relative_path(path)
        except ValueError as exc:
            raise UnsafeStoreError(f"{where}: {exc}") from exc
        if isinstance(meta, GroupMetadata):
            if meta.zarr_format != 3:
                raise UnsafeStoreError(f"{where}: group {path!r} is not Zarr v3")
            continue
        layouts[path] = _layout(path, meta, where)
    return layouts


def check_local_links(root: Path, case_dir: Path, where: str) -> None:
    """Refuse a local case with a symlink (or the case itself) resolving outside the store."""
    top = root.resolve()
    for path in [case_dir, *_symlinks(case_dir)]:
        real = path.resolve()
        if real != top and top not in real.parents:
            raise UnsafeStoreError(
                f"{where}: {path.relative_to(root)} links outside the store (to {real}); refused"
            )


def _symlinks(top: Path) -> Iterable[Path]:
    """Symlinks below ``top``, not followed (``DirEntry`` types cost no extra ``stat``)."""
    stack = [os.fspath(top)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    yield Path(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)


# -- chunk checks shared by the local and remote paths -----------------------------------------
def _check_header(head: bytes, stored_nbytes: int, layout: ArrayLayout, where: str) -> None:
    if not layout.blosc:
        if stored_nbytes != layout.inner_nbytes + _CRC:
            raise ChunkCorruptError(
                f"{where}: stored {stored_nbytes} bytes, an uncompressed chunk is "
                f"{layout.inner_nbytes + _CRC}"
            )
        return
    if len(head) < 16 or stored_nbytes < 16 + _CRC:
        raise ChunkCorruptError(f"{where}: {stored_nbytes} bytes is too short for a blosc chunk")
    _v, _vlz, _flags, _ts, nbytes, _bs, cbytes = _BLOSC_HEADER.unpack(head)
    if nbytes != layout.inner_nbytes or cbytes != stored_nbytes - _CRC:
        raise ChunkCorruptError(
            f"{where}: blosc header declares {nbytes} bytes from {cbytes} stored, the chunk is "
            f"{layout.inner_nbytes} bytes from {stored_nbytes - _CRC}: refused before "
            "decompression (a corrupt chunk or a decompression bomb)"
        )


def _check_chunk(chunk: bytes, layout: ArrayLayout, where: str) -> None:
    """A whole stored chunk: its crc32c trailer, then its blosc header.

    The crc32c is checked here although the codec chain checks it too: zarrs 0.2.3 decodes
    inner chunks of a shard through partial decoders that skip the crc32c check (found by
    test_every_flipped_byte_of_a_shard_raises: 42 of 626 flipped bytes read as wrong values).
    """
    body, trailer = chunk[:-_CRC], chunk[-_CRC:]
    if len(chunk) < _CRC or struct.unpack("<I", trailer)[0] != crc32c(body):
        raise ChunkCorruptError(f"{where}: crc32c mismatch (flipped or truncated bytes)")
    _check_header(chunk[:16], len(chunk), layout, where)


def _check_inner_digest(
    chunk: bytes, rec: ShardRecord, entries: np.ndarray, i: int, where: str
) -> None:
    """A format-2 inner chunk against its recorded digest (``entries``: the checked index)."""
    if not rec.has_digests:
        return  # format 1: crc32c only
    stored = ~((entries[:, 0] == _EMPTY) & (entries[:, 1] == _EMPTY))
    rank = int(np.count_nonzero(stored[:i]))
    want = rec.inner_digest(rank)
    if want is None or digest(chunk) != want:
        raise ChunkCorruptError(
            f"{where}: inner chunk {i} differs from its digest in the manifest (a chunk "
            "re-encoded or replaced, same size or not)"
        )


def _check_index_record(index: bytes, rec: ShardRecord, where: str) -> None:
    """A shard index against the manifest (its digest; format 1: its crc32c)."""
    ok = digest(index) == rec.index_digest if rec.has_digests else crc32c(index) == rec.index_crc32c
    if not ok:
        raise ChunkCorruptError(
            f"{where}: shard index differs from the manifest (swapped or replaced)"
        )


def _check_whole(data: bytes, rec: ShardRecord, where: str) -> None:
    """A whole stored object against the manifest: size and digest (format 1: crc32c, which on
    bytes ending in their own crc32c checks nothing but the size)."""
    if rec.has_digests:
        if len(data) != rec.nbytes or digest(data) != rec.digest:
            raise ChunkCorruptError(
                f"{where}: {len(data)} bytes whose digest differs from the manifest's "
                f"({rec.nbytes} bytes): truncated, corrupt, forged or swapped"
            )
    elif len(data) != rec.nbytes or crc32c(data) != rec.crc32c:
        raise ChunkCorruptError(
            f"{where}: {len(data)} bytes with crc32c {crc32c(data):08x}, the manifest says "
            f"{rec.nbytes} bytes, {rec.crc32c or 0:08x} (truncated, corrupt or swapped)"
        )


def _parse_index(index: bytes, layout: ArrayLayout, where: str) -> np.ndarray:
    """(offset, nbytes) per inner chunk, checked against the index's own crc32c."""
    body, trailer = index[:-_CRC], index[-_CRC:]
    if len(index) != layout.index_nbytes or struct.unpack("<I", trailer)[0] != crc32c(body):
        raise ChunkCorruptError(f"{where}: shard index fails its crc32c")
    return np.frombuffer(body, dtype="<u8").reshape(-1, 2)


def _inner_ranges(
    entries: np.ndarray, shard_nbytes: int, layout: ArrayLayout, where: str
) -> list[tuple[int, int]]:
    out = []
    for off, n in entries.tolist():
        if off == _EMPTY and n == _EMPTY:
            continue
        if off + n > shard_nbytes - (layout.index_nbytes or 0):
            raise ChunkCorruptError(f"{where}: shard index points past the end of the shard")
        out.append((off, n))
    return out


def _where(case_where: str, array_path: str, key: str) -> str:
    return f"{case_where}: array {array_path!r} chunk {key}"


# -- local stores: checked before each read -----------------------------------------------------
class CheckedArray:
    """A zarr array of a committed case whose reads are strict.

    Every stored object a read touches is checked against the manifest (present, same size,
    same shard index) and every inner chunk read against its crc32c, its format-2 digest and
    (blosc) its frame header against the chunk size. On local stores a box (ints and unit-step
    slices: crops, dask blocks) is read with a few ``pread`` calls per shard, checked, and
    decoded directly in parallel (:meth:`read_box`, :mod:`ctzarr.io.chunks`): each byte is
    read once and no zarr machinery runs; other selections are checked the same way and then
    read by zarr. On remote stores :class:`StrictStore` checks every request. A failed decode
    is raised naming the array and the chunk. Everything else is the zarr array's (``shards``,
    ``chunks``, ...; the zarr array is opened on first use).
    """

    def __init__(
        self,
        array: zarr.Array[Any] | Callable[[], zarr.Array[Any]],
        layout: ArrayLayout,
        records: Mapping[str, ShardRecord],
        where: str,
        *,
        local_dir: Path | None = None,
    ) -> None:
        """``array``: the zarr array, or a function opening it when first needed (the direct
        reads of a local store need only ``layout`` and ``local_dir``, the array's directory;
        given an array, ``local_dir`` is taken from its store)."""
        self._layout = layout
        self._records = dict(records)
        self._where = where
        if isinstance(array, zarr.Array):
            self._zarr: zarr.Array[Any] | None = array
            self._opener: Callable[[], zarr.Array[Any]] | None = None
            store = array.store
            local_dir = Path(store.root) / array.path if isinstance(store, LocalStore) else None
        else:
            self._zarr, self._opener = None, array
        self._local_dir = local_dir
        self._open_lock = threading.Lock()

    @property
    def _array(self) -> zarr.Array[Any]:
        """The zarr array (opened on first use)."""
        if self._zarr is None:
            with self._open_lock:
                if self._zarr is None:
                    assert self._opener is not None
                    self._zarr = self._opener()
        return self._zarr

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_zarr"], state["_opener"] = self._array, None  # an opener may not pickle
        del state["_open_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open_lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # unpickling looks up __setstate__ before _array exists
            raise AttributeError(name)
        return getattr(self._array, name)

    def __repr__(self) -> str:
        return f"<CheckedArray {self._where}: {self._layout.path} {self.shape} {self.dtype}>"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._layout.shape)

    @property
    def dtype(self) -> np.dtype[Any]:
        if self._layout.stored_dtype:
            return np.dtype(self._layout.stored_dtype).newbyteorder("=")
        return self._array.dtype

    @property
    def ndim(self) -> int:
        return len(self._layout.shape)

    def __getitem__(self, selection: Any) -> Any:
        if self._local_dir is not None:
            box = box_of(selection, self._layout.shape)
            if box is not None:  # the direct path: each byte read once, checked, decoded
                out = self._read_local_box(box)
                return out[squeeze_ints(selection, len(box))]
        touched = self._layout.touched(selection)
        keys = [key for key, _ in touched]
        if self._local_dir is not None:
            for key, inner in touched:
                self._local_frames(key, inner)
        try:
            return self._array[selection]
        except (ChunkCorruptError, ChunkMissingError, UnsafeStoreError):
            raise
        except Exception as exc:
            if isinstance(exc, (IndexError, TypeError)) and "index" in str(exc).lower():
                raise
            raise ChunkCorruptError(
                f"{self._where}: array {self._layout.path!r}: reading chunk(s) "
                f"{', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''} failed: "
                f"{type(exc).__name__}: {exc} (run ctzarr verify for the exact chunk)"
            ) from exc

    def read_box(self, box: Sequence[slice]) -> np.ndarray:
        """A box (unit-step slices, one per axis) as a numpy array.

        Local stores: the inner chunks the box touches are read once, checked (manifest, shard
        index, crc32c, blosc header, format-2 digest) and decoded directly
        (:mod:`ctzarr.io.chunks`), in parallel. Remote stores: through zarr and
        :class:`StrictStore`, which checks every request.
        """
        if self._local_dir is None:
            return np.asarray(self[tuple(box)])
        extents = box_of(tuple(box), self._layout.shape)
        if extents is None:
            raise IndexError(f"read_box takes unit-step slices, got {box!r}")
        return self._read_local_box(extents)

    def _read_local_box(self, box: tuple[tuple[int, int], ...]) -> np.ndarray:
        out, tasks = self._box_tasks(box)
        chunks.run(tasks)
        return out

    def _box_tasks(
        self, box: tuple[tuple[int, int], ...]
    ) -> tuple[np.ndarray, list[Callable[[], None]]]:
        """The output of a local box read (filled) and the tasks that decode into it. The
        objects and shard indexes are checked here; each task checks its inner chunk (crc32c,
        frame header, digest) before decoding it, so the checks run in parallel too."""
        lay = self._layout
        out = chunks.fill([stop - start for start, stop in box], self.dtype, lay.fill_value)
        stored = np.dtype(lay.stored_dtype) if lay.stored_dtype else out.dtype
        tasks: list[Callable[[], None]] = []
        pending = 0  # stored bytes held by the tasks not yet run
        for key, reads in chunks.plan(box, lay.grid, lay.inner).items():
            checks: dict[int, Callable[[], None]] = {}
            frames = self._local_frames(key, [r.inner for r in reads], checks)
            for r in reads:
                frame = frames.get(r.inner)
                if frame is not None:
                    tasks.append(self._decode_task(frame, checks.get(r.inner), r, stored, out))
                    pending += len(frame)
            if pending > _PENDING_BYTES:  # a large read: decode as it goes, memory bounded
                chunks.run(tasks)
                tasks, pending = [], 0
        return out, tasks

    def _decode_task(
        self,
        frame: bytes,
        check: Callable[[], None] | None,
        r: chunks.InnerRead,
        stored: np.dtype[Any],
        out: np.ndarray,
    ) -> Callable[[], None]:
        lay = self._layout

        def task() -> None:
            if check is not None:
                check()  # raises before a byte of an unchecked chunk is decoded
            try:
                chunk = chunks.decode(frame, lay.blosc, stored, lay.inner, r.source)
            except Exception as exc:  # blosc's own errors, after every check passed
                raise ChunkCorruptError(
                    f"{_where(self._where, lay.path, r.key)}: inner chunk {r.inner} failed to "
                    f"decode: {type(exc).__name__}: {exc}"
                ) from exc
            out[r.target] = chunk[r.source]

        return task

    def _local_frames(
        self,
        key: str,
        inner: Sequence[int],
        deferred: dict[int, Callable[[], None]] | None = None,
    ) -> dict[int, bytes]:
        """One stored object against the manifest, and the inner chunks about to be read
        (their crc32c, their frame headers against the chunk size, format 2: their digests).

        Returns the bytes (crc32c trailer included) of each stored inner chunk asked for, by
        flat index (an unsharded object is inner chunk 0); chunks not stored (all fill, as the
        manifest says) are absent. With ``deferred``, the checks of each inner chunk of a shard
        are not run here but put there, by flat index, for the caller to run before decoding
        it; otherwise every chunk returned is checked.
        """
        assert self._local_dir is not None
        where = _where(self._where, self._layout.path, key)
        rec = self._records.get(key)
        path = self._local_dir / key
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            if rec is None:
                return {}  # never stored: all fill (background), as the manifest says
            raise ChunkMissingError(
                f"{where}: missing from the store (the manifest lists it)"
            ) from None
        except OSError as exc:  # ELOOP: a symlink
            raise UnsafeStoreError(f"{where}: cannot be opened safely: {exc}") from exc
        out: dict[int, bytes] = {}
        try:
            size = os.fstat(fd).st_size
            if rec is None:
                raise ChunkCorruptError(
                    f"{where}: stored but not in the manifest (foreign or moved)"
                )
            if size != rec.nbytes:
                raise ChunkCorruptError(
                    f"{where}: {size} bytes stored, the manifest says {rec.nbytes} (truncated or replaced)"
                )
            lay = self._layout
            if not lay.sharded:
                whole = _pread(fd, size, 0, where)
                _check_chunk(whole, lay, where)
                if rec.has_digests:
                    _check_whole(whole, rec, where)
                out[0] = whole
                return out
            assert lay.index_nbytes is not None
            index = _pread(fd, lay.index_nbytes, size - lay.index_nbytes, where)
            _check_index_record(index, rec, where)
            entries = _parse_index(index, lay, where)
            for i in inner:
                for off, n in _inner_ranges(entries[i : i + 1], size, lay, where):
                    chunk = _pread(fd, n, off, where)
                    check = _inner_check(chunk, lay, rec, entries, i, where)
                    if deferred is None:
                        check()
                    else:
                        deferred[i] = check
                    out[i] = chunk
        finally:
            os.close(fd)
        return out


def _inner_check(
    chunk: bytes, lay: ArrayLayout, rec: ShardRecord, entries: np.ndarray, i: int, where: str
) -> Callable[[], None]:
    """The checks of one inner chunk read from a shard: crc32c, frame header, digest."""

    def check() -> None:
        _check_chunk(chunk, lay, where)
        _check_inner_digest(chunk, rec, entries, i, where)

    return check


def read_boxes(reads: Sequence[tuple[CheckedArray, Sequence[slice]]]) -> list[np.ndarray]:
    """Several boxes (e.g. a crop's image and labels) as numpy arrays, read together: the
    inner chunks of local arrays decoded in one parallel batch, remote arrays read
    concurrently (see :meth:`CheckedArray.read_box`)."""
    outs: list[np.ndarray | None] = [None] * len(reads)
    tasks: list[Callable[[], None]] = []

    def remote(i: int, arr: CheckedArray, box: Sequence[slice]) -> Callable[[], None]:
        def task() -> None:
            outs[i] = arr.read_box(box)

        return task

    for i, (arr, box) in enumerate(reads):
        extents = box_of(tuple(box), arr._layout.shape)
        if arr._local_dir is None or extents is None:
            tasks.append(remote(i, arr, box))
            continue
        out, more = arr._box_tasks(extents)
        outs[i] = out
        tasks += more
    chunks.run(tasks)  # raises the first failure; otherwise every output is set
    return [out for out in outs if out is not None]


def _pread(fd: int, n: int, offset: int, where: str) -> bytes:
    """``n`` bytes at ``offset``; a short read (the file shrank under us) is corruption."""
    data = os.pread(fd, n, offset)
    if len(data) != n:
        raise ChunkCorruptError(f"{where}: short read ({len(data)} of {n} bytes)")
    return data


# -- remote stores: every request checked --------------------------------------------------------
class StrictStore(WrapperStore[Store]):
    """Reads of one case's chunks, held to its manifest (remote stores).

    - a chunk key the manifest does not list is answered "absent" without a request;
    - a listed key the store does not have raises :class:`ChunkMissingError` (zarr would read
      fill);
    - a whole object must have the manifest's size and crc32c, a shard index the manifest's
      crc32c, and every blosc frame a header declaring exactly one chunk.
    """

    def __init__(
        self,
        store: Store,
        case_path: str = "",
        layouts: Mapping[str, ArrayLayout] | None = None,
        manifest: Manifest | None = None,
        where: str = "",
    ) -> None:
        super().__init__(store)
        self._case_path = case_path.rstrip("/")
        self._layouts = dict(layouts or {})
        self._manifest = manifest or Manifest({})
        self._where = where
        #: checked shard indexes by key, to find the digest of an inner chunk read by range
        #: (shared with the copies zarr makes through ``_with_store``)
        self._indexes: dict[str, np.ndarray] = {}

    @property
    def inner(self) -> Store:
        """The store this one reads through (for whole-object checks that bypass the manifest)."""
        return self._store

    @property
    def _supports_sync_io(self) -> bool:
        return False  # every read goes through the checked async methods below

    def _with_store(self, store: Store) -> StrictStore:
        out = StrictStore(store, self._case_path, self._layouts, self._manifest, self._where)
        out._indexes = self._indexes
        return out

    def __repr__(self) -> str:
        return f"StrictStore({self._store!r}, {self._case_path!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StrictStore)
            and other._case_path == self._case_path
            and self._store == other._store
        )

    __hash__ = None  # type: ignore[assignment]

    def _classify(self, key: str) -> tuple[ArrayLayout, str, ShardRecord | None] | None:
        """(layout, chunk key, record) of a chunk key of the case; None for other keys."""
        prefix = self._case_path + "/"
        if not key.startswith(prefix) or "/c/" not in key:
            return None
        array_path, _, rest = key[len(prefix) :].rpartition("/c/")
        layout = self._layouts.get(array_path)
        if layout is None:
            return None
        chunk_key = "c/" + rest
        return layout, chunk_key, self._manifest.records(array_path).get(chunk_key)

    async def _index(
        self, key: str, layout: ArrayLayout, rec: ShardRecord, where: str
    ) -> np.ndarray:
        """The checked index of a shard (read once more if zarr fetched it elsewhere)."""
        entries = self._indexes.get(key)
        if entries is None:
            assert layout.index_nbytes is not None
            buf = await self._store.get(
                key, default_buffer_prototype(), SuffixByteRequest(layout.index_nbytes)
            )
            if buf is None:
                raise ChunkMissingError(f"{where}: missing from the store (the manifest lists it)")
            index = buf.to_bytes()
            _check_index_record(index, rec, where)
            entries = self._indexes[key] = _parse_index(index, layout, where)
        return entries

    async def _check(
        self,
        key: str,
        info: tuple[ArrayLayout, str, ShardRecord | None],
        byte_range: ByteRequest | None,
        buf: Buffer | None,
    ) -> None:
        layout, chunk_key, rec = info
        where = _where(self._where, layout.path, chunk_key)
        if buf is None:
            raise ChunkMissingError(f"{where}: missing from the store (the manifest lists it)")
        assert rec is not None
        data = buf.to_bytes()
        if byte_range is None:
            _check_whole(data, rec, where)
            if layout.sharded:
                assert layout.index_nbytes is not None
                entries = _parse_index(data[-layout.index_nbytes :], layout, where)
                for off, n in _inner_ranges(entries, len(data), layout, where):
                    _check_header(data[off : off + 16], n, layout, where)
            else:
                _check_header(data[:16], len(data), layout, where)
        elif (
            isinstance(byte_range, SuffixByteRequest)
            and layout.sharded
            and byte_range.suffix == layout.index_nbytes
        ):
            _check_index_record(data, rec, where)
            self._indexes[key] = _parse_index(data, layout, where)
        elif isinstance(byte_range, RangeByteRequest) and layout.sharded:
            if len(data) != byte_range.end - byte_range.start:
                raise ChunkCorruptError(
                    f"{where}: short read ({len(data)} of {byte_range.end - byte_range.start} bytes)"
                )
            _check_chunk(data, layout, where)
            if rec.has_digests:
                entries = await self._index(key, layout, rec, where)
                hits = np.flatnonzero(
                    (entries[:, 0] == byte_range.start) & (entries[:, 1] == len(data))
                )
                if not len(hits):
                    raise ChunkCorruptError(
                        f"{where}: a read of bytes the shard index does not list"
                    )
                _check_inner_digest(data, rec, entries, int(hits[0]), where)
        else:  # other ranges are not issued by zarr for these layouts
            raise ChunkCorruptError(f"{where}: unexpected partial read {byte_range!r}")

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        info = self._classify(key)
        if info is None:
            return await self._store.get(key, prototype, byte_range)
        if info[2] is None:
            return None  # not stored: all fill, as the manifest says; no request
        buf = await self._store.get(key, prototype, byte_range)
        await self._check(key, info, byte_range, buf)
        return buf

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return [await self.get(k, prototype, r) for k, r in key_ranges]

    async def get_ranges(
        self,
        key: str,
        byte_ranges: Sequence[ByteRequest | None],
        *,
        prototype: BufferPrototype,
        **kwargs: Any,
    ) -> AsyncIterator[Sequence[tuple[int, Buffer | None]]]:
        info = self._classify(key)
        if info is not None and info[2] is None:
            yield [(i, None) for i in range(len(byte_ranges))]
            return
        async for batch in self._store.get_ranges(key, byte_ranges, prototype=prototype, **kwargs):
            if info is not None:
                for i, buf in batch:
                    await self._check(key, info, byte_ranges[i], buf)
            yield batch


# -- metadata documents: readable, and as committed ------------------------------------------------
def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


def open_group_checked(
    store: Store, path: str, where: str, mode: Any = "r", **kwargs: Any
) -> zarr.Group:
    """``zarr.open_group`` with an unreadable ``zarr.json`` (bad JSON or encoding, absurd
    nesting) raised as :class:`StoreCorruptError` naming its key.

    A group that is not there stays ``FileNotFoundError`` / ``GroupNotFoundError``; a document
    that parses but that zarr refuses (unknown codec, missing keys) raises what zarr raises,
    for the caller to type (the root: :class:`StoreCorruptError`; a case: refused as unsafe).
    """
    key = f"{path}/zarr.json" if path else "zarr.json"
    try:
        return zarr.open_group(store, path=path, mode=mode, zarr_format=3, **kwargs)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise StoreCorruptError(
            f"{where}: {key}: unreadable metadata document ({_short(exc)})", key
        ) from None


def open_collection_root(store: Store, target: str) -> zarr.Group:
    """The root group of a collection store, checked to be one (the library's
    ``open_collection`` and the light ``ctzarr info`` path both open stores through this)."""
    try:
        with codec_pipeline(store):
            # parsed once per process for the same document bytes (~1 ms of every cold open)
            root, _ = open_group_cached(store, "", target, target)
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError) as exc:
        raise StoreError(f"{target}: no collection store here") from exc
    except zarr.errors.ContainsArrayError as exc:  # not damage: another kind of zarr node
        raise StoreError(f"{target}: a zarr array, not a ctzarr collection") from exc
    except StoreCorruptError:
        raise
    except (ValueError, TypeError, KeyError, zarr.errors.BaseZarrError) as exc:
        raise StoreCorruptError(
            f"{target}: zarr.json: unreadable metadata document ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]})",
            "zarr.json",
        ) from None
    if not is_collection(root.attrs.asdict()):
        raise StoreError(f"{target}: not a ctzarr collection (no ctzarr collection attributes)")
    return root


#: parsed group documents by (store, path, BLAKE3 of the bytes): a document re-read with the
#: same bytes is the same metadata, one with other bytes (a re-converted case) a miss
_GROUP_CACHE: OrderedDict[tuple[str, str, str], GroupMetadata] = OrderedDict()
_GROUP_CACHE_SIZE = 64
_GROUP_CACHE_LOCK = threading.Lock()


def open_group_cached(
    store: Store, path: str, where: str, store_key: str
) -> tuple[zarr.Group, str]:
    """A group opened from one read of its ``zarr.json`` (read-only), and that document's
    digest.

    Parsing a case's consolidated document into zarr metadata objects costs ~4.5 ms; here it
    is done once per process for given bytes (``store_key`` names the store, e.g. its URL).
    The bytes are read and hashed on every open, so a document changed since (a re-converted
    or tampered case) is parsed afresh, never served from the cache. Errors are those of
    :func:`open_group_checked` (absent: ``FileNotFoundError``; unreadable:
    :class:`StoreCorruptError`; refused by zarr: what zarr raises).
    """
    key = f"{path}/zarr.json" if path else "zarr.json"
    raw = read_key(store, key)
    if raw is None:
        raise FileNotFoundError(f"{where}: {key} not found")
    token = raw_digest(raw)
    cache_key = (store_key, path, token)
    with _GROUP_CACHE_LOCK:
        meta = _GROUP_CACHE.get(cache_key)
        if meta is not None:
            _GROUP_CACHE.move_to_end(cache_key)
    store_path = StorePath(store, path)
    if meta is None:
        buf = default_buffer_prototype().buffer.from_bytes(raw)
        try:
            group = AsyncGroup._from_bytes_v3(store_path, buf, use_consolidated=None)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise StoreCorruptError(
                f"{where}: {key}: unreadable metadata document ({_short(exc)})", key
            ) from None
        meta = group.metadata
        assert isinstance(meta, GroupMetadata)
        with _GROUP_CACHE_LOCK:
            _GROUP_CACHE[cache_key] = meta
            while len(_GROUP_CACHE) > _GROUP_CACHE_SIZE:
                _GROUP_CACHE.popitem(last=False)
    return zarr.Group(AsyncGroup(metadata=meta, store_path=store_path)), token


def node_document(meta: Any) -> dict[str, Any]:
    """The part of a node's metadata that digests cover: an array's whole metadata document,
    a group's attributes."""
    from zarr.core.group import GroupMetadata

    if isinstance(meta, GroupMetadata):
        return {"node_type": "group", "attributes": dict(meta.attributes)}
    out: dict[str, Any] = meta.to_dict()
    return out


def node_digests(
    owner: str, nodes: Mapping[str, Any], records: Mapping[str, Any]
) -> dict[str, str]:
    """Digest of every member node (metadata and raw chunk records), for a commit record."""
    return {
        path: node_digest(owner, path, node_document(meta), records.get(path))
        for path, meta in nodes.items()
    }


class CaseIntegrity:
    """The metadata of one opened case held to the digests of its commit record.

    The case's own document (affine, scaling, geometry, sources, the digests themselves) is
    checked at once, bound to the case id it was opened by; each member node (an array's
    metadata and chunk records, a group's attributes: label image groups, index tables) when it
    is first used, so a crop checks only what it reads. Format-1 cases carry no digests
    (``seal`` is None): nothing to check, and ``ctzarr verify`` says so.
    """

    def __init__(
        self,
        case_id: str,
        attributes: Mapping[str, Any],
        nodes: Mapping[str, Any],
        where: str,
        *,
        required: bool,
    ) -> None:
        block = attributes.get("ctzarr")
        block = block if isinstance(block, Mapping) else {}
        self.seal = Integrity.parse(block.get("integrity"), where)
        self._owner = case_id
        self._nodes = nodes
        self._where = where
        manifest = block.get("manifest")
        arrays = manifest.get("arrays") if isinstance(manifest, Mapping) else None
        self._records: Mapping[str, Any] = arrays if isinstance(arrays, Mapping) else {}
        self._checked: set[str] = set()
        if self.seal is None:
            if required:
                raise MetadataError(
                    where, "ctzarr.integrity", "missing (a format-2 case records its digests)"
                )
            return
        if document_digest("case", case_id, attributes, self.seal) != self.seal.digest:
            raise MetadataError(
                where,
                "ctzarr.integrity.digest",
                f"the attributes of the case (affine, scaling, geometry, sources, digests) differ "
                f"from its commit record as case {case_id!r}: edited, or the document of another "
                "case",
            )

    def _problem(self, path: str) -> str | None:
        if self.seal is None or path in self._checked:
            return None
        want = self.seal.nodes.get(path)
        meta = self._nodes.get(path)
        if meta is None or want is None:
            return f"node {path!r}: {'not in the case' if meta is None else 'no digest recorded'}"
        from zarr.core.group import GroupMetadata

        kind = "group" if isinstance(meta, GroupMetadata) else "array"
        got = node_digest(self._owner, path, node_document(meta), self._records.get(path))
        if got != want:
            what = (
                "attributes"
                if kind == "group"
                else "metadata (shape, data type, chunk grid, codecs, fill value) or chunk records"
            )
            return (
                f"{kind} {path!r}: its {what} differ from the commit record of case "
                f"{self._owner!r} (edited, or swapped with another case's)"
            )
        self._checked.add(path)
        return None

    def check_node(self, path: str) -> None:
        """Raise :class:`~ctzarr.errors.MetadataError` unless the node is as committed."""
        problem = self._problem(path)
        if problem is not None:
            raise MetadataError(self._where, f"ctzarr.integrity.nodes.{path}", problem)

    def problems(self) -> list[str]:
        """Every node that differs from the commit record, and nodes added or removed."""
        if self.seal is None:
            return []
        out = [p for path in sorted(self._nodes) if (p := self._problem(path)) is not None]
        for path in sorted(set(self.seal.nodes) - set(self._nodes)):
            out.append(f"node {path!r}: in the commit record but not in the case")
        return out


def array_layouts(nodes: Mapping[str, Any], where: str) -> dict[str, ArrayLayout]:
    """Validated layouts of arrays given by their metadata (e.g. the collection table's)."""
    return {path: _layout(path, meta, where) for path, meta in nodes.items()}


def seal_case(
    store: Store, prefix: str, case_id: str, attributes: Mapping[str, Any], nodes: Mapping[str, Any]
) -> Integrity:
    """The digests of a case's commit record: its attributes (bound to the case id), every
    member node as consolidated, every member ``zarr.json`` as stored under ``prefix``."""
    block = attributes.get("ctzarr", {})
    manifest = block.get("manifest", {}) if isinstance(block, Mapping) else {}
    records = json.loads(json.dumps(manifest.get("arrays", {})))  # as a reader parses them
    documents = {}
    for path in nodes:
        raw = read_key(store, f"{prefix}/{path}/zarr.json")
        if raw is not None:
            documents[f"{path}/zarr.json"] = raw_digest(raw)
    return seal(
        "case",
        case_id,
        attributes,
        nodes=node_digests(case_id, nodes, records),
        documents=documents,
    )


def document_problems(
    store: Store, prefix: str, integrity: Integrity | None, where: str
) -> list[str]:
    """Member ``zarr.json`` files that differ from the commit record (readers use the
    consolidated copy; other tools read these)."""
    if integrity is None:
        return []
    out = []
    for key, want in sorted(integrity.documents.items()):
        raw = read_key(store, f"{prefix}/{key}")
        if raw is None:
            out.append(f"{key}: missing")
        elif raw_digest(raw) != want:
            out.append(f"{key}: differs from the commit record (edited or replaced)")
    return out
