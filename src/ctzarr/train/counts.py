"""Per-chunk voxel counts for stores older than format 3: one pass, cached beside the cases.

Format 3 writes each label's voxel count per chunk into the index, in the conversion pass. An
older store lists only which chunks hold a label; its counts come from one pass over those
label chunks (each shard slab read once, every label counted at once with ``numpy.bincount``),
run by :func:`reindex` (``ctzarr reindex``) or on a sampler's first use of a case.

Where the counts are cached, and why there: one JSON object per case and segmentation under
:data:`CACHE_PREFIX` in the collection store (``ctzarr_cache/chunk_counts/<case>/<seg>.json``),
not in the case's index group. A case is sealed by its commit record (digests of every node's
attributes): adding counts to the index would mean re-sealing committed cases, which is the
converter's work, not a reader's. The cache is outside every case and every zarr node (zarr,
OME readers and ``ctzarr verify`` never see it) and is trusted only as far as it is checked:
it names the digest of the case document it was computed from (a re-converted case makes it
stale), its labels and chunks must be the index's own, and each label's counts must be positive
and sum to the index's voxel count; the sampler checks each chunk's count again when it reads
the chunk. A cache object is one whole-object write of content that depends only on the case,
so concurrent writers write the same bytes and need no lock; a torn or stale object fails the
checks and is computed again.

This module is part of the ``train`` layer: it writes only its own cache objects, through
:func:`ctzarr.io.stores.write_key`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from zarr.abc.store import Store
from zarr.storage import LocalStore

from ctzarr.errors import CtzarrError, StoreError
from ctzarr.io.stores import make_store, read_key, write_key
from ctzarr.io.strict import open_group_checked
from ctzarr.io.urls import is_remote, local_path
from ctzarr.model.collection import CollectionAttributes
from ctzarr.train.reader import CaseReader, ChunkCounts

logger = logging.getLogger(__name__)

#: where the cached counts of older stores live in a collection store
CACHE_PREFIX = "ctzarr_cache/chunk_counts"
_CACHE_VERSION = 1


def cache_key(case_id: str, segmentation: str) -> str:
    return f"{CACHE_PREFIX}/{case_id}/{segmentation}.json"


def count_pass(case: CaseReader, segmentation: str) -> ChunkCounts:
    """Per-chunk counts of every label of a segmentation from one pass over its label chunks
    (each slab of chunks holding any label read once)."""
    table = case.index_chunks(segmentation)
    if table.counts is not None:
        return table
    listed = np.unique(np.concatenate([np.zeros(0, np.int64), *table.chunk_ids]))
    arr = case.array(f"labels/{segmentation}/0")
    cz, cy, cx = table.chunk_shape
    shape = case.shape
    per_chunk: dict[int, np.ndarray] = {}
    values = table.labels
    slabs: list[int] = np.unique(np.unravel_index(listed, table.grid)[0]).tolist()
    for gz in slabs:  # one box per slab of chunks: a shard of the format, read once
        z0 = int(gz) * cz
        slab = arr.read_box(
            (slice(z0, min(z0 + cz, shape[0])), slice(0, shape[1]), slice(0, shape[2]))
        )
        in_slab = listed[np.unravel_index(listed, table.grid)[0] == gz]
        for chunk_id in in_slab.tolist():
            _, gy, gx = np.unravel_index(chunk_id, table.grid)
            block = slab[:, int(gy) * cy : (int(gy) + 1) * cy, int(gx) * cx : (int(gx) + 1) * cx]
            found, n = np.unique(block, return_counts=True)
            # counts of the index's labels in this chunk (others: background, ignore)
            pos = np.searchsorted(found, values)
            pos = np.minimum(pos, len(found) - 1)
            per_chunk[chunk_id] = np.where(found[pos] == values, n[pos], 0).astype(np.int64)
    counts = []
    for i, ids in enumerate(table.chunk_ids):
        counts.append(np.array([per_chunk[int(c)][i] for c in ids.tolist()], np.int64))
    return table.with_counts(tuple(counts), "pass")


def load_cached(store: Store, case: CaseReader, segmentation: str) -> ChunkCounts | None:
    """The cached counts of a case's segmentation, or None when absent, stale or invalid."""
    key = cache_key(case.case_id, segmentation)
    try:
        raw = read_key(store, key)
    except (OSError, CtzarrError) as exc:
        logger.debug("chunk-count cache %s unreadable: %s", key, exc)
        return None
    if raw is None:
        return None
    table = case.index_chunks(segmentation)
    try:
        doc = json.loads(raw)
        if doc.get("version") != _CACHE_VERSION or doc.get("case_document") != case.token:
            return None  # another version, or computed from another document of the case
        if doc.get("segmentation") != segmentation or doc.get("labels") != table.labels.tolist():
            raise ValueError("labels differ from the index")
        counts = tuple(np.asarray(c, np.int64).reshape(-1) for c in doc["chunk_counts"])
        return table.with_counts(counts, "cache")
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        logger.warning("ignoring chunk-count cache %s: %s", key, exc)
        return None


def write_cached(store: Store, case: CaseReader, segmentation: str, table: ChunkCounts) -> None:
    """Store a case's counts in the cache (one whole-object write)."""
    assert table.counts is not None
    doc = {
        "version": _CACHE_VERSION,
        "case_id": case.case_id,
        "segmentation": segmentation,
        "case_document": case.token,
        "labels": table.labels.tolist(),
        "chunk_counts": [c.tolist() for c in table.counts],
    }
    write_key(store, cache_key(case.case_id, segmentation), json.dumps(doc).encode())


def writable_local_store(url: str) -> Store | None:
    """A writable store over a local collection directory we may write to, else None (remote
    stores are cached by :func:`reindex`, which the user runs with write access)."""
    if is_remote(url):
        return None
    path = Path(local_path(url))
    if not path.is_dir() or not os.access(path, os.W_OK):
        return None
    return LocalStore(path, read_only=False)


def chunk_counts(
    case: CaseReader, segmentation: str, read_store: Store, cache_store: Store | None
) -> ChunkCounts:
    """A case's per-chunk counts: from the index (format 3), the cache, or one pass (cached in
    ``cache_store`` when one is given). The case reader keeps the result for the process."""
    table = case.index_chunks(segmentation)
    if table.counts is not None:
        return table
    cached = load_cached(read_store, case, segmentation)
    if cached is None:
        cached = count_pass(case, segmentation)
        if cache_store is not None:
            try:
                write_cached(cache_store, case, segmentation, cached)
            except (OSError, CtzarrError) as exc:
                logger.info("chunk counts of %s not cached: %s", case.where, exc)
    case.set_counts(segmentation, cached)
    return cached


@dataclass
class ReindexReport:
    """Outcome of :func:`reindex`, by ``(case_id, segmentation)``."""

    url: str
    #: counts computed and written to the cache
    written: list[tuple[str, str]] = field(default_factory=list)
    #: already in the index (format 3) or in a valid cache: nothing to do
    up_to_date: list[tuple[str, str]] = field(default_factory=list)
    #: what failed, with the error message
    failed: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        return (
            f"{self.url}: per-chunk counts written for {len(self.written)}, already there for "
            f"{len(self.up_to_date)}, failed for {len(self.failed)} (case, segmentation) pairs"
        )


def reindex(
    url: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    cases: Iterable[str] | None = None,
) -> ReindexReport:
    """Give an older store the per-chunk voxel counts that patch sampling uses.

    For each case and segmentation whose index lacks them (store format < 3) and that has no
    valid cached copy, one pass over its label chunks computes them and they are written to the
    store's chunk-count cache (see this module's notes). Cases of format 3 are left alone. The
    library side of ``ctzarr reindex STORE [--case ID ...]``.

    Parameters
    ----------
    url : str or path
        The collection store (local path or fsspec URL); it must be writable.
    storage_options : dict, optional
        fsspec options for a remote URL.
    cases : iterable of str, optional
        Case ids (default: every committed case).

    Returns
    -------
    ReindexReport
        What was written, what was already there and what failed (one bad case does not stop
        the others).
    """
    target = os.fspath(url)
    store = make_store(target, storage_options=storage_options, read_only=False)
    try:
        root = open_group_checked(store, "", target)
    except FileNotFoundError as exc:
        raise StoreError(f"{target}: no collection store here") from exc
    meta = CollectionAttributes.from_attributes(root.attrs.asdict(), target)
    wanted = list(meta.cases) if cases is None else list(cases)
    report = ReindexReport(target)
    for case_id in wanted:
        try:
            case = CaseReader(store, target, case_id)
        except CtzarrError as exc:
            report.failed.append((case_id, "", str(exc)))
            continue
        for seg in case.meta.segmentations:
            try:
                if case.index_chunks(seg).counts is not None or load_cached(store, case, seg):
                    report.up_to_date.append((case_id, seg))
                    continue
                write_cached(store, case, seg, count_pass(case, seg))
                report.written.append((case_id, seg))
            except (CtzarrError, OSError) as exc:
                report.failed.append((case_id, seg, str(exc)))
    return report
