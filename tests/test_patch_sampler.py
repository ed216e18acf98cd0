"""ctzarr.PatchSampler: exact class-balanced centres from the index, patches equal to numpy slicing
of nibabel's arrays (padding included), reproducible across processes and machines, older stores
counted once and cached, remote stores within one label chunk plus the patch's chunks per sample.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import shutil
import struct
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import stats

import ctzarr
from ctzarr.read.verify import verify
from ctzarr.train.counts import CACHE_PREFIX, cache_key, reindex
from ctzarr.train.patches import Stream
from ctzarr.train.reader import StoreReader

from .conftest import nifti_zyx, write_pairs
from .servers import http_server

LABELS = {0: "background", 1: "alpha", 2: "beta", 3: "gamma", 4: "delta"}
SHAPES = {"p0": (100, 70, 66), "p1": (90, 66, 70)}
#: forking a process with threads (the store's I/O threads) is what torch's DataLoader does
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

#: two-sided level of the binomial and chi-square checks (fixed seeds: deterministic outcomes)
ALPHA = 1e-6


def _phantom(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """CT (int16) and labels: alpha a holey box over several chunks, beta a small block at a
    corner (centres near the border), gamma scattered voxels, delta absent."""
    rng = np.random.default_rng(seed)
    ct = rng.integers(-1000, 1500, size=shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    z, y, x = shape
    box = np.zeros(shape, bool)
    box[10 : z - 8, 20 : y - 1, 5 : x - 1] = True
    lab[box & (rng.random(shape) < 0.7)] = 1
    lab[0:12, 0:10, x - 16 : x] = 2
    lab[(lab == 0) & (rng.random(shape) < 0.003)] = 3
    return ct, lab


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A two-case pairs collection whose chunk grid is 2 x 2 x 2 per case, and its sources."""
    root = tmp_path_factory.mktemp("patch-src")
    cases = {}
    for i, (cid, shape) in enumerate(SHAPES.items()):
        ct, lab = _phantom(shape, seed=10 + i)
        affine = np.diag([0.8, 0.9, 1.5 + i, 1.0])
        affine[:3, 3] = [-20.0, 7.0, 100.0]
        cases[cid] = (ct, lab, affine)
    manifest, labels = write_pairs(root, cases, LABELS)
    dest = tmp_path_factory.mktemp("patch-stores") / "pairs.zarr"
    report = ctzarr.convert(manifest, dest, layout="pairs", labels=str(labels), progress=False)
    assert report.ok, report
    truth = {
        cid: (nifti_zyx(root / f"{cid}_ct.nii.gz"), nifti_zyx(root / f"{cid}_seg.nii.gz"))
        for cid in cases
    }
    return {"store": dest, "truth": truth}


@pytest.fixture(scope="module")
def col(pairs: dict[str, Any]) -> Any:
    return ctzarr.open_collection(pairs["store"])


def _padded(volume: np.ndarray, origin: np.ndarray, size: tuple[int, ...], pad: Any) -> np.ndarray:
    """numpy's own padding and slicing: the expected patch."""
    margin = max(size) + 1
    big = np.pad(volume, margin, mode="constant", constant_values=pad)
    sel = tuple(slice(o + margin, o + margin + s) for o, s in zip(origin, size, strict=True))
    return big[sel]


# ------------------------------------------------------------------------------------------
# sampling is exact
# ------------------------------------------------------------------------------------------
def test_every_centre_is_a_voxel_of_its_class(col: Any, pairs: dict[str, Any]) -> None:
    sampler = ctzarr.PatchSampler(col, patch_size=8, seed=3)
    centres = sampler.centres(400)
    assert list(centres.columns) == ["case_id", "label", "structure", "z", "y", "x"]
    for row in centres.itertuples():
        lab = pairs["truth"][row.case_id][1]
        assert lab[row.z, row.y, row.x] == row.label
        assert row.structure == LABELS[row.label]
    assert sampler.skipped_classes == ["delta"]
    assert sorted(set(centres["label"])) == [1, 2, 3]


@pytest.mark.parametrize(
    ("classes", "expected"),
    [
        (None, {1: 1 / 3, 2: 1 / 3, 3: 1 / 3}),
        ({"alpha": 3, "gamma": 1}, {1: 0.75, 3: 0.25}),
        (["beta", 3], {2: 0.5, 3: 0.5}),
    ],
    ids=["equal", "weights", "list"],
)
def test_class_frequencies_within_binomial_bounds(
    col: Any, classes: Any, expected: dict[int, float]
) -> None:
    n = 3000
    sampler = ctzarr.PatchSampler(col, patch_size=8, classes=classes, seed=11)
    got = Counter(sampler.centres(n)["label"].tolist())
    assert set(got) == set(expected)
    for label, p in expected.items():
        low, high = stats.binom.interval(1 - ALPHA, n, p)
        assert low <= got[label] <= high, (label, got[label], (low, high))


def test_case_and_chunk_frequencies_follow_the_counts(col: Any, pairs: dict[str, Any]) -> None:
    """Within a class, (case, chunk) cells are hit in proportion to the class's voxels in them
    (chi-square), and within the chunks, z slices too."""
    n = 4000
    sampler = ctzarr.PatchSampler(col, patch_size=8, classes=["alpha"], seed=5)
    centres = sampler.centres(n)
    cells: Counter[tuple[str, int, int, int]] = Counter()
    for row in centres.itertuples():
        cells[(row.case_id, row.z // 64, row.y // 64, row.x // 64)] += 1
    expected: dict[tuple[str, int, int, int], int] = {}
    for cid, (_, lab) in pairs["truth"].items():
        zz, yy, xx = np.nonzero(lab == 1)
        for key, count in Counter(zip(zz // 64, yy // 64, xx // 64, strict=True)).items():
            expected[(cid, *map(int, key))] = count
    assert set(cells) <= set(expected)
    keys = sorted(expected)
    total = sum(expected.values())
    observed = np.array([cells[k] for k in keys], float)
    want = np.array([expected[k] / total * n for k in keys])
    assert len(keys) >= 8  # the test means something: many cells over both cases
    assert stats.chisquare(observed, want).pvalue > ALPHA
    # slices within the class: z of the centres against the class's voxels per slice
    for cid, (_, lab) in pairs["truth"].items():
        per_z = (lab == 1).sum(axis=(1, 2))
        held = per_z > 0
        got = np.bincount(centres[centres["case_id"] == cid]["z"], minlength=len(per_z))
        m = got.sum()
        assert stats.chisquare(got[held], per_z[held] / per_z.sum() * m).pvalue > ALPHA


def test_foreground_ratio_and_uniform_background(col: Any, pairs: dict[str, Any]) -> None:
    n = 3000
    sampler = ctzarr.PatchSampler(col, patch_size=8, foreground_ratio=0.25, seed=2)
    centres = sampler.centres(n)
    anywhere = centres[centres["label"] == -1]
    low, high = stats.binom.interval(1 - ALPHA, n, 0.75)
    assert low <= len(anywhere) <= high
    assert set(anywhere["structure"]) == {""}
    sizes = {cid: lab.size for cid, (_, lab) in pairs["truth"].items()}
    got = np.array([(anywhere["case_id"] == cid).sum() for cid in sizes], float)
    want = np.array(list(sizes.values()), float)
    assert stats.chisquare(got, want / want.sum() * len(anywhere)).pvalue > ALPHA
    for cid, shape in SHAPES.items():
        mine = anywhere[anywhere["case_id"] == cid]
        for axis, name in enumerate("zyx"):
            assert mine[name].min() >= 0
            assert mine[name].max() < shape[axis]


# ------------------------------------------------------------------------------------------
# patches equal numpy slicing of nibabel's arrays
# ------------------------------------------------------------------------------------------
def test_patches_equal_numpy_slicing_with_padding(col: Any, pairs: dict[str, Any]) -> None:
    size = (40, 48, 30)
    sampler = ctzarr.PatchSampler(col, patch_size=size, seed=7, pad_value=-2000)
    centres = sampler.centres(40)
    padded = 0
    for i in range(40):
        s = sampler.sample(i)
        ct, lab = pairs["truth"][s["case_id"]]
        row = centres.iloc[i]
        assert (row.case_id, row.label) == (s["case_id"], s["label"])
        centre = np.array([row.z, row.y, row.x])
        np.testing.assert_array_equal(s["centre"], centre)
        np.testing.assert_array_equal(s["origin"], centre - np.array(size) // 2)
        assert s["image"].dtype == ct.dtype
        assert s["labels"].dtype == lab.dtype
        np.testing.assert_array_equal(s["image"], _padded(ct, s["origin"], size, -2000))
        np.testing.assert_array_equal(s["labels"], _padded(lab, s["origin"], size, 0))
        assert s["labels"][tuple(np.array(size) // 2)] == s["label"]
        padded += bool((s["origin"] < 0).any() or (s["origin"] + size > lab.shape).any())
        # the patch's affine places patch[0, 0, 0] at the source voxel `origin`
        case = col[s["case_id"]]
        o = s["origin"]
        np.testing.assert_allclose(
            s["affine"] @ [0, 0, 0, 1], case.affine @ [o[2], o[1], o[0], 1], atol=1e-9
        )
    assert padded >= 5  # beta sits at a corner: its patches reach outside


def test_patches_at_level_1(col: Any) -> None:
    size = (16, 20, 12)
    sampler = ctzarr.PatchSampler(col, patch_size=size, seed=4, level=1, classes=["beta"])
    level0 = ctzarr.PatchSampler(col, patch_size=size, seed=4, level=0, classes=["beta"])
    c1, c0 = sampler.centres(20), level0.centres(20)
    np.testing.assert_array_equal(
        c1[["z", "y", "x"]].to_numpy(), c0[["z", "y", "x"]].to_numpy() // 2
    )
    for i in range(20):
        s = sampler.sample(i)
        case = col[s["case_id"]]
        image = case.image_at(1).values
        labels = case.labels("seg", level=1).values
        np.testing.assert_array_equal(s["image"], _padded(image, s["origin"], size, -1024))
        np.testing.assert_array_equal(s["labels"], _padded(labels, s["origin"], size, 0))
        o = s["origin"]
        np.testing.assert_allclose(
            s["affine"] @ [0, 0, 0, 1], case.level_affine(1) @ [o[2], o[1], o[0], 1], atol=1e-9
        )


def test_sparse_labels_are_padded_with_the_ignore_value(
    saros_store: Path, saros_source: Path
) -> None:
    col = ctzarr.open_collection(saros_store)
    size = (24, 40, 40)  # larger than the 32-voxel y axis: every patch is padded
    sampler = ctzarr.PatchSampler(col, patch_size=size, segmentation="body_regions", seed=1)
    assert 255 not in sampler.plan.classes
    for i in range(6):
        s = sampler.sample(i)
        folder = saros_source / s["case_id"]
        ct, lab = nifti_zyx(folder / "image.nii.gz"), nifti_zyx(folder / "body-regions.nii.gz")
        np.testing.assert_array_equal(s["image"], _padded(ct, s["origin"], size, -1024))
        np.testing.assert_array_equal(s["labels"], _padded(lab, s["origin"], size, 255))


# ------------------------------------------------------------------------------------------
# reproducible
# ------------------------------------------------------------------------------------------
def test_stream_is_philox_keyed_by_seed_epoch_index() -> None:
    """Philox-4x64 words are fixed by its specification: pinned, so any machine gives them."""
    words = [Stream(0, 0, 0).word() for _ in range(1)] + [Stream(7, 2, 5).word()]
    again = [Stream(0, 0, 0).word(), Stream(7, 2, 5).word()]
    assert words == again
    bits = np.random.Philox(key=7 | (2 << 64), counter=5 << 64)
    assert Stream(7, 2, 5).word() == int(bits.random_raw())
    s = Stream(1, 0, 0)
    draws = [s.below(10) for _ in range(2000)]
    assert set(draws) == set(range(10))


def _sample_worker(args: tuple[Any, int]) -> dict[str, Any]:
    ds, i = args
    return ds[i]


def test_same_patches_in_process_and_in_two_workers(col: Any) -> None:
    sampler = ctzarr.PatchSampler(col, patch_size=(20, 24, 24), seed=9, foreground_ratio=0.5)
    ds = sampler.dataset(16)
    here = [ds[i] for i in range(16)]  # the parent has read before the workers fork
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        there = pool.map_async(_sample_worker, [(ds, i) for i in range(16)], chunksize=3).get(120)
    for a, b in zip(here, there, strict=True):
        assert a["case_id"] == b["case_id"]
        assert a["label"] == b["label"]
        for key in ("image", "labels", "origin", "affine"):
            np.testing.assert_array_equal(a[key], b[key])
    # epochs differ, the same epoch repeats, another seed differs
    ds.set_epoch(1)
    other = [ds[i]["origin"].tolist() for i in range(16)]
    assert other != [s["origin"].tolist() for s in here]
    ds.set_epoch(0)
    assert [ds[i]["origin"].tolist() for i in range(16)] == [s["origin"].tolist() for s in here]
    reseeded = ctzarr.PatchSampler(col, patch_size=(20, 24, 24), seed=10, foreground_ratio=0.5)
    assert reseeded.centres(16)["z"].tolist() != sampler.centres(16)["z"].tolist()


def test_dataset_is_map_style(col: Any) -> None:
    ds = ctzarr.PatchSampler(col, patch_size=8).dataset(5)
    assert len(ds) == 5
    np.testing.assert_array_equal(ds[-1]["image"], ds[4]["image"])
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(TypeError):
        ds["0"]  # type: ignore[index]
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)


# ------------------------------------------------------------------------------------------
# bad arguments
# ------------------------------------------------------------------------------------------
BAD = [
    ({"patch_size": (8, 8)}, ValueError, "patch_size"),
    ({"patch_size": (8, 0, 8)}, ValueError, "patch_size"),
    ({"patch_size": (8.5, 8, 8)}, ValueError, "patch_size"),
    ({"foreground_ratio": 1.5}, ValueError, "foreground_ratio"),
    ({"foreground_ratio": float("nan")}, ValueError, "foreground_ratio"),
    ({"seed": -1}, ValueError, "seed"),
    ({"seed": 1.5}, ValueError, "seed"),
    ({"level": 7}, ValueError, "level"),
    ({"pad_value": float("inf")}, ValueError, "pad_value"),
    ({"classes": "alpha"}, ValueError, "classes"),
    ({"classes": []}, ValueError, "classes"),
    ({"classes": {"alpha": -1.0}}, ValueError, "weight"),
    ({"classes": {"alpha": 0.0}}, ValueError, "weight"),
    ({"classes": ["alpha", 1]}, ValueError, "more than once"),
    ({"classes": ["background"]}, ValueError, "background"),
    ({"classes": ["delta"]}, ctzarr.StructureNotFoundError, "delta"),
    ({"cases": []}, ValueError, "cases"),
    ({"cases": "p0"}, ValueError, "cases"),
    ({"cases": ["p9"]}, ctzarr.CaseNotFoundError, "p9"),
    ({"segmentation": "nope"}, ctzarr.SegmentationNotFoundError, "nope"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments_get_clear_errors(
    col: Any, kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        ctzarr.PatchSampler(col, **{"patch_size": 8, **kwargs})


def test_unknown_class_lists_close_matches(col: Any) -> None:
    with pytest.raises(ctzarr.StructureNotFoundError, match="alpha"):
        ctzarr.PatchSampler(col, patch_size=8, classes=["alpah"])


def test_bad_call_arguments(col: Any) -> None:
    sampler = ctzarr.PatchSampler(col, patch_size=8)
    for call, what in (
        (lambda: sampler.centres(-1), "n"),
        (lambda: sampler.sample(-2), "i"),
        (lambda: sampler.dataset(-1), "length"),
    ):
        with pytest.raises(ValueError, match=f"^{what} must"):
            call()
    with pytest.raises(ValueError, match="pad_value"):  # int16 images cannot hold it
        ctzarr.PatchSampler(col, patch_size=8, pad_value=1e6).sample(0)
    with pytest.raises(TypeError, match="open collection"):
        ctzarr.PatchSampler("pairs.zarr", patch_size=8)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# older stores: counts from one pass, cached; ctzarr reindex
# ------------------------------------------------------------------------------------------
GOLDEN_2 = Path(__file__).parent / "golden" / "format-2" / "dap_atlas.zarr"


def _brute_counts(col: Any, case_id: str) -> dict[int, dict[int, int]]:
    lab = col[case_id].labels("anatomy").values
    grid = [-(-n // 64) for n in lab.shape]
    out: dict[int, dict[int, int]] = {}
    for z, y, x in np.ndindex(*grid):
        block = lab[z * 64 : (z + 1) * 64, y * 64 : (y + 1) * 64, x * 64 : (x + 1) * 64]
        values, counts = np.unique(block, return_counts=True)
        flat = int(np.ravel_multi_index((z, y, x), grid))
        for v, c in zip(values.tolist(), counts.tolist(), strict=True):
            if v != 0:
                out.setdefault(v, {})[flat] = c
    return out


def test_older_store_counts_once_and_caches(tmp_path: Path) -> None:
    store = tmp_path / "dap.zarr"
    shutil.copytree(GOLDEN_2, store)
    col = ctzarr.open_collection(store)
    assert col.meta.format_version == 2
    sampler = ctzarr.PatchSampler(col, patch_size=(8, 8, 8), seed=1)
    centres = sampler.centres(200)
    truth = {cid: col[cid].labels("anatomy").values for cid in col.case_ids}
    for row in centres.itertuples():
        assert truth[row.case_id][row.z, row.y, row.x] == row.label
    cached = sorted(p.relative_to(store).as_posix() for p in (store / CACHE_PREFIX).rglob("*.json"))
    assert cached == sorted(cache_key(cid, "anatomy") for cid in set(centres["case_id"]))
    # the counts equal a brute-force count of the label chunks
    reader = StoreReader(str(store))
    for cid in col.case_ids:
        from ctzarr.train.counts import chunk_counts

        table = chunk_counts(reader.case(cid), "anatomy", reader.store, None)
        assert table.source in ("cache", "pass")
        brute = _brute_counts(col, cid)
        assert table.counts is not None
        for label, ids, counts in zip(table.labels, table.chunk_ids, table.counts, strict=True):
            assert dict(zip(ids.tolist(), counts.tolist(), strict=True)) == brute[int(label)]
    # a new process (here: a new reader) finds the cache; the store still verifies
    fresh = StoreReader(str(store))
    cid = centres["case_id"][0]
    from ctzarr.train.counts import chunk_counts as counts_of

    assert counts_of(fresh.case(cid), "anatomy", fresh.store, None).source == "cache"
    assert verify(str(store)).problems == []
    # a stale cache (another document of the case) is not used
    key = store / cache_key(cid, "anatomy")
    doc = json.loads(key.read_text())
    doc["case_document"] = "0" * 32
    key.write_text(json.dumps(doc))
    stale = StoreReader(str(store))
    assert counts_of(stale.case(cid), "anatomy", stale.store, None).source == "pass"


def test_reindex_writes_counts_for_every_case(tmp_path: Path) -> None:
    store = tmp_path / "dap.zarr"
    shutil.copytree(GOLDEN_2, store)
    report = reindex(store)
    assert report.ok, report
    assert len(report.written) == 3
    assert not report.up_to_date
    again = reindex(store)
    assert not again.written
    assert len(again.up_to_date) == 3
    col = ctzarr.open_collection(store)
    sampler = ctzarr.PatchSampler(col, patch_size=4)
    sampler.centres(10)
    reader = sampler.plan.reader
    from ctzarr.train.counts import chunk_counts

    sources = {
        chunk_counts(reader.case(cid), "anatomy", reader.store, None).source for cid in col.case_ids
    }
    assert sources == {"cache"}


def test_format3_index_needs_no_pass(col: Any, pairs: dict[str, Any]) -> None:
    reader = StoreReader(str(pairs["store"]))
    for cid, (_, lab) in pairs["truth"].items():
        table = reader.case(cid).index_chunks("seg")
        assert table.source == "index"
        assert table.counts is not None
        for label, counts in zip(table.labels, table.counts, strict=True):
            assert int(counts.sum()) == int((lab == label).sum())
    assert reindex(pairs["store"]).written == []


# ------------------------------------------------------------------------------------------
# remote stores: worker processes, and bytes read per sample
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def counting_moto_server() -> Iterator[tuple[str, list[tuple[str, str, str | None, int]]]]:
    """moto's S3 app on 127.0.0.1 behind a WSGI layer that logs (method, path, range, body
    bytes) of every request."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    logging.getLogger("werkzeug").disabled = True  # a line per request otherwise
    log: list[tuple[str, str, str | None, int]] = []
    lock = threading.Lock()

    def counted(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = app(environ, start_response)
        parts = list(body)
        if hasattr(body, "close"):
            body.close()
        with lock:
            log.append(
                (
                    environ["REQUEST_METHOD"],
                    environ.get("PATH_INFO", ""),
                    environ.get("HTTP_RANGE"),
                    sum(len(p) for p in parts),
                )
            )
        return parts

    server = make_server("127.0.0.1", 0, counted, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}", log
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def s3_pairs(pairs: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], list[Any]]]:
    pytest.importorskip("s3fs")
    from .test_remote import BUCKET, fake_aws_environment, s3_filesystem, s3_options

    with fake_aws_environment(), counting_moto_server() as (endpoint, log):
        fs = s3_filesystem(endpoint)
        # moto's state is per process: another module's server may have made BUCKET already
        bucket = f"{BUCKET}-patches-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        key = f"{bucket}/pairs.zarr"
        fs.put(str(pairs["store"]), key, recursive=True)
        yield f"s3://{key}", s3_options(endpoint), log


def _inner_sizes(array_dir: Path, shard_key: str, per_shard: int) -> list[int]:
    """Stored sizes of the inner chunks of one shard (its index: (offset, nbytes) uint64 pairs
    and a crc32c, at the end)."""
    data = (array_dir / shard_key).read_bytes()
    index = data[-(16 * per_shard + 4) : -4]
    return [struct.unpack_from("<QQ", index, 16 * i)[1] for i in range(per_shard)]


def _touched_bytes(store: Path, case_id: str, array: str, box: list[tuple[int, int]]) -> int:
    """Stored bytes of the inner chunks a box touches (64^3 inner chunks, whole-plane shards)."""
    shape = SHAPES[case_id]
    chunk = [min(64, n) for n in shape]
    grid = [-(-n // c) for n, c in zip(shape, chunk, strict=True)]
    array_dir = store / "cases" / case_id / array
    total = 0
    for gz in range(box[0][0] // chunk[0], (box[0][1] - 1) // chunk[0] + 1):
        sizes = _inner_sizes(array_dir, f"c/{gz}/0/0", grid[1] * grid[2])
        for gy in range(box[1][0] // chunk[1], (box[1][1] - 1) // chunk[1] + 1):
            for gx in range(box[2][0] // chunk[2], (box[2][1] - 1) // chunk[2] + 1):
                n = sizes[gy * grid[2] + gx]
                total += 0 if n == 2**64 - 1 else n
    return total


def _largest_inner(store: Path, case_id: str, array: str) -> int:
    """Stored size of the largest inner chunk of an array."""
    shape = SHAPES[case_id]
    grid = [-(-n // min(64, n)) for n in shape]
    sizes = []
    for gz in range(grid[0]):
        sizes += _inner_sizes(store / "cases" / case_id / array, f"c/{gz}/0/0", grid[1] * grid[2])
    return max(n for n in sizes if n != 2**64 - 1)


def test_s3_sample_reads_one_label_chunk_plus_the_patch(
    s3_pairs: tuple[str, dict[str, Any], list[Any]], pairs: dict[str, Any]
) -> None:
    url, options, log = s3_pairs
    col = ctzarr.open_collection(url, storage_options=options)
    size = (20, 24, 24)
    sampler = ctzarr.PatchSampler(col, patch_size=size, seed=21)
    for cid in SHAPES:  # open each case once (its document): not part of a sample's cost
        sampler.plan.reader.case(cid)
    label_chunk_max = max(_largest_inner(pairs["store"], cid, "labels/seg/0") for cid in SHAPES)
    for i in range(12):
        del log[:]
        s = sampler.sample(i)
        cid = s["case_id"]
        box = [
            (max(o, 0), min(o + n, lim))
            for o, n, lim in zip(s["origin"].tolist(), size, SHAPES[cid], strict=True)
        ]
        patch = _touched_bytes(pairs["store"], cid, "0", box) + _touched_bytes(
            pairs["store"], cid, "labels/seg/0", box
        )
        data = [e for e in log if e[0] == "GET" and "/c/" in e[1]]
        assert not [e for e in log if e[1].endswith("zarr.json")], log
        shard_indexes = sum(n for _, _, rng, n in data if rng and rng.startswith("bytes=-"))
        chunk_bytes = sum(n for _, _, rng, n in data) - shard_indexes
        # one label chunk at most (none when its chunk is cached), then the patch's chunks
        assert chunk_bytes <= patch + label_chunk_max, (i, chunk_bytes, patch, data)
        label_reads = [e for e in data if "/labels/" in e[1] and not e[2].startswith("bytes=-")]
        image_reads = [e for e in data if "/labels/" not in e[1] and not e[2].startswith("bytes=-")]
        assert len(image_reads) <= 8, data  # a patch of 20 x 24 x 24 touches <= 8 chunks
        assert len(label_reads) <= 9, data  # the same, and the centre's chunk


def _worker_samples(args: tuple[Any, list[int]]) -> list[tuple[str, int, bytes, bytes]]:
    ds, indices = args
    out = []
    for i in indices:
        s = ds[i]
        out.append((s["case_id"], s["label"], s["image"].tobytes(), s["labels"].tobytes()))
    return out


@pytest.mark.parametrize("kind", ["s3", "http"])
def test_remote_stores_with_worker_processes(
    kind: str,
    col: Any,
    pairs: dict[str, Any],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """Workers forked after the parent has read, each opening its own store, give the patches
    of the local store."""
    local = ctzarr.PatchSampler(col, patch_size=(16, 16, 16), seed=5).dataset(8)
    want = _worker_samples((local, list(range(8))))
    with contextlib.ExitStack() as stack:
        if kind == "s3":
            url, options, _ = request.getfixturevalue("s3_pairs")
        else:
            shutil.copytree(pairs["store"], tmp_path / "pairs.zarr")
            base, _log = stack.enter_context(http_server(tmp_path))
            url, options = f"{base}/pairs.zarr", None
        remote = ctzarr.open_collection(url, storage_options=options)
        ds = ctzarr.PatchSampler(remote, patch_size=(16, 16, 16), seed=5).dataset(8)
        assert _worker_samples((ds, [0])) == want[:1]  # the parent reads first
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(2) as pool:
            parts = pool.map_async(_worker_samples, [(ds, [0, 2, 4, 6]), (ds, [1, 3, 5, 7])]).get(
                120
            )
    got = dict(zip([0, 2, 4, 6, 1, 3, 5, 7], parts[0] + parts[1], strict=True))
    assert [got[i] for i in range(8)] == want
