"""``/zarr/{name}/{key}`` of a live ``ctzarr serve``: the store's own bytes over HTTP.

Read by real clients and compared with nibabel: zarr-python (``zarr.open_group`` on the
HTTP URL), ctzarr itself (``open_collection`` on the URL), and zarrita under node (the
JavaScript reader browser viewers use; installed into ``tests/node`` by npm). Then the HTTP
contract viewers rely on (exact HEAD, byte ranges with suffixes, 416, ETag, CORS) and the
refusal of every key outside the store: ``..``, absolute paths, percent-encoded tricks and
symlinks that point out of the store folder.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import zarr

import ctzarr
from ctzarr.io.urls import allow_local_targets
from tests.conftest import nifti_zyx
from tests.test_remote import aws_env, s3_endpoint  # noqa: F401 - the moto server fixtures
from tests.test_serve_api import Server, start_server, stop_server

httpx = pytest.importorskip("httpx")

NODE_DIR = Path(__file__).resolve().parent / "node"
SECRET = "do-not-serve-this"


@pytest.fixture(scope="module")
def linked_store(dap_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the DAP store with symlinks pointing out of it (a file and a folder)."""
    root = tmp_path_factory.mktemp("linked")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    dest = root / "linked.zarr"
    shutil.copytree(dap_store, dest)
    (dest / "secret.txt").symlink_to(outside / "secret.txt")
    (dest / "cases" / "out").symlink_to(outside, target_is_directory=True)
    return dest


@pytest.fixture(scope="module")
def server(dap_store: Path, linked_store: Path) -> Iterator[Server]:
    srv = start_server(str(dap_store), str(linked_store), "--name", "dap", "--name", "linked")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def dap(dap_store: Path) -> ctzarr.Collection:
    return ctzarr.open_collection(dap_store)


def _shard(dap_store: Path, case_id: str) -> str:
    """Store key of the first shard of a case's image."""
    files = sorted((dap_store / "cases" / case_id / "0" / "c").rglob("*"))
    first = next(f for f in files if f.is_file())
    return first.relative_to(dap_store).as_posix()


def test_zarr_python_reads_through_http(
    server: Server, dap: ctzarr.Collection, dap_source: Path
) -> None:
    group = zarr.open_group(f"{server.base}/zarr/dap", mode="r")
    assert group.attrs.asdict() == dap.root.attrs.asdict()
    for case_id in dap.case_ids:
        labels = group[f"cases/{case_id}/labels/anatomy/0"]
        expected = nifti_zyx(dap_source / "masks" / f"{case_id}.nii.gz")
        assert np.array_equal(labels[:], expected)
        image = group[f"cases/{case_id}/0"][:]
        stored = np.asarray(dap[case_id].array("0")[:])
        assert np.array_equal(image, stored)  # the stored values, byte for byte decoded


def test_ctzarr_reads_its_own_store_through_http(
    server: Server, dap: ctzarr.Collection, dap_source: Path
) -> None:
    with allow_local_targets(True):
        remote = ctzarr.open_collection(f"{server.base}/zarr/dap")
        case_id = dap.case_ids[0]
        image = remote[case_id].image.values
    assert remote.case_ids == dap.case_ids
    assert np.array_equal(image, nifti_zyx(dap_source / "images" / f"{case_id}.nii.gz"))


def _zarrita() -> Path:
    entry = NODE_DIR / "node_modules" / "zarrita" / "dist" / "src" / "index.js"
    if entry.exists():
        return entry
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed: zarrita cannot run")
    run = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if run.returncode != 0 or not entry.exists():
        pytest.skip(f"npm could not install zarrita (registry unreachable?): {run.stderr[-300:]}")
    return entry


ZARRITA_SCRIPT = """
import * as zarr from "%(entry)s";
const store = new zarr.FetchStore("%(url)s");
const out = {};
for (const path of %(paths)s) {
  const arr = await zarr.open(zarr.root(store).resolve(path), { kind: "array" });
  const chunk = await zarr.get(arr);
  out[path] = { shape: chunk.shape, dtype: arr.dtype, data: Array.from(chunk.data) };
}
console.log(JSON.stringify(out));
"""


def test_zarrita_under_node_reads_through_http(
    server: Server, dap: ctzarr.Collection, dap_source: Path, tmp_path: Path
) -> None:
    entry = _zarrita()
    case_id = dap.case_ids[1]
    paths = [f"cases/{case_id}/labels/anatomy/0", f"cases/{case_id}/0"]
    script = tmp_path / "read.mjs"
    script.write_text(
        ZARRITA_SCRIPT
        % {"entry": entry.as_uri(), "url": f"{server.base}/zarr/dap", "paths": json.dumps(paths)}
    )
    run = subprocess.run(
        ["node", str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout)
    mask = nifti_zyx(dap_source / "masks" / f"{case_id}.nii.gz")
    labels = got[paths[0]]
    assert labels["shape"] == list(mask.shape)
    assert np.array_equal(np.asarray(labels["data"]).reshape(mask.shape), mask)
    stored = np.asarray(dap[case_id].array("0")[:])
    image = got[paths[1]]
    assert image["shape"] == list(stored.shape)
    assert np.array_equal(np.asarray(image["data"]).reshape(stored.shape), stored)


def test_head_is_exact_for_every_object(client: httpx.Client, dap_store: Path) -> None:
    files = [f for f in sorted(dap_store.rglob("*")) if f.is_file()]
    assert len(files) > 5
    for f in files:
        key = f.relative_to(dap_store).as_posix()
        r = client.head(f"/zarr/dap/{key}")
        assert r.status_code == 200, key
        assert int(r.headers["content-length"]) == f.stat().st_size, key
        assert r.headers["accept-ranges"] == "bytes"
        assert "etag" in r.headers
        assert "cache-control" in r.headers
        assert "content-encoding" not in r.headers  # never compressed on the fly
    whole = client.get(f"/zarr/dap/{files[0].relative_to(dap_store).as_posix()}")
    assert whole.content == files[0].read_bytes()


@pytest.mark.parametrize(
    ("header", "span"),
    [
        ("bytes=0-9", (0, 10)),
        ("bytes=5-", (5, None)),
        ("bytes=-16", (-16, None)),
        ("bytes=3-3", (3, 4)),
        ("bytes=10-99999999", (10, None)),
        ("bytes=-99999999", (0, None)),
    ],
)
def test_byte_ranges(
    client: httpx.Client,
    dap_store: Path,
    dap: ctzarr.Collection,
    header: str,
    span: tuple[int, int | None],
) -> None:
    key = _shard(dap_store, dap.case_ids[0])
    data = (dap_store / key).read_bytes()
    start, stop = span
    expected = data[start:stop]
    first = start if start >= 0 else len(data) + start
    r = client.get(f"/zarr/dap/{key}", headers={"Range": header})
    assert r.status_code == 206
    assert r.content == expected
    assert r.headers["content-range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
    assert int(r.headers["content-length"]) == len(expected)
    h = client.head(f"/zarr/dap/{key}", headers={"Range": header})
    assert h.status_code == 206
    assert int(h.headers["content-length"]) == len(expected)


def test_unsatisfiable_and_ignored_ranges(
    client: httpx.Client, dap_store: Path, dap: ctzarr.Collection
) -> None:
    key = _shard(dap_store, dap.case_ids[0])
    size = (dap_store / key).stat().st_size
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        r = client.get(f"/zarr/dap/{key}", headers={"Range": header})
        assert r.status_code == 416, header
        assert r.headers["content-range"] == f"bytes */{size}"
    for header in ("bytes=0-1,4-5", "items=0-1", "bytes=9-2"):
        r = client.get(f"/zarr/dap/{key}", headers={"Range": header})
        assert r.status_code == 200, header
        assert len(r.content) == size, header


def test_etag_and_cors(client: httpx.Client, dap_store: Path, dap: ctzarr.Collection) -> None:
    key = _shard(dap_store, dap.case_ids[0])
    r = client.get(f"/zarr/dap/{key}", headers={"Origin": "http://viewer.example"})
    assert r.headers["access-control-allow-origin"] == "*"
    exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"content-range", "content-length", "etag"} <= exposed
    again = client.get(f"/zarr/dap/{key}", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""
    pre = client.options(
        f"/zarr/dap/{key}",
        headers={"Origin": "http://viewer.example", "Access-Control-Request-Method": "GET"},
    )
    assert pre.status_code == 204
    assert "range" in pre.headers["access-control-allow-headers"].lower()
    # CORS is for /zarr only
    api = client.get("/api/v1/collections", headers={"Origin": "http://viewer.example"})
    assert "access-control-allow-origin" not in api.headers


def _raw_get(base: str, raw_path: str) -> tuple[int, bytes]:
    """GET a path exactly as written (httpx and browsers would normalise dot segments)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        conn.putrequest("GET", raw_path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    "raw",
    [
        "/zarr/linked/../dap/zarr.json",
        "/zarr/linked/cases/../../dap/zarr.json",
        "/zarr/linked/cases/%2e%2e/%2e%2e/dap/zarr.json",
        "/zarr/linked/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/zarr/linked//etc/passwd",
        "/zarr/linked/%2Fetc%2Fpasswd",
        "/zarr/linked/..%5c..%5cetc%5cpasswd",
        "/zarr/linked/cases/./zarr.json",
        "/zarr/linked/zarr.json%00",
        "/zarr/linked/secret.txt",
        "/zarr/linked/cases/out/secret.txt",
        "/zarr/linked/cases",
        "/zarr/linked/cases/missing/zarr.json",
        "/zarr/nothing/zarr.json",
    ],
)
def test_no_key_outside_the_store(server: Server, raw: str) -> None:
    status, body = _raw_get(server.base, raw)
    assert status == 404, (raw, status)
    assert SECRET.encode() not in body
    assert b"root:" not in body


def test_the_linked_store_serves_its_own_keys(server: Server) -> None:
    status, body = _raw_get(server.base, "/zarr/linked/zarr.json")
    assert status == 200
    assert json.loads(body)["zarr_format"] == 3


def test_a_store_in_a_bucket_is_served_unchanged(
    s3_endpoint: str,  # noqa: F811 - the fixture imported above
    dap_store: Path,
    dap: ctzarr.Collection,
) -> None:
    """A store in S3 (moto's server): /zarr gives the bucket's bytes (HEAD, ranges, suffix
    ranges), zarr-python reads an array through it, and the API's case list is the library's."""
    from tests.test_remote import s3_filesystem, s3_options, unique_prefix

    fs = s3_filesystem(s3_endpoint)
    key = f"ctzarr-test/{unique_prefix('serve')}/dap.zarr"
    fs.put(str(dap_store), key, recursive=True)
    options = json.dumps(s3_options(s3_endpoint))
    server = start_server(f"s3://{key}", "--name", "dap", "--storage-options", options)
    try:
        with httpx.Client(base_url=server.base, timeout=30) as client:
            case_id = dap.case_ids[0]
            shard = _shard(dap_store, case_id)
            data = fs.cat(f"{key}/{shard}")
            head = client.head(f"/zarr/dap/{shard}")
            assert head.status_code == 200
            assert int(head.headers["content-length"]) == len(data)
            assert client.get(f"/zarr/dap/{shard}").content == data
            part = client.get(f"/zarr/dap/{shard}", headers={"Range": "bytes=10-99"})
            assert part.status_code == 206
            assert part.headers["content-range"] == f"bytes 10-99/{len(data)}"
            assert part.content == data[10:100]
            tail = client.get(f"/zarr/dap/{shard}", headers={"Range": "bytes=-16"})
            assert tail.status_code == 206
            assert tail.content == data[-16:]
            etag = head.headers["etag"]  # the bucket's own ETag, answered with 304 when unchanged
            assert (
                client.get(f"/zarr/dap/{shard}", headers={"If-None-Match": etag}).status_code == 304
            )
            assert client.get("/zarr/dap/cases/../../etc/passwd").status_code == 404
            r = client.get("/api/v1/collections/dap/cases")
            assert [c["case_id"] for c in r.json()["items"]] == dap.case_ids
        with allow_local_targets(True):
            group = zarr.open_group(f"{server.base}/zarr/dap", mode="r")
            got = np.asarray(group[f"cases/{case_id}/labels/anatomy/0"][:])
        np.testing.assert_array_equal(got, dap[case_id].labels("anatomy").values)
    finally:
        stop_server(server)
