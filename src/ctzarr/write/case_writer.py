"""Where Zarr is written: one case (image, pyramid, segmentations, index) streamed slab by slab,
then committed by writing its group metadata last.

Layout of a case (``cases/<case_id>/``) is an OME-Zarr 0.5 image with ``labels/``; see
``README.md`` ("Store layout"). Chunking, chosen from the measurements in
``benchmarks/README.md`` (ctzarr against other converters, crop and write timings):

- inner chunks of 64 x 64 x 64 voxels: a kidney-sized crop reads 2 MB instead of 8-10 MB with
  128-voxel chunks, in the same few requests;
- shards of 64 slices x the whole plane: every 64-slice slab of the stream is exactly one shard
  per array, so shards are written once and whole (no read-modify-write, no two writers on one
  shard), and a 400-slice case is 7 objects per array instead of 400+ chunk files;
- blosc zstd level 1 with bitshuffle (128 KiB blocks), then crc32c on every chunk (and on every
  shard index); ``model.layout.compressors`` says why.

Commit protocol: the case group's ``zarr.json`` is created plain when the first array is
written; only the final rewrite adds ``ome`` and ``ctzarr.complete = true``. Readers treat a
case without that marker as absent, on local disks and object stores alike (no rename needed).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as _dt
import hashlib
import itertools
import json
import logging
import math
import os
import queue
import sys
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from typing import Any, Protocol

import numpy as np
import zarr
from numcodecs import Blosc
from zarr.codecs import Crc32cCodec
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync

from ctzarr.errors import UnknownLabelError
from ctzarr.io.stores import codec_pipeline, compact_json, read_key, write_key
from ctzarr.io.strict import seal_case
from ctzarr.model.attributes import CTZARR_KEY
from ctzarr.model.case import CaseAttributes, SegmentationAttributes
from ctzarr.model.index import JointInfo, LabelIndex
from ctzarr.model.labels import LabelMap
from ctzarr.model.layout import CHUNK, chunk_layout, compressors, level_shapes
from ctzarr.model.manifest import ManifestBuilder, crc32c
from ctzarr.model.ome import label_image_attributes, labels_attributes
from ctzarr.sources.nifti import NiftiSource, header_from_bytes
from ctzarr.write.index_builder import JointIndexBuilder, LabelIndexBuilder

logger = logging.getLogger(__name__)


def _block_sum_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """Dtype that holds the sum of 8 values of ``dtype`` exactly (float64 for floats and wide
    integers, as the mean is taken in float64)."""
    if dtype.kind in "iu" and dtype.itemsize <= 2:
        return np.dtype(np.int32)
    return np.dtype(np.float64)


def downsample_image(slab: np.ndarray) -> np.ndarray:
    """Next pyramid level of an image slab: 2x2x2 mean, same dtype (integers rounded half to
    even); an edge block of an odd axis averages the voxels it holds.

    numpy, one output plane at a time: every temporary is a plane (the slab-sized float64
    buffer of a whole-slab mean was 16 MB per CT slab in flight), and no JIT to load (the numba
    kernel this replaces cost its cache load in every process, at the same speed).
    """
    nz, ny, nx = slab.shape
    oz, oy, ox = -(-nz // 2), -(-ny // 2), -(-nx // 2)
    out = np.empty((oz, oy, ox), slab.dtype)
    acc = _block_sum_dtype(slab.dtype)
    # voxels per block in y and x: 2, or 1 in the last block of an odd axis
    count_y = np.full(oy, 2.0)
    count_x = np.full(ox, 2.0)
    count_y[ny // 2 :] = 2.0 if ny % 2 == 0 else 1.0
    count_x[nx // 2 :] = 2.0 if nx % 2 == 0 else 1.0
    count_yx = count_y[:, None] * count_x[None, :]
    plane = np.empty((ny, nx), acc)
    rows = np.empty((oy, nx), acc)
    blocks = np.empty((oy, ox), acc)
    mean = np.empty((oy, ox), np.float64)
    ey, ex = ny - ny % 2, nx - nx % 2  # the even parts
    for z in range(oz):
        if 2 * z + 1 < nz:
            np.add(slab[2 * z], slab[2 * z + 1], out=plane, dtype=acc)
            depth = 2.0
        else:
            plane[...] = slab[2 * z]
            depth = 1.0
        np.add(plane[0:ey:2], plane[1:ey:2], out=rows[: ny // 2])
        if ny % 2:
            rows[-1] = plane[-1]
        np.add(rows[:, 0:ex:2], rows[:, 1:ex:2], out=blocks[:, : nx // 2])
        if nx % 2:
            blocks[:, -1] = rows[:, -1]
        # counts are powers of two: the division is exact, as in a float64 mean
        np.divide(blocks, count_yx * depth, out=mean)
        if slab.dtype.kind in "iu":
            np.rint(mean, out=mean)
        out[z] = mean
    return out


def downsample_labels(slab: np.ndarray) -> np.ndarray:
    """Next pyramid level of a label slab: nearest neighbour (every other voxel)."""
    return np.ascontiguousarray(slab[::2, ::2, ::2])


def label_dtype(label_map: LabelMap, source: LabelSlabSource) -> np.dtype[Any]:
    """Smallest unsigned dtype that holds every value of the label map (and the ignore value)."""
    top = label_map.max_value
    for dt in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"{source.path}: label values up to {top} do not fit uint32")


def label_header_bytes(source: LabelSlabSource, dtype: np.dtype[Any]) -> bytes:
    """The NIfTI header of a stored segmentation: its source file's header (geometry, qform and
    sform as the file had them, version, byte order), with the stored label dtype and no scaling.

    ``niizarr.zarr2nii`` on the label image group then writes the source file's values and
    affine. Like the image's, the header is 3D, free text blanked (``sources.nifti``).
    """
    hdr = header_from_bytes(source.header_bytes)
    hdr.set_data_dtype(dtype)  # in the header's own byte order
    if source.scaled:  # the stored labels are the scaled values
        hdr.set_slope_inter(1.0, 0.0)
    return bytes(hdr.binaryblock)


#: the dimension name of a NIfTI-Zarr ``nifti`` header array (1-D, one uint8 per header byte)
NIFTI_HEADER_DIMENSION = "nifti_byte"


#: slabs in flight at once, the ring of slab buffers of each stream (at least 2): the reader
#: inflates the next slab while the index and writer threads work on this one. 3 was no faster
#: on the bench case (2 cores) and held 48 MB more (benchmarks/README.md).
SLABS_IN_FLIGHT = 2


#: glibc's mallopt parameter number of the arena limit
_M_ARENA_MAX = -8


#: glibc's mallopt parameter numbers of the trim and mmap thresholds
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing it back at once (a
    conversion process's setting; the library never calls this).

    A slab's transient buffers (encoded shards of ~12 MB, pyramid planes, index histograms)
    were returned to the kernel when freed and faulted in again for the next slab: 12,000 of a
    conversion's 50,000 page faults. The values are those glibc's own dynamic thresholds grow
    to (mmap 32 MiB), with a trim threshold of 128 MiB; peak memory grew by 11 MB. No-op off
    glibc.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 2**20)


def _glibc() -> Any:
    """The C library when it is glibc (has ``mallopt``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") else None
    except OSError:
        return None


def _default_arena_max() -> int:
    """The arena limit the process runs with when nobody changed it (glibc's own default,
    or what the user set in ``MALLOC_ARENA_MAX``)."""
    try:
        return max(int(os.environ["MALLOC_ARENA_MAX"]), 1)
    except (KeyError, ValueError):
        return 8 * (os.cpu_count() or 1)  # NARENAS_FROM_NCORES on 64-bit glibc


@contextlib.contextmanager
def malloc_arenas(limit: int) -> Iterator[None]:
    """Limit glibc's malloc arenas while a case is written; the limit is set back after.

    With one arena per thread, buffers freed by one thread are reused poorly by the others and
    peak memory grew with the number of slices (520 MB at 400 slices, 698 MB at 1600,
    benchmarks/README.md). One arena plus the recycled slab buffers of ``iter_slabs`` keeps it
    flat (~490 MB at both) and was also faster; a fixed mmap threshold kept memory flat too but
    doubled the time (page faults and TLB shootdowns on every 32 MB slab). On leaving, the
    limit goes back to the process's default (``MALLOC_ARENA_MAX`` or glibc's own), so the
    library leaves no process-wide setting behind; arenas already created stay (glibc never
    frees them). No-op off glibc.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_ARENA_MAX, limit)
    try:
        yield
    finally:
        libc.mallopt(_M_ARENA_MAX, _default_arena_max())


#: how often a thread holding the GIL hands it over while a case is written (seconds)
GIL_SWITCH_INTERVAL = 0.001

_SWITCH_LOCK = threading.Lock()
_switch_users = 0
_switch_saved = 0.005


@contextlib.contextmanager
def gil_switch_interval(seconds: float) -> Iterator[None]:
    """Hand the GIL over at least every ``seconds`` while a case is written; the process's
    interval is set back when the last writer of the process leaves.

    The writer's threads alternate short Python steps with long GIL-free calls (inflate,
    blosc, the index kernel, file writes). A thread back from such a call waits for the GIL up
    to the whole interval (5 ms by default) while another runs Python, and a slab's encode
    makes hundreds of such calls: 1 ms made a whole ``ctzarr convert`` of the bench case
    0.23 s faster (median of 8 interleaved runs, benchmarks/README.md).
    """
    global _switch_users, _switch_saved
    with _SWITCH_LOCK:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(seconds, _switch_saved))
        _switch_users += 1
    try:
        yield
    finally:
        with _SWITCH_LOCK:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


def _warm_kernels(
    builders: dict[str, LabelIndexBuilder],
    lab_arrays: dict[str, list[zarr.Array[Any]]],
    value_dtype: np.dtype[Any],
) -> None:
    """Run the index kernel once on a tiny slab of each (label, value) dtype pair."""
    for name, builder in builders.items():
        tiny = LabelIndexBuilder(
            builder.values, (1, 1, 1), (1, 1, 1), label_dtype=lab_arrays[name][0].dtype
        )
        tiny.update(
            0, np.zeros((1, 1, 1), lab_arrays[name][0].dtype), np.zeros((1, 1, 1), value_dtype)
        )


class Prefetch:
    """Produce items in a background thread, ``depth`` ahead of the consumer; the thread starts
    at once (a conversion creates its arrays while the first slab inflates).

    Inflating slab k+1 then overlaps with compressing and indexing slab k; errors raised by the
    producer (a corrupt stream) surface in the consumer at the item where they happened. With
    ``permits`` the producer takes one before producing each item and the consumer gives it
    back when it is done with the item: no more items exist at once than there are permits
    (slab buffers recycled in a ring of that size are never overwritten while in use).
    :meth:`close` stops the producer (also when the consumer never started).
    """

    def __init__(
        self, items: Iterator[Any], depth: int = 1, permits: threading.Semaphore | None = None
    ) -> None:
        self._q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._items = items
        self._permits = permits
        self._thread = threading.Thread(target=self._produce, name="ctzarr-read", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        q, stop, permits = self._q, self._stop, self._permits
        try:
            it = iter(self._items)
            while True:
                if permits is not None:
                    while not permits.acquire(timeout=0.1):
                        if stop.is_set():
                            return
                if stop.is_set():
                    return
                try:
                    item = next(it)
                except StopIteration:
                    break
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
            q.put(("done", None))
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))

    def __iter__(self) -> Iterator[Any]:
        while True:
            kind, value = self._q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._q.get_nowait()
            except queue.Empty:
                self._thread.join(0.05)


#: numcodecs' numbers of blosc's shuffle modes
_BLOSC_SHUFFLE = {
    "noshuffle": Blosc.NOSHUFFLE,
    "shuffle": Blosc.SHUFFLE,
    "bitshuffle": Blosc.BITSHUFFLE,
}

#: a shard index entry (offset and length) of an inner chunk that is not stored
_ABSENT = 2**64 - 1

#: the codec chain :class:`ShardEncoder` writes (``model.layout.compressors`` inside a shard)
_LITTLE = {"name": "bytes", "configuration": {"endian": "little"}}


def _crc32c(data: bytes) -> bytes:
    """The crc32c codec's 4 bytes (little-endian) for ``data``."""
    return crc32c(data).to_bytes(4, "little")


@dataclass(frozen=True)
class ShardEncoder:
    """Writes whole shards of one array: blosc-compressed inner chunks with a crc32c each, then
    the shard index (offset and length of every inner chunk, little-endian uint64, 2**64-1 for a
    chunk not stored) and its crc32c: the chain :func:`ctzarr.model.layout.compressors` sets.

    Why not ``array[z0:z1] = slab``: zarr's write path costs 2 to 4 times the codec itself
    (measured on one 64-slice CT slab, 32 MB, 64 inner chunks: zarrs 0.21 s, zarr-python's own
    pipeline 0.11 s, numcodecs' blosc alone 0.054 s; the rest is copies of the whole slab, page
    faults on fresh slab-sized buffers and a coroutine per inner chunk), which made compression
    the largest share of a conversion. The codecs are zarr's own (numcodecs' Blosc and
    crc32c, with the array's parameters); only the shard layout of the sharding codec
    spec is assembled here, and every read checks it (inner and index checksums, manifest). An
    array with another codec chain is written by zarr (:meth:`for_array` returns None).
    """

    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    shard: tuple[int, ...]
    dtype: np.dtype[Any]  # as stored: little-endian
    fill_value: Any
    blosc: Any  # numcodecs.Blosc (untyped)
    metadata: ArrayV3Metadata

    @classmethod
    def for_array(cls, arr: zarr.Array[Any]) -> ShardEncoder | None:
        """The encoder of an array written with ``compressors()`` in shards, else None."""
        meta = arr.metadata
        if not isinstance(meta, ArrayV3Metadata) or len(meta.codecs) != 1:
            return None
        codecs = json.loads(json.dumps(meta.to_dict()["codecs"]))  # tuples as JSON lists
        if not isinstance(codecs, list) or len(codecs) != 1:
            return None
        sharding = codecs[0]
        if not isinstance(sharding, dict) or not isinstance(sharding.get("configuration"), dict):
            return None
        config = sharding["configuration"]
        inner = config.get("codecs")
        dtype = np.dtype(meta.data_type.to_native_dtype())
        if (
            sharding.get("name") != "sharding_indexed"
            or config.get("index_location", "end") != "end"
            or config.get("index_codecs") != [_LITTLE, {"name": "crc32c"}]
            or not isinstance(inner, list)
            or len(inner) != 3
            or inner[0] not in (_LITTLE, {"name": "bytes"})
            or (inner[0] == {"name": "bytes"} and dtype.itemsize != 1)
            or inner[1].get("name") != "blosc"
            or inner[2] != {"name": "crc32c"}
            or dtype.kind not in "iuf"
        ):
            return None
        blosc = inner[1]["configuration"]
        shard = arr.shards
        if shard is None:
            return None
        return cls(
            shape=tuple(meta.shape),
            chunk=tuple(int(n) for n in config["chunk_shape"]),
            shard=shard,
            dtype=dtype.newbyteorder("<"),
            fill_value=meta.fill_value,
            blosc=Blosc(
                cname=blosc["cname"],
                clevel=blosc["clevel"],
                shuffle=_BLOSC_SHUFFLE[blosc["shuffle"]],
                blocksize=blosc["blocksize"],
                typesize=blosc["typesize"],
            ),
            metadata=meta,
        )

    @property
    def index_nbytes(self) -> int:
        """Bytes of a shard's index with its checksum."""
        return math.prod(s // c for s, c in zip(self.shard, self.chunk, strict=True)) * 16 + 4

    def covers(self, z0: int, slab_shape: tuple[int, ...]) -> bool:
        """True when slices z0:z0+depth of whole planes are whole shards (the last one may end
        at the array's end): written without reading anything back."""
        z1 = z0 + slab_shape[0]
        return (
            tuple(slab_shape[1:]) == self.shape[1:]
            and z0 % self.shard[0] == 0
            and (z1 % self.shard[0] == 0 or z1 == self.shape[0])
        )

    def shards(self, z0: int, slab: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """(key, region of the slab) of every shard the slab covers."""
        starts = [
            range(z0, z0 + slab.shape[0], self.shard[0]),
            *(range(0, n, s) for n, s in zip(self.shape[1:], self.shard[1:], strict=True)),
        ]
        for corner in itertools.product(*starts):
            grid = tuple(c // s for c, s in zip(corner, self.shard, strict=True))
            region = (
                slice(corner[0] - z0, corner[0] - z0 + self.shard[0]),
                *(slice(c, c + s) for c, s in zip(corner[1:], self.shard[1:], strict=True)),
            )
            yield self.metadata.encode_chunk_key(grid), slab[region]

    def encode(self, region: np.ndarray) -> bytes | None:
        """The stored object of one shard from its region of the array (cut short at the array's
        end; the rest of its inner chunks is fill), or None when it holds only the fill value
        (``write_empty_chunks=False``: nothing is stored)."""
        grid_full = [s // c for s, c in zip(self.shard, self.chunk, strict=True)]
        grid = [-(-n // c) for n, c in zip(region.shape, self.chunk, strict=True)]
        index = np.full((*grid_full, 2), _ABSENT, dtype="<u8")
        chunk = np.empty(self.chunk, self.dtype)
        zero_fill = self.fill_value == 0
        parts: list[bytes] = []
        offset = 0
        for pos in np.ndindex(*grid):
            sub = region[
                tuple(slice(p * c, (p + 1) * c) for p, c in zip(pos, self.chunk, strict=True))
            ]
            if sub.shape != self.chunk:  # at the array's end: padded with the fill value
                chunk.fill(self.fill_value)
                chunk[tuple(slice(0, n) for n in sub.shape)] = sub
            else:
                np.copyto(chunk, sub)
            # fill-only chunks are not stored (-0.0 counts as 0, NaN does not, as in zarr)
            if not (chunk.any() if zero_fill else np.any(chunk != self.fill_value)):
                continue
            data = self.blosc.encode(chunk)
            parts += (data, _crc32c(data))
            index[pos] = (offset, len(data) + 4)
            offset += len(data) + 4
        if not parts:
            return None
        raw_index = index.tobytes()
        parts += (raw_index, _crc32c(raw_index))
        return b"".join(parts)


class LabelSlabSource(Protocol):
    """What the writer reads of a segmentation: a :class:`~ctzarr.sources.nifti.NiftiSource`
    (one label file), or the masks of one segmentation merged slab by slab
    (:class:`~ctzarr.sources.totalsegmentator.MaskStackSource`)."""

    @property
    def path(self) -> str: ...
    @property
    def shape_zyx(self) -> tuple[int, int, int]: ...
    @property
    def affine(self) -> np.ndarray: ...
    @property
    def header_bytes(self) -> bytes: ...
    @property
    def notes(self) -> tuple[str, ...]: ...
    @property
    def scaled(self) -> bool: ...
    def scale(self, raw: np.ndarray) -> np.ndarray: ...
    def iter_slabs(
        self, slab_z: int, digest: Any = None, reuse_buffers: int = 0
    ) -> Iterator[tuple[int, np.ndarray]]: ...


@dataclass
class SegmentationSource:
    """One segmentation of a case: its file (or merged masks) and its label map."""

    name: str
    source: LabelSlabSource
    label_map: LabelMap
    sparse: bool = False  # annotated only on some slices (ignore_value elsewhere)


@dataclass
class CaseWriter:
    """Streams one case into ``cases/<case_id>`` of an open collection group.

    Call :meth:`write` (all voxels, pyramid and index), then :meth:`commit` with the
    attributes that make the case visible.
    """

    root: zarr.Group
    case_id: str
    image: NiftiSource
    segmentations: list[SegmentationSource]
    progress: Any = None  # callable(n_slices) for progress bars
    indexes: dict[str, LabelIndex] = field(default_factory=dict)
    #: joint index of each pair of segmentations (A, B), A < B (store format 3)
    joint_indexes: dict[tuple[str, str], tuple[LabelIndex, JointInfo]] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    manifest: ManifestBuilder = field(default_factory=ManifestBuilder)
    #: the shard encoder of each data array by path (None: written by zarr)
    _encoders: dict[str, ShardEncoder | None] = field(default_factory=dict, init=False, repr=False)
    #: where the case is written: ``cases/<case_id>``, or a staging group when it replaces a
    #: committed case (moved into place after the commit, see ``convert.swap_in``)
    prefix: str | None = None

    @property
    def path(self) -> str:
        return self.prefix or f"cases/{self.case_id}"

    def write(self) -> None:
        """Stream every slab of image and segmentations into the store and build the index."""
        with malloc_arenas(1), gil_switch_interval(GIL_SWITCH_INTERVAL):
            self._write()

    def _write(self) -> None:
        hashes = {"image": hashlib.sha256()} | {
            s.name: hashlib.sha256() for s in self.segmentations
        }
        # A ring of SLABS_IN_FLIGHT slab buffers per stream. The reader takes a permit before
        # each slab and a slab gives it back once indexed and written, so a buffer is never
        # refilled while in use and memory stays at that many slabs. At least 2: the loop
        # below gives slab k's permit back after it has received slab k+1.
        in_flight = max(SLABS_IN_FLIGHT, 2)
        permits = threading.Semaphore(in_flight)
        streams = [self.image.iter_slabs(CHUNK, hashes["image"], reuse_buffers=in_flight)] + [
            s.source.iter_slabs(CHUNK, hashes[s.name], reuse_buffers=in_flight)
            for s in self.segmentations
        ]
        # the reader starts inflating now, while the arrays are created
        slabs = Prefetch(zip_longest(*streams), permits=permits)
        try:
            shape = self.image.shape_zyx
            levels = level_shapes(shape)
            with codec_pipeline(self.root.store):
                case = self.root.require_group(self.path)
                img_arrays = [
                    self._create(case, str(i), s, i, self.image.raw_dtype.newbyteorder("="))
                    for i, s in enumerate(levels)
                ]
                lab_arrays: dict[str, list[zarr.Array[Any]]] = {}
                for seg in self.segmentations:
                    dt = label_dtype(seg.label_map, seg.source)
                    grp = case.require_group(f"labels/{seg.name}")
                    lab_arrays[seg.name] = [
                        self._create(grp, str(i), s, i, dt) for i, s in enumerate(levels)
                    ]
            # the NIfTI headers, while the first slab inflates (they need only the groups)
            self.write_nifti_header()
            builders = {
                seg.name: LabelIndexBuilder(
                    seg.label_map.values,
                    shape,
                    chunk_layout(shape, 0)[0],
                    background=seg.label_map.background,
                    ignore_value=seg.label_map.ignore_value,
                    label_dtype=lab_arrays[seg.name][0].dtype,
                )
                for seg in self.segmentations
            }
            # the joint index of every pair of segmentations A < B, fed by the same index stage
            by_name = sorted(self.segmentations, key=lambda s: s.name)
            joints = {
                (a.name, b.name): JointIndexBuilder(
                    a.name,
                    b.name,
                    builders[a.name].values.tolist(),
                    builders[b.name].values.tolist(),
                    shape,
                    chunk_layout(shape, 0)[0],
                )
                for a, b in itertools.combinations(by_name, 2)
            }
            # Three overlapping stages: inflate (the prefetch thread), index (one thread, slabs in
            # order), compress and write (two threads: image pyramid, label pyramids; splitting the
            # image's level 0 from its smaller levels into a third thread measured no faster on 2
            # cores). One slab is in flight while the next is inflated, so memory stays at a few
            # slabs.
            with (
                ThreadPoolExecutor(1, thread_name_prefix="ctzarr-index") as index_pool,
                ThreadPoolExecutor(2, thread_name_prefix="ctzarr-write") as write_pool,
            ):
                # Load the compiled kernels while the first slab inflates (~0.05 s from the kernel
                # cache; numba compiles them on a machine's first conversion).
                pending: list[Any] = [
                    index_pool.submit(_warm_kernels, builders, lab_arrays, self.image.value_dtype)
                ]
                slab_pending = False  # pending holds the futures of a slab (not the warm-up)
                for parts in slabs:
                    z0, raw = parts[0]
                    values = self.image.scale(raw)
                    labels = [
                        self._as_labels(seg, lab, lab_arrays[seg.name][0].dtype)
                        for seg, (_, lab) in zip(self.segmentations, parts[1:], strict=True)
                    ]
                    futures = [
                        index_pool.submit(builders[seg.name].update, z0, lab, values)
                        for seg, lab in zip(self.segmentations, labels, strict=True)
                    ]
                    slab_of = {
                        s.name: lab for s, lab in zip(self.segmentations, labels, strict=True)
                    }
                    futures += [
                        index_pool.submit(joint.update, z0, slab_of[a], slab_of[b], values)
                        for (a, b), joint in joints.items()
                    ]
                    futures.append(
                        write_pool.submit(
                            self._write_pyramid, img_arrays, z0, raw, downsample_image
                        )
                    )
                    futures.append(
                        write_pool.submit(self._write_label_pyramids, lab_arrays, z0, labels)
                    )
                    for f in pending:
                        f.result()
                    if slab_pending:  # its buffers may be refilled
                        permits.release()
                    pending, slab_pending = futures, True
                    if self.progress is not None:
                        self.progress(raw.shape[0])
                for f in pending:
                    f.result()
        finally:
            slabs.close()
        self.digests = {k: h.hexdigest() for k, h in hashes.items()}

        for seg in self.segmentations:
            unknown = builders[seg.name].unknown_values()
            if unknown:
                raise UnknownLabelError(
                    f"case {self.case_id!r}: {seg.source.path}: label ids {unknown} are not in "
                    f"label map {seg.label_map.name!r}"
                )
            self.indexes[seg.name] = builders[seg.name].finish(sparse_annotation=seg.sparse)
        for pair, joint in joints.items():
            self.joint_indexes[pair] = (joint.finish(), joint.info)

    def _as_labels(
        self, seg: SegmentationSource, slab: np.ndarray, dtype: np.dtype[Any]
    ) -> np.ndarray:
        """Label slab in the stored dtype; non-integral or out-of-range values are an error."""

        values = seg.source.scale(slab)
        if values.dtype == dtype:
            return values
        if values.dtype.kind == "f" and not np.array_equal(values, np.floor(values)):
            raise UnknownLabelError(
                f"case {self.case_id!r}: {seg.source.path}: non-integer label values"
            )
        lo, hi = (values.min(), values.max()) if values.size else (0, 0)
        if lo < 0 or hi > np.iinfo(dtype).max:
            # float labels may be infinite: listed as floats, never through int(inf)
            bad = [
                int(v) if math.isfinite(v) else v
                for v in sorted(
                    {float(v) for v in np.unique(values) if v < 0 or v > np.iinfo(dtype).max}
                )[:20]
            ]
            raise UnknownLabelError(
                f"case {self.case_id!r}: {seg.source.path}: label ids {bad} are not in label map "
                f"{seg.label_map.name!r}"
            )
        return values.astype(dtype)

    def _create(
        self,
        group: zarr.Group,
        name: str,
        shape: tuple[int, int, int],
        level: int,
        dtype: np.dtype[Any],
    ) -> zarr.Array[Any]:
        chunk, shard = chunk_layout(shape, level)
        return group.create_array(
            name,
            shape=shape,
            dtype=dtype,
            chunks=chunk,
            shards=shard,
            compressors=compressors(),
            fill_value=0,
            dimension_names=("z", "y", "x"),
            overwrite=True,
            config={"write_empty_chunks": False},
        )

    def _write_label_pyramids(
        self, lab_arrays: dict[str, list[zarr.Array[Any]]], z0: int, labels: list[np.ndarray]
    ) -> None:
        for seg, lab in zip(self.segmentations, labels, strict=True):
            self._write_pyramid(lab_arrays[seg.name], z0, lab, downsample_labels)

    def _write_pyramid(
        self, arrays: list[zarr.Array[Any]], z0: int, slab: np.ndarray, down: Any
    ) -> None:
        for level, arr in enumerate(arrays):
            self._write_slab(arr, z0 >> level, slab)
            if level + 1 < len(arrays):
                slab = down(slab)

    def _write_slab(self, arr: zarr.Array[Any], z0: int, slab: np.ndarray) -> None:
        """Store slices z0:z0+depth of an array and add its objects to the manifest."""
        encoder = self._encoders.get(arr.path)
        if encoder is None and arr.path not in self._encoders:
            encoder = self._encoders[arr.path] = ShardEncoder.for_array(arr)
        if encoder is None or not encoder.covers(z0, slab.shape):
            arr[z0 : z0 + slab.shape[0]] = slab
            self._record(arr, z0, slab.shape[0])
            return
        rel = arr.path[len(self.path) + 1 :]
        for key, region in encoder.shards(z0, slab):
            data = encoder.encode(region)
            if data is None:  # all fill: no object (removed if there was one, as zarr does)
                sync(arr.store.delete(f"{arr.path}/{key}"))
            else:
                write_key(arr.store, f"{arr.path}/{key}", data)
            self.manifest.add(rel, key, data, encoder.index_nbytes)

    def _record(self, arr: zarr.Array[Any], z0: int, depth: int) -> None:
        """Add the objects just written for slices z0:z0+depth to the manifest.

        The bytes are read back from the store (the Rust pipeline writes local files itself);
        on a local disk that is a page-cache read, ~1 % of the conversion time.
        """
        grid = arr.shards or arr.chunks
        index_nbytes = (
            math.prod(g // c for g, c in zip(grid, arr.chunks, strict=True)) * 16 + 4
            if arr.shards
            else None
        )
        rel = arr.path[len(self.path) + 1 :]
        zs = range(z0 // grid[0], (z0 + depth - 1) // grid[0] + 1)
        rest = [range(-(-n // g)) for n, g in zip(arr.shape[1:], grid[1:], strict=True)]
        for idx in itertools.product(zs, *rest):
            key = "c/" + "/".join(map(str, idx))
            self.manifest.add(rel, key, read_key(arr.store, f"{arr.path}/{key}"), index_nbytes)

    # -- metadata ---------------------------------------------------------------------------
    def write_index(self) -> None:
        """Store each segmentation's index (table in attributes; histogram and per-slice rows as
        arrays), then the joint index of each pair of segmentations under
        ``labels/<A>/joint/<B>`` (store format 3, ``ctzarr.model.index``)."""
        with codec_pipeline(self.root.store):
            for seg in self.segmentations:
                self._write_one_index(
                    f"{self.path}/labels/{seg.name}/index", self.indexes[seg.name], {}
                )
            for (a, b), (idx, info) in self.joint_indexes.items():
                self._write_one_index(
                    f"{self.path}/labels/{a}/joint/{b}", idx, {"joint": info.to_attributes()}
                )

    def _write_one_index(self, path: str, idx: LabelIndex, extra: dict[str, Any]) -> None:
        grp = self.root.require_group(path)
        for name, rows, dims in (
            ("histogram", idx.histogram_array(), ("entry", "key_count")),
            ("slices", idx.slices_array(), ("slice", "count_keysum")),
        ):
            if rows is None:
                continue
            arr = grp.create_array(
                name,
                shape=rows.shape,
                dtype=np.int64,
                chunks=(max(len(rows), 1), 2),
                compressors=compressors(),
                overwrite=True,
                dimension_names=dims,
            )
            if len(rows):
                arr[:] = rows
            self._record(arr, 0, max(len(rows), 1))
        attributes = idx.to_attributes()
        attributes[CTZARR_KEY] = {**attributes[CTZARR_KEY], **extra}
        with compact_json():  # long lists (chunk ids and counts): 3x smaller than indented
            grp.attrs.put(attributes)

    def write_nifti_header(self) -> None:
        """The NIfTI-Zarr ``nifti`` arrays: the image's header bytes in the case group and each
        segmentation's (:func:`label_header_bytes`) in its label image group, one uint8 chunk."""
        with codec_pipeline(self.root.store):
            case = self.root[self.path]
            assert isinstance(case, zarr.Group)
            self._write_header(case, self.image.header_bytes)
            for seg in self.segmentations:
                grp = case[f"labels/{seg.name}"]
                assert isinstance(grp, zarr.Group)
                dtype = label_dtype(seg.label_map, seg.source)
                self._write_header(grp, label_header_bytes(seg.source, dtype))

    def _write_header(self, group: zarr.Group, header_bytes: bytes) -> None:
        header = np.frombuffer(header_bytes, dtype=np.uint8)
        arr = group.create_array(
            "nifti",
            shape=header.shape,
            dtype=np.uint8,
            chunks=header.shape,
            compressors=[Crc32cCodec()],
            overwrite=True,
            fill_value=0,
            dimension_names=(NIFTI_HEADER_DIMENSION,),
        )
        arr[:] = header
        self._record(arr, 0, len(header))

    def commit(self, case_attributes: CaseAttributes) -> None:
        """Make the case visible: label groups first, the case group's metadata last."""
        levels = level_shapes(self.image.shape_zyx)
        case = self.root[self.path]
        assert isinstance(case, zarr.Group)
        names = [s.name for s in self.segmentations]
        if names:
            case.require_group("labels").attrs.put({"ome": labels_attributes(names)})
        for seg in self.segmentations:
            grp = case[f"labels/{seg.name}"]
            source = case_attributes.source_files.get(seg.name)
            grp.attrs.put(
                {
                    "ome": label_image_attributes(
                        seg.name,
                        self.image.spacing_zyx,
                        levels,
                        seg.label_map,
                        # placed like the image (the segmentation's affine equals it within
                        # tolerance; its own is in its ``nifti`` header array)
                        case_attributes.affine_matrix if case_attributes.placed else None,
                    ),
                    **SegmentationAttributes(
                        label_map=seg.label_map.name,
                        ignore_value=seg.label_map.ignore_value,
                        sparse=seg.sparse,
                        source_file=None if source is None else source.path,
                    ).to_attributes(),
                }
            )
        committed = case_attributes.committed(
            self.manifest.build(), _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
        )
        # Consolidate the metadata of every array and group of the case into its zarr.json
        # (one read opens a whole case: a cold crop over HTTP costs 6 requests, not 13), then
        # write the commit marker into that same document, last.
        with (
            warnings.catch_warnings(),
            compact_json(),
        ):  # zarr: v3 consolidation is not in the spec yet
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            zarr.consolidate_metadata(self.root.store, path=self.path, zarr_format=3)
            case = zarr.open_group(self.root.store, path=self.path, mode="r+", zarr_format=3)
            # the digests of the commit record, bound to the case id (ctzarr.model.manifest)
            nodes = case.metadata.consolidated_metadata
            assert nodes is not None
            integrity = seal_case(
                self.root.store,
                self.path,
                self.case_id,
                committed.to_attributes(),
                nodes.flattened_metadata,
            )
            case.attrs.put(replace(committed, integrity=integrity).to_attributes())
