"""What every typed attribute block shares: the format version and the ``parse_*`` checks.

Each block of the store format (collection, case, index, table, OME) is a frozen dataclass with
``from_attributes(d, where=...)`` and ``to_attributes()``; the ``parse_*`` functions here return
a normalised value or raise :class:`~ctzarr.errors.MetadataError` naming the key and where it
was read (``"case 'x' in /p/s.zarr"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from ctzarr._version import __version__
from ctzarr.errors import MetadataError, UnsupportedFormatError

#: version of the store format, in the collection and case attributes. Format 2 added the
#: NIfTI-Zarr ``nifti`` header array of every label image group, the RFC-4 anatomical
#: orientation of the OME axes with a translation at every level (:mod:`ctzarr.model.ome`), and
#: ``dimension_names`` on every array. Format 3 added to each segmentation's index the voxel
#: count of every label in every chunk it occupies, per-slice voxel counts and value sums (the
#: ``slices`` array), and the joint index of each pair of segmentations of a case
#: (:mod:`ctzarr.model.index`). This release reads formats 1 to 3.
FORMAT_VERSION = 3

#: the key under which ctzarr keeps its attributes in a group's ``zarr.json``
CTZARR_KEY = "ctzarr"


def _fail(where: str, key: str, fault: str, value: Any) -> MetadataError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return MetadataError(where, key, f"{fault}, got {shown}")


def parse_block(attributes: Any, key: str, where: str) -> Mapping[str, Any]:
    """The mapping stored under ``key`` of a group's attributes."""
    if not isinstance(attributes, Mapping):
        raise _fail(where, "(attributes)", "expected a JSON object", attributes)
    block = attributes.get(key)
    if not isinstance(block, Mapping):
        raise _fail(where, key, "expected a JSON object", block)
    return block


def require(block: Mapping[str, Any], key: str, prefix: str, where: str) -> Any:
    """``block[key]``, or an error naming the missing key."""
    if key not in block:
        raise MetadataError(where, f"{prefix}.{key}", "missing")
    return block[key]


def parse_int(value: Any, key: str, where: str, *, minimum: int | None = None) -> int:
    """An integer (not a bool), at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, key, "expected an integer", value)
    if minimum is not None and value < minimum:
        raise _fail(where, key, f"expected an integer >= {minimum}", value)
    return value


def parse_float(value: Any, key: str, where: str, *, finite: bool = True) -> float:
    """A number (int or float, not a bool) as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, key, "expected a number", value)
    if finite and not math.isfinite(value):
        raise _fail(where, key, "expected a finite number", value)
    return float(value)


def parse_str(value: Any, key: str, where: str) -> str:
    if not isinstance(value, str):
        raise _fail(where, key, "expected a string", value)
    return value


def parse_optional_str(value: Any, key: str, where: str) -> str | None:
    return None if value is None else parse_str(value, key, where)


def parse_bool(value: Any, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, key, "expected true or false", value)
    return value


def parse_str_list(value: Any, key: str, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, key, "expected a list of strings", value)
    return tuple(value)


def parse_shape(value: Any, key: str, where: str) -> tuple[int, int, int]:
    """Three positive integers (z, y, x)."""
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise _fail(where, key, "expected 3 positive integers", value)
    return (value[0], value[1], value[2])


def parse_spacing(value: Any, key: str, where: str) -> tuple[float, float, float]:
    """Three positive finite numbers (z, y, x), millimetres."""
    if (
        not isinstance(value, list)
        or len(value) != 3
        or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            for v in value
        )
    ):
        raise _fail(where, key, "expected 3 positive finite numbers", value)
    return (float(value[0]), float(value[1]), float(value[2]))


Affine = tuple[tuple[float, float, float, float], ...]


def parse_affine(value: Any, key: str, where: str) -> Affine:
    """A 4 x 4 matrix of finite numbers, as nested tuples."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise _fail(where, key, "expected a 4 x 4 matrix of numbers", value) from None
    if (
        not isinstance(value, list)
        or arr.shape != (4, 4)
        or not np.isfinite(arr).all()
        or any(isinstance(v, bool) for row in value for v in row)
    ):
        raise _fail(where, key, "expected a 4 x 4 matrix of finite numbers", value)
    return tuple((r[0], r[1], r[2], r[3]) for r in arr.tolist())


def parse_dtype(value: Any, key: str, where: str) -> np.dtype[Any]:
    """A numpy dtype string of a plain numeric type (``"<i2"``, ``"|u1"``, ``"<f4"``)."""
    if not isinstance(value, str):
        raise _fail(where, key, "expected a numpy dtype string", value)
    try:
        dtype = np.dtype(value)
    except TypeError:
        raise _fail(where, key, "expected a numpy dtype string", value) from None
    if dtype.kind not in "iuf" or dtype.str != value:
        raise _fail(where, key, "expected a plain numeric dtype string like '<i2'", value)
    return dtype


def parse_format_version(value: Any, key: str, where: str, *, writer: str | None = None) -> int:
    """A format version this release reads; a newer one is :class:`UnsupportedFormatError`.

    ``writer`` (the collection's ``ctzarr.writer``, e.g. ``"ctzarr 0.3.0"``) is named in the
    error: that release reads the store.
    """
    version = parse_int(value, key, where, minimum=1)
    if version > FORMAT_VERSION:
        by = f"it was written by {writer}" if writer else "it was written by a newer ctzarr"
        raise UnsupportedFormatError(
            f"{where + ': ' if where else ''}attribute {key}: store format {version} is newer "
            f"than ctzarr {__version__} reads (formats 1 to {FORMAT_VERSION}); {by}: upgrade "
            "ctzarr (pip install --upgrade ctzarr) to read it",
            where=where,
            key=key,
            version=version,
            readable=FORMAT_VERSION,
        )
    return version


def check_format_version(attributes: Any, where: str) -> None:
    """Refuse a group of a newer store format before anything else of it is parsed.

    A newer format may lay out everything else differently: its version is the one thing
    checked first (:class:`UnsupportedFormatError`, never a confusing error about some other
    key). A missing or malformed version is left to the full parse.
    """
    block = attributes.get(CTZARR_KEY) if isinstance(attributes, Mapping) else None
    if not isinstance(block, Mapping):
        return
    value = block.get("format_version")
    if isinstance(value, int) and not isinstance(value, bool) and value > FORMAT_VERSION:
        writer = block.get("writer")
        parse_format_version(
            value,
            f"{CTZARR_KEY}.format_version",
            where,
            writer=writer if isinstance(writer, str) else None,
        )
