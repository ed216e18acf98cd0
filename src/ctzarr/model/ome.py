"""OME-Zarr 0.5 metadata blocks of a case: multiscales of the image, image-label of a segmentation.

Where the voxels lie (format 2)
-------------------------------
OME-Zarr 0.5 has only a per-axis scale and translation, no rotation or flip. Format 2 places
the arrays anyway, in the patient's own frame, the way RFC-4 (anatomical orientation) does:

- each space axis (store axes ``z, y, x`` are the NIfTI axes ``k, j, i``) carries
  ``"orientation": {"type": "anatomical", "value": "<from>-to-<to>"}``, the direction in
  which its index increases, derived from the affine exactly as
  :func:`nibabel.orientations.aff2axcodes` does (an axis whose index increases toward the
  patient's Left, code ``"L"``, is ``"right-to-left"``);
- every level's ``coordinateTransformations`` is a positive ``scale`` (the voxel size) and a
  ``translation``: the coordinate of the centre of voxel 0 of that level *along the same
  anatomical direction* (for an axis toward Left or Posterior or Inferior, the negated RAS
  coordinate), so that labels and translation describe one frame; levels > 0 add the half
  voxel of their 2x2x2 blocks.

A reader that honours the orientation labels therefore places an LPS and an RAS case with the
same handedness and at the same origin. For an oblique affine the labels name each axis's
dominant direction and the translation is the origin's coordinate along it: an approximation,
exact only for axis-aligned affines. The full affine is kept in ``ctzarr.affine`` and in the
NIfTI-Zarr ``nifti`` header arrays (image and every label image), which NIfTI readers use.

Format-1 blocks (no affine given) keep the format-1 layout: no orientation, a scale per level
and, for levels > 0, only the half-voxel shift.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from nibabel.orientations import io_orientation

from ctzarr.errors import MetadataError
from ctzarr.model.labels import LabelMap

OME_VERSION = "0.5"

#: RFC-4 value of an axis whose index increases toward each nibabel axis code
ANATOMICAL_VALUES = {
    "R": "left-to-right",
    "L": "right-to-left",
    "A": "posterior-to-anterior",
    "P": "anterior-to-posterior",
    "S": "inferior-to-superior",
    "I": "superior-to-inferior",
}

#: nibabel's axis codes of the RAS+ world axes x, y, z: (toward -, toward +)
_CODES = (("L", "R"), ("P", "A"), ("I", "S"))


@dataclass(frozen=True)
class AxisDirection:
    """Where the index of one store axis increases: world axis (0, 1, 2 = RAS x, y, z) and sign."""

    world_axis: int
    sign: int  # +1 toward R, A or S; -1 toward L, P or I

    @property
    def code(self) -> str:
        """nibabel's axis code (``"R"``, ``"L"``, ``"A"``, ``"P"``, ``"S"``, ``"I"``)."""
        return _CODES[self.world_axis][self.sign > 0]

    @property
    def anatomical(self) -> str:
        """The RFC-4 orientation value (``"right-to-left"`` for code ``"L"``)."""
        return ANATOMICAL_VALUES[self.code]


def axis_directions(affine: Any) -> tuple[AxisDirection, AxisDirection, AxisDirection]:
    """Direction of each store axis (z, y, x) = NIfTI (k, j, i) under a NIfTI affine.

    The assignment is :func:`nibabel.orientations.io_orientation`'s (what
    :func:`~nibabel.orientations.aff2axcodes` reports): each voxel axis goes to its dominant
    world axis, greedily, so an oblique affine gets the nearest axis-aligned orientation. An
    axis nibabel leaves unassigned (a near-degenerate affine) takes the free world axis its
    column points to most.
    """
    aff = np.asarray(affine, dtype=np.float64)
    ornt = io_orientation(aff)
    taken = {int(w) for w, _ in ornt if np.isfinite(w)}
    dirs: list[AxisDirection] = []
    for col in range(3):  # i, j, k
        w, flip = ornt[col]
        if np.isfinite(w):
            dirs.append(AxisDirection(int(w), 1 if flip > 0 else -1))
            continue
        column = aff[:3, col]
        free = [a for a in range(3) if a not in taken]
        best = max(free, key=lambda a: abs(column[a]))
        taken.add(best)
        dirs.append(AxisDirection(best, 1 if column[best] >= 0 else -1))
    return dirs[2], dirs[1], dirs[0]


def axis_codes_zyx(affine: Any) -> tuple[str, str, str]:
    """nibabel axis codes of the store axes (z, y, x): ``aff2axcodes(affine)`` reversed."""
    z, y, x = axis_directions(affine)
    return z.code, y.code, x.code


def origin_zyx(affine: Any) -> tuple[float, float, float]:
    """Coordinate of the centre of voxel (0, 0, 0) along each store axis's direction (mm)."""
    aff = np.asarray(affine, dtype=np.float64)
    z, y, x = (d.sign * float(aff[d.world_axis, 3]) for d in axis_directions(aff))
    return z, y, x


def level_transforms(
    spacing_zyx: Sequence[float], level: int, affine: Any | None = None
) -> list[dict[str, Any]]:
    """``coordinateTransformations`` of a pyramid level: its scale and translation.

    With an affine (format 2) the translation is the level's voxel-0 centre in the anatomical
    frame of :func:`axis_directions`; without (format 1), only the half-voxel shift of the
    level's 2x2x2 blocks (and no translation at level 0).
    """
    f = 2**level
    scale = [float(s) * f for s in spacing_zyx]
    shift = [float(s) * (f - 1) / 2 for s in spacing_zyx]
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
    if affine is not None:
        origin = origin_zyx(affine)
        transforms.append(
            {
                "type": "translation",
                "translation": [o + s for o, s in zip(origin, shift, strict=True)],
            }
        )
    elif level:
        transforms.append({"type": "translation", "translation": shift})
    return transforms


def axes(affine: Any | None = None) -> list[dict[str, Any]]:
    """The multiscales ``axes``: z, y, x in millimetres, with RFC-4 orientation (format 2)."""
    out: list[dict[str, Any]] = [
        {"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")
    ]
    if affine is not None:
        for axis, direction in zip(out, axis_directions(affine), strict=True):
            axis["orientation"] = {"type": "anatomical", "value": direction.anatomical}
    return out


def multiscales(
    name: str,
    spacing_zyx: tuple[float, float, float],
    levels: Sequence[tuple[int, int, int]],
    affine: Any | None = None,
) -> dict[str, Any]:
    """OME 0.5 multiscales block: axes z, y, x in millimetres, scale and translation per level.

    With ``affine`` (format 2) the axes carry their anatomical orientation and every level its
    translation in that frame (see the module docstring); without it, the format-1 block.
    """
    return {
        "name": name,
        "axes": axes(affine),
        "datasets": [
            {"path": str(i), "coordinateTransformations": level_transforms(spacing_zyx, i, affine)}
            for i in range(len(levels))
        ],
        "type": "mean (image) / nearest (labels), 2x2x2",
    }


def image_label(label_map: LabelMap) -> dict[str, Any]:
    """OME ``image-label`` block: colours and properties of each label value."""
    colors = [{"label-value": lab.value, "rgba": list(lab.rgba)} for lab in label_map]
    props = []
    for lab in label_map:
        p: dict[str, Any] = {
            "label-value": lab.value,
            "name": lab.name,
            "normalized_name": lab.normalized_name,
        }
        if lab.totalsegmentator_name:
            p["totalsegmentator_name"] = lab.totalsegmentator_name
        if lab.placeholder:
            p["placeholder"] = True
        props.append(p)
    return {
        "version": OME_VERSION,
        "colors": colors,
        "properties": props,
        "source": {"image": "../../"},
    }


def image_attributes(
    name: str,
    spacing_zyx: tuple[float, float, float],
    levels: Sequence[tuple[int, int, int]],
    affine: Any | None = None,
) -> dict[str, Any]:
    """The ``ome`` block of a case group: OME version and the image's multiscales."""
    return {"version": OME_VERSION, "multiscales": [multiscales(name, spacing_zyx, levels, affine)]}


def label_image_attributes(
    name: str,
    spacing_zyx: tuple[float, float, float],
    levels: Sequence[tuple[int, int, int]],
    label_map: LabelMap,
    affine: Any | None = None,
) -> dict[str, Any]:
    """The ``ome`` block of a segmentation's label image group (placed like its image)."""
    return {
        "version": OME_VERSION,
        "multiscales": [multiscales(name, spacing_zyx, levels, affine)],
        "image-label": image_label(label_map),
    }


def labels_attributes(names: Sequence[str]) -> dict[str, Any]:
    """The ``ome`` block of a case's ``labels`` group: the segmentation names."""
    return {"version": OME_VERSION, "labels": list(names)}


def parse_level_paths(ome: Any, where: str) -> tuple[str, ...]:
    """Paths of the pyramid levels listed by an ``ome`` block's first multiscales."""
    try:
        if not isinstance(ome, Mapping):
            raise TypeError("not a JSON object")
        datasets = ome["multiscales"][0]["datasets"]
        paths = tuple(d["path"] for d in datasets)
        if not paths or not all(isinstance(p, str) for p in paths):
            raise ValueError("no level paths")
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise MetadataError(where, "ome.multiscales", f"malformed ({exc})") from None
    return paths


def parse_orientations(ome: Any) -> tuple[str | None, ...]:
    """The RFC-4 orientation value of each axis of an ``ome`` block's first multiscales.

    ``None`` for an axis without one (every axis of a format-1 store): readers must not
    require them.
    """
    try:
        axes_ = ome["multiscales"][0]["axes"]
        return tuple(
            a["orientation"]["value"] if isinstance(a.get("orientation"), Mapping) else None
            for a in axes_
        )
    except (KeyError, IndexError, TypeError, AttributeError):
        return ()
