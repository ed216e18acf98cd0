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
- blosc zstd level 3 with bitshuffle, then crc32c on every chunk (and on every shard index).

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
import logging
import math
import os
import queue
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from itertools import zip_longest
from typing import Any

import numba
import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from ctzarr.errors import UnknownLabelError
from ctzarr.io.stores import codec_pipeline, compact_json, read_key
from ctzarr.io.strict import seal_case
from ctzarr.model.case import CaseAttributes, SegmentationAttributes
from ctzarr.model.index import LabelIndex
from ctzarr.model.labels import LabelMap
from ctzarr.model.layout import CHUNK, chunk_layout, compressors, level_shapes
from ctzarr.model.manifest import ManifestBuilder
from ctzarr.model.ome import label_image_attributes, labels_attributes
from ctzarr.sources.nifti import NiftiSource, header_from_bytes
from ctzarr.write.index_builder import LabelIndexBuilder

logger = logging.getLogger(__name__)


@numba.njit(nogil=True, cache=True)
def _mean2(src, out):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled
    """2x2x2 block mean (edge blocks average what they hold), rounded for integer output."""
    nz, ny, nx = out.shape
    sz, sy, sx = src.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                acc = 0.0
                n = 0
                for dz in range(2):
                    zz = 2 * z + dz
                    if zz >= sz:
                        continue
                    for dy in range(2):
                        yy = 2 * y + dy
                        if yy >= sy:
                            continue
                        for dx in range(2):
                            xx = 2 * x + dx
                            if xx < sx:
                                acc += src[zz, yy, xx]
                                n += 1
                out[z, y, x] = acc / n


def downsample_image(slab: np.ndarray) -> np.ndarray:
    """Next pyramid level of an image slab: 2x2x2 mean, same dtype (integers rounded)."""
    out_shape = tuple(-(-s // 2) for s in slab.shape)
    if slab.dtype.kind == "f":
        out = np.empty(out_shape, slab.dtype)
        _mean2(slab, out)
        return out
    tmp = np.empty(out_shape, np.float64)
    _mean2(slab, tmp)
    return np.rint(tmp).astype(slab.dtype)


def downsample_labels(slab: np.ndarray) -> np.ndarray:
    """Next pyramid level of a label slab: nearest neighbour (every other voxel)."""
    return np.ascontiguousarray(slab[::2, ::2, ::2])


def label_dtype(label_map: LabelMap, source: NiftiSource) -> np.dtype[Any]:
    """Smallest unsigned dtype that holds every value of the label map (and the ignore value)."""
    top = label_map.max_value
    for dt in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"{source.path}: label values up to {top} do not fit uint32")


def label_header_bytes(source: NiftiSource, dtype: np.dtype[Any]) -> bytes:
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


#: glibc's mallopt parameter number of the arena limit
_M_ARENA_MAX = -8


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


def _prefetch(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """Produce items in a background thread, ``depth`` ahead of the consumer.

    Inflating slab k+1 then overlaps with compressing and indexing slab k; errors raised by the
    producer (a corrupt stream) surface in the consumer at the item where they happened.
    """
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("done", None))
        except BaseException as exc:  # handed to the consumer
            q.put(("error", exc))

    thread = threading.Thread(target=produce, name="ctzarr-read", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "done":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(0.05)


@dataclass
class SegmentationSource:
    """One segmentation of a case: its file and its label map."""

    name: str
    source: NiftiSource
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
    digests: dict[str, str] = field(default_factory=dict)
    manifest: ManifestBuilder = field(default_factory=ManifestBuilder)
    #: where the case is written: ``cases/<case_id>``, or a staging group when it replaces a
    #: committed case (moved into place after the commit, see ``convert.swap_in``)
    prefix: str | None = None

    @property
    def path(self) -> str:
        return self.prefix or f"cases/{self.case_id}"

    def write(self) -> None:
        """Stream every slab of image and segmentations into the store and build the index."""
        with malloc_arenas(1):
            self._write()

    def _write(self) -> None:
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
        hashes = {"image": hashlib.sha256()} | {
            s.name: hashlib.sha256() for s in self.segmentations
        }
        # a ring of 4 slab buffers per stream: one being inflated, one queued, one being
        # indexed and written, one whose writes are finishing
        streams = [self.image.iter_slabs(CHUNK, hashes["image"], reuse_buffers=4)] + [
            s.source.iter_slabs(CHUNK, hashes[s.name], reuse_buffers=4) for s in self.segmentations
        ]
        # Three overlapping stages: inflate (the prefetch thread), index (one thread, slabs in
        # order), compress and write (two threads: image pyramid, label pyramids). One slab is
        # in flight while the next is inflated, so memory stays at a few slabs.
        with (
            ThreadPoolExecutor(1, thread_name_prefix="ctzarr-index") as index_pool,
            ThreadPoolExecutor(2, thread_name_prefix="ctzarr-write") as write_pool,
        ):
            # Load the compiled kernels while the first slab inflates (numba's first call in a
            # process costs ~0.5 s even from its on-disk cache).
            pending: list[Any] = [
                index_pool.submit(_warm_kernels, builders, lab_arrays, self.image.value_dtype),
                write_pool.submit(
                    downsample_image, np.zeros((2, 2, 2), self.image.raw_dtype.newbyteorder("="))
                ),
            ]
            for parts in _prefetch(zip_longest(*streams)):
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
                futures.append(
                    write_pool.submit(self._write_pyramid, img_arrays, z0, raw, downsample_image)
                )
                futures.append(
                    write_pool.submit(self._write_label_pyramids, lab_arrays, z0, labels)
                )
                for f in pending:
                    f.result()
                pending = futures
                if self.progress is not None:
                    self.progress(raw.shape[0])
            for f in pending:
                f.result()
        self.digests = {k: h.hexdigest() for k, h in hashes.items()}

        for seg in self.segmentations:
            unknown = builders[seg.name].unknown_values()
            if unknown:
                raise UnknownLabelError(
                    f"case {self.case_id!r}: {seg.source.path}: label ids {unknown} are not in "
                    f"label map {seg.label_map.name!r}"
                )
            self.indexes[seg.name] = builders[seg.name].finish(sparse_annotation=seg.sparse)

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
            zl = z0 >> level
            arr[zl : zl + slab.shape[0]] = slab
            self._record(arr, zl, slab.shape[0])
            if level + 1 < len(arrays):
                slab = down(slab)

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
        """Store each segmentation's index: table in attributes, histogram as an array."""
        with codec_pipeline(self.root.store):
            for seg in self.segmentations:
                idx = self.indexes[seg.name]
                grp = self.root.require_group(f"{self.path}/labels/{seg.name}/index")
                hist = idx.histogram_array()
                arr = grp.create_array(
                    "histogram",
                    shape=hist.shape,
                    dtype=np.int64,
                    chunks=(max(len(hist), 1), 2),
                    compressors=compressors(),
                    overwrite=True,
                    dimension_names=("entry", "key_count"),
                )
                if len(hist):
                    arr[:] = hist
                self._record(arr, 0, max(len(hist), 1))
                grp.attrs.put(idx.to_attributes())

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
