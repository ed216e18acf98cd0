"""TotalSegmentator's layout: one binary mask file per structure, merged into label maps.

TotalSegmentator (its outputs and its public training set) and AbdomenAtlas ship one case per
folder::

    <root>/<image_id>/ct.nii.gz
    <root>/<image_id>/segmentations/<structure>.nii.gz      one 0/1 mask per structure
    <root>/<image_id>/segmentations_<task>/<structure>.nii.gz   (optional, one task each)
    <root>/meta.csv                                          (optional: image_id;age;gender;...)

Which segmentation a mask belongs to is decided by its file name: the masks of
``segmentations/`` go to the TotalSegmentator task whose class map holds the name (``total``
for ``liver.nii.gz``, ``tissue_types`` for ``skeletal_muscle.nii.gz``; the class names of the
tasks in package data are unique across tasks), and those of a ``segmentations_<task>/``
folder to that task (what ``TotalSegmentator -ta tissue_types -o segmentations_tissue_types``
writes). Names match as structure names do elsewhere (:func:`~ctzarr.model.labels.match_key`:
case, spaces, hyphens and underscores ignored). A name no task knows is kept with ``total``
(or the folder's task) so that converting its case fails with the name and the closest known
names, and the other cases go on.

:class:`MaskStackSource` merges the masks of one segmentation into one label volume with
TotalSegmentator's class ids, streaming: for every slab of ``slab_z`` slices it reads that slab
of each mask from its own open (gzip) stream and ORs it into the output slab, so memory holds
one output slab and one mask slab whatever the number of masks (each open stream costs a few
hundred KB of buffers). A mask with a value other than 0 and 1 fails the case at once; two masks
that claim one voxel fail it after the last slab, with both structures and the voxel count
(the first mask in id order keeps the voxel meanwhile). An empty mask is an absent structure.
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import hashlib
import io
import threading
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any, BinaryIO, cast

import fsspec
import numpy as np
from isal import igzip, isal_zlib

from ctzarr.errors import CaseMismatchError, InvalidNiftiError, LayoutError
from ctzarr.io.urls import url_protocol
from ctzarr.model.labels import (
    TOTALSEGMENTATOR_TASKS,
    LabelMap,
    match_key,
    totalsegmentator_label_map,
)
from ctzarr.sources.nifti import NiftiSource, check_same_grid, open_nifti

#: the image of a case folder
CT_FILE = "ct.nii.gz"

#: the folder of a case's masks (every task, told apart by file name)
MASK_FOLDER = "segmentations"

#: ``segmentations_<task>/``: a folder holding the masks of one task
TASK_FOLDER_PREFIX = "segmentations_"

#: the case table at the dataset root
META_CSV = "meta.csv"

#: the case id column of meta.csv
META_ID_COLUMN = "image_id"

_NII = (".nii.gz", ".nii")


def mask_stem(filename: str) -> str | None:
    """The structure part of a mask file name (``liver`` of ``liver.nii.gz``), else None."""
    for ext in _NII:
        if filename.endswith(ext) and len(filename) > len(ext):
            return filename[: -len(ext)]
    return None


def mask_role(segmentation: str, filename: str) -> str:
    """The key of a mask file among a case's source files (``total/liver.nii.gz``)."""
    return f"{segmentation}/{filename}"


@cache
def _task_of_key() -> dict[str, str]:
    """match key of a class name -> its TotalSegmentator task (names are unique across tasks)."""
    out: dict[str, str] = {}
    for task in TOTALSEGMENTATOR_TASKS:
        for lab in totalsegmentator_label_map(task):
            if lab.value != 0:
                out.setdefault(match_key(lab.name), task)
    return out


def task_of_mask(filename: str) -> str | None:
    """The TotalSegmentator task whose class map names this mask file, or None."""
    stem = mask_stem(filename)
    return None if stem is None else _task_of_key().get(match_key(stem))


def task_folder(name: str) -> str | None:
    """The task of a ``segmentations_<task>`` folder name, or None for any other folder."""
    if not name.startswith(TASK_FOLDER_PREFIX):
        return None
    task = name.removeprefix(TASK_FOLDER_PREFIX)
    return task if task in TOTALSEGMENTATOR_TASKS else None


def parse_meta_csv(text: str, where: str) -> dict[str, dict[str, str]]:
    """Rows of a TotalSegmentator ``meta.csv`` by ``image_id``: the other columns as text.

    The training set's file is ``;``-separated, other tables use ``,``: the delimiter is the one
    of the two that the header line holds (``;`` when both do). Values and names are stripped of
    surrounding spaces; empty column names are dropped.

    Raises
    ------
    LayoutError
        No ``image_id`` column, a duplicate or empty id, or unreadable CSV; names ``where``.
    """
    text = text.removeprefix("\ufeff")
    header = text.split("\n", 1)[0]
    delimiter = ";" if ";" in header or "," not in header else ","
    try:
        reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        if META_ID_COLUMN not in columns:
            raise LayoutError(
                f"{where}: no {META_ID_COLUMN!r} column (columns: {columns}; separated by "
                f"{delimiter!r})"
            )
        rows: dict[str, dict[str, str]] = {}
        for row in reader:
            clean = {
                (k or "").strip(): (v if isinstance(v, str) else "").strip()
                for k, v in row.items()
                if k is not None and k.strip()
            }
            image_id = clean.pop(META_ID_COLUMN, "")
            if not image_id:
                if any(clean.values()):
                    raise LayoutError(f"{where}:{reader.line_num}: empty {META_ID_COLUMN}")
                continue  # a blank line
            if image_id in rows:
                raise LayoutError(f"{where}:{reader.line_num}: duplicate image_id {image_id!r}")
            rows[image_id] = clean
    except csv.Error as exc:
        raise LayoutError(f"{where}: unreadable CSV: {exc}") from exc
    return rows


# -- the merged source ----------------------------------------------------------------------


@dataclass(frozen=True)
class MaskFile:
    """One mask of a stack: the structure it stands for and its validated NIfTI file."""

    value: int
    structure: str
    filename: str
    source: NiftiSource


def _closest(stem: str, label_map: LabelMap) -> list[str]:
    """Up to 5 class names of the map (or of any task) closest to a file's stem."""
    names = {
        match_key(lab.name): lab.name for lab in label_map if lab.value != label_map.background
    }
    for task in TOTALSEGMENTATOR_TASKS:
        for lab in totalsegmentator_label_map(task):
            if lab.value:
                names.setdefault(match_key(lab.name), lab.name)
    return [names[k] for k in difflib.get_close_matches(match_key(stem), list(names), n=5)]


def resolve_masks(
    case_id: str,
    segmentation: str,
    label_map: LabelMap,
    files: Mapping[str, str],
) -> list[tuple[int, str, str, str]]:
    """``(value, structure, filename, path)`` of each mask file, in value order.

    Raises
    ------
    LayoutError
        A file name no structure of the map has (the closest known names listed), or two files
        for one structure.
    """
    structures = [lab for lab in label_map if lab.value != label_map.background]
    by_key = {match_key(lab.name): lab for lab in structures}
    # a label map given for another dataset may spell a structure its own way and carry
    # TotalSegmentator's name beside it (DAP "bladder" for urinary_bladder.nii.gz)
    by_ts = {
        match_key(lab.totalsegmentator_name): lab for lab in structures if lab.totalsegmentator_name
    }
    found: dict[int, tuple[int, str, str, str]] = {}
    for filename, path in sorted(files.items()):
        stem = mask_stem(filename)
        key = match_key(stem) if stem is not None else None
        lab = None if key is None else by_key.get(key) or by_ts.get(key)
        if lab is None:
            close = _closest(stem or filename, label_map)
            hint = f"; closest known names: {', '.join(close)}" if close else ""
            raise LayoutError(
                f"case {case_id!r}: {path}: mask file {filename!r} names no structure of "
                f"segmentation {segmentation!r} (label map {label_map.name!r}){hint}"
            )
        if lab.value in found:
            raise LayoutError(
                f"case {case_id!r}: {path}: a second mask of {lab.name!r} (also "
                f"{found[lab.value][2]!r})"
            )
        found[lab.value] = (lab.value, lab.name, filename, path)
    return [found[v] for v in sorted(found)]


def open_mask_stack(
    case_id: str,
    segmentation: str,
    label_map: LabelMap,
    files: Mapping[str, str],
    storage_options: Mapping[str, Any] | None = None,
    folder: str | None = None,
    reference: NiftiSource | None = None,
) -> MaskStackSource:
    """Validate the mask files of one segmentation of a case; read no voxel.

    Parameters
    ----------
    case_id : str
    segmentation : str
        The segmentation's name (``total``).
    label_map : LabelMap
        Its label map; file names are matched against its structure names.
    files : mapping
        File name (``liver.nii.gz``) -> path or URL.
    storage_options : mapping, optional
        fsspec options for remote URLs.
    folder : str, optional
        Where the masks are, for messages (default: the folder of the first file).
    reference : NiftiSource, optional
        The case's image: every mask must lie on its grid (else on the first mask's).

    Raises
    ------
    LayoutError
        Unknown or duplicate structure names (see :func:`resolve_masks`); no mask at all.
    InvalidNiftiError
        A mask file that is not a valid NIfTI image.
    CaseMismatchError
        A mask on another grid than the image (shape, or affine beyond 1e-3 mm at the corners).
    """
    so = dict(storage_options or {})
    members = []
    for value, structure, filename, path in resolve_masks(case_id, segmentation, label_map, files):
        src = open_nifti(path, case_id=case_id, storage_options=so)
        members.append(MaskFile(value, structure, filename, src))
    if not members:
        raise LayoutError(f"case {case_id!r}: segmentation {segmentation!r} has no mask file")
    first = members[0].source
    grid = reference or first
    for m in members:
        check_same_grid(case_id, grid, m.source, "the image's" if reference else "the first mask's")
    dtype = np.dtype(np.uint8) if label_map.max_value <= 255 else np.dtype(np.uint16)
    where = folder or first.path.rsplit("/", 1)[0]
    return MaskStackSource(
        path=where,
        case_id=case_id,
        segmentation=segmentation,
        members=tuple(members),
        shape_zyx=first.shape_zyx,
        affine=first.affine,
        header_bytes=first.header_bytes,
        value_dtype=dtype,
        notes=_merged_notes(members),
    )


def _merged_notes(members: Sequence[MaskFile]) -> tuple[str, ...]:
    """Each distinct reading note of the masks once, with how many masks it concerns."""
    seen: Counter[str] = Counter()
    first_file: dict[str, str] = {}
    for m in members:
        for note in m.source.notes:
            seen[note] += 1
            first_file.setdefault(note, m.filename)
    return tuple(
        f"{first_file[n]}: {n}" if k == 1 else f"{k} masks (e.g. {first_file[n]}): {n}"
        for n, k in seen.items()
    )


@dataclass(frozen=True)
class MaskStackSource:
    """The masks of one segmentation of a case, read as one label volume, slab by slab.

    It offers what the case writer reads of a segmentation source (see
    :class:`ctzarr.write.case_writer.LabelSlabSource`): the grid, the header of the stored label
    group (the first mask's, with the label dtype), ``iter_slabs`` and ``scale``. Values are the
    label map's ids: unscaled, no byte order to convert.

    Attributes
    ----------
    file_digests : dict
        Filled by :meth:`iter_slabs` when the stream ends: :func:`mask_role` -> SHA-256 of the
        file's bytes, for the case's source records.
    """

    path: str
    case_id: str
    segmentation: str
    members: tuple[MaskFile, ...]
    shape_zyx: tuple[int, int, int]
    affine: np.ndarray
    header_bytes: bytes
    value_dtype: np.dtype[Any]
    notes: tuple[str, ...] = ()
    file_digests: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def raw_dtype(self) -> np.dtype[Any]:
        return self.value_dtype

    @property
    def scaled(self) -> bool:
        """Never: the merged values are the label ids themselves."""
        return False

    def scale(self, raw: np.ndarray) -> np.ndarray:
        """The values of a merged slab: the slab itself."""
        return raw

    def iter_slabs(
        self, slab_z: int, digest: Any = None, reuse_buffers: int = 0
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(z_start, labels)`` slabs of ``slab_z`` slices in (z, y, x), label ids.

        ``digest`` (a hashlib object) is fed with each mask's role and SHA-256 once every
        stream ended; :attr:`file_digests` holds the same per file. ``reuse_buffers=n``
        recycles a ring of n output slabs (a slab is overwritten n slabs later).

        Raises
        ------
        InvalidNiftiError
            A mask with a value other than 0 and 1, or a truncated or corrupt file.
        CaseMismatchError
            After the last slab, when two masks claim voxels: both structures and the count.
        """
        nz, ny, nx = self.shape_zyx
        plane = ny * nx
        n_values = int(max(m.value for m in self.members)) + 1
        overlap = np.zeros((len(self.members), n_values), np.int64)
        kernel = _merge_kernel()
        # masks are read a few slices at a time: one small buffer, not one slab per mask
        step = min(slab_z, _READ_SLICES)
        itemsize = max(m.source.raw_dtype.itemsize for m in self.members)
        scratch = bytearray(step * plane * itemsize)
        ring: list[np.ndarray] = []
        turn = 0
        with contextlib.ExitStack() as stack:
            streams = [stack.enter_context(_MaskStream(m.source)) for m in self.members]
            for z0 in range(0, nz, slab_z):
                depth = min(slab_z, nz - z0)
                if reuse_buffers:
                    if len(ring) < reuse_buffers:
                        ring.append(np.empty(slab_z * plane, self.value_dtype))
                    out = ring[turn % reuse_buffers][: depth * plane]
                    turn += 1
                else:
                    out = np.empty(depth * plane, self.value_dtype)
                out.fill(0)
                for i, (member, stream) in enumerate(zip(self.members, streams, strict=True)):
                    value = out.dtype.type(member.value)
                    for zs in range(z0, z0 + depth, step):
                        n = min(step, z0 + depth - zs)
                        mask = stream.read_mask(scratch, zs, n)
                        bad, first_bad = kernel(
                            mask,
                            mask[: mask.size // 8 * 8].view(np.uint64),
                            out[(zs - z0) * plane : (zs - z0 + n) * plane],
                            value,
                            overlap[i],
                        )
                        if bad:
                            raise _not_binary(member.source, mask, bad, first_bad, zs)
                yield z0, out.reshape(depth, ny, nx)
            digests = {
                mask_role(self.segmentation, m.filename): s.finish()
                for m, s in zip(self.members, streams, strict=True)
            }
        if overlap.any():
            raise self._overlap_error(overlap)
        self.file_digests.clear()
        self.file_digests.update(digests)
        if digest is not None:
            for role, hexdigest in digests.items():
                digest.update(f"{role}\0{hexdigest}\n".encode())

    def _overlap_error(self, overlap: np.ndarray) -> CaseMismatchError:
        by_value = {m.value: m for m in self.members}
        pairs = []
        for i, later in enumerate(self.members):
            for value in np.flatnonzero(overlap[i]).tolist():
                earlier = by_value[value]
                pairs.append(
                    f"{earlier.filename} ({earlier.structure}) and {later.filename} "
                    f"({later.structure}) both claim {int(overlap[i, value])} voxels"
                )
        more = f" (and {len(pairs) - 5} more pairs)" if len(pairs) > 5 else ""
        return CaseMismatchError(
            f"case {self.case_id!r}: {self.path}: overlapping masks of segmentation "
            f"{self.segmentation!r}: {'; '.join(pairs[:5])}{more}"
        )


def _not_binary(
    source: NiftiSource, mask: np.ndarray, count: int, first: int, z0: int
) -> InvalidNiftiError:
    """The error of a mask holding values other than 0 and 1 (found in the slab at z0)."""
    values = np.unique(mask[(mask != 0) & (mask != 1)])[:10].tolist()
    plane = source.shape_zyx[1] * source.shape_zyx[2]
    z, rest = divmod(first, plane)
    y, x = divmod(rest, source.shape_zyx[2])
    return source.error(
        f"a mask holds values other than 0 and 1: {values} in {count} voxels of slices "
        f"{z0}..{z0 + mask.size // plane - 1}, first at voxel (z, y, x) = ({z0 + z}, {y}, {x})"
    )


class _HashingRaw(io.RawIOBase):
    """A binary file read through, every byte fed to a SHA-256 on the way."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self._raw.readinto(b)  # type: ignore[attr-defined]
        if n:
            self.sha256.update(memoryview(b)[:n])
        return int(n or 0)

    def drain(self) -> None:
        """Feed what is left of the file (bytes after the voxel data) to the digest."""
        while chunk := self._raw.read(1 << 20):
            self.sha256.update(chunk)


def _open_binary(path: str, storage_options: dict[str, Any]) -> BinaryIO:
    """Open a local path or fsspec URL for binary reading."""
    if url_protocol(path):
        return fsspec.open(path, "rb", **storage_options).open()  # type: ignore[no-any-return]
    return open(path, "rb")


#: slices of a mask read (and merged) at a time
_READ_SLICES = 8


#: compressed bytes read from a mask file at a time
_GZIP_INPUT_BUFFER = 64 * 1024


#: faults of a gzip stream: isal's own, zlib's, and what GzipFile raises for a bad trailer
_STREAM_FAULTS: tuple[type[BaseException], ...] = (
    EOFError,
    OSError,
    ValueError,
    zlib.error,
    cast("type[BaseException]", isal_zlib.error),  # a class; its stub calls it an instance
)


class _MaskStream:
    """One mask file, open for the whole case and read slab after slab.

    One single-threaded isal inflater per file with a 64 KB input buffer (~160 KB a file):
    reopening and seeking per slab inflates every file's prefix again (quadratic in the slabs:
    2.9x the time on a 400-slice case, ``benchmarks/bench_totalseg.py``); ``igzip.IGzipFile``
    reads ahead 512 KB (~550 KB a file, 65 MB for 117 masks); the threaded reader the image
    uses runs a thread per file.
    """

    def __init__(self, source: NiftiSource) -> None:
        self.source = source
        self._file: BinaryIO | None = None
        self._hashing: _HashingRaw | None = None
        self._stream: Any = None

    def __enter__(self) -> _MaskStream:
        src = self.source
        self._file = _open_binary(src.path, src.storage_options)
        self._hashing = _HashingRaw(self._file)
        if not src.compressed:
            self._stream = io.BufferedReader(self._hashing)
        elif hasattr(isal_zlib, "_GzipReader"):
            # the reader inside igzip.IGzipFile (it checks each member's CRC and length), with
            # a smaller input buffer than IGzipFile gives it
            self._stream = isal_zlib._GzipReader(self._hashing, _GZIP_INPUT_BUFFER)  # type: ignore[arg-type]
        else:  # pragma: no cover - an isal without the private reader
            self._stream = igzip.IGzipFile(fileobj=self._hashing, mode="rb")  # type: ignore[no-untyped-call]
        self._guard(lambda: self._skip(src.vox_offset))
        return self

    def __exit__(self, *exc: object) -> None:
        for closable in (self._stream, self._file):
            if closable is not None:
                with contextlib.suppress(Exception):
                    closable.close()

    def _guard(self, read: Any) -> Any:
        try:
            return read()
        except InvalidNiftiError:
            raise
        except _STREAM_FAULTS as exc:
            if isinstance(exc, EOFError) or "ended before" in str(exc):
                raise self.source.error(
                    f"truncated: the compressed stream ends early ({exc})"
                ) from exc
            raise self.source.error(f"corrupt compressed stream: {exc}") from exc

    def _skip(self, n: int) -> None:
        left = n
        while left:
            chunk = self._stream.read(min(left, 1 << 20))
            if not chunk:
                raise self.source.error(
                    f"truncated: file ends inside the header ({n - left} of {n} bytes)"
                )
            left -= len(chunk)

    def read_mask(self, scratch: bytearray, z0: int, depth: int) -> np.ndarray:
        """The next ``depth`` slices as a flat uint8 array of 0/1 (other values kept, checked
        by the merge kernel); non-uint8 or scaled masks are converted here."""
        src = self.source
        nbytes = depth * src.slice_bytes
        view = memoryview(scratch)[:nbytes]
        got = self._guard(lambda: _read_into(self._stream, view))
        if got != nbytes:
            raise src.error(
                f"truncated: voxel data ends after {z0 * src.slice_bytes + got} of "
                f"{src.shape_zyx[0] * src.slice_bytes} bytes"
            )
        raw = np.frombuffer(view, dtype=src.raw_dtype)
        if raw.dtype == np.uint8 and not src.scaled:
            return raw
        values = src.scale(raw.astype(raw.dtype.newbyteorder("=")))
        is_one = values == 1
        bad = ~is_one & (values != 0)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise _not_binary(src, values, int(bad.sum()), first, z0)
        out: np.ndarray = is_one.view(np.uint8)
        return out

    def finish(self) -> str:
        """Read to the end (the gzip trailer's CRC and length are checked); the file's SHA-256."""
        trailing = self._guard(lambda: self._stream.read(1))
        if trailing:
            raise self.source.error("trailing data after the voxel data")
        assert self._hashing is not None
        self._hashing.drain()
        return self._hashing.sha256.hexdigest()


def _read_into(stream: Any, buf: memoryview) -> int:
    """Fill buf from stream; how many bytes were read (short only at the end)."""
    got = 0
    while got < len(buf):
        n = stream.readinto(buf[got:])
        if not n:
            break
        got += n
    return got


def _merge_mask(mask, words, out, value, overlap):  # type: ignore[no-untyped-def]  # pragma: no cover - compiled by numba (see _merge_kernel)
    """OR one 0/1 mask slab into the label slab: ``out[mask == 1] = value`` where ``out`` is 0.

    Written by hand (numba) because numpy needs several passes and temporaries per mask
    (nonzero, compare, gather, scatter) and a stack has 117 masks, nearly all zero in a slab:
    this loop skips zero 8-byte words, so an empty slab costs one read of its bytes. Voxels
    that another mask already claimed are counted in ``overlap[their value]`` and kept;
    returns (number of values other than 0 and 1, flat index of the first).
    """
    bad = 0
    first_bad = -1
    n_words = words.size
    for w in range(n_words + 1):
        if w < n_words:
            if words[w] == 0:
                continue
            lo, hi = w * 8, w * 8 + 8
        else:
            lo, hi = n_words * 8, mask.size
        for i in range(lo, hi):
            v = mask[i]
            if v == 0:
                continue
            if v != 1:
                if bad == 0:
                    first_bad = i
                bad += 1
                continue
            o = out[i]
            if o == 0:
                out[i] = value
            else:
                overlap[o] += 1
    return bad, first_bad


_KERNEL: list[Any] = []
_KERNEL_LOCK = threading.Lock()


def _merge_kernel() -> Any:
    """The compiled merge loop, built (or loaded from numba's cache) on first use.

    numba is imported here, not with this module: listing a dataset's layout must not pay its
    ~0.3 s import.
    """
    if not _KERNEL:
        with _KERNEL_LOCK:
            if not _KERNEL:
                import numba

                _KERNEL.append(numba.njit(nogil=True, cache=True)(_merge_mask))
    return _KERNEL[0]
