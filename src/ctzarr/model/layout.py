"""The array layout of the format: pyramid level shapes, chunk and shard sizes, compressors."""

from __future__ import annotations

from typing import Any

from zarr.codecs import BloscCodec, Crc32cCodec

CHUNK = 64


MAX_LEVELS = 3


#: a pyramid level exists only while its largest axis keeps at least this many voxels
MIN_LEVEL_EXTENT = 32


#: blosc's block inside a chunk (bytes): 16 slices of a 64**3 int16 chunk, so a crop decodes
#: only the blocks holding its slices (``ctzarr.io.chunks``)
BLOSC_BLOCK = 128 * 1024


def compressors() -> list[Any]:
    """The codec chain of every data array: blosc zstd level 1 with bitshuffle in 128 KiB
    blocks, then crc32c.

    Level 1 stores the bench CT in about as many bytes as level 3 (0.787 vs 0.781 of the
    .nii.gz; the same 128 KiB blocks level 3 chose itself) and encodes in 30 % less CPU; in a
    conversion it saved 0.5 CPU-s per case (level 3's larger match tables are set up for every
    chunk), 0.35 s of a whole ``ctzarr convert`` (benchmarks/README.md). Stores written with
    level 3 read the same: the codec's parameters are in each array's metadata.
    """
    return [
        BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", blocksize=BLOSC_BLOCK),
        Crc32cCodec(),
    ]


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
