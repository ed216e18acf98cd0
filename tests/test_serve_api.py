"""``ctzarr serve``: the JSON API of a live server (a subprocess on a free port), with httpx.

Every answer is compared with what the library gives in-process (``col.stats``, ``case.crop``
exported and read back by nibabel, ``case.profile``, the case list); the slice PNG with the
window applied to nibabel's own array. Then the safety rules: problem details that leak no path,
401 without the token, 413 before any voxel is read (the store's image chunks are deleted, and
the answer is still 413), 422 for bad parameters, a refused non-loopback bind, SIGTERM.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import ctzarr

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
PIL_Image = pytest.importorskip("PIL.Image")

from tests.conftest import nifti_zyx  # noqa: E402

MAX_CROP_VOXELS = 50_000


@dataclass
class Server:
    base: str
    proc: subprocess.Popen[str]


def start_server(*args: str, env: dict[str, str] | None = None) -> Server:
    """``ctzarr serve ARGS --port 0``; returns once the ready line names the port."""
    # the server's log goes to a file: an unread pipe would fill and stall it
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctzarr.cli", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until ready (or the process ends)
    if not line.startswith("ctzarr: serving"):
        proc.kill()
        proc.wait(timeout=10)
        log.seek(0)
        raise AssertionError(f"server did not start: {line!r} {log.read()[-2000:]}")
    return Server(line.rsplit(" at ", 1)[1].strip().rstrip("/"), proc)


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="module")
def broken_store(dap_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the DAP store whose first case has lost its image chunks."""
    dest = tmp_path_factory.mktemp("broken") / "broken.zarr"
    shutil.copytree(dap_store, dest)
    first = ctzarr.open_collection(dest).case_ids[0]
    shutil.rmtree(dest / "cases" / first / "0" / "c")
    return dest


@pytest.fixture(scope="module")
def server(dap_store: Path, saros_store: Path, broken_store: Path) -> Iterator[Server]:
    srv = start_server(
        str(dap_store),
        str(saros_store),
        str(broken_store),
        "--name", "dap", "--name", "saros", "--name", "broken",
        "--max-crop-voxels", str(MAX_CROP_VOXELS),
    )  # fmt: skip
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def dap(dap_store: Path) -> ctzarr.Collection:
    return ctzarr.open_collection(dap_store)


@pytest.fixture(scope="module")
def saros(saros_store: Path) -> ctzarr.Collection:
    return ctzarr.open_collection(saros_store)


API = "/api/v1/collections"


def assert_problem(r: httpx.Response, status: int, *leaks: str) -> dict[str, object]:
    """A problem detail of this status, with no traceback and none of ``leaks`` in it."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert set(body) >= {"type", "title", "status", "detail"}
    assert body["status"] == status
    for leak in (*leaks, "Traceback", 'File "', os.sep + "tmp" + os.sep):
        assert leak not in r.text, (leak, r.text)
    return body


def test_ready_line_and_healthz(http: httpx.Client) -> None:
    r = http.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "collections": 3}


def test_collections(http: httpx.Client, dap: ctzarr.Collection) -> None:
    items = {c["name"]: c for c in http.get(f"{API}").json()["items"]}
    assert list(items) == ["dap", "saros", "broken"]
    assert items["dap"]["dataset"] == dap.dataset_id
    assert items["dap"]["case_count"] == len(dap)
    assert items["dap"]["segmentations"] == list(dap.segmentations)
    assert items["dap"]["format_version"] == dap.meta.format_version
    liver = dap.segmentations["anatomy"].resolve("liver")
    labels = {lab["label"]: lab for lab in items["dap"]["label_maps"]["anatomy"]["labels"]}
    assert labels[liver.value] == {
        "label": liver.value,
        "structure": liver.name,
        "rgba": list(liver.rgba),
    }


def test_case_list_is_paged(http: httpx.Client, saros: ctzarr.Collection) -> None:
    whole = http.get(f"{API}/saros/cases").json()
    assert whole["total"] == len(saros)
    assert [c["case_id"] for c in whole["items"]] == saros.case_ids
    first = saros[saros.case_ids[0]]
    item = whole["items"][0]
    assert item["shape"] == list(first.shape)
    assert item["spacing_mm"] == list(first.spacing)
    assert item["metadata"] == first.attributes  # the SAROS case CSV row
    assert item["orientation"] == "".join(reversed(nib.aff2axcodes(first.affine)))
    page = http.get(f"{API}/saros/cases", params={"limit": 1, "offset": 1}).json()
    assert [c["case_id"] for c in page["items"]] == saros.case_ids[1:2]
    assert page["total"] == len(saros)
    assert_problem(http.get(f"{API}/saros/cases", params={"limit": 1001}), 422)
    assert_problem(http.get(f"{API}/saros/cases", params={"limit": 0}), 422)


def test_case_detail_from_the_index(http: httpx.Client, dap: ctzarr.Collection) -> None:
    case = dap[dap.case_ids[1]]
    body = http.get(f"{API}/dap/cases/{case.case_id}").json()
    assert np.array_equal(np.asarray(body["affine"]), case.affine)
    assert body["shape"] == list(case.shape)
    assert body["segmentations"] == case.segmentation_names
    idx = case.index("anatomy")
    lm = dap.segmentations["anatomy"]
    expected = {int(v): int(n) for v, n in zip(idx.labels, idx.voxel_count, strict=True) if v != 0}
    assert {s["label"]: s["voxel_count"] for s in body["structures"]} == expected
    liver = next(s for s in body["structures"] if s["structure"] == "liver")
    assert liver["rgba"] == list(lm.resolve("liver").rgba)


def _frame(items: list[dict[str, object]], like: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(items, columns=list(like.columns))


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"structures": "liver,spleen"},
        {"structures": ["liver", "kidney left"], "method": "scan"},
    ],
    ids=["all", "comma-separated", "repeated-keys-scan"],
)
def test_stats_json_equals_library(
    http: httpx.Client, dap: ctzarr.Collection, params: dict[str, object]
) -> None:
    raw = params.get("structures")
    structures = raw.split(",") if isinstance(raw, str) else raw
    expected = dap.stats(structures=structures, method=str(params.get("method", "index")))
    r = http.get(f"{API}/dap/stats", params=params)  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    got = _frame(r.json()["items"], expected)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_exact=True)


def test_stats_csv_and_parquet(http: httpx.Client, dap: ctzarr.Collection) -> None:
    expected = dap.stats(structures=["liver"], cases=dap.case_ids[:2])
    params = {"structures": "liver", "cases": ",".join(dap.case_ids[:2])}
    r = http.get(f"{API}/dap/stats", params=params, headers={"Accept": "text/csv"})
    assert r.headers["content-type"].startswith("text/csv")
    pd.testing.assert_frame_equal(
        pd.read_csv(io.StringIO(r.text)), expected, check_dtype=False, check_exact=True
    )
    r = http.get(f"{API}/dap/stats", params={**params, "format": "parquet"})
    assert r.headers["content-type"] == "application/vnd.apache.parquet"
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(r.content)), expected)


def test_stats_within(http: httpx.Client, saros: ctzarr.Collection) -> None:
    expected = saros.stats(segmentation="body_regions", within="body_parts:torso")
    r = http.get(
        f"{API}/saros/stats",
        params={"segmentation": "body_regions", "within": "body_parts:torso"},
    )
    assert r.status_code == 200, r.text
    got = _frame(r.json()["items"], expected)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_exact=True)


def test_crop_nifti_equals_library_export(
    http: httpx.Client, dap: ctzarr.Collection, tmp_path: Path
) -> None:
    case = dap[dap.case_ids[0]]
    written = case.crop_to_nifti("liver", tmp_path / "liver.nii.gz", margin_mm=4)
    crop = case.crop("liver", margin_mm=4, lazy=False)
    for part in ("image", "labels"):
        r = http.get(
            f"{API}/dap/cases/{case.case_id}/crop",
            params={"structure": "liver", "margin_mm": 4, "part": part},
        )
        assert r.status_code == 200, r.text
        got = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
        ref = nib.load(written[part])
        values = np.asanyarray(got.dataobj)
        assert np.array_equal(values, np.asanyarray(ref.dataobj))
        assert values.dtype == np.asanyarray(ref.dataobj).dtype
        assert np.array_equal(values.transpose(2, 1, 0), crop[part].values)
        assert np.array_equal(got.affine, ref.affine)
        assert np.array_equal(got.affine, crop.attrs["affine"])
        assert got.header["qform_code"] == ref.header["qform_code"]
        assert got.header["sform_code"] == ref.header["sform_code"]


def test_crop_npy_with_affine_header(http: httpx.Client, dap: ctzarr.Collection) -> None:
    case = dap[dap.case_ids[2]]
    crop = case.crop("kidney left", margin_mm=2.5, lazy=False)
    r = http.get(
        f"{API}/dap/cases/{case.case_id}/crop",
        params={"structure": "kidney_left", "margin_mm": 2.5, "format": "npy", "part": "labels"},
    )
    assert r.status_code == 200, r.text
    values = np.load(io.BytesIO(r.content), allow_pickle=False)
    assert np.array_equal(values, crop.labels.values)
    assert values.dtype == crop.labels.dtype
    assert np.array_equal(np.asarray(json.loads(r.headers["ctzarr-affine"])), crop.attrs["affine"])
    assert json.loads(r.headers["ctzarr-box-zyx"]) == crop.attrs["box_zyx"]


def test_crop_too_large_is_refused_before_any_read(http: httpx.Client, broken_store: Path) -> None:
    col = ctzarr.open_collection(broken_store)
    case = col[col.case_ids[0]]
    _, _, box = case.crop_box("liver", 1000)
    assert math.prod(s.stop - s.start for s in box) > MAX_CROP_VOXELS
    url = f"{API}/broken/cases/{case.case_id}/crop"
    # the image chunks are gone: a read would fail, so a 413 proves nothing was read
    body = assert_problem(
        http.get(url, params={"structure": "liver", "margin_mm": 1000}), 413, str(broken_store)
    )
    assert str(MAX_CROP_VOXELS) in str(body["detail"])
    # a crop within the bound reads, and the missing chunk is a 5xx problem naming no path
    assert_problem(http.get(url, params={"structure": "liver"}), 500, str(broken_store))


def test_profile_equals_library(http: httpx.Client, saros: ctzarr.Collection) -> None:
    case = saros[saros.case_ids[0]]
    expected = case.profile("muscle")
    r = http.get(f"{API}/saros/cases/{case.case_id}/profile", params={"structure": "muscle"})
    assert r.status_code == 200, r.text
    got = _frame(r.json()["items"], expected)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_exact=True)


def _png(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return np.asarray(PIL_Image.open(io.BytesIO(r.content)).convert("RGB"))


@pytest.mark.parametrize("index", [0, 1, 30, 63, 64, 69])
def test_slice_png_is_the_windowed_nibabel_slice(
    http: httpx.Client, dap: ctzarr.Collection, dap_source: Path, index: int
) -> None:
    """Exact pixels, on both sides of an inner-chunk boundary along z (slices come from the
    server's slab cache)."""
    case = dap[dap.case_ids[0]]
    assert case.shape[0] == 70
    url = f"{API}/dap/cases/{case.case_id}/slice.png"
    r = http.get(url, params={"plane": "axial", "index": index, "window": "400,40"})
    pixels = _png(r)
    geometry = json.loads(r.headers["ctzarr-slice"])
    assert geometry["dim"] == "z"
    assert geometry["index"] == index
    volume = nifti_zyx(dap_source / "images" / f"{case.case_id}.nii.gz")
    # radiological: rows run anterior -> posterior, columns right -> left (the phantom is RAS)
    assert np.all(np.diag(case.affine)[:3] > 0)
    assert case.spacing[1] == case.spacing[2]  # square in-plane voxels: no resampling
    expected_slice = volume[index][::-1, ::-1].astype(np.float32)
    grey = np.clip((expected_slice - np.float32(-160.0)) * np.float32(255.0 / 400.0), 0, 255)
    expected = (grey + np.float32(0.5)).astype(np.uint8)
    assert pixels.shape == (*expected.shape, 3)
    for channel in range(3):
        assert np.array_equal(pixels[:, :, channel], expected)


def test_slice_png_overlay_at_and_planes(http: httpx.Client, dap: ctzarr.Collection) -> None:
    case = dap[dap.case_ids[0]]
    url = f"{API}/dap/cases/{case.case_id}/slice.png"
    idx = case.index("anatomy")
    row = int(np.flatnonzero(idx.labels == dap.segmentations["anatomy"].resolve("liver").value)[0])
    for plane, dim in (("axial", 0), ("coronal", 1), ("sagittal", 2)):
        r = http.get(url, params={"plane": plane, "at": "liver", "window": "liver"})
        mean = idx.coord_sum[row, dim] / idx.voxel_count[row]
        assert json.loads(r.headers["ctzarr-slice"])["index"] == math.floor(mean + 0.5)
        plain = _png(r)
        with_overlay = _png(
            http.get(
                url,
                params={"plane": plane, "at": "liver", "window": "liver", "overlay": "anatomy"},
            )
        )
        only_liver = _png(
            http.get(
                url,
                params={"plane": plane, "at": "liver", "window": "liver", "structures": "liver"},
            )
        )
        assert plain.shape == with_overlay.shape == only_liver.shape
        assert (plain != with_overlay).any()
        assert (plain != only_liver).any()
        assert (only_liver != with_overlay).any()
        # coronal and sagittal: 3 mm slices shown as 0.98 mm square pixels
        if plane != "axial":
            assert plain.shape[0] == round(case.shape[0] * case.spacing[0] / case.spacing[1])


def test_voxel_equals_nibabel(
    http: httpx.Client, saros: ctzarr.Collection, saros_source: Path
) -> None:
    """The hover's voxel: the CT value and each segmentation's label, as nibabel reads them
    (SAROS: an ignore slice's 255 is no structure)."""
    case = saros[saros.case_ids[0]]
    folder = saros_source / case.case_id
    image = nifti_zyx(folder / "image.nii.gz")
    maps = {
        "body_regions": nifti_zyx(folder / "body-regions.nii.gz"),
        "body_parts": nifti_zyx(folder / "body-parts.nii.gz"),
    }
    nz, ny, nx = image.shape
    for zyx in [(0, 0, 0), (nz // 2, ny // 2, nx // 2), (nz - 1, ny - 1, nx - 1), (5, ny // 2, 3)]:
        z, y, x = zyx
        r = http.get(f"{API}/saros/cases/{case.case_id}/voxel", params={"z": z, "y": y, "x": x})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["hu"] == image[zyx].item()
        for seg, volume in maps.items():
            value = int(volume[zyx])
            lm = saros.segmentations[seg]
            name = None if value in (lm.background, lm.ignore_value) else lm[value].name
            assert got["labels"][seg] == {"label": value, "structure": name}
    r = http.get(f"{API}/saros/cases/{case.case_id}/voxel", params={"z": nz, "y": 0, "x": 0})
    assert_problem(r, 422)


def test_slice_png_opacity(http: httpx.Client, dap: ctzarr.Collection) -> None:
    case = dap[dap.case_ids[0]]
    url = f"{API}/dap/cases/{case.case_id}/slice.png"
    base = {"at": "liver", "overlay": "anatomy"}
    none = _png(http.get(url, params={**base, "opacity": 0}))
    plain = _png(http.get(url, params={"at": "liver"}))
    half = _png(http.get(url, params={**base, "opacity": 0.5}))
    assert np.array_equal(none, plain)
    assert (half != plain).any()
    assert_problem(http.get(url, params={**base, "opacity": 1.5}), 422)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("slice.png", {"plane": "oblique"}),
        ("slice.png", {"index": 10_000}),
        ("slice.png", {"index": -1}),
        ("slice.png", {"window": "nonsense"}),
        ("slice.png", {"window": "-400,40"}),
        ("slice.png", {"index": 3, "at": "liver"}),
        ("slice.png", {"index": "three"}),
        ("crop", {}),
        ("crop", {"structure": "liver", "margin_mm": -1}),
        ("crop", {"structure": "liver", "part": "both"}),
        ("crop", {"structure": "liver", "format": "tiff"}),
        ("profile", {"structure": "liver", "method": "guess"}),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else v,
)
def test_bad_parameters_are_422(
    http: httpx.Client, dap: ctzarr.Collection, path: str, params: dict[str, object]
) -> None:
    url = f"{API}/dap/cases/{dap.case_ids[0]}/{path}"
    assert_problem(http.get(url, params=params), 422)  # type: ignore[arg-type]


def test_bad_stats_parameters(http: httpx.Client) -> None:
    assert_problem(http.get(f"{API}/dap/stats", params={"method": "guess"}), 422)
    assert_problem(http.get(f"{API}/dap/stats", params={"within": "nocolon"}), 422)
    assert_problem(http.get(f"{API}/dap/stats", params={"format": "xlsx"}), 422)


def test_unknown_names_are_404_with_close_matches(
    http: httpx.Client, dap: ctzarr.Collection, dap_store: Path
) -> None:
    body = assert_problem(http.get(f"{API}/dapp/cases"), 404)
    assert "dap" in str(body["detail"])
    cid = dap.case_ids[0]
    body = assert_problem(http.get(f"{API}/dap/cases/{cid}x"), 404, str(dap_store))
    assert cid in str(body["detail"])
    body = assert_problem(
        http.get(f"{API}/dap/cases/{cid}/crop", params={"structure": "livr"}),
        404,
        str(dap_store),
    )
    assert "liver" in str(body["detail"])
    assert_problem(http.get(f"{API}/dap/stats", params={"cases": "nope"}), 404)
    assert_problem(http.get(f"{API}/dap/stats", params={"structures": "kidneyy"}), 404)
    assert_problem(http.get(f"{API}/dap/cases/{cid}/slice.png", params={"overlay": "x"}), 404)
    assert_problem(http.get("/api/v1/nothing"), 404)


def test_openapi_and_offline_docs(http: httpx.Client) -> None:
    schema = http.get("/api/v1/openapi.json").json()
    paths = set(schema["paths"])
    for p in (
        "/api/v1/collections",
        "/api/v1/collections/{name}/cases",
        "/api/v1/collections/{name}/cases/{case_id}",
        "/api/v1/collections/{name}/stats",
        "/api/v1/collections/{name}/cases/{case_id}/crop",
        "/api/v1/collections/{name}/cases/{case_id}/slice.png",
        "/api/v1/collections/{name}/cases/{case_id}/profile",
    ):
        assert p in paths
    docs = http.get("/api/v1/docs")
    assert docs.status_code == 200
    assert "/api/v1/collections/{name}/stats" in docs.text
    assert "<script" not in docs.text
    assert "cdn" not in docs.text.lower()
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")


def test_token_sigterm_and_bind_policy(dap_store: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("  s3cret-token\n")
    srv = start_server(str(dap_store), "--token-file", str(token_file))
    try:
        with httpx.Client(base_url=srv.base, timeout=30) as client:
            assert client.get("/healthz").status_code == 200  # no token needed
            r = client.get(API)
            assert_problem(r, 401, "s3cret")
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert_problem(client.get(API, headers={"Authorization": "Bearer wrong"}), 401)
            assert_problem(client.get("/zarr/dap_atlas/zarr.json"), 401)
            ok = client.get(API, headers={"Authorization": "Bearer s3cret-token"})
            assert ok.status_code == 200
            # a browser: /?token= once, then the cookie
            first = client.get("/", params={"token": "s3cret-token"})
            assert first.status_code == 303
            assert client.get(API).status_code == 200
    finally:
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(timeout=10)
        elapsed = time.monotonic() - t0
    assert elapsed <= 5.0, elapsed
    # uvicorn drains, then ends by the signal it caught (as the shell expects of SIGTERM)
    assert code in (0, -signal.SIGTERM)

    for host in ("0.0.0.0", "192.0.2.1"):
        run = subprocess.run(
            [sys.executable, "-m", "ctzarr.cli", "serve", str(dap_store), "--host", host],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 1
        assert run.stdout == ""
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1
        assert "--token-file" in lines[0]
        assert "--no-auth" in lines[0]


def test_open_in_neuroglancer_redirects_to_a_local_viewer(
    http: httpx.Client, dap: ctzarr.Collection
) -> None:
    url = f"{API}/dap/cases/{dap.case_ids[0]}/neuroglancer"
    assert_problem(http.get(f"{API}/dap/cases/nope/neuroglancer"), 404)
    assert_problem(http.get(url, params={"window": "nonsense"}), 422)
    r = http.get(url, params={"window": "bone"})
    try:
        import neuroglancer  # noqa: F401 - optional: the extra ctzarr[neuroglancer]
    except ImportError:
        assert_problem(r, 501)
        return
    assert r.status_code == 307, r.text
    target = httpx.URL(r.headers["location"])
    assert target.host == "127.0.0.1"
    assert target.path.startswith("/v/")
