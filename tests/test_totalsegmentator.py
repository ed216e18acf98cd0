"""The totalsegmentator layout: one binary mask per structure, merged into label maps.

Every number is compared with numpy on nibabel's arrays: the merged label volume is built here
from the mask files as nibabel reads them, and statistics are recomputed from it.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import ctzarr
from ctzarr.errors import LayoutError
from ctzarr.model.labels import totalsegmentator_label_map
from ctzarr.sources.layouts import detect_layout, load_source
from ctzarr.sources.totalsegmentator import open_mask_stack, parse_meta_csv, task_of_mask
from ctzarr.testing.phantom import write_totalsegmentator

from .conftest import nifti_zyx

SHAPE = (24, 28, 26)


@pytest.fixture(scope="module")
def ts_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two cases (RAS and LPS), tasks total and tissue_types, an empty mask in each task."""
    root = tmp_path_factory.mktemp("ts") / "TotalSegmentator"
    write_totalsegmentator(
        root, n_cases=2, shape_zyx=SHAPE, seed=5, tasks=("total", "tissue_types")
    )
    return root


@pytest.fixture(scope="module")
def ts_store(ts_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("ts-store") / "ts.zarr"
    report = ctzarr.convert(ts_source, dest, progress=False)
    assert report.ok, report
    return dest


def merged(case_dir: Path, task: str) -> np.ndarray:
    """The label volume of a task, built from nibabel's masks: mask == 1 -> the class id."""
    lm = totalsegmentator_label_map(task)
    out = np.zeros(nifti_zyx(case_dir / "ct.nii.gz").shape, np.uint8)
    for f in sorted((case_dir / "segmentations").glob("*.nii.gz")):
        if task_of_mask(f.name) != task:
            continue
        mask = nifti_zyx(f)
        assert set(np.unique(mask).tolist()) <= {0, 1}
        assert not (out[mask == 1]).any()  # the phantom's masks are disjoint
        out[mask == 1] = lm.resolve(f.name[: -len(".nii.gz")]).value
    return out


def copy_source(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def save_like(path: Path, data_file_order: np.ndarray, like: Path) -> None:
    """Write data (NIfTI i, j, k order) with the header and affine of another file."""
    img = nib.load(str(like))
    hdr = img.header.copy()
    hdr.set_data_dtype(data_file_order.dtype)
    nib.Nifti1Image(data_file_order, img.affine, header=hdr).to_filename(str(path))


# -- discovery -------------------------------------------------------------------------------


def test_layout_is_detected(ts_source: Path) -> None:
    assert detect_layout(str(ts_source)) == "totalsegmentator"


def test_masks_are_assigned_to_tasks_by_name(ts_source: Path) -> None:
    ds = load_source(str(ts_source))
    assert ds.layout == "totalsegmentator"
    assert list(ds.label_maps) == ["total", "tissue_types"]
    assert ds.label_maps["total"].name == "totalsegmentator_total"
    case = ds.cases[0]
    assert case.case_id == "s0000"
    assert set(case.masks["tissue_types"]) == {
        "skeletal_muscle.nii.gz",
        "subcutaneous_fat.nii.gz",
        "torso_fat.nii.gz",
    }
    assert "liver.nii.gz" in case.masks["total"]
    assert not set(case.masks["total"]) & set(case.masks["tissue_types"])


def test_task_folders_hold_one_task(tmp_path: Path, ts_source: Path) -> None:
    """``segmentations_<task>/`` holds one task's masks (TotalSegmentator -ta TASK -o DIR)."""
    src = copy_source(ts_source, tmp_path / "ts")
    for case in ("s0000", "s0001"):
        folder = src / case / "segmentations_tissue_types"
        folder.mkdir()
        for name in ("skeletal_muscle", "subcutaneous_fat", "torso_fat"):
            (src / case / "segmentations" / f"{name}.nii.gz").rename(folder / f"{name}.nii.gz")
    ds = load_source(str(src))
    assert set(ds.cases[1].masks["tissue_types"]) == {
        "skeletal_muscle.nii.gz",
        "subcutaneous_fat.nii.gz",
        "torso_fat.nii.gz",
    }
    report = ctzarr.convert(src, tmp_path / "out.zarr", progress=False)
    assert report.ok, report
    case = ctzarr.open_collection(tmp_path / "out.zarr")["s0001"]
    np.testing.assert_array_equal(
        case.labels("tissue_types").values,
        _merged_from(folder, "tissue_types", nifti_zyx(src / "s0001" / "ct.nii.gz").shape),
    )


def _merged_from(folder: Path, task: str, shape: tuple[int, ...]) -> np.ndarray:
    lm = totalsegmentator_label_map(task)
    out = np.zeros(shape, np.uint8)
    for f in sorted(folder.glob("*.nii.gz")):
        out[nifti_zyx(f) == 1] = lm.resolve(f.name[: -len(".nii.gz")]).value
    return out


@pytest.mark.parametrize(
    ("stem", "task"),
    [
        ("liver", "total"),
        ("Kidney-Left", "total"),
        ("vertebrae L3", "total"),
        ("skeletal_muscle", "tissue_types"),
        ("body_trunc", "body"),
        ("livr", None),
    ],
    ids=["exact", "case-and-hyphen", "space", "tissue", "body", "unknown"],
)
def test_task_of_mask(stem: str, task: str | None) -> None:
    assert task_of_mask(f"{stem}.nii.gz") == task


# -- values ----------------------------------------------------------------------------------


def test_values_equal_nibabel(ts_source: Path, ts_store: Path) -> None:
    col = ctzarr.open_collection(ts_store)
    assert col.case_ids == ["s0000", "s0001"]
    assert list(col.segmentations) == ["total", "tissue_types"]
    affines = []
    for cid in col.case_ids:
        case = col[cid]
        ct = ts_source / cid / "ct.nii.gz"
        affines.append(nib.load(str(ct)).affine)
        np.testing.assert_array_equal(case.image.values, nifti_zyx(ct))
        for task in ("total", "tissue_types"):
            expected = merged(ts_source / cid, task)
            labels = case.labels(task)
            assert labels.dtype == np.uint8
            np.testing.assert_array_equal(labels.values, expected)
    assert affines[1][0, 0] < 0 < affines[0][0, 0]  # an LPS case and an RAS case


def test_index_equals_numpy(ts_source: Path, ts_store: Path) -> None:
    col = ctzarr.open_collection(ts_store)
    for cid in col.case_ids:
        case = col[cid]
        ct = nifti_zyx(ts_source / cid / "ct.nii.gz")
        spacing = np.prod(nib.load(str(ts_source / cid / "ct.nii.gz")).header.get_zooms())
        for task in ("total", "tissue_types"):
            expected = merged(ts_source / cid, task)
            stats = case.stats(segmentation=task)
            present = sorted(set(np.unique(expected).tolist()) - {0})
            assert stats.label.tolist() == present
            for row in stats.itertuples():
                sel = expected == row.label
                values = ct[sel]
                assert row.voxel_count == int(sel.sum())
                assert row.volume_ml == pytest.approx(sel.sum() * spacing / 1000, rel=1e-12)
                assert row.hu_mean == pytest.approx(values.mean(), rel=1e-12)
                assert row.hu_median == np.percentile(values, 50)
                assert row.hu_p95 == np.percentile(values, 95)
                assert (row.hu_min, row.hu_max) == (values.min(), values.max())
                z, _y, x = np.nonzero(sel)
                assert (row.z_start, row.z_stop) == (z.min(), z.max() + 1)
                assert (row.x_start, row.x_stop) == (x.min(), x.max() + 1)


def test_index_equals_scan(ts_store: Path) -> None:
    col = ctzarr.open_collection(ts_store)
    for task in ("total", "tissue_types"):
        index = col.stats(segmentation=task)
        scan = col.stats(segmentation=task, method="scan")
        pd.testing.assert_frame_equal(index, scan)


def test_empty_mask_is_an_absent_structure(ts_source: Path, ts_store: Path) -> None:
    empty = [
        f.name[: -len(".nii.gz")]
        for f in (ts_source / "s0000" / "segmentations").glob("*.nii.gz")
        if not nifti_zyx(f).any()
    ]
    assert "torso_fat" in empty
    assert len(empty) >= 2
    case = ctzarr.open_collection(ts_store)["s0000"]
    for name in empty:
        task = task_of_mask(f"{name}.nii.gz")
        assert task is not None
        label = totalsegmentator_label_map(task).resolve(name).value
        assert label not in case.index(task).labels.tolist()
        row = case.stats([name], segmentation=task).iloc[0]
        assert row.voxel_count == 0
        assert np.isnan(row.hu_mean)


def test_names_match_totalsegmentator_spellings(ts_store: Path) -> None:
    col = ctzarr.open_collection(ts_store)
    stats = col.stats(structures=["kidney left", "Urinary-Bladder"], segmentation="total")
    assert stats.structure.unique().tolist() == ["kidney_left", "urinary_bladder"]
    with pytest.raises(ctzarr.StructureNotFoundError, match="kidney_left"):
        col.stats(structures=["kidny_left"], segmentation="total")


# -- meta.csv --------------------------------------------------------------------------------


def test_meta_csv_fields_are_case_attributes(ts_source: Path, ts_store: Path) -> None:
    rows = (ts_source / "meta.csv").read_text().splitlines()
    assert rows[0] == "image_id;age;gender;institute;study_type;split"
    expected = {
        r.split(";")[0]: dict(zip(rows[0].split(";")[1:], r.split(";")[1:], strict=True))
        for r in rows[1:]
    }
    col = ctzarr.open_collection(ts_store)
    for cid in col.case_ids:
        assert col[cid].attributes == expected[cid]


@pytest.mark.parametrize("delimiter", [";", ","], ids=["semicolon", "comma"])
def test_meta_csv_delimiters(tmp_path: Path, delimiter: str) -> None:
    root = tmp_path / "ts"
    write_totalsegmentator(root, n_cases=2, shape_zyx=(8, 12, 10), seed=1, meta_delimiter=delimiter)
    text = (root / "meta.csv").read_text()
    assert text.splitlines()[0] == delimiter.join(
        ("image_id", "age", "gender", "institute", "study_type", "split")
    )
    report = ctzarr.convert(root, tmp_path / "out.zarr", progress=False)
    assert report.ok, report
    case = ctzarr.open_collection(tmp_path / "out.zarr")["s0001"]
    line = text.splitlines()[2].split(delimiter)
    assert case.attributes == {
        "age": line[1],
        "gender": line[2],
        "institute": line[3],
        "study_type": line[4],
        "split": line[5],
    }


def test_parse_meta_csv() -> None:
    text = "\ufeffimage_id;age;gender;split\ns0001;63;m;train\n\ns0002; 41 ;f;test\n"
    assert parse_meta_csv(text, "meta.csv") == {
        "s0001": {"age": "63", "gender": "m", "split": "train"},
        "s0002": {"age": "41", "gender": "f", "split": "test"},
    }
    with pytest.raises(LayoutError, match=r"meta\.csv: no 'image_id' column"):
        parse_meta_csv("id,age\ns1,3\n", "meta.csv")
    with pytest.raises(LayoutError, match="duplicate image_id 's1'"):
        parse_meta_csv("image_id,age\ns1,3\ns1,4\n", "meta.csv")


# -- bad input: the case fails alone ---------------------------------------------------------


def _fails_alone(src: Path, dest: Path, bad: str) -> str:
    report = ctzarr.convert(src, dest, progress=False)
    assert [r.case_id for r in report.failed] == [bad], report
    assert report.converted == sorted({"s0000", "s0001"} - {bad})
    col = ctzarr.open_collection(dest)
    assert col.case_ids == report.converted
    error = report.failed[0].error
    assert error is not None
    return error


def test_mask_with_other_values_fails_its_case(tmp_path: Path, ts_source: Path) -> None:
    src = copy_source(ts_source, tmp_path / "ts")
    liver = src / "s0001" / "segmentations" / "liver.nii.gz"
    data = np.asanyarray(nib.load(str(liver)).dataobj).copy()
    data[data == 1] = 2
    data[0, 0, 3] = 7
    save_like(liver, data, liver)
    error = _fails_alone(src, tmp_path / "out.zarr", "s0001")
    assert "s0001" in error
    assert "liver.nii.gz" in error
    # the first slices holding such values are named (reading stops there)
    assert "values other than 0 and 1: [7] in 1 voxels of slices 0..7" in error
    assert "first at voxel (z, y, x) = (3, 0, 0)" in error


def test_float_mask_with_fractions_fails_its_case(tmp_path: Path, ts_source: Path) -> None:
    src = copy_source(ts_source, tmp_path / "ts")
    spleen = src / "s0000" / "segmentations" / "spleen.nii.gz"
    data = np.asanyarray(nib.load(str(spleen)).dataobj).astype(np.float32)
    data[data == 1] = 0.5
    save_like(spleen, data, spleen)
    error = _fails_alone(src, tmp_path / "out.zarr", "s0000")
    assert "spleen.nii.gz" in error
    assert "[0.5]" in error


def test_float_binary_mask_is_accepted(tmp_path: Path, ts_source: Path) -> None:
    src = copy_source(ts_source, tmp_path / "ts")
    spleen = src / "s0000" / "segmentations" / "spleen.nii.gz"
    save_like(spleen, np.asanyarray(nib.load(str(spleen)).dataobj).astype(np.float32), spleen)
    report = ctzarr.convert(src, tmp_path / "out.zarr", progress=False)
    assert report.ok, report
    case = ctzarr.open_collection(tmp_path / "out.zarr")["s0000"]
    np.testing.assert_array_equal(case.labels("total").values, merged(src / "s0000", "total"))


@pytest.mark.parametrize("fault", ["shape", "affine"])
def test_mask_on_another_grid_fails_its_case(tmp_path: Path, ts_source: Path, fault: str) -> None:
    src = copy_source(ts_source, tmp_path / "ts")
    liver = src / "s0000" / "segmentations" / "liver.nii.gz"
    img = nib.load(str(liver))
    data = np.asanyarray(img.dataobj)
    if fault == "shape":
        nib.Nifti1Image(data[:, :, :-1], img.affine, header=img.header).to_filename(str(liver))
    else:
        affine = img.affine.copy()
        affine[2, 3] += 3.0
        nib.Nifti1Image(data, affine).to_filename(str(liver))
    error = _fails_alone(src, tmp_path / "out.zarr", "s0000")
    assert "s0000" in error
    assert "liver.nii.gz" in error
    assert ("shape (z, y, x)" if fault == "shape" else "affine differs") in error


def test_unknown_mask_name_fails_its_case(tmp_path: Path, ts_source: Path) -> None:
    src = copy_source(ts_source, tmp_path / "ts")
    seg = src / "s0001" / "segmentations"
    (seg / "liver.nii.gz").rename(seg / "livr.nii.gz")
    error = _fails_alone(src, tmp_path / "out.zarr", "s0001")
    assert "s0001" in error
    assert "'livr.nii.gz'" in error
    assert "closest known names: liver" in error


def test_overlapping_masks_fail_their_case(tmp_path: Path, ts_source: Path) -> None:
    src = copy_source(ts_source, tmp_path / "ts")
    seg = src / "s0000" / "segmentations"
    liver = np.asanyarray(nib.load(str(seg / "liver.nii.gz")).dataobj)
    spleen = np.asanyarray(nib.load(str(seg / "spleen.nii.gz")).dataobj).copy()
    claimed = np.argwhere(liver == 1)[:5]
    spleen[tuple(claimed.T)] = 1
    save_like(seg / "spleen.nii.gz", spleen, seg / "spleen.nii.gz")
    error = _fails_alone(src, tmp_path / "out.zarr", "s0000")
    assert "s0000" in error
    assert "spleen.nii.gz (spleen) and liver.nii.gz (liver) both claim 5 voxels" in error


def test_truncated_mask_fails_its_case(tmp_path: Path, ts_source: Path) -> None:
    src = copy_source(ts_source, tmp_path / "ts")
    liver = src / "s0001" / "segmentations" / "liver.nii.gz"
    raw = gzip.decompress(liver.read_bytes())
    liver.write_bytes(gzip.compress(raw[: len(raw) - 600]))
    error = _fails_alone(src, tmp_path / "out.zarr", "s0001")
    assert "liver.nii.gz" in error
    assert "s0001" in error


def test_corrupt_gzip_trailer_fails_its_case(tmp_path: Path, ts_source: Path) -> None:
    src = copy_source(ts_source, tmp_path / "ts")
    liver = src / "s0001" / "segmentations" / "liver.nii.gz"
    data = bytearray(liver.read_bytes())
    data[-6] ^= 0xFF  # the CRC32 of the trailer
    liver.write_bytes(bytes(data))
    error = _fails_alone(src, tmp_path / "out.zarr", "s0001")
    assert "liver.nii.gz" in error
    assert "corrupt compressed stream" in error


def test_masks_without_ct_are_a_layout_error(tmp_path: Path, ts_source: Path) -> None:
    src = copy_source(ts_source, tmp_path / "ts")
    (src / "s0001" / "ct.nii.gz").unlink()
    with pytest.raises(LayoutError, match=r"case .s0001. has masks but no ct\.nii\.gz"):
        load_source(str(src))


# -- resume ----------------------------------------------------------------------------------


def test_source_digest_covers_every_mask(tmp_path: Path, ts_source: Path) -> None:
    src = copy_source(ts_source, tmp_path / "ts")
    dest = tmp_path / "out.zarr"
    assert ctzarr.convert(src, dest, progress=False).ok
    case = ctzarr.open_collection(dest)["s0000"]
    masks = sorted((src / "s0000" / "segmentations").glob("*.nii.gz"))
    roles = {r for r in case.meta.source_files if r != "image"}
    assert len(roles) == len(masks)
    assert all(case.meta.source_files[r].sha256 for r in roles)
    again = ctzarr.convert(src, dest, progress=False)
    assert again.skipped == ["s0000", "s0001"]

    # a changed mask (same size, new content) makes the case differ from the store
    kidney = src / "s0000" / "segmentations" / "kidney_left.nii.gz"
    data = np.asanyarray(nib.load(str(kidney)).dataobj).copy()
    data[data == 1] = 0
    save_like(kidney, data, kidney)
    changed = ctzarr.convert(src, dest, progress=False)
    assert [r.case_id for r in changed.failed] == ["s0000"]
    assert "different source files" in (changed.failed[0].error or "")
    replaced = ctzarr.convert(src, dest, overwrite=True, progress=False)
    assert replaced.converted == ["s0000"]
    case = ctzarr.open_collection(dest)["s0000"]
    np.testing.assert_array_equal(case.labels("total").values, merged(src / "s0000", "total"))
    assert totalsegmentator_label_map("total").resolve("kidney_left").value not in (
        case.index("total").labels.tolist()
    )


def test_own_label_map_for_other_per_structure_datasets(tmp_path: Path, ts_source: Path) -> None:
    """AbdomenAtlas-style names (``postcava``) with a label map given for ``total``."""
    src = copy_source(ts_source, tmp_path / "ts")
    for case in ("s0000", "s0001"):
        seg = src / case / "segmentations"
        (seg / "inferior_vena_cava.nii.gz").rename(seg / "postcava.nii.gz")
    table = {lab.value: lab.name for lab in totalsegmentator_label_map("total")}
    table[200] = "postcava"
    labels = tmp_path / "atlas.json"
    labels.write_text(json.dumps({str(k): v for k, v in table.items()}))
    report = ctzarr.convert(src, tmp_path / "out.zarr", labels=[f"total={labels}"], progress=False)
    assert report.ok, report
    case = ctzarr.open_collection(tmp_path / "out.zarr")["s0000"]
    ivc = nifti_zyx(src / "s0000" / "segmentations" / "postcava.nii.gz") == 1
    assert ivc.any()
    np.testing.assert_array_equal(case.labels("total").values == 200, ivc)
    assert case.stats(["postcava"], segmentation="total").voxel_count.tolist() == [ivc.sum()]


def test_merge_holds_one_mask_slab_at_a_time(tmp_path: Path) -> None:
    """117 masks are merged slab by slab: never held at once (they total 60 MB here)."""
    write_totalsegmentator(
        tmp_path / "ts", n_cases=1, shape_zyx=(32, 128, 128), all_structures=True, seed=2
    )
    folder = tmp_path / "ts" / "s0000" / "segmentations"
    files = {f.name: str(f) for f in folder.glob("*.nii.gz")}
    assert len(files) == 117
    stack = open_mask_stack("s0000", "total", totalsegmentator_label_map("total"), files)
    expected = merged(tmp_path / "ts" / "s0000", "total")
    for _ in stack.iter_slabs(32):  # first, untraced: numba's import and the kernel's loading
        pass
    tracemalloc.start()
    try:
        for z0, slab in stack.iter_slabs(8):
            np.testing.assert_array_equal(slab, expected[z0 : z0 + 8])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the open streams (~160 KB each: a 64 KB input buffer and the inflate state) and a few
    # 128 KB slabs, far below the 117 x 512 KB of the masks
    assert peak < 25e6
    assert set(stack.file_digests) == {f"total/{name}" for name in files}


def test_meta_csv_fields_are_table_columns(ts_source: Path, ts_store: Path) -> None:
    col = ctzarr.open_collection(ts_store)
    table = col.table()
    for cid in col.case_ids:
        rows = table[table.case_id == cid]
        for key, value in col[cid].attributes.items():
            assert rows[key].unique().tolist() == [value]
    stats = col.stats(structures=["liver"])  # statistics columns only
    assert "age" not in stats.columns
    assert "split" not in stats.columns
    assert {"age", "gender", "split"} <= set(table.columns)
