"""The statistics table: its columns, and how an index becomes rows.

One function (:func:`index_rows`) turns a :class:`~ctzarr.model.index.LabelIndex` into
statistics rows; the collection table written at conversion, ``Case.stats`` and the voxel scan
all go through it, so the three agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctzarr.model.index import LabelIndex
from ctzarr.model.labels import LabelMap

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


#: numeric columns stored as arrays (case_id, segmentation and structure are stored as codes)
TABLE_NUMERIC_COLUMNS = (
    *(c for c in STATS_COLUMNS if c not in ("case_id", "segmentation", "structure")),
    "annotated_slices",
)


_INT_COLUMNS = INTEGER_COLUMNS


def _dtype(col: str) -> type:
    if col in _INT_COLUMNS:
        return np.int64
    if col == "touches_border":
        return np.bool_
    return np.float64


_PERCENTILES = (50.0, 5.0, 25.0, 75.0, 95.0)


def _lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's own linear interpolation (numpy/lib/_function_base_impl.py, _lerp)."""
    diff_b_a = b - a
    out = np.add(a, diff_b_a * t)
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


    @classmethod
    def from_dict(cls, case_id: str, d: dict[str, Any]) -> CaseGeometry:
        return cls(
            case_id,
            np.asarray(d["affine"], np.float64),
            tuple(d["spacing_zyx"]),  # type: ignore[arg-type]
            tuple(d["shape_zyx"]),
            np.dtype(d["value_dtype"]),
        )  # type: ignore[arg-type]


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
        row: dict[str, Any] = {
            "case_id": geom.case_id,
            "segmentation": segmentation,
            "label": int(label),
            "structure": label_map[int(label)].name if int(label) in label_map else str(label),
        }
        i = pos.get(int(label))
        if i is None:
            row = _absent_row(geom.case_id, segmentation, label_map, int(label))
        else:
            row.update(
                _label_stats(idx, i, res, geom.value_dtype, geom.affine, voxel_mm3, geom.shape)
            )
        if annotated is not None:
            row["annotated_slices"] = annotated
        rows.append(row)
    return rows


def _absent_row(case_id: str, segmentation: str, label_map: LabelMap, label: int) -> dict[str, Any]:
    """The row of a requested structure that the case does not contain."""
    row: dict[str, Any] = {
        "case_id": case_id,
        "segmentation": segmentation,
        "label": int(label),
        "structure": label_map[int(label)].name if int(label) in label_map else str(label),
        "voxel_count": 0,
        "volume_ml": 0.0,
        "touches_border": False,
    }
    row.update({c: np.nan for c in STATS_COLUMNS if c not in row})
    for c in ("z_start", "z_stop", "y_start", "y_stop", "x_start", "x_stop"):
        row[c] = -1
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
