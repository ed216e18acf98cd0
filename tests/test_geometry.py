"""Geometry you can trust: voxel spacing comes from the affine, the geometry positions use.

- ``pixdim`` that disagrees with the affine's column norms gets a warning naming the file and
  both values, recorded in the case's provenance (``case.meta.nifti.notes``); spacing, volumes
  and the OME scale come from the affine. One flipped bit of ``pixdim`` can no longer turn a
  kidney of a few millilitres into 1e30 ml.
- A spacing that is not finite, below 1e-6 mm or above 1e4 mm is an :class:`InvalidNiftiError`.
- A single file whose ``vox_offset`` points into the header (0 included: nibabel reads such a
  file from byte 0) is an :class:`InvalidNiftiError`, never read from some other offset.
- Valid files are unchanged: their spacing is pixdim bit for bit.
"""

from __future__ import annotations

import gzip
import io
import struct
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import ctzarr
from ctzarr.errors import CtzarrWarning, InvalidNiftiError
from ctzarr.sources.nifti import open_nifti

from .conftest import nifti_zyx, write_pairs

SHAPE_ZYX = (10, 12, 14)
SPACING_XYZ = (0.8, 0.75, 2.5)


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(21)
    ct = rng.integers(-1000, 1500, size=SHAPE_ZYX).astype(np.int16)
    mask = np.zeros(SHAPE_ZYX, np.uint8)
    mask[2:7, 3:9, 4:11] = 1
    mask[6:9, 1:4, 1:5] = 2
    return ct, mask


def _affine(oblique: bool = False) -> np.ndarray:
    aff = np.diag([*SPACING_XYZ, 1.0])
    aff[:3, 3] = (-40.0, 12.5, -300.0)
    if oblique:
        a = 0.3
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        aff[:3, :3] = rot @ aff[:3, :3]
    return aff


def _column_norms_zyx(affine: np.ndarray) -> tuple[float, ...]:
    """An independent numpy computation of the spacing: the affine's column norms, (z, y, x)."""
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    return tuple(float(np.sqrt(a[0, c] ** 2 + a[1, c] ** 2 + a[2, c] ** 2)) for c in (2, 1, 0))


def _edit(path: Path, edit: Callable[[nib.Nifti1Header], None]) -> None:
    """Edit header fields of a .nii.gz in place, keeping the voxel bytes."""
    raw = gzip.decompress(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    edit(hdr)
    path.write_bytes(gzip.compress(hdr.binaryblock + raw[348:]))


def _set_pixdim(index: int, value: float) -> Callable[[nib.Nifti1Header], None]:
    def edit(hdr: nib.Nifti1Header) -> None:
        pixdim = np.array(hdr["pixdim"])
        pixdim[index] = value
        hdr["pixdim"] = pixdim

    return edit


def _flip_bit(value: float, bit: int) -> float:
    """value as float32 with one bit flipped."""
    (word,) = struct.unpack("<I", struct.pack("<f", value))
    (out,) = struct.unpack("<f", struct.pack("<I", word ^ (1 << bit)))
    return float(out)


@pytest.fixture
def pairs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(manifest, labels.json, image file) of a one-case pairs dataset with an RAS affine."""
    ct, mask = _phantom()
    manifest, labels = write_pairs(tmp_path / "src", {"k1": (ct, mask, _affine())})
    return manifest, labels, tmp_path / "src" / "k1_ct.nii.gz"


def _convert(manifest: Path, labels: Path, dest: Path) -> ctzarr.Collection:
    report = ctzarr.convert(manifest, dest, labels=[str(labels)], progress=False)
    assert report.ok, str(report)
    return ctzarr.open_collection(dest)


# -- pixdim that contradicts the affine ---------------------------------------------------------


@pytest.mark.parametrize(
    ("index", "value"),
    [
        pytest.param(3, _flip_bit(2.5, 29), id="z-exponent-bit-flipped"),  # 2.5 -> 4.6e19
        pytest.param(1, _flip_bit(0.8, 23), id="x-low-exponent-bit-flipped"),  # 0.8 -> 1.6
        pytest.param(2, 0.75 * (1 + 1e-3), id="y-off-by-1e-3"),
    ],
)
def test_pixdim_disagreeing_warns_and_spacing_comes_from_the_affine(
    pairs: tuple[Path, Path, Path], tmp_path: Path, index: int, value: float
) -> None:
    manifest, labels, image = pairs
    _edit(image, _set_pixdim(index, value))
    ref = nib.load(str(image))
    assert ref.header.get_zooms()[index - 1] == np.float32(value)  # nibabel sees the bad pixdim
    with pytest.warns(CtzarrWarning, match="pixdim") as record:
        col = _convert(manifest, labels, tmp_path / "out.zarr")
    msgs = [str(w.message) for w in record if "pixdim" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith(f"{image}: "), msgs[0]  # names the file
    assert f"{np.float32(value):.7g}" in msgs[0]  # the pixdim value
    assert f"{float(np.float32(SPACING_XYZ[index - 1])):.7g}" in msgs[0]  # the affine's spacing

    case = col["k1"]
    # provenance: the warning is kept in the case's NIfTI block (read back through the model)
    notes = [n for n in case.meta.nifti.notes if "pixdim" in n]
    assert len(notes) == 1, case.meta.nifti.notes
    assert msgs[0] == f"{image}: {notes[0]}"
    # spacing, OME scale and volumes from the affine
    spacing = _column_norms_zyx(ref.affine)
    assert case.spacing == spacing
    assert spacing == tuple(float(np.float32(s)) for s in SPACING_XYZ[::-1])
    mask = nifti_zyx(tmp_path / "src" / "k1_seg.nii.gz")
    stats = case.stats()
    for label in (1, 2):
        row = stats[stats["label"] == label].iloc[0]
        count = int(np.count_nonzero(mask == label))
        assert row["voxel_count"] == count
        assert row["volume_ml"] == count * float(np.prod(spacing)) / 1000.0
        det = abs(float(np.linalg.det(np.asarray(ref.affine)[:3, :3])))
        assert row["volume_ml"] == pytest.approx(count * det / 1000.0, rel=1e-12)
    np.testing.assert_array_equal(case.image.values, nifti_zyx(image))


def test_pixdim_disagreeing_in_a_segmentation_is_recorded_too(
    pairs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    manifest, labels, _ = pairs
    seg = tmp_path / "src" / "k1_seg.nii.gz"
    _edit(seg, _set_pixdim(1, 8.0))
    with pytest.warns(CtzarrWarning, match="pixdim") as record:
        col = _convert(manifest, labels, tmp_path / "out.zarr")
    assert any(str(w.message).startswith(f"{seg}: pixdim") for w in record)
    notes = col["k1"].meta.nifti.notes
    assert any(n.startswith("segmentation 'seg': pixdim") for n in notes), notes
    assert col["k1"].spacing == _column_norms_zyx(nib.load(str(seg)).affine)


def test_oblique_affine_with_consistent_pixdim_does_not_warn(tmp_path: Path) -> None:
    """Rotated grid: float32 rounding of pixdim and srow stays far inside the tolerance."""
    ct, mask = _phantom()
    aff = _affine(oblique=True)
    manifest, labels = write_pairs(tmp_path / "src", {"ob": (ct, mask, aff)})
    image = tmp_path / "src" / "ob_ct.nii.gz"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CtzarrWarning)
        col = _convert(manifest, labels, tmp_path / "out.zarr")
    case = col["ob"]
    assert not any("pixdim" in n for n in case.meta.nifti.notes)
    assert case.spacing == _column_norms_zyx(nib.load(str(image)).affine)
    zooms = nib.load(str(image)).header.get_zooms()
    np.testing.assert_allclose(case.spacing, zooms[::-1], rtol=1e-6)


# -- implausible spacing ------------------------------------------------------------------------


def _srow(row: str, index: int, value: float) -> Callable[[nib.Nifti1Header], None]:
    def edit(hdr: nib.Nifti1Header) -> None:
        arr = np.array(hdr[row])
        arr[index] = value
        hdr[row] = arr

    return edit


def _qform_only(axis: int, spacing: float) -> Callable[[nib.Nifti1Header], None]:
    """A qform (and pixdim) with this spacing along axis 0..2, and no sform."""

    def edit(hdr: nib.Nifti1Header) -> None:
        aff = hdr.get_sform()
        aff[:3, axis] *= spacing / np.linalg.norm(aff[:3, axis])
        hdr.set_qform(aff, code=1)  # sets pixdim too
        hdr["sform_code"] = 0

    return edit


@pytest.mark.parametrize(
    ("edit", "keywords"),
    [
        pytest.param(_srow("srow_x", 0, 1e-7), ("along x", "1e-07", "outside"), id="sform-tiny"),
        pytest.param(_srow("srow_z", 2, 2e4), ("along z", "20000", "outside"), id="sform-huge"),
        pytest.param(_qform_only(1, 5e-7), ("along y", "5e-07", "outside"), id="qform-tiny"),
        pytest.param(_qform_only(2, 1e5), ("along z", "100000", "outside"), id="qform-huge"),
        pytest.param(_srow("srow_y", 1, np.inf), ("not finite",), id="sform-inf"),
        pytest.param(_srow("srow_z", 2, np.nan), ("not finite",), id="sform-nan"),
    ],
)
def test_implausible_spacing_is_an_error(
    pairs: tuple[Path, Path, Path],
    tmp_path: Path,
    edit: Callable[[nib.Nifti1Header], None],
    keywords: tuple[str, ...],
) -> None:
    manifest, labels, image = pairs
    _edit(image, edit)
    with pytest.raises(InvalidNiftiError) as info:
        open_nifti(str(image))
    msg = str(info.value)
    assert msg.startswith(f"{image}: "), msg
    for word in keywords:
        assert word in msg, msg
    # in a conversion: the case fails with that message, nothing of it is stored
    report = ctzarr.convert(manifest, tmp_path / "out.zarr", labels=[str(labels)], progress=False)
    assert [r.case_id for r in report.failed] == ["k1"]
    assert report.failed[0].error is not None
    assert str(image) in report.failed[0].error
    assert not (tmp_path / "out.zarr" / "cases" / "k1").exists()


def test_spacing_bounds_are_inclusive(pairs: tuple[Path, Path, Path]) -> None:
    _, _, image = pairs
    _edit(image, _srow("srow_z", 2, 1e4))
    with pytest.warns(CtzarrWarning, match="pixdim"):  # pixdim still says 2.5
        assert open_nifti(str(image)).spacing_zyx[0] == 1e4


# -- vox_offset inside the header ---------------------------------------------------------------


def _nifti1_bytes(vox_offset: int | None = None) -> bytes:
    ct, _ = _phantom()
    img = nib.Nifti1Image(ct.transpose(2, 1, 0), _affine())
    raw = bytes(img.to_bytes())
    if vox_offset is None:
        return raw
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)
    hdr["vox_offset"] = vox_offset
    return hdr.binaryblock + raw[348:]


def _nifti2_bytes(vox_offset: int | None = None) -> bytes:
    ct, _ = _phantom()
    img = nib.Nifti2Image(ct.transpose(2, 1, 0), _affine())
    raw = bytes(img.to_bytes())
    if vox_offset is None:
        return raw
    hdr = nib.Nifti2Header.from_fileobj(io.BytesIO(raw[:540]), check=False)
    hdr["vox_offset"] = vox_offset
    return hdr.binaryblock + raw[540:]


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    ("make", "offset", "minimum"),
    [
        pytest.param(_nifti1_bytes, 0, 352, id="nifti1-0"),
        pytest.param(_nifti1_bytes, 348, 352, id="nifti1-348"),
        pytest.param(_nifti1_bytes, 351, 352, id="nifti1-351"),
        pytest.param(_nifti2_bytes, 0, 544, id="nifti2-0"),
        pytest.param(_nifti2_bytes, 540, 544, id="nifti2-540"),
    ],
)
def test_vox_offset_inside_the_header_is_an_error(
    tmp_path: Path, make: Callable[..., bytes], offset: int, minimum: int, suffix: str
) -> None:
    raw = make(offset)
    path = tmp_path / f"f{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    with pytest.raises(InvalidNiftiError) as info:
        open_nifti(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: vox_offset {offset} points inside the header"), msg
    assert f"at byte {minimum} or later" in msg
    if offset == 0 and make is _nifti1_bytes:
        # what ctzarr refuses to guess: nibabel takes the header itself as the first voxels
        shifted = np.asanyarray(nib.load(str(path)).dataobj)
        assert not np.array_equal(
            shifted, np.asanyarray(nib.Nifti1Image.from_bytes(make()).dataobj)
        )


@pytest.mark.parametrize("make", [_nifti1_bytes, _nifti2_bytes], ids=["nifti1", "nifti2"])
def test_vox_offset_at_the_minimum_reads_like_nibabel(
    tmp_path: Path, make: Callable[..., bytes]
) -> None:
    path = tmp_path / "f.nii"
    path.write_bytes(make())
    src = open_nifti(str(path))
    assert src.vox_offset == (352 if make is _nifti1_bytes else 544)
    values = np.concatenate([slab for _, slab in src.iter_slabs(4)])
    np.testing.assert_array_equal(values, nifti_zyx(path))


# -- valid files are unchanged ------------------------------------------------------------------


def test_valid_phantoms_keep_pixdim_spacing_bit_for_bit(dap_source: Path) -> None:
    """The phantoms' pixdim agrees with their affines: spacing is pixdim itself, no warning."""
    files = sorted((dap_source / "images").glob("*.nii.gz"))
    assert files
    with warnings.catch_warnings():
        warnings.simplefilter("error", CtzarrWarning)
        for f in files:
            src = open_nifti(str(f))
            zooms = tuple(float(z) for z in nib.load(str(f)).header.get_zooms()[::-1])
            assert src.spacing_zyx == zooms
            assert src.spacing_zyx == _column_norms_zyx(src.affine)
            assert not any("pixdim" in n for n in src.notes)
