"""``ctzarr verify``: every stored object of every case against its manifest, locks and staging
leftovers, the collection table against the cases; ``--repair`` removes what interrupted runs
left behind and rebuilds the table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from ctzarr.errors import TableMismatchError
from ctzarr.io.locks import CaseLock, collection_lock, lock_is_stale, read_lock
from ctzarr.io.stores import make_store
from ctzarr.io.strict import CheckedArray, StrictStore
from ctzarr.io.transactions import STAGING, case_state, remove_case, remove_staging
from ctzarr.model.manifest import Manifest, crc32c
from ctzarr.read.case import Case
from ctzarr.read.collection import open_collection
from ctzarr.write.convert import finalize_collection
from ctzarr.write.table import read_table_columns


# -- verification --------------------------------------------------------------------------------
def check_objects(case: Case) -> list[str]:
    """Problems found comparing every stored object of a case with its manifest (full reads).

    Catches what a strict read cannot see without reading whole objects: an inner chunk
    replaced in place by another valid chunk of the same size (the shard index still matches).
    """
    store = case.group.store
    if isinstance(store, StrictStore):
        store = store.inner
    manifest: Manifest = case.manifest
    problems = []
    base = case.group.path
    for array_path in case.array_paths:
        records = manifest.records(array_path)
        prefix = f"{base}/{array_path}/c/"

        async def keys(prefix: str = prefix) -> list[str]:
            return [k async for k in store.list_prefix(prefix)]

        stored = {k[len(prefix) - 2 :] for k in sync(keys())}
        for key in sorted(stored - set(records)):
            problems.append(f"array {array_path!r} chunk {key}: stored but not in the manifest")
        for key, rec in sorted(records.items()):
            buf = sync(
                store.get(f"{base}/{array_path}/{key}", prototype=default_buffer_prototype())
            )
            if buf is None:
                problems.append(
                    f"array {array_path!r} chunk {key}: missing (the manifest lists it)"
                )
                continue
            data = buf.to_bytes()
            if len(data) != rec.nbytes or crc32c(data) != rec.crc32c:
                problems.append(
                    f"array {array_path!r} chunk {key}: {len(data)} bytes, crc32c {crc32c(data):08x}; "
                    f"the manifest says {rec.nbytes} bytes, {rec.crc32c:08x}"
                )
    return problems


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`."""

    url: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = f"{self.url}: {len(self.checked)} cases checked, {len(self.problems)} problems"
        lines = (
            [head]
            + [f"  {p}" for p in self.problems]
            + [f"  repaired: removed {r}" for r in self.repaired]
        )
        return "\n".join(lines)


def verify(
    url: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    repair: bool = False,
) -> VerifyReport:
    """Check a collection store.

    Every listed case must be complete; every stored object must be the one its case manifest
    lists (present, same size and crc32c, no object the manifest does not know); every chunk of
    every array must decode (the crc32c codec rejects a flipped or truncated chunk); stored
    label ids must be in the label map and their voxel counts at level 0 must equal the index. Cases left half-written by an interrupted run are reported (and removed with
    ``repair=True``).

    Parameters
    ----------
    url : str or path
        The collection store.
    storage_options : dict, optional
        fsspec options for remote URLs.
    repair : bool
        Remove leftovers of interrupted conversions and rebuild the collection table.
    """
    col = open_collection(url, storage_options=storage_options)
    report = VerifyReport(str(url))
    root = col.root
    cases_grp = root["cases"]
    assert isinstance(cases_grp, zarr.Group)
    on_disk = sorted(cases_grp.group_keys())
    for cid in on_disk:
        state, _ = case_state(root, cid)
        if state != "complete":
            report.problems.append(f"case {cid!r}: incomplete (left by an interrupted conversion)")
            if repair:
                writable = zarr.open_group(
                    _writable_store(col, storage_options), mode="r+", zarr_format=3
                )
                remove_case(writable, cid)
                report.repaired.append(cid)
    _check_locks_and_staging(col, report, storage_options, repair)
    for cid in col.case_ids:
        if cid not in on_disk:
            report.problems.append(
                f"case {cid!r}: listed in the collection but missing from cases/"
            )
            continue
        report.checked.append(cid)
        try:
            _check_case(col, cid, report)
        except Exception as exc:  # a decode failure names the array and chunk
            report.problems.append(f"case {cid!r}: {type(exc).__name__}: {exc}")
    try:
        read_table_columns(root)
    except TableMismatchError as exc:
        report.problems.append(str(exc))
        if repair:
            report.repaired.append("collection table")
    if repair and report.repaired:
        writable = _writable_store(col, storage_options)
        with collection_lock(writable):
            finalize_collection(zarr.open_group(writable, mode="r+", zarr_format=3))
    return report


def _check_locks_and_staging(
    col: Any, report: VerifyReport, storage_options: Mapping[str, Any] | None, repair: bool
) -> None:
    """Stale case locks and staging leftovers of interrupted replacements."""
    store = col.root.store
    if not store.supports_listing:
        return

    async def keys(prefix: str) -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    locked = {k[len("locks/") : -len(".json")] for k in sync(keys("locks/")) if k.endswith(".json")}
    live = set()
    for cid in sorted(locked):
        rec = read_lock(store, cid)
        if rec is None:
            continue
        if not lock_is_stale(rec):
            live.add(cid)
            continue
        report.problems.append(
            f"case {cid!r}: stale lock (pid {rec.get('pid')} on {rec.get('host')!r})"
        )
        if repair:
            lock = CaseLock(_writable_store(col, storage_options), cid)
            lock.remove()
            report.repaired.append(f"lock of {cid}")
    staged = {k[len(STAGING) + 1 :].split("/", 1)[0] for k in sync(keys(f"{STAGING}/"))}
    for name in sorted(staged):
        cid = name.rpartition("-")[0]
        if not cid or cid in live:
            continue  # a replacement being written right now
        report.problems.append(
            f"case {cid!r}: leftover of an interrupted replacement ({STAGING}/{name})"
        )
        if repair:
            remove_staging(
                zarr.open_group(_writable_store(col, storage_options), mode="r+", zarr_format=3),
                cid,
            )
            report.repaired.append(f"{STAGING}/{name}")
    if live:
        return  # a conversion is running: its temporary files are not leftovers
    # zarr's LocalStore writes <key>.<hex>.partial and renames it: a kill in between leaves it
    partial = [k for k in sync(keys("")) if k.endswith(".partial")]
    for key in partial:
        report.problems.append(f"leftover temporary file of an interrupted write: {key}")
        if repair:
            sync(_writable_store(col, storage_options).delete(key))
            report.repaired.append(key)


def _writable_store(col: Any, storage_options: Mapping[str, Any] | None) -> Any:

    return make_store(col.url, storage_options=dict(storage_options) if storage_options else None)


def _check_case(col: Any, cid: str, report: VerifyReport) -> None:
    """Every stored object of a case against its manifest, every chunk decoded, index counts."""
    case = col[cid]
    problems = report.problems
    for problem in check_objects(case):
        problems.append(f"case {cid!r}: {problem}")
    for level in range(case.levels):
        _try(problems, cid, lambda level=level: _read_all(case.array(str(level))))
    _try(problems, cid, lambda: case.nifti_header_bytes)  # decoding checks its crc32c
    for seg in case.segmentation_names:
        lm = col.segmentations.get(seg)
        if lm is None:
            problems.append(
                f"case {cid!r}: segmentation {seg!r} has no label map in the collection"
            )
            continue
        try:
            idx = case.index(seg)
        except Exception as exc:
            problems.append(
                f"case {cid!r}: segmentation {seg!r} index: {type(exc).__name__}: {exc}"
            )
            continue
        counts: np.ndarray | None = None
        for level in range(case.levels):
            c = _try(
                problems,
                cid,
                lambda level=level, seg=seg: _read_all(
                    case.array(f"labels/{seg}/{level}"), count_labels=level == 0
                ),
            )
            if level == 0:
                counts = c
        if counts is None:
            continue
        known = set(lm.values) | {v for v in (lm.background, lm.ignore_value) if v is not None}
        stray = sorted(set(np.flatnonzero(counts).tolist()) - known)
        if stray:
            problems.append(
                f"case {cid!r}: segmentation {seg!r}: label ids {stray[:20]} are stored but not in "
                f"label map {lm.name!r}"
            )
        for label, n in zip(idx.labels.tolist(), idx.voxel_count.tolist(), strict=True):
            got = int(counts[label]) if label < len(counts) else 0
            if got != n:
                problems.append(
                    f"case {cid!r}: segmentation {seg!r} label {label}: {got} voxels stored, index says {n}"
                )


def _try(problems: list[str], cid: str, read: Any) -> Any:
    """Run one read; a failure (it names the array and chunk) becomes a problem line."""
    try:
        return read()
    except Exception as exc:
        problems.append(f"case {cid!r}: {type(exc).__name__}: {exc}")
        return None


def _read_all(arr: CheckedArray, count_labels: bool = False) -> np.ndarray | None:
    """Decode every shard of an array; optionally count label values."""
    step = arr.shards[0] if arr.shards else arr.chunks[0]
    counts = None
    for z0 in range(0, arr.shape[0], step):
        block = arr[z0 : z0 + step]
        if count_labels:
            c = np.bincount(np.asarray(block).ravel())
            counts = c if counts is None else _add(counts, c)
    return counts


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) < len(b):
        a, b = b, a
    a = a.copy()
    a[: len(b)] += b
    return a
