"""The per-label index: one streaming pass over labels and values computes, for every label,
its voxel count, bounding box, coordinate sums (centroid), exact value histogram, its voxel
count in every chunk it occupies and, per axial slice, its voxel count and value-key sum
(store format 3).

The kernel is hand-written (numba) because no library fuses these reductions: numpy and
dask-image need one pass over the volume per statistic or per label (``labels == i``), and a
``numpy.bincount`` over ``label * 65536 + value`` keys alone costs 2.7x a nibabel load of the
case, measured on a full-size whole-body CT). The kernel walks each row of x as runs of equal
label, so count, coordinate sums, bounding box and chunk counts cost one update per run; only
the histogram and the key sum are touched per voxel. It releases the GIL so conversion overlaps
it with compression.

The kernels are compiled by numba once and then loaded without it (:mod:`ctzarr.write.kernels`:
~0.05 s per process instead of numba's ~0.47 s); reading the index (``ctzarr.read.stats``) and
workers that never build one load nothing.
Per-slice rows are kept per slab, only for the labels the slab holds, so memory stays flat in
the number of slices.

The joint index of two segmentations (:class:`JointIndexBuilder`) is the same kernel run on pair
codes ``a * radix + b``, formed per slab by a second small kernel.

Histograms are exact: integer-valued images are binned per integer value; float images whose
values are not all integral are binned at :data:`FLOAT_HISTOGRAM_RESOLUTION` (value ``key *
resolution``), and the scan statistics use the same binning so both methods agree exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ctzarr.model.index import FLOAT_HISTOGRAM_RESOLUTION, JointInfo, LabelIndex
from ctzarr.write import kernels

#: a slab histogram is dense while labels x value range stays under this many bins
_DENSE_BINS_MAX = 1 << 24


_SKIP = -2  # background and ignore value: never indexed


_UINT8 = np.dtype(np.uint8)


_UNKNOWN = -1  # a value the label map does not define


def _scan_runs(
    lab: NDArray[np.integer[Any]],
    keys: NDArray[np.integer[Any]],
    kmin: int,
    lut: NDArray[np.int32],
    z0: int,
    cz: int,
    cy: int,
    cx: int,
    hist: NDArray[np.signedinteger[Any]],
    cnt: NDArray[np.int64],
    sums: NDArray[np.int64],
    bmin: NDArray[np.int64],
    bmax: NDArray[np.int64],
    chunks: NDArray[np.int64],
    slice_cnt: NDArray[np.int64],
    slice_sum: NDArray[np.int64],
    unknown: NDArray[np.int64],
    ignored_per_z: NDArray[np.int64],
    ignore_value: int,
    use_hist: bool,
    use_keys: bool,
) -> None:  # pragma: no cover - compiled (see ctzarr.write.kernels)
    """One slab: every accumulator of the index, in one pass (runs of equal label along x).

    ``slice_cnt``/``slice_sum`` are the slab's own (labels x depth) per-slice rows.
    """
    nz, ny, nx = lab.shape
    for z in range(nz):
        zz = z + z0
        for y in range(ny):
            x0 = 0
            while x0 < nx:
                lv = lab[z, y, x0]
                x1 = x0 + 1
                while x1 < nx and lab[z, y, x1] == lv:
                    x1 += 1
                n = x1 - x0
                li = lut[lv] if lv < lut.shape[0] else _UNKNOWN
                if li >= 0:
                    ksum = np.int64(0)
                    if use_hist:
                        for x in range(x0, x1):
                            k = np.int64(keys[z, y, x])
                            hist[li, k - kmin] += 1
                            ksum += k
                    elif use_keys:
                        for x in range(x0, x1):
                            ksum += np.int64(keys[z, y, x])
                    slice_cnt[li, z] += n
                    slice_sum[li, z] += ksum
                    cnt[li] += n
                    sums[li, 0] += zz * n
                    sums[li, 1] += y * n
                    sums[li, 2] += (x0 + x1 - 1) * n // 2
                    if zz < bmin[li, 0]:
                        bmin[li, 0] = zz
                    if zz > bmax[li, 0]:
                        bmax[li, 0] = zz
                    if y < bmin[li, 1]:
                        bmin[li, 1] = y
                    if y > bmax[li, 1]:
                        bmax[li, 1] = y
                    if x0 < bmin[li, 2]:
                        bmin[li, 2] = x0
                    if x1 - 1 > bmax[li, 2]:
                        bmax[li, 2] = x1 - 1
                    c = x0 // cx
                    while c * cx < x1:
                        chunks[li, zz // cz, y // cy, c] += min(x1, (c + 1) * cx) - max(x0, c * cx)
                        c += 1
                elif li == _UNKNOWN:
                    unknown[lv if lv < unknown.shape[0] else unknown.shape[0] - 1] += n
                if lv == ignore_value:
                    ignored_per_z[zz] += n
                x0 = x1


def _pair_codes(
    a: NDArray[np.integer[Any]],
    b: NDArray[np.integer[Any]],
    ok_a: NDArray[np.bool_],
    ok_b: NDArray[np.bool_],
    radix: int,
    fill: int,
    out: NDArray[np.integer[Any]],
) -> None:  # pragma: no cover - compiled (see ctzarr.write.kernels)
    """``out = a * radix + b`` where both are labels (``ok_*`` lookup tables), else ``fill``."""
    nz, ny, nx = a.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                va = a[z, y, x]
                vb = b[z, y, x]
                if va < ok_a.shape[0] and vb < ok_b.shape[0] and ok_a[va] and ok_b[vb]:
                    out[z, y, x] = va * radix + vb
                else:
                    out[z, y, x] = fill


class LabelIndexBuilder:
    """Accumulates the index of one segmentation slab by slab.

    Parameters
    ----------
    label_values : sequence of int
        Values the label map defines (background excluded or not; it is skipped).
    shape_zyx : tuple of int
        Shape of the whole volume.
    chunk_zyx : tuple of int
        Stored chunk shape, for the per-chunk voxel counts.
    background : int or None
        Never indexed.
    ignore_value : int or None
        Never indexed; slices free of it are "annotated".
    """

    def __init__(
        self,
        label_values: Any,
        shape_zyx: tuple[int, int, int],
        chunk_zyx: tuple[int, int, int],
        *,
        background: int | None = 0,
        ignore_value: int | None = None,
        label_dtype: np.dtype[Any] = _UINT8,
    ) -> None:
        values = sorted(int(v) for v in label_values if v != background and v != ignore_value)
        self.values = np.array(values, dtype=np.int64)
        lut_size = (
            int(np.iinfo(label_dtype).max) + 1
            if label_dtype.itemsize <= 2
            else max([*values, ignore_value or 0, background or 0]) + 1
        )
        self._lut = np.full(lut_size, _UNKNOWN, dtype=np.int32)
        for i, v in enumerate(values):
            self._lut[v] = i
        for skipped in (background, ignore_value):
            if skipped is not None and skipped < lut_size:
                self._lut[skipped] = _SKIP
        self.ignore_value = -1 if ignore_value is None else int(ignore_value)
        self.shape = shape_zyx
        self.chunk_shape = chunk_zyx
        n = len(values)
        (sz, sy, sx), (cz, cy, cx) = shape_zyx, chunk_zyx
        self.grid = (-(-sz // cz), -(-sy // cy), -(-sx // cx))
        self._cnt = np.zeros(n, np.int64)
        self._sums = np.zeros((n, 3), np.int64)
        self._bmin = np.full((n, 3), np.iinfo(np.int64).max, np.int64)
        self._bmax = np.full((n, 3), -1, np.int64)
        self._chunks = np.zeros((n, *self.grid), np.int64)
        self._unknown = np.zeros(lut_size + 1, np.int64)
        self._ignored_per_z = np.zeros(shape_zyx[0], np.int64)
        self._nonfinite = np.zeros(n, np.int64)
        self._triplets: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        # per slab: (z0, label indices present, their per-slice counts and key sums (k, depth))
        self._slices: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
        self._float_keys = False  # switched on by the first non-integral float value

    # -- accumulation -----------------------------------------------------------------------
    def update(self, z0: int, labels: np.ndarray, values: np.ndarray | None) -> None:
        """Add a slab: ``labels`` and ``values`` of shape (depth, ny, nx) starting at z0.

        ``values`` may be None for a slab that holds no indexed label (background and ignore
        only): counts of ignored voxels are still taken, no value is read.
        """
        labels = np.ascontiguousarray(labels)
        keys, kmin, kmax, finite = (
            self._keys(labels, values) if values is not None else (None, 0, 0, None)
        )
        n = len(self.values)
        bins = (kmax - kmin + 1) if keys is not None else 0
        dense = keys is not None and finite is None and n * bins <= _DENSE_BINS_MAX
        hist = np.zeros((n, bins if dense else 1), np.int32 if labels.size < 2**31 else np.int64)
        depth = labels.shape[0]
        slice_cnt = np.zeros((n, depth), np.int64)
        slice_sum = np.zeros((n, depth), np.int64)
        cz, cy, cx = self.chunk_shape
        kernels.call(
            _scan_runs,
            labels,
            keys if keys is not None else labels,
            kmin if dense else 0,
            self._lut,
            z0,
            cz,
            cy,
            cx,
            hist,
            self._cnt,
            self._sums,
            self._bmin,
            self._bmax,
            self._chunks,
            slice_cnt,
            slice_sum,
            self._unknown,
            self._ignored_per_z,
            self.ignore_value,
            dense,
            keys is not None,
        )
        held = np.flatnonzero(slice_cnt.any(axis=1))
        if len(held):
            self._slices.append((z0, held, slice_cnt[held], slice_sum[held]))
        if dense:
            li, k = np.nonzero(hist)
            self._triplets.append(
                (li.astype(np.int64), k.astype(np.int64) + kmin, hist[li, k].astype(np.int64))
            )
        elif keys is not None:
            self._sparse_histogram(labels, keys, finite)
        if len(self._triplets) >= 8:  # keep memory flat however many slices the volume has
            self._triplets = [self._combined_triplets()]

    def _keys(
        self, labels: np.ndarray, values: np.ndarray
    ) -> tuple[np.ndarray, int, int, np.ndarray | None]:
        """Histogram keys of a slab (integers), their range, and the finite mask when some
        values are not finite (their keys are 0: they count, add nothing to key sums and are
        left out of the histogram)."""
        if values.dtype.kind in "iu":
            if values.size == 0:
                return values, 0, 0, None
            return np.ascontiguousarray(values), int(values.min()), int(values.max()), None
        finite = np.isfinite(values)
        all_finite = bool(finite.all())
        if not all_finite:
            li = self._lut[labels[~finite].astype(np.int64)]
            np.add.at(self._nonfinite, li[li >= 0], 1)
            values = np.where(finite, values, 0)
        if not self._float_keys and not np.array_equal(values, np.floor(values)):
            self._switch_to_float_keys()
        scale = 1.0 / FLOAT_HISTOGRAM_RESOLUTION if self._float_keys else 1.0
        keys = np.rint(values.astype(np.float64) * scale).astype(np.int64)
        if keys.size == 0:
            return keys, 0, 0, None
        return keys, int(keys.min()), int(keys.max()), None if all_finite else finite

    def _switch_to_float_keys(self) -> None:
        """Re-express integer keys seen so far at the float resolution (exact: power of two)."""
        self._float_keys = True
        factor = round(1.0 / FLOAT_HISTOGRAM_RESOLUTION)
        self._triplets = [(li, k * factor, c) for li, k, c in self._triplets]
        self._slices = [(z0, li, c, s * factor) for z0, li, c, s in self._slices]

    def _sparse_histogram(
        self, labels: np.ndarray, keys: np.ndarray, finite: np.ndarray | None
    ) -> None:
        """Histogram for slabs whose value range is too wide for a dense table, or with
        non-finite values (left out)."""
        li = self._lut[labels.ravel().astype(np.int64)]
        k = keys.ravel()
        keep = li >= 0
        if finite is not None:
            keep &= finite.ravel()
        pairs = np.stack([li[keep].astype(np.int64), k[keep]])
        uniq, counts = np.unique(pairs, axis=1, return_counts=True)
        self._triplets.append((uniq[0], uniq[1], counts.astype(np.int64)))

    def merge(self, other: LabelIndexBuilder) -> None:
        """Fold another builder of the same volume and label map into this one (scan reduction)."""
        if other._float_keys and not self._float_keys:
            self._switch_to_float_keys()
        if self._float_keys and not other._float_keys:
            other._switch_to_float_keys()
        self._cnt += other._cnt
        self._sums += other._sums
        np.minimum(self._bmin, other._bmin, out=self._bmin)
        np.maximum(self._bmax, other._bmax, out=self._bmax)
        self._chunks += other._chunks
        self._unknown += other._unknown
        self._ignored_per_z += other._ignored_per_z
        self._nonfinite += other._nonfinite
        self._triplets.extend(other._triplets)
        self._slices.extend(other._slices)

    # -- results ----------------------------------------------------------------------------
    def _combined_triplets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """All (label index, key, count) entries so far, summed per (label, key), sorted."""
        if not any(len(t[0]) for t in self._triplets):
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        li = np.concatenate([t[0] for t in self._triplets])
        k = np.concatenate([t[1] for t in self._triplets])
        c = np.concatenate([t[2] for t in self._triplets])
        order = np.lexsort((k, li))
        li, k, c = li[order], k[order], c[order]
        starts = np.r_[0, np.nonzero((np.diff(li) != 0) | (np.diff(k) != 0))[0] + 1]
        return li[starts], k[starts], np.add.reduceat(c, starts)

    def unknown_values(self) -> list[int]:
        """Label values seen in the data that the label map does not define."""
        return [int(v) for v in np.nonzero(self._unknown)[0]]

    def finish(self, *, sparse_annotation: bool) -> LabelIndex:
        """Assemble the index of the labels present."""
        present = np.nonzero(self._cnt)[0]
        li, k, c = self._combined_triplets()
        # every present label owns a (possibly empty: all non-finite) run of the histogram
        # np.r_ is typed as returning Any, which would select searchsorted's scalar overload
        stops: NDArray[np.intp] = np.r_[present, len(self.values)]
        offsets = np.searchsorted(li, stops).astype(np.int64)
        offsets[-1] = len(li)
        bbox = np.empty((len(present), 6), np.int64)
        bbox[:, 0::2] = self._bmin[present]
        bbox[:, 1::2] = self._bmax[present] + 1
        flat = self._chunks.reshape(len(self.values), -1)
        chunk_ids = tuple(np.flatnonzero(flat[i]).astype(np.int64) for i in present)
        chunk_counts = tuple(flat[i][ids] for i, ids in zip(present, chunk_ids, strict=True))
        slice_counts, slice_sums = self._slice_rows(present, bbox)
        annotated = None
        if sparse_annotation:
            annotated = np.nonzero(self._ignored_per_z == 0)[0].astype(np.int64)
        return LabelIndex(
            labels=self.values[present],
            voxel_count=self._cnt[present],
            bbox=bbox,
            coord_sum=self._sums[present],
            chunk_ids=chunk_ids,
            hist_offsets=offsets,
            hist_keys=k,
            hist_counts=c,
            histogram_resolution=FLOAT_HISTOGRAM_RESOLUTION if self._float_keys else 1.0,
            annotated_slices=annotated,
            chunk_grid=self.grid,
            chunk_shape=self.chunk_shape,
            nonfinite_count=self._nonfinite[present],
            chunk_counts=chunk_counts,
            slice_counts=slice_counts,
            slice_sums=slice_sums,
        )

    def _slice_rows(self, present: np.ndarray, bbox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The label-major per-slice rows over each present label's z extent."""
        extent = bbox[:, 1] - bbox[:, 0]
        offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(extent)])
        counts = np.zeros(int(offsets[-1]), np.int64)
        sums = np.zeros(int(offsets[-1]), np.int64)
        position = np.full(len(self.values), -1, np.int64)
        position[present] = np.arange(len(present))
        for z0, li, cnt, ksum in self._slices:
            p = position[li]  # a label with rows in a slab has voxels: present
            rows = (offsets[p] - bbox[p, 0] + z0)[:, None] + np.arange(cnt.shape[1])
            held = cnt > 0  # inside the bounding box by construction
            # one slab holds each (label, z) once; slabs of merged builders are disjoint too,
            # and the sequential += adds them up anyway
            counts[rows[held]] += cnt[held]
            sums[rows[held]] += ksum[held]
        return counts, sums


class JointIndexBuilder:
    """Accumulates the joint index of two segmentations A < B of one case, slab by slab.

    A :class:`LabelIndexBuilder` over pair codes ``a * radix + b`` (``radix`` = B's largest
    label + 1) for voxels where a is a label of A and b a label of B (background and ignore
    values of either never count); its per-label statistics are those of "structure a of A
    within structure b of B".
    """

    def __init__(
        self,
        segmentation: str,
        other: str,
        a_values: Sequence[int],
        b_values: Sequence[int],
        shape_zyx: tuple[int, int, int],
        chunk_zyx: tuple[int, int, int],
    ) -> None:
        a = sorted({int(v) for v in a_values})
        b = sorted({int(v) for v in b_values})
        radix = (max(b) if b else 0) + 1
        self.info = JointInfo(segmentation, other, radix)
        codes = [va * radix + vb for va in a for vb in b]
        top = max(codes, default=0)
        # the code of voxels outside any pair: 0 unless 0 is a pair code (a background other
        # than 0), then one past the largest
        self._fill = 0 if 0 not in codes else top + 1
        self._dtype = np.dtype(np.uint16 if max(top, self._fill) < 2**16 else np.uint32)
        self._ok_a = _lookup(a)
        self._ok_b = _lookup(b)
        self.builder = LabelIndexBuilder(
            codes,
            shape_zyx,
            chunk_zyx,
            background=self._fill,
            ignore_value=None,
            label_dtype=self._dtype,
        )
        self._buffer: np.ndarray | None = None  # the code slab, reused (one slab at a time)

    def update(
        self, z0: int, a_labels: np.ndarray, b_labels: np.ndarray, values: np.ndarray | None
    ) -> None:
        """Add a slab of both label maps (same shape) and the image values."""
        if a_labels.shape != b_labels.shape:
            raise ValueError(f"label slabs differ in shape: {a_labels.shape}, {b_labels.shape}")
        if self._buffer is None or self._buffer.shape != a_labels.shape:
            self._buffer = np.empty(a_labels.shape, self._dtype)
        kernels.call(
            _pair_codes,
            np.ascontiguousarray(a_labels),
            np.ascontiguousarray(b_labels),
            self._ok_a,
            self._ok_b,
            self.info.radix,
            self._fill,
            self._buffer,
        )
        self.builder.update(z0, self._buffer, values)

    def finish(self) -> LabelIndex:
        """The joint index of the pairs present."""
        self._buffer = None
        return self.builder.finish(sparse_annotation=False)


def _lookup(values: Sequence[int]) -> NDArray[np.bool_]:
    """A boolean table: ``table[v]`` is True for the given values."""
    table = np.zeros(max(values, default=0) + 1, np.bool_)
    table[list(values)] = True
    return table
