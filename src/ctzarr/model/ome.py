"""OME-Zarr 0.5 metadata blocks of a case: multiscales of the image, image-label of a segmentation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ctzarr.errors import MetadataError
from ctzarr.model.labels import LabelMap

OME_VERSION = "0.5"


def multiscales(
    name: str, spacing_zyx: tuple[float, float, float], levels: list[tuple[int, int, int]]
) -> dict[str, Any]:
    """OME 0.5 multiscales block: axes z, y, x in millimetres, one scale (+ shift) per level.

    OME 0.5 cannot express flips or rotations, so the OME transform maps voxels to a scaled
    voxel space (origin at voxel 0 of level 0); the NIfTI affine is kept in ``ctzarr.affine``
    and in the ``nifti`` header array.
    """
    datasets = []
    for i, _ in enumerate(levels):
        f = 2**i
        scale = [s * f for s in spacing_zyx]
        shift = [s * (f - 1) / 2 for s in spacing_zyx]
        transforms: list[dict[str, Any]] = [{"type": "scale", "scale": scale}]
        if i:
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    return {
        "name": name,
        "axes": [{"name": a, "type": "space", "unit": "millimeter"} for a in ("z", "y", "x")],
        "datasets": datasets,
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
    name: str, spacing_zyx: tuple[float, float, float], levels: Sequence[tuple[int, int, int]]
) -> dict[str, Any]:
    """The ``ome`` block of a case group: OME version and the image's multiscales."""
    return {"version": OME_VERSION, "multiscales": [multiscales(name, spacing_zyx, list(levels))]}


def label_image_attributes(
    name: str,
    spacing_zyx: tuple[float, float, float],
    levels: Sequence[tuple[int, int, int]],
    label_map: LabelMap,
) -> dict[str, Any]:
    """The ``ome`` block of a segmentation's label image group."""
    return {
        "version": OME_VERSION,
        "multiscales": [multiscales(name, spacing_zyx, list(levels))],
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
