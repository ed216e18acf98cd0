"""Where NIfTI is read: header validation and slab-by-slab streaming of voxel data.

A NIfTI volume is stored in Fortran order (i fastest), which is C order over (k, j, i): a run of
whole k-slices is one contiguous byte range. :func:`open_nifti` validates the header before a
single voxel is read; :meth:`NiftiSource.iter_slabs` then streams the data in slabs of k-slices
as ``(z, y, x)`` arrays without ever holding the whole volume, and finally reads the gzip stream
to its end so that the CRC and length in the trailer are checked (nibabel stops at the last
voxel and accepts a corrupt trailer).

Values equal ``numpy.asanyarray(nibabel.load(path).dataobj)``: slabs hold the raw on-disk values
and :meth:`NiftiSource.scale` applies the header scaling with nibabel's own
:func:`~nibabel.volumeutils.apply_read_scaling`, slab by slab (it is elementwise, so slabs and
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
from nibabel.volumeutils import apply_read_scaling

from .errors import CtzarrWarning, InvalidNiftiError

__all__ = ["NiftiSource", "open_nifti"]

logger = logging.getLogger(__name__)

_GZIP_MAGIC = b"\x1f\x8b"
#: deflate cannot expand data by more than ~1032:1; a header that declares more voxel bytes
#: than that ratio allows is a lie (or a bomb) and is refused before anything is allocated.
_MAX_DEFLATE_RATIO = 1032
#: hard cap on one volume, whatever the file size says (64 GiB of voxel data)
MAX_VOXEL_BYTES = 64 * 2**30
#: qform and sform may disagree by this much (mm, at the volume corners) without a warning
QFORM_SFORM_TOLERANCE_MM = 1e-4
_HEADER_TEXT_FIELDS = ("descrip", "aux_file", "db_name", "intent_name")


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
        """Apply the header scaling exactly as nibabel's ArrayProxy does."""
        if not self.scaled:
            return raw
        return apply_read_scaling(raw, *_typed_scaling(self.slope, self.inter))

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
            stream: BinaryIO = (
                igzip_threaded.open(counted, "rb", threads=1)  # type: ignore[assignment]
                if self.compressed
                else counted  # type: ignore[assignment]
            )
            ring: list[bytearray] = []
            turn = 0
            try:
                _skip(stream, self.vox_offset, self)
                for z0 in range(0, nz, slab_z):
                    depth = min(slab_z, nz - z0)
                    if reuse_buffers:
                        if len(ring) < reuse_buffers:
                            ring.append(bytearray(slab_z * self.slice_bytes))
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
            except EOFError as exc:
                raise self.error(f"truncated: the compressed stream ends early ({exc})") from exc
            except (OSError, ValueError) as exc:  # gzip CRC/length/deflate faults
                if "ended before" in str(
                    exc
                ):  # the threaded reader re-raises EOFError as is or wrapped
                    raise self.error(
                        f"truncated: the compressed stream ends early ({exc})"
                    ) from exc
                raise self.error(f"corrupt compressed stream: {exc}") from exc
            finally:
                if stream is not counted:
                    stream.close()
            counted.drain()


def _typed_scaling(slope: float, inter: float) -> tuple[np.ndarray, np.ndarray]:
    """Scale factors typed as nibabel's ArrayProxy types them (Python floats, so float64)."""
    s = np.asanyarray(slope)
    i = np.asanyarray(inter)
    if np.can_cast(i, s.dtype):
        i = i.astype(s.dtype)
    return s, i


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


def _open_binary(path: str, storage_options: dict[str, Any]) -> BinaryIO:
    """Open a local path or fsspec URL for binary reading."""
    if "://" in path:
        return fsspec.open(path, "rb", **storage_options).open()  # type: ignore[no-any-return]
    return open(path, "rb")


def _read_into(stream: BinaryIO, buf: memoryview) -> int:
    """Fill buf from stream; return how many bytes were read (short only at EOF)."""
    view = buf
    got = 0
    while got < len(buf):
        n = stream.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    return got


def _skip(stream: BinaryIO, n: int, src: NiftiSource) -> None:
    """Read and discard the first n bytes (header and extensions)."""
    left = n
    while left:
        chunk = stream.read(min(left, 1 << 20))
        if not chunk:
            raise src.error(f"truncated: file ends inside the header ({n - left} of {n} bytes)")
        left -= len(chunk)


def _file_size(path: str, storage_options: dict[str, Any]) -> int:
    if "://" in path:
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
            if str(path).endswith(".gz") and not compressed:
                raise InvalidNiftiError(path, "named .gz but is not a gzip file", case_id)
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
        For anything that is not a readable 3D (or single-volume 4D) NIfTI image.
    """
    storage_options = dict(storage_options or {})
    path = str(path)
    head, compressed = _read_head(path, storage_options, case_id)

    def fail(fault: str) -> InvalidNiftiError:
        return InvalidNiftiError(path, fault, case_id)

    if len(head) < 348:
        raise fail(f"too short for a NIfTI header ({len(head)} bytes)")
    hdr = _parse_header(head, fail)
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
        raw_dtype = hdr.get_data_dtype()
    except Exception as exc:  # nibabel raises HeaderDataError for unknown codes
        raise fail(f"unsupported datatype code {int(hdr['datatype'])}") from exc
    if raw_dtype.kind not in "iuf" or raw_dtype.itemsize > 8:
        raise fail(f"unsupported datatype {raw_dtype} (code {int(hdr['datatype'])})")

    nbytes = nx * ny * nz * raw_dtype.itemsize
    file_size = _file_size(path, storage_options)
    vox_offset = int(hdr.get_data_offset())
    header_size = 540 if version == 2 else 348
    if vox_offset < header_size:
        # NIfTI-1 single files must start data at >= 352; 0 means "right after the header"
        vox_offset = header_size + 4 if vox_offset == 0 else vox_offset
        if vox_offset < header_size:
            raise fail(f"vox_offset {vox_offset} points inside the header")
    limit = (file_size * _MAX_DEFLATE_RATIO + 4096) if compressed else file_size - vox_offset
    if nbytes > MAX_VOXEL_BYTES:
        raise fail(f"header declares {nbytes} bytes of voxels, over the {MAX_VOXEL_BYTES} byte cap")
    if nbytes > limit:
        what = "can inflate to at most" if compressed else "holds only"
        raise fail(
            f"header declares {nbytes} bytes of voxels but the {file_size}-byte file {what} {limit}"
        )

    zooms = [float(z) for z in hdr["pixdim"][1:4]]
    zooms = [z if i < ndim else (z if z > 0 else 1.0) for i, z in enumerate(zooms)]
    if not all(math.isfinite(z) and z > 0 for z in zooms):
        raise fail(f"spatial pixdim must be positive and finite, got {tuple(zooms)}")
    space_unit, _ = hdr.get_xyzt_units()
    if space_unit == "unknown":
        notes.append("spatial units unknown: read as millimetres")
    elif space_unit in ("meter", "micron"):
        notes.append(f"spatial units {space_unit}: affine kept as written")

    slope, inter = _scaling(hdr, fail)
    try:
        affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception as exc:
        raise fail(f"cannot compute the affine: {exc}") from exc
    if not np.all(np.isfinite(affine)):
        raise fail("affine is not finite")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise fail("affine is singular (degenerate geometry)")
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    if qcode > 0 and scode > 0:
        gap = _qform_sform_gap_mm(hdr, (nx, ny, nz))
        if gap > QFORM_SFORM_TOLERANCE_MM:
            msg = f"{path}: qform and sform disagree by {gap:.3g} mm; the sform is used"
            notes.append(msg.split(": ", 1)[1])
            warnings.warn(msg, CtzarrWarning, stacklevel=2)

    value_dtype = apply_read_scaling(np.zeros(1, raw_dtype), *_typed_scaling(slope, inter)).dtype
    return NiftiSource(
        path=path,
        nifti_version=version,
        shape_zyx=(nz, ny, nx),
        raw_dtype=raw_dtype,
        value_dtype=value_dtype.newbyteorder("="),
        slope=slope,
        inter=inter,
        affine=affine,
        spacing_zyx=(zooms[2], zooms[1], zooms[0]),
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
            raise fail(f"too short for a NIfTI-2 header ({len(head)} bytes)")
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
    if magic not in (b"n+1", b"ni1", b"n+2", b"ni2"):
        raise fail(f"bad NIfTI magic {bytes(hdr['magic'])!r}")
    if magic.startswith(b"ni"):
        raise fail(
            "header/image pairs (.hdr/.img) are not supported: the header says the data is in a separate file"
        )
    return hdr


def _scaling(hdr: nib.Nifti1Header, fail: Any) -> tuple[float, float]:
    """Scale factors as nibabel applies them: slope 0 or NaN means no scaling."""
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if slope == 0 or math.isnan(slope):
        return 1.0, 0.0
    if not math.isfinite(slope) or not math.isfinite(inter):
        raise fail(f"non-finite scaling: scl_slope={slope}, scl_inter={inter}")
    return slope, inter


def _qform_sform_gap_mm(hdr: nib.Nifti1Header, shape_xyz: tuple[int, int, int]) -> float:
    """Largest distance between qform and sform positions of the volume's corners."""
    q, s = hdr.get_qform(), hdr.get_sform()
    corners = np.array(
        [
            [i, j, k, 1]
            for i in (0, shape_xyz[0] - 1)
            for j in (0, shape_xyz[1] - 1)
            for k in (0, shape_xyz[2] - 1)
        ],
        dtype=np.float64,
    ).T
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
