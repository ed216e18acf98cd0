"""Body-composition queries: statistics within another structure, axial profiles, one-slice
statistics.

Three questions a body-composition study asks of a case, each answered from the index when
the store has what it needs and by one blockwise scan otherwise, with identical numbers:

- **within**: statistics of structures of one segmentation over the voxels that also lie
  inside a structure of another segmentation (``muscle`` of ``body_regions`` within ``torso``
  of ``body_parts``). From the joint index (format 3, pair codes of the two maps) when it was
  written; else one pass over the two label maps and the image, the converter's kernel run on
  the masked labels (never one pass per structure).
- **profile**: per axial slice (stored z index) voxel count, area and mean value of one
  structure. From the index's per-slice (count, key sum) arrays (format 3); else a scan
  through the same kernel, which computes the same arrays.
- **slice statistics**: the statistics columns on the one axial slice through the centroid of a
  landmark structure (``vertebrae L3``), read from that slice alone.

Definitions:

- ``z_mm`` is the world z (NIfTI RAS+, millimetres) of the centre of the slice's plane: the
  affine applied to voxel ``(i, j, k) = ((nx - 1) / 2, (ny - 1) / 2, z)``. For an axis-aligned
  affine it is ``affine[2, 2] * z + affine[2, 3]``, the slice's coordinate in ``case.image.z``.
- ``area_mm2`` = voxel count x the in-plane voxel area, the norm of the cross product of the
  affine's first two columns (``spacing_x * spacing_y`` for an axis-aligned affine).
- profile ``hu_mean`` = ``key_sum * histogram_resolution / voxel_count`` (key = value /
  resolution, an exact integer; resolution 1 for integer images).
- the landmark slice of ``at`` is ``z = floor(mean z index + 0.5)``, computed exactly in
  integers from the index's coordinate sum: ``(2 * sum_z + n) // (2 * n)``. On a sparse map
  (SAROS) that slice may be one of the unannotated ones: its structures then have
  ``voxel_count`` 0 (the rule is not bent to the nearest annotated slice). In the cohort form
  a case without ``at`` gives one row whose ``note`` says why (label -1, z -1, statistics NaN);
  every other row has an empty ``note``.
- within: ignore-valued voxels (SAROS 255) of either map never count; ``annotated_slices``
  (sparse maps) is the structure's own segmentation's count, as in :meth:`Case.stats`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from dask.base import compute

from ctzarr.errors import (
    CaseNotFoundError,
    IndexUnavailableError,
    SegmentationNotFoundError,
    StructureNotFoundError,
)
from ctzarr.io.urls import check_no_secrets
from ctzarr.model.index import LabelIndex
from ctzarr.model.labels import Label
from ctzarr.model.table import (
    PROFILE_COLUMNS,
    SLICE_COLUMNS,
    WITHIN_COLUMNS,
    index_rows,
    structure_name,
)
from ctzarr.read.stats import resolve_targets, scan_index_graph
from ctzarr.run.cluster import run_tasks
from ctzarr.write.index_builder import LabelIndexBuilder

if TYPE_CHECKING:
    from ctzarr.read.case import Case
    from ctzarr.read.collection import Collection

logger = logging.getLogger(__name__)

_METHODS = ("index", "scan")


def _check_method(method: str) -> None:
    if method not in _METHODS:
        raise ValueError(f"method must be 'index' or 'scan', not {method!r}")


def parse_within(within: Any) -> tuple[str, str | int]:
    """``(segmentation, structure)`` from a pair or a ``"segmentation:structure"`` string."""
    if isinstance(within, str):
        seg, sep, structure = within.partition(":")
        if not sep or not seg.strip() or not structure.strip():
            raise ValueError(
                f"within must be (segmentation, structure) or 'segmentation:structure', "
                f"got {within!r}"
            )
        return seg.strip(), structure.strip()
    if (
        isinstance(within, (tuple, list))
        and len(within) == 2
        and isinstance(within[0], str)
        and isinstance(within[1], (str, int))
    ):
        return within[0], within[1]
    raise ValueError(
        f"within must be (segmentation, structure) or 'segmentation:structure', got {within!r}"
    )


def in_plane_area_mm2(affine: np.ndarray) -> float:
    """Area of one voxel's axial face: the norm of the cross product of the affine's i and j
    columns (``spacing_x * spacing_y`` when the affine is axis-aligned)."""
    a = np.asarray(affine, np.float64)
    return float(np.linalg.norm(np.cross(a[:3, 0], a[:3, 1])))


def slice_z_mm(affine: np.ndarray, shape_zyx: tuple[int, int, int], z: np.ndarray) -> np.ndarray:
    """World z (RAS+ mm) of the centre of axial slices ``z`` (see the module docstring)."""
    a = np.asarray(affine, np.float64)
    i, j = (shape_zyx[2] - 1) / 2, (shape_zyx[1] - 1) / 2
    out: np.ndarray = a[2, 0] * i + a[2, 1] * j + a[2, 2] * np.asarray(z, np.float64) + a[2, 3]
    return out


# -- within -----------------------------------------------------------------------------------
def _within_label(case: Case, within: Any, segmentation: str | None) -> tuple[str, Label]:
    """The segmentation and label of a ``within`` argument, checked against the case."""
    wseg, wstructure = parse_within(within)
    if wseg not in case.collection.segmentations:
        raise SegmentationNotFoundError(
            f"within: no segmentation {wseg!r} in {case.collection.url}; it has "
            f"{list(case.collection.segmentations)}"
        )
    if segmentation is not None and segmentation == wseg:
        raise ValueError(
            f"within names segmentation {wseg!r}, the one the structures come from: "
            "name a structure of another segmentation"
        )
    lm = case.collection.segmentations[wseg]
    label = lm.resolve(wstructure)
    if label.value in (lm.background, lm.ignore_value):
        raise ValueError(f"within: {label.name!r} is the background of {wseg!r}, not a structure")
    return wseg, label


def case_within_stats(
    case: Case,
    structures: Sequence[str | int] | None,
    segmentation: str | None,
    within: Any,
    method: str = "index",
) -> pd.DataFrame:
    """Statistics of structures over the voxels inside another segmentation's structure (see
    :meth:`ctzarr.Case.stats`)."""
    _check_method(method)
    col = case.collection
    wseg, wlabel = _within_label(case, within, segmentation)
    targets = resolve_targets(col, case, structures, segmentation, exclude=wseg)
    if wseg not in case.segmentation_names:
        raise SegmentationNotFoundError(
            f"case {case.case_id!r} has no segmentation {wseg!r} (within); it has "
            f"{case.segmentation_names}"
        )
    rows: list[dict[str, Any]] = []
    geom = case.meta.geometry()
    for seg, labels in targets.items():
        if seg not in case.segmentation_names:
            continue
        lm = col.segmentations[seg]
        seg_rows = None
        if method == "index":
            seg_rows = _within_from_joint(case, seg, wseg, wlabel.value, labels, geom)
        if seg_rows is None:  # no joint index (format < 3), or asked to scan
            (scanned,) = compute(
                scan_index_graph(case, seg, keep=labels, within=(wseg, wlabel.value)),
                scheduler="threads",
            )
            seg_rows = index_rows(geom, seg, lm, scanned, labels)
        for row in seg_rows:
            row["within_segmentation"] = wseg
            row["within_structure"] = wlabel.name
        rows += seg_rows
    return _frame(rows, WITHIN_COLUMNS)


def _within_from_joint(
    case: Case,
    seg: str,
    wseg: str,
    wvalue: int,
    labels: list[int] | None,
    geom: Any,
) -> list[dict[str, Any]] | None:
    """Rows from the joint index of the two segmentations; None when none was written."""
    found = case.joint_index(seg, wseg)
    if found is None:
        return None
    joint, radix, flipped = found
    lm = case.collection.segmentations[seg]

    def code(a: int) -> int:  # the joint map's value of (structure a, within-structure)
        return wvalue * radix + a if flipped else a * radix + wvalue

    if labels is None:
        codes = joint.labels.astype(np.int64)
        ours = (codes // radix == wvalue) if flipped else (codes % radix == wvalue)
        labels = [int(c % radix if flipped else c // radix) for c in codes[ours].tolist()]
    own = case.index(seg).annotated_slices
    rows = index_rows(
        geom,
        seg,
        lm,
        joint,
        [code(a) for a in labels],
        annotated=None if own is None else len(own),
    )
    for row, a in zip(rows, labels, strict=True):
        row["label"] = int(a)
        row["structure"] = structure_name(lm, int(a))
    return rows


# -- profile ----------------------------------------------------------------------------------
def case_profile(
    case: Case, structure: str | int, segmentation: str | None = None, method: str = "index"
) -> pd.DataFrame:
    """Per axial slice count, area and mean value of a structure (see :meth:`Case.profile`)."""
    _check_method(method)
    seg, label = case.resolve(structure, segmentation)
    z = counts = key_sums = None
    resolution = 1.0
    if method == "index":
        idx = case.index(seg)
        try:
            z, counts, key_sums = idx.slice_profile(label.value)
            resolution = idx.histogram_resolution
        except IndexUnavailableError:
            logger.debug("case %r: no per-slice index (format < 3): profile by scan", case.case_id)
    if z is None or counts is None or key_sums is None:
        (scanned,) = compute(scan_index_graph(case, seg, keep=[label.value]), scheduler="threads")
        z, counts, key_sums = scanned.slice_profile(label.value)
        resolution = scanned.histogram_resolution
    return _profile_frame(case, seg, label, z, counts, key_sums, resolution)


def _profile_frame(
    case: Case,
    seg: str,
    label: Label,
    z: np.ndarray,
    counts: np.ndarray,
    key_sums: np.ndarray,
    resolution: float,
) -> pd.DataFrame:
    z = np.asarray(z, np.int64)
    counts = np.asarray(counts, np.int64)
    n = len(z)
    return pd.DataFrame(
        {
            "case_id": [case.case_id] * n,
            "segmentation": [seg] * n,
            "label": np.full(n, label.value, np.int64),
            "structure": [label.name] * n,
            "z": z,
            "z_mm": slice_z_mm(case.affine, case.shape, z),
            "voxel_count": counts,
            "area_mm2": counts * in_plane_area_mm2(case.affine),
            "hu_mean": np.asarray(key_sums, np.float64) * resolution / counts,
        },
        columns=PROFILE_COLUMNS,
    )


# -- slice statistics -------------------------------------------------------------------------
def resolve_landmark(case: Case, at: str | int) -> tuple[str, Label]:
    """The one segmentation and label of ``at`` among the case's segmentations.

    ``"segmentation:structure"`` names the segmentation; otherwise the name must fit exactly
    one segmentation of the case.
    """
    names = case.segmentation_names
    if isinstance(at, str):
        prefix, sep, rest = at.partition(":")
        if sep and prefix.strip() in names:
            return case.resolve(rest.strip(), prefix.strip())
    hits: list[tuple[str, Label]] = []
    errors = []
    for seg in names:
        try:
            hits.append((seg, case.collection.segmentations[seg].resolve(at)))
        except StructureNotFoundError as exc:
            errors.append(str(exc))
    if not hits:
        raise StructureNotFoundError(f"case {case.case_id!r}: at: " + "; ".join(errors))
    if len(hits) > 1:
        both = " and ".join(f"{lab.name!r} of {seg!r}" for seg, lab in hits)
        raise StructureNotFoundError(
            f"case {case.case_id!r}: at={at!r} is ambiguous: {both}; write it as "
            f"'{hits[0][0]}:{hits[0][1].name}'"
        )
    return hits[0]


def landmark_slice(
    case: Case, at: str | int, indexes: dict[str, LabelIndex] | None = None
) -> tuple[str, Label, int]:
    """``(segmentation, label, z)``: the axial slice through the centroid of ``at`` (index only;
    ``indexes`` caches the indexes read, by segmentation).

    Raises :class:`StructureNotFoundError` when the case does not contain it.
    """
    seg, label = resolve_landmark(case, at)
    idx = _cached_index(case, seg, indexes)
    hits = np.flatnonzero(idx.labels == label.value)
    if not len(hits):
        raise StructureNotFoundError(
            f"case {case.case_id!r}: landmark {label.name!r} (label {label.value}) is absent "
            f"from segmentation {seg!r}"
        )
    i = int(hits[0])
    n, s = int(idx.voxel_count[i]), int(idx.coord_sum[i, 0])
    return seg, label, (2 * s + n) // (2 * n)  # floor(s / n + 0.5), exact


def _cached_index(case: Case, seg: str, indexes: dict[str, LabelIndex] | None) -> LabelIndex:
    if indexes is None:
        return case.index(seg)
    if seg not in indexes:
        indexes[seg] = case.index(seg)
    return indexes[seg]


def case_slice_stats(
    case: Case,
    at: str | int,
    structures: Sequence[str | int] | None = None,
    segmentation: str | None = None,
) -> pd.DataFrame:
    """Statistics on the axial slice through the centroid of ``at`` (see
    :meth:`Case.slice_stats`); reads that one slice of the image and label maps."""
    indexes: dict[str, LabelIndex] = {}
    at_seg, at_label, z = landmark_slice(case, at, indexes)
    col = case.collection
    targets = resolve_targets(col, case, structures, segmentation)
    geom = case.meta.geometry()
    nifti = case.meta.nifti
    image: np.ndarray | None = None
    area = in_plane_area_mm2(case.affine)
    rows: list[dict[str, Any]] = []
    for seg, labels in targets.items():
        if seg not in case.segmentation_names:
            continue
        lm = col.segmentations[seg]
        stored = _cached_index(case, seg, indexes)
        plane = np.asarray(case.array(f"labels/{seg}/0")[z : z + 1])
        if image is None:
            image = nifti.scale(np.asarray(case.array("0")[z : z + 1]))
        builder = LabelIndexBuilder(
            lm.values,
            case.shape,
            stored.chunk_shape,
            background=lm.background,
            ignore_value=lm.ignore_value,
            label_dtype=plane.dtype,
        )
        builder.update(z, plane, image)
        idx = builder.finish(sparse_annotation=lm.ignore_value is not None)
        own = stored.annotated_slices
        seg_rows = index_rows(
            geom, seg, lm, idx, labels, annotated=None if own is None else len(own)
        )
        for row in seg_rows:
            row.update(
                at_segmentation=at_seg,
                at_structure=at_label.name,
                z=z,
                area_mm2=row["voxel_count"] * area,
            )
        rows += seg_rows
    return _frame(rows, SLICE_COLUMNS)


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """Rows as a table; ``annotated_slices`` last when a sparse map reports it."""
    extra = ["annotated_slices"] if any("annotated_slices" in r for r in rows) else []
    return pd.DataFrame(rows, columns=columns + extra)


# -- cohorts ----------------------------------------------------------------------------------
def _landmark_absent_row(case: Case, at: Any, reason: str) -> dict[str, Any]:
    """The note row of a case the cohort slice statistics skip."""
    row: dict[str, Any] = dict.fromkeys(SLICE_COLUMNS, np.nan)
    row.update(
        case_id=case.case_id,
        segmentation="",
        label=-1,
        structure="",
        voxel_count=0,
        volume_ml=0.0,
        z_start=-1,
        z_stop=-1,
        y_start=-1,
        y_stop=-1,
        x_start=-1,
        x_stop=-1,
        touches_border=False,
        at_segmentation="",
        at_structure=str(at),
        z=-1,
        area_mm2=0.0,
        note=reason,
    )
    return row


def _cohort_slice_stats(
    case: Case, at: Any, structures: Any, segmentation: str | None
) -> pd.DataFrame:
    """One case of ``Collection.slice_stats``: a note row instead of an error when ``at`` is
    absent from the case."""
    try:
        landmark_slice(case, at)
    except StructureNotFoundError as exc:
        return pd.DataFrame([_landmark_absent_row(case, at, str(exc))])
    out = case_slice_stats(case, at, structures, segmentation)
    out["note"] = ""
    return out


def _run_case_query(case: Case, query: str, params: dict[str, Any]) -> pd.DataFrame:
    if not _applies(case, query, params):
        return pd.DataFrame()
    if query == "within":
        return case_within_stats(case, **params)
    if query == "profile":
        return case_profile(case, **params)
    if query == "slice_stats":
        return _cohort_slice_stats(case, **params)
    raise ValueError(f"unknown query {query!r}")


def case_query_task(
    opener: Callable[..., Collection],
    url: str,
    options: dict[str, Any],
    case_id: str,
    query: str,
    params: dict[str, Any],
) -> pd.DataFrame:
    """Worker side of a cohort query: open the case from its URL and answer for it."""
    col = opener(url, storage_options=options or None)
    return _run_case_query(col[case_id], query, params)


def _applies(case: Case, query: str, params: dict[str, Any]) -> bool:
    """Whether the case has the segmentations a query needs (else it gives no rows)."""
    seg = params.get("segmentation")
    if seg is not None and seg not in case.segmentation_names:
        return False
    if query == "within":
        return parse_within(params["within"])[0] in case.segmentation_names
    if query == "profile":
        try:
            case.resolve(params["structure"], seg)
        except StructureNotFoundError:
            return False
    return True


def _resolve_anywhere(col: Collection, structure: Any, segmentation: str | None) -> None:
    """Raise unless the structure names a label of the segmentation (default: of any)."""
    names = [segmentation] if segmentation else list(col.segmentations)
    errors = []
    for name in names:
        if name not in col.segmentations:
            raise SegmentationNotFoundError(
                f"no segmentation {name!r} in {col.url}; it has {list(col.segmentations)}"
            )
        try:
            col.segmentations[name].resolve(structure)
            return
        except StructureNotFoundError as exc:
            errors.append(str(exc))
    raise StructureNotFoundError("; ".join(errors))


def _check_cohort_params(col: Collection, query: str, params: dict[str, Any]) -> None:
    """Names a cohort query uses, checked once against the collection before any task (a
    typo is an error, not a table of empty cases)."""
    if query == "profile":
        _resolve_anywhere(col, params["structure"], params.get("segmentation"))
    elif query == "within":
        wseg, wstructure = parse_within(params["within"])
        _resolve_anywhere(col, wstructure, wseg)
        for structure in params.get("structures") or ():
            _resolve_anywhere(col, structure, params.get("segmentation"))
    elif query == "slice_stats":
        at = params["at"]
        prefix, sep, rest = at.partition(":") if isinstance(at, str) else ("", "", "")
        if sep and prefix.strip() in col.segmentations:
            _resolve_anywhere(col, rest.strip(), prefix.strip())
        else:
            _resolve_anywhere(col, at, None)
        for structure in params.get("structures") or ():
            _resolve_anywhere(col, structure, params.get("segmentation"))


def collection_query(
    col: Collection,
    query: str,
    params: dict[str, Any],
    cases: Sequence[str] | None,
    client: Any,
    opener: Callable[..., Collection],
    columns: list[str],
) -> pd.DataFrame:
    """A body-composition query over a cohort: one task per case, rows concatenated in case
    order. With ``client`` the tasks run on the cluster (workers open the store from its URL
    with ``opener``); else here, one case after another (each scan uses every core)."""
    ids = list(cases) if cases is not None else col.case_ids
    missing = sorted(set(ids) - set(col.case_ids))
    if missing:
        raise CaseNotFoundError(f"no such cases in {col.url}: {missing[:10]}")
    _check_cohort_params(col, query, params)
    frames: list[pd.DataFrame] = [pd.DataFrame()] * len(ids)
    if client is not None:
        options = check_no_secrets(col.storage_options)
        tasks = [
            (f"{query} of case {cid!r}", (opener, col.url, options, cid, query, params))
            for cid in ids
        ]
        for i, frame in run_tasks(client, case_query_task, tasks):
            frames[i] = frame
    else:
        for i, cid in enumerate(ids):
            frames[i] = _run_case_query(col[cid], query, params)
    kept = [f for f in frames if len(f)]
    if not kept:
        return pd.DataFrame(columns=columns)
    out = pd.concat(kept, ignore_index=True)
    head = [c for c in columns if c in out.columns]
    return out[head + [c for c in out.columns if c not in head]]
