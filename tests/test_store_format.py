"""The store is valid OME-Zarr 0.5, NIfTI-Zarr readable, checksummed, and laid out as documented."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel

import ctzarr

from .conftest import nifti_zyx


def _arrays(group: zarr.Group):
    for _, node in group.members(max_depth=None):
        if isinstance(node, zarr.Array):
            yield node


@pytest.mark.parametrize("store_fixture", ["dap_store", "saros_store"])
def test_every_case_is_a_valid_ome_zarr_image_with_labels(
    store_fixture: str, request: pytest.FixtureRequest
) -> None:
    store = request.getfixturevalue(store_fixture)
    col = ctzarr.open_collection(store)
    for cid in col.case_ids:
        grp = zarr.open_group(store / "cases" / cid, mode="r")
        image = Image.from_zarr(grp)
        levels = image.attributes.ome.multiscales[0].datasets
        assert [a.name for a in image.attributes.ome.multiscales[0].axes] == ["z", "y", "x"]
        # format 2: RFC-4 orientation of every axis, a translation at every level
        axes = grp.attrs["ome"]["multiscales"][0]["axes"]
        assert all(a["orientation"]["type"] == "anatomical" for a in axes)
        for ds in grp.attrs["ome"]["multiscales"][0]["datasets"]:
            kinds = [t["type"] for t in ds["coordinateTransformations"]]
            assert kinds == ["scale", "translation"]
        assert grp.attrs["ome"]["version"] == "0.5"
        assert grp["labels"].attrs["ome"]["version"] == "0.5"
        for seg in col.segmentations:
            label_grp = zarr.open_group(store / "cases" / cid / "labels" / seg, mode="r")
            label = ImageLabel.from_zarr(label_grp)
            assert len(label.attributes.ome.multiscales[0].datasets) == len(levels)
            ome = label_grp.attrs["ome"]
            assert ome["version"] == "0.5"
            assert ome["image-label"]["version"] == "0.5"
            props = {p["label-value"]: p for p in ome["image-label"]["properties"]}
            lm = col.segmentations[seg]
            assert set(props) == set(lm.values)
            for lab in lm:
                assert props[lab.value]["name"] == lab.name
                assert props[lab.value]["normalized_name"] == lab.normalized_name


def test_every_array_ends_its_codec_chain_with_crc32c(dap_store: Path) -> None:
    root = zarr.open_group(dap_store, mode="r")
    arrays = list(_arrays(root))
    assert len(arrays) > 10
    for arr in arrays:
        codecs = arr.metadata.to_dict()["codecs"]
        if codecs[0]["name"] == "sharding_indexed":
            cfg = codecs[0]["configuration"]
            assert cfg["codecs"][-1]["name"] == "crc32c", arr.path
            assert cfg["index_codecs"][-1]["name"] == "crc32c", arr.path
        else:
            assert codecs[-1]["name"] == "crc32c", arr.path


def test_nifti_header_array_reproduces_the_source_geometry(
    dap_source: Path, dap_store: Path
) -> None:
    col = ctzarr.open_collection(dap_store)
    for cid in col.case_ids:
        arr = zarr.open_array(dap_store / "cases" / cid / "nifti", mode="r")
        assert arr.shape == (348,)
        assert arr.dtype == np.uint8
        assert arr.chunks == (348,)
        hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(arr[:].tobytes()))
        src = nib.load(dap_source / "images" / f"{cid}.nii.gz").header
        np.testing.assert_array_equal(hdr.get_best_affine(), src.get_best_affine())
        assert hdr.get_data_dtype() == src.get_data_dtype()
        assert hdr["descrip"].item() == b""  # free text is not copied
        assert arr.metadata.dimension_names == ("nifti_byte",)
        # format 2: the label image group has the segmentation's own header, label dtype
        lab = zarr.open_array(dap_store / "cases" / cid / "labels" / "anatomy" / "nifti", mode="r")
        assert lab.metadata.dimension_names == ("nifti_byte",)
        lab_hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(lab[:].tobytes()))
        mask = nib.load(dap_source / "masks" / f"{cid}.nii.gz").header
        np.testing.assert_array_equal(lab_hdr.get_best_affine(), mask.get_best_affine())
        levels = zarr.open_array(dap_store / "cases" / cid / "labels" / "anatomy" / "0", mode="r")
        assert lab_hdr.get_data_dtype().newbyteorder("=") == levels.dtype
        assert lab_hdr.get_slope_inter() in ((1.0, 0.0), (None, None))


def test_nifti_zarr_reader_gets_the_image_back(dap_source: Path, dap_store: Path) -> None:
    niizarr = pytest.importorskip("niizarr")
    col = ctzarr.open_collection(dap_store)
    for cid in col.case_ids:
        img = niizarr.zarr2nii(str(dap_store / "cases" / cid))
        ref = nib.load(dap_source / "images" / f"{cid}.nii.gz")
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.asanyarray(ref.dataobj))
        np.testing.assert_array_equal(img.header.get_best_affine(), ref.affine)


def test_case_is_a_few_dozen_objects(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    files = [p for p in (dap_store / "cases" / col.case_ids[0]).rglob("*") if p.is_file()]
    assert len(files) <= 40


def test_collection_table_matches_case_indexes(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    table = col.table()
    for cid in col.case_ids:
        idx = col[cid].index("anatomy")
        rows = table[table.case_id == cid]
        np.testing.assert_array_equal(rows.label.to_numpy(), idx.labels)
        np.testing.assert_array_equal(rows.voxel_count.to_numpy(), idx.voxel_count)
        np.testing.assert_array_equal(
            rows[["z_start", "z_stop", "y_start", "y_stop", "x_start", "x_stop"]].to_numpy(),
            idx.bbox,
        )


def test_index_equals_numpy_on_phantom_cases(dap_source: Path, dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    for cid in col.case_ids:
        ct = nifti_zyx(dap_source / "images" / f"{cid}.nii.gz")
        mask = nifti_zyx(dap_source / "masks" / f"{cid}.nii.gz")
        idx = col[cid].index("anatomy")
        assert idx.labels.tolist() == sorted(set(np.unique(mask).tolist()) - {0})
        for i, label in enumerate(idx.labels.tolist()):
            m = mask == label
            values, counts = idx.histogram(label)
            np.testing.assert_array_equal(np.repeat(values, counts), np.sort(ct[m]))
            assert idx.voxel_count[i] == m.sum()


def test_case_attributes_record_the_source(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    meta = col[col.case_ids[0]].meta
    files = meta.source_files
    assert set(files) == {"image", "anatomy"}
    assert files["image"].path.startswith("images/")
    assert files["image"].sha256 is not None
    assert len(files["image"].sha256) == 64
    assert meta.complete is True
    json.dumps(meta.to_attributes())
