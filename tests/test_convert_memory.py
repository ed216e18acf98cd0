"""The conversion's lean paths: shards encoded by ctzarr, the numpy pyramid mean, and the
bounded number of slabs in flight (issue 13, conversion time and peak memory).

- ``ShardEncoder`` writes the objects zarr would (read back by zarr, equal voxel for voxel to
  the same slab written with ``array[...] = slab``), at array edges (partial inner chunks,
  a short last shard, odd planes), with fill-only inner chunks absent from the shard index and
  fill-only shards absent from the store; arrays with another codec chain go through zarr.
- ``downsample_image`` equals an independent 2x2x2 mean for every image dtype NIfTI allows.
- ``Prefetch`` with permits never lets more items exist than permits (the ring of slab
  buffers is never refilled in use) and stops cleanly when the consumer fails or never
  starts.
- a conversion streams exactly (values equal nibabel's) whatever the number of slabs in flight.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import zarr
from zarr.codecs import GzipCodec
from zarr.storage import LocalStore, MemoryStore

import ctzarr
from ctzarr.model.layout import chunk_layout, compressors
from ctzarr.model.manifest import crc32c
from ctzarr.write import case_writer
from ctzarr.write.case_writer import Prefetch, ShardEncoder, downsample_image

from .conftest import nifti_zyx

_ABSENT = 2**64 - 1


def _array(root: zarr.Group, name: str, shape: tuple[int, int, int], dtype: Any, level: int = 0):
    chunk, shard = chunk_layout(shape, level)
    return root.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunk,
        shards=shard,
        compressors=compressors(),
        fill_value=0,
        dimension_names=("z", "y", "x"),
        config={"write_empty_chunks": False},
    )


def _volume(shape: tuple[int, int, int], dtype: Any, seed: int) -> np.ndarray:
    """Random values with whole inner chunks and whole shards of zeros in it."""
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        vol = rng.normal(0, 500, shape).astype(dt)
    else:
        info = np.iinfo(dt)
        vol = rng.integers(max(info.min, -2000), min(info.max, 3000), shape, endpoint=True)
        vol = vol.astype(dt)
    vol[:, :64, :64] = 0  # fill-only inner chunks
    if shape[0] > 64:
        vol[64:128] = 0  # a fill-only shard
    return vol


@pytest.mark.parametrize(
    ("shape", "dtype", "level"),
    [
        ((200, 130, 70), np.int16, 0),  # partial inner chunks in y and x, a short last shard
        ((128, 64, 64), np.uint8, 0),  # whole chunks only
        ((100, 65, 129), np.float32, 0),
        ((90, 96, 96), np.uint16, 1),  # level-1 layout: 32-deep shards
        ((40, 33, 33), np.int32, 2),
    ],
    ids=["int16-edges", "uint8-whole", "float32-edges", "uint16-level1", "int32-level2"],
)
def test_shard_encoder_writes_what_zarr_reads(
    tmp_path: Path, shape: tuple[int, int, int], dtype: Any, level: int
) -> None:
    root = zarr.open_group(LocalStore(tmp_path / "s.zarr"), mode="w")
    ours, theirs = (
        _array(root, "ours", shape, dtype, level),
        _array(root, "theirs", shape, dtype, level),
    )
    encoder = ShardEncoder.for_array(ours)
    assert encoder is not None
    vol = _volume(shape, dtype, seed=level)
    depth = ours.shards[0]
    for z0 in range(0, shape[0], depth):
        slab = vol[z0 : z0 + depth]
        assert encoder.covers(z0, slab.shape)
        for key, region in encoder.shards(z0, slab):
            data = encoder.encode(region)
            if data is not None:
                (tmp_path / "s.zarr" / "ours" / key).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / "s.zarr" / "ours" / key).write_bytes(data)
        theirs[z0 : z0 + depth] = slab
    np.testing.assert_array_equal(zarr.open_array(root.store, path="ours")[:], vol)
    np.testing.assert_array_equal(zarr.open_array(root.store, path="ours")[:], theirs[:])
    ours_keys = sorted(
        p.relative_to(tmp_path / "s.zarr" / "ours").as_posix()
        for p in (tmp_path / "s.zarr" / "ours" / "c").rglob("*")
        if p.is_file()
    )
    theirs_keys = sorted(
        p.relative_to(tmp_path / "s.zarr" / "theirs").as_posix()
        for p in (tmp_path / "s.zarr" / "theirs" / "c").rglob("*")
        if p.is_file()
    )
    assert ours_keys == theirs_keys  # fill-only shards are stored by neither


def test_shard_index_marks_fill_only_chunks_absent() -> None:
    root = zarr.open_group(MemoryStore(), mode="w")
    arr = _array(root, "a", (64, 128, 64), np.int16)
    encoder = ShardEncoder.for_array(arr)
    assert encoder is not None
    slab = np.zeros((64, 128, 64), np.int16)
    slab[:, 64:, :] = 7
    ((key, region),) = list(encoder.shards(0, slab))
    assert key == "c/0/0/0"
    data = encoder.encode(region)
    assert data is not None
    index_bytes = data[-encoder.index_nbytes : -4]
    assert crc32c(index_bytes) == int.from_bytes(data[-4:], "little")
    index = np.frombuffer(index_bytes, "<u8").reshape(1, 2, 1, 2)
    assert index[0, 0, 0].tolist() == [_ABSENT, _ABSENT]  # chunk of zeros: not stored
    offset, nbytes = index[0, 1, 0].tolist()
    chunk = data[offset : offset + nbytes]
    assert crc32c(chunk[:-4]) == int.from_bytes(chunk[-4:], "little")
    assert encoder.encode(np.zeros((64, 128, 64), np.int16)) is None


def test_other_codec_chains_are_written_by_zarr(tmp_path: Path) -> None:
    root = zarr.open_group(LocalStore(tmp_path / "s.zarr"), mode="w")
    plain = root.create_array("plain", shape=(8, 8, 8), dtype=np.int16, chunks=(4, 8, 8))
    gz = root.create_array(
        "gz",
        shape=(8, 8, 8),
        dtype=np.int16,
        chunks=(4, 8, 8),
        shards=(8, 8, 8),
        compressors=[GzipCodec()],
    )
    assert ShardEncoder.for_array(plain) is None
    assert ShardEncoder.for_array(gz) is None
    arr = _array(root, "ours", (100, 64, 64), np.int16)
    encoder = ShardEncoder.for_array(arr)
    assert encoder is not None
    assert not encoder.covers(10, (20, 64, 64))  # not at a shard's start
    assert not encoder.covers(0, (32, 64, 64))  # not a whole shard, not the array's end
    assert not encoder.covers(0, (64, 32, 64))  # not the whole plane
    assert encoder.covers(64, (36, 64, 64))  # the last, short shard


def _mean2(a: np.ndarray) -> np.ndarray:
    """Independent 2x2x2 block mean: odd edges average what they hold; integers rounded."""
    pad = [(0, s % 2) for s in a.shape]
    f = np.pad(a.astype(np.float64), pad, constant_values=np.nan)
    z, y, x = f.shape
    mean = np.nanmean(f.reshape(z // 2, 2, y // 2, 2, x // 2, 2), axis=(1, 3, 5))
    return np.rint(mean).astype(a.dtype) if a.dtype.kind in "iu" else mean.astype(a.dtype)


@pytest.mark.parametrize(
    "dtype",
    [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.float16, np.float32],
    ids=lambda d: np.dtype(d).name,
)
@pytest.mark.parametrize("shape", [(64, 32, 32), (5, 7, 9), (1, 1, 1), (3, 1, 2), (2, 6, 1)])
def test_downsample_image_is_the_2x2x2_mean(dtype: Any, shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    if dt.kind == "f":
        vol = rng.normal(0, 100, shape).astype(dt)
    else:
        info = np.iinfo(dt)
        vol = rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), shape, endpoint=True)
        vol = vol.astype(dt)
    got = downsample_image(vol)
    assert got.dtype == vol.dtype
    np.testing.assert_array_equal(got, _mean2(vol))


def test_downsample_rounds_half_to_even() -> None:
    vol = np.zeros((2, 2, 2), np.int16)
    vol[0, 0, 0] = 4  # mean 0.5 -> 0
    assert downsample_image(vol)[0, 0, 0] == 0
    vol[0, 0, 0] = 12  # mean 1.5 -> 2
    assert downsample_image(vol)[0, 0, 0] == 2
    vol[0, 0, 0] = -12  # mean -1.5 -> -2
    assert downsample_image(vol)[0, 0, 0] == -2


@pytest.mark.parametrize("permits", [1, 2, 3])
def test_prefetch_never_has_more_items_than_permits(permits: int) -> None:
    sem = threading.Semaphore(permits)
    produced = []
    done = []

    def items():
        for i in range(12):
            produced.append(i)
            assert len(produced) - len(done) <= permits
            yield i

    prefetch = Prefetch(items(), permits=sem)
    try:
        for i in prefetch:
            time.sleep(0.002)  # a consumer slower than the producer
            assert len(produced) - len(done) <= permits
            done.append(i)
            sem.release()
    finally:
        prefetch.close()
    assert done == list(range(12))


def test_prefetch_stops_when_the_consumer_fails() -> None:
    sem = threading.Semaphore(1)
    started = threading.Event()

    def items():
        for i in range(5):
            started.set()
            yield i

    def consume() -> None:
        prefetch = Prefetch(items(), permits=sem)
        try:
            for _ in prefetch:
                started.wait()
                raise RuntimeError("consumer failed")  # the producer waits for a permit
        finally:
            prefetch.close()

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="consumer"):
        consume()
    assert time.monotonic() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name == "ctzarr-read"]


def test_prefetch_closed_before_the_consumer_starts_stops_its_thread() -> None:
    """The writer starts reading before it creates its arrays; a failure in between closes a
    prefetch nobody iterated."""
    sem = threading.Semaphore(2)
    prefetch = Prefetch(iter(range(100)), permits=sem)
    time.sleep(0.05)  # the producer fills its queue and waits
    t0 = time.monotonic()
    prefetch.close()
    assert time.monotonic() - t0 < 5
    assert not [t for t in threading.enumerate() if t.name == "ctzarr-read"]


@pytest.mark.parametrize("in_flight", [1, 2, 3])  # 1 runs as 2, the minimum
def test_conversion_is_exact_whatever_the_slabs_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_flight: int
) -> None:
    """Several slabs (and a short last one) through the ring: values equal nibabel's."""
    monkeypatch.setattr(case_writer, "SLABS_IN_FLIGHT", in_flight)
    rng = np.random.default_rng(in_flight)
    ct = rng.integers(-1024, 2000, (150, 40, 36)).astype(np.int16)
    mask = (rng.random((150, 40, 36)) < 0.3).astype(np.uint8) * rng.integers(1, 4, (150, 40, 36))
    mask = mask.astype(np.uint8)
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    nib.save(nib.Nifti1Image(ct.transpose(2, 1, 0), affine), src / "images" / "c1.nii.gz")
    nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0), affine), src / "masks" / "c1.nii.gz")
    report = ctzarr.convert(src, tmp_path / "s.zarr", layout="dap_atlas", progress=False)
    assert report.ok, report
    case = ctzarr.open_collection(tmp_path / "s.zarr")["c1"]
    np.testing.assert_array_equal(case.image.values, nifti_zyx(src / "images" / "c1.nii.gz"))
    np.testing.assert_array_equal(
        case.labels("anatomy").values, nifti_zyx(src / "masks" / "c1.nii.gz")
    )
    np.testing.assert_array_equal(case.image_at(1).values, _mean2(ct))
