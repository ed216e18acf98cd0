"""Where NIfTI is read: header validation and slab-by-slab streaming of voxel data.

A NIfTI volume is stored in Fortran order (i fastest), which is C order over (k, j, i): a run of
whole k-slices is one contiguous byte range. :func:`open_nifti` validates the header before a
single voxel is read; :meth:`NiftiSource.iter_slabs` then streams the data in slabs of k-slices
as ``(z, y, x)`` arrays without ever holding the whole volume, and finally reads the gzip stream
to its end so that the CRC and length in the trailer are checked (nibabel stops at the last
voxel and accepts a corrupt trailer).

Values equal ``numpy.asanyarray(nibabel.load(path).dataobj)``: slabs hold the raw on-disk values
and :meth:`NiftiSource.scale` applies the header scaling with nibabel's own
:func:`ctzarr.model.case.apply_scaling` (nibabel's ``apply_read_scaling``), slab by slab (it is elementwise, so slabs and
the whole volume give the same numbers and dtype).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import nibabel as nib
import numpy as np
from isal import igzip_threaded
from nibabel.spatialimages import HeaderDataError

from ctzarr.errors import CaseMismatchError, CtzarrWarning, InvalidNiftiError
from ctzarr.io.urls import url_protocol
from ctzarr.model.case import apply_scaling

logger = logging.getLogger(__name__)


_GZIP_MAGIC = b"\x1f\x8b"


#: deflate cannot expand data by more than ~1032:1; a header that declares more voxel bytes
#: than that ratio allows is a lie (or a bomb) and is refused before anything is allocated.
_MAX_DEFLATE_RATIO = 1032


#: bytes per block of the threaded gzip reader. isal's default (1 MiB) reads the compressed file
#: 8 MiB at a time and queues 1 MiB blocks: ~11 MB per open stream, ~22 MB of a conversion's
#: peak; 256 KiB costs no measurable time (inflate runs at ~450 MB/s either way).
_INFLATE_BLOCK = 256 * 1024


#: hard cap on one volume, whatever the file size says (64 GiB of voxel data)
MAX_VOXEL_BYTES = 64 * 2**30


#: qform and sform may disagree by this much (mm, at the volume corners) without a warning
QFORM_SFORM_TOLERANCE_MM = 1e-4


#: pixdim may differ from the voxel spacing of the affine by this much (relative) without a
#: warning. Both live in float32 header fields: storage alone makes them differ by up to about
#: 1.2e-7 (2**-24 for pixdim, as much again for the column norm of rounded srow entries), and
#: writers that build the sform from direction cosines of limited precision (DICOM decimal
#: strings carry about six digits) by up to about 1e-6. 1e-4 is far beyond both, and far below
#: any disagreement that matters: 1e-4 of a 500 mm field of view is 0.05 mm, while a flipped
#: exponent bit changes a value by a factor of two or more.
SPACING_RTOL = 1e-4


#: voxel spacing (mm) outside these bounds is no plausible image grid: refused
MIN_SPACING_MM = 1e-6
MAX_SPACING_MM = 1e4


#: free-text fields, blanked in the stored header: they may carry identifying text
_HEADER_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name", "data_type", "unused_str")


@dataclass(frozen=True)
class NiftiSource:
    """A validated NIfTI file, ready to stream.

    Attributes
    ----------
    path : str
        Path or URL as given.
    nifti_version : int
        1 or 2.
    shape_zyx : tuple of int
        Shape in stored order (k, j, i).
    raw_dtype : numpy.dtype
        On-disk dtype, with the file's byte order.
    value_dtype : numpy.dtype
        Dtype of the values nibabel returns (after scaling).
    slope, inter : float
        Scaling as nibabel applies it (1.0 and 0.0 when the header has none).
    affine : numpy.ndarray
        The 4x4 affine nibabel reports (sform when its code is set, else qform).
    spacing_zyx : tuple of float
        Voxel spacing in mm along (k, j, i): the column norms of ``affine`` (nibabel's
        ``voxel_sizes``), the geometry positions use; never ``pixdim`` (see :func:`open_nifti`).
    header_bytes : bytes
        The header as stored in the zarr ``nifti`` array: 3D dims, no extensions, free-text
        fields blanked (they may carry identifying text).
    notes : tuple of str
        What was normalised or assumed while reading (squeezed 4D, unknown units, ...).
    """

    path: str
    nifti_version: int
    shape_zyx: tuple[int, int, int]
    raw_dtype: np.dtype[Any]
    value_dtype: np.dtype[Any]
    slope: float
    inter: float
    affine: np.ndarray
    spacing_zyx: tuple[float, float, float]
    vox_offset: int
    compressed: bool
    file_size: int
    header_bytes: bytes
    qform_code: int
    sform_code: int
    notes: tuple[str, ...] = ()
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    case_id: str | None = None

    @property
    def scaled(self) -> bool:
        """True when the header scaling changes values."""
        return (self.slope, self.inter) != (1.0, 0.0)

    @property
    def slice_bytes(self) -> int:
        """Bytes of one k-slice on disk."""
        return self.shape_zyx[1] * self.shape_zyx[2] * self.raw_dtype.itemsize

    def error(self, fault: str) -> InvalidNiftiError:
        """Build the error for this file."""
        return InvalidNiftiError(self.path, fault, self.case_id)

    def scale(self, raw: np.ndarray) -> np.ndarray:
        """Apply the header scaling exactly as nibabel's ArrayProxy does.

        Float data are checked on the way: NaN and infinities are kept as they are (the index
        counts them), but a finite value that scaling makes infinite, or a finite value beyond
        +/-2**53 (see :data:`MAX_ABS_VALUE`), is an error. Scaled 8-byte integers are checked
        here too; smaller integer types were checked from the header alone (:func:`open_nifti`).
        """
        values = apply_scaling(raw, self.slope, self.inter) if self.scaled else raw
        if raw.dtype.kind == "f" and values.size:
            self._check_float_values(raw, values)
        elif self.scaled and raw.dtype.itemsize == 8 and values.size:
            reach = max(abs(float(values.min())), abs(float(values.max())))
            if reach > MAX_ABS_VALUE:
                raise self.error(
                    f"scaling (scl_slope={self.slope:g}, scl_inter={self.inter:g}) takes "
                    f"{raw.dtype} voxel values to {reach:.3g}, beyond +/-2**53"
                )
        return values

    def _check_float_values(self, raw: np.ndarray, values: np.ndarray) -> None:
        """Raise for float values that cannot be stored and indexed exactly."""
        lo = float(np.fmin.reduce(values, axis=None))  # NaN-ignoring: no temporary array
        hi = float(np.fmax.reduce(values, axis=None))
        if math.isinf(lo) or math.isinf(hi):  # rare: infinities present, look closer
            if self.scaled and np.count_nonzero(np.isinf(values)) != np.count_nonzero(
                np.isinf(raw)
            ):
                raise self.error(
                    f"scaling (scl_slope={self.slope:g}, scl_inter={self.inter:g}) makes finite "
                    "voxel values infinite"
                )
            finite = values[np.isfinite(values)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        reach = max(abs(lo), abs(hi))
        if reach > MAX_ABS_VALUE:  # NaN (all values NaN) compares False: kept
            raise self.error(f"voxel value {reach:.3g} beyond +/-2**53: not a plausible image")

    def iter_slabs(
        self, slab_z: int, digest: hashlib._Hash | None = None, reuse_buffers: int = 0
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(z_start, raw_slab)`` with raw slabs of ``slab_z`` k-slices in (z, y, x).

        Slabs are native-endian copies. After the last slab the stream is read to its end,
        which makes gzip check its CRC and length; trailing data after the voxels is an error.
        ``digest`` is fed with the file's (compressed) bytes as they are read.
        ``reuse_buffers=n`` recycles a ring of n slab buffers (a slab is overwritten n slabs
        later): allocating a fresh 32 MB buffer per slab fragments glibc's heap across threads,
        so that peak memory grew with the number of slices.
        """
        nz, ny, nx = self.shape_zyx
        native = self.raw_dtype.newbyteorder("=")
        with _open_binary(self.path, self.storage_options) as raw_file:
            counted = _HashingReader(raw_file, digest)
            # igzip_threaded.open is unannotated; in "rb" mode it returns an io.BufferedReader
            stream: io.BufferedIOBase | _HashingReader = (
                igzip_threaded.open(counted, "rb", threads=1, block_size=_INFLATE_BLOCK)
                if self.compressed
                else counted
            )
            ring: list[np.ndarray] = []
            turn = 0
            try:
                _skip(stream, self.vox_offset, self)
                for z0 in range(0, nz, slab_z):
                    depth = min(slab_z, nz - z0)
                    if reuse_buffers:
                        if len(ring) < reuse_buffers:
                            # not zero-filled: every byte is read into before use
                            ring.append(np.empty(slab_z * self.slice_bytes, np.uint8))
                        buf = memoryview(ring[turn % reuse_buffers])[: depth * self.slice_bytes]
                        turn += 1
                    else:
                        buf = memoryview(bytearray(depth * self.slice_bytes))
                    got = _read_into(stream, buf)
                    if got != len(buf):
                        raise self.error(
                            f"truncated: voxel data ends after {z0 * self.slice_bytes + got} of "
                            f"{nz * self.slice_bytes} bytes (slice {z0 + got // self.slice_bytes})"
                        )
                    slab = np.frombuffer(buf, dtype=self.raw_dtype).reshape(depth, ny, nx)
                    if slab.dtype != native:
                        slab = slab.astype(native)
                    yield z0, slab
                try:
                    trailing = stream.read(1)
                except (OSError, EOFError, ValueError) as exc:
                    raise self.error(f"trailing data after the gzip stream ({exc})") from exc
                if trailing:
                    raise self.error("trailing data after the voxel data")
            except InvalidNiftiError:
                raise
            except (EOFError, OSError, ValueError) as exc:  # gzip CRC/length/deflate faults
                # Bytes after a complete first member are read as a second member: too few
                # end it early ("ended before"), more fail its magic ("Not a gzipped file").
                tail = (
                    _bytes_after_first_member(self.path, self.storage_options)
                    if self.compressed
                    else 0
                )
                if tail:
                    raise self.error(
                        f"trailing data after the gzip stream: {tail} bytes that are not gzip "
                        f"({exc})"
                    ) from exc
                # the threaded reader re-raises EOFError as is or wrapped
                if isinstance(exc, EOFError) or "ended before" in str(exc):
                    raise self.error(
                        f"truncated: the compressed stream ends early ({exc})"
                    ) from exc
                raise self.error(f"corrupt compressed stream: {exc}") from exc
            finally:
                if stream is not counted:
                    stream.close()
            counted.drain()


class _HashingReader(io.RawIOBase):
    """Reads a file object, feeding a digest and counting bytes on the way."""

    def __init__(self, raw: BinaryIO, digest: hashlib._Hash | None) -> None:
        self._raw = raw
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)  # type: ignore[attr-defined]
        if n and self._digest is not None:
            self._digest.update(memoryview(b)[:n])
        return int(n or 0)

    def drain(self) -> None:
        """Feed what is left of the file to the digest (trailing bytes of a .gz)."""
        if self._digest is None:
            return
        while chunk := self._raw.read(1 << 20):
            self._digest.update(chunk)


def _bytes_after_first_member(path: str, storage_options: dict[str, Any]) -> int:
    """Bytes that follow the first complete gzip member (0 when the member is cut short).

    Only called on the error path, to tell "garbage after the stream" from "truncated": the
    threaded reader reports both as an early end of the compressed stream.
    """
    inflater = zlib.decompressobj(wbits=31)
    after = 0
    try:
        with _open_binary(path, storage_options) as f:
            while block := f.read(1 << 20):
                if inflater.eof:
                    after += len(block)
                    continue
                inflater.decompress(block, 1 << 20)
                while inflater.unconsumed_tail and not inflater.eof:
                    inflater.decompress(inflater.unconsumed_tail, 1 << 20)
                if inflater.eof:
                    after += len(inflater.unused_data) + len(inflater.unconsumed_tail)
    except (OSError, zlib.error):
        return 0
    return after if inflater.eof else 0


def _open_binary(path: str, storage_options: dict[str, Any]) -> BinaryIO:
    """Open a local path or fsspec URL for binary reading."""
    if url_protocol(path):
        return fsspec.open(path, "rb", **storage_options).open()  # type: ignore[no-any-return]
    return open(path, "rb")


def _read_into(stream: io.RawIOBase | io.BufferedIOBase, buf: memoryview) -> int:
    """Fill buf from stream; return how many bytes were read (short only at EOF)."""
    view = buf
    got = 0
    while got < len(buf):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _skip(stream: io.RawIOBase | io.BufferedIOBase, n: int, src: NiftiSource) -> None:
    """Read and discard the first n bytes (header and extensions)."""
    left = n
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            raise src.error(f"truncated: file ends inside the header ({n - left} of {n} bytes)")
        left -= len(chunk)


def _file_size(path: str, storage_options: dict[str, Any]) -> int:
    if url_protocol(path):
        fs, p = fsspec.core.url_to_fs(path, **storage_options)
        return int(fs.size(p))
    return Path(path).stat().st_size


def _read_head(
    path: str, storage_options: dict[str, Any], case_id: str | None
) -> tuple[bytes, bool]:
    """First bytes of the (decompressed) file, and whether it is gzip-compressed."""
    try:
        with _open_binary(path, storage_options) as f:
            magic = f.read(2)
            f.seek(0)
            compressed = magic == _GZIP_MAGIC
            if not magic:
                raise InvalidNiftiError(
                    path,
                    "empty file: not a NIfTI file"
                    + (" (and not a gzip file, as its name says)" if path.endswith(".gz") else ""),
                    case_id,
                )
            if path.endswith(".gz") and not compressed:
                raise InvalidNiftiError(path, "named .gz but is not a gzip file", case_id)
            if path.endswith(".nii") and compressed:
                raise InvalidNiftiError(
                    path, "named .nii but is gzip-compressed (name it .nii.gz)", case_id
                )
            if compressed:
                # a bare decompressor: the gzip module would read (and fail) past the header
                inflater = zlib.decompressobj(wbits=31)
                head = b""
                while len(head) < 544 and not inflater.eof:
                    block = f.read(1 << 16)
                    if not block:
                        break
                    head += inflater.decompress(block, 544 - len(head))
                    while inflater.unconsumed_tail and len(head) < 544:
                        head += inflater.decompress(inflater.unconsumed_tail, 544 - len(head))
            else:
                head = f.read(544)
    except InvalidNiftiError:
        raise
    except FileNotFoundError as exc:
        raise InvalidNiftiError(path, "file not found", case_id) from exc
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InvalidNiftiError(path, f"corrupt compressed stream: {exc}", case_id) from exc
    return head, compressed


def open_nifti(
    path: str,
    *,
    case_id: str | None = None,
    storage_options: dict[str, Any] | None = None,
) -> NiftiSource:
    """Read and validate a NIfTI-1 or NIfTI-2 header; read no voxel data.

    Parameters
    ----------
    path : str
        Local path or fsspec URL of a ``.nii`` or ``.nii.gz`` file.
    case_id : str, optional
        Named in error messages.
    storage_options : dict, optional
        fsspec options for remote URLs.

    Returns
    -------
    NiftiSource

    Raises
    ------
    InvalidNiftiError
        For anything that is not a readable 3D (or single-volume 4D) NIfTI image, and for a
        voxel spacing that is not finite or lies outside 1e-6..1e4 mm.

    Warns
    -----
    CtzarrWarning
        When qform and sform disagree, when both codes are 0, and when ``pixdim`` disagrees
        with the voxel spacing of the affine. Spacing (and so every volume) comes from the
        affine, the geometry every position uses: one source of truth, so that a corrupt
        ``pixdim`` can neither scale volumes nor go unnoticed. Each warning is also kept in
        :attr:`NiftiSource.notes` (stored in the case's provenance).
    """
    storage_options = dict(storage_options or {})
    path = str(path)
    head, compressed = _read_head(path, storage_options, case_id)

    def fail(fault: str) -> InvalidNiftiError:
        return InvalidNiftiError(path, fault, case_id)

    if len(head) < 348:
        raise fail(f"not a NIfTI file: too short for a NIfTI header ({len(head)} bytes)")
    hdr = _parse_header(head, fail)
    try:
        return _validated(hdr, path, compressed, storage_options, case_id, fail)
    except InvalidNiftiError:
        raise
    except (HeaderDataError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
        # Every header fault we know of has its own message above; this is the net for a
        # combination nobody foresaw (the fuzz in tests/test_input_fuzz.py fails if it is hit).
        raise fail(f"{_UNEXPECTED} ({type(exc).__name__}: {exc})") from exc


#: start of the message of a header fault that no specific check caught
_UNEXPECTED = "unreadable NIfTI header"


def _validated(
    hdr: nib.Nifti1Header,
    path: str,
    compressed: bool,
    storage_options: dict[str, Any],
    case_id: str | None,
    fail: Any,
) -> NiftiSource:
    """Check every header field that decides what the voxels are and where they lie."""
    version = 2 if isinstance(hdr, nib.Nifti2Header) else 1
    notes: list[str] = []

    dims = [int(d) for d in hdr["dim"]]
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise fail(f"impossible dim[0] = {ndim}")
    shape = dims[1 : 1 + ndim]
    if any(d < 1 for d in shape):
        raise fail(f"impossible dimensions {shape}")
    if ndim == 4 and shape[3] == 1:
        notes.append("4D with a single volume: squeezed to 3D")
        shape = shape[:3]
    elif ndim > 3:
        raise fail(
            f"{ndim}D image with shape {tuple(shape)}: only 3D volumes (or 4D with one volume) are supported"
        )
    while len(shape) < 3:
        shape.append(1)
    nx, ny, nz = shape

    try:
        raw_dtype: np.dtype[Any] = hdr.get_data_dtype()
    except Exception as exc:  # nibabel raises HeaderDataError for unknown codes
        raise fail(f"unsupported datatype code {int(hdr['datatype'])}") from exc
    if raw_dtype.kind not in "iuf" or raw_dtype.itemsize > 8:
        raise fail(f"unsupported datatype {raw_dtype} (code {int(hdr['datatype'])})")

    nbytes = nx * ny * nz * raw_dtype.itemsize
    file_size = _file_size(path, storage_options)
    vox_offset = _data_offset(hdr, version, fail)
    if nbytes > MAX_VOXEL_BYTES:
        raise fail(f"header declares {nbytes} bytes of voxels, over the {MAX_VOXEL_BYTES} byte cap")
    if compressed:
        limit = file_size * _MAX_DEFLATE_RATIO + 4096
        if vox_offset + nbytes > limit:
            raise fail(
                f"header declares {nbytes} bytes of voxels from byte {vox_offset} but the "
                f"{file_size}-byte file can inflate to at most {limit}"
            )
    elif vox_offset + nbytes > file_size:
        raise fail(
            f"header declares {nbytes} bytes of voxels from byte {vox_offset} but the "
            f"{file_size}-byte file holds only {max(file_size - vox_offset, 0)} from there"
        )

    zooms = [float(z) for z in hdr["pixdim"][1:4]]
    zooms = [z if i < ndim else (z if z > 0 else 1.0) for i, z in enumerate(zooms)]
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise fail(f"spatial pixdim must be positive and finite, got {tuple(zooms)}")
    space_code = int(hdr["xyzt_units"]) % 8
    space_unit = _SPACE_UNITS.get(space_code)
    if space_unit is None:
        notes.append(f"spatial units code {space_code} is undefined: read as millimetres")
    elif space_unit == "unknown":
        notes.append("spatial units unknown: read as millimetres")
    elif space_unit in ("meter", "micron"):
        notes.append(f"spatial units {space_unit}: affine kept as written")

    slope, inter = _scaling(hdr, raw_dtype, fail, notes)
    hdr, affine, qcode, scode = _geometry(hdr, (nx, ny, nz), path, fail, notes)
    spacing = _spacing(affine)
    _check_spacing(spacing, zooms, path, fail, notes)

    value_dtype = apply_scaling(np.zeros(1, raw_dtype), slope, inter).dtype
    return NiftiSource(
        path=path,
        nifti_version=version,
        shape_zyx=(nz, ny, nx),
        raw_dtype=raw_dtype,
        value_dtype=value_dtype.newbyteorder("="),
        slope=slope,
        inter=inter,
        affine=affine,
        spacing_zyx=(spacing[2], spacing[1], spacing[0]),
        vox_offset=vox_offset,
        compressed=compressed,
        file_size=file_size,
        header_bytes=_sanitised_header(hdr, (nx, ny, nz), version),
        qform_code=qcode,
        sform_code=scode,
        notes=tuple(notes),
        storage_options=storage_options,
        case_id=case_id,
    )


#: NIfTI spatial unit codes (xyzt_units % 8); 4..7 are undefined
_SPACE_UNITS = {0: "unknown", 1: "meter", 2: "mm", 3: "micron"}


#: NIFTI_XFORM_UNKNOWN .. NIFTI_XFORM_TEMPLATE_OTHER
_XFORM_CODES = range(6)


def _data_offset(hdr: nib.Nifti1Header, version: int, fail: Any) -> int:
    """Byte offset of the voxels in a single-file NIfTI; never inside the header.

    The header and its 4-byte extension flag come first: 348 + 4 = 352 bytes in NIfTI-1,
    540 + 4 = 544 in NIfTI-2 (nibabel writes and expects the same minimum). An offset below
    that, 0 included, is an error: 0 is the .hdr/.img convention, and nibabel reads such a
    single file from byte 0 (the header itself as voxels) while other readers skip the header,
    so no reading of it is the right one.
    """
    minimum = (540 if version == 2 else 348) + 4  # the header and the 4-byte extension flag
    value = hdr["vox_offset"].item()
    if isinstance(value, float):  # NIfTI-1 stores it as float32
        if not math.isfinite(value) or value != math.floor(value):
            raise fail(f"vox_offset {value!r} is not a whole number of bytes")
        value = int(value)
    offset = int(value)
    if offset < minimum:
        hint = (
            " (0 is the .hdr/.img convention: nibabel would read the header itself as voxels)"
            if offset == 0
            else ""
        )
        raise fail(
            f"vox_offset {offset} points inside the header (a single-file NIfTI-{version} "
            f"has its data at byte {minimum} or later){hint}"
        )
    return offset


def _parse_header(head: bytes, fail: Any) -> nib.Nifti1Header | nib.Nifti2Header:
    """Parse NIfTI-1 or NIfTI-2 from the first bytes, either byte order."""
    sizeof_le = int.from_bytes(head[:4], "little")
    sizeof_be = int.from_bytes(head[:4], "big")
    sizes = {sizeof_le, sizeof_be}
    if 348 in sizes:
        klass: type[nib.Nifti1Header] = nib.Nifti1Header
        size = 348
    elif 540 in sizes:
        if len(head) < 540:
            raise fail(f"not a NIfTI file: too short for a NIfTI-2 header ({len(head)} bytes)")
        klass = nib.Nifti2Header
        size = 540
    else:
        raise fail("not a NIfTI file (sizeof_hdr is neither 348 nor 540)")
    # the byte order is the one that reads sizeof_hdr right (nibabel would guess it from dim[0])
    endianness = "<" if sizeof_le == size else ">"
    try:
        hdr = klass(binaryblock=head[:size], endianness=endianness, check=False)
    except Exception as exc:
        raise fail(f"unreadable NIfTI header: {exc}") from exc
    magic = bytes(hdr["magic"])[:3]
    single, pair = (b"n+1", b"ni1") if size == 348 else (b"n+2", b"ni2")
    if magic == pair:
        raise fail(
            "header/image pairs (.hdr/.img) are not supported: the header says the data is in a separate file"
        )
    if magic != single:
        raise fail(
            f"bad NIfTI magic {bytes(hdr['magic'])!r} for a {size}-byte header "
            f"(expected {single!r}): not a NIfTI-{1 if size == 348 else 2} file"
        )
    return hdr


#: scaled values beyond this magnitude are refused: float64 holds every integer up to 2**53,
#: the index keys values (x 2**8 for non-integral floats) as int64, and no CT comes near it
MAX_ABS_VALUE = 2.0**53


def _scaling(
    hdr: nib.Nifti1Header, raw_dtype: np.dtype[Any], fail: Any, notes: list[str]
) -> tuple[float, float]:
    """Scale factors as nibabel applies them: slope 0 or NaN means no scaling."""
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if slope == 0 or math.isnan(slope):
        if math.isnan(slope) or inter != 0:
            notes.append(f"scl_slope {slope} (scl_inter {inter}): no scaling applied (NIfTI rule)")
        return 1.0, 0.0
    if not math.isfinite(slope) or not math.isfinite(inter):
        raise fail(f"non-finite scaling: scl_slope={slope}, scl_inter={inter}")
    # 8-byte integers span beyond 2**53 by themselves: their scaled values are checked as they
    # stream (NiftiSource.scale), the smaller types here from the header alone
    if (slope, inter) != (1.0, 0.0) and raw_dtype.kind in "iu" and raw_dtype.itemsize < 8:
        info = np.iinfo(raw_dtype)
        reach = max(abs(float(info.min) * slope + inter), abs(float(info.max) * slope + inter))
        if not reach <= MAX_ABS_VALUE:
            raise fail(
                f"implausible scaling: scl_slope={slope:g}, scl_inter={inter:g} take {raw_dtype} "
                f"values to {reach:.3g}, beyond +/-2**53"
            )
    return slope, inter


def _geometry(
    hdr: nib.Nifti1Header,
    shape_xyz: tuple[int, int, int],
    path: str,
    fail: Any,
    notes: list[str],
) -> tuple[nib.Nifti1Header, np.ndarray, int, int]:
    """(header, affine, qform_code, sform_code): the affine nibabel reports, checked.

    The header comes back with a qfac (pixdim[0]) of 0 read as 1, the NIfTI rule that nibabel
    applies on load too.
    """
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    for name, code in (("qform_code", qcode), ("sform_code", scode)):
        if code not in _XFORM_CODES:
            raise fail(f"invalid {name} {code} (NIfTI defines 0 to 5)")
    qform = None
    if qcode:
        qfac = float(hdr["pixdim"][0])
        if qfac == 0:
            hdr = hdr.copy()
            pixdim = np.array(hdr["pixdim"])
            pixdim[0] = 1
            hdr["pixdim"] = pixdim
            notes.append("pixdim[0] (qfac) 0 read as 1 (NIfTI rule)")
        elif qfac not in (-1.0, 1.0):
            raise fail(f"pixdim[0] (qfac) must be -1 or 1 when qform_code is set, got {qfac}")
        try:
            qform = np.asarray(hdr.get_qform(), dtype=np.float64)
        except (HeaderDataError, ValueError) as exc:  # an impossible quaternion
            raise fail(f"invalid qform: {exc}") from exc
        if not np.all(np.isfinite(qform)):
            raise fail("qform affine is not finite")
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except (HeaderDataError, ValueError) as exc:
        raise fail(f"cannot compute the affine: {exc}") from exc
    if not np.all(np.isfinite(affine)):
        raise fail("affine is not finite")
    with np.errstate(all="ignore"):
        det = np.linalg.det(affine[:3, :3])
    if not abs(det) >= 1e-12:
        raise fail("affine is singular (degenerate geometry)")
    if qcode == 0 and scode == 0:
        msg = f"{path}: qform_code and sform_code are both 0: pixdim-only affine (orientation unknown)"
        notes.append(msg.split(": ", 1)[1])
        warnings.warn(msg, CtzarrWarning, stacklevel=4)
    if qform is not None and scode:
        gap = _corner_gap_mm(qform, np.asarray(hdr.get_sform(), dtype=np.float64), shape_xyz)
        if gap > QFORM_SFORM_TOLERANCE_MM:
            msg = f"{path}: qform and sform disagree by {gap:.3g} mm; the sform is used"
            notes.append(msg.split(": ", 1)[1])
            warnings.warn(msg, CtzarrWarning, stacklevel=4)
    return hdr, affine, qcode, scode


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (x, y, z) in mm: the column norms of the affine (nibabel's voxel_sizes).

    For the axis-aligned affines of most CT this is exactly the absolute diagonal (the square
    root of a square gives the value back in IEEE arithmetic), so the spacing equals pixdim
    bit for bit whenever the two agree.
    """
    with np.errstate(all="ignore"):
        sizes = np.sqrt(np.sum(affine[:3, :3] ** 2, axis=0))
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def _format_xyz(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.7g}" for v in values) + ")"


def _check_spacing(
    spacing: tuple[float, float, float],
    zooms: list[float],
    path: str,
    fail: Any,
    notes: list[str],
) -> None:
    """Refuse an implausible spacing; warn (and note) when pixdim disagrees with it."""
    for axis, value in zip("xyz", spacing, strict=True):
        if not math.isfinite(value):
            raise fail(f"voxel spacing along {axis} is {value!r} mm (from the affine): not finite")
        if not MIN_SPACING_MM <= value <= MAX_SPACING_MM:
            raise fail(
                f"voxel spacing along {axis} is {value:.7g} mm (from the affine), outside "
                f"{MIN_SPACING_MM:g}..{MAX_SPACING_MM:g} mm: not a plausible image grid"
            )
    if all(
        math.isclose(z, s, rel_tol=SPACING_RTOL, abs_tol=0.0)
        for z, s in zip(zooms, spacing, strict=True)
    ):
        return
    note = (
        f"pixdim (x, y, z) {_format_xyz(zooms)} disagrees with the voxel spacing of the affine "
        f"{_format_xyz(spacing)} mm (relative tolerance {SPACING_RTOL:g}); the affine's "
        "spacing is used"
    )
    notes.append(note)
    warnings.warn(f"{path}: {note}", CtzarrWarning, stacklevel=4)


def _corner_gap_mm(q: np.ndarray, s: np.ndarray, shape_xyz: tuple[int, int, int]) -> float:
    """Largest distance between the positions two affines give the volume's corners."""
    corners = np.array(
        [
            [i, j, k, 1]
            for i in (0, shape_xyz[0] - 1)
            for j in (0, shape_xyz[1] - 1)
            for k in (0, shape_xyz[2] - 1)
        ],
        dtype=np.float64,
    ).T
    with np.errstate(all="ignore"):
        return float(np.max(np.linalg.norm((q @ corners - s @ corners)[:3], axis=0)))


def _sanitised_header(
    hdr: nib.Nifti1Header, shape_xyz: tuple[int, int, int], version: int
) -> bytes:
    """Header bytes for the store: 3D dims, data right after the header, free text blanked."""
    out = hdr.copy()
    dim = np.array(out["dim"])
    dim[0] = 3
    dim[1:4] = shape_xyz
    dim[4:] = 1
    out["dim"] = dim
    for name in _HEADER_TEXT_FIELDS:
        if name in out:  # NIfTI-2 has no db_name
            out[name] = b""
    out["vox_offset"] = 544 if version == 2 else 352
    out["magic"] = b"n+2\x00\r\n\x1a\n" if version == 2 else b"n+1"
    return bytes(out.binaryblock)


def header_from_bytes(data: bytes) -> nib.Nifti1Header | nib.Nifti2Header:
    """Parse a stored header array back into a nibabel header."""

    def fail(fault: str) -> InvalidNiftiError:
        return InvalidNiftiError("<stored nifti header>", fault)

    return _parse_header(data, fail)


#: two files share a grid when their voxel corners lie within this distance (mm)
AFFINE_TOLERANCE_MM = 1e-3


def check_same_grid(
    case_id: str, reference: NiftiSource, other: NiftiSource, whose: str = "the image's"
) -> None:
    """Raise :class:`CaseMismatchError` unless ``other`` lies on the grid of ``reference``: the
    same shape, and voxel corners within :data:`AFFINE_TOLERANCE_MM` (a segmentation or mask
    against its image)."""
    if other.shape_zyx != reference.shape_zyx:
        raise CaseMismatchError(
            f"case {case_id!r}: {other.path}: shape (z, y, x) {other.shape_zyx} differs from "
            f"{whose} {reference.shape_zyx} ({reference.path})"
        )
    nz, ny, nx = reference.shape_zyx
    corners = np.array(
        [[i, j, k, 1] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], float
    ).T
    gap = float(np.max(np.linalg.norm(((reference.affine - other.affine) @ corners)[:3], axis=0)))
    if gap > AFFINE_TOLERANCE_MM:
        raise CaseMismatchError(
            f"case {case_id!r}: {other.path}: affine differs from {whose} ({reference.path}) by "
            f"{gap:.4g} mm at the volume corners (tolerance {AFFINE_TOLERANCE_MM} mm)"
        )
