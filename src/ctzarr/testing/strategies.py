"""Hypothesis strategies for round-trip tests: small volumes, affines and chunkings.

Imported by tests only (it needs ``hypothesis``, a test dependency). Volumes are small (at most
12 x 9 x 9 voxels) so that a convert-and-read-back example costs milliseconds; the affines cover
what NIfTI writers produce: any voxel size from 0.3 to 6 mm, any axis flipped (ITK's LPS), an
oblique rotation about z, and a translation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st

__all__ = ["DTYPES", "affines", "chunk_shapes", "shapes_zyx", "volumes"]

#: NIfTI data types a CT image may come in (nibabel writes each of them)
DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "float32", "float64")


def shapes_zyx(
    max_zyx: tuple[int, int, int] = (12, 9, 9),
) -> st.SearchStrategy[tuple[int, int, int]]:
    """Volume shapes (z, y, x), at least one voxel along each axis."""
    z, y, x = max_zyx
    return st.tuples(st.integers(1, z), st.integers(1, y), st.integers(1, x))


def chunk_shapes(max_edge: int = 5) -> st.SearchStrategy[tuple[int, int, int]]:
    """Chunk shapes (z, y, x), not necessarily dividing the volume."""
    edge = st.integers(1, max_edge)
    return st.tuples(edge, edge, edge)


@st.composite
def affines(draw: st.DrawFn) -> np.ndarray[Any, np.dtype[np.float64]]:
    """4 x 4 NIfTI affines: voxel sizes 0.3-6 mm, axes flipped at random, sometimes oblique."""
    zooms = [draw(st.floats(0.3, 6.0)) for _ in range(3)]
    flips = [draw(st.sampled_from([-1.0, 1.0])) for _ in range(3)]
    angle = draw(st.sampled_from([0.0, 0.0, 0.3]))
    rot = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(np.array(zooms) * flips)
    affine[:3, 3] = [draw(st.floats(-300, 300)) for _ in range(3)]
    return affine


@st.composite
def volumes(draw: st.DrawFn) -> dict[str, Any]:
    """A small image with a label mask on its grid and the NIfTI options to write it with.

    Keys: ``data`` (z, y, x) in one of :data:`DTYPES` (integers within +-5000, floats normal
    around 0 and sometimes integral), ``mask`` (uint8 0..3, same shape), ``affine``, ``endian``
    (``"<"`` or ``">"``), ``version`` (NIfTI 1 or 2) and ``slope_inter`` (a scaling for integer
    images, or None).
    """
    shape = tuple(draw(st.integers(1, 9)) for _ in range(3))
    dtype: np.dtype[Any] = np.dtype(draw(st.sampled_from(DTYPES)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    data: np.ndarray[Any, Any]
    if dtype.kind == "f":
        data = rng.normal(0, 300, size=shape).astype(dtype)
        if draw(st.booleans()):
            data = np.round(data)
    else:
        info = np.iinfo(dtype)
        lo, hi = max(int(info.min), -5000), min(int(info.max), 5000)
        data = rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    affine = draw(affines())
    scaled = dtype.kind in "iu" and draw(st.booleans())
    slope_inter = (
        (draw(st.sampled_from([0.5, 2.0, 1.25])), draw(st.sampled_from([0.0, -1024.0, 3.5])))
        if scaled
        else None
    )
    return {
        "data": data,
        "affine": affine,
        "endian": draw(st.sampled_from(["<", ">"])),
        "version": draw(st.sampled_from([1, 2])),
        "slope_inter": slope_inter,
        "mask": rng.integers(0, 4, size=shape).astype(np.uint8),
    }
