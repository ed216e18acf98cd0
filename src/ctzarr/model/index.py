"""The per-label index of one segmentation of one case, and its form in the store.

A :class:`LabelIndex` holds, for every label present: voxel count, bounding box, coordinate sums
(centroid), exact value histogram and the chunks it occupies. It is built during conversion
(:mod:`ctzarr.write.index_builder`) and read back by crops and statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: bin width of value histograms for float images with non-integral values (a power of two, so
#: integer values fall exactly on bin keys: key = value / resolution)
FLOAT_HISTOGRAM_RESOLUTION = 2.0**-8


@dataclass(frozen=True)
class LabelIndex:
    """The finished index of one segmentation of one case.

    Arrays are aligned on ``labels`` (the label values present, ascending). Bounding boxes are
    half-open voxel indices ``[z_start, z_stop, y_start, y_stop, x_start, x_stop]``; coordinate
    sums are over (z, y, x) voxel indices, so the centroid index is ``coord_sum / voxel_count``.
    The histogram is in CSR form: label ``labels[i]`` owns entries
    ``hist_offsets[i]:hist_offsets[i + 1]`` of ``hist_keys`` (value / resolution) and
    ``hist_counts``.
    """

    labels: np.ndarray
    voxel_count: np.ndarray
    bbox: np.ndarray
    coord_sum: np.ndarray
    chunk_ids: tuple[np.ndarray, ...]
    hist_offsets: np.ndarray
    hist_keys: np.ndarray
    hist_counts: np.ndarray
    histogram_resolution: float
    annotated_slices: np.ndarray | None
    chunk_grid: tuple[int, int, int]
    chunk_shape: tuple[int, int, int]
    nonfinite_count: np.ndarray

    def histogram(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """Values and counts of one label (values = keys * resolution)."""
        i = int(np.searchsorted(self.labels, label))
        if i >= len(self.labels) or self.labels[i] != label:
            return np.zeros(0), np.zeros(0, np.int64)
        sl = slice(int(self.hist_offsets[i]), int(self.hist_offsets[i + 1]))
        return self.hist_keys[sl] * self.histogram_resolution, self.hist_counts[sl]


def index_attributes(idx: LabelIndex) -> dict[str, Any]:
    """The per-label table of an index as JSON (histograms live in the ``histogram`` array)."""
    return {
        "labels": idx.labels.tolist(),
        "voxel_count": idx.voxel_count.tolist(),
        "bbox": idx.bbox.tolist(),
        "coord_sum": idx.coord_sum.tolist(),
        "chunk_ids": [c.tolist() for c in idx.chunk_ids],
        "chunk_shape": list(idx.chunk_shape),
        "chunk_grid": list(idx.chunk_grid),
        "hist_offsets": idx.hist_offsets.tolist(),
        "histogram_resolution": idx.histogram_resolution,
        "annotated_slices": None if idx.annotated_slices is None else idx.annotated_slices.tolist(),
        "nonfinite_count": idx.nonfinite_count.tolist(),
    }


def index_from_attributes(attrs: dict[str, Any], histogram: np.ndarray) -> LabelIndex:
    """Inverse of :func:`index_attributes`."""
    n = len(attrs["labels"])
    hist = np.asarray(histogram, dtype=np.int64).reshape(-1, 2)
    return LabelIndex(
        labels=np.asarray(attrs["labels"], np.int64),
        voxel_count=np.asarray(attrs["voxel_count"], np.int64),
        bbox=np.asarray(attrs["bbox"], np.int64).reshape(n, 6),
        coord_sum=np.asarray(attrs["coord_sum"], np.int64).reshape(n, 3),
        chunk_ids=tuple(np.asarray(c, np.int64) for c in attrs["chunk_ids"]),
        hist_offsets=np.asarray(attrs["hist_offsets"], np.int64),
        hist_keys=hist[:, 0].copy(),
        hist_counts=hist[:, 1].copy(),
        histogram_resolution=float(attrs["histogram_resolution"]),
        annotated_slices=None
        if attrs["annotated_slices"] is None
        else np.asarray(attrs["annotated_slices"], np.int64),
        chunk_grid=tuple(attrs["chunk_grid"]),  # type: ignore[arg-type]
        chunk_shape=tuple(attrs["chunk_shape"]),  # type: ignore[arg-type]
        nonfinite_count=np.asarray(attrs["nonfinite_count"], np.int64),
    )
