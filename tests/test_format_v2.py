"""Store format 2: every outside reader places every array where the source had it.

For every converted case of every layout (DAP Atlas, SAROS, pairs) and source orientation (RAS,
LAS, LPS, RPI, oblique; big-endian; NIfTI-2): nifti-zarr's ``zarr2nii``, run as a user runs it
(writing a ``.nii.gz`` read back with nibabel), gives the source file's values and affine for
the image group and for every label image group; the OME axes carry the RFC-4 orientation that
``nibabel.aff2axcodes`` gives the source affine, and every level's translation is the voxel-0
centre in that same frame; ome-zarr-models validates the groups; every array has dimension
names. A store of a newer format is a typed error, never garbage.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import zarr
from nibabel.orientations import aff2axcodes, io_orientation
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel

import ctzarr
from ctzarr.cli import main
from ctzarr.model.attributes import FORMAT_VERSION
from ctzarr.model.case import CaseAttributes
from ctzarr.model.collection import CollectionAttributes
from ctzarr.model.ome import axis_codes_zyx, origin_zyx

niizarr = pytest.importorskip("niizarr")

#: a store format this release cannot read
NEWER = FORMAT_VERSION + 1

GOLDEN = Path(__file__).parent / "golden" / "format-1"

#: RFC-4 value (as ngff-zarr writes it) of an axis whose index increases toward each code
RFC4 = {
    "R": "left-to-right",
    "L": "right-to-left",
    "A": "posterior-to-anterior",
    "P": "anterior-to-posterior",
    "S": "inferior-to-superior",
    "I": "superior-to-inferior",
}


def _rotation(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    return np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1.0]])


def _affine(linear: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = linear
    aff[:3, 3] = origin
    return aff


#: affines of the unit-tested orientations: name -> affine (voxel i, j, k to RAS+ mm)
AFFINES = {
    "RAS": _affine(np.diag([0.8, 0.9, 2.5]), (-20.0, -30.5, -100.0)),
    "LAS": _affine(np.diag([-0.8, 0.9, 2.5]), (20.0, -30.5, -100.0)),
    "LPS": _affine(np.diag([-0.8, -0.9, 2.5]), (20.0, 30.5, -100.0)),
    "RPI": _affine(np.diag([0.8, -0.9, -2.5]), (-20.0, 30.5, 100.0)),
    "oblique": _affine(_rotation(25) @ np.diag([-0.8, 0.9, 2.5]), (12.0, -7.0, 3.0)),
    "permuted": _affine(np.array([[0, 0, -2.0], [0.9, 0, 0], [0, -0.8, 0]]), (50.0, -40.0, 60.0)),
}


# -- the derivation, against nibabel ------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(AFFINES))
def test_orientation_codes_are_nibabels(name: str) -> None:
    aff = AFFINES[name]
    assert axis_codes_zyx(aff) == tuple(reversed(aff2axcodes(aff)))


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_origin_is_in_the_orientation_frame(name: str) -> None:
    aff = AFFINES[name]
    ornt = io_orientation(aff)  # per voxel axis i, j, k: (world axis, +1/-1)
    want = [ornt[c, 1] * aff[int(ornt[c, 0]), 3] for c in (2, 1, 0)]
    np.testing.assert_allclose(origin_zyx(aff), want)


def test_named_orientations() -> None:
    assert axis_codes_zyx(AFFINES["RAS"]) == ("S", "A", "R")
    assert axis_codes_zyx(AFFINES["LPS"]) == ("S", "P", "L")
    np.testing.assert_allclose(origin_zyx(AFFINES["LPS"]), (-100.0, -30.5, -20.0))


# -- converted stores ---------------------------------------------------------------------------
SHAPE = (66, 34, 30)  # (z, y, x): two pyramid levels

#: pairs cases: name -> (orientation affine, NIfTI class, byte order, mask dtype, qform only)
PAIRS: dict[str, tuple[str, type[nib.Nifti1Image], str, str, bool]] = {
    "las_qform_only": ("LAS", nib.Nifti1Image, "<", "uint8", True),
    "rpi_big_endian": ("RPI", nib.Nifti1Image, ">", ">i2", False),
    "oblique_float_mask": ("oblique", nib.Nifti1Image, "<", "float32", False),
    "lps_nifti2": ("LPS", nib.Nifti2Image, "<", "uint8", False),
    "ras_nifti2_big_endian": ("RAS", nib.Nifti2Image, ">", ">u2", False),
    "permuted": ("permuted", nib.Nifti1Image, "<", "uint8", False),
}


def _save(
    path: Path, data_zyx: np.ndarray, affine: np.ndarray, klass: Any, order: str, qform_only: bool
) -> None:
    hdr = klass.header_class(endianness=order)
    hdr.set_data_dtype(data_zyx.dtype)
    hdr.set_xyzt_units("mm", "sec")
    img = klass(data_zyx.transpose(2, 1, 0), affine, header=hdr)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=0 if qform_only else 1)
    img.to_filename(path)


@pytest.fixture(scope="module")
def pairs_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pairs") / "src"
    root.mkdir()
    rng = np.random.default_rng(11)
    lines = ["case_id,image,seg"]
    for cid, (orient, klass, order, mask_dtype, qform_only) in PAIRS.items():
        ct = rng.integers(-1024, 2000, size=SHAPE).astype(np.int16)
        mask = rng.integers(0, 4, size=SHAPE).astype(mask_dtype)
        for kind, data in (("ct", ct), ("seg", mask)):
            _save(root / f"{cid}_{kind}.nii.gz", data, AFFINES[orient], klass, order, qform_only)
        lines.append(f"{cid},{cid}_ct.nii.gz,{cid}_seg.nii.gz")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    labels = root / "labels.json"
    labels.write_text(json.dumps({"0": "background", "1": "a", "2": "b", "3": "c"}))
    dest = tmp_path_factory.mktemp("stores") / "pairs.zarr"
    report = ctzarr.convert(root / "manifest.csv", dest, labels=[f"seg={labels}"], progress=False)
    assert report.ok, report
    return root, dest


def _stores(request: pytest.FixtureRequest, layout: str) -> tuple[Path, Path]:
    if layout == "pairs":
        source, store = request.getfixturevalue("pairs_store")
        return source, store
    return request.getfixturevalue(f"{layout}_source"), request.getfixturevalue(f"{layout}_store")


LAYOUTS = {"dap_atlas": "dap", "saros": "saros", "pairs": "pairs"}


def _expected_translation(affine: np.ndarray) -> list[float]:
    """Voxel-0 centre along each store axis's anatomical direction (independent of ctzarr)."""
    ornt = io_orientation(affine)
    return [float(ornt[c, 1] * affine[int(ornt[c, 0]), 3]) for c in (2, 1, 0)]


def _check_ome(group: zarr.Group, affine: np.ndarray, where: str) -> None:
    ms = group.attrs["ome"]["multiscales"][0]
    values = [a["orientation"]["value"] for a in ms["axes"]]
    assert values == [RFC4[c] for c in reversed(aff2axcodes(affine))], where
    assert all(a["orientation"]["type"] == "anatomical" for a in ms["axes"]), where
    scale0 = None
    for level, ds in enumerate(ms["datasets"]):
        tr = {t["type"]: t for t in ds["coordinateTransformations"]}
        scale = np.asarray(tr["scale"]["scale"])
        assert (scale > 0).all(), where
        if scale0 is None:
            scale0 = scale
        f = 2**level
        np.testing.assert_allclose(scale, scale0 * f, err_msg=where)
        want = np.asarray(_expected_translation(affine)) + scale0 * (f - 1) / 2
        np.testing.assert_allclose(tr["translation"]["translation"], want, atol=1e-4, err_msg=where)


def _check_zarr2nii(
    group_path: Path, source: Path, out: Path, stored_dtype: np.dtype[Any], where: str
) -> None:
    """zarr2nii, as a user runs it, gives the source file's values, affine and the dtype."""
    niizarr.zarr2nii(str(group_path), str(out))
    got = nib.load(str(out))
    ref = nib.load(str(source))
    np.testing.assert_array_equal(
        np.asanyarray(got.dataobj), np.asanyarray(ref.dataobj), err_msg=where
    )
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-5, err_msg=where)
    assert got.get_data_dtype().newbyteorder("=") == stored_dtype, where


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_group_reads_back_as_its_source(
    layout: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    source, store = _stores(request, LAYOUTS[layout])
    col = ctzarr.open_collection(store)
    assert col.meta.format_version == FORMAT_VERSION >= 2
    seen = set()
    for cid in col.case_ids:
        case = col[cid]
        assert case.meta.format_version == FORMAT_VERSION
        files = case.meta.source_files
        image_src = source / files["image"].path
        ref_affine = nib.load(str(image_src)).affine
        seen.add(aff2axcodes(ref_affine))
        grp = zarr.open_group(store / "cases" / cid, mode="r")
        Image.from_zarr(grp)
        _check_ome(grp, ref_affine, f"{cid} image")
        _check_zarr2nii(
            store / "cases" / cid, image_src, tmp_path / f"{cid}.nii.gz", grp["0"].dtype, cid
        )
        for seg in case.segmentation_names:
            where = f"{cid} labels {seg}"
            seg_src = source / files[seg].path
            seg_affine = nib.load(str(seg_src)).affine
            lgrp = zarr.open_group(store / "cases" / cid / "labels" / seg, mode="r")
            ImageLabel.from_zarr(lgrp)
            _check_ome(lgrp, seg_affine, where)
            _check_zarr2nii(
                store / "cases" / cid / "labels" / seg,
                seg_src,
                tmp_path / f"{cid}_{seg}.nii.gz",
                lgrp["0"].dtype,
                where,
            )
            # a coarser level lands on the same world box (the OME translations agree);
            # nifti-zarr 1.0.0rc9 cannot take a level > 0 of a header without an sform
            # (it multiplies the missing sform), so qform-only sources are left out here
            sform_code = int(nib.load(str(seg_src)).header["sform_code"])
            if len(lgrp.attrs["ome"]["multiscales"][0]["datasets"]) > 1 and sform_code:
                img1 = niizarr.zarr2nii(str(store / "cases" / cid / "labels" / seg), level=1)
                step = np.diag([2.0, 2.0, 2.0, 1.0])
                step[:3, 3] = 0.5
                np.testing.assert_allclose(
                    img1.header.get_best_affine(), seg_affine @ step, atol=1e-4, err_msg=where
                )
    want = {
        "dap_atlas": {("R", "A", "S"), ("L", "P", "S")},
        "saros": {("R", "A", "S"), ("L", "P", "S")},
        "pairs": {("L", "A", "S"), ("R", "P", "I"), ("L", "P", "S"), ("R", "A", "S")},
    }[layout]
    assert want <= seen


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_array_has_dimension_names(layout: str, request: pytest.FixtureRequest) -> None:
    _, store = _stores(request, LAYOUTS[layout])
    root = zarr.open_group(store, mode="r")
    n = 0
    for path, node in root.members(max_depth=None):
        if isinstance(node, zarr.Array):
            names = node.metadata.dimension_names
            assert names is not None, path
            assert len(names) == node.ndim, path
            assert all(isinstance(d, str) and d for d in names), path
            if path.rpartition("/")[2].isdigit():
                assert names == ("z", "y", "x"), path
            n += 1
    assert n > 5


def test_zarr2nii_console_script(pairs_store: tuple[Path, Path], tmp_path: Path) -> None:
    """The ``zarr2nii`` command on a label group writes the source segmentation."""
    source, store = pairs_store
    cid = "lps_nifti2"
    out = tmp_path / "seg.nii.gz"
    script = Path(sys.executable).parent / "zarr2nii"
    subprocess.run(
        [str(script), str(store / "cases" / cid / "labels" / "seg"), str(out)], check=True
    )
    got, ref = nib.load(str(out)), nib.load(str(source / f"{cid}_seg.nii.gz"))
    assert isinstance(got, nib.Nifti2Image)
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-5)
    assert aff2axcodes(got.affine) == ("L", "P", "S")


# -- format versions ----------------------------------------------------------------------------
def _set_format(zarr_json: Path, version: Any) -> None:
    doc = json.loads(zarr_json.read_text())
    doc["attributes"]["ctzarr"]["format_version"] = version
    zarr_json.write_text(json.dumps(doc))


def test_newer_store_format_is_a_typed_error(
    dap_source: Path, dap_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "s.zarr"
    shutil.copytree(dap_store, copy)
    _set_format(copy / "zarr.json", NEWER)
    with pytest.raises(
        ctzarr.UnsupportedFormatError, match=rf"format {NEWER}\b.*upgrade ctzarr"
    ) as info:
        ctzarr.open_collection(copy)
    assert isinstance(info.value, ctzarr.StoreError)
    assert not isinstance(info.value, ctzarr.ChunkCorruptError)  # not damage: never repaired
    assert info.value.version == NEWER
    assert f"ctzarr {ctzarr.__version__}" in str(info.value)  # the writer's release reads it
    # the command line: one line, no traceback, non-zero status
    assert main(["info", str(copy)]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"format {NEWER}" in err
    assert "Traceback" not in err
    # converting into it is refused too (never an older case in a newer store)
    with pytest.raises(ctzarr.UnsupportedFormatError):
        ctzarr.convert(dap_source, copy, progress=False)


def test_newer_case_format_is_a_typed_error_before_its_layout_is_read(
    dap_store: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "s.zarr"
    shutil.copytree(dap_store, copy)
    cid = ctzarr.open_collection(copy).case_ids[0]
    case_json = copy / "cases" / cid / "zarr.json"
    doc = json.loads(case_json.read_text())
    doc["attributes"]["ctzarr"]["format_version"] = NEWER
    del doc["attributes"]["ctzarr"]["nifti"]  # a newer format may look different
    # an array ctzarr 2 would refuse as unsafe: the version is reported, not the array
    doc["consolidated_metadata"]["metadata"]["0"]["data_type"] = "float16"
    case_json.write_text(json.dumps(doc))
    col = ctzarr.open_collection(copy)
    with pytest.raises(ctzarr.UnsupportedFormatError, match=rf"case '{cid}'.*format {NEWER}\b"):
        col[cid]


def test_format_1_store_reads_without_label_headers_or_orientation(tmp_path: Path) -> None:
    copy = tmp_path / "dap_atlas.zarr"
    shutil.copytree(GOLDEN / "dap_atlas.zarr", copy)
    col = ctzarr.open_collection(copy)
    assert col.meta.format_version == 1
    case = col[col.case_ids[0]]
    assert case.meta.format_version == 1
    assert "labels/anatomy/nifti" not in case.array_paths
    ome = case.meta.to_attributes()["ome"]  # a format-1 case keeps its format-1 OME block
    assert ome == zarr.open_group(copy / "cases" / case.case_id, mode="r").attrs["ome"]
    written = case.to_nifti(tmp_path / "out")
    seg = nib.load(str(written["anatomy"]))
    np.testing.assert_allclose(seg.affine, case.affine, atol=1e-5)
    np.testing.assert_array_equal(
        np.asanyarray(seg.dataobj).transpose(2, 1, 0), case.labels("anatomy").values
    )


def test_export_uses_the_label_header(pairs_store: tuple[Path, Path], tmp_path: Path) -> None:
    """``Case.to_nifti`` writes each segmentation with its own stored header."""
    source, store = pairs_store
    case = ctzarr.open_collection(store)["lps_nifti2"]
    written = case.to_nifti(tmp_path)
    got, ref = nib.load(str(written["seg"])), nib.load(str(source / "lps_nifti2_seg.nii.gz"))
    assert isinstance(got, nib.Nifti2Image)
    np.testing.assert_array_equal(np.asanyarray(got.dataobj), np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-5)


@pytest.mark.parametrize("kind", ["case", "collection"])
@pytest.mark.parametrize("version", [NEWER, 99])
def test_newer_format_in_attributes_names_version_and_key(
    dap_store: Path, kind: str, version: int
) -> None:
    """The typed model refuses a newer format before any other key (the rest may differ)."""
    col = ctzarr.open_collection(dap_store)
    if kind == "case":
        model: Any = CaseAttributes
        attrs = copy.deepcopy(col[col.case_ids[0]].meta.to_attributes())
    else:
        model = CollectionAttributes
        attrs = copy.deepcopy(col.meta.to_attributes())
    attrs["ctzarr"]["format_version"] = version
    attrs["ctzarr"]["segmentations"] = "reshaped in a later format"
    with pytest.raises(ctzarr.UnsupportedFormatError) as info:
        model.from_attributes(attrs, where="case 'x' in /p/s.zarr")
    msg = str(info.value)
    assert msg.startswith("case 'x' in /p/s.zarr: attribute ctzarr.format_version: ")
    assert f"store format {version} is newer" in msg
    assert "upgrade ctzarr" in msg
    assert (info.value.key, info.value.version, info.value.readable) == (
        "ctzarr.format_version",
        version,
        FORMAT_VERSION,
    )


@pytest.mark.parametrize("version", [1, 2])
def test_formats_1_and_2_parse(dap_store: Path, version: int) -> None:
    col = ctzarr.open_collection(dap_store)
    attrs = copy.deepcopy(col[col.case_ids[0]].meta.to_attributes())
    attrs["ctzarr"]["format_version"] = version
    meta = CaseAttributes.from_attributes(attrs)
    assert meta.format_version == version
    axes = meta.to_attributes()["ome"]["multiscales"][0]["axes"]
    assert all(("orientation" in a) == (version == 2) for a in axes)
