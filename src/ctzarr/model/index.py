"""The per-label index of one segmentation of one case, and its form in the store.

A :class:`LabelIndex` holds, for every label present: voxel count, bounding box, coordinate sums
(centroid), exact value histogram and the chunks it occupies. It is built during conversion
(:mod:`ctzarr.write.index_builder`) and read back by crops and statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ctzarr.errors import MetadataError
from ctzarr.model.attributes import CTZARR_KEY, parse_block

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

    def to_attributes(self) -> dict[str, Any]:
        """The index group's attributes: the per-label table as JSON (histograms live in the
        ``histogram`` array, see :meth:`histogram_array`)."""
        return {
            CTZARR_KEY: {
                "labels": self.labels.tolist(),
                "voxel_count": self.voxel_count.tolist(),
                "bbox": self.bbox.tolist(),
                "coord_sum": self.coord_sum.tolist(),
                "chunk_ids": [c.tolist() for c in self.chunk_ids],
                "chunk_shape": list(self.chunk_shape),
                "chunk_grid": list(self.chunk_grid),
                "hist_offsets": self.hist_offsets.tolist(),
                "histogram_resolution": self.histogram_resolution,
                "annotated_slices": None
                if self.annotated_slices is None
                else self.annotated_slices.tolist(),
                "nonfinite_count": self.nonfinite_count.tolist(),
            }
        }

    def histogram_array(self) -> np.ndarray:
        """The ``histogram`` array: (key, count) rows, int64."""
        if not len(self.hist_keys):
            return np.zeros((0, 2), np.int64)
        return np.stack([self.hist_keys, self.hist_counts], axis=1).astype(np.int64, copy=False)

    @classmethod
    def from_attributes(
        cls, attributes: Mapping[str, Any], histogram: np.ndarray, where: str = ""
    ) -> LabelIndex:
        """Inverse of :meth:`to_attributes` (with the stored ``histogram`` array)."""
        table = IndexTable.from_attributes(attributes, where)
        d = parse_block(attributes, CTZARR_KEY, where)
        try:
            hist = np.asarray(histogram, dtype=np.int64).reshape(-1, 2)
            n = len(table.labels)
            index = cls(
                labels=table.labels,
                voxel_count=np.asarray(d["voxel_count"], np.int64).reshape(n),
                bbox=table.bbox,
                coord_sum=np.asarray(d["coord_sum"], np.int64).reshape(n, 3),
                chunk_ids=tuple(np.asarray(c, np.int64).reshape(-1) for c in d["chunk_ids"]),
                hist_offsets=np.asarray(d["hist_offsets"], np.int64).reshape(n + 1),
                hist_keys=hist[:, 0].copy(),
                hist_counts=hist[:, 1].copy(),
                histogram_resolution=float(d["histogram_resolution"]),
                annotated_slices=None
                if d["annotated_slices"] is None
                else np.asarray(d["annotated_slices"], np.int64).reshape(-1),
                chunk_grid=_three(d["chunk_grid"]),
                chunk_shape=_three(d["chunk_shape"]),
                nonfinite_count=np.asarray(d["nonfinite_count"], np.int64).reshape(n),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise MetadataError(where, f"{CTZARR_KEY} (index)", f"malformed ({exc})") from None
        if len(index.chunk_ids) != n:
            raise MetadataError(where, f"{CTZARR_KEY}.chunk_ids", f"expected {n} lists")
        return index

    def histogram(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """Values and counts of one label (values = keys * resolution)."""
        i = int(np.searchsorted(self.labels, label))
        if i >= len(self.labels) or self.labels[i] != label:
            return np.zeros(0), np.zeros(0, np.int64)
        sl = slice(int(self.hist_offsets[i]), int(self.hist_offsets[i + 1]))
        return self.hist_keys[sl] * self.histogram_resolution, self.hist_counts[sl]


def _three(value: Any) -> tuple[int, int, int]:
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError(f"expected 3 integers, got {value!r}")
    return (int(value[0]), int(value[1]), int(value[2]))


@dataclass(frozen=True)
class IndexTable:
    """The part of an index that crops need: label values and bounding boxes (no histograms)."""

    labels: np.ndarray
    bbox: np.ndarray

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any], where: str = "") -> IndexTable:
        """Labels and bounding boxes of an index group's attributes."""
        d = parse_block(attributes, CTZARR_KEY, where)
        try:
            labels = np.asarray(d["labels"], np.int64).reshape(-1)
            bbox = np.asarray(d["bbox"], np.int64).reshape(len(labels), 6)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise MetadataError(where, f"{CTZARR_KEY}.labels/bbox", f"malformed ({exc})") from None
        return cls(labels, bbox)

    def bounding_box(self, label: int) -> tuple[int, int, int, int, int, int] | None:
        """Half-open (z0, z1, y0, y1, x0, x1) of a label; None when it is absent."""
        hits = np.flatnonzero(self.labels == label)
        if not len(hits):
            return None
        b = self.bbox[int(hits[0])].tolist()
        return (b[0], b[1], b[2], b[3], b[4], b[5])
