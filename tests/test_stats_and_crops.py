"""Statistics equal an independent numpy computation; index == scan; crops equal numpy slicing."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import LocalStore, WrapperStore

import ctzarr
from ctzarr.model.table import STATS_COLUMNS

from .conftest import nifti_zyx, write_pairs

Q = [50, 5, 25, 75, 95]
Q_COLS = ["hu_median", "hu_p05", "hu_p25", "hu_p75", "hu_p95"]


def numpy_stats(
    ct: np.ndarray, mask: np.ndarray, affine: np.ndarray, spacing_zyx: tuple, label: int
) -> dict:
    """The statistics of one label, computed directly from the voxels."""
    m = mask == label
    values = ct[m]
    n = int(m.sum())
    zz, yy, xx = np.nonzero(m)
    s1 = int(values.astype(np.int64).sum()) if values.dtype.kind in "iu" else None
    out = {
        "voxel_count": n,
        "volume_ml": n * float(np.prod(spacing_zyx)) / 1000.0,
        "hu_min": values.min(),
        "hu_max": values.max(),
        "z_start": zz.min(),
        "z_stop": zz.max() + 1,
        "y_start": yy.min(),
        "y_stop": yy.max() + 1,
        "x_start": xx.min(),
        "x_stop": xx.max() + 1,
    }
    for col, p in zip(Q_COLS, np.percentile(values, Q), strict=True):
        out[col] = p
    if s1 is not None:
        s2 = int((values.astype(np.int64) ** 2).sum())
        out["hu_mean"] = s1 / n
        out["hu_std"] = math.sqrt((n * s2 - s1 * s1) / (n * n))
    world = affine @ np.array([xx.sum() / n, yy.sum() / n, zz.sum() / n, 1.0])
    out["centroid_x"], out["centroid_y"], out["centroid_z"] = world[:3]
    shape = mask.shape
    out["touches_border"] = bool(
        zz.min() == 0
        or yy.min() == 0
        or xx.min() == 0
        or zz.max() == shape[0] - 1
        or yy.max() == shape[1] - 1
        or xx.max() == shape[2] - 1
    )
    return out


def check_case_stats(
    df: pd.DataFrame,
    ct: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    spacing: tuple,
    ignore: int | None = None,
) -> None:
    present = sorted(set(np.unique(mask).tolist()) - {0, ignore})
    assert df.label.tolist() == present
    for _, row in df.iterrows():
        ref = numpy_stats(ct, mask, affine, spacing, int(row.label))
        for key, value in ref.items():
            assert row[key] == value, (int(row.label), key, row[key], value)
        if "hu_std" in ref:
            values = ct[mask == row.label]
            np.testing.assert_allclose(row.hu_std, values.std(), rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(row.hu_mean, values.mean(), rtol=1e-12)


def test_dap_case_stats_equal_numpy(dap_source: Path, dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    for cid in col.case_ids:
        img = nib.load(dap_source / "images" / f"{cid}.nii.gz")
        df = col[cid].stats()
        assert list(df.columns) == STATS_COLUMNS
        check_case_stats(
            df,
            nifti_zyx(dap_source / "images" / f"{cid}.nii.gz"),
            nifti_zyx(dap_source / "masks" / f"{cid}.nii.gz"),
            img.affine,
            col[cid].spacing,
        )


def test_saros_sparse_stats_equal_numpy_and_report_annotated_slices(
    saros_source: Path, saros_store: Path
) -> None:
    col = ctzarr.open_collection(saros_store)
    for cid in col.case_ids:
        ct = nifti_zyx(saros_source / cid / "image.nii.gz")
        affine = nib.load(saros_source / cid / "image.nii.gz").affine
        for seg, fn in (
            ("body_regions", "body-regions.nii.gz"),
            ("body_parts", "body-parts.nii.gz"),
        ):
            mask = nifti_zyx(saros_source / cid / fn)
            df = col[cid].stats(segmentation=seg)
            assert 255 not in df.label.tolist()
            check_case_stats(df, ct, mask, affine, col[cid].spacing, ignore=255)
            annotated = int(np.all(mask != 255, axis=(1, 2)).sum())
            assert (df.annotated_slices == annotated).all()


def test_values_beyond_the_usual_hu_range(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    ct = rng.integers(-32768, 32767, size=(20, 16, 18), endpoint=True).astype(np.int16)
    ct[0, 0, 0], ct[1, 1, 1] = -32768, 32767
    mask = rng.integers(0, 4, size=ct.shape).astype(np.uint8)
    mask[0, 0, 0] = mask[1, 1, 1] = 2
    affine = np.array([[0, -0.7, 0, 10], [0.7, 0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    manifest, labels = write_pairs(tmp_path / "src", {"wide": (ct, mask, affine)})
    assert ctzarr.convert(manifest, tmp_path / "w.zarr", labels=[str(labels)], progress=False).ok
    case = ctzarr.open_collection(tmp_path / "w.zarr")["wide"]
    df = case.stats()
    check_case_stats(
        df, ct, mask, nib.load(tmp_path / "src" / "wide_ct.nii.gz").affine, case.spacing
    )
    pd.testing.assert_frame_equal(df, case.stats(method="scan"))


def test_float_image_with_fractional_values_agrees_between_methods(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    ct = rng.normal(0, 100, size=(12, 10, 9)).astype(np.float32)
    mask = rng.integers(0, 4, size=ct.shape).astype(np.uint8)
    manifest, labels = write_pairs(tmp_path / "src", {"f": (ct, mask, np.eye(4))})
    assert ctzarr.convert(manifest, tmp_path / "f.zarr", labels=[str(labels)], progress=False).ok
    case = ctzarr.open_collection(tmp_path / "f.zarr")["f"]
    idx = case.index("seg")
    assert idx.histogram_resolution == 2.0**-8
    df = case.stats()
    pd.testing.assert_frame_equal(df, case.stats(method="scan"))
    for _, row in df.iterrows():
        values = ct[mask == row.label].astype(np.float64)
        assert abs(row.hu_mean - values.mean()) <= 2.0**-9
        assert row.hu_min == np.float32(np.rint(values.min() * 256) / 256)


@pytest.mark.parametrize("store_fixture", ["dap_store", "saros_store"])
def test_index_equals_scan_on_every_case(
    store_fixture: str, request: pytest.FixtureRequest
) -> None:
    col = ctzarr.open_collection(request.getfixturevalue(store_fixture))
    pd.testing.assert_frame_equal(col.stats(), col.stats(method="scan"))


@pytest.mark.parametrize(
    "name",
    ["kidney left", "Kidney-Left", "KIDNEY_LEFT", "kidneyleft", 15, "15"],
    ids=["spaces", "hyphen-case", "upper-underscore", "squashed", "int-id", "str-id"],
)
def test_structure_names_match_loosely(dap_store: Path, name: str | int) -> None:
    col = ctzarr.open_collection(dap_store)
    df = col.stats(structures=[name])
    assert set(df.label) == {15}
    assert (df.voxel_count > 0).all()


def test_totalsegmentator_name_resolves_in_dap(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    assert col.segmentations["anatomy"].resolve("urinary_bladder").name == "bladder"
    df = col.stats(structures=["liver", "kidney_right"])
    assert set(df.structure) == {"liver", "kidney right"}
    assert len(df) == 2 * len(col.case_ids)


def test_unknown_structure_lists_close_matches(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    with pytest.raises(ctzarr.StructureNotFoundError) as info:
        col.stats(structures=["kidny left"])
    assert isinstance(info.value, KeyError)
    assert "kidney left" in str(info.value)
    with pytest.raises(KeyError, match="liver"):
        col[col.case_ids[0]].crop("livr")


def test_structure_absent_from_saros_is_an_error(saros_store: Path) -> None:
    with pytest.raises(ctzarr.StructureNotFoundError):
        ctzarr.open_collection(saros_store).stats(structures=["liver"])


@pytest.mark.parametrize("margin_mm", [0.0, 4.0, 10.0, 500.0])
def test_crop_equals_numpy_slicing_and_carries_its_affine(
    dap_source: Path, dap_store: Path, margin_mm: float
) -> None:
    col = ctzarr.open_collection(dap_store)
    for cid in col.case_ids:
        case = col[cid]
        ct = nifti_zyx(dap_source / "images" / f"{cid}.nii.gz")
        mask = nifti_zyx(dap_source / "masks" / f"{cid}.nii.gz")
        zz, yy, xx = np.nonzero(mask == 13)
        box = []
        for ax, idx in enumerate((zz, yy, xx)):
            grow = math.ceil(margin_mm / case.spacing[ax])
            box.append(slice(max(idx.min() - grow, 0), min(idx.max() + 1 + grow, mask.shape[ax])))
        crop = case.crop("liver", margin_mm=margin_mm)
        np.testing.assert_array_equal(crop.image.values, ct[tuple(box)])
        np.testing.assert_array_equal(crop.labels.values, mask[tuple(box)])
        affine = nib.load(dap_source / "images" / f"{cid}.nii.gz").affine
        corner = affine @ np.array([box[2].start, box[1].start, box[0].start, 1.0])
        np.testing.assert_allclose(
            crop.attrs["affine"] @ np.array([0, 0, 0, 1.0]), corner, rtol=0, atol=1e-9
        )
        np.testing.assert_allclose(crop.attrs["affine"][:3, :3], affine[:3, :3])


class CountingStore(WrapperStore[LocalStore]):
    """Counts the chunk (non-metadata) reads that reach the underlying store."""

    def __init__(self, store: LocalStore) -> None:
        super().__init__(store)
        self.keys: list[str] = []
        self.nbytes = 0

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        out = await self._store.get(key, prototype, byte_range)
        if not key.endswith("zarr.json"):
            self.keys.append(key)
            self.nbytes += 0 if out is None else len(out)
        return out

    def _with_store(self, store: LocalStore) -> CountingStore:
        return CountingStore(store)


def test_crop_reads_only_the_chunks_it_needs(tmp_path: Path) -> None:
    """A small structure in a tall case: the crop touches one shard of each array, not all."""
    rng = np.random.default_rng(13)
    ct = rng.integers(-1000, 1000, size=(200, 130, 130)).astype(np.int16)
    mask = np.zeros(ct.shape, np.uint8)
    mask[140:150, 70:80, 70:80] = 2
    manifest, labels = write_pairs(
        tmp_path / "src", {"tall": (ct, mask, np.diag([1.0, 1.0, 2.0, 1.0]))}
    )
    assert ctzarr.convert(manifest, tmp_path / "t.zarr", labels=[str(labels)], progress=False).ok
    store = CountingStore(LocalStore(tmp_path / "t.zarr", read_only=True))
    case = ctzarr.open_collection(store)["tall"]
    store.keys.clear()
    store.nbytes = 0
    crop = case.crop("b", margin_mm=2)
    assert (
        store.keys == ["cases/tall/labels/seg/index/histogram/c/0/0"] or store.keys == []
    )  # the index only
    store.keys.clear()
    image, lab = crop.image.values, crop.labels.values
    np.testing.assert_array_equal(image, ct[139:151, 68:82, 68:82])
    np.testing.assert_array_equal(lab, mask[139:151, 68:82, 68:82])
    shards = {
        k.rsplit("/c/", 1)[0] + "/c/" + k.rsplit("/c/", 1)[1].split("/")[0] for k in store.keys
    }
    assert shards == {"cases/tall/0/c/2", "cases/tall/labels/seg/0/c/2"}, store.keys
    full_image_bytes = ct.nbytes
    assert store.nbytes < full_image_bytes / 10


@pytest.mark.parametrize("store_fixture", ["dap_store", "saros_store"])
def test_requested_structures_absent_from_a_case_agree_between_methods(
    store_fixture: str, request: pytest.FixtureRequest
) -> None:
    col = ctzarr.open_collection(request.getfixturevalue(store_fixture))
    seg, lm = next(iter(col.segmentations.items()))
    present = set(col.table().label)
    missing = next(lab.value for lab in lm.structures() if lab.value not in present)
    some = sorted(present)[:2]
    wanted = [missing, *some][::-1]
    by_index = col.stats(structures=wanted, segmentation=seg)
    pd.testing.assert_frame_equal(
        by_index, col.stats(structures=wanted, segmentation=seg, method="scan")
    )
    absent = by_index[by_index.label == missing]
    assert len(absent) == len(col.case_ids)
    assert (absent.voxel_count == 0).all()
    assert absent.hu_mean.isna().all()
    assert by_index.label.tolist()[: len(wanted)] == wanted
