"""Training patches: ctzarr's PatchSampler (local and moto S3) against MONAI and TorchIO.

Usage::

    python benchmarks/bench_patches.py [--work DIR] [--cases 2] [--shape 326 512 512]
        [--patch 96 160 160] [--batch-size 4] [--batches 12] [--repeats 1]
        [--bench-python /work/bench-venv-train/bin/python]

Data: DAP Atlas phantoms (``ctzarr.testing.phantom.write_dap_atlas``: int16 CT, uint8 masks with
the 144-id DAP table, ~60 structures present) of ``--shape`` (z, y, x), converted once with
``ctzarr.convert`` into ``<work>/dap.zarr`` and copied to a moto S3 server that this script runs
in its own process (a WSGI layer counts the bytes it serves).

Pipelines, each in a fresh process, 2 worker processes, the same patch size and batch size,
classes equally weighted over all labels present:

- ``ctzarr-local`` / ``ctzarr-s3``: ``PatchSampler(...).dataset(n)`` served by a fork
  ``multiprocessing.Pool(2)`` that maps index batches to workers and stacks the batch in the
  parent (what ``torch.utils.data.DataLoader(ds, num_workers=2, batch_size=B)`` does; torch
  has no wheel for the project's Python 3.12 on this machine, only cp311, so the project venv
  has no torch);
- ``monai``: ``CacheDataset`` of ``LoadImaged``, ``EnsureChannelFirstd``, ``ClassesToIndicesd``
  (cached: MONAI's preparation), then ``RandCropByLabelClassesd`` in a torch ``DataLoader`` with
  2 workers (in the bench venv: python 3.11, torch CPU, monai, torchio);
- ``torchio``: ``SubjectsDataset`` + ``LabelSampler`` (every label present, equal
  probabilities) + ``Queue(num_workers=2)`` in a ``DataLoader``;
- baselines: the same loaders serving nothing (``ctzarr-idle``: the Pool with ctzarr imported
  and a collection opened; ``torch-idle``: a DataLoader with 2 workers, torch, monai and
  torchio imported).

Figures: preparation time per case (MONAI: load + ClassesToIndicesd per case; TorchIO: from
start to the first batch, whose time is the loading and probability map of a subject; ctzarr: 0,
no preparation), time from process start to the first batch, steady patches/s (the batches
after the first), peak RSS and PSS summed over the process and its workers (sampled every
0.1 s), pipeline memory = peak PSS minus that of the matching idle baseline, bytes read per
patch (ctzarr local: ``rchar`` of the workers; S3: bytes the server sent; MONAI/TorchIO: the
``.nii.gz`` bytes of every case load over the patches delivered).

Results: a Markdown table on stdout and ``<work>/bench_patches.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()  # before the heavy imports: a pipeline's clock starts here


# ----------------------------------------------------------------------------------------------
# child processes: one pipeline each, prints one JSON line
# ----------------------------------------------------------------------------------------------
def _ctzarr_batch(args: tuple[Any, list[int]]) -> tuple[Any, Any]:
    import numpy as np

    ds, indices = args
    samples = [ds[i] for i in indices]
    return np.stack([s["image"] for s in samples]), np.stack([s["labels"] for s in samples])


def _idle_batch(args: tuple[Any, list[int]]) -> int:
    return len(args[1])


def _worker_rchar(pool: Any) -> int:
    total = 0
    for proc in pool._pool:  # the worker processes
        try:
            with open(f"/proc/{proc.pid}/io") as f:
                for line in f:
                    if line.startswith("rchar:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def run_ctzarr(opts: dict[str, Any]) -> dict[str, Any]:
    import multiprocessing

    import ctzarr

    url, so = opts["url"], opts.get("storage_options")
    col = ctzarr.open_collection(url, storage_options=so)
    bs, nb = opts["batch_size"], opts["batches"]
    idle = opts["name"] == "ctzarr-idle"
    if idle:
        ds: Any = None
    else:
        sampler = ctzarr.PatchSampler(col, patch_size=tuple(opts["patch"]), seed=0)
        ds = sampler.dataset(bs * nb)
    t_prep = time.perf_counter() - T0
    ctx = multiprocessing.get_context("fork")
    batches = [(ds, list(range(b * bs, (b + 1) * bs))) for b in range(nb)]
    with ctx.Pool(2) as pool:
        before = _worker_rchar(pool)
        it = pool.imap(_idle_batch if idle else _ctzarr_batch, batches)
        next(it)
        t_first = time.perf_counter() - T0
        for _ in it:
            pass
        t_end = time.perf_counter() - T0
        rchar = _worker_rchar(pool) - before
        if idle:
            time.sleep(1.0)  # let the monitor see the idle loader
    return {
        "prep_s_per_case": 0.0,
        "setup_s": t_prep,
        "first_batch_s": t_first,
        "end_s": t_end,
        "steady_patches_per_s": bs * (nb - 1) / (t_end - t_first),
        "patches": bs * nb,
        "worker_rchar": rchar,
    }


def run_monai(opts: dict[str, Any]) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from monai.data import CacheDataset, DataLoader, list_data_collate
    from monai.transforms import (
        ClassesToIndicesd,
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        RandCropByLabelClassesd,
    )

    num_classes = 145
    files = [{"image": i, "label": m} for i, m in opts["files"]]
    bs, nb = opts["batch_size"], opts["batches"]
    transform = Compose(
        [
            LoadImaged(keys=["image", "label"]),
            EnsureChannelFirstd(keys=["image", "label"]),
            ClassesToIndicesd(keys="label", num_classes=num_classes),
            RandCropByLabelClassesd(
                keys=["image", "label"],
                label_key="label",
                spatial_size=tuple(reversed(opts["patch"])),  # MONAI's axes are NIfTI's (x, y, z)
                num_classes=num_classes,
                num_samples=1,
                indices_key="label_cls_indices",
            ),
        ]
    )
    transform.set_random_state(0)
    t = time.perf_counter()
    # copy_cache=True (MONAI's default) deep-copies a cached case (image, labels and every
    # class's voxel indices) for each sample; "monai-nocopy" is MONAI's advice for transforms
    # that do not modify their input in place
    ds = CacheDataset(
        files,
        transform=transform,
        cache_rate=1.0,
        num_workers=1,
        progress=False,
        copy_cache=opts["name"] != "monai-nocopy",
    )
    prep = (time.perf_counter() - t) / len(files)
    print(f"monai: prepared {len(files)} cases, {prep:.1f} s each", file=sys.stderr, flush=True)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=bs * nb)
    loader = DataLoader(
        ds, batch_size=bs, num_workers=2, sampler=sampler, collate_fn=list_data_collate
    )
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - T0
    n = 1
    for _ in it:
        n += 1
    t_end = time.perf_counter() - T0
    return {
        "prep_s_per_case": prep,
        "first_batch_s": t_first,
        "end_s": t_end,
        "steady_patches_per_s": bs * (n - 1) / (t_end - t_first),
        "patches": bs * n,
        "case_loads": len(files),
    }


def run_torchio(opts: dict[str, Any]) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    import nibabel as nib
    import numpy as np
    import torch
    import torchio as tio

    bs, nb = opts["batch_size"], opts["batches"]
    present: set[int] = set()
    for _, mask in opts["files"]:  # the labels present (the user's class list)
        present |= set(np.unique(np.asanyarray(nib.load(mask).dataobj)).tolist())
    present.discard(0)
    t_start = time.perf_counter() - T0
    subjects = [
        tio.Subject(image=tio.ScalarImage(i), label=tio.LabelMap(m)) for i, m in opts["files"]
    ]
    sampler = tio.data.LabelSampler(
        patch_size=tuple(reversed(opts["patch"])),
        label_name="label",
        label_probabilities=dict.fromkeys(sorted(present), 1.0),
    )
    per_volume = max(1, bs * nb // len(subjects))
    queue = tio.Queue(
        tio.SubjectsDataset(subjects),
        max_length=2 * per_volume,
        samples_per_volume=per_volume,
        sampler=sampler,
        num_workers=2,
        shuffle_subjects=True,
        shuffle_patches=True,
    )
    loader = torch.utils.data.DataLoader(queue, batch_size=bs, num_workers=0)
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - T0
    n = 1
    for _ in it:
        n += 1
        if n >= nb:
            break
    t_end = time.perf_counter() - T0
    return {
        "prep_s_per_case": (t_first - t_start),
        "first_batch_s": t_first,
        "end_s": t_end,
        "steady_patches_per_s": bs * (n - 1) / (t_end - t_first),
        "patches": bs * n,
        "case_loads": len(subjects),
    }


def run_torch_idle(opts: dict[str, Any]) -> dict[str, Any]:
    import monai  # noqa: F401
    import torch
    import torchio  # noqa: F401

    class Nothing(torch.utils.data.Dataset[int]):
        def __len__(self) -> int:
            return 64

        def __getitem__(self, i: int) -> int:
            return i

    loader = torch.utils.data.DataLoader(Nothing(), batch_size=4, num_workers=2)
    for _ in loader:
        pass
    it = iter(loader)
    next(it)
    time.sleep(1.0)
    return {}


# ----------------------------------------------------------------------------------------------
# the S3 server (its own process)
# ----------------------------------------------------------------------------------------------
def serve_s3(port: int) -> None:
    import logging

    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").disabled = True
    app = DomainDispatcherApplication(create_backend_app)
    sent = [0]
    lock = threading.Lock()

    def counted(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") == "/__bytes":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [str(sent[0]).encode()]
        parts = list(app(environ, start_response))
        with lock:
            sent[0] += sum(len(p) for p in parts)
        return parts

    make_server("127.0.0.1", port, counted, threaded=True).serve_forever()


def _s3_bytes(endpoint: str) -> int:
    import urllib.request

    with urllib.request.urlopen(f"{endpoint}/__bytes") as r:
        return int(r.read())


# ----------------------------------------------------------------------------------------------
# the orchestrator
# ----------------------------------------------------------------------------------------------
def _monitor(pid: int, peak: dict[str, int], stop: threading.Event) -> None:
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        rss = pss = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            break
        for p in procs:
            try:
                info = p.memory_full_info()
                rss += info.rss
                pss += info.pss
            except psutil.Error:
                pass
        peak["rss"] = max(peak.get("rss", 0), rss)
        peak["pss"] = max(peak.get("pss", 0), pss)
        stop.wait(0.1)


def run_child(python: str, name: str, opts: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    payload = json.dumps({**opts, "name": name})
    proc = subprocess.Popen(
        [python, __file__, "--run", name, "--opts", payload],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    peak: dict[str, int] = {}
    stop = threading.Event()
    mon = threading.Thread(target=_monitor, args=(proc.pid, peak, stop), daemon=True)
    mon.start()
    out, _ = proc.communicate()
    stop.set()
    mon.join()
    if proc.returncode:
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_mb"] = peak.get("rss", 0) / 2**20
    result["peak_pss_mb"] = peak.get("pss", 0) / 2**20
    return result


def prepare(
    work: Path, n_cases: int, shape: tuple[int, int, int]
) -> tuple[Path, list[tuple[str, str]]]:
    import ctzarr
    from ctzarr.testing.phantom import write_dap_atlas

    src = work / "DAP"
    if not (src / "masks").exists() or len(list((src / "masks").glob("*.nii.gz"))) < n_cases:
        write_dap_atlas(src, n_cases=n_cases, shape_zyx=shape, seed=0)
    store = work / "dap.zarr"
    report = ctzarr.convert(src, store, progress=False)
    assert report.ok, report
    files = [
        (str(src / "images" / m.name), str(m)) for m in sorted((src / "masks").glob("*.nii.gz"))
    ]
    return store, files[:n_cases]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/ctzarr-bench-patches")
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=3, default=(326, 512, 512))
    ap.add_argument("--patch", type=int, nargs=3, default=(96, 160, 160))
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--bench-python", default="/work/bench-venv-train/bin/python")
    ap.add_argument("--run", default=None)
    ap.add_argument("--opts", default=None)
    ap.add_argument("--serve-s3", type=int, default=None)
    args = ap.parse_args()

    if args.serve_s3 is not None:
        serve_s3(args.serve_s3)
        return
    if args.run is not None:
        opts = json.loads(args.opts)
        runner = {
            "ctzarr-local": run_ctzarr,
            "ctzarr-s3": run_ctzarr,
            "ctzarr-idle": run_ctzarr,
            "monai": run_monai,
            "monai-nocopy": run_monai,
            "torchio": run_torchio,
            "torch-idle": run_torch_idle,
        }[args.run]
        print(json.dumps(runner(opts)))
        return

    import socket

    import s3fs

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store, files = prepare(work, args.cases, tuple(args.shape))
    common = {"patch": list(args.patch), "batch_size": args.batch_size, "batches": args.batches}
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, __file__, "--serve-s3", str(port)], env=env)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                _s3_bytes(endpoint)
                break
            except OSError:
                time.sleep(0.1)
        os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
        so = {"anon": False, "client_kwargs": {"endpoint_url": endpoint}}
        fs = s3fs.S3FileSystem(**so)
        fs.mkdir("bench")
        fs.put(str(store), "bench/dap.zarr", recursive=True)
        nii_bytes = sum(Path(p).stat().st_size for pair in files for p in pair)
        plans: list[tuple[str, str, dict[str, Any]]] = [
            ("ctzarr-idle", sys.executable, {"url": str(store)}),
            ("ctzarr-local", sys.executable, {"url": str(store)}),
            ("ctzarr-s3", sys.executable, {"url": "s3://bench/dap.zarr", "storage_options": so}),
            ("torch-idle", args.bench_python, {}),
            ("monai", args.bench_python, {"files": files}),
            ("torchio", args.bench_python, {"files": files}),
            ("monai-nocopy", args.bench_python, {"files": files}),
        ]
        results: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.repeats):
            for name, python, extra in plans:
                if args.only and name not in args.only and not name.endswith("idle"):
                    continue
                before = _s3_bytes(endpoint)
                r = run_child(python, name, {**common, **extra}, env)
                if name == "ctzarr-s3":
                    r["bytes_per_patch"] = (_s3_bytes(endpoint) - before) / r["patches"]
                elif name == "ctzarr-local":
                    r["bytes_per_patch"] = r["worker_rchar"] / r["patches"]
                elif "case_loads" in r:
                    r["bytes_per_patch"] = nii_bytes / args.cases * r["case_loads"] / r["patches"]
                results.setdefault(name, []).append(r)
                print(name, json.dumps(r), file=sys.stderr, flush=True)
    finally:
        server.terminate()
    report(results, work, args)


def report(results: dict[str, list[dict[str, Any]]], work: Path, args: Any) -> None:
    def best(name: str, key: str, pick: Any = min) -> float:
        vals = [r[key] for r in results.get(name, []) if key in r]
        return float(pick(vals)) if vals else float("nan")

    idle = {
        "ctzarr": best("ctzarr-idle", "peak_pss_mb"),
        "torch": best("torch-idle", "peak_pss_mb"),
    }
    rows = []
    for name in ("ctzarr-local", "ctzarr-s3", "monai", "monai-nocopy", "torchio"):
        if name not in results:
            continue
        base = idle["ctzarr" if name.startswith("ctzarr") else "torch"]
        patches = best(name, "patches", max)
        first = best(name, "first_batch_s")
        rows.append(
            {
                "pipeline": name,
                "prep_s_per_case": best(name, "prep_s_per_case"),
                "first_batch_s": first,
                "steady_patches_per_s": best(name, "steady_patches_per_s", max),
                # patches delivered over the time since the process started (cold start)
                "cold_patches_per_s": patches / best(name, "end_s"),
                "peak_rss_mb": best(name, "peak_rss_mb"),
                "peak_pss_mb": best(name, "peak_pss_mb"),
                "pipeline_pss_mb": best(name, "peak_pss_mb") - base,
                "bytes_per_patch_mb": best(name, "bytes_per_patch") / 2**20,
            }
        )
    head = list(rows[0]) if rows else []
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for row in rows:
        print(
            "| "
            + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values())
            + " |"
        )
    print(f"idle baselines (peak PSS, MB): {idle}")
    out = {"args": vars(args), "results": results, "rows": rows, "idle_pss_mb": idle}
    (work / "bench_patches.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
