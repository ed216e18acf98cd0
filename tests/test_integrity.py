"""Integrity and hostile stores (reliability.md 7.B8, C1-C5, D1-D6): every fault injected into a
real converted store is found by ``verify`` and raised by a strict read, naming the array and
the chunk; hostile metadata is refused before any graph is built or chunk decoded."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import crc32c
import numcodecs
import numpy as np
import pytest

import ctzarr
from ctzarr.errors import (
    ChunkCorruptError,
    ChunkMissingError,
    CtzarrError,
    StoreError,
    UnsafeStoreError,
)
from ctzarr.read.verify import verify

from .conftest import nifti_zyx, write_pairs

CASE = "c1"
SHAPE = (70, 130, 70)  # level 0: 2 shards of 64 slices, 3 x 2 inner 64^3 chunks per shard


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    ct = np.full(SHAPE, -1024, np.int16)  # air: stored (fill value is 0), never elided
    ct[5:68, 10:120, 8:62] = rng.integers(-200, 400, (63, 110, 54), dtype=np.int16)
    mask = np.zeros(SHAPE, np.uint8)  # labels only below z=64: the second label shard is absent
    mask[12:30, 30:70, 20:40] = 1
    mask[35:55, 80:100, 15:50] = 2
    mask[20:40, 30:60, 45:60] = 3
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    root = tmp_path_factory.mktemp("integrity-src")
    manifest, labels = write_pairs(root, {CASE: (ct, mask, affine)})
    return manifest, labels


@pytest.fixture(scope="module")
def pristine(source: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    manifest, labels = source
    dest = tmp_path_factory.mktemp("integrity") / "x.zarr"
    report = ctzarr.convert(manifest, dest, labels=[str(labels)], progress=False)
    assert report.ok, report
    return dest


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy of the converted store for one test to damage."""
    dest = tmp_path / "x.zarr"
    shutil.copytree(pristine, dest)
    return dest


def case_dir(store: Path) -> Path:
    return store / "cases" / CASE


def read_all(store: Path) -> None:
    """Strict reads of everything a user can read: image, labels, every pyramid level."""
    case = ctzarr.open_collection(store)[CASE]
    for level in range(case.levels):
        case.image_at(level).values  # noqa: B018
        case.labels(level=level).values  # noqa: B018


def test_manifest_lists_every_stored_object(pristine: Path) -> None:
    case = ctzarr.open_collection(pristine)[CASE]
    manifest = case.manifest.arrays
    stored = {
        str(p.relative_to(case_dir(pristine)))
        for p in case_dir(pristine).rglob("c/*")
        if p.is_file()
    } | {
        str(p.relative_to(case_dir(pristine)))
        for p in case_dir(pristine).rglob("*")
        if p.is_file() and "/c/" in str(p.relative_to(case_dir(pristine)))
    }
    listed = {f"{a}/{k}" for a, recs in manifest.items() for k in recs}
    assert listed == stored
    # the all-background label shard (z >= 64) is not stored and not listed; the air CT shard is
    assert "labels/seg/0/c/1/0/0" not in listed
    assert "0/c/1/0/0" in listed
    assert verify(pristine).ok


def test_pristine_store_reads_equal_nibabel(pristine: Path, source: tuple[Path, Path]) -> None:
    case = ctzarr.open_collection(pristine)[CASE]
    root = source[0].parent
    np.testing.assert_array_equal(case.image.values, nifti_zyx(root / f"{CASE}_ct.nii.gz"))
    np.testing.assert_array_equal(case.labels().values, nifti_zyx(root / f"{CASE}_seg.nii.gz"))


# -- B8, C2, C3: missing, truncated, swapped objects -----------------------------------------------
@pytest.mark.parametrize(
    ("array", "key"),
    [
        ("0", "c/0/0/0"),
        ("0", "c/1/0/0"),
        ("labels/seg/0", "c/0/0/0"),
        ("1", "c/0/0/0"),
        ("nifti", "c/0"),
    ],
    ids=["ct-shard", "ct-air-shard", "label-shard", "ct-level1", "nifti-header"],
)
def test_missing_object_raises_not_fill(store: Path, array: str, key: str) -> None:
    (case_dir(store) / array / key).unlink()

    def read() -> object:  # opening the case or reading the object may find it missing
        case = ctzarr.open_collection(store)[CASE]
        return case.nifti_header_bytes if array == "nifti" else case.array(array)[:]

    with pytest.raises(ChunkMissingError, match=rf"array '{array}' chunk {key}: missing"):
        read()
    report = verify(store)
    assert not report.ok
    assert any(f"array '{array}' chunk {key}: missing" in p for p in report.problems), report


@pytest.mark.parametrize(
    "keep", [0, 1, 100, -5], ids=["zero-length", "one-byte", "100-bytes", "minus-5"]
)
def test_truncated_shard_raises(store: Path, keep: int) -> None:
    path = case_dir(store) / "0" / "c" / "0" / "0" / "0"
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ChunkCorruptError, match=r"array '0' chunk c/0/0/0"):
        ctzarr.open_collection(store)[CASE].image.values  # noqa: B018
    assert any("array '0' chunk c/0/0/0" in p for p in verify(store).problems)


def test_swapped_shards_are_found(store: Path) -> None:
    """A valid shard copied over its neighbour passes crc32c but not the manifest."""
    level0 = case_dir(store) / "0" / "c"
    shutil.copyfile(level0 / "0" / "0" / "0", level0 / "1" / "0" / "0")
    with pytest.raises(ChunkCorruptError, match=r"array '0' chunk c/1/0/0"):
        ctzarr.open_collection(store)[CASE].image.values  # noqa: B018
    assert any("chunk c/1/0/0" in p for p in verify(store).problems)


def test_inner_chunks_swapped_in_place_found_by_verify(store: Path) -> None:
    """Two equal-size inner chunks exchanged inside one shard: the index still matches, every
    crc32c still passes; verify's whole-object digest finds it."""
    path = case_dir(store) / "0" / "c" / "0" / "0" / "0"
    data = bytearray(path.read_bytes())
    index = np.frombuffer(bytes(data[-(6 * 16 + 4) : -4]), "<u8").reshape(-1, 2)
    # make two same-length chunks by re-encoding: simplest, swap two whole chunks' bytes and
    # their index entries consistently, then recompute the index crc (a careful forger)
    (o1, n1), (o2, n2) = index[0], index[1]
    a, b = bytes(data[o1 : o1 + n1]), bytes(data[o2 : o2 + n2])
    new = bytearray(data[: min(o1, o2)])
    order = sorted([(o1, b), (o2, a)])
    new_index = index.copy()
    pos = len(new)
    for orig_off, chunk in order:
        row = 0 if orig_off == o1 else 1
        new_index[row] = (pos, len(chunk))
        new += chunk
        pos += len(chunk)
    new += data[max(o1 + n1, o2 + n2) : -(6 * 16 + 4)]
    body = new_index.astype("<u8").tobytes()
    new += body + struct.pack("<I", crc32c.crc32c(body))
    path.write_bytes(bytes(new))
    report = verify(store)
    assert any("array '0' chunk c/0/0/0" in p for p in report.problems), report


def test_foreign_object_is_found(store: Path) -> None:
    extra = case_dir(store) / "labels" / "seg" / "0" / "c" / "1" / "0" / "0"
    extra.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(case_dir(store) / "labels" / "seg" / "0" / "c" / "0" / "0" / "0", extra)
    with pytest.raises(ChunkCorruptError, match="not in the manifest"):
        ctzarr.open_collection(store)[CASE].labels().values  # noqa: B018
    assert any("stored but not in the manifest" in p for p in verify(store).problems)


# -- C1: every flipped byte is caught -----------------------------------------------------------
def test_every_flipped_byte_of_a_shard_raises(pristine: Path, tmp_path: Path) -> None:
    """Flip each byte of the label shard in turn (it is small): every flip raises, naming the
    array and the chunk. The figure goes to the README (corruptions detected / injected)."""
    dest = tmp_path / "x.zarr"
    shutil.copytree(pristine, dest)
    path = case_dir(dest) / "labels" / "seg" / "0" / "c" / "0" / "0" / "0"
    original = path.read_bytes()
    col = ctzarr.open_collection(dest)
    arr = col[CASE].array("labels/seg/0")
    detected = 0
    positions = range(len(original))
    for pos in positions:
        damaged = bytearray(original)
        damaged[pos] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(ChunkCorruptError) as info:
            arr[:]
        assert "array 'labels/seg/0'" in str(info.value)
        assert "c/0/0/0" in str(info.value)
        detected += 1
    path.write_bytes(original)
    print(f"\nflipped bytes detected: {detected}/{len(positions)}")
    assert detected == len(positions)


def test_a_read_checks_the_inner_chunks_it_reads(store: Path, source: tuple[Path, Path]) -> None:
    """Only the inner chunks a read touches are checked (a crop does not read whole shards), and
    a damaged one among them raises although zarrs' partial decoder skips their crc32c."""
    path = case_dir(store) / "0" / "c" / "0" / "0" / "0"  # CT shard: 3 x 2 inner chunks
    data = bytearray(path.read_bytes())
    index = np.frombuffer(bytes(data[-(6 * 16 + 4) : -4]), "<u8").reshape(6, 2)
    offset, nbytes = (int(v) for v in index[5])  # inner chunk (y 2, x 1): y 128..130, x 64..70
    data[offset + nbytes // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    ref = nifti_zyx(source[0].parent / f"{CASE}_ct.nii.gz")
    image = ctzarr.open_collection(store)[CASE].image
    np.testing.assert_array_equal(image[:64, :64, :64].values, ref[:64, :64, :64])
    np.testing.assert_array_equal(image[:, :128, :].values, ref[:, :128, :])
    with pytest.raises(ChunkCorruptError, match=r"array '0' chunk c/0/0/0.*crc32c"):
        image[10:20, 129, 66].values  # noqa: B018


# -- C4: damaged metadata --------------------------------------------------------------------------
def _edit_case_json(store: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = case_dir(store) / "zarr.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _array_meta(doc: dict, name: str) -> dict:  # type: ignore[type-arg]
    return doc["consolidated_metadata"]["metadata"][name]


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda d: _array_meta(d, "0").update(shape=[80, 130, 70]), ChunkCorruptError, "has shape"),
        (lambda d: _array_meta(d, "0").update(data_type="float32"), ChunkCorruptError, "chunk"),
        (
            lambda d: _array_meta(d, "0")["codecs"][0]["configuration"]["codecs"].__setitem__(
                1, {"name": "zstd", "configuration": {"level": 3, "checksum": False}}
            ),
            UnsafeStoreError,
            "allowlist",
        ),
        (
            lambda d: _array_meta(d, "0")["codecs"][0]["configuration"]["codecs"].__setitem__(
                1, {"name": "numcodecs.pickle", "configuration": {}}
            ),
            UnsafeStoreError,
            "refused",
        ),
        (
            lambda d: _array_meta(d, "0")["codecs"][0]["configuration"]["codecs"].pop(2),
            UnsafeStoreError,
            "allowlist",
        ),
        (lambda d: _array_meta(d, "0").update(data_type="complex64"), UnsafeStoreError, "refused"),
        (lambda d: _array_meta(d, "0").update(shape=[2**62, 1, 1]), UnsafeStoreError, "caps"),
        (  # 1024^3 voxels (under the element cap) in chunks of one voxel: 2^30 chunks
            lambda d: (
                _array_meta(d, "0").update(shape=[1024, 1024, 1024]),
                _array_meta(d, "0")["chunk_grid"]["configuration"].update(chunk_shape=[1, 1, 1]),
                _array_meta(d, "0")["codecs"][0]["configuration"].update(chunk_shape=[1, 1, 1]),
            ),
            UnsafeStoreError,
            "exceed the caps",
        ),
        (
            lambda d: d["consolidated_metadata"]["metadata"].__setitem__(
                "../evil", _array_meta(d, "nifti")
            ),
            StoreError,
            "cannot be opened|plain relative name",
        ),
        (
            lambda d: d["attributes"]["ctzarr"]["manifest"].update(version=99),
            ChunkCorruptError,
            "manifest",
        ),
        (lambda d: d["attributes"]["ctzarr"].pop("manifest"), ChunkCorruptError, "manifest"),
    ],
    ids=[
        "shape-enlarged",
        "dtype-edited",
        "codec-zstd-not-allowed",
        "codec-pickle",
        "no-crc32c",
        "dtype-complex",
        "shape-2^62",
        "chunk-1-voxel",
        "dotdot-node",
        "manifest-version",
        "manifest-removed",
    ],
)
def test_edited_metadata_is_refused(store: Path, edit, error: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    _edit_case_json(store, edit)
    col = ctzarr.open_collection(store)
    with pytest.raises(error, match=match):
        col[CASE].image.values  # noqa: B018 - opening or reading the case refuses it
    # the CLI: one line, non-zero exit
    from ctzarr.cli.main import main

    assert main(["export", str(store), CASE, str(store.parent / "out")]) != 0


@pytest.mark.parametrize("damage", ["truncated", "not-json", "empty"])
def test_damaged_case_json_is_a_clear_error(store: Path, damage: str) -> None:
    path = case_dir(store) / "zarr.json"
    text = path.read_text()
    path.write_text({"truncated": text[: len(text) // 2], "not-json": "{nope", "empty": ""}[damage])
    with pytest.raises(CtzarrError, match=f"case '{CASE}'"):
        ctzarr.open_collection(store)[CASE]


def test_label_id_missing_from_label_map_found_by_verify(store: Path) -> None:
    """C5: the stored labels hold an id the label map lacks (map edited after conversion)."""
    path = store / "zarr.json"
    doc = json.loads(path.read_text())
    labels = doc["attributes"]["ctzarr"]["segmentations"]["seg"]["labels"]
    doc["attributes"]["ctzarr"]["segmentations"]["seg"]["labels"] = [
        lab for lab in labels if lab["label-value"] != 3
    ]
    path.write_text(json.dumps(doc))
    report = verify(store)
    assert any("label ids [3]" in p for p in report.problems), report


# -- D1: decompression bombs ---------------------------------------------------------------------
def _bomb_frame(nbytes: int) -> bytes:
    """A valid blosc frame that inflates to ``nbytes`` zero bytes (np.zeros: no RSS to build)."""
    return numcodecs.Blosc(cname="zstd", clevel=9, shuffle=numcodecs.Blosc.NOSHUFFLE).encode(
        np.zeros(nbytes, np.uint8)
    )


def _shard(frames: list[bytes], n_inner: int) -> bytes:
    """A shard of crc32c-sealed frames with a valid crc32c'd index (a careful forger)."""
    body = b""
    index = np.full((n_inner, 2), 2**64 - 1, dtype="<u8")
    for i, f in enumerate(frames):
        chunk = f + struct.pack("<I", crc32c.crc32c(f))
        index[i] = (len(body), len(chunk))
        body += chunk
    raw = index.tobytes()
    return body + raw + struct.pack("<I", crc32c.crc32c(raw))


def _plant_bomb(store: Path, nbytes: int, *, fix_manifest: bool) -> None:
    """Replace the label shard with a bomb; optionally rewrite the manifest to match it (an
    attacker who controls the whole store)."""
    shard = _shard([_bomb_frame(nbytes)], 6)
    path = case_dir(store) / "labels" / "seg" / "0" / "c" / "0" / "0" / "0"
    path.write_bytes(shard)
    if fix_manifest:

        def edit(doc: dict) -> None:  # type: ignore[type-arg]
            rec = doc["attributes"]["ctzarr"]["manifest"]["arrays"]["labels/seg/0"]
            rec["c/0/0/0"] = [
                len(shard),
                crc32c.crc32c(shard),
                crc32c.crc32c(shard[-(6 * 16 + 4) :]),
            ]

        _edit_case_json(store, edit)


@pytest.mark.parametrize("fix_manifest", [False, True], ids=["manifest-stale", "manifest-forged"])
def test_blosc_bomb_refused_before_decompression(store: Path, fix_manifest: bool) -> None:
    _plant_bomb(store, 2**28, fix_manifest=fix_manifest)
    with pytest.raises(ChunkCorruptError, match="labels/seg/0"):
        ctzarr.open_collection(store)[CASE].labels().values  # noqa: B018


def test_blosc_bomb_refused_under_address_space_limit(store: Path) -> None:
    """A 1 GiB bomb with a forged manifest, read in a child limited to its import footprint +
    600 MiB of address space: refused with our error, peak RSS reported (plain zarr: 1.1 GiB)."""
    import subprocess
    import sys

    _plant_bomb(store, 2**30, fix_manifest=True)
    code = f"""
import resource, sys
import ctzarr, ctzarr.read.collection, zarr, numpy, dask.array, xarray, numba, zarrs
vm = int(open('/proc/self/status').read().split('VmSize:')[1].split()[0]) * 1024
limit = vm + 600 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from ctzarr.errors import ChunkCorruptError
try:
    ctzarr.open_collection({str(store)!r})[{CASE!r}].labels().values
    print("READ")
except ChunkCorruptError as exc:
    hwm = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) // 1024
    print("REFUSED", hwm, "MB")  # VmHWM: ru_maxrss starts at the forking process's peak
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("REFUSED"), out.stdout + out.stderr[-2000:]
    print("\n1 GiB blosc bomb:", out.stdout.strip())


# -- D4, D5, D6: foreign nodes, hostile names, links ---------------------------------------------
def test_v2_pickle_array_in_a_case_is_never_decoded(store: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            import os

            return (os.mkdir, (str(marker),))

    import pickle

    v2 = case_dir(store) / "evil"
    v2.mkdir()
    (v2 / ".zarray").write_text(
        json.dumps(
            {
                "zarr_format": 2,
                "shape": [1],
                "chunks": [1],
                "dtype": "|O",
                "compressor": None,
                "fill_value": None,
                "filters": [{"id": "pickle"}],
                "order": "C",
            }
        )
    )
    (v2 / "0").write_bytes(pickle.dumps(np.array([Payload()], dtype=object)))
    read_all(store)
    assert verify(store).ok
    assert not marker.exists()


@pytest.mark.parametrize(
    "case_id",
    ["../cases/c1", "/etc", "c1/../c1", "a\\b", "a\x00b", "..", "zarr.json"],
    ids=["dotdot", "absolute", "inner-dotdot", "backslash", "nul", "bare-dotdot", "reserved"],
)
def test_hostile_case_ids_never_reach_the_store(pristine: Path, case_id: str) -> None:
    with pytest.raises(KeyError):
        ctzarr.open_collection(pristine)[case_id]


def test_symlink_leaving_the_store_is_refused(store: Path, tmp_path: Path) -> None:
    secret = tmp_path / "outside"
    secret.mkdir()
    target = case_dir(store) / "labels" / "seg" / "0" / "c"
    shutil.copytree(target, secret / "c")
    shutil.rmtree(target)
    target.symlink_to(secret / "c")
    with pytest.raises(UnsafeStoreError, match="links outside the store"):
        ctzarr.open_collection(store)[CASE]


def test_symlink_inside_the_store_is_allowed(store: Path) -> None:
    moved = store / "elsewhere"
    shutil.move(case_dir(store) / "nifti", moved)
    (case_dir(store) / "nifti").symlink_to(moved)
    case = ctzarr.open_collection(store)[CASE]
    assert len(case.nifti_header_bytes) in (348, 540)


def test_errors_are_store_errors_for_callers(store: Path) -> None:
    """Callers catching OSError/StoreError or KeyError keep working."""
    assert issubclass(UnsafeStoreError, StoreError)
    assert issubclass(ChunkMissingError, KeyError)
    assert issubclass(ChunkCorruptError, ValueError)


def test_g6_bomb_read_on_a_memory_limited_worker_is_refused_there(store: Path) -> None:
    """G6: the scan task of a bomb store runs on a worker with a memory limit below the bomb:
    our check refuses the chunk on the worker, the client gets the error, the worker lives on."""
    import logging

    import distributed

    _plant_bomb(store, 2**30, fix_manifest=True)  # 1 GiB declared; the worker may use 1 GiB in all
    with (
        distributed.LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            memory_limit="1GiB",
            dashboard_address=":0",
            silence_logs=logging.CRITICAL,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        before = set(client.scheduler_info()["workers"])
        with pytest.raises(ChunkCorruptError, match=r"labels/seg/0.*chunk c/0/0/0"):
            ctzarr.open_collection(store).stats(method="scan", client=client)
        assert set(client.scheduler_info()["workers"]) == before  # not killed, not restarted
