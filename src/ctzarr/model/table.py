"""The statistics table: its columns, and how an index becomes rows.

One function (:func:`index_rows`) turns a :class:`~ctzarr.model.index.LabelIndex` into
statistics rows; the collection table written at conversion, ``Case.stats`` and the voxel scan
all go through it, so the three agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ctzarr.errors import MetadataError
from ctzarr.model.attributes import (
    CTZARR_KEY,
    Affine,
    parse_affine,
    parse_block,
    parse_dtype,
    parse_shape,
    parse_spacing,
    parse_str,
    parse_str_list,
    require,
)
from ctzarr.model.index import LabelIndex
from ctzarr.model.labels import LabelMap
from ctzarr.model.manifest import Integrity

#: integer-valued statistics columns (the others are floats, touches_border is bool)
INTEGER_COLUMNS = frozenset(
    {
        "label",
        "voxel_count",
        "z_start",
        "z_stop",
        "y_start",
        "y_stop",
        "x_start",
        "x_stop",
        "annotated_slices",
    }
)


STATS_COLUMNS = [
    "case_id",
    "segmentation",
    "label",
    "structure",
    "voxel_count",
    "volume_ml",
    "hu_mean",
    "hu_std",
    "hu_min",
    "hu_max",
    "hu_median",
    "hu_p05",
    "hu_p25",
    "hu_p75",
    "hu_p95",
    "centroid_x",
    "centroid_y",
    "centroid_z",
    "z_start",
    "z_stop",
    "y_start",
    "y_stop",
    "x_start",
    "x_stop",
    "touches_border",
]


#: columns of ``stats(..., within=...)``: the statistics columns over the voxels inside another
#: segmentation's structure, then which structure that is
WITHIN_COLUMNS = [*STATS_COLUMNS, "within_segmentation", "within_structure"]


#: columns of ``profile``: one row per axial slice (stored z index) holding the structure
PROFILE_COLUMNS = [
    "case_id",
    "segmentation",
    "label",
    "structure",
    "z",
    "z_mm",
    "voxel_count",
    "area_mm2",
    "hu_mean",
]


#: columns of ``slice_stats``: the statistics columns on one axial slice, the landmark that
#: chose it, its z index and the structure's area on it (the cohort form adds ``note``)
SLICE_COLUMNS = [*STATS_COLUMNS, "at_segmentation", "at_structure", "z", "area_mm2"]


#: the columns ``ctzarr stats`` prints on a terminal (all of them go to -o OUT.csv / .parquet):
#: every statistics column but the spread of HU values and the bounding box
SUMMARY_COLUMNS = [
    c
    for c in STATS_COLUMNS
    if c not in ("hu_min", "hu_max", "hu_p05", "hu_p25", "hu_p75", "hu_p95")
    and not c.endswith(("_start", "_stop"))
]


#: numeric columns stored as arrays (case_id, segmentation and structure are stored as codes)
TABLE_NUMERIC_COLUMNS = (
    *(c for c in STATS_COLUMNS if c not in ("case_id", "segmentation", "structure")),
    "annotated_slices",
)


def column_dtype(col: str) -> type:
    """numpy type of a numeric statistics column."""
    if col in INTEGER_COLUMNS:
        return np.int64
    if col == "touches_border":
        return np.bool_
    return np.float64


_PERCENTILES = (50.0, 5.0, 25.0, 75.0, 95.0)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's own linear interpolation (numpy/lib/_function_base_impl.py, _lerp)."""
    diff_b_a = b - a
    out: np.ndarray = np.add(a, diff_b_a * t)
    np.subtract(
        b, diff_b_a * (1 - t), out=out, where=t >= 0.5, casting="unsafe", dtype=type(out.dtype)
    )
    return out


def percentiles_from_histogram(
    values: np.ndarray, counts: np.ndarray, q: Sequence[float], dtype: np.dtype[Any]
) -> np.ndarray:
    """``numpy.percentile(np.repeat(values, counts).astype(dtype), q)`` without the repeat.

    Written by hand because numpy has no weighted percentile with the "linear" method; the
    index, gamma and interpolation steps copy numpy's (``_QuantileMethods["linear"]``,
    ``_get_indexes``, ``_get_gamma``, ``_lerp``) so results are bit-identical; a hypothesis
    test pins this against ``numpy.percentile``.
    """
    n = int(counts.sum())
    quantiles = np.true_divide(np.asarray(q, dtype=np.float64), 100)
    virtual = np.asanyarray((n - 1) * quantiles)  # numpy's "linear" get_virtual_index
    prev = np.floor(virtual)
    nxt = prev + 1
    above = virtual >= n - 1
    prev[above] = n - 1
    nxt[above] = n - 1
    below = virtual < 0
    prev[below] = 0
    nxt[below] = 0
    gamma = np.asanyarray(virtual - np.floor(virtual), dtype=virtual.dtype)
    cum = np.cumsum(counts)
    a = values[np.searchsorted(cum, prev.astype(np.int64), side="right")].astype(dtype)
    b = values[np.searchsorted(cum, nxt.astype(np.int64), side="right")].astype(dtype)
    return _lerp(a, b, gamma)


@dataclass(frozen=True)
class CaseGeometry:
    """What statistics need to know of a case besides its index."""

    case_id: str
    affine: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    value_dtype: np.dtype[Any]


#: ``format`` of the collection table's attributes
TABLE_FORMAT = "stats-table-1"


@dataclass(frozen=True)
class TableCaseMeta:
    """The geometry of one case as the collection table keeps it (``case_meta``), and the
    case's dataset attributes as text (a TotalSegmentator ``meta.csv`` or SAROS CSV row: age,
    gender, split, ...), which become columns of ``Collection.table()``."""

    affine: Affine
    spacing_zyx: tuple[float, float, float]
    shape_zyx: tuple[int, int, int]
    value_dtype: np.dtype[Any]
    segmentations: tuple[str, ...]
    attributes: Mapping[str, str] = field(default_factory=dict)

    def geometry(self, case_id: str) -> CaseGeometry:
        return CaseGeometry(
            case_id,
            np.asarray(self.affine, np.float64),
            self.spacing_zyx,
            self.shape_zyx,
            self.value_dtype,
        )

    def to_attributes(self) -> dict[str, Any]:
        return {
            "affine": [list(row) for row in self.affine],
            "spacing_zyx": list(self.spacing_zyx),
            "shape_zyx": list(self.shape_zyx),
            "value_dtype": self.value_dtype.str,
            "segmentations": list(self.segmentations),
        } | ({"attributes": dict(self.attributes)} if self.attributes else {})

    @classmethod
    def from_attributes(cls, d: Any, where: str = "", prefix: str = "") -> TableCaseMeta:
        if not isinstance(d, Mapping):
            raise MetadataError(where, prefix, f"expected a JSON object, got {d!r}")

        def get(key: str) -> Any:
            return require(d, key, prefix, where)

        return cls(
            affine=parse_affine(get("affine"), f"{prefix}.affine", where),
            spacing_zyx=parse_spacing(get("spacing_zyx"), f"{prefix}.spacing_zyx", where),
            shape_zyx=parse_shape(get("shape_zyx"), f"{prefix}.shape_zyx", where),
            value_dtype=parse_dtype(get("value_dtype"), f"{prefix}.value_dtype", where),
            segmentations=parse_str_list(get("segmentations"), f"{prefix}.segmentations", where),
            attributes=parse_text_mapping(d.get("attributes", {}), f"{prefix}.attributes", where),
        )


def parse_text_mapping(value: Any, key: str, where: str) -> dict[str, str]:
    """A JSON object of text values (the case attributes a table keeps), else MetadataError."""
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise MetadataError(where, key, f"expected a JSON object of strings, got {value!r}")
    return dict(value)


def attribute_text(value: Any) -> str:
    """A case attribute as the collection table keeps it: text ('' for null)."""
    return "" if value is None else str(value)


@dataclass(frozen=True)
class TableAttributes:
    """The ``ctzarr`` attributes of the collection table group (``<store>/index``).

    ``update`` is the token of the update that wrote the table: both column arrays carry it
    too (:func:`table_array_attributes`), so a reader tells an interrupted update apart.
    """

    update: str
    cases: tuple[str, ...]
    segmentations: tuple[str, ...]
    int_columns: tuple[str, ...]
    float_columns: tuple[str, ...]
    case_meta: Mapping[str, TableCaseMeta] = field(default_factory=dict)
    format: str = TABLE_FORMAT
    #: digests of the table's commit record and its chunk manifest (format 2)
    integrity: Integrity | None = None

    def to_attributes(self) -> dict[str, Any]:
        return {
            CTZARR_KEY: {
                "format": self.format,
                "update": self.update,
                "cases": list(self.cases),
                "segmentations": list(self.segmentations),
                "int_columns": list(self.int_columns),
                "float_columns": list(self.float_columns),
                "case_meta": {k: m.to_attributes() for k, m in self.case_meta.items()},
            }
            | ({} if self.integrity is None else {"integrity": self.integrity.to_dict()})
        }

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any], where: str = "") -> TableAttributes:
        """Parse the table group's attributes (check :func:`is_table` first)."""
        k = CTZARR_KEY
        d = parse_block(attributes, k, where)

        def get(key: str) -> Any:
            return require(d, key, k, where)

        fmt = get("format")
        if fmt != TABLE_FORMAT:
            raise MetadataError(where, f"{k}.format", f"expected {TABLE_FORMAT!r}, got {fmt!r}")
        meta = get("case_meta")
        if not isinstance(meta, Mapping):
            raise MetadataError(where, f"{k}.case_meta", f"expected a JSON object, got {meta!r}")
        return cls(
            update=parse_str(get("update"), f"{k}.update", where),
            cases=parse_str_list(get("cases"), f"{k}.cases", where),
            segmentations=parse_str_list(get("segmentations"), f"{k}.segmentations", where),
            int_columns=parse_str_list(get("int_columns"), f"{k}.int_columns", where),
            float_columns=parse_str_list(get("float_columns"), f"{k}.float_columns", where),
            case_meta={
                str(cid): TableCaseMeta.from_attributes(m, where, f"{k}.case_meta.{cid}")
                for cid, m in meta.items()
            },
            integrity=Integrity.parse(d.get("integrity"), where, f"{k}.integrity"),
        )


def is_table(attributes: Any) -> bool:
    """True when a group's attributes are those of a collection table this release reads."""
    if not isinstance(attributes, Mapping):
        return False
    block = attributes.get(CTZARR_KEY)
    return isinstance(block, Mapping) and block.get("format") == TABLE_FORMAT


def table_array_attributes(update: str) -> dict[str, Any]:
    """Attributes of a column array of the table: the token of the update that wrote it."""
    return {"update": update}


def table_array_update(attributes: Any) -> str | None:
    """The update token of a column array (None when absent)."""
    if not isinstance(attributes, Mapping):
        return None
    token = attributes.get("update")
    return token if isinstance(token, str) else None


def index_rows(
    geom: CaseGeometry,
    segmentation: str,
    label_map: LabelMap,
    idx: LabelIndex,
    labels: Iterable[int] | None = None,
    annotated: int | None = None,
) -> list[dict[str, Any]]:
    """Statistics rows of one case and segmentation from an index (present or requested labels)."""
    voxel_mm3 = float(np.prod(geom.spacing))
    res = idx.histogram_resolution
    wanted = idx.labels.tolist() if labels is None else list(labels)
    pos = {int(v): i for i, v in enumerate(idx.labels.tolist())}
    if annotated is None and idx.annotated_slices is not None:
        annotated = len(idx.annotated_slices)
    rows = []
    for label in wanted:
        i = pos.get(int(label))
        if i is None:
            row = absent_row(geom.case_id, segmentation, label_map, int(label))
        else:
            row = {
                "case_id": geom.case_id,
                "segmentation": segmentation,
                "label": int(label),
                "structure": structure_name(label_map, int(label)),
            }
            row.update(
                _label_stats(idx, i, res, geom.value_dtype, geom.affine, voxel_mm3, geom.shape)
            )
        if annotated is not None:
            row["annotated_slices"] = annotated
        rows.append(row)
    return rows


def structure_name(label_map: LabelMap, label: int) -> str:
    """The structure column of a label: its name in the map, else the id as text."""
    return label_map[label].name if label in label_map else str(label)


#: statistics of a requested structure that a case does not contain (the other value columns
#: are NaN)
ABSENT_VALUES: dict[str, Any] = {
    "voxel_count": 0,
    "volume_ml": 0.0,
    "z_start": -1,
    "z_stop": -1,
    "y_start": -1,
    "y_stop": -1,
    "x_start": -1,
    "x_stop": -1,
    "touches_border": False,
}


def absent_row(case_id: str, segmentation: str, label_map: LabelMap, label: int) -> dict[str, Any]:
    """The row of a requested structure that the case does not contain."""
    row: dict[str, Any] = {
        "case_id": case_id,
        "segmentation": segmentation,
        "label": int(label),
        "structure": structure_name(label_map, int(label)),
    }
    for c in STATS_COLUMNS:
        if c not in row:
            row[c] = ABSENT_VALUES.get(c, np.nan)
    return row


def _label_stats(
    idx: LabelIndex,
    i: int,
    res: float,
    dtype: np.dtype[Any],
    affine: np.ndarray,
    voxel_mm3: float,
    shape: tuple[int, int, int],
) -> dict[str, Any]:
    n = int(idx.voxel_count[i])
    sl = slice(int(idx.hist_offsets[i]), int(idx.hist_offsets[i + 1]))
    keys, counts = idx.hist_keys[sl], idx.hist_counts[sl]
    out: dict[str, Any] = {"voxel_count": n, "volume_ml": n * voxel_mm3 / 1000.0}
    m = int(counts.sum())  # == n unless non-finite voxels were set aside
    if m:
        if len(keys) and int(np.abs(keys).max()) <= 2**16 and m <= 2**30:  # int64 cannot overflow
            s1 = int(np.dot(keys, counts))
            s2 = int(np.dot(keys * keys, counts))
        else:  # exact with Python integers
            s1 = sum(int(k) * int(c) for k, c in zip(keys.tolist(), counts.tolist(), strict=True))
            s2 = sum(
                int(k) * int(k) * int(c)
                for k, c in zip(keys.tolist(), counts.tolist(), strict=True)
            )
        mean = (s1 / m) * res
        var = ((m * s2 - s1 * s1) / (m * m)) * res * res
        values = keys.astype(np.float64) * res if res != 1.0 else keys
        pct = percentiles_from_histogram(values, counts, _PERCENTILES, dtype)
        vmin = float(np.asarray(values[0]).astype(dtype))
        vmax = float(np.asarray(values[-1]).astype(dtype))
        out.update(
            hu_mean=float(mean),
            hu_std=math.sqrt(var),
            hu_min=vmin,
            hu_max=vmax,
            hu_median=float(pct[0]),
            hu_p05=float(pct[1]),
            hu_p25=float(pct[2]),
            hu_p75=float(pct[3]),
            hu_p95=float(pct[4]),
        )
    else:
        out.update(dict.fromkeys((c for c in STATS_COLUMNS if c.startswith("hu_")), np.nan))
    mean_zyx = idx.coord_sum[i].astype(np.float64) / n
    world = affine @ np.array([mean_zyx[2], mean_zyx[1], mean_zyx[0], 1.0])
    out.update(centroid_x=float(world[0]), centroid_y=float(world[1]), centroid_z=float(world[2]))
    b = idx.bbox[i].tolist()
    out.update(z_start=b[0], z_stop=b[1], y_start=b[2], y_stop=b[3], x_start=b[4], x_stop=b[5])
    out["touches_border"] = bool(
        b[0] == 0
        or b[2] == 0
        or b[4] == 0
        or b[1] == shape[0]
        or b[3] == shape[1]
        or b[5] == shape[2]
    )
    return out
