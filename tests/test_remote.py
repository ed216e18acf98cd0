"""Remote stores: the same collection read from a local path, ``memory://``, S3 (moto) and HTTP
gives the same answers; conversion straight to S3 resumes; reads over HTTP stay within a request
budget; credentials never leak into the store, logs, errors or reprs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas.testing as pdt
import pytest

import ctzarr
from ctzarr.sources.layouts import load_source

from .conftest import nifti_zyx, write_pairs
from .servers import http_server, moto_s3_server

s3fs = pytest.importorskip("s3fs")

BUCKET = "ctzarr-test"
SECRET = "CTZARR-FAKE-SECRET-1234"
ACCESS_KEY = "ctzarr-fake-access-key"


# --------------------------------------------------------------------------------------------
# helpers shared with test_distributed.py
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def fake_aws_environment(secret: str = SECRET) -> Iterator[None]:
    """Dummy AWS credentials in os.environ (restored afterwards); never the user's real ones."""
    values = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        for k, v in values.items():
            mp.setenv(k, v)
        yield


@contextlib.contextmanager
def fast_moto_server() -> Iterator[str]:
    """moto's S3 server, made quieter and quicker for the tests.

    moto lists its own package directory on every request to find the backend
    (``moto.backends.list_of_moto_modules``) and werkzeug logs every request line; both together
    more than double the cost of a request (about 12 ms -> 5 ms per PUT here). The module list is
    constant, so it is computed once.
    """
    import moto.backends

    with pytest.MonkeyPatch.context() as mp:
        if callable(getattr(moto.backends, "list_of_moto_modules", None)):
            modules = tuple(moto.backends.list_of_moto_modules())
            mp.setattr(moto.backends, "list_of_moto_modules", lambda: modules)
        werkzeug_log = logging.getLogger("werkzeug")
        mp.setattr(werkzeug_log, "disabled", True)
        with moto_s3_server() as endpoint:
            yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()


def s3_options(endpoint: str) -> dict[str, Any]:
    """Storage options for moto: endpoint only (credentials come from the environment)."""
    return {"anon": False, "client_kwargs": {"endpoint_url": endpoint}}


def s3_filesystem(endpoint: str) -> Any:
    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(endpoint))


def unique_prefix(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:10]}"


def assert_same_collection(col: Any, ref: Any, case_ids: list[str] | None = None) -> None:
    """Same case ids (those of ref, or case_ids), and per case the same arrays and affine."""
    case_ids = ref.case_ids if case_ids is None else case_ids
    assert col.case_ids == case_ids
    assert list(col.segmentations) == list(ref.segmentations)
    for cid in case_ids:
        a, b = col[cid], ref[cid]
        np.testing.assert_array_equal(a.affine, b.affine)
        np.testing.assert_array_equal(a.image.values, b.image.values)
        assert a.image.dtype == b.image.dtype
        for seg in ref[cid].segmentation_names:
            np.testing.assert_array_equal(a.labels(seg).values, b.labels(seg).values)
            assert a.labels(seg).dtype == b.labels(seg).dtype


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def aws_env() -> Iterator[None]:
    with fake_aws_environment():
        yield


@pytest.fixture(scope="session")
def s3_endpoint(aws_env: None) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (ephemeral port) with the test bucket."""
    with fast_moto_server() as endpoint:
        with contextlib.suppress(FileExistsError):  # moto keeps its buckets per process
            s3_filesystem(endpoint).mkdir(BUCKET)
        yield endpoint


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    return s3_filesystem(s3_endpoint)


#: s3 and http are read through obstore by default (ctzarr.obstore_io); "-fsspec" reads the
#: same store through s3fs / fsspec's HTTP filesystem (CTZARR_IO=fsspec)
BACKENDS = ["local", "memory", "s3", "s3-fsspec", "http", "http-fsspec"]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(
    request: pytest.FixtureRequest,
    dap_source: Path,
    dap_store: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(url, storage_options) of the DAP phantom collection on one backend."""
    kind = request.param.removesuffix("-fsspec")
    if kind == "local":
        yield str(dap_store), None
    elif kind == "memory":
        url = f"memory://{unique_prefix('ctzarr')}/dap.zarr"
        report = ctzarr.convert(dap_source, url, progress=False)
        assert report.ok, report
        yield url, None
    elif kind == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        key = f"{BUCKET}/{unique_prefix('backend')}/dap.zarr"
        s3_filesystem(endpoint).put(str(dap_store), key, recursive=True)
        yield f"s3://{key}", s3_options(endpoint)
    else:
        site = tmp_path_factory.mktemp("http-site")
        shutil.copytree(dap_store, site / "dap.zarr")
        with http_server(site) as (base, _log):
            yield f"{base}/dap.zarr", None


# --------------------------------------------------------------------------------------------
# one set of checks, every backend
# --------------------------------------------------------------------------------------------
class TestBackends:
    """The collection reads the same on every backend (in the manner of zarr-python's StoreTests)."""

    @pytest.fixture(autouse=True)
    def io_path(self, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
        """Pin the read library: obstore for "s3"/"http" (must be what the default picks), fsspec
        for the "-fsspec" backends."""
        param = request.node.callspec.params["backend"]
        if param.endswith("-fsspec"):
            monkeypatch.setenv("CTZARR_IO", "fsspec")
        else:
            monkeypatch.delenv("CTZARR_IO", raising=False)
        url, so = request.getfixturevalue("backend")
        store = ctzarr.open_collection(url, storage_options=so).root.store
        inner = type(getattr(store, "_store", store)).__name__
        expected = {
            "local": "LocalStore",
            "memory": "FsspecStore",
            "s3": "ObjectStore",
            "http": "ObjectStore",
        }.get(param, "FsspecStore")
        assert inner == expected, (param, inner)

    def test_case_ids(self, backend: tuple[str, dict[str, Any] | None], dap_store: Path) -> None:
        url, so = backend
        col = ctzarr.open_collection(url, storage_options=so)
        ref = ctzarr.open_collection(dap_store)
        assert col.case_ids == ref.case_ids
        assert len(col) == 3
        assert col.dataset_id == ref.dataset_id
        assert list(col.segmentations) == ["anatomy"]

    def test_values_equal_nibabel(
        self, backend: tuple[str, dict[str, Any] | None], dap_source: Path
    ) -> None:
        url, so = backend
        col = ctzarr.open_collection(url, storage_options=so)
        for cid in col.case_ids:
            case = col[cid]
            np.testing.assert_array_equal(
                case.image.values, nifti_zyx(dap_source / "images" / f"{cid}.nii.gz")
            )
            np.testing.assert_array_equal(
                case.labels("anatomy").values, nifti_zyx(dap_source / "masks" / f"{cid}.nii.gz")
            )

    def test_crop_equals_local(
        self, backend: tuple[str, dict[str, Any] | None], dap_store: Path
    ) -> None:
        url, so = backend
        col = ctzarr.open_collection(url, storage_options=so)
        ref = ctzarr.open_collection(dap_store)
        for cid in ref.case_ids:
            got, want = col[cid].crop("liver", margin_mm=5), ref[cid].crop("liver", margin_mm=5)
            assert got.attrs["box_zyx"] == want.attrs["box_zyx"]
            np.testing.assert_array_equal(got.attrs["affine"], want.attrs["affine"])
            np.testing.assert_array_equal(got.image.values, want.image.values)
            np.testing.assert_array_equal(got.labels.values, want.labels.values)
            np.testing.assert_array_equal(
                got.image.coords["z"].values, want.image.coords["z"].values
            )

    def test_index_stats_equal_local(
        self, backend: tuple[str, dict[str, Any] | None], dap_store: Path
    ) -> None:
        url, so = backend
        got = ctzarr.open_collection(url, storage_options=so).stats()
        want = ctzarr.open_collection(dap_store).stats()
        assert len(want) > 0
        pdt.assert_frame_equal(got, want, check_exact=True)

    def test_scan_stats_equal_local(
        self, backend: tuple[str, dict[str, Any] | None], dap_store: Path
    ) -> None:
        url, so = backend
        got = ctzarr.open_collection(url, storage_options=so).stats(method="scan")
        want = ctzarr.open_collection(dap_store).stats(method="scan")
        pdt.assert_frame_equal(got, want, check_exact=True)


# --------------------------------------------------------------------------------------------
# conversion straight to S3
# --------------------------------------------------------------------------------------------
def test_touched_remote_source_is_rehashed_with_its_storage_options(
    s3_endpoint: str, s3: Any, dap_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A source object rewritten with the same bytes (new mtime) is re-hashed through the
    source's own storage options (endpoint and credentials) and found unchanged: skipped."""
    prefix = f"{BUCKET}/{unique_prefix('touched')}/dap"
    s3.put(str(dap_source), prefix, recursive=True)  # labels.json included: read remotely too
    # the credentials travel only in the storage options, as they would for a user's bucket
    so = {**s3_options(s3_endpoint), "key": ACCESS_KEY, "secret": SECRET}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    source, dest = f"s3://{prefix}", tmp_path / "dap.zarr"
    first = ctzarr.convert(source, dest, storage_options=so, progress=False)
    assert first.ok, first
    cid = sorted(first.converted)[0]
    image = f"{prefix}/images/{cid}.nii.gz"
    before = s3.info(image)["LastModified"]
    time.sleep(1.1)  # S3 modification times have one-second resolution
    s3.pipe(image, (dap_source / "images" / f"{cid}.nii.gz").read_bytes())
    s3.invalidate_cache()
    assert s3.info(image)["LastModified"] != before
    s3fs.S3FileSystem.clear_instance_cache()

    again = ctzarr.convert(source, dest, storage_options=so, progress=False)
    assert again.ok, again
    assert cid in again.skipped, again
    assert not again.converted, again


def test_remote_dap_labels_json_is_read_with_the_source_storage_options(
    s3_endpoint: str, s3: Any, dap_source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DAP Atlas source on S3 takes its label map from its own remote labels.json, read through
    the source's storage options (the credentials are nowhere else)."""
    prefix = f"{BUCKET}/{unique_prefix('labels')}/dap"
    s3.put(str(dap_source), prefix, recursive=True)
    table = json.loads((dap_source / "labels.json").read_text(encoding="utf-8"))
    table["2"] = "renamed_in_the_bucket"  # differs from the builtin table: proves the file was read
    s3.pipe(f"{prefix}/labels.json", json.dumps(table).encode())
    so = {**s3_options(s3_endpoint), "key": ACCESS_KEY, "secret": SECRET}
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    source = f"s3://{prefix}"

    ds = load_source(source, storage_options=so)
    assert ds.label_maps["anatomy"][2].name == "renamed_in_the_bucket"
    report = ctzarr.convert(source, tmp_path / "dap.zarr", storage_options=so, progress=False)
    assert report.ok, report
    col = ctzarr.open_collection(tmp_path / "dap.zarr")
    assert col.segmentations["anatomy"][2].name == "renamed_in_the_bucket"
    assert len(col.segmentations["anatomy"]) == 144


def test_convert_to_s3_resumes_and_replaces_interrupted_case(
    s3_endpoint: str, s3: Any, dap_source: Path, dap_store: Path
) -> None:
    so = s3_options(s3_endpoint)
    key = f"{BUCKET}/{unique_prefix('convert')}/dap.zarr"
    url = f"s3://{key}"
    ref = ctzarr.open_collection(dap_store)
    cids = ref.case_ids[
        :2
    ]  # two cases keep it quick: every write is a few hundred requests to moto
    ref_stats = ref.stats(cases=cids)

    report = ctzarr.convert(dap_source, url, storage_options=so, cases=cids, progress=False)
    assert report.ok, report
    assert sorted(report.converted) == cids
    col = ctzarr.open_collection(url, storage_options=so)
    assert_same_collection(col, ref, cids)
    pdt.assert_frame_equal(col.stats(), ref_stats, check_exact=True)

    # a plain re-run skips every case
    again = ctzarr.convert(dap_source, url, storage_options=so, cases=cids, progress=False)
    assert again.ok, again
    assert again.converted == []
    assert sorted(again.skipped) == cids

    # an interrupted case: the commit marker is missing and a shard never arrived
    cid = cids[1]
    meta_key = f"{key}/cases/{cid}/zarr.json"
    doc = json.loads(s3.cat_file(meta_key))
    assert doc["attributes"]["ctzarr"].pop("complete") is True
    s3.pipe_file(meta_key, json.dumps(doc).encode())
    shards = s3.find(f"{key}/cases/{cid}/labels/anatomy/0/c")
    assert shards
    s3.rm_file(shards[0])
    s3.invalidate_cache()

    reopened = ctzarr.open_collection(url, storage_options=so)
    with pytest.raises(ctzarr.IncompleteCaseError, match=cid):
        reopened[cid]
    reopened[cids[0]]  # the other stays readable

    fixed = ctzarr.convert(dap_source, url, storage_options=so, cases=cids, progress=False)
    assert fixed.ok, fixed
    assert fixed.converted == [cid]
    assert fixed.skipped == [cids[0]]
    col = ctzarr.open_collection(url, storage_options=so)
    assert_same_collection(col, ref, cids)
    pdt.assert_frame_equal(col.stats(), ref_stats, check_exact=True)


# --------------------------------------------------------------------------------------------
# request budget over HTTP
# --------------------------------------------------------------------------------------------
TALL_SHAPE = (192, 130, 130)  # three 64-slice shards per array, 3 x 3 inner chunks per shard plane


@pytest.fixture(scope="module")
def tall_site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """A pairs case whose structure "b" lies inside one 64^3 chunk (and "a" inside another), and
    whose middle 64-slice slab is all background (that labels shard is never written)."""
    rng = np.random.default_rng(21)
    ct = rng.integers(-1000, 1000, size=TALL_SHAPE).astype(np.int16)
    mask = np.zeros(ct.shape, np.uint8)
    mask[10:20, 70:80, 70:80] = 2  # chunk (0, 1, 1)
    mask[150:160, 5:20, 5:20] = 1  # chunk (2, 0, 0)
    root = tmp_path_factory.mktemp("tall")
    manifest, labels = write_pairs(
        root / "src", {"tall": (ct, mask, np.diag([1.0, 1.0, 2.0, 1.0]))}
    )
    report = ctzarr.convert(
        manifest, root / "site" / "t.zarr", labels=[str(labels)], progress=False
    )
    assert report.ok, report
    return root / "site", ct, mask


@pytest.fixture(scope="module")
def tall_server(tall_site: tuple[Path, np.ndarray, np.ndarray]) -> Iterator[tuple[str, Any]]:
    with http_server(tall_site[0]) as (base, log):
        yield f"{base}/t.zarr", log


def _no_v2_probes_and_no_head(entries: list[tuple[str, str, str | None, int]]) -> None:
    assert all(method == "GET" for method, *_ in entries), entries
    for _, path, _, _ in entries:
        assert not path.endswith((".zarray", ".zgroup", ".zattrs", ".zmetadata")), entries


@pytest.fixture(params=["obstore", "fsspec"])
def io(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Reads through obstore (the default) or fsspec (CTZARR_IO=fsspec)."""
    monkeypatch.setenv("CTZARR_IO", str(request.param))
    return str(request.param)


def test_cold_crop_over_http_within_request_budget(
    tall_server: tuple[str, Any], tall_site: tuple[Path, np.ndarray, np.ndarray], io: str
) -> None:
    url, log = tall_server
    _, ct, mask = tall_site
    log.clear()
    col = ctzarr.open_collection(url)
    crop = col["tall"].crop("b", margin_mm=0)
    image, labels = crop.image.compute(), crop.labels.compute()
    entries = list(log.entries)
    np.testing.assert_array_equal(image.values, ct[10:20, 70:80, 70:80])
    np.testing.assert_array_equal(labels.values, mask[10:20, 70:80, 70:80])
    assert len(entries) <= 12, entries
    _no_v2_probes_and_no_head(entries)
    assert all(status in (200, 206) for *_, status in entries), entries
    # voxels come from the first shard of level 0 only, of the image and of the labels
    data = {path for _, path, _, _ in entries if "/c/" in path and "/index/" not in path}
    assert data == {"/t.zarr/cases/tall/0/c/0/0/0", "/t.zarr/cases/tall/labels/seg/0/c/0/0/0"}, (
        entries
    )
    # and ranged: the shard index and one inner chunk, never a whole shard
    assert all(rng is not None for _, path, rng, _ in entries if path in data), entries


def test_scan_over_http_reads_each_shard_about_once(
    tall_server: tuple[str, Any], tall_site: tuple[Path, np.ndarray, np.ndarray], io: str
) -> None:
    url, log = tall_server
    site, _, mask = tall_site
    store_dir = site / "t.zarr"
    stored = {
        "/t.zarr/" + p.relative_to(store_dir).as_posix()
        for p in store_dir.rglob("*")
        if p.is_file()
    }
    level0_shards = {k for k in stored if "/c/" in k and ("/tall/0/c/" in k or "/seg/0/c/" in k)}
    assert len(level0_shards) == 5  # 3 image shards, 2 labels shards
    absent = "/t.zarr/cases/tall/labels/seg/0/c/1/0/0"
    assert absent not in stored  # the all-background labels slab was never written

    log.clear()
    col = ctzarr.open_collection(url)
    df = col.stats(method="scan")
    entries = list(log.entries)
    assert sorted(df.label.tolist()) == [1, 2]
    assert df.set_index("label").voxel_count.to_dict() == {
        1: int((mask == 1).sum()),
        2: int((mask == 2).sum()),
    }
    pdt.assert_frame_equal(df, col.stats(), check_exact=True)

    _no_v2_probes_and_no_head(entries)
    counts = Counter(path for _, path, _, _ in entries)
    missing = [path for _, path, _, status in entries if status == 404]
    # nothing but stored keys, and at most one probe of each absent one
    assert set(missing) <= {absent}, entries
    assert counts[absent] <= 1, entries
    assert set(counts) - {absent} <= stored, entries
    # only level 0 is scanned; each shard costs at most 2 requests (shard index + data)
    data = {p for p in counts if "/c/" in p and "/index/" not in p}
    assert data - {absent} <= level0_shards, entries
    assert all(counts[p] <= 2 for p in data), entries
    metadata = [p for p in counts if p not in data]
    assert len(metadata) <= 4, entries  # root, case (consolidated), histogram of the index
    assert len(entries) <= 2 * len(level0_shards) + 1 + 4, entries


# --------------------------------------------------------------------------------------------
# credentials hygiene
# --------------------------------------------------------------------------------------------
class _RefusingClient:
    """Stands in for a dask Client: ctzarr must refuse the secrets before submitting anything."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(
            f"ctzarr used client.{name} although the storage options carry secrets"
        )


def _messages(exc: BaseException) -> str:
    """Every message of an exception chain, reprs and the formatted traceback included."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts += [str(cur), repr(cur)]
        cur = cur.__cause__ or cur.__context__
    return "\n".join(parts)


def test_secret_never_leaks(
    s3_endpoint: str,
    s3: Any,
    dap_source: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    io: str,
) -> None:
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET  # credentials of the environment...
    caplog.set_level(logging.DEBUG, logger="ctzarr")
    env_so = s3_options(s3_endpoint)
    # ...and the same secret passed explicitly
    secret_so = {
        "key": ACCESS_KEY,
        "secret": SECRET,
        "client_kwargs": {"endpoint_url": s3_endpoint},
    }
    src = tmp_path / "dap"
    shutil.copytree(dap_source, src)
    cids = sorted(p.name[: -len(".nii.gz")] for p in (src / "images").iterdir())
    (src / "masks" / f"{cids[2]}.nii.gz").write_bytes(b"\x1f\x8b not really gzip")  # one case fails

    prefix = f"{BUCKET}/{unique_prefix('secret')}"
    url = f"s3://{prefix}/dap.zarr"
    texts: list[str] = []
    # written with the explicit secret (the riskier way: it could end up in attributes)
    report = ctzarr.convert(src, url, storage_options=secret_so, cases=cids[1:], progress=False)
    assert report.converted == [cids[1]], report
    assert [r.case_id for r in report.failed] == [cids[2]], report
    texts += [str(report), repr(report)]
    for so in (env_so, secret_so):
        rerun = ctzarr.convert(src, url, storage_options=so, cases=cids[1:2], progress=False)
        assert rerun.skipped == [cids[1]]
        texts += [str(rerun), repr(rerun)]

        col = ctzarr.open_collection(url, storage_options=so)
        case = col[cids[1]]
        texts += [repr(col), str(col), repr(case), str(case), col.url]
        crop = case.crop("liver", margin_mm=2)
        crop.image.compute()
        texts.append(repr(crop))
        if so is env_so:  # a graph shipped to dask workers resolves credentials there
            import cloudpickle

            graph = cloudpickle.dumps(dict(crop.image.data.__dask_graph__()))
            assert SECRET.encode() not in graph
            assert ACCESS_KEY.encode() not in graph
        col.stats()
        col.stats(method="scan")

        # errors: a missing case, an unknown structure, a missing store, a missing bucket
        with pytest.raises(KeyError) as info:
            col["no-such-case"]
        texts.append(_messages(info.value))
        with pytest.raises(ctzarr.StructureNotFoundError) as info:
            case.crop("livr")
        texts.append(_messages(info.value))
        with pytest.raises(ctzarr.StoreError) as store_info:
            ctzarr.open_collection(f"s3://{prefix}/missing.zarr", storage_options=so)
        texts.append(_messages(store_info.value))
        with pytest.raises(OSError) as os_info:  # noqa: PT011 - whatever s3fs makes of NoSuchBucket
            ctzarr.convert(
                src,
                f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x.zarr",
                storage_options=so,
                progress=False,
            )
        texts.append(_messages(os_info.value))

    # a scan on a cluster is refused while the options hold the secret, naming the keys only
    col = ctzarr.open_collection(url, storage_options=secret_so)
    with pytest.raises(ctzarr.CtzarrError) as refused:
        col.stats(method="scan", client=_RefusingClient())
    assert "key" in str(refused.value)
    assert "secret" in str(refused.value)
    texts.append(_messages(refused.value))

    # nothing stored anywhere under the prefix carries the secret
    keys = s3.find(prefix)
    assert len(keys) > 20
    for k in keys:
        assert SECRET.encode() not in s3.cat_file(k), k

    assert caplog.records, "expected at least the failed-case warning"
    for record in caplog.records:
        assert SECRET not in record.getMessage()
    assert SECRET not in caplog.text
    for text in texts:
        assert SECRET not in text


def test_secrets_with_a_cluster_are_refused(s3_endpoint: str, dap_source: Path) -> None:
    """Secrets in storage options would be pickled into the task graph: refused, naming the keys."""
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"key": ACCESS_KEY, "secret": SECRET}, ["key", "secret"]),
        (
            {"client_kwargs": {"aws_access_key_id": ACCESS_KEY, "aws_secret_access_key": SECRET}},
            ["client_kwargs.aws_access_key_id", "client_kwargs.aws_secret_access_key"],
        ),
    ]
    for options, names in cases:
        so = {
            **options,
            "client_kwargs": {**options.get("client_kwargs", {}), "endpoint_url": s3_endpoint},
        }
        url = f"s3://{BUCKET}/{unique_prefix('refuse')}/dap.zarr"
        with pytest.raises(ctzarr.CtzarrError) as info:
            ctzarr.convert(
                dap_source, url, storage_options=so, client=_RefusingClient(), progress=False
            )
        assert SECRET not in _messages(info.value)
        for n in names:
            assert n in str(info.value)
