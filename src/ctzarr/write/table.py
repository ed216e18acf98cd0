"""The collection table (``<store>/index/``): one row per (case, segmentation, label) holding the
finished statistics of each structure, so that a cohort query reads one small group, not one
object per case.

Rows are computed from each case's index with the same function as ``Case.stats``, so the table,
the per-case index and a voxel scan agree exactly. Each run updates the table incrementally:
rows of the cases it converted are replaced, the others are kept as they were. Readers read the
table with :func:`read_table_columns`.

Integrity (format 2): the table carries a chunk manifest and digests like a case (its arrays'
metadata and chunk records, its attributes), and the collection's own commit record names the
table's digest and update token, so a table from another update, another store or with rows
reordered is refused; its chunks are read through :class:`~ctzarr.io.strict.StrictStore` (a
missing chunk is an error, never zeros). Format-1 tables are checked for what they can be: a
missing chunk, a chunk that does not decode, a case list that is not the collection's.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from ctzarr.errors import (
    ChunkCorruptError,
    ChunkMissingError,
    StoreCorruptError,
    TableMismatchError,
)
from ctzarr.io.stores import compact_json, read_key
from ctzarr.io.strict import (
    StrictStore,
    array_layouts,
    node_digests,
    open_group_checked,
)
from ctzarr.io.transactions import case_state
from ctzarr.model.case import CaseAttributes
from ctzarr.model.collection import OME_SERIES_GROUP, CollectionAttributes
from ctzarr.model.index import LabelIndex
from ctzarr.model.labels import LabelMap
from ctzarr.model.layout import compressors
from ctzarr.model.manifest import ManifestBuilder, document_digest, seal
from ctzarr.model.table import (
    TABLE_NUMERIC_COLUMNS,
    TableAttributes,
    TableCaseMeta,
    attribute_text,
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
        attributes={str(k): attribute_text(v) for k, v in meta.attributes.items()},
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
    except (TableMismatchError, StoreCorruptError) as exc:
        logger.warning("collection table rebuilt from the cases: %s", exc)
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
    records = ManifestBuilder()
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
        records.add(name, "c/0/0", read_key(root.store, f"index/{name}/c/0/0"), None)
    manifest = records.build()
    # the arrays' metadata as readers will parse it (read back, not as created)
    written = zarr.open_group(root.store, path="index", mode="r", zarr_format=3)
    nodes = {name: written[name].metadata for name in ("int_columns", "float_columns")}
    table_attrs = TableAttributes(
        update=update,
        cases=tuple(committed),
        segmentations=tuple(seg_names),
        int_columns=tuple(int_names),
        float_columns=tuple(float_names),
        case_meta=geometry,
    )
    table_seal = seal(
        "table",
        TABLE_OWNER,
        table_attrs.to_attributes(),
        nodes=node_digests(TABLE_OWNER, nodes, manifest.to_dict()["arrays"]),
        manifest=manifest,
    )
    table.attrs.put(replace(table_attrs, integrity=table_seal).to_attributes())
    listed = meta.with_cases(committed)
    write_series(root, listed)
    root_seal = seal(
        "collection",
        COLLECTION_OWNER,
        replace(listed, integrity=None).to_attributes(),
        table=table_seal.digest,
        update=update,
    )
    root.attrs.put(replace(listed, integrity=root_seal).to_attributes())
    return committed


#: the owner the table's digests are bound to, and the collection's
TABLE_OWNER = "index"
COLLECTION_OWNER = "collection"


def write_series(root: zarr.Group, meta: CollectionAttributes) -> None:
    """List the committed cases in the OME group, for OME-Zarr readers (format 2; see
    :data:`~ctzarr.model.collection.OME_SERIES_GROUP`), just before the root's own case list;
    an interrupted update leaves both to the next one."""
    if meta.format_version >= 2:
        try:
            group = root.require_group(OME_SERIES_GROUP)
        except zarr.errors.ContainsGroupError:  # created meanwhile (require is check-then-create)
            group = zarr.open_group(root.store, path=OME_SERIES_GROUP, mode="r+", zarr_format=3)
        group.attrs.put(meta.series_attributes())


def seal_collection(meta: CollectionAttributes) -> CollectionAttributes:
    """The collection's attributes with their digest (for a new collection: no table yet)."""
    bare = replace(meta, integrity=None)
    return replace(bare, integrity=seal("collection", COLLECTION_OWNER, bare.to_attributes()))


def collection_problems(meta: CollectionAttributes, attributes: dict[str, Any]) -> list[str]:
    """What is wrong with the collection's own commit record (its label maps, case list,
    dataset): an empty list when it is as written, or when it is of format 1 (no digests)."""
    if meta.integrity is None:
        if meta.format_version >= 2:
            return ["attribute ctzarr.integrity: missing (a format-2 collection records digests)"]
        return []
    if (
        document_digest("collection", COLLECTION_OWNER, attributes, meta.integrity)
        != meta.integrity.digest
    ):
        return [
            "attributes (label maps, case list, dataset) differ from the collection's commit "
            "record: edited after conversion"
        ]
    return []


def read_table_columns(
    root: zarr.Group,
) -> tuple[dict[str, np.ndarray], TableAttributes] | None:
    """The stored table as columns plus its attributes, or None when there is none yet.

    Raises :class:`TableMismatchError` when an update was interrupted between its writes: each
    update stamps both arrays and, last, the group attributes with one token.
    """
    where = f"the collection table of {root.store}"
    try:
        grp = open_group_checked(root.store, "index", where)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        return None
    found = grp.attrs.asdict()
    if not is_table(found):
        return None
    attrs = TableAttributes.from_attributes(found, where)
    names = ("int_columns", "float_columns")
    arrays = {}
    for name in names:
        try:
            arrays[name] = grp.get(name)
        except (ValueError, TypeError, KeyError, RecursionError, zarr.errors.BaseZarrError) as exc:
            raise StoreCorruptError(
                f"{where}: index/{name}/zarr.json: unreadable metadata document "
                f"({type(exc).__name__}: {exc})",
                f"index/{name}/zarr.json",
            ) from None
    tokens = {attrs.update} | {
        table_array_update(a.attrs.asdict()) if isinstance(a, zarr.Array) else None
        for a in arrays.values()
    }
    interrupted = TableMismatchError(
        f"the collection table of {root.store} is from an interrupted update (its parts "
        "were written by different runs); a plain re-run of convert or ctzarr verify "
        "--repair rebuilds it"
    )
    if len(tokens) != 1:
        raise interrupted
    listed = CollectionAttributes.from_attributes(root.attrs.asdict(), f"{root.store}")
    if listed.integrity is not None and listed.integrity.update != attrs.update:
        raise interrupted  # the table was written, the case list not yet (or the reverse)
    if set(attrs.cases) != set(listed.cases):
        raise interrupted
    if attrs.cases != listed.cases:
        raise StoreCorruptError(
            f"{where}: index/zarr.json: its case order differs from the collection's case list "
            "(rows would be given to the wrong cases)",
            "index/zarr.json",
        )
    columns = {name: arr for name, arr in arrays.items() if isinstance(arr, zarr.Array)}
    if len(columns) != len(names):
        raise ChunkMissingError(f"{where}: index/int_columns or index/float_columns is missing")
    if attrs.integrity is None:
        if listed.format_version >= 2:
            raise StoreCorruptError(
                f"{where}: index/zarr.json: attribute ctzarr.integrity missing (a format-2 "
                "table records digests)",
                "index/zarr.json",
            )
        ints, floats = (_read_format1(root, grp, name, where) for name in names)
    else:
        ints, floats = _read_checked(root, grp, attrs, found, columns, listed, where)
    cols = {name: ints[:, i] for i, name in enumerate(attrs.int_columns)}
    cols |= {name: floats[:, i] for i, name in enumerate(attrs.float_columns)}
    if "touches_border" not in cols or "case" not in cols or "segmentation" not in cols:
        raise StoreCorruptError(
            f"{where}: index/zarr.json: the column lists lack case, segmentation or touches_border",
            "index/zarr.json",
        )
    cols["touches_border"] = cols["touches_border"].astype(bool)
    n_rows = len(cols["case"])
    codes = [("case", len(attrs.cases)), ("segmentation", len(attrs.segmentations))]
    for name, n in codes:
        if n_rows and (int(cols[name].min()) < 0 or int(cols[name].max()) >= n):
            raise StoreCorruptError(
                f"{where}: index/int_columns: {name} codes out of range", "index/int_columns"
            )
    return cols, attrs


def _read_format1(root: zarr.Group, grp: zarr.Group, name: str, where: str) -> np.ndarray:
    """A column array of a format-1 table: its one chunk must be stored and decode."""
    arr = grp[name]
    assert isinstance(arr, zarr.Array)
    key = f"index/{name}/c/0/0"
    if arr.shape[0] and not sync(root.store.exists(key)):
        raise ChunkMissingError(f"{where}: {key} is missing (its rows would read as zeros)")
    try:
        return np.asarray(arr[:])
    except Exception as exc:
        raise ChunkCorruptError(
            f"{where}: {key} does not decode ({type(exc).__name__}: {exc})"
        ) from exc


def _read_checked(
    root: zarr.Group,
    grp: zarr.Group,
    attrs: TableAttributes,
    found: dict[str, Any],
    columns: dict[str, Any],
    listed: CollectionAttributes,
    where: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The column arrays of a format-2 table, held to its digests and the collection's."""
    seal_ = attrs.integrity
    assert seal_ is not None
    if document_digest("table", TABLE_OWNER, found, seal_) != seal_.digest:
        raise StoreCorruptError(
            f"{where}: index/zarr.json: the table's attributes (case order, columns, case "
            "geometry) differ from its commit record",
            "index/zarr.json",
        )
    if listed.integrity is not None and listed.integrity.table != seal_.digest:
        raise StoreCorruptError(
            f"{where}: index/zarr.json: not the table the collection's commit record lists "
            "(swapped or replaced)",
            "index/zarr.json",
        )
    manifest = seal_.manifest
    records = {} if manifest is None else manifest.to_dict()["arrays"]
    metas = {name: arr.metadata for name, arr in columns.items()}
    if node_digests(TABLE_OWNER, metas, records) != {k: seal_.nodes.get(k) for k in metas}:
        raise StoreCorruptError(
            f"{where}: index/int_columns or index/float_columns: metadata or chunk records "
            "differ from the table's commit record",
            "index/zarr.json",
        )
    strict = StrictStore(root.store, "index", array_layouts(metas, where), manifest, where)
    checked = zarr.open_group(strict, path="index", mode="r", zarr_format=3)
    out = []
    for name in ("int_columns", "float_columns"):
        try:
            out.append(np.asarray(checked[name][:]))  # type: ignore[index]
        except (ChunkCorruptError, ChunkMissingError):
            raise
        except Exception as exc:
            raise ChunkCorruptError(
                f"{where}: index/{name}: does not decode ({type(exc).__name__}: {exc})"
            ) from exc
    return out[0], out[1]
