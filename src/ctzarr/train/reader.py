"""The worker side of patch sampling: one process's open store, cases, label chunks and patches.

A :class:`StoreReader` is what a sampler's dataset carries into DataLoader workers: the store's
URL and options, no open handle. Each process opens its own store on first use, and a process
forked from one that had already read (torch's default) notices the new pid and opens afresh:
no store, client, cache or thread pool crosses a fork.

Why cases are opened here and not through :class:`ctzarr.read.case.Case`: the reading side
imports dask, xarray and pandas (~3 s and ~170 MB per spawned worker, measured here), which a
worker that reads one label chunk and two boxes per patch never uses. The checks are the same
ones :class:`~ctzarr.read.case.Case` makes, from the same functions (:mod:`ctzarr.io.strict`):
format version, metadata allowlist, commit record and node digests, manifest-checked reads.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.group import AsyncGroup, GroupMetadata
from zarr.storage import LocalStore, StorePath

from ctzarr.errors import (
    CaseNotFoundError,
    ChunkCorruptError,
    IncompleteCaseError,
    MetadataError,
    StoreError,
)
from ctzarr.io.stores import codec_pipeline, make_store, zarr_settings
from ctzarr.io.strict import (
    ArrayLayout,
    CaseIntegrity,
    CheckedArray,
    StrictStore,
    check_local_links,
    open_group_cached,
    read_boxes,
    validate_case_metadata,
)
from ctzarr.model.attributes import CTZARR_KEY, check_format_version, parse_block
from ctzarr.model.case import CaseAttributes, is_committed

logger = logging.getLogger(__name__)

_EXACT_RANGES = {"array.sharding_coalesce_max_gap_bytes": 0}

#: bytes of decoded label chunks a process keeps (a DAP chunk of 64^3 uint8 is 256 KiB)
LABEL_CHUNK_CACHE_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ChunkCounts:
    """Per-chunk voxel counts of the labels of one segmentation of one case.

    ``chunk_ids[i]`` (flat ids in ``grid``, C order) are the chunks of ``chunk_shape`` voxels
    (level 0) that hold label ``labels[i]``, ``counts[i]`` its voxel count in each; ``source``
    says where they came from: ``"index"`` (format 3), ``"cache"`` or ``"pass"`` (an older
    store: see :mod:`ctzarr.train.counts`).
    """

    labels: np.ndarray
    voxel_count: np.ndarray
    chunk_ids: tuple[np.ndarray, ...]
    counts: tuple[np.ndarray, ...] | None
    chunk_shape: tuple[int, int, int]
    grid: tuple[int, int, int]
    source: str

    def position(self, label: int) -> int | None:
        i = int(np.searchsorted(self.labels, label))
        return i if i < len(self.labels) and int(self.labels[i]) == label else None

    def with_counts(self, counts: tuple[np.ndarray, ...], source: str) -> ChunkCounts:
        """The same table with counts filled in, checked against the index: one positive count
        per listed chunk, summing to the label's voxel count."""
        if len(counts) != len(self.labels):
            raise ValueError(f"{len(counts)} count lists for {len(self.labels)} labels")
        for i, c in enumerate(counts):
            if len(c) != len(self.chunk_ids[i]) or (c <= 0).any():
                raise ValueError(f"label {int(self.labels[i])}: not one positive count per chunk")
            if int(c.sum()) != int(self.voxel_count[i]):
                raise ValueError(
                    f"label {int(self.labels[i])}: counts sum to {int(c.sum())}, the index says "
                    f"{int(self.voxel_count[i])}"
                )
        return ChunkCounts(
            self.labels,
            self.voxel_count,
            self.chunk_ids,
            counts,
            self.chunk_shape,
            self.grid,
            source,
        )

    def chunk_box(self, chunk_id: int) -> tuple[slice, slice, slice]:
        """The level-0 box of a chunk (clipped by the reader to the volume)."""
        idx = np.unravel_index(int(chunk_id), self.grid)
        return tuple(  # type: ignore[return-value]
            slice(int(i) * c, (int(i) + 1) * c) for i, c in zip(idx, self.chunk_shape, strict=True)
        )


def _three(value: Any) -> tuple[int, int, int]:
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError(f"expected 3 integers, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


def parse_chunk_counts(attributes: Mapping[str, Any], where: str) -> ChunkCounts:
    """The per-chunk part of an index group's attributes (no histogram read)."""
    d = parse_block(attributes, CTZARR_KEY, where)
    try:
        labels = np.asarray(d["labels"], np.int64).reshape(-1)
        n = len(labels)
        voxel_count = np.asarray(d["voxel_count"], np.int64).reshape(n)
        chunk_ids = tuple(np.asarray(c, np.int64).reshape(-1) for c in d["chunk_ids"])
        raw = d.get("chunk_counts")
        counts = None if raw is None else tuple(np.asarray(c, np.int64).reshape(-1) for c in raw)
        table = ChunkCounts(
            labels,
            voxel_count,
            chunk_ids,
            None,
            _three(d["chunk_shape"]),
            _three(d["chunk_grid"]),
            "index",
        )
        if len(chunk_ids) != n:
            raise ValueError(f"{len(chunk_ids)} chunk lists for {n} labels")
        cells = int(np.prod(table.grid))
        if any(len(c) and (c.min() < 0 or c.max() >= cells) for c in chunk_ids):
            raise ValueError("a chunk id outside the chunk grid")
        return table if counts is None else table.with_counts(counts, "index")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise MetadataError(where, f"{CTZARR_KEY} (index chunks)", f"malformed ({exc})") from None


class CaseReader:
    """One committed case, opened for patch reads in this process."""

    def __init__(self, store: Store, url: str, case_id: str) -> None:
        self.case_id = case_id
        where = self.where = f"case {case_id!r} in {url}"
        try:
            with codec_pipeline(store):
                group, self.token = open_group_cached(store, f"cases/{case_id}", where, url)
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as exc:
            raise CaseNotFoundError(f"no case {case_id!r} in {url}") from exc
        attributes = group.attrs.asdict()
        if not is_committed(attributes):
            raise IncompleteCaseError(f"{where} is incomplete (an interrupted conversion)")
        check_format_version(attributes, where)
        self._layouts: dict[str, ArrayLayout] = validate_case_metadata(group, where)
        self.meta = CaseAttributes.from_attributes(attributes, where)
        if self.meta.manifest is None:
            raise ChunkCorruptError(f"{where}: malformed chunk manifest: none")
        self._manifest = self.meta.manifest
        consolidated = group.metadata.consolidated_metadata
        self._nodes = {} if consolidated is None else consolidated.flattened_metadata
        self.integrity = CaseIntegrity(
            case_id, attributes, self._nodes, where, required=self.meta.format_version >= 2
        )
        levels = self.meta.level_shapes
        for path, layout in self._layouts.items():  # as read.case._check_shapes
            head, _, level = path.rpartition("/")
            if level.isdigit() and (
                head == "" or (head.startswith("labels/") and "/" not in head[7:])
            ):
                want = levels[int(level)] if int(level) < len(levels) else None
                if layout.shape != want:
                    raise ChunkCorruptError(
                        f"{where}: array {path!r} has shape {layout.shape}, the case is {want}"
                    )
        if isinstance(store, LocalStore):
            check_local_links(Path(store.root), Path(store.root) / group.path, where)
        else:
            strict = StrictStore(store, group.path, self._layouts, self._manifest, where)
            group = zarr.Group(
                AsyncGroup(metadata=group.metadata, store_path=StorePath(strict, group.path))
            )
        self.group = group
        self._arrays: dict[str, CheckedArray] = {}
        self._counts: dict[str, ChunkCounts] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.meta.shape_zyx

    def level_shape(self, level: int) -> tuple[int, int, int]:
        shapes = self.meta.level_shapes
        if not 0 <= level < len(shapes):
            raise ValueError(
                f"level must be from 0 to {len(shapes) - 1} for {self.where} (shape "
                f"{self.shape}), got {level}"
            )
        return shapes[level]

    def level_affine(self, level: int) -> np.ndarray:
        """The affine of a pyramid level: voxel centres of 2**level blocks (as Case.level_affine)."""
        affine = self.meta.affine_matrix
        if level == 0:
            return affine
        f = 2**level
        scale = np.diag([f, f, f, 1.0])
        scale[:3, 3] = (f - 1) / 2
        return np.asarray(affine @ scale)

    def array(self, path: str) -> CheckedArray:
        """A checked array of the case (as :meth:`ctzarr.read.case.Case.array`)."""
        arr = self._arrays.get(path)
        if arr is None:
            layout = self._layouts.get(path)
            if layout is None:
                raise KeyError(f"{self.where}: {path} is not an array")
            self.integrity.check_node(path)
            group, store = self.group, self.group.store

            def open_array() -> zarr.Array[Any]:
                # remote reads: zarr merges the byte ranges of inner chunks less than 1 MiB
                # apart into one request, which for a patch inside a whole-plane shard reads
                # the chunks between its rows too (~2x its bytes); a patch's ranges are
                # fetched concurrently anyway, so only the chunks it touches are asked for
                with codec_pipeline(store), zarr_settings(_EXACT_RANGES):
                    node = group[path]
                if not isinstance(node, zarr.Array):
                    raise KeyError(f"{self.where}: {path} is not an array")
                return node

            local = Path(store.root) / group.path / path if isinstance(store, LocalStore) else None
            arr = self._arrays[path] = CheckedArray(
                open_array, layout, self._manifest.records(path), self.where, local_dir=local
            )
        return arr

    def index_chunks(self, segmentation: str) -> ChunkCounts:
        """The chunks of each label of a segmentation, with per-chunk counts when the index
        has them (format 3)."""
        table = self._counts.get(segmentation)
        if table is None:
            path = f"labels/{segmentation}/index"
            node = self._nodes.get(path)
            if not isinstance(node, GroupMetadata):
                raise StoreError(f"{self.where}: segmentation {segmentation!r} has no index group")
            self.integrity.check_node(path)
            table = parse_chunk_counts(node.attributes, f"{self.where}: index of {segmentation!r}")
            self._counts[segmentation] = table
        return table

    def set_counts(self, segmentation: str, table: ChunkCounts) -> None:
        self._counts[segmentation] = table

    def read_label_chunk(self, segmentation: str, chunk_id: int) -> np.ndarray:
        """One level-0 label chunk (clipped to the volume)."""
        table = self.index_chunks(segmentation)
        box = table.chunk_box(chunk_id)
        clipped = tuple(
            slice(b.start, min(b.stop, n)) for b, n in zip(box, self.shape, strict=True)
        )
        return self.array(f"labels/{segmentation}/0").read_box(clipped)

    def read_patch(
        self,
        segmentation: str,
        level: int,
        origin: Sequence[int],
        size: Sequence[int],
        image_pad: Any,
        label_pad: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The image (values as nibabel returns them) and labels of a box of a level that may
        reach outside the volume: the outside is padded."""
        shape = self.level_shape(level)
        inside = []
        for o, s, n in zip(origin, size, shape, strict=True):
            inside.append(slice(min(max(o, 0), n), min(max(o + s, 0), n)))
        nifti = self.meta.nifti
        pad = np.asarray(image_pad).astype(nifti.value_dtype) if np.isfinite(image_pad) else None
        if pad is None or float(pad) != float(image_pad):
            raise ValueError(
                f"pad_value {image_pad!r} is not a value of the image of {self.where} "
                f"({nifti.value_dtype}): give a pad_value that it can hold"
            )
        image = np.full(tuple(size), pad, dtype=nifti.value_dtype)
        labels_arr = self.array(f"labels/{segmentation}/{level}")
        labels = np.full(tuple(size), label_pad, dtype=labels_arr.dtype)
        if all(sl.stop > sl.start for sl in inside):
            raw_image, raw_labels = read_boxes(
                [(self.array(str(level)), inside), (labels_arr, inside)]
            )
            target = tuple(
                slice(sl.start - o, sl.stop - o) for sl, o in zip(inside, origin, strict=True)
            )
            image[target] = nifti.scale(raw_image)
            labels[target] = raw_labels
        return image, labels


class StoreReader:
    """A collection store as one process reads it for patches; picklable, reopened per process.

    Holds the URL and storage options (or a store object when the collection was opened from
    one), never an open client across processes: the first call in a new process (a spawned
    worker, or a forked one, told apart by its pid) opens the store and starts empty caches.
    """

    def __init__(
        self,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        store: Store | None = None,
        chunk_cache_bytes: int = LABEL_CHUNK_CACHE_BYTES,
    ) -> None:
        self.url = url
        self.storage_options = dict(storage_options) if storage_options else None
        self._given_store = store
        self.chunk_cache_bytes = int(chunk_cache_bytes)
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._store: Store | None = None
        self._cases: dict[str, CaseReader] = {}
        self._chunks: OrderedDict[tuple[str, str, int], np.ndarray] = OrderedDict()
        self._chunk_bytes = 0
        #: label chunks read by this process (each from the store once while cached)
        self.chunk_reads = 0

    def __getstate__(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "storage_options": self.storage_options,
            "_given_store": self._given_store,
            "chunk_cache_bytes": self.chunk_cache_bytes,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def _check_process(self) -> None:
        if os.getpid() != self._pid:  # forked: nothing of the parent's is ours
            self._reset()

    @property
    def store(self) -> Store:
        self._check_process()
        if self._store is None:
            if self._given_store is not None:
                self._store = self._given_store
            else:
                self._store = make_store(
                    self.url, storage_options=self.storage_options, read_only=True
                )
        return self._store

    def case(self, case_id: str) -> CaseReader:
        self._check_process()
        reader = self._cases.get(case_id)
        if reader is None:
            reader = self._cases[case_id] = CaseReader(self.store, self.url, case_id)
        return reader

    def label_chunk(self, case_id: str, segmentation: str, chunk_id: int) -> np.ndarray:
        """A level-0 label chunk, from this process's cache or one read."""
        self._check_process()
        key = (case_id, segmentation, int(chunk_id))
        with self._lock:
            chunk = self._chunks.get(key)
            if chunk is not None:
                self._chunks.move_to_end(key)
                return chunk
        chunk = self.case(case_id).read_label_chunk(segmentation, chunk_id)
        chunk.setflags(write=False)
        with self._lock:
            self.chunk_reads += 1
            self._chunks[key] = chunk
            self._chunk_bytes += chunk.nbytes
            while self._chunk_bytes > self.chunk_cache_bytes and len(self._chunks) > 1:
                _, old = self._chunks.popitem(last=False)
                self._chunk_bytes -= old.nbytes
        return chunk
