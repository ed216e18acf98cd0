"""Each dataset layout converts, is detected, and reads back equal to nibabel."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

import ctzarr
from ctzarr.sources.layouts import detect_layout, load_source

from .conftest import nifti_zyx, write_pairs


@pytest.mark.parametrize(
    ("fixture", "layout"), [("dap_source", "dap_atlas"), ("saros_source", "saros")]
)
def test_layout_is_detected(fixture: str, layout: str, request: pytest.FixtureRequest) -> None:
    assert detect_layout(str(request.getfixturevalue(fixture))) == layout


def test_unknown_layout_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ctzarr.LayoutError, match="no known layout"):
        detect_layout(str(tmp_path))


def test_dap_atlas_round_trip(dap_source: Path, dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    names = sorted(p.name[: -len(".nii.gz")] for p in (dap_source / "images").iterdir())
    assert col.case_ids == names
    assert list(col.segmentations) == ["anatomy"]
    assert 11 not in col.segmentations["anatomy"]
    for cid in names:
        case = col[cid]
        img = nib.load(dap_source / "images" / f"{cid}.nii.gz")
        np.testing.assert_array_equal(
            case.image.values, nifti_zyx(dap_source / "images" / f"{cid}.nii.gz")
        )
        assert case.image.dtype == np.asanyarray(img.dataobj).dtype.newbyteorder("=")
        np.testing.assert_array_equal(
            case.labels("anatomy").values, nifti_zyx(dap_source / "masks" / f"{cid}.nii.gz")
        )
        np.testing.assert_allclose(case.image.attrs["affine"], img.affine, rtol=0, atol=0)
        assert case.image.dims == ("z", "y", "x")


def test_dap_atlas_quirks_are_present(dap_source: Path) -> None:
    """The phantom really carries the quirks the converter must survive."""
    headers = [nib.load(p).header for p in sorted((dap_source / "images").iterdir())]
    assert {h.endianness for h in headers} == {"<", ">"}
    affines = [nib.load(p).affine for p in sorted((dap_source / "images").iterdir())]
    assert any(a[0, 0] < 0 and a[1, 1] < 0 for a in affines)
    assert any(a[0, 0] > 0 for a in affines)


def test_dap_atlas_without_labels_json_uses_builtin_table(dap_source: Path, tmp_path: Path) -> None:
    src = tmp_path / "dap"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    first = sorted((dap_source / "images").iterdir())[0]
    (src / "images" / first.name).write_bytes(first.read_bytes())
    (src / "masks" / first.name).write_bytes((dap_source / "masks" / first.name).read_bytes())
    ds = load_source(str(src))
    assert ds.label_maps["anatomy"].name == "dap_atlas"
    assert len(ds.label_maps["anatomy"]) == 144
    report = ctzarr.convert(src, tmp_path / "out.zarr", progress=False)
    assert report.ok, report


def test_saros_round_trip_keeps_ignore_slices(saros_source: Path, saros_store: Path) -> None:
    col = ctzarr.open_collection(saros_store)
    assert col.case_ids == ["case_000", "case_001"]
    assert set(col.segmentations) == {"body_regions", "body_parts"}
    for cid in col.case_ids:
        case = col[cid]
        np.testing.assert_array_equal(
            case.image.values, nifti_zyx(saros_source / cid / "image.nii.gz")
        )
        for seg, fn in (
            ("body_regions", "body-regions.nii.gz"),
            ("body_parts", "body-parts.nii.gz"),
        ):
            ref = nifti_zyx(saros_source / cid / fn)
            np.testing.assert_array_equal(case.labels(seg).values, ref)
            annotated = np.nonzero(np.all(ref != 255, axis=(1, 2)))[0]
            idx = case.index(seg)
            assert idx.annotated_slices is not None
            np.testing.assert_array_equal(idx.annotated_slices, annotated)
            assert 255 not in idx.labels
            assert case.labels(seg).attrs["ignore_value"] == 255


def test_saros_case_csv_becomes_case_attributes(saros_source: Path, saros_store: Path) -> None:
    with open(saros_source / "Segmentation-Info.csv") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    col = ctzarr.open_collection(saros_store)
    for cid in col.case_ids:
        attrs = col[cid].attributes
        assert attrs["split"] == rows[cid]["split"]
        assert attrs["tcia_collection"] == rows[cid]["tcia_collection"]


def test_pairs_manifest_with_label_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(2):
        ct = rng.integers(-1000, 1000, size=(9, 7, 5)).astype(np.int16)
        mask = rng.integers(0, 4, size=ct.shape).astype(np.uint8)
        cases[f"p{i}"] = (ct, mask, np.diag([0.7, 0.7, 1.5, 1.0]))
    manifest, labels = write_pairs(tmp_path / "src", cases)
    assert detect_layout(str(tmp_path / "src")) == "pairs"
    report = ctzarr.convert(manifest, tmp_path / "p.zarr", labels=[f"seg={labels}"], progress=False)
    assert report.ok, report
    col = ctzarr.open_collection(tmp_path / "p.zarr")
    assert col.segmentations["seg"]["b" if False else 2].name == "b"
    for cid, (ct, mask, _) in cases.items():
        np.testing.assert_array_equal(col[cid].image.values, ct)
        np.testing.assert_array_equal(col[cid].labels("seg").values, mask)


def test_pairs_without_label_map_is_an_error(tmp_path: Path) -> None:
    ct = np.zeros((3, 3, 3), np.int16)
    manifest, _ = write_pairs(tmp_path / "src", {"a": (ct, ct.astype(np.uint8), np.eye(4))})
    with pytest.raises(ctzarr.LayoutError, match="needs a label map"):
        ctzarr.convert(manifest, tmp_path / "p.zarr", progress=False)


def test_multi_slab_volume_round_trip(tmp_path: Path) -> None:
    """Volumes taller than one 64-slice slab, with a pyramid, odd sizes and every label."""
    rng = np.random.default_rng(5)
    ct = rng.integers(-1024, 3071, size=(150, 70, 67)).astype(np.int16)
    mask = (rng.integers(0, 4, size=ct.shape)).astype(np.uint8)
    manifest, labels = write_pairs(
        tmp_path / "src", {"tall": (ct, mask, np.diag([-0.9, -0.9, 2.0, 1.0]))}
    )
    report = ctzarr.convert(manifest, tmp_path / "t.zarr", labels=[str(labels)], progress=False)
    assert report.ok, report
    case = ctzarr.open_collection(tmp_path / "t.zarr")["tall"]
    np.testing.assert_array_equal(case.image.values, ct)
    np.testing.assert_array_equal(case.labels("seg").values, mask)
    assert case.levels == 3
    np.testing.assert_array_equal(case.labels("seg", level=1).values, mask[::2, ::2, ::2])
    lvl1 = case.image_at(1).values
    assert lvl1.shape == (75, 35, 34)
    np.testing.assert_array_equal(lvl1[0, 0, 0], np.rint(ct[:2, :2, :2].mean()).astype(np.int16))
    arr = zarr.open_array(tmp_path / "t.zarr" / "cases" / "tall" / "0", mode="r")
    assert arr.shards == (64, 128, 128)
    assert arr.chunks == (64, 64, 64)
