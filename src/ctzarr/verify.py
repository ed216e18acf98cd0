"""Store verification: every case complete, every chunk decodes (crc32c), the index matches."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from .collection import open_collection
from .convert import case_state, finalize_collection, remove_case

__all__ = ["VerifyReport", "verify"]


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

    Every listed case must be complete; every chunk of every array must decode (the crc32c
    codec rejects a flipped or truncated chunk); the label voxel counts of level 0 must equal
    the index. Cases left half-written by an interrupted run are reported (and removed with
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
    if repair and report.repaired:
        finalize_collection(
            zarr.open_group(_writable_store(col, storage_options), mode="r+", zarr_format=3)
        )
    return report


def _writable_store(col: Any, storage_options: Mapping[str, Any] | None) -> Any:
    from .storage import make_store

    return make_store(col.url, storage_options=dict(storage_options) if storage_options else None)


def _check_case(col: Any, cid: str, report: VerifyReport) -> None:
    case = col[cid]
    for level in range(case.levels):
        arr = case._array(str(level))
        _read_all(arr)
    case.nifti_header_bytes  # noqa: B018 - decoding checks its crc32c
    for seg in case.segmentation_names:
        idx = case.index(seg)
        counts: np.ndarray | None = None
        for level in range(case.levels):
            arr = case._array(f"labels/{seg}/{level}")
            c = _read_all(arr, count_labels=level == 0)
            if level == 0:
                counts = c
        assert counts is not None
        for label, n in zip(idx.labels.tolist(), idx.voxel_count.tolist(), strict=True):
            got = int(counts[label]) if label < len(counts) else 0
            if got != n:
                report.problems.append(
                    f"case {cid!r}: segmentation {seg!r} label {label}: {got} voxels stored, index says {n}"
                )


def _read_all(arr: zarr.Array, count_labels: bool = False) -> np.ndarray | None:
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
