"""The array layout of the format: pyramid level shapes, chunk and shard sizes, compressors."""

from __future__ import annotations

from typing import Any

from zarr.codecs import BloscCodec, Crc32cCodec

CHUNK = 64


MAX_LEVELS = 3


#: a pyramid level exists only while its largest axis keeps at least this many voxels
MIN_LEVEL_EXTENT = 32


def compressors() -> list[Any]:
    """The codec chain of every data array: blosc zstd with bitshuffle, then crc32c."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()]


def level_shapes(shape_zyx: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Shapes of the pyramid levels (each halves every axis, rounding up)."""
    shapes = [shape_zyx]
    while len(shapes) < MAX_LEVELS:
        nxt = tuple(-(-s // 2) for s in shapes[-1])
        if max(nxt) < MIN_LEVEL_EXTENT or nxt == shapes[-1]:
            break
        shapes.append(nxt)  # type: ignore[arg-type]
    return shapes


def chunk_layout(
    shape_zyx: tuple[int, int, int], level: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(inner chunk, shard) shapes of a level: shards are whole-plane slabs of one stream slab."""
    depth = max(CHUNK >> level, 1)
    chunk = (depth, min(CHUNK, shape_zyx[1]), min(CHUNK, shape_zyx[2]))
    shard = (
        depth,
        -(-shape_zyx[1] // chunk[1]) * chunk[1],
        -(-shape_zyx[2] // chunk[2]) * chunk[2],
    )
    return chunk, shard
