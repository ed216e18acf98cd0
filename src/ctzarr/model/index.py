"""The per-label index of one segmentation of one case, and its form in the store.

A :class:`LabelIndex` holds, for every label present: voxel count, bounding box, coordinate sums
(centroid), exact value histogram and the chunks it occupies. It is built during conversion
(:mod:`ctzarr.write.index_builder`) and read back by crops and statistics.

Store format 3 adds, written by the same pass:

- per-chunk voxel counts (attribute ``ctzarr.chunk_counts``, aligned with ``chunk_ids``), so
  a sampler draws a voxel of a class exactly by reading one chunk;
- per-slice voxel counts and value-key sums (array ``slices``, int64 rows ``(voxel_count,
  key_sum)``, label-major; label i owns the rows of z in its bounding box's z extent), so
  profiles along z read no voxels;
- a joint index of each pair of segmentations of a case (:class:`JointInfo`): a
  :class:`LabelIndex` over pair codes ``a * radix + b``, under ``labels/<A>/joint/<B>``.

Indexes of format 1 and 2 stores read with these parts None.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ctzarr.errors import IndexUnavailableError, MetadataError
from ctzarr.model.attributes import CTZARR_KEY, parse_block, parse_int, parse_str

if TYPE_CHECKING:
    import pandas as pd

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

    Format 3 (None for earlier stores): ``chunk_counts[i]`` is the voxel count of label i in
    each chunk of ``chunk_ids[i]``; ``slice_counts`` and ``slice_sums`` (flat, int64) hold per
    axial slice the voxel count and the sum of histogram keys of each label, label i owning
    ``slice_offsets[i]:slice_offsets[i + 1]`` for z in ``[bbox[i, 0], bbox[i, 1])``. Voxels
    with a non-finite value count and add 0 to the key sum.
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
    chunk_counts: tuple[np.ndarray, ...] | None = None
    slice_counts: np.ndarray | None = None
    slice_sums: np.ndarray | None = None

    def __repr__(self) -> str:
        extra = "" if self.chunk_counts is None else ", per-chunk counts and per-slice profiles"
        return (
            f"<ctzarr.LabelIndex {len(self.labels)} labels, "
            f"{int(self.voxel_count.sum()):,} voxels, chunk grid {self.chunk_grid} of "
            f"{self.chunk_shape} voxels{extra}>"
        )

    def to_dataframe(self) -> pd.DataFrame:
        """One row per label: label, voxel_count, the half-open bounding box (z_start ...
        x_stop), the centroid as (fractional) voxel indices and the number of chunks holding it."""
        # pandas is imported here, not at module level: the model layer is imported by workers
        # (samplers, index builders) that never build a table
        import pandas as pd

        n = np.maximum(self.voxel_count, 1)[:, None]
        centroid = self.coord_sum / n
        columns: dict[str, Any] = {"label": self.labels, "voxel_count": self.voxel_count}
        for j, name in enumerate(("z", "y", "x")):
            columns[f"{name}_start"] = self.bbox[:, 2 * j]
            columns[f"{name}_stop"] = self.bbox[:, 2 * j + 1]
        for j, name in enumerate(("z", "y", "x")):
            columns[f"centroid_{name}_index"] = centroid[:, j]
        columns["chunk_count"] = np.array([len(c) for c in self.chunk_ids], np.int64)
        return pd.DataFrame(columns)

    def _position(self, label: int) -> int | None:
        i = int(np.searchsorted(self.labels, label))
        return i if i < len(self.labels) and self.labels[i] == label else None

    @property
    def slice_offsets(self) -> np.ndarray:
        """Where each label's rows start in ``slice_counts``/``slice_sums`` (length n + 1)."""
        extent = (self.bbox[:, 1] - self.bbox[:, 0]).astype(np.int64)
        return np.concatenate([np.zeros(1, np.int64), np.cumsum(extent)])

    def slice_profile(self, label: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(z, voxel_count, key_sum)`` of the axial slices holding a label (int64 arrays).

        The slice's mean value is ``key_sum * histogram_resolution / voxel_count``. Empty arrays
        when the label is absent. Raises :class:`~ctzarr.errors.IndexUnavailableError` for an
        index of a store older than format 3.
        """
        if self.slice_counts is None or self.slice_sums is None:
            raise IndexUnavailableError(
                "per-slice counts are not in this index (store format < 3): convert the case "
                "again with this ctzarr, or use method='scan'"
            )
        i = self._position(label)
        if i is None:
            empty = np.zeros(0, np.int64)
            return empty, empty, empty
        off = self.slice_offsets
        counts = self.slice_counts[off[i] : off[i + 1]]
        sums = self.slice_sums[off[i] : off[i + 1]]
        held = np.flatnonzero(counts)
        return held.astype(np.int64) + self.bbox[i, 0], counts[held], sums[held]

    def chunk_voxel_counts(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """``(chunk_ids, voxel counts)`` of a label (empty when absent); format 3 only."""
        if self.chunk_counts is None:
            raise IndexUnavailableError(
                "per-chunk counts are not in this index (store format < 3): convert the case "
                "again with this ctzarr"
            )
        i = self._position(label)
        if i is None:
            empty = np.zeros(0, np.int64)
            return empty, empty
        return self.chunk_ids[i], self.chunk_counts[i]

    def problems(self) -> list[str]:
        """Where the format-3 parts disagree with the rest of the index (empty when they agree,
        or for an index without them): per label, per-slice counts and per-chunk counts must
        sum to the voxel count, the bounding box's first and last slices must hold the label,
        and per-slice key sums must add up to the histogram's."""
        out = []
        if (self.chunk_counts is None) != (self.slice_counts is None):
            have = "per-chunk counts" if self.chunk_counts is not None else "per-slice rows"
            out.append(f"the index has {have} but not the other part of format 3")
        off = self.slice_offsets
        for i, label in enumerate(self.labels.tolist()):
            n = int(self.voxel_count[i])
            if self.chunk_counts is not None:
                got = int(self.chunk_counts[i].sum())
                if got != n or (self.chunk_counts[i] <= 0).any():
                    out.append(f"label {label}: per-chunk counts sum to {got}, voxel count {n}")
            if self.slice_counts is None or self.slice_sums is None:
                continue
            counts = self.slice_counts[off[i] : off[i + 1]]
            if int(counts.sum()) != n or (counts < 0).any():
                out.append(
                    f"label {label}: per-slice counts sum to {int(counts.sum())}, voxel count {n}"
                )
            elif len(counts) and (counts[0] == 0 or counts[-1] == 0):
                out.append(f"label {label}: a bounding-box end slice holds no voxel of it")
            keys = self.hist_keys[self.hist_offsets[i] : self.hist_offsets[i + 1]]
            weights = self.hist_counts[self.hist_offsets[i] : self.hist_offsets[i + 1]]
            want = int((keys * weights).sum())
            got = int(self.slice_sums[off[i] : off[i + 1]].sum())
            if got != want:
                out.append(f"label {label}: per-slice value sums add up to {got}, histogram {want}")
        return out

    def slices_array(self) -> np.ndarray | None:
        """The ``slices`` array: (voxel_count, key_sum) rows, int64; None before format 3."""
        if self.slice_counts is None or self.slice_sums is None:
            return None
        return np.stack([self.slice_counts, self.slice_sums], axis=1).astype(np.int64, copy=False)

    def to_attributes(self) -> dict[str, Any]:
        """The index group's attributes: the per-label table as JSON (histograms live in the
        ``histogram`` array, see :meth:`histogram_array`; per-slice rows in ``slices``)."""
        extra: dict[str, Any] = {}
        if self.chunk_counts is not None:
            extra["chunk_counts"] = [c.tolist() for c in self.chunk_counts]
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
                **extra,
            }
        }

    def histogram_array(self) -> np.ndarray:
        """The ``histogram`` array: (key, count) rows, int64."""
        if not len(self.hist_keys):
            return np.zeros((0, 2), np.int64)
        return np.stack([self.hist_keys, self.hist_counts], axis=1).astype(np.int64, copy=False)

    @classmethod
    def from_attributes(
        cls,
        attributes: Mapping[str, Any],
        histogram: np.ndarray,
        where: str = "",
        slices: np.ndarray | None = None,
    ) -> LabelIndex:
        """Inverse of :meth:`to_attributes` (with the stored ``histogram`` array, and the
        ``slices`` array of a format-3 index)."""
        table = IndexTable.from_attributes(attributes, where)
        d = parse_block(attributes, CTZARR_KEY, where)
        try:
            hist = np.asarray(histogram, dtype=np.int64).reshape(-1, 2)
            n = len(table.labels)
            chunk_counts = None
            if d.get("chunk_counts") is not None:
                chunk_counts = tuple(np.asarray(c, np.int64).reshape(-1) for c in d["chunk_counts"])
            rows = None if slices is None else np.asarray(slices, np.int64).reshape(-1, 2)
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
                chunk_counts=chunk_counts,
                slice_counts=None if rows is None else rows[:, 0].copy(),
                slice_sums=None if rows is None else rows[:, 1].copy(),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise MetadataError(where, f"{CTZARR_KEY} (index)", f"malformed ({exc})") from None
        if len(index.chunk_ids) != n:
            raise MetadataError(where, f"{CTZARR_KEY}.chunk_ids", f"expected {n} lists")
        if chunk_counts is not None and [len(c) for c in chunk_counts] != [
            len(c) for c in index.chunk_ids
        ]:
            raise MetadataError(
                where, f"{CTZARR_KEY}.chunk_counts", "expected one count per listed chunk"
            )
        if rows is not None and len(rows) != int(index.slice_offsets[-1]):
            raise MetadataError(
                where,
                f"{CTZARR_KEY} (slices)",
                f"{len(rows)} rows, the bounding boxes' z extents need {index.slice_offsets[-1]}",
            )
        return index

    def histogram(self, label: int) -> tuple[np.ndarray, np.ndarray]:
        """Values and counts of one label (values = keys * resolution)."""
        i = self._position(label)
        if i is None:
            return np.zeros(0), np.zeros(0, np.int64)
        sl = slice(int(self.hist_offsets[i]), int(self.hist_offsets[i + 1]))
        return self.hist_keys[sl] * self.histogram_resolution, self.hist_counts[sl]


@dataclass(frozen=True)
class JointInfo:
    """What a joint index group is: the index of segmentation ``segmentation`` (A) crossed with
    ``other`` (B), A < B, over pair codes ``code = a * radix + b`` (``radix`` = B's largest
    label value + 1), for voxels where both a and b are labels (not background, not ignore).

    Stored as attribute ``ctzarr.joint`` of ``labels/<A>/joint/<B>``, beside the index table.
    """

    segmentation: str
    other: str
    radix: int

    def to_attributes(self) -> dict[str, Any]:
        """The ``joint`` entry of the group's ``ctzarr`` block."""
        return {"segmentation": self.segmentation, "other": self.other, "radix": self.radix}

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any], where: str = "") -> JointInfo:
        """The ``ctzarr.joint`` entry of a joint index group's attributes."""
        block = parse_block(parse_block(attributes, CTZARR_KEY, where), "joint", where)
        key = f"{CTZARR_KEY}.joint"
        return cls(
            parse_str(block.get("segmentation"), f"{key}.segmentation", where),
            parse_str(block.get("other"), f"{key}.other", where),
            parse_int(block.get("radix"), f"{key}.radix", where, minimum=1),
        )

    def split(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(label of A, label of B) of pair codes."""
        codes = np.asarray(codes, np.int64)
        return codes // self.radix, codes % self.radix

    def code(self, a: int, b: int) -> int:
        """The pair code of label a of A and label b of B."""
        return int(a) * self.radix + int(b)


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
