"""``slice.png``: one CT slice, windowed, with the label overlay filled in the label colours.

Display conventions are those of :mod:`ctzarr.read.show` (its orientation code is reused, so
the service and ``ctzarr show`` draw a case the same way): radiological (axial: patient's
right on the image left, anterior up; coronal: right on the left, superior up; sagittal:
anterior on the left, superior up), whatever the stored orientation, and square millimetre
pixels (the finer spacing of the slice is one pixel; the other axis is resampled).

Only the one slice is read (the image and label boxes one voxel thick, through the fast read
path); its size is checked against the limit before any voxel is read. PNGs are encoded with
Pillow at a low zlib level: a 512² slice costs a few milliseconds, not tens.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ctzarr.errors import StructureNotFoundError
from ctzarr.extras import require
from ctzarr.io.strict import read_boxes
from ctzarr.model.labels import color_for
from ctzarr.read.composition import resolve_landmark

# the orientation helpers of ``ctzarr show``: one definition of "radiological" in the package
from ctzarr.read.show import _PANELS, PLANES, Window, _orient, _world_axes

if TYPE_CHECKING:
    from ctzarr.read.case import Case

__all__ = [
    "MAX_PNG_SIDE",
    "SlabCache",
    "SliceGeometry",
    "middle_index",
    "render_slice",
    "slice_index_at",
]

#: longest side of a rendered slice, pixels (a bound on every PNG the service makes)
MAX_PNG_SIDE = 2048

#: opacity of the filled label overlay
OVERLAY_OPACITY = 0.45


@dataclass(frozen=True)
class SliceGeometry:
    """Where the pixels of a rendered slice come from (sent as the ``Ctzarr-Slice`` header).

    Pixel (row r, column c) of the PNG shows stored voxel ``index`` along ``dim`` and, along
    ``rows_dim``, ``rows_flipped ? n - 1 - floor(r / scale_rows) : floor(r / scale_rows)``
    (and the same for columns), ``scale = png pixels per voxel``.
    """

    plane: str
    dim: str
    index: int
    rows_dim: str
    cols_dim: str
    rows_flipped: bool
    cols_flipped: bool
    voxels: tuple[int, int]  # (rows, columns) of the slice in voxels
    pixels: tuple[int, int]  # (rows, columns) of the PNG
    pixel_mm: float  # side of a (square) PNG pixel in mm

    def to_json(self) -> dict[str, Any]:
        return {
            "plane": self.plane,
            "dim": self.dim,
            "index": self.index,
            "rows_dim": self.rows_dim,
            "cols_dim": self.cols_dim,
            "rows_flipped": self.rows_flipped,
            "cols_flipped": self.cols_flipped,
            "voxels": list(self.voxels),
            "pixels": list(self.pixels),
            "pixel_mm": self.pixel_mm,
        }


def _plane_axes(case: Case, plane: str) -> tuple[int, int, int, bool, bool]:
    """(normal dim, row dim, column dim, flip rows, flip columns) of a plane, stored dims."""
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r}: one of {', '.join(PLANES)}")
    dim_of, sign_of = _world_axes(case.affine)
    _, _, normal, (row_world, col_world) = next(p for p in _PANELS if p[0] == plane)
    return (
        dim_of[normal],
        dim_of[row_world],
        dim_of[col_world],
        sign_of[row_world] > 0,
        sign_of[col_world] > 0,
    )


def middle_index(case: Case, plane: str) -> int:
    """Stored index of the middle slice along a plane's normal."""
    return case.shape[_plane_axes(case, plane)[0]] // 2


def slice_index_at(case: Case, plane: str, at: str | int) -> int:
    """Stored index, along the plane's normal, of the slice through a structure's centroid
    (``floor(mean index + 0.5)``, from the index: no voxel read)."""
    dn = _plane_axes(case, plane)[0]
    seg, label = resolve_landmark(case, at)
    idx = case.index(seg)
    hits = np.flatnonzero(idx.labels == label.value)
    if not len(hits):
        raise StructureNotFoundError(
            f"case {case.case_id!r}: structure {label.name!r} (label {label.value}) is absent "
            f"from segmentation {seg!r}"
        )
    i = int(hits[0])
    n, s = int(idx.voxel_count[i]), int(idx.coord_sum[i, dn])
    return (2 * s + n) // (2 * n)


def _lut(case: Case, segmentation: str, structures: Sequence[str | int] | None) -> np.ndarray:
    """RGBA per label value (alpha 0 = not drawn): the label colours, background and the
    ignore value transparent, only ``structures`` when given."""
    lm = case.collection.segmentations[segmentation]
    lut = np.zeros((max(lm.max_value, 255) + 1, 4), dtype=np.float32)
    wanted = None
    if structures:
        wanted = {case.resolve(s, segmentation)[1].value for s in structures}
    for lab in lm:
        if lab.value == lm.background or lab.value == lm.ignore_value:
            continue
        if wanted is not None and lab.value not in wanted:
            continue
        rgba = lab.rgba if lab.rgba[3] else color_for(lab.normalized_name)
        lut[lab.value] = [rgba[0], rgba[1], rgba[2], 255.0]
    return lut


class SlabCache:
    """Decoded slabs (one inner chunk thick along a plane's normal), least recently used out
    first, bounded in bytes; shared by the threads of a service.

    A slab is read whole only on the second request that falls in it (someone is stepping
    through it): decoding a whole slab into new memory costs about three times a one-slice
    read, which a single look at a slab should not pay.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._slabs: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._bytes = 0
        self._seen: OrderedDict[tuple[Any, ...], None] = OrderedDict()
        self._lock = threading.Lock()

    def worth_reading(self, key: tuple[Any, ...]) -> bool:
        """True when a slab was asked for before (read it whole now); else remember it."""
        with self._lock:
            if key in self._seen:
                del self._seen[key]
                return True
            self._seen[key] = None
            while len(self._seen) > 1024:
                self._seen.popitem(last=False)
            return False

    def get(self, key: tuple[Any, ...]) -> np.ndarray | None:
        with self._lock:
            slab = self._slabs.get(key)
            if slab is not None:
                self._slabs.move_to_end(key)
            return slab

    def put(self, key: tuple[Any, ...], slab: np.ndarray) -> None:
        if slab.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._slabs:
                return
            self._slabs[key] = slab
            self._bytes += slab.nbytes
            while self._bytes > self.max_bytes:
                _, old = self._slabs.popitem(last=False)
                self._bytes -= old.nbytes


def _read_slices(
    case: Case, paths: Sequence[str], dim: int, index: int, slabs: SlabCache | None
) -> list[np.ndarray]:
    """The 2-D slice ``index`` along stored dimension ``dim`` of each array, read together
    (through a slab cache when given)."""
    arrays = [case.array(p) for p in paths]
    if slabs is None:
        box = [slice(0, n) for n in case.shape]
        box[dim] = slice(index, index + 1)
        return [np.take(a, 0, axis=dim) for a in read_boxes([(arr, box) for arr in arrays])]
    out: list[np.ndarray | None] = [None] * len(arrays)
    missing: list[tuple[int, tuple[Any, ...] | None, Any, list[slice]]] = []
    for i, (path, arr) in enumerate(zip(paths, arrays, strict=True)):
        thick = int(arr.chunks[dim])  # inner chunk extent: the unit of decoding
        start = index - index % thick
        key: tuple[Any, ...] = (case.collection.url, case.case_id, id(case.meta), path, dim, start)
        slab = slabs.get(key)
        if slab is None:
            box = [slice(0, n) for n in case.shape]
            whole = slabs.worth_reading(key)
            box[dim] = (
                slice(start, min(start + thick, case.shape[dim]))
                if whole
                else slice(index, index + 1)
            )
            missing.append((i, key if whole else None, arr, box))
        else:
            out[i] = np.take(slab, index - start, axis=dim)
    if missing:
        read = read_boxes([(arr, box) for _, _, arr, box in missing])
        for (i, slab_key, _, box), slab in zip(missing, read, strict=True):
            if slab_key is not None:
                slabs.put(slab_key, slab)
            out[i] = np.take(slab, index - box[dim].start, axis=dim)
    return [o for o in out if o is not None]


def _windowed(values: np.ndarray, window: Window) -> np.ndarray:
    """Grey levels 0..255 of HU values: ``clip((v - low) * 255 / width, 0, 255)``, rounded,
    in float32; 16-bit and 8-bit integer images through a table of every value (one lookup a
    pixel instead of four passes of float arithmetic), with the same float32 results."""
    lo, hi = window.limits
    scale = np.float32(255.0 / (hi - lo))

    def grey(v: np.ndarray) -> np.ndarray:
        g = np.clip((v.astype(np.float32) - np.float32(lo)) * scale, 0.0, 255.0)
        out: np.ndarray = (g + np.float32(0.5)).astype(np.uint8)
        return out

    if values.dtype in (np.int16, np.uint16, np.int8, np.uint8):
        info = np.iinfo(values.dtype)
        table = grey(np.arange(info.min, info.max + 1, dtype=np.int32))
        return table[values.astype(np.intp) - info.min]
    return grey(values)


def render_slice(
    case: Case,
    *,
    plane: str,
    index: int,
    window: Window,
    overlay: str | None = None,
    structures: Sequence[str | int] | None = None,
    opacity: float = OVERLAY_OPACITY,
    slabs: SlabCache | None = None,
) -> tuple[bytes, SliceGeometry]:
    """One slice as PNG bytes, and where its pixels come from.

    With ``slabs``, the slab of inner chunks holding the slice is read whole and kept: a viewer
    stepping through slices then decodes each chunk once, not once per slice.

    Raises
    ------
    ValueError
        Unknown plane, index outside the volume (never clamped).
    """
    image_module: Any = require("PIL.Image", "serve", "ctzarr serve slice.png")
    dn, rd, cd, flip_rows, flip_cols = _plane_axes(case, plane)
    flips = (flip_rows, flip_cols)
    extent = case.shape[dn]
    if not 0 <= index < extent:
        raise ValueError(
            f"index {index} of the {plane} plane (stored dimension {'zyx'[dn]}) is outside "
            f"case {case.case_id!r}: 0..{extent - 1}"
        )
    spacing = case.spacing
    rows, cols = case.shape[rd], case.shape[cd]
    pixel_mm = float(min(spacing[rd], spacing[cd]))
    out_rows = max(round(rows * spacing[rd] / pixel_mm), 1)
    out_cols = max(round(cols * spacing[cd] / pixel_mm), 1)
    if max(out_rows, out_cols) > MAX_PNG_SIDE:
        shrink = MAX_PNG_SIDE / max(out_rows, out_cols)
        out_rows, out_cols = max(int(out_rows * shrink), 1), max(int(out_cols * shrink), 1)
        pixel_mm = rows * float(spacing[rd]) / out_rows

    paths = ["0"] if overlay is None else ["0", f"labels/{overlay}/0"]
    found = _read_slices(case, paths, dn, index, slabs)
    values = _orient(case.meta.nifti.scale(found[0]), dn, rd, *flips)
    grey = _windowed(values, window)
    if overlay is None:
        picture = image_module.fromarray(grey, "L")
    else:
        labels = _orient(found[1], dn, rd, *flips)
        lut = _lut(case, overlay, structures)
        values_at = np.minimum(labels, len(lut) - 1).astype(np.intp)
        drawn = (lut[:, 3] > 0)[values_at]
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        # blend only the labelled pixels (most of a slice is background)
        under = grey[drawn].astype(np.float32)[:, None]
        over = lut[values_at[drawn], :3]
        rgb[drawn] = (
            under * np.float32(1.0 - opacity) + over * np.float32(opacity) + np.float32(0.5)
        ).astype(np.uint8)
        picture = image_module.fromarray(rgb, "RGB")
    if (out_rows, out_cols) != grey.shape:
        picture = picture.resize((out_cols, out_rows), image_module.Resampling.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format="PNG", compress_level=1)
    geometry = SliceGeometry(
        plane=plane,
        dim="zyx"[dn],
        index=index,
        rows_dim="zyx"[rd],
        cols_dim="zyx"[cd],
        rows_flipped=flip_rows,
        cols_flipped=flip_cols,
        voxels=(rows, cols),
        pixels=(out_rows, out_cols),
        pixel_mm=pixel_mm,
    )
    return buf.getvalue(), geometry
