"""Tests of the synthetic phantom and the DAP Atlas / SAROS layout writers."""

from __future__ import annotations

import csv
import gzip
import json
import re
import struct
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctzarr.testing.phantom import (
    _DAP_NAMES,
    _affine,
    _dap_cases,
    _saros_offset,
    _to_file_order,
    make_phantom,
    write_dap_atlas,
    write_saros,
)

SHAPE = (48, 64, 64)
SPACING = (25.0, 8.0, 8.0)  # big enough that the whole body is drawn at physical size
DAP_IDS = set(_DAP_NAMES)


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray]:
    return make_phantom(SHAPE, SPACING, seed=3)


@pytest.fixture(scope="module")
def dap_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("dap")
    return root, write_dap_atlas(root, n_cases=4, shape_zyx=(24, 32, 32), seed=5)


@pytest.fixture(scope="module")
def saros_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("saros")
    return root, write_saros(root, n_cases=3, shape_zyx=(23, 32, 32), seed=5)


def _is_big_endian_on_disk(path: Path) -> bool:
    with gzip.open(path, "rb") as f:
        head = f.read(4)
    return bool(struct.unpack(">i", head)[0] == 348)


# --- make_phantom ------------------------------------------------------------------------------


def test_deterministic_per_seed() -> None:
    a_ct, a_lab = make_phantom((16, 32, 32), (60.0, 16.0, 16.0), seed=7)
    b_ct, b_lab = make_phantom((16, 32, 32), (60.0, 16.0, 16.0), seed=7)
    c_ct, _ = make_phantom((16, 32, 32), (60.0, 16.0, 16.0), seed=8)
    np.testing.assert_array_equal(a_ct, b_ct)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_ct, c_ct)


def test_dtypes_shapes_and_ranges(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    ct, labels = phantom
    assert ct.dtype == np.int16
    assert labels.dtype == np.uint8
    assert ct.shape == labels.shape == SHAPE
    assert ct.flags.c_contiguous
    assert labels.flags.c_contiguous
    assert ct.min() >= -1024
    assert ct.max() <= 3071
    assert abs(ct[labels == 0].mean() + 1000) < 5  # air
    assert 5 < ct[labels == 0].std() < 25  # noise sigma ~15 HU


def test_label_ids_are_dap_ids(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = phantom
    ids = set(np.unique(labels).tolist())
    assert ids <= DAP_IDS
    assert 11 not in ids
    # body, placeholder, muscle, fat, liver, kidneys, spleen, bladder, lungs, vertebrae
    assert {0, 1, 2, 3, 13, 15, 16, 26, 17, 120, 124}.issubset(ids)
    assert any(43 <= i <= 66 for i in ids)


@pytest.mark.parametrize(
    ("label", "low", "high"),
    [(3, -130, -70), (2, 30, 70), (13, 40, 80), (26, 30, 70), (17, -10, 30), (120, -900, -800),
     (15, 30, 160), (99, 400, 1200)],
)  # fmt: skip
def test_tissue_hu(
    phantom: tuple[np.ndarray, np.ndarray], label: int, low: float, high: float
) -> None:
    ct, labels = phantom
    assert low < np.median(ct[labels == label]) < high


def test_anatomy_sides_and_order(phantom: tuple[np.ndarray, np.ndarray]) -> None:
    _, labels = phantom
    zc, _, xc = np.argwhere(labels == 13).mean(0)
    # x grows towards the patient's right: liver and right kidney right of the left kidney.
    x_left = np.argwhere(labels == 15)[:, 2].mean()
    x_right = np.argwhere(labels == 16)[:, 2].mean()
    assert x_left < SHAPE[2] / 2 < x_right
    assert xc > SHAPE[2] / 2
    # z grows superiorly: bladder below liver below lungs below brain.
    z = {i: np.argwhere(labels == i)[:, 0].mean() for i in (17, 13, 120, 25)}
    assert z[17] < zc < z[120] < z[25]


def test_n_structures_limits_organs() -> None:
    _, none = make_phantom((24, 32, 32), (50.0, 16.0, 16.0), n_structures=0)
    _, few = make_phantom((24, 32, 32), (50.0, 16.0, 16.0), n_structures=2)
    assert not np.isin(none, [13, 26, 15]).any()
    assert (few == 13).any()
    assert (few == 26).any()
    assert not (few == 15).any()
    assert (none == 120).any()  # lungs and skeleton are not organ ellipsoids


def test_physical_size_independent_of_spacing() -> None:
    vols = []
    for shape, spacing in (((30, 96, 96), (40.0, 6.0, 6.0)), ((30, 144, 144), (40.0, 4.0, 4.0))):
        _, labels = make_phantom(shape, spacing, seed=1)
        vols.append((labels == 13).sum() * np.prod(spacing))
    assert vols[0] == pytest.approx(vols[1], rel=0.1)
    assert 0.8e6 < vols[0] < 2.5e6  # a liver of 0.8-2.5 litres


def test_small_volume_is_fast() -> None:
    make_phantom((8, 16, 16), (1.0, 1.0, 1.0))
    t = time.perf_counter()
    make_phantom((64, 96, 96), (5.0, 4.0, 4.0))
    assert time.perf_counter() - t < 0.5


def test_rejects_bad_geometry() -> None:
    with pytest.raises(ValueError, match="shape"):
        make_phantom((0, 8, 8), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        make_phantom((4, 8, 8), (1.0, -1.0, 1.0))


# --- DAP Atlas ---------------------------------------------------------------------------------


def test_dap_layout(dap_root: tuple[Path, list[str]]) -> None:
    root, names = dap_root
    assert names == sorted(names)
    assert len(set(names)) == 4
    assert all(re.fullmatch(r"AutoPET_[0-9a-f]{10}_\d{5}", n) for n in names)
    for sub in ("images", "masks"):
        assert sorted(p.name for p in (root / sub).iterdir()) == [f"{n}.nii.gz" for n in names]
    labels = json.loads((root / "labels.json").read_text())
    ids = {k for k in labels if not k.startswith("_")}
    assert len(ids) == 144
    assert "11" not in ids
    assert {"_note", "_source"} <= labels.keys()
    assert {int(k) for k in ids} == DAP_IDS
    assert labels["0"] == "Background"


def test_dap_names_deterministic(tmp_path: Path, dap_root: tuple[Path, list[str]]) -> None:
    again = write_dap_atlas(tmp_path, n_cases=4, shape_zyx=(4, 8, 8), seed=5,
                            write_labels_json=False)  # fmt: skip
    assert again == dap_root[1]
    assert not (tmp_path / "labels.json").exists()
    assert write_dap_atlas(tmp_path / "other", n_cases=4, shape_zyx=(4, 8, 8), seed=6) != again


def test_dap_round_trip_and_headers(dap_root: tuple[Path, list[str]]) -> None:
    root, _names = dap_root
    for case in _dap_cases(4, 5):
        ct, labels = make_phantom((24, 32, 32), case.spacing_zyx, seed=case.seed)
        affine = _affine((24, 32, 32), case.spacing_zyx, lps=case.lps)
        for sub, arr, dtype in (("images", ct, np.int16), ("masks", labels, np.uint8)):
            img = nib.load(root / sub / f"{case.name}.nii.gz")
            data = np.asarray(img.dataobj)
            assert data.dtype == np.dtype(dtype).newbyteorder(img.header.endianness)
            assert img.dataobj.slope == 1
            assert img.dataobj.inter == 0
            np.testing.assert_array_equal(data, _to_file_order(arr, case.lps).transpose(2, 1, 0))
            assert int(img.header["qform_code"]) == 1
            assert int(img.header["sform_code"]) == 1
            assert img.header.get_xyzt_units() == ("mm", "sec")
            np.testing.assert_allclose(img.header.get_sform(), affine, rtol=1e-6, atol=1e-4)
            np.testing.assert_allclose(img.header.get_qform(), affine, rtol=1e-6, atol=1e-4)


def test_dap_quirks(dap_root: tuple[Path, list[str]]) -> None:
    root, names = dap_root
    imgs = [nib.load(root / "images" / f"{n}.nii.gz") for n in names]
    masks = [nib.load(root / "masks" / f"{n}.nii.gz") for n in names]
    assert (np.diag(imgs[0].affine)[:3] > 0).all()
    assert imgs[1].affine[0, 0] < 0
    assert imgs[1].affine[1, 1] < 0
    assert imgs[1].affine[2, 2] > 0
    for img in (imgs[2], masks[2]):
        assert img.header.endianness == ">"
        assert _is_big_endian_on_disk(Path(img.get_filename()))
    assert imgs[0].header.endianness == "<"
    assert not _is_big_endian_on_disk(root / "images" / f"{names[0]}.nii.gz")
    np.testing.assert_allclose(imgs[2].header.get_zooms(), (0.977, 0.977, 3.27), rtol=1e-6)
    # The LPS case keeps the anatomy in place: the liver lies at world x > 0 (patient right).
    for img, mask in zip(imgs, masks, strict=True):
        assert img.shape == mask.shape
        np.testing.assert_array_equal(img.affine, mask.affine)
        ijk = np.argwhere(np.asarray(mask.dataobj) == 13).mean(0)
        assert nib.affines.apply_affine(mask.affine, ijk)[0] > 0


# --- SAROS -------------------------------------------------------------------------------------


def test_saros_layout(saros_root: tuple[Path, list[str]]) -> None:
    root, ids = saros_root
    assert ids == ["case_000", "case_001", "case_002"]
    for case in ids:
        assert sorted(p.name for p in (root / case).iterdir()) == [
            "body-parts.nii.gz", "body-regions.nii.gz", "image.nii.gz"
        ]  # fmt: skip
    with open(root / "Segmentation-Info.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ids
    assert all(r["split"] in {f"fold-{i}" for i in range(1, 6)} | {"test"} for r in rows)
    assert all(r["tcia_collection"] for r in rows)


def test_saros_no_csv(tmp_path: Path) -> None:
    assert write_saros(tmp_path, n_cases=1, shape_zyx=(6, 8, 8), write_csv=False) == ["case_000"]
    assert not (tmp_path / "Segmentation-Info.csv").exists()


def test_saros_sparse_annotation(saros_root: tuple[Path, list[str]]) -> None:
    root, ids = saros_root
    for i, case in enumerate(ids):
        annotated = np.arange(23) % 5 == _saros_offset(i)
        for fname, max_id in (("body-regions.nii.gz", 13), ("body-parts.nii.gz", 6)):
            data = np.asarray(nib.load(root / case / fname).dataobj)
            assert data.dtype == np.uint8
            assert (data[..., ~annotated] == 255).all()
            ann = data[..., annotated]
            assert ann.max() <= max_id
            assert ann.max() > 0
        assert {_saros_offset(i) for i in range(3)} != {0}  # offsets vary


def test_saros_regions_match_anatomy(saros_root: tuple[Path, list[str]]) -> None:
    root, ids = saros_root
    img = nib.load(root / ids[0] / "image.nii.gz")
    ct = np.asarray(img.dataobj)
    regions = np.asarray(nib.load(root / ids[0] / "body-regions.nii.gz").dataobj)
    parts = np.asarray(nib.load(root / ids[0] / "body-parts.nii.gz").dataobj)
    ann = regions[0, 0, :] != 255
    r, p, c = regions[..., ann], parts[..., ann], ct[..., ann]
    assert (p[r != 0] != 0).all()  # regions lie inside the body
    assert (r[p != 0] != 0).mean() > 0.97  # and cover nearly all of it (not the airway)
    assert np.median(c[r == 1]) < -50
    assert np.median(c[r == 5]) > 300
    assert np.median(c[r == 4]) < -700  # thoracic cavity is mostly lung
    assert {1, 2, 3, 4, 5}.issubset(np.unique(r).tolist())
    assert {1, 2, 3, 4}.issubset(np.unique(p).tolist())


def test_saros_geometry(saros_root: tuple[Path, list[str]]) -> None:
    root, ids = saros_root
    spacings = []
    for i, case in enumerate(ids):
        imgs = [nib.load(root / case / f) for f in ("image.nii.gz", "body-regions.nii.gz")]
        img = imgs[0]
        assert np.asarray(img.dataobj).dtype == np.int16
        np.testing.assert_array_equal(img.affine, imgs[1].affine)
        zooms = img.header.get_zooms()
        assert zooms[2] == pytest.approx(5.0)
        spacings.append(zooms[0])
        diag = np.diag(img.affine)[:2]
        assert (diag < 0).all() if i % 2 else (diag > 0).all()
    assert len(set(spacings)) == len(ids)
