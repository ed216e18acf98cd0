"""Export to NIfTI: a whole case (image with its original header, each segmentation), or a crop.

The image gets the original header (geometry, datatype, byte order and scaling), so nibabel reads
the same values and affine as from the source; each segmentation gets its own stored header
(format 2: its source file's geometry with the stored integer dtype; a format-1 case has none
and gets the image's), crops the image's geometry shifted to their box.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from ctzarr.sources.nifti import header_from_bytes

if TYPE_CHECKING:
    from ctzarr.read.case import Case


def crop_to_nifti(
    case: Case,
    structure: str | int,
    out_path: str | os.PathLike[str],
    margin_mm: float = 0.0,
    segmentation: str | None = None,
) -> dict[str, Path]:
    """Write a structure crop as ``.nii.gz``: the image to ``out_path``, the labels beside it.

    Both carry the crop's affine (qform and sform, codes of the source), so they overlay the
    original image in any viewer.

    Parameters
    ----------
    case : Case
        The case to crop.
    structure : str or int
        Structure name or label id.
    out_path : str or path
        The image file (``.nii.gz``); the labels go to ``<name>_labels.nii.gz`` beside it.
    margin_mm : float
        Margin around the structure's bounding box, millimetres.
    segmentation : str, optional
        The segmentation holding the structure (default: the one that has it).

    Returns
    -------
    dict
        ``{"image": path, "labels": path}``.
    """
    crop = case.crop(structure, margin_mm, segmentation, lazy=False)  # values now: the fast path
    out = Path(out_path)
    # the labels file takes the image's extension: x.nii -> x_labels.nii, x.nii.gz -> x_labels.nii.gz
    ext = ".nii.gz" if out.name.endswith(".nii.gz") else out.suffix
    labels_path = out.with_name(f"{out.name[: -len(ext)] if ext else out.name}_labels{ext}")
    hdr = header_from_bytes(case.nifti_header_bytes)
    qcode, scode = int(hdr["qform_code"]) or 1, int(hdr["sform_code"]) or 1
    affine = crop.attrs["affine"]
    written = {}
    for role, data, path in (("image", crop.image, out), ("labels", crop.labels, labels_path)):
        values = np.asarray(data.values).transpose(2, 1, 0)
        klass: type[nib.Nifti1Image] = (
            nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
        )
        img = klass(values, affine)
        img.header.set_xyzt_units(*hdr.get_xyzt_units())
        img.set_qform(affine, code=qcode)
        img.set_sform(affine, code=scode)
        path.parent.mkdir(parents=True, exist_ok=True)
        img.to_filename(path)
        written[role] = path
    return written


def case_to_nifti(case: Case, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the image and each segmentation of a case back to ``.nii.gz`` files.

    The image is streamed shard by shard behind the original header bytes (never the whole
    volume in memory); segmentations are written with nibabel.

    Parameters
    ----------
    case : Case
        The case to export.
    out_dir : str or path
        Directory for ``<case_id>_image.nii.gz`` and ``<case_id>_<segmentation>.nii.gz``.

    Returns
    -------
    dict
        Paths written, by role (``"image"`` and each segmentation name).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hdr_bytes = case.nifti_header_bytes
    hdr = header_from_bytes(hdr_bytes)
    disk_dtype: np.dtype[Any] = hdr.get_data_dtype()
    written = {}
    path = out / f"{case.case_id}_image.nii.gz"
    arr = case.array("0")
    step = arr.shards[0] if arr.shards else arr.chunks[0]
    tmp = path.with_suffix(".tmp")
    with gzip.open(tmp, "wb", compresslevel=1) as f:
        f.write(hdr_bytes)
        f.write(b"\x00\x00\x00\x00")  # no extensions
        for z0 in range(0, arr.shape[0], step):
            f.write(
                np.ascontiguousarray(arr[z0 : z0 + step]).astype(disk_dtype, copy=False).tobytes()
            )
    tmp.replace(path)
    written["image"] = path
    for name in case.segmentation_names:
        lab = case.array(f"labels/{name}/0")
        stored = case.segmentation_header_bytes(name)
        if stored is not None:
            seg_hdr = header_from_bytes(stored)
        else:  # format 1: the image's header, with the label dtype and no scaling
            seg_hdr = hdr.copy()
            seg_hdr.set_data_dtype(lab.dtype)
            seg_hdr.set_slope_inter(1.0, 0.0)
        klass: type[nib.Nifti1Image] = (
            nib.Nifti2Image if isinstance(seg_hdr, nib.Nifti2Header) else nib.Nifti1Image
        )
        img = klass(np.asarray(lab[:]).transpose(2, 1, 0), None, header=seg_hdr)
        p = out / f"{case.case_id}_{name}.nii.gz"
        img.to_filename(p)
        written[name] = p
    return written
