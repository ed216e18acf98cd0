"""Bad inputs: each malformed, hostile or inconsistent source gets its error and leaves no case.

Most tests build a valid two-case DAP Atlas phantom, replace ONE file of one case by a bad one,
convert the whole directory and check that

- the report has exactly that case failed, with a message naming the file, the case and the fault;
- the other case converted and reads back equal to what nibabel reads;
- the failed case is not listed, its state is "absent" and nothing of it is left on disk.

Bad files are made from valid nibabel output by editing bytes: the header through
``nib.Nifti1Header`` and the container through ``gzip``.
"""

from __future__ import annotations

import collections
import csv
import gzip
import io
import logging
import shutil
import time
import tracemalloc
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

import ctzarr
from ctzarr.errors import (
    CtzarrWarning,
    InvalidCaseIdError,
    InvalidNiftiError,
    LayoutError,
)
from ctzarr.io.transactions import case_state
from ctzarr.read.collection import open_collection
from ctzarr.sources.layouts import validate_case_id
from ctzarr.sources.nifti import open_nifti
from ctzarr.testing.phantom import write_dap_atlas

SHAPE_ZYX = (20, 24, 24)


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("dap-template") / "DAP"
    names = write_dap_atlas(root, n_cases=2, shape_zyx=SHAPE_ZYX, seed=11)
    return root, names


@dataclass
class Dataset:
    src: Path
    dest: Path
    good: str
    bad: str
    template: Path

    def file(self, role: str, case_id: str | None = None) -> Path:
        sub = {"image": "images", "mask": "masks"}[role]
        return self.src / sub / f"{case_id or self.bad}.nii.gz"

    def original(self, role: str, case_id: str | None = None) -> Path:
        sub = {"image": "images", "mask": "masks"}[role]
        return self.template / sub / f"{case_id or self.bad}.nii.gz"

    def convert(self) -> ctzarr.ConversionReport:
        return ctzarr.convert(self.src, self.dest, progress=False)


@pytest.fixture
def ds(template: tuple[Path, list[str]], tmp_path: Path) -> Dataset:
    root, names = template
    src = tmp_path / "DAP"
    shutil.copytree(root, src)
    # the bad case is the second (LPS-stored) one; the good one has an RAS affine
    return Dataset(src=src, dest=tmp_path / "out.zarr", good=names[0], bad=names[1], template=root)


def nifti_zyx(path: Path) -> np.ndarray:
    """What nibabel reads, in ctzarr's (z, y, x) order (single-volume 4D squeezed)."""
    data = np.asanyarray(nib.load(str(path)).dataobj)
    if data.ndim == 4:
        assert data.shape[3] == 1
        data = data[..., 0]
    return data.transpose(2, 1, 0)


def assert_good_case_readable(ds: Dataset) -> None:
    col = open_collection(ds.dest)
    assert ds.good in col.case_ids
    case = col[ds.good]
    np.testing.assert_array_equal(case.image.values, nifti_zyx(ds.file("image", ds.good)))
    np.testing.assert_array_equal(
        case.labels("anatomy").values, nifti_zyx(ds.file("mask", ds.good))
    )


def assert_case_absent(dest: Path, case_id: str) -> None:
    col = open_collection(dest)
    assert case_id not in col.case_ids
    assert case_id not in col
    with pytest.raises(KeyError):
        col[case_id]
    root = zarr.open_group(str(dest), mode="r", zarr_format=3)
    assert case_state(root, case_id)[0] == "absent"
    assert not (dest / "cases" / case_id).exists(), sorted(
        str(p.relative_to(dest)) for p in (dest / "cases" / case_id).rglob("*")
    )


def assert_only_bad_failed(
    ds: Dataset, report: ctzarr.ConversionReport, bad_file: Path, keywords: tuple[str, ...]
) -> str:
    """The only failure is the bad case, naming its file and fault; returns the message."""
    assert not report.ok
    assert [r.case_id for r in report.failed] == [ds.bad], str(report)
    assert report.converted == [ds.good], str(report)
    err = report.failed[0].error
    assert err is not None
    assert str(bad_file) in err, err
    assert ds.bad in err, err
    low = err.lower()
    for word in keywords:
        assert word.lower() in low, f"{word!r} not in {err!r}"
    assert_good_case_readable(ds)
    assert_case_absent(ds.dest, ds.bad)
    return err


def read_all(path: Path, case_id: str | None = None) -> None:
    """Validate the header and stream every slab (to the end of the gzip stream)."""
    for _ in open_nifti(str(path), case_id=case_id).iter_slabs(8):
        pass


# -- making bad files -------------------------------------------------------------------------


def _header(raw: bytes) -> nib.Nifti1Header:
    return nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]), check=False)


def with_header(edit: Callable[[nib.Nifti1Header], None]) -> Callable[[bytes], bytes]:
    """A maker that edits header fields of the (gzip) file and keeps its voxel bytes."""

    def make(gz: bytes) -> bytes:
        raw = gzip.decompress(gz)
        hdr = _header(raw)
        edit(hdr)
        return gzip.compress(hdr.binaryblock + raw[348:])

    return make


def with_data(edit: Callable[[np.ndarray], np.ndarray]) -> Callable[[bytes], bytes]:
    """A maker that rewrites the voxel data through nibabel, keeping header geometry."""

    def make(gz: bytes) -> bytes:
        img = nib.Nifti1Image.from_bytes(gzip.decompress(gz))
        data = edit(np.asanyarray(img.dataobj).copy())
        hdr = img.header.copy()
        hdr.set_data_dtype(data.dtype)
        out = nib.Nifti1Image(data, None, header=hdr)
        out.set_qform(img.get_qform(), code=int(img.header["qform_code"]))
        out.set_sform(img.get_sform(), code=int(img.header["sform_code"]))
        return gzip.compress(out.to_bytes())

    return make


def _set(*edits: tuple[str, int | None, object]) -> Callable[[bytes], bytes]:
    """A maker setting header fields: (field, index or None, value) each."""

    def edit(hdr: nib.Nifti1Header) -> None:
        for field, index, value in edits:
            if index is None:
                hdr[field] = value
            else:
                arr = np.array(hdr[field])
                arr[index] = value
                hdr[field] = arr

    return with_header(edit)


def _cut_gzip(gz: bytes) -> bytes:
    return gz[: len(gz) // 2]


def _cut_voxels(gz: bytes) -> bytes:
    raw = gzip.decompress(gz)
    return gzip.compress(raw[: 352 + (len(raw) - 352) // 2])


def _flip(offset_from_end: int) -> Callable[[bytes], bytes]:
    def make(gz: bytes) -> bytes:
        b = bytearray(gz)
        b[-offset_from_end] ^= 0xFF
        return bytes(b)

    return make


def _bomb_header(dims: tuple[int, int, int]) -> Callable[[bytes], bytes]:
    """A tiny gzip whose header declares a huge int16 volume."""

    def make(gz: bytes) -> bytes:
        hdr = _header(gzip.decompress(gz))
        hdr.set_data_dtype(np.int16)
        hdr["dim"] = [3, *dims, 1, 1, 1, 1]
        return gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 1024)

    return make


def _rng_bytes(n: int) -> bytes:
    b = np.random.default_rng(1234).integers(0, 256, n, dtype=np.uint8).tobytes()
    return b"\x00\x00" + b[2:]  # never the gzip magic


def _four_d(volumes: int) -> Callable[[bytes], bytes]:
    return with_data(lambda a: np.stack([a] * volumes, axis=-1))


_singular_sform = _set(("srow_x", None, [0.0, 0.0, 0.0, 1.0]))
_nan_qform_only = _set(("sform_code", None, 0), ("qoffset_x", None, np.nan))


# (id, role, maker, keywords the message must contain)
BAD_FILES: list[tuple[str, str, Callable[[bytes], bytes], tuple[str, ...]]] = [
    # container faults
    ("gzip-cut-mid-voxels", "image", _cut_gzip, ("truncated",)),
    ("voxels-cut-in-valid-gzip", "image", _cut_voxels, ("truncated", "voxel data ends after")),
    ("gzip-crc-flipped", "image", _flip(6), ("corrupt compressed stream", "crc")),
    ("gzip-isize-flipped", "mask", _flip(2), ("corrupt compressed stream", "length")),
    (
        "gzip-byte-flipped-mid-stream",
        "mask",
        lambda gz: _flip(len(gz) // 2)(gz),
        ("corrupt compressed stream",),
    ),
    ("raw-nifti-named-gz", "image", gzip.decompress, ("named .gz but is not a gzip file",)),
    ("random-bytes", "image", lambda gz: _rng_bytes(4000), ("not a gzip file",)),
    (
        "gzip-of-random-bytes",
        "mask",
        lambda gz: gzip.compress(_rng_bytes(4000)),
        ("not a nifti file", "sizeof_hdr"),
    ),
    ("empty-file", "mask", lambda gz: b"", ("not a gzip file",)),
    ("gzip-of-nothing", "image", lambda gz: gzip.compress(b""), ("too short", "0 bytes")),
    (
        "gzip-of-short-header",
        "image",
        lambda gz: gzip.compress(gzip.decompress(gz)[:200]),
        ("too short", "200 bytes"),
    ),
    (
        "trailing-data-after-voxels",
        "image",
        lambda gz: gzip.compress(gzip.decompress(gz) + b"extra"),
        ("trailing data",),
    ),
    ("second-gzip-member", "mask", lambda gz: gz + gz, ("trailing data",)),
    # header faults
    ("size-bomb-over-cap", "image", _bomb_header((30000, 30000, 30000)), ("declares", "cap")),
    (
        "size-bomb-beyond-deflate-ratio",
        "mask",
        _bomb_header((2000, 2000, 2000)),
        ("declares", "inflate to at most"),
    ),
    ("4d-three-volumes", "image", _four_d(3), ("4d image", "(24, 24, 20, 3)", "only 3d")),
    ("4d-two-volumes-mask", "mask", _four_d(2), ("4d image", "only 3d")),
    ("dim0-zero", "image", _set(("dim", 0, 0)), ("impossible dim[0] = 0",)),
    ("dim0-eight", "image", _set(("dim", 0, 8)), ("impossible dim[0]",)),
    ("negative-dim", "image", _set(("dim", 1, -24)), ("impossible dimensions", "-24")),
    ("zero-dim", "mask", _set(("dim", 3, 0)), ("impossible dimensions", "0")),
    (
        "complex64",
        "image",
        _set(("datatype", None, 32)),
        ("unsupported datatype", "complex64", "code 32"),
    ),
    ("rgb24", "image", _set(("datatype", None, 128)), ("unsupported datatype", "code 128")),
    ("float128", "image", _set(("datatype", None, 1536)), ("unsupported datatype", "code 1536")),
    (
        "unknown-datatype-code",
        "mask",
        _set(("datatype", None, 999)),
        ("unsupported datatype code 999",),
    ),
    (
        "scl-slope-inf",
        "image",
        _set(("scl_slope", None, np.inf)),
        ("non-finite scaling", "scl_slope=inf"),
    ),
    (
        "scl-inter-nan",
        "image",
        _set(("scl_slope", None, 2.0), ("scl_inter", None, np.nan)),
        ("non-finite scaling", "scl_inter=nan"),
    ),
    ("nan-in-sform", "image", _set(("srow_x", 0, np.nan)), ("affine is not finite",)),
    ("nan-in-qform-without-sform", "mask", _nan_qform_only, ("affine is not finite",)),
    ("singular-sform", "image", _singular_sform, ("singular",)),
    ("zero-pixdim", "image", _set(("pixdim", 1, 0.0)), ("pixdim", "positive")),
    ("negative-pixdim", "mask", _set(("pixdim", 3, -2.0)), ("pixdim", "positive")),
    ("inf-pixdim", "image", _set(("pixdim", 2, np.inf)), ("pixdim", "finite")),
    ("bad-magic", "image", _set(("magic", None, b"abc")), ("bad nifti magic",)),
    ("hdr-img-pair-magic", "mask", _set(("magic", None, b"ni1")), ("header/image pairs",)),
    (
        "vox-offset-inside-header",
        "image",
        _set(("vox_offset", None, 200)),
        ("vox_offset 200", "inside the header"),
    ),
    (
        "vox-offset-past-end",
        "image",
        _set(("vox_offset", None, 1_000_000)),
        ("truncated", "header"),
    ),
    # segmentation content
    (
        "labels-int16-300-and-negative",
        "mask",
        with_data(lambda a: _put(a.astype(np.int16), [300, -1])),
        ("label ids [-1, 300]", "not in label map"),
    ),
    (
        "labels-non-integer",
        "mask",
        with_data(lambda a: _put(a.astype(np.float32), [1.5])),
        ("non-integer label",),
    ),
]


def _put(a: np.ndarray, values: list[float]) -> np.ndarray:
    flat = a.reshape(-1)
    for i, v in enumerate(values):
        flat[100 + 37 * i] = v
    return a


# --------------------------------------------------------------------------------------------
# One bad file among good ones
# --------------------------------------------------------------------------------------------


#: faults also covered through a whole conversion (the rest only through open_nifti, to keep the
#: module fast: every conversion costs a few tenths of a second)
IN_DATASET = {
    "gzip-cut-mid-voxels",
    "voxels-cut-in-valid-gzip",
    "raw-nifti-named-gz",
    "random-bytes",
    "gzip-of-random-bytes",
    "trailing-data-after-voxels",
    "size-bomb-beyond-deflate-ratio",
    "4d-three-volumes",
    "negative-dim",
    "zero-dim",
    "complex64",
    "scl-slope-inf",
    "nan-in-sform",
    "zero-pixdim",
    "labels-int16-300-and-negative",
    "labels-non-integer",
}


@pytest.mark.parametrize(
    ("role", "make", "keywords"),
    [pytest.param(*p[1:], id=p[0]) for p in BAD_FILES if p[0] in IN_DATASET],
)
def test_one_bad_file_fails_only_its_case(
    ds: Dataset, role: str, make: Callable[[bytes], bytes], keywords: tuple[str, ...]
) -> None:
    bad_file = ds.file(role)
    bad_file.write_bytes(make(bad_file.read_bytes()))
    report = ds.convert()
    assert_only_bad_failed(ds, report, bad_file, keywords)


@pytest.mark.parametrize(
    ("role", "make", "keywords"),
    [pytest.param(*p[1:], id=p[0]) for p in BAD_FILES if not p[0].startswith("labels-")],
)
def test_open_nifti_rejects_bad_file(
    tmp_path: Path,
    template: tuple[Path, list[str]],
    role: str,
    make: Callable[[bytes], bytes],
    keywords: tuple[str, ...],
) -> None:
    """The same files through open_nifti and streaming: InvalidNiftiError naming the path."""
    root, names = template
    src = root / ("images" if role == "image" else "masks") / f"{names[1]}.nii.gz"
    path = tmp_path / "bad.nii.gz"
    path.write_bytes(make(src.read_bytes()))
    with pytest.raises(InvalidNiftiError) as info:
        read_all(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == str(path)
    assert str(err).startswith(f"{path}: ")  # no case id given: the message starts with the path
    assert err.case_id is None
    for word in keywords:
        assert word.lower() in str(err).lower(), str(err)
    # with a case id the message leads with it
    with pytest.raises(InvalidNiftiError, match=r"^case 'c-1': "):
        read_all(path, case_id="c-1")


def test_impossible_dim0_is_reported_as_written(
    tmp_path: Path, template: tuple[Path, list[str]]
) -> None:
    root, names = template
    path = tmp_path / "dim0.nii.gz"
    path.write_bytes(_set(("dim", 0, 8))((root / "images" / f"{names[0]}.nii.gz").read_bytes()))
    assert (
        int.from_bytes(gzip.decompress(path.read_bytes())[:4], "little") == 348
    )  # a little-endian header
    with pytest.raises(InvalidNiftiError, match=r"impossible dim\[0\] = 8$"):
        open_nifti(str(path))


# --------------------------------------------------------------------------------------------
# Container faults nibabel does not see
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset_from_end", [pytest.param(8, id="crc-byte-0"), pytest.param(5, id="crc-byte-3")]
)
def test_corrupt_gzip_crc_is_caught_although_nibabel_loads_it(
    ds: Dataset, offset_from_end: int
) -> None:
    bad_file = ds.file("image")
    bad_file.write_bytes(_flip(offset_from_end)(bad_file.read_bytes()))
    # nibabel stops reading at the last voxel, so it never sees the trailer: it loads the file
    # and returns the very same voxels as from the intact file. That is why ctzarr reads on.
    np.testing.assert_array_equal(nifti_zyx(bad_file), nifti_zyx(ds.original("image")))
    report = ds.convert()
    assert_only_bad_failed(ds, report, bad_file, ("corrupt compressed stream", "crc check failed"))


def test_truncated_gzip_fails_before_the_end_in_open_nifti_or_stream(
    tmp_path: Path, template: tuple[Path, list[str]]
) -> None:
    """A gzip cut inside the voxel data passes the header check, then fails while streaming."""
    root, names = template
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(_cut_gzip((root / "images" / f"{names[0]}.nii.gz").read_bytes()))
    source = open_nifti(str(path), case_id="cut")  # the header is intact
    assert source.shape_zyx == SHAPE_ZYX
    with pytest.raises(InvalidNiftiError, match="truncated") as info:
        list(source.iter_slabs(4))
    assert str(path) in str(info.value)
    assert "'cut'" in str(info.value)


# --------------------------------------------------------------------------------------------
# Size bombs: refused from the header alone, fast, without allocating
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dims", "match"),
    [
        pytest.param((30000, 30000, 30000), "over the .* byte cap", id="54TB-over-cap"),
        pytest.param((2000, 2000, 2000), "can inflate to at most", id="16GB-beyond-deflate-ratio"),
    ],
)
def test_size_bomb_fails_fast_without_allocating(
    tmp_path: Path, template: tuple[Path, list[str]], dims: tuple[int, int, int], match: str
) -> None:
    root, names = template
    path = tmp_path / "bomb.nii.gz"
    path.write_bytes(_bomb_header(dims)((root / "images" / f"{names[0]}.nii.gz").read_bytes()))
    assert path.stat().st_size < 2000
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(InvalidNiftiError, match=match) as info:
            open_nifti(str(path), case_id="bomb")
        elapsed = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5, elapsed
    assert peak < 50 * 2**20, peak
    assert str(path) in str(info.value)
    assert str(2 * int(np.prod(dims))) in str(info.value)  # names the declared byte count


def test_size_bomb_uncompressed_nii(tmp_path: Path, template: tuple[Path, list[str]]) -> None:
    """An uncompressed .nii must hold every byte its header declares."""
    root, names = template
    raw = gzip.decompress((root / "images" / f"{names[0]}.nii.gz").read_bytes())
    hdr = _header(raw)
    hdr["dim"] = [3, 1000, 1000, 1000, 1, 1, 1, 1]
    path = tmp_path / "bomb.nii"
    path.write_bytes(hdr.binaryblock + raw[348:])
    t0 = time.perf_counter()
    with pytest.raises(InvalidNiftiError, match="holds only") as info:
        open_nifti(str(path))
    assert time.perf_counter() - t0 < 0.5
    assert str(path) in str(info.value)


def test_size_bomb_in_dataset_fails_fast(ds: Dataset) -> None:
    bad_file = ds.file("image")
    bad_file.write_bytes(_bomb_header((30000, 30000, 30000))(bad_file.read_bytes()))
    report = ds.convert()
    assert_only_bad_failed(ds, report, bad_file, ("declares", "cap"))
    failed = report.failed[0]
    assert failed.seconds < 0.5, failed.seconds


# --------------------------------------------------------------------------------------------
# 4D with a single volume is fine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "roles", [pytest.param(("image",), id="image"), pytest.param(("image", "mask"), id="both")]
)
def test_4d_single_volume_is_squeezed(ds: Dataset, roles: tuple[str, ...]) -> None:
    for role in roles:
        f = ds.file(role)
        f.write_bytes(_four_d(1)(f.read_bytes()))
        assert nib.load(str(f)).shape == (24, 24, 20, 1)
    report = ds.convert()
    assert report.ok, str(report)
    assert sorted(report.converted) == sorted([ds.good, ds.bad])
    case = open_collection(ds.dest)[ds.bad]
    assert case.shape == SHAPE_ZYX
    np.testing.assert_array_equal(case.image.values, nifti_zyx(ds.original("image")))
    np.testing.assert_array_equal(case.labels("anatomy").values, nifti_zyx(ds.original("mask")))
    np.testing.assert_array_equal(case.affine, nib.load(str(ds.original("image"))).affine)
    assert any("squeezed" in n for n in case.meta.nifti.notes)
    assert_good_case_readable(ds)


# --------------------------------------------------------------------------------------------
# Image and mask that do not belong together
# --------------------------------------------------------------------------------------------


def _shift_affine(mm: float) -> Callable[[bytes], bytes]:
    def make(gz: bytes) -> bytes:
        img = nib.Nifti1Image.from_bytes(gzip.decompress(gz))
        aff = img.affine.copy()
        aff[0, 3] += mm
        img.set_qform(aff, code=1)
        img.set_sform(aff, code=1)
        return gzip.compress(img.to_bytes())

    return make


def test_mask_shape_mismatch(ds: Dataset) -> None:
    bad_file = ds.file("mask")
    bad_file.write_bytes(
        with_data(lambda a: np.ascontiguousarray(a[:, :, :-1]))(bad_file.read_bytes())
    )
    report = ds.convert()
    err = assert_only_bad_failed(
        ds, report, bad_file, ("shape (z, y, x) (19, 24, 24)", "differs", "(20, 24, 24)")
    )
    assert str(ds.file("image")) in err  # names the image it was compared with


def test_mask_affine_shifted_5mm(ds: Dataset) -> None:
    bad_file = ds.file("mask")
    bad_file.write_bytes(_shift_affine(5.0)(bad_file.read_bytes()))
    assert nib.load(str(bad_file)).shape == nib.load(str(ds.file("image"))).shape
    report = ds.convert()
    err = assert_only_bad_failed(ds, report, bad_file, ("affine differs", "by 5 mm", "tolerance"))
    assert str(ds.file("image")) in err


def test_mask_affine_within_tolerance_converts(ds: Dataset) -> None:
    bad_file = ds.file("mask")
    bad_file.write_bytes(_shift_affine(1e-4)(bad_file.read_bytes()))
    report = ds.convert()
    assert report.ok, str(report)


@pytest.mark.parametrize(
    ("values", "ids"),
    [
        pytest.param([11], "[11]", id="reserved-11"),
        pytest.param([200, 11, 200], "[11, 200]", id="11-and-200"),
    ],
)
def test_unknown_label_ids_are_listed(ds: Dataset, values: list[int], ids: str) -> None:
    bad_file = ds.file("mask")
    bad_file.write_bytes(with_data(lambda a: _put(a, values))(bad_file.read_bytes()))
    report = ds.convert()
    assert_only_bad_failed(ds, report, bad_file, (f"label ids {ids}", "not in label map"))


# --------------------------------------------------------------------------------------------
# qform / sform disagreement: a warning, and the sform wins
# --------------------------------------------------------------------------------------------


def _shift_qform(mm: float) -> Callable[[bytes], bytes]:
    def make(gz: bytes) -> bytes:
        raw = gzip.decompress(gz)
        hdr = _header(raw)
        q = hdr.get_sform()
        q[1, 3] += mm
        hdr.set_qform(q, code=1)
        return gzip.compress(hdr.binaryblock + raw[348:])

    return make


def test_qform_sform_disagreement_warns_and_uses_sform(ds: Dataset) -> None:
    bad_file = ds.file("image")
    bad_file.write_bytes(_shift_qform(0.01)(bad_file.read_bytes()))
    hdr = nib.load(str(bad_file)).header
    sform, qform = hdr.get_sform(), hdr.get_qform()
    assert not np.allclose(sform, qform, atol=1e-3, rtol=0)
    with pytest.warns(CtzarrWarning, match="qform and sform disagree") as record:
        report = ds.convert()
    assert report.ok, str(report)
    assert any(str(bad_file) in str(w.message) for w in record)
    case = open_collection(ds.dest)[ds.bad]
    np.testing.assert_array_equal(case.affine, sform)
    np.testing.assert_array_equal(case.image.values, nifti_zyx(ds.original("image")))
    assert any("disagree" in n for n in case.meta.nifti.notes)


def test_valid_dataset_and_tiny_qform_gap_emit_no_warning(ds: Dataset) -> None:
    bad_file = ds.file("image")
    bad_file.write_bytes(_shift_qform(1e-6)(bad_file.read_bytes()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CtzarrWarning)
        report = ds.convert()
    assert report.ok, str(report)


# --------------------------------------------------------------------------------------------
# Re-running after a failure
# --------------------------------------------------------------------------------------------


def test_rerun_after_failure_skips_good_and_fails_bad_again(ds: Dataset) -> None:
    bad_file = ds.file("image")
    bad_file.write_bytes(
        _flip(6)(bad_file.read_bytes())
    )  # fails only after all voxels were written
    first = ds.convert()
    err = assert_only_bad_failed(ds, first, bad_file, ("crc",))
    good_meta = open_collection(ds.dest)[ds.good].meta

    second = ds.convert()
    assert second.skipped == [ds.good]
    assert second.converted == []
    assert [(r.case_id, r.error) for r in second.failed] == [(ds.bad, err)]
    assert open_collection(ds.dest)[ds.good].meta.committed_at == good_meta.committed_at
    assert_good_case_readable(ds)
    assert_case_absent(ds.dest, ds.bad)

    # once the file is repaired, the next run converts exactly that case
    shutil.copyfile(ds.original("image"), bad_file)
    third = ds.convert()
    assert third.ok, str(third)
    assert third.converted == [ds.bad]
    assert third.skipped == [ds.good]
    np.testing.assert_array_equal(
        open_collection(ds.dest)[ds.bad].image.values, nifti_zyx(bad_file)
    )


# --------------------------------------------------------------------------------------------
# Hostile case ids and malformed manifests (pairs layout)
# --------------------------------------------------------------------------------------------


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _pairs_dir(
    tmp_path: Path,
    template: tuple[Path, list[str]],
    rows: list[list[str]],
    header: tuple[str, ...] = ("case_id", "image", "seg"),
) -> Path:
    root, names = template
    d = tmp_path / "pairs"
    d.mkdir()
    for n in names:
        shutil.copyfile(root / "images" / f"{n}.nii.gz", d / f"{n}_ct.nii.gz")
        shutil.copyfile(root / "masks" / f"{n}.nii.gz", d / f"{n}_seg.nii.gz")
    shutil.copyfile(root / "labels.json", d / "labels.json")
    with open(d / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return d


HOSTILE_IDS = [
    pytest.param("../evil", id="dotdot-slash"),
    pytest.param("a/b", id="slash"),
    pytest.param("/abs", id="absolute"),
    pytest.param("..", id="dotdot"),
    pytest.param("x\x00y", id="nul"),
    pytest.param("", id="empty"),
    pytest.param("a\\b", id="backslash"),
    pytest.param("..\\evil", id="dotdot-backslash"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("a..b", id="inner-dotdot"),
    pytest.param("a b", id="space"),
    pytest.param("x" * 129, id="129-chars"),
    pytest.param("caf\u00e9", id="non-ascii"),
]


@pytest.mark.parametrize("bad_id", HOSTILE_IDS)
@pytest.mark.parametrize("row", [0, 1], ids=["first-row", "second-row"])
def test_hostile_case_id_in_manifest_rejected_before_writing(
    tmp_path: Path, template: tuple[Path, list[str]], bad_id: str, row: int
) -> None:
    _, names = template
    rows = [[n, f"{n}_ct.nii.gz", f"{n}_seg.nii.gz"] for n in names]
    rows[row][0] = bad_id
    d = _pairs_dir(tmp_path, template, rows)
    dest = d / "out.zarr"
    before = _tree(tmp_path)
    with pytest.raises(InvalidCaseIdError) as info:
        ctzarr.convert(d / "manifest.csv", dest, labels=[str(d / "labels.json")], progress=False)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert repr(bad_id) in msg
    assert f"manifest.csv:{row + 2}" in msg  # names the manifest line
    assert not dest.exists()
    assert _tree(tmp_path) == before
    assert not Path("/abs").exists()


@pytest.mark.parametrize("bad_id", HOSTILE_IDS)
def test_validate_case_id_rejects(bad_id: str) -> None:
    with pytest.raises(InvalidCaseIdError, match="invalid case id"):
        validate_case_id(bad_id)


@pytest.mark.parametrize(
    "good_id", ["AutoPET_0011f3deaf_10445", "case_001", "a", "A.b-c_d", "x" * 128]
)
def test_validate_case_id_accepts_plain_names(good_id: str) -> None:
    assert validate_case_id(good_id) == good_id


def test_case_id_colliding_with_store_metadata_is_rejected(
    tmp_path: Path, template: tuple[Path, list[str]]
) -> None:
    _, names = template
    rows = [[n, f"{n}_ct.nii.gz", f"{n}_seg.nii.gz"] for n in names]
    rows[1][0] = "zarr.json"
    d = _pairs_dir(tmp_path, template, rows)
    dest = d / "out.zarr"
    with pytest.raises(InvalidCaseIdError):
        ctzarr.convert(d / "manifest.csv", dest, labels=[str(d / "labels.json")], progress=False)
    assert not dest.exists()


def test_pairs_manifest_converts_when_ids_are_plain(
    tmp_path: Path, template: tuple[Path, list[str]]
) -> None:
    """Control for the hostile-id tests: the same manifest with plain ids converts."""
    _, names = template
    rows = [[f"p{i}", f"{n}_ct.nii.gz", f"{n}_seg.nii.gz"] for i, n in enumerate(names)]
    d = _pairs_dir(tmp_path, template, rows)
    report = ctzarr.convert(
        d / "manifest.csv", d / "out.zarr", labels=[str(d / "labels.json")], progress=False
    )
    assert report.ok, str(report)
    col = open_collection(d / "out.zarr")
    assert col.case_ids == ["p0", "p1"]
    np.testing.assert_array_equal(col["p1"].image.values, nifti_zyx(d / f"{names[1]}_ct.nii.gz"))


@pytest.mark.parametrize(
    ("header", "missing"),
    [
        pytest.param(("case_id", "ct", "seg"), "image", id="no-image-column"),
        pytest.param(("id", "image", "seg"), "case_id", id="no-case_id-column"),
    ],
)
def test_pairs_manifest_missing_column(
    tmp_path: Path, template: tuple[Path, list[str]], header: tuple[str, ...], missing: str
) -> None:
    _, names = template
    rows = [[n, f"{n}_ct.nii.gz", f"{n}_seg.nii.gz"] for n in names]
    d = _pairs_dir(tmp_path, template, rows, header=header)
    before = _tree(tmp_path)
    with pytest.raises(LayoutError, match="manifest needs columns case_id and image") as info:
        ctzarr.convert(
            d / "manifest.csv", d / "out.zarr", labels=[str(d / "labels.json")], progress=False
        )
    assert str(d / "manifest.csv") in str(info.value)
    assert missing in str(info.value)
    assert _tree(tmp_path) == before


def test_pairs_manifest_without_segmentation_column(
    tmp_path: Path, template: tuple[Path, list[str]]
) -> None:
    _, names = template
    d = _pairs_dir(
        tmp_path, template, [[n, f"{n}_ct.nii.gz"] for n in names], header=("case_id", "image")
    )
    with pytest.raises(LayoutError, match="no segmentation columns"):
        ctzarr.convert(
            d / "manifest.csv", d / "out.zarr", labels=[str(d / "labels.json")], progress=False
        )
    assert not (d / "out.zarr").exists()


def test_pairs_manifest_duplicate_case_id(tmp_path: Path, template: tuple[Path, list[str]]) -> None:
    _, names = template
    rows = [["same", f"{n}_ct.nii.gz", f"{n}_seg.nii.gz"] for n in names]
    d = _pairs_dir(tmp_path, template, rows)
    with pytest.raises(LayoutError, match=r"manifest.csv:3: duplicate case id 'same'"):
        ctzarr.convert(
            d / "manifest.csv", d / "out.zarr", labels=[str(d / "labels.json")], progress=False
        )
    assert not (d / "out.zarr").exists()


def test_dap_file_name_that_is_not_a_plain_id(ds: Dataset) -> None:
    """A DAP file pair whose name is not a plain id stops the run before anything is written."""
    for role in ("image", "mask"):
        shutil.copyfile(ds.file(role), ds.file(role).with_name("bad name.nii.gz"))
    with pytest.raises(InvalidCaseIdError, match="'bad name'"):
        ds.convert()
    assert not ds.dest.exists()


# --------------------------------------------------------------------------------------------
# Bad-input cases A1-A18 (the A-numbers label the tests below) not covered above:
# uncompressed .nii files, vox_offset, scaling, float CT with NaN, geometry codes, PHI
# --------------------------------------------------------------------------------------------


def _raw_nii(gz: bytes) -> bytes:
    return gzip.decompress(gz)


def _raw_edit(edit: Callable[[nib.Nifti1Header], None]) -> Callable[[bytes], bytes]:
    """A maker of an uncompressed .nii with header fields edited, voxel bytes kept."""
    return lambda gz: gzip.decompress(with_header(edit)(gz))


def _raw_set(*edits: tuple[str, int | None, object]) -> Callable[[bytes], bytes]:
    return lambda gz: gzip.decompress(_set(*edits)(gz))


def _with_extension(gz: bytes, text: bytes = b"PatientName=DOE^JOHN") -> bytes:
    img = nib.Nifti1Image.from_bytes(gzip.decompress(gz))
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", text))
    return gzip.compress(img.to_bytes())


# (id, role, maker, suffix of the bad file, keywords the message must contain)
MORE_BAD_FILES: list[tuple[str, str, Callable[[bytes], bytes], str, tuple[str, ...]]] = [
    # A1: not a NIfTI file at all
    ("a1-empty-nii", "image", lambda gz: b"", ".nii", ("empty file", "not a nifti file")),
    (
        "a1-gz-header-cut-at-60",
        "image",
        lambda gz: gzip.compress(gzip.decompress(gz)[:60]),
        ".nii.gz",
        ("not a nifti file", "too short", "60 bytes"),
    ),
    (
        "a1-nii-header-cut-at-200",
        "mask",
        lambda gz: gzip.decompress(gz)[:200],
        ".nii",
        ("not a nifti file", "too short", "200 bytes"),
    ),
    (
        "a1-nii-wrong-magic",
        "image",
        _raw_set(("magic", None, b"n+3")),
        ".nii",
        ("bad nifti magic", "not a nifti-1 file"),
    ),
    (
        "a1-nifti2-magic-in-nifti1-header",
        "image",
        _set(("magic", None, b"n+2")),
        ".nii.gz",
        ("bad nifti magic", "expected b'n+1'"),
    ),
    # A3: one deflate byte flipped in the middle of the stream (nibabel returns wrong slabs)
    (
        "a3-deflate-byte-flipped",
        "image",
        lambda gz: _flip(len(gz) // 2)(gz),
        ".nii.gz",
        ("corrupt compressed stream",),
    ),
    # A4: bytes after the gzip member
    (
        "a4-garbage-after-gzip-member",
        "image",
        lambda gz: gz + b"garbage!" * 64,
        ".nii.gz",
        ("trailing data after the gzip stream", "not gzip"),
    ),
    (
        "a4-8-bytes-garbage-after-gzip-member",
        "mask",
        lambda gz: gz + b"garbage!",
        ".nii.gz",
        ("trailing data after the gzip stream", "8 bytes"),
    ),
    # A5: gzip named .nii
    ("a5-gzip-named-nii", "mask", lambda gz: gz, ".nii", ("named .nii but is gzip-compressed",)),
    # A6: uncompressed .nii cut short, or with bytes after the voxels
    (
        "a6-nii-truncated",
        "image",
        lambda gz: gzip.decompress(gz)[:-1000],
        ".nii",
        ("header declares 23040 bytes of voxels from byte 352", "holds only 22040"),
    ),
    (
        "a6-nii-4096-trailing-bytes",
        "image",
        lambda gz: gzip.decompress(gz) + b"\x00" * 4096,
        ".nii",
        ("trailing data after the voxel data",),
    ),
    # A7: vox_offset, in a raw and in a compressed single file
    (
        "a7-nii-vox-offset-100",
        "image",
        _raw_set(("vox_offset", None, 100)),
        ".nii",
        ("vox_offset 100", "inside the header"),
    ),
    (
        "a7-nii-vox-offset-minus-352",
        "image",
        _raw_set(("vox_offset", None, -352)),
        ".nii",
        ("vox_offset -352", "inside the header"),
    ),
    (
        "a7-nii-vox-offset-348",
        "image",
        _raw_set(("vox_offset", None, 348)),
        ".nii",
        ("vox_offset 348", "at byte 352 or later"),
    ),
    (
        "a7-nii-vox-offset-360",
        "image",
        _raw_set(("vox_offset", None, 360)),
        ".nii",
        ("from byte 360", "holds only 23032"),
    ),
    (
        "a7-nii-vox-offset-1e9",
        "image",
        _raw_set(("vox_offset", None, 1e9)),
        ".nii",
        ("from byte 1000000000", "holds only 0"),
    ),
    (
        "a7-nii-vox-offset-352.5",
        "image",
        _raw_set(("vox_offset", None, 352.5)),
        ".nii",
        ("vox_offset 352.5", "whole number"),
    ),
    (
        "a7-nii-vox-offset-nan",
        "mask",
        _raw_set(("vox_offset", None, np.nan)),
        ".nii",
        ("vox_offset nan", "whole number"),
    ),
    (
        "a7-gz-vox-offset-100",
        "image",
        _set(("vox_offset", None, 100)),
        ".nii.gz",
        ("vox_offset 100", "inside the header"),
    ),
    (
        "a7-gz-vox-offset-minus-352",
        "image",
        _set(("vox_offset", None, -352)),
        ".nii.gz",
        ("vox_offset -352", "inside the header"),
    ),
    (
        "a7-gz-vox-offset-360",
        "image",
        _set(("vox_offset", None, 360)),
        ".nii.gz",
        ("truncated", "voxel data ends after 23032 of 23040"),
    ),
    (
        "a7-gz-vox-offset-1e9",
        "image",
        _set(("vox_offset", None, 1e9)),
        ".nii.gz",
        ("from byte 1000000000", "inflate to at most"),
    ),
    (
        "a7-gz-vox-offset-inf",
        "mask",
        _set(("vox_offset", None, np.inf)),
        ".nii.gz",
        ("vox_offset inf", "whole number"),
    ),
    (
        "a7-nii-vox-offset-0",
        "image",
        _raw_set(("vox_offset", None, 0)),
        ".nii",
        ("vox_offset 0", "inside the header", "at byte 352 or later", "nibabel"),
    ),
    (
        "a7-gz-vox-offset-0",
        "mask",
        _set(("vox_offset", None, 0)),
        ".nii.gz",
        ("vox_offset 0", "inside the header", "at byte 352 or later", "nibabel"),
    ),
    (
        "a7-vox-offset-0-with-extension",
        "image",
        lambda gz: _set(("vox_offset", None, 0))(_with_extension(gz)),
        ".nii.gz",
        ("vox_offset 0", "inside the header"),
    ),
    # A8: dims that disagree with the payload
    (
        "a8-dims-smaller-than-payload",
        "image",
        _set(("dim", 3, 19)),
        ".nii.gz",
        ("trailing data after the voxel data",),
    ),
    (
        "a8-dims-larger-than-payload",
        "image",
        _set(("dim", 3, 21)),
        ".nii.gz",
        ("truncated", "voxel data ends after 23040 of 24192"),
    ),
    (
        "a8-nii-dims-larger-than-payload",
        "mask",
        _raw_set(("dim", 3, 21)),
        ".nii",
        ("header declares 12096 bytes", "holds only 11520"),
    ),
    # A10: datatype codes nibabel cannot or will not read
    (
        "a10-datatype-0-none",
        "image",
        _set(("datatype", None, 0)),
        ".nii.gz",
        ("unsupported datatype", "code 0"),
    ),
    (
        "a10-datatype-1-binary",
        "mask",
        _set(("datatype", None, 1)),
        ".nii.gz",
        ("unsupported datatype", "code 1"),
    ),
    # A12: implausible scaling
    (
        "a12-scl-slope-1e38",
        "image",
        _set(("scl_slope", None, 1e38)),
        ".nii.gz",
        ("implausible scaling", "scl_slope=1e+38", "beyond +/-2**53"),
    ),
    (
        "a12-scl-inter-3e38",
        "image",
        _set(("scl_slope", None, 1.0), ("scl_inter", None, 3e38)),
        ".nii.gz",
        ("implausible scaling", "scl_inter=3e+38"),
    ),
    # A15: geometry
    (
        "a15-invalid-quaternion",
        "image",
        _set(("quatern_b", None, 5.0), ("sform_code", None, 0)),
        ".nii.gz",
        ("invalid qform", "w2 should be positive"),
    ),
    (
        "a15-invalid-quaternion-with-valid-sform",
        "image",
        _set(("quatern_b", None, 5.0)),
        ".nii.gz",
        ("invalid qform",),
    ),
    (
        "a15-nan-pixdim",
        "mask",
        _set(("pixdim", 2, np.nan)),
        ".nii.gz",
        ("pixdim", "positive and finite", "nan"),
    ),
    (
        "a15-qfac-3",
        "image",
        _set(("pixdim", 0, 3.0)),
        ".nii.gz",
        ("pixdim[0] (qfac)", "-1 or 1", "3.0"),
    ),
    (
        "a15-sform-code-minus-1",
        "image",
        _set(("sform_code", None, -1)),
        ".nii.gz",
        ("invalid sform_code -1", "0 to 5"),
    ),
    (
        "a15-qform-code-99",
        "mask",
        _set(("qform_code", None, 99)),
        ".nii.gz",
        ("invalid qform_code 99",),
    ),
    # A13: label files that are not label maps
    (
        "a13-labels-int32-300-and-negative",
        "mask",
        lambda gz: with_data(lambda a: _put(a.astype(np.int32), [300, -1]))(gz),
        ".nii.gz",
        ("label ids [-1, 300]", "not in label map"),
    ),
    (
        "a13-labels-float-0.25",
        "mask",
        lambda gz: with_data(lambda a: _put(a.astype(np.float32), [0.25]))(gz),
        ".nii.gz",
        ("non-integer label",),
    ),
    (
        "a13-labels-scaled-by-half",
        "mask",
        _set(("scl_slope", None, 0.5)),
        ".nii.gz",
        ("non-integer label",),
    ),
    # A14: a finite float value no exact index can hold
    (
        "a14-float-value-1e20",
        "image",
        lambda gz: with_data(lambda a: _put(a.astype(np.float32), [1e20]))(gz),
        ".nii.gz",
        ("voxel value 1e+20", "beyond +/-2**53"),
    ),
]

#: also run through a whole conversion (the rest only through open_nifti and streaming)
MORE_IN_DATASET = {
    "a1-empty-nii",
    "a1-nii-header-cut-at-200",
    "a3-deflate-byte-flipped",
    "a4-garbage-after-gzip-member",
    "a5-gzip-named-nii",
    "a6-nii-truncated",
    "a6-nii-4096-trailing-bytes",
    "a7-nii-vox-offset-100",
    "a7-nii-vox-offset-0",
    "a7-nii-vox-offset-360",
    "a7-gz-vox-offset-1e9",
    # not a8-dims-smaller-than-payload: in a dataset the mask's 20 slices differ from the
    # image's 19 and the grid check refuses the case before any voxel is read
    "a12-scl-slope-1e38",
    "a13-labels-int32-300-and-negative",
    "a13-labels-float-0.25",
    "a13-labels-scaled-by-half",
    "a14-float-value-1e20",
    "a15-invalid-quaternion",
    "a15-sform-code-minus-1",
}


def _replace(ds: Dataset, role: str, data: bytes, suffix: str) -> Path:
    """Replace the bad case's file of this role by data named <case><suffix>."""
    old = ds.file(role)
    old.unlink()
    new = old.with_name(f"{ds.bad}{suffix}")
    new.write_bytes(data)
    return new


@pytest.mark.parametrize(
    ("role", "make", "suffix", "keywords"),
    [pytest.param(*p[1:], id=p[0]) for p in MORE_BAD_FILES if p[0] in MORE_IN_DATASET],
)
def test_reliability_row_fails_only_its_case(
    ds: Dataset,
    role: str,
    make: Callable[[bytes], bytes],
    suffix: str,
    keywords: tuple[str, ...],
) -> None:
    bad_file = _replace(ds, role, make(ds.file(role).read_bytes()), suffix)
    report = ds.convert()
    assert_only_bad_failed(ds, report, bad_file, keywords)


@pytest.mark.parametrize(
    ("role", "make", "suffix", "keywords"),
    [pytest.param(*p[1:], id=p[0]) for p in MORE_BAD_FILES if not p[0].startswith("a13-")],
)
def test_open_nifti_rejects_reliability_row(
    tmp_path: Path,
    template: tuple[Path, list[str]],
    role: str,
    make: Callable[[bytes], bytes],
    suffix: str,
    keywords: tuple[str, ...],
) -> None:
    root, names = template
    src = root / ("images" if role == "image" else "masks") / f"{names[1]}.nii.gz"
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(make(src.read_bytes()))

    def stream() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CtzarrWarning)  # e.g. qform/sform disagreement
            source = open_nifti(str(path), case_id="c-1")
            for _, slab in source.iter_slabs(8):
                source.scale(slab)  # where float values are checked

    with pytest.raises(InvalidNiftiError) as info:
        stream()
    msg = str(info.value)
    assert msg.startswith(f"case 'c-1': {path}: "), msg
    for word in keywords:
        assert word.lower() in msg.lower(), msg


# -- accepted, with a recorded policy ---------------------------------------------------------


def test_a4_nul_padding_after_gzip_member_is_accepted(ds: Dataset) -> None:
    """gzip itself ignores NUL padding after the last member (tape blocks); so do we.

    The member's CRC and length are still checked and the file's sha256 covers the padding.
    """
    f = ds.file("image")
    f.write_bytes(f.read_bytes() + b"\x00" * 4096)
    report = ds.convert()
    assert report.ok, str(report)
    np.testing.assert_array_equal(
        open_collection(ds.dest)[ds.bad].image.values, nifti_zyx(ds.original("image"))
    )


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a7_vox_offset_0_is_refused_not_guessed(ds: Dataset, suffix: str) -> None:
    """vox_offset 0 in a single file: nibabel reads from byte 0 (the header becomes voxels).

    Reading from right after the header instead would be a guess that disagrees with nibabel;
    the case fails with a message naming the file and the offset, and nothing of it is stored.
    """
    raw = _raw_set(("vox_offset", None, 0))(ds.file("image").read_bytes())
    bad_file = _replace(ds, "image", raw if suffix == ".nii" else gzip.compress(raw), suffix)
    shifted = nifti_zyx(bad_file)
    assert not np.array_equal(shifted, nifti_zyx(ds.original("image")))  # nibabel's shifted read
    report = ds.convert()
    assert_only_bad_failed(ds, report, bad_file, ("vox_offset 0", "inside the header"))


@pytest.mark.parametrize(
    ("slope", "inter"),
    [pytest.param(0.0, 5.0, id="slope-0-inter-5"), pytest.param(np.nan, 0.0, id="slope-nan")],
)
def test_a12_slope_0_or_nan_is_identity_and_recorded(
    ds: Dataset, slope: float, inter: float
) -> None:
    f = ds.file("image")
    f.write_bytes(_set(("scl_slope", None, slope), ("scl_inter", None, inter))(f.read_bytes()))
    report = ds.convert()
    assert report.ok, str(report)
    case = open_collection(ds.dest)[ds.bad]
    ref = nifti_zyx(f)
    assert ref.dtype == np.int16  # nibabel: no scaling (NIfTI rule)
    np.testing.assert_array_equal(case.image.values, ref)
    assert case.image.dtype == np.int16
    assert (case.meta.nifti.scl_slope, case.meta.nifti.scl_inter) == (1.0, 0.0)
    assert any("no scaling applied" in n for n in case.meta.nifti.notes)


def test_a14_float_ct_with_nan_and_inf_converts_exactly_and_counts_them(ds: Dataset) -> None:
    """Policy: NaN and +/-inf voxels are kept bit for bit; the index counts them per label.

    Never cast: the stored image is float32 like the source; statistics use the finite values.
    """
    f = ds.file("image")
    mask = nifti_zyx(ds.file("mask"))
    labelled = np.flatnonzero(mask.reshape(-1))[:3]

    def poison(a: np.ndarray) -> np.ndarray:
        zyx = a.astype(np.float32).transpose(2, 1, 0).copy()  # (z, y, x) order, C-contiguous
        flat = zyx.reshape(-1)  # a view of zyx
        flat[labelled] = [np.nan, np.inf, -np.inf]
        flat[np.flatnonzero(mask.reshape(-1) == 0)[0]] = np.nan  # one in the background
        return zyx.transpose(2, 1, 0)  # back to nibabel's (x, y, z)

    f.write_bytes(with_data(poison)(f.read_bytes()))
    report = ds.convert()
    assert report.ok, str(report)
    case = open_collection(ds.dest)[ds.bad]
    ref = nifti_zyx(f)
    assert ref.dtype == np.float32
    assert np.isnan(ref).sum() == 2
    assert np.isinf(ref).sum() == 2
    got = case.image.values
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)  # NaN compares equal to NaN here
    idx = case.index("anatomy")
    expected = collections.Counter(int(mask.reshape(-1)[i]) for i in labelled)
    counted = {
        int(lab): int(n) for lab, n in zip(idx.labels, idx.nonfinite_count, strict=True) if n
    }
    assert counted == dict(expected)
    stats = case.stats()
    assert np.isfinite(stats[["hu_mean", "hu_std", "hu_min", "hu_max"]].to_numpy()).all()


def test_a15_both_codes_0_warn_pixdim_only_affine(ds: Dataset) -> None:
    f = ds.file("image")
    for role in ("image", "mask"):  # the mask too, or the grids would differ
        g = ds.file(role)
        g.write_bytes(_set(("qform_code", None, 0), ("sform_code", None, 0))(g.read_bytes()))
    with pytest.warns(CtzarrWarning, match="both 0: pixdim-only affine") as record:
        report = ds.convert()
    assert report.ok, str(report)
    assert any(str(f) in str(w.message) for w in record)
    case = open_collection(ds.dest)[ds.bad]
    np.testing.assert_array_equal(case.affine, nib.load(str(f)).affine)
    assert any("pixdim-only affine" in n for n in case.meta.nifti.notes)
    np.testing.assert_array_equal(case.image.values, nifti_zyx(ds.original("image")))


def test_a15_qfac_0_is_read_as_1(ds: Dataset) -> None:
    """pixdim[0] = 0 (common in old files): the NIfTI rule and nibabel read qfac as 1."""
    for role in ("image", "mask"):
        g = ds.file(role)
        g.write_bytes(_set(("pixdim", 0, 0.0), ("sform_code", None, 0))(g.read_bytes()))
    report = ds.convert()
    assert report.ok, str(report)
    case = open_collection(ds.dest)[ds.bad]
    np.testing.assert_array_equal(case.affine, nib.load(str(ds.file("image"))).affine)
    assert any("qfac" in n for n in case.meta.nifti.notes)


@pytest.mark.parametrize(
    ("dtype", "endian", "version"),
    [
        pytest.param(np.float64, "<", 1, id="float64"),
        pytest.param(np.int16, ">", 1, id="big-endian-int16"),
        pytest.param(np.int16, "<", 2, id="nifti2"),
        pytest.param(np.float32, ">", 2, id="big-endian-float32-nifti2"),
    ],
)
def test_a11_dtype_byte_order_and_version_convert_exactly(
    ds: Dataset, dtype: type, endian: str, version: int
) -> None:
    """Values equal nibabel's raw read in the source dtype, stored little-endian (A11)."""
    f = ds.file("image")
    img = nib.Nifti1Image.from_bytes(gzip.decompress(f.read_bytes()))
    data = np.asanyarray(img.dataobj).astype(dtype)
    klass, hklass = (
        (nib.Nifti1Image, nib.Nifti1Header) if version == 1 else (nib.Nifti2Image, nib.Nifti2Header)
    )
    hdr = hklass(endianness=endian)
    hdr.set_data_dtype(dtype)
    out = klass(data, img.affine, header=hdr)
    out.set_qform(img.affine, code=1)
    out.set_sform(img.affine, code=1)
    f.write_bytes(gzip.compress(out.to_bytes()))
    assert nib.load(str(f)).header.endianness == endian
    report = ds.convert()
    assert report.ok, str(report)
    case = open_collection(ds.dest)[ds.bad]
    np.testing.assert_array_equal(case.image.values, nifti_zyx(f))
    assert case.image.dtype == np.dtype(dtype)
    arr = zarr.open_array(str(ds.dest / "cases" / ds.bad / "0"), mode="r")
    assert arr.dtype == np.dtype(dtype).newbyteorder("<")
    assert case.meta.nifti.version == version
    assert case.meta.nifti.source_byteorder == ("big" if endian == ">" else "little")


def test_a13_float_labels_with_inf_fail_only_their_case(ds: Dataset) -> None:
    bad_file = ds.file("mask")
    bad_file.write_bytes(
        with_data(lambda a: _put(a.astype(np.float32), [np.inf]))(bad_file.read_bytes())
    )
    report = ds.convert()
    assert_only_bad_failed(ds, report, bad_file, ("label ids",))


# -- A18: identifying text never reaches the store or the logs ---------------------------------

PHI = b"DOE^JOHN"


def _phi(gz: bytes, broken: bool = False) -> bytes:
    img = nib.Nifti1Image.from_bytes(gzip.decompress(gz))
    hdr = img.header
    for field in ("descrip", "aux_file", "intent_name", "db_name", "data_type"):
        hdr[field] = PHI
    hdr.extensions.append(nib.nifti1.Nifti1Extension("comment", b"PatientName=" + PHI))
    hdr.extensions.append(
        nib.nifti1.Nifti1Extension(44, b'{"PatientName": "' + PHI + b'"}')  # a JSON extension
    )
    raw = img.to_bytes()
    if broken:  # a fault found after the header was read: the message must not quote it
        raw = raw[:-100]
    return gzip.compress(raw)


def test_a18_header_text_and_extensions_are_not_copied(
    ds: Dataset, caplog: pytest.LogCaptureFixture
) -> None:
    for role in ("image", "mask"):
        good = ds.file(role, ds.good)
        good.write_bytes(_phi(good.read_bytes()))
    bad_file = ds.file("image")
    bad_file.write_bytes(_phi(bad_file.read_bytes(), broken=True))
    assert PHI in gzip.decompress(good.read_bytes())  # the sources do carry it
    assert len(nib.load(str(good)).header.extensions) == 2
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = ds.convert()
    assert [r.case_id for r in report.failed] == [ds.bad]
    assert report.converted == [ds.good]
    stored = [p for p in ds.dest.rglob("*") if p.is_file()]
    assert len(stored) > 10
    for p in stored:
        data = p.read_bytes()
        assert PHI not in data, p
        assert b"DOE" not in data, p
    for text in (str(report), caplog.text, *(str(w.message) for w in caught)):
        assert "DOE" not in text
    arr = zarr.open_array(str(ds.dest / "cases" / ds.good / "nifti"), mode="r")
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(arr[:].tobytes()))
    for field in ("descrip", "aux_file", "intent_name", "db_name", "data_type"):
        assert hdr[field].item() == b"", field
    assert int(hdr["vox_offset"]) == 352
    assert arr.shape == (348,)
    np.testing.assert_array_equal(hdr.get_best_affine(), nib.load(str(good)).affine)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        pytest.param(3507, True, id="int64-small-values"),
        pytest.param(2**62, False, id="int64-2^62"),
    ],
)
def test_a12_scaled_int64_is_checked_by_its_values(tmp_path: Path, value: int, ok: bool) -> None:
    """An int64 image with scl_slope 0.5: the type's range alone exceeds 2**53, its values may
    not (found by the round-trip property test); the values decide, as they stream."""
    from ctzarr.sources.nifti import open_nifti

    data = np.full((3, 4, 5), value, np.int64)
    img = nib.Nifti1Image(data, np.eye(4), dtype=np.int64)
    img.header.set_slope_inter(0.5, 0.0)
    path = tmp_path / "ct.nii.gz"
    img.to_filename(path)
    src = open_nifti(str(path), case_id="c")
    if ok:
        ((_, slab),) = list(src.iter_slabs(64))
        np.testing.assert_array_equal(
            src.scale(slab), np.asanyarray(nib.load(path).dataobj).transpose(2, 1, 0)
        )
    else:
        with pytest.raises(
            InvalidNiftiError, match=r"case 'c'.*takes int64 voxel values to 2.31e\+18, beyond"
        ):
            src.scale(next(iter(src.iter_slabs(64)))[1])
