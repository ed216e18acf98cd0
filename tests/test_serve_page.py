"""The web page of ``ctzarr serve`` in a real browser: Debian's chromium driven by playwright.

A live server runs as a subprocess (``python -m ctzarr.cli serve STORE --port P``) on a small
converted phantom; the page is loaded in headless chromium (``executable_path``: playwright
never downloads a browser) and every request it makes is recorded, to check it asks no other
host for anything. The numbers the page shows are compared with the library's: the slice it
jumps to is the one through the structure's centroid, the crop it downloads equals
``case.crop``. Neuroglancer (its own server, started by the service) must draw the image.

With ``CTZARR_UPDATE_SCREENSHOTS=1`` the screenshots are written to ``docs/screenshots/`` (the
README shows them); otherwise to the test's temporary folder.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import nibabel as nib
import numpy as np
import pytest

import ctzarr
from ctzarr.model.labels import LabelMap
from ctzarr.serve.neuroglancer import neuroglancer_state
from ctzarr.testing.phantom import write_dap_atlas

from .servers import unused_port

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytest.importorskip("fastapi", reason="the serve extra is not installed")
PIL_Image = pytest.importorskip("PIL.Image", reason="Pillow is not installed")

CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (.ci/run installs it; playwright must not "
    "download a browser)",
)

REPO = Path(__file__).resolve().parents[1]
SHOTS = REPO / "docs" / "screenshots"
COLLECTION = "dap_atlas"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def page_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("page") / "DAP_Atlas"
    write_dap_atlas(root, n_cases=3, shape_zyx=(64, 96, 96), seed=5)
    dest = root.parent / "dap.zarr"
    report = ctzarr.convert(root, dest, progress=False)
    assert report.ok, report
    return dest


@pytest.fixture(scope="module")
def server(page_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = unused_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ctzarr.cli", "serve", str(page_store), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ctzarr serve exited {proc.returncode}: {log.read_text()}")
            try:
                if httpx.get(base + "healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ctzarr serve not ready in 60 s: {log.read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            chromium.close()


class Recorder:
    """Every URL the pages of a browser context asked for, and the page errors."""

    def __init__(self, context: Any) -> None:
        self.urls: list[str] = []
        self.errors: list[str] = []
        context.on("request", lambda request: self.urls.append(request.url))
        context.on("page", self.watch)

    def watch(self, page: Any) -> None:
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def hosts(self) -> set[str]:
        """host:port of every request over the network (blob: and data: URLs are local)."""
        return {urlsplit(u).netloc for u in self.urls if urlsplit(u).scheme not in ("blob", "data")}


@pytest.fixture
def context(browser: Any) -> Iterator[tuple[Any, Recorder]]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    recorder = Recorder(ctx)
    try:
        yield ctx, recorder
    finally:
        ctx.close()


def _shot_path(tmp_path: Path, name: str) -> Path:
    if os.environ.get("CTZARR_UPDATE_SCREENSHOTS") == "1":
        SHOTS.mkdir(parents=True, exist_ok=True)
        return SHOTS / name
    return tmp_path / name


def _slice_pixels(page: Any) -> np.ndarray:
    """The RGB pixels of the slice PNG the page shows (decoded by the browser, at PNG size)."""
    data = page.evaluate(
        """() => {
        const img = document.getElementById("slice-img");
        const c = document.createElement("canvas");
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext("2d");
        g.drawImage(img, 0, 0);
        return {w: c.width, h: c.height, px: Array.from(g.getImageData(0, 0, c.width, c.height).data)};
    }"""
    )
    return np.asarray(data["px"], dtype=np.uint8).reshape(data["h"], data["w"], 4)[:, :, :3]


def _wait_ready(page: Any, **params: str) -> dict[str, Any]:
    """Wait until the viewer shows a slice whose URL has these query values; its geometry."""
    page.wait_for_function(
        """(params) => {
        const v = document.querySelector('[data-testid=viewer]');
        if (v.dataset.state !== 'ready' || !v.dataset.src) return false;
        const q = new URL(v.dataset.src, location.href).searchParams;
        return Object.entries(params).every(([k, val]) => val === null ? !q.has(k) : q.get(k) === val);
    }""",
        arg=params,
        timeout=TIMEOUT_MS,
    )
    plane = page.get_attribute("[data-testid=viewer]", "data-plane")
    index = page.get_attribute("[data-testid=slice-index]", "data-index")
    assert plane is not None
    assert index is not None
    return {"plane": plane, "index": int(index)}


def _centroid_index(case: Any, row: Any, world_axis: int) -> tuple[int, int]:
    """(stored dim, index) of the slice through a stats row's centroid, normal to a world axis:
    the centroid in voxels by the inverse affine, the dim whose direction is that world axis,
    ``floor(coordinate + 0.5)``."""
    affine = np.asarray(case.affine, dtype=float)
    ijk = np.linalg.solve(
        affine[:3, :3], [row.centroid_x, row.centroid_y, row.centroid_z] - affine[:3, 3]
    )
    axis_ijk = int(np.argmax(np.abs(affine[world_axis, :3])))
    return 2 - axis_ijk, math.floor(ijk[axis_ijk] + 0.5)


def _assert_local(recorder: Recorder, *allowed: str) -> None:
    assert recorder.urls, "no request recorded"
    others = recorder.hosts() - set(allowed)
    assert not others, f"the page asked other hosts: {sorted(others)}"
    assert not recorder.errors, recorder.errors


@needs_chromium
def test_cohort_table_plot_and_open_case(
    server: str, page_store: Path, context: tuple[Any, Recorder], tmp_path: Path
) -> None:
    ctx, recorder = context
    col = ctzarr.open_collection(page_store)
    page = ctx.new_page()
    page.goto(server)
    page.wait_for_selector("[data-testid=case-row]", timeout=TIMEOUT_MS)
    rows = page.locator("[data-testid=case-row]")
    assert rows.count() == len(col.case_ids)
    ids = [rows.nth(i).get_attribute("data-case-id") or "" for i in range(rows.count())]
    assert sorted(ids) == sorted(col.case_ids)
    first = rows.nth(0).inner_text()
    case0 = col[ids[0]]
    assert " \N{MULTIPLICATION SIGN} ".join(str(n) for n in case0.shape) in first

    # sort: a second click on the id column reverses the order
    page.locator("[data-testid=case-column]", has_text="case_id").click()
    rows = page.locator("[data-testid=case-row]")
    assert [rows.nth(i).get_attribute("data-case-id") for i in range(rows.count())] == ids[::-1]
    # filter: a part of one id leaves that case only
    page.fill("[data-testid=case-filter]", ids[1][-6:])
    rows = page.locator("[data-testid=case-row]")
    assert rows.count() == 1
    assert rows.nth(0).get_attribute("data-case-id") == ids[1]
    page.fill("[data-testid=case-filter]", "")

    # the cohort plot: one point per case holding the structure, at its volume and HU mean
    page.select_option("[data-testid=plot-structure]", "liver")
    page.wait_for_selector("[data-testid=plot-point]", timeout=TIMEOUT_MS)
    stats = col.stats(structures=["liver"])
    present = stats[stats.voxel_count > 0]
    points = page.locator("[data-testid=plot-point]")
    assert sorted(
        points.nth(i).get_attribute("data-case-id") or "" for i in range(points.count())
    ) == sorted(present.case_id)
    page.screenshot(path=str(_shot_path(tmp_path, "cohort.png")))

    # a point opens its case
    target = str(present.case_id.iloc[-1])
    page.locator(f"[data-testid=plot-point][data-case-id='{target}']").click()
    page.wait_for_selector("[data-testid=case-view]:not([hidden])", timeout=TIMEOUT_MS)
    assert page.inner_text("[data-testid=case-title]") == target
    _wait_ready(page, plane="axial")
    _assert_local(recorder, urlsplit(server).netloc)


@needs_chromium
def test_case_view_structure_overlay_plane(
    server: str, page_store: Path, context: tuple[Any, Recorder], tmp_path: Path
) -> None:
    ctx, recorder = context
    col = ctzarr.open_collection(page_store)
    case_id = col.case_ids[0]
    case = col[case_id]
    page = ctx.new_page()
    page.goto(server)
    page.wait_for_selector("[data-testid=case-row]", timeout=TIMEOUT_MS)
    page.locator(f"[data-testid=case-row][data-case-id='{case_id}']").click()
    _wait_ready(page, plane="axial", overlay="anatomy")
    page.wait_for_selector("[data-testid=structure-item]", timeout=TIMEOUT_MS)

    # the structure list: name, volume and HU mean of every structure present
    stats = case.stats()
    stats = stats[stats.voxel_count > 0]
    items = page.locator("[data-testid=structure-item]")
    assert items.count() == len(stats)
    assert sorted(
        items.nth(i).get_attribute("data-structure") or "" for i in range(items.count())
    ) == sorted(stats.structure)

    # a click jumps to the slice through the structure's centroid (library's centroid)
    row = stats.set_index("structure").loc["liver"]
    page.locator("[data-testid=structure-item][data-structure='liver']").click()
    shown = _wait_ready(page, plane="axial", at="liver")
    dim, expected = _centroid_index(case, row, world_axis=2)
    assert shown["index"] == expected
    assert page.inner_text("[data-testid=slice-index]").split()[:2] == ["zyx"[dim], str(expected)]

    # the overlay on and off: the pixels change; off, the slice is grey only
    with_overlay = _slice_pixels(page)
    assert (with_overlay.max(axis=2) != with_overlay.min(axis=2)).any(), "no label colour drawn"
    page.locator("[data-testid=overlay-toggle]").uncheck()
    _wait_ready(page, plane="axial", overlay=None, index=str(expected))
    grey = _slice_pixels(page)
    assert grey.shape == with_overlay.shape
    assert (grey != with_overlay).any()
    assert (grey.max(axis=2) == grey.min(axis=2)).all(), "colour without the overlay"
    page.locator("[data-testid=overlay-toggle]").check()
    _wait_ready(page, plane="axial", overlay="anatomy", index=str(expected))

    # arrow keys and the wheel move the slice
    page.locator("[data-testid=viewer]").focus()
    page.keyboard.press("ArrowUp")
    assert _wait_ready(page, plane="axial", index=str(expected + 1))["index"] == expected + 1
    page.locator("[data-testid=viewer]").hover()
    page.mouse.wheel(0, 120)
    assert _wait_ready(page, plane="axial", index=str(expected))["index"] == expected

    # hover: the voxel under the cursor and its world position
    box = page.locator("#slice-img").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.wait_for_function(
        "() => document.querySelector('[data-testid=hover-info]').dataset.voxel", timeout=TIMEOUT_MS
    )
    zyx = json.loads(page.get_attribute("[data-testid=hover-info]", "data-voxel") or "null")
    assert zyx[dim] == expected
    world = np.asarray(case.affine, dtype=float) @ [zyx[2], zyx[1], zyx[0], 1.0]
    text = page.inner_text("[data-testid=hover-info]")
    assert "world ({}) mm".format(", ".join(f"{w:.1f}" for w in world[:3])) in text
    probe = httpx.get(f"{server}api/v1/collections/{COLLECTION}/cases/{case_id}/voxel?z=0&y=0&x=0")
    if probe.status_code == 200:  # the service has the voxel endpoint: the CT value under it
        page.wait_for_function(
            """() => { const d = document.querySelector('[data-testid=hover-info]').dataset;
                       return d.hu !== undefined && d.huVoxel === d.voxel; }""",
            timeout=TIMEOUT_MS,
        )
        hu = page.get_attribute("[data-testid=hover-info]", "data-hu")
        assert hu is not None
        image = np.asarray(case.image.values)
        assert float(hu) == float(image[tuple(zyx)])
        value = int(np.asarray(case.labels("anatomy").values)[tuple(zyx)])
        if value != 0:
            name = col.segmentations["anatomy"][value].name
            assert f"anatomy: {name}" in page.inner_text("[data-testid=hover-info]")

    page.screenshot(path=str(_shot_path(tmp_path, "case.png")))

    # W/L by drag: 50 px to the right widens the window by 200 HU, 10 px up raises the level 20
    x0, y0 = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + 50, y0 - 10, steps=5)
    page.mouse.up()
    _wait_ready(page, plane="axial", window="600,60")
    assert page.input_value("[data-testid=window-select]") == "custom"
    page.select_option("[data-testid=window-select]", "1500,-600")  # the OHIF lung preset
    _wait_ready(page, plane="axial", window="1500,-600")

    # another plane: the coronal slice through the same centroid
    page.select_option("[data-testid=plane-select]", "coronal")
    shown = _wait_ready(page, plane="coronal", at="liver")
    dim_c, expected_c = _centroid_index(case, row, world_axis=1)
    assert shown["index"] == expected_c
    assert page.inner_text("[data-testid=slice-index]").split()[0] == "zyx"[dim_c]

    # the crop download of the selected structure equals the library's crop
    with page.expect_download(timeout=TIMEOUT_MS) as download:
        page.locator("[data-testid=crop-download]").click()
    path = tmp_path / "crop.nii.gz"
    download.value.save_as(path)
    crop = case.crop("liver", margin_mm=10)
    got = nib.load(path)
    got_zyx = np.asanyarray(got.dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(got_zyx, np.asarray(crop["image"].values))
    np.testing.assert_allclose(got.affine, np.asarray(crop.attrs["affine"]), rtol=0, atol=1e-6)
    _assert_local(recorder, urlsplit(server).netloc)


@needs_chromium
def test_open_in_neuroglancer_draws_the_image(
    server: str, page_store: Path, context: tuple[Any, Recorder], tmp_path: Path
) -> None:
    pytest.importorskip(
        "neuroglancer", reason="neuroglancer (extra ctzarr[neuroglancer]) is absent"
    )
    ctx, recorder = context
    col = ctzarr.open_collection(page_store)
    case_id = col.case_ids[0]
    page = ctx.new_page()
    page.goto(f"{server}#/{COLLECTION}/case/{case_id}")
    _wait_ready(page, plane="axial")
    with ctx.expect_page(timeout=TIMEOUT_MS) as opened:
        page.locator("[data-testid=open-neuroglancer]").click()
    ng = opened.value
    ng.wait_for_load_state()
    ng_host = urlsplit(ng.url).netloc
    assert urlsplit(ng.url).hostname == "127.0.0.1"
    ng.set_viewport_size({"width": 1000, "height": 800})

    # the image is drawn: the middle of the first data panel (where the volume is, away from
    # the scale bar and the axis legend) shows the CT blended with the labels, many colours;
    # a viewer whose layers fail to load shows one flat colour there
    panel = ng.locator(".neuroglancer-rendered-data-panel").first
    deadline = time.monotonic() + 60
    colours = 0
    while time.monotonic() < deadline:
        rgb = np.asarray(PIL_Image.open(io.BytesIO(panel.screenshot())).convert("RGB"))
        rows, cols = rgb.shape[:2]
        middle = rgb[int(rows * 0.3) : int(rows * 0.7), int(cols * 0.3) : int(cols * 0.7)]
        colours = len(np.unique(middle.reshape(-1, 3), axis=0))
        if colours >= 50:
            break
        time.sleep(0.5)
    ng.screenshot(path=str(_shot_path(tmp_path, "neuroglancer.png")))
    assert colours >= 50, f"Neuroglancer drew {colours} colours only"
    # the voxels came through the service's /zarr, and no other host was asked
    assert any(f"/zarr/{COLLECTION}/cases/{case_id}/" in u for u in recorder.urls)
    _assert_local(recorder, urlsplit(server).netloc, ng_host)


def test_neuroglancer_state_reads_the_case_through_zarr(page_store: Path) -> None:
    col = ctzarr.open_collection(page_store)
    case_id = col.case_ids[1]
    case = col[case_id]
    zarr_url = f"http://127.0.0.1:8000/zarr/{COLLECTION}/"
    state = neuroglancer_state(col, case_id, zarr_url=zarr_url, window=(1500.0, -600.0))
    layers = {layer["name"]: layer for layer in state["layers"]}
    base = f"zarr3://http://127.0.0.1:8000/zarr/{COLLECTION}/cases/{case_id}"
    assert layers["image"]["source"] == f"{base}/"
    assert "range=[-1350, 150]" in layers["image"]["shader"]  # lung: level -+ width / 2
    assert set(layers) == {"image", *case.segmentation_names}
    for seg in case.segmentation_names:
        layer = layers[seg]
        assert layer["type"] == "segmentation"
        assert layer["source"] == f"{base}/labels/{seg}/"
        label_map: LabelMap = col.segmentations[seg]
        present = [int(v) for v in case.index(seg).labels if v != label_map.background]
        assert layer["segments"] == [str(v) for v in present]
        rgba = {lab.value: lab.rgba for lab in label_map.labels}
        assert layer["segmentColors"] == {
            str(v): "#{:02x}{:02x}{:02x}".format(*rgba[v][:3]) for v in present
        }
    assert state["dimensions"] == {axis: [0.001, "m"] for axis in "xyz"}
