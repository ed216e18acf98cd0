"""The per-label index: one streaming pass over labels and values computes, for every label,
its voxel count, bounding box, coordinate sums (centroid), exact value histogram and the
chunks it occupies.

The kernel is hand-written (numba) because no library fuses these reductions: numpy and
dask-image need one pass over the volume per statistic or per label (``labels == i``), and a
``numpy.bincount`` over ``label * 65536 + value`` keys alone costs 2.7x a nibabel load of the
case, measured on a full-size whole-body CT). The kernel walks each row of x as runs of equal
label, so count, coordinate sums, bounding box and chunk map cost one update per run; only the
histogram is touched per voxel. It releases the GIL so conversion overlaps it with compression.

Histograms are exact: integer-valued images are binned per integer value; float images whose
values are not all integral are binned at :data:`FLOAT_HISTOGRAM_RESOLUTION` (value ``key *
resolution``), and the scan statistics use the same binning so both methods agree exactly.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

from ctzarr.model.index import FLOAT_HISTOGRAM_RESOLUTION, LabelIndex

#: a slab histogram is dense while labels x value range stays under this many bins
_DENSE_BINS_MAX = 1 << 24


_SKIP = -2  # background and ignore value: never indexed


_UINT8 = np.dtype(np.uint8)


_UNKNOWN = -1  # a value the label map does not define


@numba.njit(nogil=True, cache=True)
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
    chunks: NDArray[np.bool_],
    unknown: NDArray[np.int64],
    ignored_per_z: NDArray[np.int64],
    ignore_value: int,
    use_hist: bool,
) -> None:  # pragma: no cover - compiled
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
                    if use_hist:
                        for x in range(x0, x1):
                            hist[li, keys[z, y, x] - kmin] += 1
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
                    for c in range(x0 // cx, (x1 - 1) // cx + 1):
                        chunks[li, zz // cz, y // cy, c] = True
                elif li == _UNKNOWN:
                    unknown[lv if lv < unknown.shape[0] else unknown.shape[0] - 1] += n
                if lv == ignore_value:
                    ignored_per_z[zz] += n
                x0 = x1


def _chunk_ids(occupied: NDArray[np.bool_], grid: tuple[int, int, int]) -> NDArray[np.int64]:
    """Flat ids of the occupied chunks of one label's occupancy map."""
    # annotated: numpy types nonzero() of an n-d array as tuple[Any, ...], which would select
    # ravel_multi_index's scalar overload
    coords: tuple[NDArray[np.intp], ...] = np.nonzero(occupied)
    return np.ravel_multi_index(coords, grid).astype(np.int64)


class LabelIndexBuilder:
    """Accumulates the index of one segmentation slab by slab.

    Parameters
    ----------
    label_values : sequence of int
        Values the label map defines (background excluded or not; it is skipped).
    shape_zyx : tuple of int
        Shape of the whole volume.
    chunk_zyx : tuple of int
        Stored chunk shape, for the chunk occupancy map.
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
        self._chunks = np.zeros((n, *self.grid), np.bool_)
        self._unknown = np.zeros(lut_size + 1, np.int64)
        self._ignored_per_z = np.zeros(shape_zyx[0], np.int64)
        self._nonfinite = np.zeros(n, np.int64)
        self._triplets: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._float_keys = False  # switched on by the first non-integral float value

    # -- accumulation -----------------------------------------------------------------------
    def update(self, z0: int, labels: np.ndarray, values: np.ndarray | None) -> None:
        """Add a slab: ``labels`` and ``values`` of shape (depth, ny, nx) starting at z0.

        ``values`` may be None for a slab that holds no indexed label (background and ignore
        only): counts of ignored voxels are still taken, no value is read.
        """
        labels = np.ascontiguousarray(labels)
        keys, kmin, kmax = self._keys(labels, values) if values is not None else (None, 0, 0)
        n = len(self.values)
        bins = (kmax - kmin + 1) if keys is not None else 0
        dense = keys is not None and n * bins <= _DENSE_BINS_MAX
        hist = np.zeros((n, bins if dense else 1), np.int32 if labels.size < 2**31 else np.int64)
        cz, cy, cx = self.chunk_shape
        _scan_runs(
            labels,
            keys if dense and keys is not None else labels,
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
            self._unknown,
            self._ignored_per_z,
            self.ignore_value,
            dense,
        )
        if dense:
            li, k = np.nonzero(hist)
            self._triplets.append(
                (li.astype(np.int64), k.astype(np.int64) + kmin, hist[li, k].astype(np.int64))
            )
        elif keys is not None:
            self._sparse_histogram(labels, keys)
        if len(self._triplets) >= 8:  # keep memory flat however many slices the volume has
            self._triplets = [self._combined_triplets()]

    def _keys(self, labels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray | None, int, int]:
        """Histogram keys of a slab (integers), with their range."""
        if values.dtype.kind in "iu":
            if values.size == 0:
                return values, 0, 0
            return np.ascontiguousarray(values), int(values.min()), int(values.max())
        finite = np.isfinite(values)
        if not finite.all():
            li = self._lut[labels[~finite].astype(np.int64)]
            np.add.at(self._nonfinite, li[li >= 0], 1)
            values = np.where(finite, values, 0)
        if not self._float_keys and not np.array_equal(values, np.floor(values)):
            self._switch_to_float_keys()
        scale = 1.0 / FLOAT_HISTOGRAM_RESOLUTION if self._float_keys else 1.0
        keys = np.rint(values.astype(np.float64) * scale).astype(np.int64)
        if not finite.all():
            keys[~finite] = np.iinfo(np.int64).min  # marked; dropped in the sparse path
            return keys, 0, 0 if keys.size == 0 else 1 << 62  # force the sparse path
        return keys, int(keys.min()), int(keys.max())

    def _switch_to_float_keys(self) -> None:
        """Re-express integer keys seen so far at the float resolution (exact: power of two)."""
        self._float_keys = True
        factor = round(1.0 / FLOAT_HISTOGRAM_RESOLUTION)
        self._triplets = [(li, k * factor, c) for li, k, c in self._triplets]

    def _sparse_histogram(self, labels: np.ndarray, keys: np.ndarray) -> None:
        """Histogram for slabs whose value range is too wide for a dense table."""
        li = self._lut[labels.ravel().astype(np.int64)]
        k = keys.ravel()
        keep = (li >= 0) & (k != np.iinfo(np.int64).min)
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
        self._chunks |= other._chunks
        self._unknown += other._unknown
        self._ignored_per_z += other._ignored_per_z
        self._nonfinite += other._nonfinite
        self._triplets.extend(other._triplets)

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
        chunk_ids = tuple(_chunk_ids(self._chunks[i], self.grid) for i in present)
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
        )
