"""The collection table (``<store>/index/``): one row per (case, segmentation, label) holding the
finished statistics of each structure, so that a cohort query reads one small group, not one
object per case.

Rows are computed from each case's index with the same function as ``Case.stats``, so the table,
the per-case index and a voxel scan agree exactly. Each run updates the table incrementally:
rows of the cases it converted are replaced, the others are kept as they were. Readers read the
table with :func:`read_table_columns`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import Any

import numpy as np
import zarr

from ctzarr.errors import TableMismatchError
from ctzarr.io.stores import compact_json
from ctzarr.io.transactions import case_state
from ctzarr.model.case import CaseAttributes
from ctzarr.model.collection import CollectionAttributes
from ctzarr.model.index import LabelIndex
from ctzarr.model.labels import LabelMap
from ctzarr.model.layout import compressors
from ctzarr.model.table import (
    TABLE_NUMERIC_COLUMNS,
    TableAttributes,
    TableCaseMeta,
    column_dtype,
    index_rows,
    is_table,
    table_array_attributes,
    table_array_update,
)

logger = logging.getLogger(__name__)


def _case_rows(
    root: zarr.Group, case_id: str, label_maps: dict[str, LabelMap], meta: CaseAttributes
) -> tuple[list[dict[str, Any]], TableCaseMeta]:
    """Statistics rows and geometry of one committed case, from its own index."""
    grp = zarr.open_group(root.store, path=f"cases/{case_id}", mode="r", zarr_format=3)
    geom = TableCaseMeta(
        affine=meta.affine,
        spacing_zyx=meta.spacing_zyx,
        shape_zyx=meta.shape_zyx,
        value_dtype=meta.nifti.value_dtype,
        segmentations=meta.segmentations,
    )
    rows = []
    for seg in meta.segmentations:
        igrp = grp[f"labels/{seg}/index"]
        assert isinstance(igrp, zarr.Group)
        hist = igrp["histogram"]
        assert isinstance(hist, zarr.Array)
        where = f"case {case_id!r}: index of {seg!r}"
        idx = LabelIndex.from_attributes(igrp.attrs.asdict(), np.asarray(hist[:]), where)
        rows += index_rows(geom.geometry(case_id), seg, label_maps[seg], idx)
    return rows, geom


def update_collection_table(root: zarr.Group, changed: Iterable[str] | None = None) -> list[str]:
    """Refresh the table and the collection's case list (compact JSON); see _update_table."""

    with compact_json():
        return _update_table(root, changed)


def _update_table(root: zarr.Group, changed: Iterable[str] | None = None) -> list[str]:
    """Refresh the table and the collection's case list; return the committed case ids.

    Parameters
    ----------
    root : zarr.Group
        The collection, writable.
    changed : iterable of str, optional
        Cases converted (or removed) since the table was written; only their rows are
        recomputed. ``None`` rebuilds every row from the cases' own indexes.
    """

    meta = CollectionAttributes.from_attributes(root.attrs.asdict(), str(root.store))
    label_maps = dict(meta.segmentations)
    seg_names = list(label_maps)
    try:
        previous = None if changed is None else read_table_columns(root)
    except TableMismatchError:
        logger.warning("collection table from an interrupted update: rebuilt from the cases")
        previous = None
    if previous is None:
        cases_grp = root.require_group("cases")
        candidates = sorted(cases_grp.group_keys())
        keep: dict[str, Any] = {}
        recompute = candidates
    else:
        changed_set = set(changed or ())
        old_cases = list(previous[1].cases)
        keep = {cid: i for i, cid in enumerate(old_cases) if cid not in changed_set}
        recompute = sorted(changed_set)
    new_rows: dict[str, list[dict[str, Any]]] = {}
    geometry: dict[str, TableCaseMeta] = (
        {}
        if previous is None
        else {cid: g for cid, g in previous[1].case_meta.items() if cid in keep}
    )
    for cid in recompute:
        state, case_meta = case_state(root, cid)
        if state == "complete" and case_meta is not None:
            new_rows[cid], geometry[cid] = _case_rows(root, cid, label_maps, case_meta)
    committed = sorted(set(keep) | set(new_rows))
    position = {cid: i for i, cid in enumerate(committed)}

    columns: dict[str, list[Any]] = {
        c: [] for c in ("case", "segmentation", *TABLE_NUMERIC_COLUMNS)
    }
    if previous is not None:
        old_cols, old_attrs = previous
        old_cases = list(old_attrs.cases)
        old_segs = old_attrs.segmentations
        rows_kept = np.array([old_cases[c] in keep for c in old_cols["case"].tolist()], dtype=bool)
        for col in TABLE_NUMERIC_COLUMNS:
            columns[col] = old_cols[col][rows_kept].tolist()
        columns["case"] = [position[old_cases[c]] for c in old_cols["case"][rows_kept].tolist()]
        columns["segmentation"] = [
            seg_names.index(old_segs[s]) for s in old_cols["segmentation"][rows_kept].tolist()
        ]
    for cid in sorted(new_rows):
        for row in new_rows[cid]:
            columns["case"].append(position[cid])
            columns["segmentation"].append(seg_names.index(row["segmentation"]))
            for col in TABLE_NUMERIC_COLUMNS:
                columns[col].append(row.get(col, -1) if col == "annotated_slices" else row[col])
    order = (
        np.lexsort(
            (
                np.asarray(columns["label"], np.int64),
                np.asarray(columns["segmentation"], np.int64),
                np.asarray(columns["case"], np.int64),
            )
        )
        if columns["case"]
        else np.zeros(0, np.int64)
    )
    # two arrays (integers, floats) rather than one per column: a table update is a handful of
    # writes, and a cohort query two reads
    int_names = ["case", "segmentation"] + [
        c for c in TABLE_NUMERIC_COLUMNS if column_dtype(c) is not np.float64
    ]
    float_names = [c for c in TABLE_NUMERIC_COLUMNS if column_dtype(c) is np.float64]
    n = len(columns["case"])
    ints = np.zeros((n, len(int_names)), np.int64)
    floats = np.zeros((n, len(float_names)), np.float64)
    for i, name in enumerate(int_names):
        ints[:, i] = np.asarray(columns[name], dtype=np.int64)[order] if n else []
    for i, name in enumerate(float_names):
        floats[:, i] = np.asarray(columns[name], dtype=np.float64)[order] if n else []
    table = root.require_group("index")
    update = uuid.uuid4().hex
    for name, data in (("int_columns", ints), ("float_columns", floats)):
        arr = table.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=(max(n, 1), data.shape[1]),
            overwrite=True,
            compressors=compressors(),
            dimension_names=("row", "column"),
            attributes=table_array_attributes(update),
        )
        if n:
            arr[:] = data
    table.attrs.put(
        TableAttributes(
            update=update,
            cases=tuple(committed),
            segmentations=tuple(seg_names),
            int_columns=tuple(int_names),
            float_columns=tuple(float_names),
            case_meta=geometry,
        ).to_attributes()
    )
    root.attrs.put(meta.with_cases(committed).to_attributes())
    return committed


def read_table_columns(
    root: zarr.Group,
) -> tuple[dict[str, np.ndarray], TableAttributes] | None:
    """The stored table as columns plus its attributes, or None when there is none yet.

    Raises :class:`TableMismatchError` when an update was interrupted between its writes: each
    update stamps both arrays and, last, the group attributes with one token.
    """
    if "index" not in root:
        return None
    grp = root["index"]
    assert isinstance(grp, zarr.Group)
    found = grp.attrs.asdict()
    if not is_table(found):
        return None
    attrs = TableAttributes.from_attributes(found, f"the collection table of {root.store}")
    arrays = [grp.get(name) for name in ("int_columns", "float_columns")]
    tokens = {attrs.update} | {
        table_array_update(a.attrs.asdict()) if isinstance(a, zarr.Array) else None for a in arrays
    }
    if len(tokens) != 1:
        raise TableMismatchError(
            f"the collection table of {root.store} is from an interrupted update (its parts "
            "were written by different runs); a plain re-run of convert or ctzarr verify "
            "--repair rebuilds it"
        )
    ints, floats = np.asarray(grp["int_columns"][:]), np.asarray(grp["float_columns"][:])  # type: ignore[index]
    cols = {name: ints[:, i] for i, name in enumerate(attrs.int_columns)}
    cols |= {name: floats[:, i] for i, name in enumerate(attrs.float_columns)}
    cols["touches_border"] = cols["touches_border"].astype(bool)
    return cols, attrs
