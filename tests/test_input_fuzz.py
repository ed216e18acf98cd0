"""A19: hypothesis header fuzz. Random valid-range mutations of the header of a tiny image.

A tiny valid case (8 x 6 x 7 int16 CT + matching uint8 label; NIfTI-1 or NIfTI-2, either byte
order) gets one to four mutations: a header field set to any value of its binary type (with the
interesting ones drawn more often), a datatype swapped for another of the same byte count, or a
payload cut, extended or flipped. The result is written as ``.nii`` and as ``.nii.gz`` and

- streamed through :func:`ctzarr.nifti.open_nifti` (fast, many examples), and
- converted as two cases of a ``pairs`` dataset (slower, fewer examples).

Property: every outcome is either

- success, with values (and dtype, and affine) equal to ``numpy.asanyarray(nibabel.load(f).dataobj)``
  (when nibabel cannot read the file, or reads it shifted, equal to nibabel's read of the same
  file with that one field made valid); or
- an error of ours (a :class:`ctzarr.errors.CtzarrError`), with the case absent from the store.

Nothing else: no other exception class, no traceback out of ``convert``, no partial case.
Figures (inputs tried, outcome classes) are printed under ``pytest -s``.
"""

from __future__ import annotations

import collections
import gzip
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ctzarr
from ctzarr.errors import CtzarrError
from ctzarr.sources.nifti import _UNEXPECTED, open_nifti

#: CTZARR_FUZZ_SCALE=20 runs twenty times as many examples (a long hunt, not for CI)
SCALE = int(os.environ.get("CTZARR_FUZZ_SCALE", "1"))
SHAPE_XYZ = (8, 6, 7)  # x = 8: every datatype's item size divides a row of int16 bytes
LABELS_JSON = '{"0": "background", "1": "a", "2": "b", "3": "c"}'

#: every datatype code nibabel knows, plus a few it does not
DATATYPE_CODES = [
    0,
    1,
    2,
    4,
    8,
    16,
    32,
    64,
    128,
    256,
    512,
    768,
    1024,
    1280,
    1536,
    1792,
    2048,
    2304,
    -1,
    6,
    999,
]
#: datatypes a voxel row of the base image can be reinterpreted as (same byte count per row)
RETYPE = {2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8}

OUTCOMES: collections.Counter[str] = collections.Counter()


# --------------------------------------------------------------------------------------------
# The base case
# --------------------------------------------------------------------------------------------


def _affine() -> np.ndarray:
    angle = 0.2
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([-0.8, -0.8, 2.5])
    aff[:3, 3] = [120.0, 95.5, -310.0]
    return aff


def _nifti_bytes(data_xyz: np.ndarray, version: int, endian: str, affine: np.ndarray) -> bytes:
    """Uncompressed single-file NIfTI bytes with qform and sform both set."""
    klass, hklass = (
        (nib.Nifti1Image, nib.Nifti1Header) if version == 1 else (nib.Nifti2Image, nib.Nifti2Header)
    )
    hdr = hklass(endianness=endian)
    hdr.set_data_dtype(data_xyz.dtype)
    img = klass(data_xyz, affine, header=hdr)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    return bytes(img.to_bytes())


_BASES: dict[tuple[int, str], tuple[bytes, bytes]] = {}


def base_files(version: int, endian: str) -> tuple[bytes, bytes]:
    """(image, label) uncompressed bytes of the valid base case."""
    key = (version, endian)
    if key not in _BASES:
        rng = np.random.default_rng(19)
        ct = rng.integers(-1024, 3072, size=SHAPE_XYZ).astype(np.int16)
        lab = rng.integers(0, 4, size=SHAPE_XYZ).astype(np.uint8)
        _BASES[key] = (
            _nifti_bytes(ct, version, endian, _affine()),
            _nifti_bytes(lab, version, endian, _affine()),
        )
    return _BASES[key]


def _header_size(version: int) -> int:
    return 348 if version == 1 else 540


def parse(raw: bytes, version: int, endian: str) -> nib.Nifti1Header:
    klass = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    return klass(binaryblock=raw[: _header_size(version)], endianness=endian, check=False)


# --------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------

F32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
SPECIAL_FLOATS = st.sampled_from(
    [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 3.0, 1e-38, 1e38, -1e38, np.nan, np.inf, -np.inf]
)
ANY_FLOAT = st.one_of(SPECIAL_FLOATS, F32)
FLOAT_FIELDS = [
    "pixdim",
    "scl_slope",
    "scl_inter",
    "quatern_b",
    "quatern_c",
    "quatern_d",
    "qoffset_x",
    "qoffset_y",
    "qoffset_z",
    "srow_x",
    "srow_y",
    "srow_z",
    "cal_min",
    "cal_max",
    "intent_p1",
    "slice_duration",
    "toffset",
]


def _ints(dtype: np.dtype[Any], special: list[int]) -> st.SearchStrategy[int]:
    info = np.iinfo(dtype)
    full = st.integers(int(info.min), int(info.max))
    return st.one_of(st.sampled_from(special), full) if special else full


@st.composite
def mutation(draw: st.DrawFn, version: int) -> tuple[str, Any, Any]:
    """One edit: (field, index or None, value), or a datatype swap, or a payload edit."""
    hdr = (nib.Nifti1Header if version == 1 else nib.Nifti2Header)()
    kind = draw(
        st.sampled_from(
            [
                "dim",
                "datatype",
                "retype",
                "bitpix",
                "vox_offset",
                "code",
                "float",
                "int",
                "magic",
                "sizeof_hdr",
                "text",
                "payload",
            ]
        )
    )
    if kind == "dim":
        i = draw(st.integers(0, 7))
        return (
            "dim",
            i,
            draw(_ints(hdr.structarr["dim"].dtype, [-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 14, 16])),
        )
    if kind == "datatype":
        return (
            "datatype",
            None,
            draw(st.one_of(st.sampled_from(DATATYPE_CODES), _ints(np.dtype(np.int16), []))),
        )
    if kind == "retype":
        return ("retype", None, draw(st.sampled_from(sorted(RETYPE))))
    if kind == "bitpix":
        return ("bitpix", None, draw(_ints(np.dtype(np.int16), [0, 1, 8, 16, 24, 32, 64, 128])))
    if kind == "vox_offset":
        special = [0, 100, -352, 348, 352, 356, 360, 368, 400, 544, 1e9]
        if version == 1:
            value = draw(st.one_of(st.sampled_from([*special, 352.5, np.nan, np.inf]), F32))
        else:
            value = draw(_ints(np.dtype(np.int64), [int(v) for v in special]))
        return ("vox_offset", None, value)
    if kind == "code":
        field = draw(st.sampled_from(["qform_code", "sform_code"]))
        return (field, None, draw(_ints(hdr.structarr[field].dtype, [-1, 0, 1, 2, 3, 4, 5, 6])))
    if kind == "float":
        field = draw(st.sampled_from(FLOAT_FIELDS))
        shape = hdr.structarr[field].shape
        index = draw(st.integers(0, shape[0] - 1)) if shape else None
        return (field, index, draw(ANY_FLOAT))
    if kind == "int":
        field = draw(
            st.sampled_from(
                ["xyzt_units", "intent_code", "dim_info", "slice_code", "slice_start", "slice_end"]
            )
        )
        return (field, None, draw(_ints(hdr.structarr[field].dtype, [0, 1, 2, 3, 4, 5, 7, 8, 255])))
    if kind == "magic":
        return (
            "magic",
            None,
            draw(
                st.sampled_from(
                    [b"n+1", b"ni1", b"n+2", b"ni2", b"", b"abc", b"N+1", b"n+1\x00\r\n\x1a\n"]
                )
            ),
        )
    if kind == "sizeof_hdr":
        return ("sizeof_hdr", None, draw(_ints(np.dtype(np.int32), [0, 347, 348, 349, 540, -348])))
    if kind == "text":
        field = draw(st.sampled_from(["descrip", "aux_file", "intent_name"]))
        return (field, None, draw(st.binary(max_size=16)))
    op = draw(st.sampled_from(["cut", "append", "flip"]))
    return ("payload", op, draw(st.integers(1, 700)))


@st.composite
def fuzz_cases(draw: st.DrawFn) -> dict[str, Any]:
    version = draw(st.sampled_from([1, 1, 2]))
    return {
        "version": version,
        "endian": draw(st.sampled_from(["<", ">"])),
        "target": draw(st.sampled_from(["image", "image", "image", "label"])),
        "edits": draw(st.lists(mutation(version), min_size=1, max_size=4)),
    }


def _set(hdr: nib.Nifti1Header, field: str, index: int | None, value: Any) -> None:
    """Store value into a header field as its binary type would hold it (wrapping, like bytes)."""
    arr = np.array(hdr.structarr[field])
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arr.dtype.kind in "iu" and isinstance(value, float):
            value = np.array(value).astype(arr.dtype)  # what the bytes of a cast would be
        elif arr.dtype.kind in "iu":
            value = (
                np.array(value, dtype=np.int64).astype(arr.dtype)
                if -(2**63) <= value < 2**63
                else 0
            )
        if index is None:
            arr[...] = value
        else:
            arr[index] = value
    hdr.structarr[field] = arr


def mutate(raw: bytes, version: int, endian: str, edits: list[tuple[str, Any, Any]]) -> bytes:
    """Apply the edits to uncompressed NIfTI bytes."""
    size = _header_size(version)
    hdr = parse(raw, version, endian)
    rest = raw[size:]
    for field, index, value in edits:
        if field == "payload":
            if index == "cut":
                rest = rest[: max(len(rest) - value, 0)]
            elif index == "append":
                rest = rest + bytes(range(256)) * (value // 256) + bytes(range(value % 256))
            elif rest:
                b = bytearray(rest)
                b[value % len(b)] ^= 0x5A
                rest = bytes(b)
        elif field == "retype":
            itemsize = RETYPE[value]
            row_bytes = (
                int(hdr["dim"][1]) * int(np.dtype(hdr.get_data_dtype()).itemsize)
                if int(hdr["datatype"]) in RETYPE
                else 0
            )
            hdr["datatype"] = value
            hdr["bitpix"] = itemsize * 8
            if row_bytes and row_bytes % itemsize == 0:
                _set(hdr, "dim", 1, row_bytes // itemsize)
        elif field in hdr.structarr.dtype.names:
            _set(hdr, field, index, value)
    return bytes(hdr.binaryblock) + rest


# --------------------------------------------------------------------------------------------
# The oracle: what nibabel reads
# --------------------------------------------------------------------------------------------


def _as_zyx(data: np.ndarray, shape_zyx: tuple[int, int, int]) -> np.ndarray:
    """nibabel's array (any of 1..4 dims, one volume) in ctzarr's (z, y, x) order."""
    return np.asarray(data).reshape(shape_zyx[::-1], order="F").transpose(2, 1, 0)


def nibabel_read(path: Path, shape_zyx: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(values in (z, y, x), affine) as nibabel reads them; raises whatever nibabel raises.

    The reference is nibabel's read of the very same file: a single file whose vox_offset is 0
    (which nibabel reads from byte 0, the header shifted into the voxels) is refused by ctzarr,
    never read from another offset.
    """
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
        return _as_zyx(data, shape_zyx), np.asarray(img.affine)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


@contextmanager
def captured_case_errors() -> Iterator[dict[str, BaseException]]:
    """The exception object behind each failed case (convert logs it with the case id)."""
    found: dict[str, BaseException] = {}

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg == "case %s failed: %s" and isinstance(record.args, tuple):
                found[str(record.args[0])] = record.args[1]  # type: ignore[assignment]

    handler = Grab(level=logging.WARNING)
    log = logging.getLogger("ctzarr.write.convert")
    log.addHandler(handler)
    try:
        yield found
    finally:
        log.removeHandler(handler)


def write_variants(root: Path, name: str, raw: bytes) -> dict[str, Path]:
    paths = {"nii": root / f"{name}.nii", "gz": root / f"{name}.nii.gz"}
    paths["nii"].write_bytes(raw)
    paths["gz"].write_bytes(gzip.compress(raw, compresslevel=1))
    return paths


def check_stream(path: Path) -> tuple[str, Any]:
    """Stream a file through open_nifti: ("ok", (values zyx, source)) or ("error", exc)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CtzarrWarning is an error under pytest's config
            src = open_nifti(str(path), case_id="fuzz")
            slabs = [src.scale(slab) for _, slab in src.iter_slabs(3)]
    except CtzarrError as exc:
        # a refusal is one of the two right outcomes (pytest.raises would demand it): check its
        # message here and hand it back
        assert str(path) in str(exc), exc  # noqa: PT017 - names the file
        assert _UNEXPECTED not in str(exc), exc  # noqa: PT017 - each fault has its own message
        return "error", exc
    values = np.concatenate(slabs) if slabs else np.zeros(src.shape_zyx)
    return "ok", (values, src)


def assert_equal_to_nibabel(
    path: Path, values: np.ndarray, affine: np.ndarray, shape_zyx: tuple[int, int, int]
) -> None:
    try:
        ref, ref_affine = nibabel_read(path, shape_zyx)
    except Exception as exc:  # nibabel could not read what we converted: say so
        raise AssertionError(
            f"converted, but nibabel cannot read {path.name}: {type(exc).__name__}: {exc}"
        ) from exc
    assert values.dtype == ref.dtype.newbyteorder("="), (values.dtype, ref.dtype)
    np.testing.assert_array_equal(values, ref)
    np.testing.assert_array_equal(affine, ref_affine)


def assert_spacing_from_affine(src: Any) -> None:
    """Spacing is the affine's column norms (never pixdim), within the plausible bounds."""
    a = np.asarray(src.affine, dtype=np.float64)[:3, :3]
    norms = [float(np.sqrt(a[0, c] ** 2 + a[1, c] ** 2 + a[2, c] ** 2)) for c in (2, 1, 0)]
    assert list(src.spacing_zyx) == norms
    assert all(1e-6 <= s <= 1e4 for s in norms), norms


# --------------------------------------------------------------------------------------------
# The properties
# --------------------------------------------------------------------------------------------


@settings(max_examples=250 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_cases())
def test_fuzzed_header_streams_equal_to_nibabel_or_fails_with_our_error(
    case: dict[str, Any],
) -> None:
    image, label = base_files(case["version"], case["endian"])
    raw = mutate(
        image if case["target"] == "image" else label,
        case["version"],
        case["endian"],
        case["edits"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in write_variants(Path(tmp), "f", raw).items():
            outcome, detail = check_stream(path)
            OUTCOMES[f"stream {kind} {outcome}"] += 1
            if outcome == "ok":
                values, src = detail
                assert_equal_to_nibabel(path, values, src.affine, src.shape_zyx)
                assert_spacing_from_affine(src)


def _label_for(image_path: Path, fallback: bytes) -> bytes:
    """A label matching the (mutated) image's grid as nibabel sees it, when nibabel can read it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(str(image_path))
            shape = img.shape
            affine = img.affine
        if len(shape) > 4 or (len(shape) == 4 and shape[3] != 1) or not np.all(np.isfinite(affine)):
            return fallback
        lab = (np.arange(int(np.prod(shape))) % 4).astype(np.uint8).reshape(shape)
        return bytes(nib.Nifti1Image(lab, affine).to_bytes())
    except Exception:
        return fallback


@settings(max_examples=30 * SCALE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_cases())
def test_fuzzed_case_converts_equal_to_nibabel_or_fails_alone(case: dict[str, Any]) -> None:
    image, label = base_files(case["version"], case["endian"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        root.mkdir()
        lines = ["case_id,image,seg"]
        files: dict[str, tuple[Path, Path]] = {}
        if case["target"] == "image":
            img_raw = mutate(image, case["version"], case["endian"], case["edits"])
            imgs = write_variants(root, "ct", img_raw)
            labs = {k: root / f"seg_{k}.nii.gz" for k in imgs}
            for k, p in imgs.items():
                labs[k].write_bytes(gzip.compress(_label_for(p, label), compresslevel=1))
        else:
            labs = write_variants(
                root, "seg", mutate(label, case["version"], case["endian"], case["edits"])
            )
            imgs = {k: root / f"ct_{k}.nii" for k in labs}
            for p in imgs.values():
                p.write_bytes(image)
        for k in ("nii", "gz"):
            files[k] = (imgs[k], labs[k])
            lines.append(f"{k},{imgs[k].name},{labs[k].name}")
        (root / "manifest.csv").write_text("\n".join(lines) + "\n")
        (root / "labels.json").write_text(LABELS_JSON)
        dest = Path(tmp) / "out.zarr"
        with captured_case_errors() as errors, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                report = ctzarr.convert(
                    root / "manifest.csv", dest, labels=[str(root / "labels.json")], progress=False
                )
            except CtzarrError:
                raise
            except Exception as exc:  # nothing but our errors may leave convert()
                raise AssertionError(f"convert raised {type(exc).__name__}: {exc}") from exc
        col = ctzarr.open_collection(dest)
        for result in report.results:
            cid = result.case_id
            OUTCOMES[f"convert {cid} {result.status}"] += 1
            if result.status == "failed":
                exc = errors.get(cid)
                assert isinstance(exc, CtzarrError), (cid, type(exc), exc, result.error)
                assert _UNEXPECTED not in str(exc), exc
                assert f"case {cid!r}" in str(exc), exc
                assert cid not in col.case_ids
                assert not (dest / "cases" / cid).exists(), sorted(
                    p.name for p in (dest / "cases" / cid).rglob("*")
                )
                continue
            assert result.status == "converted", result
            stored = col[cid]
            assert stored.meta.complete is True
            img_path, lab_path = files[cid]
            assert_equal_to_nibabel(img_path, stored.image.values, stored.affine, stored.shape)
            ref_lab, _ = nibabel_read(lab_path, stored.shape)
            np.testing.assert_array_equal(stored.labels("seg").values, ref_lab)


def test_fuzz_figures() -> None:
    """Prints what the fuzz tried (run with -s); runs after the two properties in this module."""
    if not OUTCOMES:
        pytest.skip("the fuzz tests did not run in this session")
    print("\nA19 header fuzz outcomes:", dict(sorted(OUTCOMES.items())))


def test_mutations_are_applied() -> None:
    """The mutation helper really edits the bytes (a fuzz that edits nothing proves nothing)."""
    image, _ = base_files(1, "<")
    out = mutate(
        image, 1, "<", [("dim", 1, -5), ("scl_slope", None, np.inf), ("payload", "cut", 10)]
    )
    hdr = parse(out, 1, "<")
    assert int(hdr["dim"][1]) == -5
    assert np.isinf(hdr["scl_slope"])
    assert len(out) == len(image) - 10
    out = mutate(image, 1, "<", [("retype", None, 16)])
    hdr = parse(out, 1, "<")
    assert hdr.get_data_dtype() == np.float32
    assert int(hdr["dim"][1]) == 4
    assert nib.Nifti1Image.from_bytes(out).shape == (4, 6, 7)
    assert io.BytesIO(out).read(4)
