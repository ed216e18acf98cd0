"""Service benchmark of ``ctzarr serve``: every target against a baseline measured in the same run.

Usage::

    python benchmarks/bench_serve.py [--data DIR] [--quick] [--duration S] [--clients N]

Data: a DAP-layout phantom (``ctzarr.testing.phantom.write_dap_atlas``), 2 cases of
(z, y, x) = (96, 512, 512) (``--quick``: (48, 512, 512)), converted once into
``<data>/serve/dap.zarr`` (a re-run reuses it). The server runs as a subprocess
(``python -m ctzarr.cli serve STORE --port 0``), as users run it; clients are httpx.

What is measured (p50 over ``--repeats`` requests after 3 warm-up requests):

1. crop endpoint (``kidney left`` + 10 mm, ``format=npy``, image part) against the in-process
   ``case.crop(..., lazy=False)`` of the same box, both timed in turn in the same run;
   target: endpoint p50 <= in-process p50 + 5 ms;
2. ``slice.png`` of a 512 x 512 axial slice with the label overlay; target p50 <= 30 ms; the
   in-process render of the same slice is shown beside it;
3. load: ``--clients`` concurrent clients for ``--duration`` s, each looping over case detail,
   cohort stats of one structure, slice.png, a small crop, and a /zarr shard-index range read;
   targets: zero errors, p99 <= 10 x p50, server RSS growth <= 50 MB from the end of a warm-up
   of the same load to the end of the run;
4. /zarr throughput: every object of the store's image and label arrays fetched whole, by 4
   concurrent clients, from ``/zarr`` and from ``python -m http.server`` serving the same
   folder, in alternating rounds; target: ours >= 0.8 x the static server's MB/s.

Results: a Markdown table on stdout, ``<data>/serve/bench_serve.json``; copy the table into
``benchmarks/SERVE.md``. The machine's load weighs on both sides of every ratio alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO / "src"))

import ctzarr  # noqa: E402
from ctzarr.read.show import parse_window  # noqa: E402
from ctzarr.serve.render import render_slice  # noqa: E402
from ctzarr.testing.phantom import write_dap_atlas  # noqa: E402

TARGET_CROP_OVERHEAD_MS = 5.0
TARGET_SLICE_MS = 30.0
TARGET_P99_OVER_P50 = 10.0
TARGET_RSS_GROWTH_MB = 50.0
TARGET_ZARR_VS_STATIC = 0.8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prepare(data: Path, quick: bool) -> Path:
    shape = (48, 512, 512) if quick else (96, 512, 512)
    root = data / "serve" / f"z{shape[0]}"
    store = root / "dap.zarr"
    if not (store / "zarr.json").exists():
        write_dap_atlas(root / "src", n_cases=2, shape_zyx=shape, seed=11)
        report = ctzarr.convert(root / "src", store, progress=False)
        assert report.ok, report
    return store


def start_server(store: Path, *options: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ctzarr.cli",
            "serve",
            str(store),
            "--name",
            "dap",
            "--port",
            "0",
            *options,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ctzarr: serving"), line
    return proc, line.rsplit(" at ", 1)[1].strip().rstrip("/")


def p50_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def timed(func: Callable[[], Any], repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        func()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        out.append(time.perf_counter() - t0)
    return out


def bench_crop(col: Any, case_id: str, client: httpx.Client, repeats: int) -> dict[str, Any]:
    case = col[case_id]
    url = f"/api/v1/collections/dap/cases/{case_id}/crop"
    params = {"structure": "kidney left", "margin_mm": 10, "format": "npy"}

    def local() -> None:
        case.crop("kidney left", 10, lazy=False)

    def remote() -> None:
        r = client.get(url, params=params)
        r.raise_for_status()

    local_s: list[float] = []
    remote_s: list[float] = []
    for _ in range(3):  # interleaved rounds: the machine's load weighs on both alike
        local_s += timed(local, repeats // 3)
        remote_s += timed(remote, repeats // 3)
    box = case.crop_box("kidney left", 10)[2]
    return {
        "box_voxels": int(np.prod([s.stop - s.start for s in box])),
        "inprocess_p50_ms": p50_ms(local_s),
        "endpoint_p50_ms": p50_ms(remote_s),
    }


def bench_slice(
    col: Any, case_ids: list[str], client: httpx.Client, cold_client: httpx.Client, repeats: int
) -> dict[str, Any]:
    """slice.png of 512² axial slices with the overlay: stepping through neighbouring slices (a
    viewer scrolling: the server's slab cache holds the decoded chunks), and cold (a server
    started with ``--slab-cache-mb 0``: every slice read from the store, as the first look at a
    slab is), against the in-process render without cache."""
    case = col[case_ids[0]]
    depth = case.shape[0]
    params = {"plane": "axial", "window": "soft_tissue", "overlay": "anatomy"}
    win = parse_window("soft_tissue")
    # (case, slab start) pairs cycled round-robin: more slabs than the cache holds
    thick = int(case.array("0").chunks[0])
    cold_plan = [(cid, z) for z in range(0, depth, thick) for cid in case_ids]
    counter = {"scroll": 0, "cold": 0, "local": 0}

    def local() -> None:
        k = counter["local"] % depth
        counter["local"] += 1
        render_slice(case, plane="axial", index=k, window=win, overlay="anatomy")

    def scroll() -> None:
        k = counter["scroll"] % depth
        counter["scroll"] += 1
        url = f"/api/v1/collections/dap/cases/{case_ids[0]}/slice.png"
        client.get(url, params={**params, "index": k}).raise_for_status()

    def cold() -> None:
        cid, z = cold_plan[counter["cold"] % len(cold_plan)]
        counter["cold"] += 1
        url = f"/api/v1/collections/dap/cases/{cid}/slice.png"
        cold_client.get(
            url, params={**params, "index": min(z + thick // 2, depth - 1)}
        ).raise_for_status()

    local_s: list[float] = []
    scroll_s: list[float] = []
    cold_s: list[float] = []
    for _ in range(3):
        local_s += timed(local, repeats // 3)
        scroll_s += timed(scroll, repeats // 3)
        cold_s += timed(cold, repeats // 3)
    png = client.get(
        f"/api/v1/collections/dap/cases/{case_ids[0]}/slice.png", params={**params, "index": 0}
    )
    return {
        "pixels": json.loads(png.headers["ctzarr-slice"])["pixels"],
        "png_bytes": len(png.content),
        "inprocess_p50_ms": p50_ms(local_s),
        "scrolling_p50_ms": p50_ms(scroll_s),
        "cold_p50_ms": p50_ms(cold_s),
    }


async def _load(
    base: str, case_ids: list[str], shard_key: str, clients: int, seconds: float
) -> dict[str, Any]:
    requests: list[tuple[str, dict[str, Any], dict[str, str]]] = []
    for cid in case_ids:
        api = f"/api/v1/collections/dap/cases/{cid}"
        requests += [
            (api, {}, {}),
            ("/api/v1/collections/dap/stats", {"structures": "liver"}, {}),
            (f"{api}/slice.png", {"plane": "axial", "overlay": "anatomy"}, {}),
            (f"{api}/slice.png", {"plane": "coronal", "window": "bone"}, {}),
            (f"{api}/crop", {"structure": "kidney left", "format": "npy"}, {}),
            (f"/zarr/dap/{shard_key}", {}, {"Range": "bytes=-4096"}),
        ]
    latencies: list[float] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def worker(i: int) -> None:
            n = i
            while time.perf_counter() < deadline:
                path, params, headers = requests[n % len(requests)]
                n += 1
                t0 = time.perf_counter()
                try:
                    r = await client.get(path, params=params, headers=headers)
                    if r.status_code >= 400:
                        errors.append(f"{r.status_code} {path}")
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__} {path}")
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker(i) for i in range(clients)))
    lat = np.asarray(latencies)
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:5],
        "p50_ms": float(np.percentile(lat, 50) * 1000),
        "p99_ms": float(np.percentile(lat, 99) * 1000),
        "requests_per_s": len(latencies) / seconds,
    }


def bench_load(
    base: str, pid: int, case_ids: list[str], shard_key: str, clients: int, seconds: float
) -> dict[str, Any]:
    proc = psutil.Process(pid)
    asyncio.run(_load(base, case_ids, shard_key, clients, min(5.0, seconds)))  # warm-up
    rss0 = proc.memory_info().rss
    result = asyncio.run(_load(base, case_ids, shard_key, clients, seconds))
    rss1 = proc.memory_info().rss
    result["rss_after_warmup_mb"] = rss0 / 2**20
    result["rss_end_mb"] = rss1 / 2**20
    result["rss_growth_mb"] = (rss1 - rss0) / 2**20
    return result


async def _fetch_all(base: str, keys: list[str], concurrency: int) -> int:
    total = 0
    queue = list(keys)
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def worker() -> None:
            nonlocal total
            while queue:
                key = queue.pop()
                r = await client.get(key)
                r.raise_for_status()
                total += len(r.content)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total


def bench_zarr(base: str, store: Path, rounds: int) -> dict[str, Any]:
    files = [
        f.relative_to(store).as_posix()
        for f in sorted(store.rglob("*"))
        if f.is_file() and "/c/" in f.relative_to(store).as_posix()
    ]
    port = _free_port()
    static = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=store,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        static_base = f"http://127.0.0.1:{port}"
        for _ in range(100):  # wait until it listens
            try:
                httpx.get(f"{static_base}/zarr.json", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        ours_s = static_s = 0.0
        nbytes = 0
        for _ in range(rounds):
            t0 = time.perf_counter()
            nbytes = asyncio.run(_fetch_all(base, [f"/zarr/dap/{k}" for k in files], 4))
            ours_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            got = asyncio.run(_fetch_all(static_base, [f"/{k}" for k in files], 4))
            static_s += time.perf_counter() - t0
            assert got == nbytes
    finally:
        static.terminate()
        static.wait()
    mb = nbytes * rounds / 2**20
    return {
        "objects": len(files),
        "megabytes_per_round": nbytes / 2**20,
        "ours_mb_s": mb / ours_s,
        "static_mb_s": mb / static_s,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", type=Path, default=REPO / "bench-data")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    store = prepare(args.data, args.quick)
    col = ctzarr.open_collection(store)
    case_ids = col.case_ids
    shard_dir = store / "cases" / case_ids[0] / "0" / "c"
    shard_key = (
        next(f for f in sorted(shard_dir.rglob("*")) if f.is_file()).relative_to(store).as_posix()
    )
    proc, base = start_server(store)
    results: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}",
        "store": {"cases": len(case_ids), "shape_zyx": list(col[case_ids[0]].shape)},
    }
    try:
        with httpx.Client(base_url=base, timeout=60) as client:
            results["crop"] = bench_crop(col, case_ids[0], client, args.repeats)
            cold_proc, cold_base = start_server(store, "--slab-cache-mb", "0")
            try:
                with httpx.Client(base_url=cold_base, timeout=60) as cold_client:
                    results["slice"] = bench_slice(col, case_ids, client, cold_client, args.repeats)
            finally:
                cold_proc.send_signal(signal.SIGTERM)
                cold_proc.wait(timeout=10)
        results["load"] = bench_load(
            base, proc.pid, case_ids, shard_key, args.clients, args.duration
        )
        results["zarr"] = bench_zarr(base, store, 3 if args.quick else 5)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    c, s, ld, z = results["crop"], results["slice"], results["load"], results["zarr"]
    rows = [
        (
            "crop endpoint p50 (npy, kidney left + 10 mm)",
            f"{c['endpoint_p50_ms']:.1f} ms",
            f"in-process case.crop(lazy=False) {c['inprocess_p50_ms']:.1f} ms",
            f"<= baseline + {TARGET_CROP_OVERHEAD_MS:g} ms",
            c["endpoint_p50_ms"] <= c["inprocess_p50_ms"] + TARGET_CROP_OVERHEAD_MS,
        ),
        (
            f"slice.png p50, stepping through slices ({s['pixels'][0]}x{s['pixels'][1]} axial, overlay)",
            f"{s['scrolling_p50_ms']:.1f} ms",
            f"in-process render (no cache) {s['inprocess_p50_ms']:.1f} ms",
            f"<= {TARGET_SLICE_MS:g} ms",
            s["scrolling_p50_ms"] <= TARGET_SLICE_MS,
        ),
        (
            "slice.png p50, cold (server with --slab-cache-mb 0)",
            f"{s['cold_p50_ms']:.1f} ms",
            f"in-process render (no cache) {s['inprocess_p50_ms']:.1f} ms",
            f"<= {TARGET_SLICE_MS:g} ms",
            s["cold_p50_ms"] <= TARGET_SLICE_MS,
        ),
        (
            f"load: {args.clients} clients x {args.duration:g} s, errors",
            f"{ld['errors']} of {ld['requests']}",
            f"{ld['requests_per_s']:.0f} req/s",
            "0",
            ld["errors"] == 0,
        ),
        (
            "load: p99 / p50",
            f"{ld['p99_ms'] / ld['p50_ms']:.1f}",
            f"p50 {ld['p50_ms']:.1f} ms, p99 {ld['p99_ms']:.1f} ms",
            f"<= {TARGET_P99_OVER_P50:g}",
            ld["p99_ms"] <= TARGET_P99_OVER_P50 * ld["p50_ms"],
        ),
        (
            "load: server RSS growth after warm-up",
            f"{ld['rss_growth_mb']:+.1f} MB",
            f"RSS {ld['rss_after_warmup_mb']:.0f} -> {ld['rss_end_mb']:.0f} MB",
            f"<= {TARGET_RSS_GROWTH_MB:g} MB",
            ld["rss_growth_mb"] <= TARGET_RSS_GROWTH_MB,
        ),
        (
            f"/zarr whole-object GETs ({z['objects']} objects, {z['megabytes_per_round']:.1f} MB)",
            f"{z['ours_mb_s']:.0f} MB/s",
            f"python -m http.server {z['static_mb_s']:.0f} MB/s",
            f">= {TARGET_ZARR_VS_STATIC:g} x baseline ({z['ours_mb_s'] / z['static_mb_s']:.2f} x)",
            z["ours_mb_s"] >= TARGET_ZARR_VS_STATIC * z["static_mb_s"],
        ),
    ]
    results["met"] = all(r[4] for r in rows)
    print(f"\n{results['machine']}; store {results['store']}\n")
    print("| measure | ctzarr serve | baseline (same run) | target | met |")
    print("|---|---|---|---|---|")
    for name, ours, base_text, target, met in rows:
        print(f"| {name} | {ours} | {base_text} | {target} | {'yes' if met else 'NO'} |")
    out = store.parent / "bench_serve.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
