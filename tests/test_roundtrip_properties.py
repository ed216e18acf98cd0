"""Hypothesis round trips: random small volumes, dtypes, scalings, affines, byte orders."""

from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctzarr
from ctzarr.testing.strategies import chunk_shapes, shapes_zyx, volumes
from ctzarr.write.index_builder import LabelIndexBuilder

from .conftest import nifti_zyx


def _write(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray,
    endian: str,
    version: int,
    slope_inter: tuple | None,
) -> None:
    klass, hklass = (
        (nib.Nifti1Image, nib.Nifti1Header) if version == 1 else (nib.Nifti2Image, nib.Nifti2Header)
    )
    hdr = hklass(endianness=endian)
    hdr.set_data_dtype(data.dtype)
    img = klass(data.transpose(2, 1, 0), affine, header=hdr)
    if slope_inter is not None:
        img.header.set_slope_inter(*slope_inter)
    img.to_filename(path)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vol=volumes())
def test_convert_read_back_equals_nibabel(vol: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        root.mkdir()
        _write(
            root / "c_ct.nii.gz",
            vol["data"],
            vol["affine"],
            vol["endian"],
            vol["version"],
            vol["slope_inter"],
        )
        _write(root / "c_seg.nii.gz", vol["mask"], vol["affine"], "<", 1, None)
        (root / "manifest.csv").write_text("case_id,image,seg\nc,c_ct.nii.gz,c_seg.nii.gz\n")
        (root / "labels.json").write_text('{"0": "background", "1": "a", "2": "b", "3": "c"}')
        report = ctzarr.convert(
            root, Path(tmp) / "s.zarr", labels=[str(root / "labels.json")], progress=False
        )
        assert report.ok, report
        case = ctzarr.open_collection(Path(tmp) / "s.zarr")["c"]
        ref_img = nib.load(root / "c_ct.nii.gz")
        ref = nifti_zyx(root / "c_ct.nii.gz")
        got = case.image.values
        assert got.dtype == ref.dtype.newbyteorder("=")
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(case.affine, ref_img.affine)
        np.testing.assert_array_equal(case.labels("seg").values, vol["mask"])
        # export gives the same values and affine back
        out = case.to_nifti(Path(tmp) / "export")
        back = nib.load(out["image"])
        np.testing.assert_array_equal(np.asanyarray(back.dataobj).transpose(2, 1, 0), ref)
        np.testing.assert_array_equal(back.affine, ref_img.affine)
        assert back.header.endianness == ref_img.header.endianness
        np.testing.assert_array_equal(nifti_zyx(out["seg"]), vol["mask"])
        # a segmentation exports with its own header (format 2): the segmentation file's affine,
        # which may be float32-rounded where the image's is not (a NIfTI-1 mask beside a NIfTI-2
        # CT)
        seg_affine = nib.load(root / "c_seg.nii.gz").affine
        np.testing.assert_allclose(nib.load(out["seg"]).affine, seg_affine, rtol=0, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    shape=shapes_zyx((12, 9, 9)),
    chunk=chunk_shapes(5),
    slab=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    ignore=st.booleans(),
)
def test_index_equals_numpy(shape: tuple, chunk: tuple, slab: int, seed: int, ignore: bool) -> None:
    """Slab-streamed index == an independent numpy computation, for any slab and chunk size."""
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 5, size=shape).astype(np.uint8)
    if ignore:
        lab[::3] = 255
    val = rng.integers(-2000, 32000, size=shape).astype(np.int16)
    b = LabelIndexBuilder(range(5), shape, chunk, ignore_value=255 if ignore else None)
    for z0 in range(0, shape[0], slab):
        b.update(z0, lab[z0 : z0 + slab], val[z0 : z0 + slab])
    idx = b.finish(sparse_annotation=ignore)
    expected_labels = sorted(set(np.unique(lab).tolist()) - {0, 255})
    assert idx.labels.tolist() == expected_labels
    for i, label in enumerate(expected_labels):
        m = lab == label
        zz, yy, xx = np.nonzero(m)
        assert idx.voxel_count[i] == m.sum()
        assert idx.bbox[i].tolist() == [
            zz.min(),
            zz.max() + 1,
            yy.min(),
            yy.max() + 1,
            xx.min(),
            xx.max() + 1,
        ]
        assert idx.coord_sum[i].tolist() == [zz.sum(), yy.sum(), xx.sum()]
        values, counts = idx.histogram(label)
        np.testing.assert_array_equal(np.repeat(values, counts), np.sort(val[m]))
        grid = idx.chunk_grid
        expected_chunks = np.unique(
            np.ravel_multi_index((zz // chunk[0], yy // chunk[1], xx // chunk[2]), grid)
        )
        np.testing.assert_array_equal(np.sort(idx.chunk_ids[i]), expected_chunks)
    if ignore:
        np.testing.assert_array_equal(
            idx.annotated_slices, np.nonzero(np.all(lab != 255, axis=(1, 2)))[0]
        )
