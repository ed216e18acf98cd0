"""Body-composition queries equal numpy on nibabel's arrays: ``within`` statistics, axial
profiles and one-slice statistics; index == scan exactly; cohort forms; a format-2 store
answers profiles by scan."""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import ctzarr
from ctzarr.errors import SegmentationNotFoundError, StructureNotFoundError
from ctzarr.model.labels import builtin_label_map
from ctzarr.model.table import PROFILE_COLUMNS, SLICE_COLUMNS, WITHIN_COLUMNS
from ctzarr.testing.phantom import write_totalsegmentator

from .conftest import nifti_zyx, write_pairs
from .test_stats_and_crops import numpy_stats

GOLDEN_2 = Path(__file__).parent / "golden" / "format-2"


# -- numpy references -------------------------------------------------------------------------
def saros_arrays(source: Path, cid: str) -> dict[str, np.ndarray]:
    folder = source / cid
    return {
        "image": nifti_zyx(folder / "image.nii.gz"),
        "body_regions": nifti_zyx(folder / "body-regions.nii.gz"),
        "body_parts": nifti_zyx(folder / "body-parts.nii.gz"),
        "affine": nib.load(folder / "image.nii.gz").affine,
    }


def dap_arrays(source: Path, cid: str) -> dict[str, np.ndarray]:
    return {
        "image": nifti_zyx(source / "images" / f"{cid}.nii.gz"),
        "anatomy": nifti_zyx(source / "masks" / f"{cid}.nii.gz"),
        "affine": nib.load(source / "images" / f"{cid}.nii.gz").affine,
    }


def pixel_area(affine: np.ndarray) -> float:
    """In-plane voxel area from the affine's column lengths (the stores' affines are not
    sheared)."""
    return float(np.linalg.norm(affine[:3, 0]) * np.linalg.norm(affine[:3, 1]))


def numpy_profile(ct: np.ndarray, lab: np.ndarray, label: int, affine: np.ndarray) -> pd.DataFrame:
    """Per-slice count, world z of the slice centre, area and mean of one label."""
    m = lab == label
    counts = m.sum(axis=(1, 2))
    z = np.flatnonzero(counts)
    sums = np.array([int(ct[k][m[k]].astype(np.int64).sum()) for k in z], np.int64)
    ny, nx = lab.shape[1:]
    z_mm = [float((affine @ np.array([(nx - 1) / 2, (ny - 1) / 2, k, 1.0]))[2]) for k in z]
    return pd.DataFrame(
        {
            "z": z,
            "z_mm": z_mm,
            "voxel_count": counts[z],
            "area_mm2": counts[z] * pixel_area(affine),
            "hu_mean": sums / counts[z],
        }
    )


def check_rows(
    df: pd.DataFrame,
    ct: np.ndarray,
    masked: np.ndarray,
    affine: np.ndarray,
    spacing: tuple[float, ...] | None = None,
) -> None:
    """Every row equals numpy on ``masked`` (the structure's labels where it counts, else 0);
    ``spacing`` (z, y, x) defaults to the affine's column lengths."""
    if spacing is None:
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)[::-1])
    for _, row in df.iterrows():
        if row.voxel_count == 0:
            assert not (masked == row.label).any()
            continue
        ref = numpy_stats(ct, masked, affine, spacing, int(row.label))
        for key, value in ref.items():
            if key in ("volume_ml", "hu_std"):
                np.testing.assert_allclose(row[key], value, rtol=1e-12)
            else:
                assert row[key] == value, (int(row.label), key, row[key], value)


def within_mask(a: np.ndarray, b: np.ndarray, within: int, ignore: int | None) -> np.ndarray:
    """Labels of map a on the voxels where map b holds ``within``; 0 elsewhere and on ignore."""
    keep = b == within
    if ignore is not None:
        keep &= a != ignore
    return np.where(keep, a, 0)


# -- within -----------------------------------------------------------------------------------
WITHIN_CASES = [
    pytest.param("body_regions", "body_parts", "torso", id="regions-within-torso"),
    pytest.param("body_parts", "body_regions", "muscle", id="parts-within-muscle"),
]


@pytest.mark.parametrize(("seg", "wseg", "wname"), WITHIN_CASES)
def test_saros_within_equals_numpy_index_equals_scan(
    saros_source: Path, saros_store: Path, seg: str, wseg: str, wname: str
) -> None:
    col = ctzarr.open_collection(saros_store)
    wvalue = col.segmentations[wseg].resolve(wname).value
    for cid in col.case_ids:
        case = col[cid]
        arrays = saros_arrays(saros_source, cid)
        by_index = case.stats(segmentation=seg, within=(wseg, wname))
        by_scan = case.stats(segmentation=seg, within=f"{wseg}:{wname}", method="scan")
        assert list(by_index.columns) == [*WITHIN_COLUMNS, "annotated_slices"]
        pd.testing.assert_frame_equal(by_index, by_scan)
        masked = within_mask(arrays[seg], arrays[wseg], wvalue, 255)
        present = sorted(set(np.unique(masked).tolist()) - {0})
        assert by_index.label.tolist() == present
        assert set(by_index.within_segmentation) <= {wseg}
        assert set(by_index.within_structure) <= {wname}
        annotated = int((arrays[seg] != 255).all(axis=(1, 2)).sum())
        assert set(by_index.annotated_slices) <= {annotated}
        check_rows(by_index, arrays["image"], masked, arrays["affine"])
        # the default method read the joint index (format 3 writes one for two segmentations)
        assert case.joint_index(seg, wseg) is not None


def test_saros_within_named_structures_absent_rows(saros_store: Path) -> None:
    col = ctzarr.open_collection(saros_store)
    case = col[col.case_ids[0]]
    wanted = ["muscle", "brain", "subcutaneous tissue"]
    by_index = case.stats(wanted, "body_regions", within=("body_parts", "left leg"))
    by_scan = case.stats(wanted, "body_regions", within=("body_parts", "left leg"), method="scan")
    pd.testing.assert_frame_equal(by_index, by_scan)
    assert by_index.structure.tolist() == ["muscle", "brain", "subcutaneous_tissue"]
    counts = dict(zip(by_index.structure, by_index.voxel_count, strict=True))
    full = case.stats(wanted, "body_regions").set_index("structure").voxel_count
    for name, n in counts.items():
        assert 0 <= n <= full[name]


def test_within_segmentation_default_excludes_the_within_map(saros_store: Path) -> None:
    col = ctzarr.open_collection(saros_store)
    df = col[col.case_ids[0]].stats(["muscle"], within="body_parts:torso")
    assert df.segmentation.tolist() == ["body_regions"]


def test_saros_cohort_within_equals_case_forms(saros_store: Path) -> None:
    col = ctzarr.open_collection(saros_store)
    cohort = col.stats(["muscle", "bone"], within=("body_parts", "torso"))
    parts = [
        col[cid].stats(["muscle", "bone"], within=("body_parts", "torso")) for cid in col.case_ids
    ]
    pd.testing.assert_frame_equal(cohort, pd.concat(parts, ignore_index=True))
    scan = col.stats(["muscle", "bone"], within=("body_parts", "torso"), method="scan")
    pd.testing.assert_frame_equal(cohort, scan)


@pytest.mark.parametrize(
    ("within", "error"),
    [
        pytest.param("body_parts", ValueError, id="no-structure"),
        pytest.param(("body_parts",), ValueError, id="one-element"),
        pytest.param("nowhere:torso", SegmentationNotFoundError, id="unknown-segmentation"),
        pytest.param("body_parts:torsoo", StructureNotFoundError, id="unknown-structure"),
        pytest.param("body_parts:background", ValueError, id="background"),
    ],
)
def test_within_bad_arguments(saros_store: Path, within: Any, error: type[Exception]) -> None:
    case = ctzarr.open_collection(saros_store)["case_000"]
    with pytest.raises(error):
        case.stats(["muscle"], "body_regions", within=within)


def test_within_its_own_segmentation_is_refused(saros_store: Path) -> None:
    case = ctzarr.open_collection(saros_store)["case_000"]
    with pytest.raises(ValueError, match="another segmentation"):
        case.stats(["muscle"], "body_regions", within="body_regions:bone")


@pytest.fixture(scope="module")
def two_map_dap(dap_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DAP phantom cases with a second, dense label map ``parts`` (the body in three z bands:
    1 lower, 2 torso, 3 upper), converted with the pairs layout."""
    root = tmp_path_factory.mktemp("two_maps")
    lines = ["case_id,image,anatomy,parts"]
    for image in sorted((dap_source / "images").glob("*.nii.gz"))[:2]:
        cid = image.name.removesuffix(".nii.gz")
        mask_img = nib.load(dap_source / "masks" / image.name)
        mask = np.asanyarray(mask_img.dataobj)  # file order (x, y, z)
        nz = mask.shape[2]
        band = np.ones(nz, np.uint8)
        band[int(0.3 * nz) : int(0.85 * nz)] = 2
        band[int(0.85 * nz) :] = 3
        parts = np.where(mask != 0, band[None, None, :], 0).astype(np.uint8)
        nib.Nifti1Image(parts, mask_img.affine, mask_img.header).to_filename(
            root / f"{cid}_parts.nii.gz"
        )
        lines.append(f"{cid},{image},{dap_source / 'masks' / image.name},{cid}_parts.nii.gz")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    table = {str(lab.value): lab.name for lab in builtin_label_map("dap_atlas")}
    (root / "anatomy.json").write_text(json.dumps(table))
    (root / "parts.json").write_text(
        json.dumps({"0": "background", "1": "lower", "2": "torso", "3": "upper"})
    )
    store = root / "two.zarr"
    report = ctzarr.convert(
        root / "manifest.csv",
        store,
        layout="pairs",
        labels=[f"anatomy={root / 'anatomy.json'}", f"parts={root / 'parts.json'}"],
        progress=False,
    )
    assert report.ok, report
    return store


@pytest.mark.parametrize(
    ("seg", "wseg", "wname"),
    [
        pytest.param("anatomy", "parts", "torso", id="anatomy-within-torso"),
        pytest.param("parts", "anatomy", "muscles", id="parts-within-muscles"),
    ],
)
def test_dense_maps_within_equals_numpy_index_equals_scan(
    dap_source: Path, two_map_dap: Path, seg: str, wseg: str, wname: str
) -> None:
    col = ctzarr.open_collection(two_map_dap)
    wvalue = col.segmentations[wseg].resolve(wname).value
    for cid in col.case_ids:
        case = col[cid]
        arrays = {
            "image": np.asarray(case.image),
            "anatomy": nifti_zyx(dap_source / "masks" / f"{cid}.nii.gz"),
            "parts": np.asarray(case.labels("parts")),
            "affine": nib.load(dap_source / "images" / f"{cid}.nii.gz").affine,
        }
        np.testing.assert_array_equal(
            arrays["image"], nifti_zyx(dap_source / "images" / f"{cid}.nii.gz")
        )
        by_index = case.stats(segmentation=seg, within=(wseg, wname))
        by_scan = case.stats(segmentation=seg, within=(wseg, wname), method="scan")
        assert list(by_index.columns) == WITHIN_COLUMNS
        pd.testing.assert_frame_equal(by_index, by_scan)
        masked = within_mask(arrays[seg], arrays[wseg], wvalue, None)
        assert by_index.label.tolist() == sorted(set(np.unique(masked).tolist()) - {0})
        check_rows(by_index, arrays["image"], masked, arrays["affine"])
        assert case.joint_index(seg, wseg) is not None
    if seg == "anatomy":  # named structures: the same rows by both methods
        named = [
            case.stats(["muscles", "liver"], seg, within=(wseg, wname), method=m)
            for m in ("index", "scan")
        ]
        pd.testing.assert_frame_equal(*named)
        assert named[0].structure.tolist() == ["muscles", "liver"]


# -- profile ----------------------------------------------------------------------------------
def check_profile(df: pd.DataFrame, ref: pd.DataFrame, cid: str, seg: str, label: int) -> None:
    assert list(df.columns) == PROFILE_COLUMNS
    assert set(df.case_id) <= {cid}
    assert set(df.segmentation) <= {seg}
    assert set(df.label) <= {label}
    pd.testing.assert_frame_equal(
        df[list(ref.columns)].reset_index(drop=True), ref, check_dtype=False, check_exact=True
    )


@pytest.mark.parametrize("structure", ["muscles", "liver", "vertebrae L3"])
def test_dap_profile_equals_numpy_index_equals_scan(
    dap_source: Path, dap_store: Path, structure: str
) -> None:
    col = ctzarr.open_collection(dap_store)
    label = col.segmentations["anatomy"].resolve(structure).value
    rows = 0
    for cid in col.case_ids:
        case = col[cid]
        arrays = dap_arrays(dap_source, cid)
        by_index = case.profile(structure)
        pd.testing.assert_frame_equal(by_index, case.profile(structure, method="scan"))
        ref = numpy_profile(arrays["image"], arrays["anatomy"], label, arrays["affine"])
        check_profile(by_index, ref, cid, "anatomy", label)
        rows += len(by_index)
    assert rows


def test_saros_profile_holds_annotated_slices_only(saros_source: Path, saros_store: Path) -> None:
    col = ctzarr.open_collection(saros_store)
    for cid in col.case_ids:
        case = col[cid]
        arrays = saros_arrays(saros_source, cid)
        by_index = case.profile("muscle")
        pd.testing.assert_frame_equal(by_index, case.profile("muscle", method="scan"))
        ref = numpy_profile(arrays["image"], arrays["body_regions"], 2, arrays["affine"])
        check_profile(by_index, ref, cid, "body_regions", 2)
        annotated = np.flatnonzero((arrays["body_regions"] != 255).all(axis=(1, 2)))
        assert set(by_index.z) <= set(annotated.tolist())
        assert len(by_index)


def test_profile_cohort_equals_case_forms(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    cohort = col.profile("muscles")
    parts = [col[cid].profile("muscles") for cid in col.case_ids]
    pd.testing.assert_frame_equal(cohort, pd.concat(parts, ignore_index=True))
    two = col.profile("muscles", cases=col.case_ids[1:], method="scan")
    pd.testing.assert_frame_equal(two, pd.concat(parts[1:], ignore_index=True))


def test_profile_of_an_absent_structure_is_empty(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    case = col[col.case_ids[0]]
    present = set(case.index().labels.tolist())
    absent = next(v for v in col.segmentations["anatomy"].values if v and v not in present)
    for method in ("index", "scan"):
        df = case.profile(absent, method=method)
        assert list(df.columns) == PROFILE_COLUMNS
        assert len(df) == 0


def test_profile_unknown_structure_is_an_error(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    with pytest.raises(StructureNotFoundError, match="liver"):
        col[col.case_ids[0]].profile("livr")
    with pytest.raises(StructureNotFoundError):
        col.profile("livr")


@pytest.fixture
def golden_saros(tmp_path: Path) -> Path:
    copy = tmp_path / "saros.zarr"
    shutil.copytree(GOLDEN_2 / "saros.zarr", copy)
    return copy


def test_format2_store_answers_profile_by_scan(
    golden_saros: Path, caplog: pytest.LogCaptureFixture
) -> None:
    col = ctzarr.open_collection(golden_saros)
    assert col[col.case_ids[0]].meta.format_version == 2
    for cid in col.case_ids:
        case = col[cid]
        ref_arrays = np.load(GOLDEN_2 / "expected" / "saros" / f"{cid}.npz")
        image = np.asarray(case.image)
        regions = np.asarray(case.labels("body_regions"))
        for name in ("image", "body_regions"):  # the store holds what nibabel read
            key = next(k for k in ref_arrays.files if name in k)
            np.testing.assert_array_equal(ref_arrays[key], image if name == "image" else regions)
        for label in np.unique(regions).tolist():
            if label in (0, 255):
                continue
            with caplog.at_level(logging.DEBUG, logger="ctzarr.read.composition"):
                by_index = case.profile(label, "body_regions")
            assert "profile by scan" in caplog.text
            pd.testing.assert_frame_equal(by_index, case.profile(label, "body_regions", "scan"))
            ref = numpy_profile(image, regions, label, case.affine)
            check_profile(by_index, ref, cid, "body_regions", label)


def test_format2_store_answers_within_by_scan(golden_saros: Path) -> None:
    col = ctzarr.open_collection(golden_saros)
    torso = col.segmentations["body_parts"].resolve("torso").value
    for cid in col.case_ids:
        case = col[cid]
        assert case.joint_index("body_regions", "body_parts") is None
        ref = np.load(GOLDEN_2 / "expected" / "saros" / f"{cid}.npz")
        by_index = case.stats(segmentation="body_regions", within="body_parts:torso")
        pd.testing.assert_frame_equal(
            by_index,
            case.stats(segmentation="body_regions", within="body_parts:torso", method="scan"),
        )
        masked = within_mask(ref["labels/body_regions"], ref["labels/body_parts"], torso, 255)
        assert by_index.label.tolist() == sorted(set(np.unique(masked).tolist()) - {0})
        check_rows(by_index, ref["image"], masked, ref["affine"])


# -- slice statistics -------------------------------------------------------------------------
def landmark_z(lab: np.ndarray, label: int) -> int:
    zz = np.nonzero(lab == label)[0]
    return int(np.floor(zz.mean() + 0.5))


def one_slice(lab: np.ndarray, z: int) -> np.ndarray:
    out = np.zeros_like(lab)
    out[z] = lab[z]
    return out


def test_dap_slice_stats_at_l3_equal_numpy(dap_source: Path, dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    lm = col.segmentations["anatomy"]
    l3 = lm.resolve("vertebrae L3").value
    wanted = ["muscles", "fat"]
    seen = 0
    for cid in col.case_ids:
        arrays = dap_arrays(dap_source, cid)
        if not (arrays["anatomy"] == l3).any():
            continue
        seen += 1
        df = col[cid].slice_stats(at="vertebrae L3", structures=wanted)
        assert list(df.columns) == SLICE_COLUMNS
        z = landmark_z(arrays["anatomy"], l3)
        assert set(df.z) == {z}
        assert df.structure.tolist() == [lm.resolve(s).name for s in wanted]
        assert set(df.at_structure) == {lm[l3].name}
        assert set(df.at_segmentation) == {"anatomy"}
        masked = one_slice(arrays["anatomy"], z)
        check_rows(df, arrays["image"], masked, arrays["affine"])
        counts = [(masked == lm.resolve(s).value).sum() for s in wanted]
        np.testing.assert_array_equal(df.area_mm2, np.array(counts) * pixel_area(arrays["affine"]))
        assert (df.voxel_count > 0).all()
    assert seen


def test_saros_slice_stats_landmark_from_another_segmentation(
    saros_source: Path, saros_store: Path
) -> None:
    col = ctzarr.open_collection(saros_store)
    for cid in col.case_ids:
        arrays = saros_arrays(saros_source, cid)
        df = col[cid].slice_stats(at="torso", structures=["muscle", "bone"])
        z = landmark_z(arrays["body_parts"], 1)
        assert set(df.z) == {z}
        assert set(df.at_segmentation) == {"body_parts"}
        assert df.segmentation.tolist() == ["body_regions", "body_regions"]
        check_rows(df, arrays["image"], one_slice(arrays["body_regions"], z), arrays["affine"])
        annotated = int((arrays["body_regions"] != 255).all(axis=(1, 2)).sum())
        assert set(df.annotated_slices) == {annotated}


def test_slice_stats_ambiguous_and_absent_landmarks(dap_store: Path, saros_store: Path) -> None:
    saros = ctzarr.open_collection(saros_store)
    with pytest.raises(StructureNotFoundError, match=r"body_regions.*body_parts"):
        saros["case_000"].slice_stats(at="background", structures=["muscle"])
    # written with its segmentation it is no longer ambiguous (and the background is skipped
    # by the index, so it is absent)
    with pytest.raises(StructureNotFoundError, match="absent"):
        saros["case_000"].slice_stats(at="body_parts:background", structures=["muscle"])
    dap = ctzarr.open_collection(dap_store)
    case = dap[dap.case_ids[0]]
    present = set(case.index().labels.tolist())
    absent = next(v for v in dap.segmentations["anatomy"].values if v and v not in present)
    with pytest.raises(StructureNotFoundError, match="absent"):
        case.slice_stats(at=absent, structures=["muscles"])


def test_slice_stats_cohort_notes_cases_without_the_landmark(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    first = col[col.case_ids[0]]
    present = set(first.index().labels.tolist())
    absent = next(v for v in col.segmentations["anatomy"].values if v and v not in present)
    out = col.slice_stats(at=absent, structures=["muscles"], cases=[col.case_ids[0]])
    assert list(out.columns) == [*SLICE_COLUMNS, "note"]
    assert len(out) == 1
    assert "absent" in out.note[0]
    assert out.voxel_count[0] == 0
    cohort = col.slice_stats(at="muscles", structures=["muscles", "fat"])
    parts = [
        col[cid].slice_stats(at="muscles", structures=["muscles", "fat"]) for cid in col.case_ids
    ]
    expected = pd.concat(parts, ignore_index=True)
    expected["note"] = ""
    pd.testing.assert_frame_equal(cohort, expected)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        pytest.param(lambda col: col.profile("livr"), StructureNotFoundError, id="profile"),
        pytest.param(
            lambda col: col.stats(["muscles"], within="anatomy:livr"),
            StructureNotFoundError,
            id="within-structure",
        ),
        pytest.param(
            lambda col: col.stats(["muscles"], within="nowhere:liver"),
            SegmentationNotFoundError,
            id="within-segmentation",
        ),
        pytest.param(
            lambda col: col.slice_stats(at="vertebrae L33", structures=["muscles"]),
            StructureNotFoundError,
            id="slice-at",
        ),
        pytest.param(
            lambda col: col.slice_stats(at="vertebrae L3", structures=["musclez"]),
            StructureNotFoundError,
            id="slice-structures",
        ),
    ],
)
def test_cohort_names_are_checked_before_any_case(
    dap_store: Path, call: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        call(ctzarr.open_collection(dap_store))


# -- cluster ----------------------------------------------------------------------------------
def test_cohort_queries_on_a_cluster_equal_local(saros_store: Path) -> None:
    distributed = pytest.importorskip("distributed")
    col = ctzarr.open_collection(saros_store)
    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=2,
            processes=False,
            dashboard_address=":0",
            silence_logs=logging.ERROR,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        within = col.stats(["muscle"], within="body_parts:torso", method="scan", client=client)
        profile = col.profile("muscle", client=client)
        at = col.slice_stats(at="torso", structures=["muscle"], client=client)
        one = col["case_001"].stats(["muscle"], within="body_parts:torso", client=client)
    pd.testing.assert_frame_equal(
        one, col["case_001"].stats(["muscle"], within="body_parts:torso", method="scan")
    )
    pd.testing.assert_frame_equal(within, col.stats(["muscle"], within="body_parts:torso"))
    pd.testing.assert_frame_equal(profile, col.profile("muscle"))
    pd.testing.assert_frame_equal(at, col.slice_stats(at="torso", structures=["muscle"]))


# -- TotalSegmentator layout ------------------------------------------------------------------
@pytest.fixture(scope="module")
def totalseg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("totalseg") / "TotalSegmentator"
    write_totalsegmentator(
        root, n_cases=2, shape_zyx=(30, 32, 32), seed=1, tasks=("total", "tissue_types")
    )
    store = root.parent / "ts.zarr"
    report = ctzarr.convert(root, store, progress=False)
    assert report.ok, report
    return root, store


def totalseg_arrays(root: Path, col: Any, cid: str) -> dict[str, np.ndarray]:
    """The CT and both label maps merged by numpy from the binary mask files."""
    image = nifti_zyx(root / cid / "ct.nii.gz")
    out = {"image": image, "affine": nib.load(root / cid / "ct.nii.gz").affine}
    for seg in ("total", "tissue_types"):
        out[seg] = np.zeros(image.shape, np.uint8)
    for path in sorted((root / cid / "segmentations").glob("*.nii.gz")):
        name = path.name.removesuffix(".nii.gz")
        seg = (
            "total" if name in {lab.name for lab in col.segmentations["total"]} else "tissue_types"
        )
        mask = nifti_zyx(path).astype(bool)
        assert not out[seg][mask].any()
        out[seg][mask] = col.segmentations[seg].resolve(name).value
    return out


@pytest.mark.parametrize(
    ("seg", "wseg", "wname"),
    [
        pytest.param("total", "tissue_types", "skeletal_muscle", id="total-within-muscle"),
        pytest.param("tissue_types", "total", "liver", id="tissue-within-liver"),
    ],
)
def test_totalsegmentator_within_equals_numpy(
    totalseg: tuple[Path, Path], seg: str, wseg: str, wname: str
) -> None:
    root, store = totalseg
    col = ctzarr.open_collection(store)
    wvalue = col.segmentations[wseg].resolve(wname).value
    for cid in col.case_ids:
        arrays = totalseg_arrays(root, col, cid)
        case = col[cid]
        by_index = case.stats(segmentation=seg, within=(wseg, wname))
        pd.testing.assert_frame_equal(
            by_index, case.stats(segmentation=seg, within=(wseg, wname), method="scan")
        )
        masked = within_mask(arrays[seg], arrays[wseg], wvalue, None)
        assert by_index.label.tolist() == sorted(set(np.unique(masked).tolist()) - {0})
        check_rows(by_index, arrays["image"], masked, arrays["affine"])


def test_totalsegmentator_profile_and_slice_stats_equal_numpy(
    totalseg: tuple[Path, Path],
) -> None:
    root, store = totalseg
    col = ctzarr.open_collection(store)
    liver = col.segmentations["total"].resolve("liver").value
    l1 = col.segmentations["total"].resolve("vertebrae_L1").value
    for cid in col.case_ids:
        arrays = totalseg_arrays(root, col, cid)
        case = col[cid]
        profile = case.profile("liver")
        pd.testing.assert_frame_equal(profile, case.profile("liver", method="scan"))
        ref = numpy_profile(arrays["image"], arrays["total"], liver, arrays["affine"])
        check_profile(profile, ref, cid, "total", liver)
        if not (arrays["total"] == l1).any():
            continue
        # the landmark from one segmentation, the structures from the other
        df = case.slice_stats(at="vertebrae L1", structures=["skeletal muscle", "subcutaneous fat"])
        z = landmark_z(arrays["total"], l1)
        assert set(df.z) == {z}
        assert set(df.segmentation) == {"tissue_types"}
        check_rows(df, arrays["image"], one_slice(arrays["tissue_types"], z), arrays["affine"])


def test_slice_stats_cohort_mixes_noted_and_answered_cases(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    cases = {}
    for i in range(3):
        ct = rng.integers(-100, 100, size=(12, 9, 8)).astype(np.int16)
        mask = rng.integers(0, 3, size=ct.shape).astype(np.uint8)
        if i != 1:  # the landmark "c" in cases p0 and p2 only
            mask[4:7, 2:5, 3:6] = 3
        cases[f"p{i}"] = (ct, mask, np.diag([0.7, 0.8, 2.0, 1.0]))
    manifest, labels = write_pairs(tmp_path / "src", cases)
    report = ctzarr.convert(manifest, tmp_path / "p.zarr", labels=[f"seg={labels}"], progress=False)
    assert report.ok, report
    col = ctzarr.open_collection(tmp_path / "p.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pandas warning when note rows join answered rows
        out = col.slice_stats(at="c", structures=["a", "b"])
    assert list(out.columns) == [*SLICE_COLUMNS, "note"]
    assert out.case_id.tolist() == ["p0", "p0", "p1", "p2", "p2"]
    for cid in ("p0", "p2"):
        src = tmp_path / "src"
        ct, mask = nifti_zyx(src / f"{cid}_ct.nii.gz"), nifti_zyx(src / f"{cid}_seg.nii.gz")
        affine = nib.load(src / f"{cid}_ct.nii.gz").affine
        rows = out[out.case_id == cid].reset_index(drop=True)
        assert (rows.note == "").all()
        assert set(rows.z) == {5}  # floor(mean z of 4, 5, 6 + 0.5)
        check_rows(rows, ct, one_slice(mask, 5), affine, col[cid].spacing)
        expected = col[cid].slice_stats(at="c", structures=["a", "b"])
        pd.testing.assert_frame_equal(rows.drop(columns="note"), expected)
    noted = out[out.case_id == "p1"].iloc[0]
    assert "absent" in noted.note
    assert noted.z == -1
    assert noted.voxel_count == 0
