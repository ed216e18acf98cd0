"""``ctzarr verify``: a file-system check of a collection store.

It walks every object and reports every problem with its key, going on after each (a damaged
case, table or document never stops the walk, and never ends in a traceback): the collection's
commit record (label maps, case list) against its digest; every case's document, member nodes
and member ``zarr.json`` files against the digests bound to its id; every stored object
against its case's manifest (whole-object digests: bit rot, truncation, same-size forgery,
swaps); every chunk decoded; stored label ids against the label map and voxel counts against
the index (format 3: per-slice and per-chunk counts too, and each joint index against both label
maps, streamed slab by slab); the collection table against its digests, the case list and every case's own index;
symlinks leaving the store; locks, staging and temporary files left by interrupted runs.
``--repair`` removes what interrupted runs left behind and rebuilds the collection table.

Format-1 stores carry no digests: what they cannot prove is listed in ``notes``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ctzarr.errors import (
    CatalogError,
    ConfigError,
    CtzarrError,
    MissingDependencyError,
    TableMismatchError,
    UnsupportedFormatError,
)
from ctzarr.io.locks import CaseLock, collection_lock, lock_is_stale, read_lock
from ctzarr.io.stores import make_store
from ctzarr.io.strict import CheckedArray, StrictStore, document_problems
from ctzarr.io.transactions import (
    STAGING,
    case_state,
    remove_case,
    remove_staging,
    temporary_leftovers,
)
from ctzarr.model.manifest import Manifest, ShardRecord, crc32c, digest
from ctzarr.model.table import STATS_COLUMNS, is_table
from ctzarr.read.case import Case
from ctzarr.read.collection import Collection, open_collection_unverified
from ctzarr.write.convert import finalize_collection

#: what a format-1 store cannot prove (said once per store by verify)
FORMAT1_NOTE = (
    "format 1: objects carry no content digests (their crc32c checks sizes only) and metadata "
    "documents none: a chunk replaced by another of the same size, a swap between cases or an "
    "edited attribute cannot be detected; convert into a new store for format 2"
)


# -- verification --------------------------------------------------------------------------------
def _object_problem(data: bytes, rec: ShardRecord) -> str | None:
    if rec.has_digests:
        if len(data) != rec.nbytes or digest(data) != rec.digest:
            return (
                f"{len(data)} bytes whose digest differs from the manifest's ({rec.nbytes} "
                "bytes): bit rot, truncated, forged or swapped"
            )
        return None
    if len(data) != rec.nbytes or crc32c(data) != rec.crc32c:
        return (
            f"{len(data)} bytes, crc32c {crc32c(data):08x}; the manifest says {rec.nbytes} "
            f"bytes, {rec.crc32c or 0:08x}"
        )
    return None


def check_objects(case: Case) -> list[str]:
    """Problems found comparing every stored object of a case with its manifest (full reads).

    Catches what a strict read cannot see without reading whole objects: an object no read
    touches, bytes of a shard outside the inner chunks a read checks.
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
            if key.endswith(".partial"):
                continue  # reported as a temporary file of an interrupted write
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
            problem = _object_problem(buf.to_bytes(), rec)
            if problem is not None:
                problems.append(f"array {array_path!r} chunk {key}: {problem}")
    return problems


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: problems (each naming its object), repairs, and notes on what
    the store's format cannot prove."""

    url: str
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: the collection's store format version (None when its root could not be read)
    format_version: int | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        fmt = "" if self.format_version is None else f"format {self.format_version}, "
        head = f"{self.url}: {fmt}{len(self.checked)} cases checked, {len(self.problems)} problems"
        lines = (
            [head]
            + [f"  {p}" for p in self.problems]
            + [f"  repaired: removed {r}" for r in self.repaired]
        )
        return "\n".join(lines)


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, CtzarrError) else f"{type(exc).__name__}: {text}"


def _attempt(report: VerifyReport, label: str, step: Callable[[], Any]) -> Any:
    """Run one step of the walk; any failure becomes a problem line and the walk goes on."""
    try:
        return step()
    except Exception as exc:  # a traceback never ends a verify
        text = _message(exc)
        report.problems.append(text if label and text.startswith(label) else f"{label}{text}")
        return None


def verify(
    url: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    repair: bool = False,
) -> VerifyReport:
    """Check a collection store, like fsck: every object, every problem, never a traceback.

    Every listed case must be complete; every stored object must be the one its case manifest
    lists (present, same size and digest, no object the manifest does not know); every
    metadata document must match the digests of its commit record (bound to its case id: a
    swap between cases is found); every chunk of every array must decode; stored label ids
    must be in the label map and their voxel counts at level 0 must equal the index; the
    collection table must match its digests, the case list and each case's index. Cases left
    half-written by an interrupted run, stale locks, staging leftovers and temporary files are
    reported (and removed with ``repair=True``, which also rebuilds a damaged table).

    Parameters
    ----------
    url : str or path
        The collection store.
    storage_options : dict, optional
        fsspec options for remote URLs.
    repair : bool
        Remove leftovers of interrupted conversions and rebuild the collection table.
    """
    report = VerifyReport(str(url))
    try:
        col = open_collection_unverified(url, storage_options=storage_options)
    except (CatalogError, ConfigError, MissingDependencyError, UnsupportedFormatError):
        raise  # not damage to report: a refused target, a setting, or a store from a newer ctzarr
    except Exception as exc:
        report.problems.append(_message(exc))
        _check_without_collection(url, storage_options, report, repair)
        return report
    report.format_version = col.meta.format_version
    report.problems += [f"zarr.json: {p}" for p in col.integrity_problems]
    if col.meta.integrity is None:
        report.notes.append(FORMAT1_NOTE)
    root = col.root
    table_damaged = False
    on_disk: list[str] = []
    try:  # names only: a case whose document is unreadable is reported below, by name

        async def children() -> list[str]:
            return [k async for k in root.store.list_dir("cases")]

        on_disk = sorted(k for k in sync(children()) if k != "zarr.json" and "." not in k)
    except Exception as exc:
        report.problems.append(f"cases/: {_message(exc)}")
    for cid in on_disk:
        _attempt(
            report,
            f"case {cid!r}: ",
            partial(_check_state, col, cid, report, repair, storage_options),
        )
    _attempt(report, "", lambda: _check_locks_and_staging(col, report, storage_options, repair))
    _attempt(report, "", lambda: _check_links(col, report))
    stats: dict[str, pd.DataFrame] = {}
    for cid in col.case_ids:
        if cid not in on_disk:
            report.problems.append(
                f"case {cid!r}: listed in the collection but missing from cases/"
            )
            continue
        report.checked.append(cid)
        first = len(report.problems)
        try:
            found = _check_case(col, cid, report)
        except Exception as exc:  # opening the case failed: it names the document or chunk
            text = _message(exc)
            named = text.startswith(f"case {cid!r}")
            report.problems.append(text if named else f"case {cid!r}: {text}")
            continue
        finally:
            _one_line_per_object(report.problems, first)
        if found is not None:
            stats[cid] = found
    try:
        if not col.case_ids and "index" in root and not _table_written(root):
            # the first run was stopped between creating index/ and writing the table in it
            report.problems.append(
                "collection table (index/): empty, left from an interrupted update (the next "
                "convert or verify --repair writes it)"
            )
            table, table_damaged = None, True
        else:
            table = col.table() if col.case_ids or "index" in root else None
    except TableMismatchError as exc:
        report.problems.append(str(exc))
        table_damaged = True
    except Exception as exc:
        report.problems.append(f"collection table: {_message(exc)}")
        table_damaged = True
    else:
        if table is not None:
            table_damaged = _check_table_rows(table, stats, col.case_ids, report)
    if table_damaged and repair:
        report.repaired.append("collection table")
    if repair and report.repaired:
        _attempt(report, "repair: ", lambda: _rebuild(col, storage_options))
    return report


def _rebuild(col: Collection, storage_options: Mapping[str, Any] | None) -> None:
    writable = _writable_store(col, storage_options)
    with collection_lock(writable):
        finalize_collection(zarr.open_group(writable, mode="r+", zarr_format=3))


def _check_state(
    col: Collection,
    cid: str,
    report: VerifyReport,
    repair: bool,
    storage_options: Mapping[str, Any] | None,
) -> None:
    state, _ = case_state(col.root, cid)
    if state != "complete":
        report.problems.append(f"case {cid!r}: incomplete (left by an interrupted conversion)")
        if repair:
            writable = zarr.open_group(
                _writable_store(col, storage_options), mode="r+", zarr_format=3
            )
            remove_case(writable, cid)
            report.repaired.append(cid)


def _check_without_collection(
    url: str | os.PathLike[str],
    storage_options: Mapping[str, Any] | None,
    report: VerifyReport,
    repair: bool,
) -> None:
    """When the root document cannot be read: still report temporary files of interrupted
    writes (a kill during its write leaves one) and remove them with ``repair``."""
    try:
        store = make_store(
            os.fspath(url), storage_options=dict(storage_options) if storage_options else None
        )
        for key in temporary_leftovers(store):
            report.problems.append(f"leftover temporary file of an interrupted write: {key}")
            if repair:
                sync(store.delete(key))
                report.repaired.append(key)
    except Exception as exc:
        report.problems.append(_message(exc))


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


def _check_links(col: Collection, report: VerifyReport) -> None:
    """Symlinks anywhere in a local store that resolve outside it (cases are also refused when
    opened; the root, the table and leftovers are checked here)."""
    store = col.root.store
    if not isinstance(store, LocalStore):
        return
    top = Path(store.root).resolve()
    stack = [os.fspath(store.root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    real = Path(entry.path).resolve()
                    if real != top and top not in real.parents:
                        key = Path(entry.path).relative_to(store.root).as_posix()
                        report.problems.append(f"{key}: a symlink leaving the store (to {real})")
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)


#: where a problem line points: a case, an array and one of its stored objects
_OBJECT = re.compile(r"(case '[^']*': array '[^']*' chunk \S+?):")


def _one_line_per_object(problems: list[str], first: int) -> None:
    """Keep the first problem line of each stored object from ``first`` on: a damaged object is
    found against the manifest, when every chunk is decoded, and by each check that reads it
    (index, statistics: their lines name it after their own prefix), and is one problem."""
    seen: set[str] = set()
    kept = []
    for line in problems[first:]:
        found = _OBJECT.search(line)
        if found is not None:
            if found.group(1) in seen:
                continue
            seen.add(found.group(1))
        kept.append(line)
    problems[first:] = kept


def _table_written(root: zarr.Group) -> bool:
    """True when the root's ``index/`` group holds a collection table (its attributes)."""
    try:
        return is_table(root["index"].attrs.asdict())
    except Exception:  # unreadable: col.table() reports how
        return True


def _writable_store(col: Any, storage_options: Mapping[str, Any] | None) -> Any:
    """The collection's store opened for writing (repairs), with the options it was opened with
    (a catalog entry's own included)."""
    options = col.storage_options or (dict(storage_options) if storage_options else None)
    return make_store(col.url, storage_options=options)


def _check_case(col: Collection, cid: str, report: VerifyReport) -> pd.DataFrame | None:
    """Every document, node and stored object of a case; every chunk decoded; index counts.
    Returns the case's statistics from its own index (to check the table against)."""
    case = col[cid]
    problems = report.problems
    label = f"case {cid!r}: "
    if case.integrity.seal is None and FORMAT1_NOTE not in report.notes:
        report.notes.append(FORMAT1_NOTE)
    for problem in case.integrity.problems():
        problems.append(f"{label}{problem}")
    store = case.group.store
    store = store.inner if isinstance(store, StrictStore) else store
    for problem in document_problems(store, case.group.path, case.integrity.seal, label):
        problems.append(f"{label}cases/{cid}/{problem}")
    for problem in check_objects(case):
        problems.append(f"{label}{problem}")
    for path in case.array_paths:
        if path == "nifti" or path.endswith(("/nifti", "/histogram", "/slices")):
            _attempt(report, label, partial(_read_all, case.array, path))
    for level in range(case.levels):
        _attempt(report, label, partial(_read_all, case.array, str(level)))
    for seg in case.segmentation_names:
        lm = col.segmentations.get(seg)
        if lm is None:
            problems.append(f"{label}segmentation {seg!r} has no label map in the collection")
            continue
        idx = _attempt(report, f"{label}segmentation {seg!r} index: ", partial(case.index, seg))
        if idx is None:
            continue
        counts: np.ndarray | None = None
        for level in range(case.levels):
            c = _attempt(
                report,
                label,
                partial(_read_all, case.array, f"labels/{seg}/{level}", level == 0),
            )
            if level == 0:
                counts = c
        if counts is None:
            continue
        known = set(lm.values) | {v for v in (lm.background, lm.ignore_value) if v is not None}
        stray = sorted(set(np.flatnonzero(counts).tolist()) - known)
        if stray:
            problems.append(
                f"{label}segmentation {seg!r}: label ids {stray[:20]} are stored but not in "
                f"label map {lm.name!r}"
            )
        for lab, n in zip(idx.labels.tolist(), idx.voxel_count.tolist(), strict=True):
            got = int(counts[lab]) if lab < len(counts) else 0
            if got != n:
                problems.append(
                    f"{label}segmentation {seg!r} label {lab}: {got} voxels stored, index says {n}"
                )
        if case.meta.format_version >= 3:
            what = f"{label}segmentation {seg!r} index: "
            if idx.slice_counts is None or idx.chunk_counts is None:
                problems.append(f"{what}per-slice rows or per-chunk counts missing (format 3)")
                continue
            problems += [what + p for p in idx.problems()]
            _attempt(
                report,
                what,
                partial(_check_index_voxels, case, [seg], idx, _identity, what, problems),
            )
    if case.meta.format_version >= 3:
        _check_joint_indexes(case, col, report)
    result: pd.DataFrame | None = _attempt(report, f"{label}statistics: ", case.stats)
    return result


def _identity(slabs: list[np.ndarray]) -> np.ndarray:
    return slabs[0]


def _check_joint_indexes(case: Case, col: Collection, report: VerifyReport) -> None:
    """Each pair of segmentations of a format-3 case has a joint index agreeing with both maps."""
    label = f"case {case.case_id!r}: "
    names = sorted(n for n in case.segmentation_names if n in col.segmentations)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            what = f"{label}joint index of {a!r} and {b!r}: "
            found = _attempt(report, what, partial(case.joint_index, a, b))
            if found is None:
                if not any(p.startswith(what) for p in report.problems):
                    report.problems.append(f"{what}missing (format 3)")
                continue
            joint, radix, _ = found
            problems = report.problems
            problems += [what + p for p in joint.problems()]
            ok = [_label_table(col.segmentations[n].values, col.segmentations[n]) for n in (a, b)]

            def codes(
                slabs: list[np.ndarray], ok: list[np.ndarray] = ok, radix: int = radix
            ) -> np.ndarray:
                la, lb = (np.asarray(s, np.int64) for s in slabs)
                valid = _lookup(ok[0], la) & _lookup(ok[1], lb)
                # codes shifted by one, 0 for voxels outside any pair (bincount needs >= 0)
                return np.where(valid, la * radix + lb + 1, 0)

            _attempt(
                report,
                what,
                partial(_check_index_voxels, case, [a, b], joint, codes, what, problems, 1),
            )


def _label_table(values: Any, lm: Any) -> np.ndarray:
    """True at the label values of a map that are indexed (not background, not ignore)."""
    keep = [int(v) for v in values if v not in (lm.background, lm.ignore_value)]
    table = np.zeros(max(keep, default=0) + 1, bool)
    table[keep] = True
    return table


def _lookup(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    inside = values < len(table)
    found: np.ndarray = inside & table[np.where(inside, values, 0)]
    return found


def _check_index_voxels(
    case: Case,
    segmentations: list[str],
    idx: Any,
    to_codes: Callable[[list[np.ndarray]], np.ndarray],
    what: str,
    problems: list[str],
    shift: int = 0,
) -> None:
    """A format-3 index's per-slice and per-chunk counts against the stored level-0 labels,
    streamed one shard slab at a time (``to_codes`` turns the slabs into index codes + shift;
    for a joint index every pair voxel must be one the index lists)."""
    arrays = [case.array(f"labels/{s}/0") for s in segmentations]
    nz = arrays[0].shape[0]
    step = arrays[0].shards[0] if arrays[0].shards else arrays[0].chunks[0]
    cz, cy, cx = idx.chunk_shape
    gz, gy, gx = idx.chunk_grid
    wanted = idx.labels.astype(np.int64) + shift
    top = int(wanted.max()) + 1 if len(wanted) else 1
    per_slice = np.zeros((len(wanted), nz), np.int64)
    per_chunk = np.zeros((len(wanted), gz * gy * gx), np.int64)
    listed = 0
    for z0 in range(0, nz, step):
        codes = to_codes([np.asarray(a[z0 : z0 + step]) for a in arrays])
        depth = codes.shape[0]
        for z in range(depth):
            per_slice[:, z0 + z] = np.bincount(codes[z].ravel(), minlength=top)[wanted]
        for zc in range(z0 // cz, (z0 + depth - 1) // cz + 1):
            zs = slice(max(zc * cz - z0, 0), min((zc + 1) * cz - z0, depth))
            for yc in range(gy):
                for xc in range(gx):
                    block = codes[zs, yc * cy : (yc + 1) * cy, xc * cx : (xc + 1) * cx]
                    flat = (zc * gy + yc) * gx + xc
                    per_chunk[:, flat] += np.bincount(block.ravel(), minlength=top)[wanted]
        if shift:
            listed += int(np.count_nonzero(codes))
    if shift and listed != int(idx.voxel_count.sum()):
        problems.append(
            f"{what}{listed} voxels lie in a pair of labels, the index counts "
            f"{int(idx.voxel_count.sum())}"
        )
    off = idx.slice_offsets
    for i, lab in enumerate(idx.labels.tolist()):
        z0, z1 = int(idx.bbox[i, 0]), int(idx.bbox[i, 1])
        stored = per_slice[i, z0:z1]
        if per_slice[i].sum() != stored.sum() or not np.array_equal(
            stored, idx.slice_counts[off[i] : off[i + 1]]
        ):
            problems.append(f"{what}label {lab}: per-slice counts differ from the stored voxels")
        chunks = np.flatnonzero(per_chunk[i])
        if not (
            np.array_equal(chunks, idx.chunk_ids[i])
            and np.array_equal(per_chunk[i][chunks], idx.chunk_counts[i])
        ):
            problems.append(f"{what}label {lab}: per-chunk counts differ from the stored voxels")


def _check_table_rows(
    table: pd.DataFrame,
    stats: Mapping[str, pd.DataFrame],
    case_ids: list[str],
    report: VerifyReport,
) -> bool:
    """The table's rows of each case must equal the statistics of the case's own index."""
    damaged = False
    for cid in case_ids:
        want = stats.get(cid)
        if want is None:
            continue
        keys = ["segmentation", "label"]
        got = table[table.case_id == cid].sort_values(keys).reset_index(drop=True)
        want = want.sort_values(keys).reset_index(drop=True)
        columns = [c for c in STATS_COLUMNS if c in want.columns and c in got.columns]
        differ = len(got) != len(want) or [
            c for c in columns if not _same(got[c].to_numpy(), want[c].to_numpy())
        ]
        if differ:
            what = "rows" if differ is True else f"columns {differ[:6]}"
            report.problems.append(
                f"collection table (index/): case {cid!r}: {what} differ from the case's own index"
            )
            damaged = True
    return damaged


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.kind in "fc" or b.dtype.kind in "fc":
        try:
            return bool(np.array_equal(a.astype(np.float64), b.astype(np.float64), equal_nan=True))
        except (TypeError, ValueError):
            return False
    return [str(v) for v in a.tolist()] == [str(v) for v in b.tolist()]


def _read_all(
    open_array: Callable[[str], CheckedArray], path: str, count_labels: bool = False
) -> np.ndarray | None:
    """Decode every shard of an array; optionally count label values."""
    arr = open_array(path)
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
