"""Where statistics are computed: per-structure tables from the index, or by one blockwise scan.

Both methods reduce to the same :class:`~ctzarr.label_index.LabelIndex` (the scan rebuilds it
from voxels, block by block, with the converter's own kernel and a tree reduction), and one
function turns an index into table rows, so ``method="index"`` and ``method="scan"`` agree
exactly.

Definitions (README "Statistics"):

- ``volume_ml`` = voxel count x voxel volume (mm^3) / 1000;
- ``hu_mean`` = (exact integer sum of values) / count; ``hu_std`` = population standard
  deviation from the exact integer moments (``sqrt((n*S2 - S1**2) / n**2)``);
- percentiles equal ``numpy.percentile(values, q)`` (linear) exactly: numpy's own index and
  interpolation arithmetic is applied to the two order statistics read off the histogram;
- float images with non-integral values use the index's histogram resolution (2**-8) for every
  value statistic, in both methods;
- centroid = affine applied to the mean voxel index (i, j, k), world millimetres (RAS+);
- bounding box half-open in stored (z, y, x) indices; ``touches_border`` when it reaches a face;
- ignore-valued voxels (SAROS 255) are never a structure and never counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from dask.base import compute
from dask.delayed import delayed

from ctzarr.errors import CaseNotFoundError, SegmentationNotFoundError, StructureNotFoundError
from ctzarr.io.urls import check_no_secrets
from ctzarr.model.case import NiftiBlock
from ctzarr.model.table import (
    ABSENT_VALUES,
    INTEGER_COLUMNS,
    STATS_COLUMNS,
    index_rows,
    structure_name,
)
from ctzarr.run.cluster import run_tasks
from ctzarr.write.index_builder import LabelIndexBuilder

if TYPE_CHECKING:
    from ctzarr.read.case import Case
    from ctzarr.read.collection import Collection


def _from_table(
    col: Collection, ids: list[str], targets: dict[str, list[int] | None]
) -> pd.DataFrame:
    """Cohort statistics straight from the collection table, vectorised (no per-row Python)."""
    table = col.table()
    # statistics columns only: the table's case attribute columns (age, split, ...) are not
    table = table[[c for c in table.columns if c in STATS_COLUMNS or c == "annotated_slices"]]
    table = table[table.case_id.isin(ids) & table.segmentation.isin(list(targets))]
    case_pos = {cid: i for i, cid in enumerate(ids)}
    seg_pos = {seg: i for i, seg in enumerate(targets)}
    if all(labels is None for labels in targets.values()):
        order = np.lexsort(
            (
                table.label.to_numpy(),
                table.segmentation.map(seg_pos).to_numpy(),
                table.case_id.map(case_pos).to_numpy(),
            )
        )
        return table.iloc[order].reset_index(drop=True)
    wanted = pd.MultiIndex.from_tuples(
        [
            (cid, seg, label)
            for cid in ids
            for seg, labels in targets.items()
            for label in (labels or [])
        ],
        names=["case_id", "segmentation", "label"],
    )
    out = table.set_index(["case_id", "segmentation", "label"]).reindex(wanted)
    absent = out.voxel_count.isna().to_numpy()
    if absent.any():
        names = [
            structure_name(col.segmentations[seg], int(label)) for _, seg, label in wanted[absent]
        ]
        out.loc[absent, "structure"] = names
        for column, value in ABSENT_VALUES.items():  # the same row as model.table.absent_row
            out.loc[absent, [column]] = value
    out = out.reset_index()
    for c in INTEGER_COLUMNS - {"annotated_slices"}:
        out[c] = out[c].astype(np.int64)
    out["touches_border"] = out["touches_border"].astype(bool)
    if "annotated_slices" in out:
        # a case without the structure still has its annotated-slice count
        counts = table.groupby(["case_id", "segmentation"]).annotated_slices.first()
        keys = list(zip(out.case_id, out.segmentation, strict=True))
        out["annotated_slices"] = [int(counts.get(k, -1)) for k in keys]
    return out[list(table.columns)]


# -- scan -------------------------------------------------------------------------------------
class _ImageSlab:
    """Reads one z-slab of a case's image (scaled) when a scan block needs its values."""

    def __init__(self, arr: Any, z0: int, z1: int, nifti: NiftiBlock) -> None:
        self.arr, self.z0, self.z1, self.nifti = arr, z0, z1, nifti

    def read(self) -> np.ndarray:
        return self.nifti.scale(np.asarray(self.arr[self.z0 : self.z1]))

    def read_box(self, box: tuple[slice, slice, slice], shape: tuple[int, ...]) -> np.ndarray:
        """The slab's values inside ``box`` (slab coordinates), zero elsewhere."""
        zs, ys, xs = box
        part = self.nifti.scale(
            np.asarray(self.arr[self.z0 + zs.start : self.z0 + zs.stop, ys, xs])
        )
        out = np.zeros(shape, part.dtype)
        out[box] = part
        return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """The smallest box holding every True voxel of a 3-d mask; None when there is none."""
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if not len(zs):
        return None
    plane = mask[zs[0] : zs[-1] + 1].any(axis=0)  # two passes over the slab, not three
    ys, xs = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    return (
        slice(int(zs[0]), int(zs[-1]) + 1),
        slice(int(ys[0]), int(ys[-1]) + 1),
        slice(int(xs[0]), int(xs[-1]) + 1),
    )


def _within_partial(
    z0: int, z1: int, labels_arr: Any, other_arr: Any, image: _ImageSlab, config: dict[str, Any]
) -> LabelIndexBuilder:
    """Index accumulators of one slab of a ``within`` scan, reading as little as it can.

    The other map's slab is read first; the structure's own labels only inside the box where
    the other map holds the ``within`` value (the whole slab for sparse maps, whose ignored
    voxels count everywhere), and the image only inside the box of the selected voxels (for
    integer images: a float image is read whole, as the converter binned it). Voxels outside
    are filled exactly as :func:`mask_labels` fills them, so the index is the one the masked
    labels give.
    """
    dtype = np.dtype(config["label_dtype"])
    b = LabelIndexBuilder(
        config["values"],
        config["shape"],
        config["chunk"],
        background=config["background"],
        ignore_value=config["ignore"],
        label_dtype=dtype,
    )
    other = np.asarray(other_arr[z0:z1])
    if config["ignore"] is not None:
        labels = mask_labels(np.asarray(labels_arr[z0:z1]), other, config)
    else:
        labels = np.full(other.shape, config["fill"], dtype)
        box = _bounding_box(other == config["within"])
        if box is None:
            return b
        zs, ys, xs = box
        region = np.asarray(labels_arr[z0 + zs.start : z0 + zs.stop, ys, xs])
        labels[box] = mask_labels(region, other[box], config)
    indexed = labels != config["fill"]
    if config["ignore"] is not None:
        indexed &= labels != config["ignore"]
    selected = _bounding_box(indexed)
    if selected is None:
        values = None
    elif config["integer_image"]:
        values = image.read_box(selected, labels.shape)
    else:
        values = image.read()
    b.update(z0, labels, values)
    return b


def _partial(
    z0: int,
    labels: np.ndarray,
    other: np.ndarray | None,
    image: _ImageSlab,
    config: dict[str, Any],
) -> LabelIndexBuilder:
    """Index accumulators of one block (a whole-plane slab starting at z0).

    With ``config["keep"]`` (label values) or ``other`` (the same block of another label map,
    with ``config["within"]`` the value to lie inside), the block's labels are first masked:
    voxels outside the selection become background, ignore-valued voxels stay (so annotated
    slices count as in the unmasked scan). The image slab is read only when the block holds an
    indexed label: all-background blocks cost no image read (and their label shards are not
    even stored).
    """
    if config["keep"] is not None or other is not None:
        labels = mask_labels(labels, other, config)
    b = LabelIndexBuilder(
        config["values"],
        config["shape"],
        config["chunk"],
        background=config["background"],
        ignore_value=config["ignore"],
        label_dtype=labels.dtype,
    )
    indexed = (
        labels != config["background"]
        if config["background"] is not None
        else np.ones(labels.shape, bool)
    )
    if config["ignore"] is not None:
        indexed &= labels != config["ignore"]
    b.update(z0, labels, image.read() if indexed.any() else None)
    return b


def mask_labels(labels: np.ndarray, other: np.ndarray | None, config: dict[str, Any]) -> np.ndarray:
    """The labels of the selected voxels; every other voxel becomes ``config["fill"]``.

    Selected: a label in ``config["keep"]`` (when given) that lies where ``other`` equals
    ``config["within"]`` (when given). Ignore-valued voxels are kept as they are.
    """
    selected = (
        np.isin(labels, config["keep"])
        if config["keep"] is not None
        else np.ones(labels.shape, bool)
    )
    if other is not None:
        selected &= other == config["within"]
    if config["ignore"] is not None:
        selected |= labels == config["ignore"]
    return np.where(selected, labels, np.asarray(config["fill"], labels.dtype))


def _merge(*parts: LabelIndexBuilder) -> LabelIndexBuilder:
    """Combine block accumulators (a tree-reduction step)."""
    first = parts[0]
    for other in parts[1:]:
        first.merge(other)
    return first


def scan_index_graph(
    case: Case,
    segmentation: str,
    *,
    keep: Sequence[int] | None = None,
    within: tuple[str, int] | None = None,
) -> Any:
    """A dask graph (delayed) that rebuilds a segmentation's index from voxels, blockwise.

    ``keep`` restricts the index to some label values; ``within=(other_segmentation, value)``
    to the voxels where the other segmentation holds that value. Either way it stays one
    blockwise pass (the two label maps and the image read once), the selection applied to each
    block before the converter's kernel.
    """
    lm = case.collection.segmentations[segmentation]
    stored = case.index(segmentation)
    labels = case.labels(segmentation).data
    image_array = case.array("0")
    nifti = case.meta.nifti
    config = {
        "values": lm.values,
        "shape": case.shape,
        "chunk": stored.chunk_shape,
        "background": lm.background,
        "ignore": lm.ignore_value,
        "keep": None if keep is None else np.asarray(sorted(keep), np.int64),
        "within": None if within is None else within[1],
        "fill": _fill_value(lm.background, lm.ignore_value, lm.values, labels.dtype),
        "label_dtype": labels.dtype.str,
        "integer_image": nifti.value_dtype.kind in "iu",
    }
    starts = np.r_[0, np.cumsum(labels.chunks[0])[:-1]].tolist()
    lab_blocks = labels.to_delayed()
    parts = []
    partial = delayed(_partial, pure=True)
    within_partial = delayed(_within_partial, pure=True)
    if within is not None:
        labels_array = case.array(f"labels/{segmentation}/0")
        other_array = case.array(f"labels/{within[0]}/0")
    for zi, z0 in enumerate(starts):
        assert lab_blocks.shape[1:] == (1, 1), "scan blocks must be whole planes"
        z1 = z0 + labels.chunks[0][zi]
        slab = _ImageSlab(image_array, z0, z1, nifti)
        if within is None:
            parts.append(partial(z0, lab_blocks[zi, 0, 0], None, slab, config))
        else:  # the task reads its own slabs (see _within_partial)
            parts.append(within_partial(z0, z1, labels_array, other_array, slab, config))
    merge = delayed(_merge, pure=True)
    while len(parts) > 1:  # tree reduction, fan-in 4
        parts = [
            merge(*parts[i : i + 4]) if len(parts[i : i + 4]) > 1 else parts[i]
            for i in range(0, len(parts), 4)
        ]
    sparse = lm.ignore_value is not None
    return delayed(lambda b: b.finish(sparse_annotation=sparse), pure=True)(parts[0])


def _fill_value(
    background: int | None, ignore: int | None, values: Sequence[int], dtype: np.dtype[Any]
) -> int:
    """What masked-out voxels become: the background, else a value the map does not use."""
    if background is not None:
        return background
    used = set(values) | ({ignore} if ignore is not None else set())
    top = int(np.iinfo(dtype).max)
    for v in range(top, -1, -1):  # from the top: label maps fill their ids from 0 up
        if v not in used:
            return v
    raise ValueError("the label map uses every value of its data type: nothing to mask with")


# -- public entry points ----------------------------------------------------------------------
def resolve_targets(
    col: Collection,
    case: Case | None,
    structures: Sequence[str | int] | None,
    segmentation: str | None,
    exclude: str | None = None,
) -> dict[str, list[int] | None]:
    """Segmentation -> label ids to report (None: every label present).

    ``exclude`` drops a segmentation from the default (every segmentation of the case or
    collection), e.g. the one a ``within`` structure comes from.
    """

    segs = (
        [segmentation]
        if segmentation
        else [
            s
            for s in (case.segmentation_names if case else list(col.segmentations))
            if s != exclude
        ]
    )
    for s in segs:
        if s not in col.segmentations:
            raise SegmentationNotFoundError(
                f"no segmentation {s!r} in {col.url}; it has {list(col.segmentations)}"
            )
    if not structures:
        return dict.fromkeys(segs)
    targets: dict[str, list[int] | None] = {s: [] for s in segs}
    for st in structures:
        found = False
        errors = []
        for s in segs:
            try:
                lab = col.segmentations[s].resolve(st)
            except StructureNotFoundError as exc:
                errors.append(str(exc))
                continue
            targets[s].append(lab.value)  # type: ignore[union-attr]
            found = True
        if not found:
            raise StructureNotFoundError("; ".join(errors))
    return {s: v for s, v in targets.items() if v}


def case_stats(
    case: Case,
    structures: Sequence[str | int] | None = None,
    segmentation: str | None = None,
    method: str = "index",
    client: Any = None,
) -> pd.DataFrame:
    """Statistics of one case (see :meth:`ctzarr.Case.stats`)."""
    return _stats(
        case.collection, [case.case_id], structures, segmentation, method, client, cases=[case]
    )


def collection_stats(
    col: Collection,
    structures: Sequence[str | int] | None = None,
    cases: Sequence[str] | None = None,
    segmentation: str | None = None,
    method: str = "index",
    client: Any = None,
) -> pd.DataFrame:
    """Statistics of a cohort (see :meth:`ctzarr.Collection.stats`)."""
    ids = list(cases) if cases is not None else col.case_ids
    missing = sorted(set(ids) - set(col.case_ids))
    if missing:
        raise CaseNotFoundError(f"no such cases in {col.url}: {missing[:10]}")
    return _stats(col, ids, structures, segmentation, method, client)


def _stats(
    col: Collection,
    ids: list[str],
    structures: Sequence[str | int] | None,
    segmentation: str | None,
    method: str,
    client: Any,
    cases: list[Case] | None = None,
) -> pd.DataFrame:
    if method not in ("index", "scan"):
        raise ValueError(f"method must be 'index' or 'scan', not {method!r}")
    targets = resolve_targets(col, cases[0] if cases else None, structures, segmentation)
    rows: list[dict[str, Any]] = []
    if method == "index":
        if cases is None:
            # the collection table answers a cohort with one small read, whatever its size
            return _from_table(col, ids, targets)
        for case in cases:
            geom = case.meta.geometry()
            for seg, labels in targets.items():
                if seg in case.segmentation_names:
                    rows += index_rows(geom, seg, col.segmentations[seg], case.index(seg), labels)
    elif client is not None:
        # one task per case and segmentation; workers open the store from its URL. The tasks
        # are submitted before any case is opened here: the client opens each case (for its
        # geometry) and builds its rows while the other tasks still run (opening 8 cases
        # first cost ~0.1-0.25 s of a 0.7 s scan on 2 workers, benchmarks/CLOUD.md)
        opened = {case.case_id: case for case in cases or ()}
        jobs = [(cid, seg) for cid in ids for seg in targets]
        options = check_no_secrets(col.storage_options)
        tasks = [
            (f"scan of case {cid!r} ({seg})", (col.url, options, cid, seg)) for cid, seg in jobs
        ]
        per_job: list[list[dict[str, Any]]] = [[] for _ in jobs]
        for i, idx in run_tasks(client, col.scan_task, tasks):
            if idx is None:  # this case has no such segmentation
                continue
            cid, seg = jobs[i]
            if cid not in opened:
                opened[cid] = col[cid]
            case = opened[cid]
            per_job[i] = index_rows(
                case.meta.geometry(), seg, col.segmentations[seg], idx, targets[seg]
            )
        rows = [row for job_rows in per_job for row in job_rows]
    else:
        case_objs = cases or [col[cid] for cid in ids]
        pairs = [
            (case, seg, labels)
            for case in case_objs
            for seg, labels in targets.items()
            if seg in case.segmentation_names
        ]
        results = compute(
            *[scan_index_graph(case, seg) for case, seg, _ in pairs], scheduler="threads"
        )
        for (case, seg, labels), idx in zip(pairs, results, strict=True):
            rows += index_rows(case.meta.geometry(), seg, col.segmentations[seg], idx, labels)
    columns = STATS_COLUMNS + (
        ["annotated_slices"] if any("annotated_slices" in r for r in rows) else []
    )
    return pd.DataFrame(rows, columns=columns)
