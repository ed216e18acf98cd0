"""The direct read path: boxes decoded from checked inner chunks, eager crops, cached case
metadata. Every result is compared exactly with zarr's own read and with nibabel's arrays."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import xarray as xr
from numcodecs import Blosc
from zarr.storage import LocalStore, WrapperStore

import ctzarr
from ctzarr.errors import ChunkCorruptError, CtzarrError
from ctzarr.io import chunks, strict
from ctzarr.model.manifest import crc32c

from .conftest import nifti_zyx, write_pairs

SHAPE = (150, 140, 70)  # 3 x 3 x 2 inner chunks of 64^3 at level 0; 3 shards of 64 slices


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(21)
    ct = rng.integers(-1024, 2000, size=SHAPE).astype(np.int16)
    mask = np.zeros(SHAPE, np.uint8)
    mask[60:70, 50:90, 20:60] = 1  # crosses inner-chunk borders in y and x, a shard border in z
    mask[140:150, 130:140, 60:70] = 2  # the far corner: edge shards and partial inner chunks
    mask[3:9, 3:9, 3:9] = 3  # one inner chunk; the rest of the label array is background
    return ct, mask


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, source dir) of one case, its CT scaled by the header (slope 0.5, intercept 7)."""
    root = tmp_path_factory.mktemp("fast")
    ct, mask = _phantom()
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    manifest, labels = write_pairs(root / "src", {"g1": (ct, mask, affine)})
    img = nib.Nifti1Image(ct.transpose(2, 1, 0), affine)
    img.header.set_slope_inter(0.5, 7.0)
    img.to_filename(root / "src" / "g1_ct.nii.gz")
    store = root / "g.zarr"
    assert ctzarr.convert(manifest, store, labels=[str(labels)], progress=False).ok
    return store, root / "src"


def _boxes(shape: tuple[int, ...], n: int, seed: int) -> list[tuple[object, ...]]:
    rng = np.random.default_rng(seed)
    out: list[tuple[object, ...]] = [
        (slice(None),) * len(shape),
        tuple(slice(0, 1) for _ in shape),
        tuple(slice(s - 1, s) for s in shape),
        tuple(slice(5, 5) for _ in shape),  # empty
        (3,),  # an int: the axis is dropped
        (-1, slice(2, 9)),
        (slice(-7, None), 0),
    ]
    for _ in range(n):
        box = []
        for s in shape:
            a = int(rng.integers(0, s))
            b = int(rng.integers(a + 1, s + 1))
            box.append(slice(a, b))
        out.append(tuple(box))
    return out


def test_direct_box_reads_equal_zarr_and_nibabel(grid: tuple[Path, Path]) -> None:
    store, src = grid
    case = ctzarr.open_collection(store)["g1"]
    raw_ct = np.asanyarray(nib.load(src / "g1_ct.nii.gz").dataobj.get_unscaled()).transpose(2, 1, 0)
    mask = nifti_zyx(src / "g1_seg.nii.gz")
    for path, want in (("0", raw_ct), ("labels/seg/0", mask), ("1", None), ("labels/seg/1", None)):
        arr = case.array(path)
        plain = arr._array  # zarr's own read, no ctzarr checks
        for sel in _boxes(arr.shape, 25, seed=len(path)):
            got = arr[sel]
            ref = plain[sel]
            assert got.dtype == ref.dtype, (path, sel)
            assert got.shape == ref.shape, (path, sel)
            np.testing.assert_array_equal(got, ref)
            if want is not None:
                np.testing.assert_array_equal(got, want[sel])


def test_eager_crop_is_the_lazy_crop_and_nibabel(grid: tuple[Path, Path]) -> None:
    store, src = grid
    case = ctzarr.open_collection(store)["g1"]
    ct = nifti_zyx(src / "g1_ct.nii.gz")  # scaled by nibabel: float
    mask = nifti_zyx(src / "g1_seg.nii.gz")
    for structure in ("a", "b", "c"):
        for margin in (0.0, 4.0):
            eager = case.crop(structure, margin, lazy=False)
            lazy = case.crop(structure, margin)
            assert isinstance(eager["image"].data, np.ndarray)
            assert isinstance(eager["labels"].data, np.ndarray)
            xr.testing.assert_identical(eager, lazy.compute())
            z0, z1, y0, y1, x0, x1 = eager.attrs["box_zyx"]
            box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
            assert eager["image"].dtype == ct.dtype
            np.testing.assert_array_equal(eager["image"].values, ct[box])
            np.testing.assert_array_equal(eager["labels"].values, mask[box])


class _Wrapped(WrapperStore[LocalStore]):
    """A local store seen through a wrapper: ctzarr takes its remote path (StrictStore)."""


def test_eager_crop_through_a_non_local_store(grid: tuple[Path, Path]) -> None:
    store, src = grid
    case = ctzarr.open_collection(_Wrapped(LocalStore(store, read_only=True)))["g1"]
    assert case.array("0")._local_dir is None
    eager = case.crop("a", 3.0, lazy=False)
    xr.testing.assert_identical(eager, case.crop("a", 3.0).compute())
    z0, z1, y0, y1, x0, x1 = eager.attrs["box_zyx"]
    mask = nifti_zyx(src / "g1_seg.nii.gz")
    np.testing.assert_array_equal(eager["labels"].values, mask[z0:z1, y0:y1, x0:x1])


def test_reopening_a_case_reuses_its_parsed_metadata_until_its_document_changes(
    grid: tuple[Path, Path], tmp_path: Path
) -> None:
    store = tmp_path / "copy.zarr"
    shutil.copytree(grid[0], store)
    doc = store / "cases" / "g1" / "zarr.json"
    first = ctzarr.open_collection(store)["g1"]
    again = ctzarr.open_collection(store)["g1"]
    assert again._nodes is first._nodes  # parsed once for these bytes
    # the same document, other bytes (re-serialised): parsed afresh, same answers
    doc.write_text(json.dumps(json.loads(doc.read_text()), indent=2))
    fresh = ctzarr.open_collection(store)["g1"]
    assert fresh._nodes is not first._nodes
    xr.testing.assert_identical(fresh.crop("a", lazy=False), first.crop("a", lazy=False))
    # an edited document (the affine) is checked again, not served from the cache
    meta = json.loads(doc.read_text())
    meta["attributes"]["ctzarr"]["affine"][0][0] = 0.5
    doc.write_text(json.dumps(meta))
    with pytest.raises(CtzarrError, match="g1"):
        ctzarr.open_collection(store)["g1"]


def _shard_and_inner(store: Path) -> tuple[Path, int, int]:
    """A stored shard of the CT under label "a", and the offset and size of its first stored
    inner chunk."""
    shard = store / "cases" / "g1" / "0" / "c" / "0" / "0" / "0"
    data = shard.read_bytes()
    n_inner = 1 * 3 * 2  # (64, 140->192, 70->128) / 64^3 per shard
    index = np.frombuffer(data[-(n_inner * 16 + 4) : -4], "<u8").reshape(-1, 2)
    off, n = (int(v) for v in index[index[:, 0] != 2**64 - 1][0])
    return shard, off, n


def test_a_flipped_byte_fails_the_eager_crop(grid: tuple[Path, Path], tmp_path: Path) -> None:
    store = tmp_path / "flip.zarr"
    shutil.copytree(grid[0], store)
    shard, off, n = _shard_and_inner(store)
    data = bytearray(shard.read_bytes())
    data[off + n // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    case = ctzarr.open_collection(store)["g1"]
    with pytest.raises(ChunkCorruptError, match="crc32c"):
        case.array("0")[0:64, 0:64, 0:64]
    with pytest.raises(ChunkCorruptError, match="crc32c"):
        case.crop("c", 0.0, lazy=False)


def test_a_forged_chunk_with_a_valid_crc32c_fails_its_digest(
    grid: tuple[Path, Path], tmp_path: Path
) -> None:
    """Bytes changed and the crc32c trailer recomputed: only the format-2 digest sees it."""
    store = tmp_path / "forged.zarr"
    shutil.copytree(grid[0], store)
    shard, off, n = _shard_and_inner(store)
    data = bytearray(shard.read_bytes())
    body = bytearray(data[off : off + n - 4])
    body[-1] ^= 0x01  # the last payload byte, outside the blosc header
    data[off : off + n] = body + struct.pack("<I", crc32c(bytes(body)))
    shard.write_bytes(bytes(data))
    case = ctzarr.open_collection(store)["g1"]
    with pytest.raises(ChunkCorruptError, match="digest"):
        case.crop("c", 0.0, lazy=False)
    with pytest.raises(ChunkCorruptError, match="digest"):
        case.crop("c", 0.0).compute()


def test_a_checked_array_pickles_and_reads_the_same(grid: tuple[Path, Path]) -> None:
    case = ctzarr.open_collection(grid[0])["g1"]
    arr = case.array("labels/seg/0")
    copy = pickle.loads(pickle.dumps(arr))
    np.testing.assert_array_equal(copy[50:80, 40:100], arr[50:80, 40:100])
    assert copy.shards == arr.shards


@pytest.mark.parametrize("kind", ["smooth", "noise", "constant"])
@pytest.mark.parametrize("shuffle", [Blosc.BITSHUFFLE, Blosc.SHUFFLE, Blosc.NOSHUFFLE])
def test_partial_decode_equals_the_whole_chunk(kind: str, shuffle: int) -> None:
    """Decoding only the items a region needs (blosc_getitem) gives the same values there."""
    rng = np.random.default_rng(5)
    shape = (64, 32, 16)
    if kind == "smooth":
        data = (np.arange(np.prod(shape)) // 7).astype(np.int16).reshape(shape)
    elif kind == "noise":  # incompressible: blosc stores the frame uncompressed
        data = rng.integers(-(2**15), 2**15, size=shape).astype(np.int16)
    else:
        data = np.full(shape, -1024, np.int16)
    codec = Blosc(cname="zstd", clevel=3, shuffle=shuffle, blocksize=8192)
    frame = bytes(codec.encode(data)) + b"\0\0\0\0"  # decode ignores the crc32c trailer
    for _ in range(30):
        region = []
        for n in shape:
            a = int(rng.integers(0, n))
            region.append(slice(a, int(rng.integers(a + 1, n + 1))))
        got = chunks.decode(frame, True, np.dtype("<i2"), shape, tuple(region))
        np.testing.assert_array_equal(got[tuple(region)], data[tuple(region)])
    np.testing.assert_array_equal(chunks.decode(frame, True, np.dtype("<i2"), shape), data)


def test_a_large_read_decodes_as_it_goes(
    grid: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past a budget of stored bytes a read decodes the shards read so far (memory bounded);
    the result is the same."""
    case = ctzarr.open_collection(grid[0])["g1"]
    arr = case.array("0")
    whole = arr[:]
    monkeypatch.setattr(strict, "_PENDING_BYTES", 1)
    np.testing.assert_array_equal(arr[:], whole)
    np.testing.assert_array_equal(arr[:], arr._array[:])
