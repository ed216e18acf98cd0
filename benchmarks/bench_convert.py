"""Conversion benchmark of ctzarr on a DAP Atlas-sized case.

Usage::

    python benchmarks/bench_convert.py [--data DIR] [--quick] [--repeats N] [--skip-niizarr]

What it measures (each measured step runs in a fresh child process; its peak RSS comes from
``os.wait4`` on that child, so peak memory is per step):

1. baseline: nibabel loading CT and mask into numpy (``np.asanyarray(nib.load(p).dataobj)``);
2. ``ctzarr.convert`` of the case (pyramid, index and header included) after one warm-up
   conversion of a tiny case (numba kernels are cached on disk), timed both as the whole child
   (interpreter start, imports) and inside the child around the ``convert()`` call;
3. nifti-zarr's ``nii2zarr`` on the CT, installed in its own venv under the data directory;
4. memory growth: the same conversion of the case tiled 4x along z (1600 slices);
5. sizes of the store's arrays against the ``.nii.gz`` files (apparent bytes of the files).

The case is an int16 CT of 400 x 512 x 512 voxels (z, y, x) at 2.5 x 0.8 x 0.8 mm and a uint8
mask with about 140 distinct DAP Atlas label ids. ``ctzarr.phantom.make_phantom`` draws at most
~78 ids (33 organs plus body, tissues, lungs and skeleton), so the largest structures are cut
deterministically into slabs along z that take the unused DAP ids (see
:func:`subdivide_labels`). Generated files are cached in the data directory (default
``bench-data/``) and reused while the generation parameters are unchanged.

Times are medians of ``--repeats`` runs (3 by default); peak RSS is the largest of the runs.
Results are printed as a Markdown table and written to ``<data>/bench_convert.json``.
``--quick`` runs a 100 x 256 x 256 case (400 slices tiled) with one repeat, as a smoke test.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
REPO = HERE.parent.parent
CASE = "BenchCase_0001"
#: bump when the generated data changes, to invalidate cached files
DATA_VERSION = 1

TARGET_TIME_RATIO = 1.5  # conversion wall time / nibabel load of both files
TARGET_PEAK_MB = 500.0
# issue 13: `ctzarr convert` as a command, whole process, against nibabel loading both files
TARGET_CLI_RATIO = 1.2
TARGET_CLI_PEAK_MB = 400.0
#: top-level packages whose import time the importtime row names
IMPORT_GROUPS = ("zarr", "numba", "numpy", "nibabel", "fsspec", "dask", "scipy", "llvmlite")
TARGET_GROWTH = 1.10  # peak RSS at 4x the slices / peak RSS at 1x ("not growing")
TARGET_CT_RATIO = 0.8  # level-0 CT bytes / CT .nii.gz bytes
TARGET_MASK_RATIO = 0.5  # level-0 mask bytes / mask .nii.gz bytes


@dataclass(frozen=True)
class CaseGeometry:
    """What to generate: shape, spacing, phantom seed and label ids wanted."""

    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    seed: int = 0
    n_structures: int = 33  # every organ make_phantom knows
    target_ids: int = 140  # distinct non-background label ids after subdivision
    tile_z: int = 4  # the growth case repeats the volume this many times along z


FULL = CaseGeometry((400, 512, 512), (2.5, 0.8, 0.8))
QUICK = CaseGeometry((100, 256, 256), (2.5, 1.6, 1.6))
WARMUP = CaseGeometry((64, 64, 64), (2.5, 6.4, 6.4))


# ------------------------------------------------------------------------------------------
# Data generation (cached)
# ------------------------------------------------------------------------------------------


def subdivide_labels(labels: np.ndarray, free_ids: list[int], target: int) -> dict[int, list[int]]:
    """Split the largest structures into z slabs labelled with unused ids, in place.

    Deterministic: extra ids go one by one to the structure whose voxels per part is largest
    (ties to the smaller id), and each structure is cut at the z quantiles of its voxels, so
    every part holds about the same number of voxels. Background (0) and the placeholder
    "left to annotate" (1) are never split. Returns {original id: new ids}.
    """
    per_z = np.stack([np.bincount(sl.ravel(), minlength=256) for sl in labels])  # (nz, 256)
    counts = per_z.sum(axis=0)
    present = [int(i) for i in np.nonzero(counts)[0] if i > 1]
    n_extra = max(0, target - (len(present) + int(counts[1] > 0)))
    n_extra = min(n_extra, len(free_ids))
    heap = [(-int(counts[i]), i, 1) for i in present]  # (-voxels per part, id, parts)
    heapq.heapify(heap)
    parts = dict.fromkeys(present, 1)
    for _ in range(n_extra):
        _neg, i, k = heapq.heappop(heap)
        parts[i] = k + 1
        heapq.heappush(heap, (-int(counts[i]) // (k + 1), i, k + 1))
    free = iter(sorted(free_ids))
    split: dict[int, list[int]] = {}
    for i in sorted(parts):
        k = parts[i]
        if k == 1:
            continue
        cum = np.cumsum(per_z[:, i])
        # first slice of part j: where the cumulative count passes j/k of the voxels
        starts = [int(np.searchsorted(cum, counts[i] * j / k, side="right")) for j in range(1, k)]
        new_ids = [next(free) for _ in range(k - 1)]
        split[i] = new_ids
        bounds = [*starts, labels.shape[0]]
        for new, z0, z1 in zip(new_ids, bounds[:-1], bounds[1:], strict=True):
            sub = labels[z0:z1]
            sub[sub == i] = new
    return split


def save_nifti(path: Path, data_zyx: np.ndarray, spacing_zyx: tuple[float, float, float]) -> None:
    """Write an unscaled little-endian .nii.gz (RAS affine, qform/sform code 1, mm) with nibabel's
    default gzip level, as ``ctzarr.phantom.write_dap_atlas`` does for case 0."""
    import nibabel as nib

    dz, dy, dx = spacing_zyx
    nz, ny, nx = data_zyx.shape
    aff = np.diag([dx, dy, dz, 1.0])
    aff[:3, 3] = (-(nx - 1) * dx / 2, -(ny - 1) * dy / 2, -(nz - 1) * dz)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(data_zyx.dtype)
    hdr.set_xyzt_units("mm", "sec")
    img = nib.Nifti1Image(data_zyx.transpose(2, 1, 0), aff, header=hdr)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    tmp = path.with_name(path.name + ".part.nii.gz")
    nib.save(img, str(tmp))
    tmp.replace(path)


@dataclass
class Dataset:
    """A generated DAP-layout directory with one case."""

    root: Path
    ct: Path
    mask: Path
    info: dict[str, Any]


def _dataset_paths(root: Path) -> tuple[Path, Path, Path]:
    return (
        root / "images" / f"{CASE}.nii.gz",
        root / "masks" / f"{CASE}.nii.gz",
        root / "bench-meta.json",
    )


def _cached(root: Path, key: dict[str, Any]) -> Dataset | None:
    ct, mask, meta = _dataset_paths(root)
    if not (ct.exists() and mask.exists() and meta.exists()):
        return None
    info = json.loads(meta.read_text())
    same = info.get("key") == json.loads(json.dumps(key))  # tuples read back as lists
    return Dataset(root, ct, mask, info) if same else None


def _write_dataset(
    root: Path,
    key: dict[str, Any],
    ct: np.ndarray,
    labels: np.ndarray,
    spacing: tuple[float, float, float],
    extra: dict[str, Any],
) -> Dataset:
    shutil.rmtree(root, ignore_errors=True)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    ct_path, mask_path, meta = _dataset_paths(root)
    t0 = time.perf_counter()
    save_nifti(ct_path, ct, spacing)
    save_nifti(mask_path, labels, spacing)
    info = {"key": key, "write_seconds": round(time.perf_counter() - t0, 1), **extra}
    meta.write_text(json.dumps(info, indent=1) + "\n")
    return Dataset(root, ct_path, mask_path, info)


def make_datasets(data: Path, geo: CaseGeometry, tag: str) -> tuple[Dataset, Dataset]:
    """The case and its z-tiled copy, generated once and cached under ``data``."""
    from ctzarr.model.labels import builtin_label_map

    key = {"version": DATA_VERSION, **asdict(geo)}
    base_root = data / f"{tag}-{geo.shape_zyx[0]}"
    tiled_root = data / f"{tag}-{geo.shape_zyx[0] * geo.tile_z}"
    base = _cached(base_root, key)
    tiled = _cached(tiled_root, {**key, "tiled": True})
    if base is not None and tiled is not None:
        return base, tiled

    from ctzarr.testing.phantom import make_phantom

    print(f"generating {geo.shape_zyx} phantom ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    ct, labels = make_phantom(
        geo.shape_zyx, geo.spacing_zyx, seed=geo.seed, n_structures=geo.n_structures
    )
    phantom_ids = int(np.count_nonzero(np.bincount(labels.ravel(), minlength=256)[1:]))
    valid = set(builtin_label_map("dap_atlas").values) - {0}
    free = sorted(valid - set(np.unique(labels).tolist()))
    split = subdivide_labels(labels, free, geo.target_ids)
    counts = np.bincount(labels.ravel(), minlength=256)
    extra = {
        "phantom_label_ids": phantom_ids,
        "label_ids": int(np.count_nonzero(counts[1:])),
        "split": {str(k): v for k, v in split.items()},
        "labelled_fraction": round(float(1 - counts[0] / labels.size), 4),
        "generate_seconds": round(time.perf_counter() - t0, 1),
    }
    print(
        f"  {phantom_ids} ids from make_phantom -> {extra['label_ids']} after subdivision; "
        f"writing .nii.gz ...",
        file=sys.stderr,
        flush=True,
    )
    base = _write_dataset(base_root, key, ct, labels, geo.spacing_zyx, extra)
    print(f"writing the {geo.tile_z}x z-tiled copy ...", file=sys.stderr, flush=True)
    tiled = _write_dataset(
        tiled_root,
        {**key, "tiled": True},
        np.tile(ct, (geo.tile_z, 1, 1)),
        np.tile(labels, (geo.tile_z, 1, 1)),
        geo.spacing_zyx,
        extra,
    )
    return base, tiled


def prepare_data(data: Path, geo: CaseGeometry, tag: str) -> tuple[Dataset, Dataset, Dataset]:
    """(case, z-tiled case, warm-up case), generated in a child process when not cached.

    Generating in a child keeps this process small: its peak RSS would otherwise leak into
    the children's figures when /usr/bin/time is missing (see :func:`run_child`).
    """

    def lookup() -> tuple[Dataset | None, ...]:
        key = {"version": DATA_VERSION, **asdict(geo)}
        n = geo.shape_zyx[0]
        return (
            _cached(data / f"{tag}-{n}", key),
            _cached(data / f"{tag}-{n * geo.tile_z}", {**key, "tiled": True}),
            _cached(data / "warmup", {"version": DATA_VERSION, "warmup": asdict(WARMUP)}),
        )

    found = lookup()
    if any(d is None for d in found):
        subprocess.run(_self_cmd("generate", str(data), tag), check=True)
        found = lookup()
    assert all(d is not None for d in found), "data generation did not produce the cached files"
    return found  # type: ignore[return-value]


def make_warmup(data: Path) -> Dataset:
    """A tiny case of the same dtypes, converted once so numba's on-disk cache is warm."""
    geo = WARMUP
    key = {"version": DATA_VERSION, "warmup": asdict(geo)}
    root = data / "warmup"
    cached = _cached(root, key)
    if cached is not None:
        return cached
    from ctzarr.testing.phantom import make_phantom

    ct, labels = make_phantom(geo.shape_zyx, geo.spacing_zyx, seed=1)
    return _write_dataset(root, key, ct, labels, geo.spacing_zyx, {})


# ------------------------------------------------------------------------------------------
# Child processes
# ------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One child process: wall time, peak RSS and what it reported about itself."""

    wall_s: float
    peak_mb: float
    report: dict[str, Any] = field(default_factory=dict)


def run_child(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run cmd, returning its wall time and its own peak RSS.

    Peak RSS comes from ``/usr/bin/time -f %M`` when available, else from ``os.wait4``. The
    intermediary matters: on Linux a child's ``ru_maxrss`` starts from the high-water RSS of
    the process it was forked from (``exec`` records the old address space's peak), so a
    parent that ever held a large array would inflate every child's figure. A child that
    prints a JSON object as its last stdout line reports in-process figures.
    """
    timer = shutil.which("time", path="/usr/bin:/bin")
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r", suffix=".rss") as rss,
    ):
        full = [timer, "-f", "%M", "-o", rss.name, *cmd] if timer else cmd
        epoch0 = time.time()
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        epoch1 = time.time()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
        peak_kib = (
            int(rss.read().split()[-1]) if timer and proc.returncode == 0 else usage.ru_maxrss
        )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{stderr[-3000:]}")
    report: dict[str, Any] = {}
    lines = stdout.strip().splitlines()
    if lines and lines[-1].startswith("{"):
        report = json.loads(lines[-1])
        # interpreter start-up before child_main, and shut-down after its last line
        report["startup_s"] = report.pop("t_begin") - epoch0
        report["shutdown_s"] = epoch1 - report.pop("t_end")
    return Run(wall, peak_kib / 1024, report)  # KiB on Linux


def child_main(argv: list[str]) -> None:
    """Entry point of the measured child processes (``--child STEP ...``)."""
    import resource

    step = argv[0]
    if step == "generate":
        data, tag = Path(argv[1]), argv[2]
        make_datasets(data, QUICK if tag == "quick" else FULL, tag)
        make_warmup(data)
        return
    t_begin = time.time()
    t0 = time.perf_counter()
    if step in ("nib_load", "nib_load_twice"):
        import nibabel as nib

        t_import = time.perf_counter() - t0
        t1 = time.perf_counter()
        arrays = [np.asanyarray(nib.load(p).dataobj) for p in argv[1:]]
        seconds = time.perf_counter() - t1
        extra: dict[str, Any] = {"shapes": [list(a.shape) for a in arrays]}
        if step == "nib_load_twice":
            # a second load in the same process: the steady state per case (its own child, so
            # that the whole-process baseline is one load, as a `ctzarr convert` is one case)
            del arrays
            t2 = time.perf_counter()
            arrays = [np.asanyarray(nib.load(p).dataobj) for p in argv[1:]]
            extra["second_seconds"] = time.perf_counter() - t2
    elif step in ("convert", "convert_twice"):
        import ctzarr

        convert = ctzarr.convert  # the writing side loads on first use: an import, not work
        t_import = time.perf_counter() - t0
        src, dest = argv[1], argv[2]
        t1 = time.perf_counter()
        report = convert(src, dest, layout="dap_atlas", progress=False)
        seconds = time.perf_counter() - t1
        if not report.ok or len(report.converted) != 1:
            raise SystemExit(f"conversion failed: {report}")
        extra = {}
        if step == "convert_twice":
            # a second case in the same process (what each of a dataset's 533 cases costs once
            # imports and numba's one-time kernel loading, ~0.7 s, are paid); its own child so
            # that the peak-RSS rows stay those of one conversion
            t2 = time.perf_counter()
            again = ctzarr.convert(src, dest + "-second", layout="dap_atlas", progress=False)
            extra = {"second_seconds": time.perf_counter() - t2}
            if not again.ok:
                raise SystemExit(f"conversion failed: {again}")
    else:
        raise SystemExit(f"unknown child step {step!r}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "import_seconds": t_import,
                "self_peak_mb": peak,
                **extra,
                "t_begin": t_begin,
                "t_end": time.time(),
            }
        ),
        flush=True,
    )


def _self_cmd(*args: str) -> list[str]:
    return [sys.executable, str(HERE), "--child", *args]


# ------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------


@dataclass
class Stat:
    """Median times and peak memory over repeated runs of one step."""

    wall_s: float
    inproc_s: float | None
    peak_mb: float
    runs: list[dict[str, Any]]


def repeat(make_cmd: Any, n: int, before: Any = None, env: dict[str, str] | None = None) -> Stat:
    """Run a child n times (``before()`` runs un-timed before each), summarise."""
    runs = []
    for _ in range(n):
        if before is not None:
            before()
        runs.append(run_child(make_cmd(), env=env))
    inproc = [r.report["seconds"] for r in runs if "seconds" in r.report]
    return Stat(
        wall_s=statistics.median(r.wall_s for r in runs),
        inproc_s=statistics.median(inproc) if inproc else None,
        peak_mb=max(r.peak_mb for r in runs),
        runs=[
            {"wall_s": round(r.wall_s, 3), "peak_mb": round(r.peak_mb, 1), **r.report} for r in runs
        ],
    )


def bench_nib_load(ds: Dataset, n: int, step: str = "nib_load") -> Stat:
    return repeat(lambda: _self_cmd(step, str(ds.ct), str(ds.mask)), n)


def _cli_cmd(*args: str) -> list[str]:
    """``ctzarr ...`` as a user runs it: the console script's module in a fresh interpreter."""
    return [sys.executable, "-m", "ctzarr.cli", *args]


def bench_cli_convert(ds: Dataset, dest: Path, n: int) -> tuple[Stat, Stat]:
    """``ctzarr convert SRC DEST --layout dap_atlas -q`` in a fresh process against the nibabel
    child, alternating (nibabel, ctzarr) n times: (nibabel, ctzarr).

    Alternating matters on a VM: a process that follows one which freed ~450 MB ran 0.2-0.3 s
    slower than one that followed a ctzarr run (the freed pages are handed back to the host and
    faulted in again), so both sides of the ratio see the same conditions.
    """
    nib_runs, cli_runs = [], []
    for _ in range(n):
        nib_runs.append(bench_nib_load(ds, 1))
        cli_runs.append(
            repeat(
                lambda: _cli_cmd("convert", str(ds.root), str(dest), "--layout", "dap_atlas", "-q"),
                1,
                before=lambda: shutil.rmtree(dest, ignore_errors=True),
            )
        )
    return _merge(nib_runs), _merge(cli_runs)


def _merge(stats: list[Stat]) -> Stat:
    runs = [run for s in stats for run in s.runs]
    inproc = [r["seconds"] for r in runs if "seconds" in r]
    return Stat(
        wall_s=statistics.median(r["wall_s"] for r in runs),
        inproc_s=statistics.median(inproc) if inproc else None,
        peak_mb=max(r["peak_mb"] for r in runs),
        runs=runs,
    )


def compile_package() -> None:
    """Byte-compile the ctzarr the children import, as an installed package is.

    pip compiles a package on install and a plain run writes the bytecode of an editable one;
    a machine with ``PYTHONDONTWRITEBYTECODE`` set (this one) would otherwise compile every
    module from source in every child (0.08 s of a ``ctzarr convert``).
    """
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", _ctzarr_location()],
        check=True,
    )


def cli_import_times(ds: Dataset, dest: Path) -> dict[str, float]:
    """Seconds of imports in one ``ctzarr convert`` process (``python -X importtime``), in
    total and per top-level package (what the process imported, when it imported it: the
    numba kernels' own imports happen during the conversion)."""
    shutil.rmtree(dest, ignore_errors=True)
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            *_cli_cmd("convert", str(ds.root), str(dest), "--layout", "dap_atlas", "-q")[1:],
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    per_package: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        _, self_us, _cum, name = (
            p.strip() for p in line.replace("import time:", "|", 1).split("|")
        )
        top = name.split(".")[0]
        per_package[top] = per_package.get(top, 0.0) + int(self_us) / 1e6
    return {"total": sum(per_package.values()), **per_package}


def bench_convert(ds: Dataset, dest: Path, n: int) -> Stat:
    """Convert ds into a fresh store n times (the store is removed before each run)."""
    return repeat(
        lambda: _self_cmd("convert", str(ds.root), str(dest)),
        n,
        before=lambda: shutil.rmtree(dest, ignore_errors=True),
    )


def ensure_niizarr_venv(data: Path) -> tuple[Path | None, str]:
    """A venv with PyPI nifti-zarr; (nii2zarr executable or None, status text)."""
    venv = data / "venv-niizarr"
    exe = venv / "bin" / "nii2zarr"
    if exe.exists():
        return exe, _niizarr_version(venv)
    py = shutil.which("python3.12") or sys.executable
    log = data / "venv-niizarr.log"
    try:
        with open(log, "w") as f:
            subprocess.run([py, "-m", "venv", "--clear", str(venv)], check=True, stdout=f, stderr=f)
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "nifti-zarr"],
                check=True,
                stdout=f,
                stderr=f,
                timeout=900,
            )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        return None, f"install failed ({exc}); see {log}"
    if not exe.exists():
        return None, f"installed but no nii2zarr entry point; see {log}"
    return exe, _niizarr_version(venv)


def _niizarr_version(venv: Path) -> str:
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    try:
        pkgs = {p["name"].lower(): p["version"] for p in json.loads(out)}
    except json.JSONDecodeError:
        return "installed"
    return f"nifti-zarr {pkgs.get('nifti-zarr', '?')}, zarr {pkgs.get('zarr', '?')}"


def bench_niizarr(exe: Path, ds: Dataset, dest: Path, n: int) -> Stat:
    """``nii2zarr ct.nii.gz out`` with its defaults (pyramid, 64^3 chunks)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{exe.parent}:{env.get('PATH', '')}"
    return repeat(
        lambda: [str(exe), str(ds.ct), str(dest)],
        n,
        before=lambda: shutil.rmtree(dest, ignore_errors=True),
        env=env,
    )


def tree_bytes(path: Path) -> int:
    """Apparent bytes of the files under path (``du -sb`` without directory entries)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_sizes(store: Path) -> dict[str, int]:
    """Bytes of each part of a converted case."""
    case = store / "cases" / CASE
    anatomy = case / "labels" / "anatomy"
    levels = sorted(int(p.name) for p in case.iterdir() if p.name.isdigit())
    return {
        "ct_level0": tree_bytes(case / "0"),
        "ct_levels1plus": sum(tree_bytes(case / str(i)) for i in levels[1:]),
        "mask_level0": tree_bytes(anatomy / "0"),
        "mask_levels1plus": sum(tree_bytes(anatomy / str(i)) for i in levels[1:]),
        "index": tree_bytes(anatomy / "index"),
        "nifti_header": tree_bytes(case / "nifti"),
        "store_total": tree_bytes(store),
        "levels": len(levels),
    }


def index_summary(store: Path) -> dict[str, Any]:
    """Labels listed by the stored index (a sanity check that the mask was indexed)."""
    meta = json.loads(
        (store / "cases" / CASE / "labels" / "anatomy" / "index" / "zarr.json").read_text()
    )
    attrs = meta["attributes"]["ctzarr"]
    return {"labels": len(attrs["labels"]), "voxels": int(sum(attrs["voxel_count"]))}


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def _mb(b: float) -> str:
    return f"{b / 1e6:.2f} MB" if b < 10e6 else f"{b / 1e6:.1f} MB"


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("**yes**" if ok else "**NO**")


def _breakdown(stat: dict[str, Any]) -> str:
    """Median start-up / imports / work / shut-down of a step's child processes."""

    def med(key: str) -> float:
        return statistics.median(run.get(key, float("nan")) for run in stat["runs"])

    return (
        f"start {med('startup_s'):.2f} + import {med('import_seconds'):.2f} + "
        f"work {med('seconds'):.2f} + exit {med('shutdown_s'):.2f} s"
    )


def build_table(r: dict[str, Any]) -> str:
    """Markdown table of every figure, with the baseline, ratio and target."""
    n0, n1 = r["slices"]
    nib, conv = r["nib_load"][str(n0)], r["convert"][str(n0)]
    nib4, conv4 = r["nib_load"][str(n1)], r["convert"][str(n1)]
    sz, src = r["sizes"], r["source_bytes"]
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(
        what: str, value: str, base: str, ratio: float | None, target: str, ok: bool | None
    ) -> None:
        rows.append(
            (what, value, base, "—" if ratio is None else f"{ratio:.2f}x", target, _verdict(ok))
        )

    cli = r.get("cli_convert")
    if cli is not None:
        nib_alt = r.get("cli_nib_load", nib)
        c_ratio = cli["wall_s"] / nib_alt["wall_s"]
        row(
            f"`ctzarr convert` command, whole process, {n0} slices (alternating with nibabel)",
            f"{cli['wall_s']:.2f} s",
            f"nibabel load (whole process) {nib_alt['wall_s']:.2f} s",
            c_ratio,
            f"<= {TARGET_CLI_RATIO}x",
            c_ratio <= TARGET_CLI_RATIO,
        )
        row(
            f"`ctzarr convert` command, peak RSS, {n0} slices",
            f"{cli['peak_mb']:.0f} MB",
            f"nibabel load {nib['peak_mb']:.0f} MB",
            cli["peak_mb"] / nib["peak_mb"],
            f"<= {TARGET_CLI_PEAK_MB:.0f} MB",
            cli["peak_mb"] <= TARGET_CLI_PEAK_MB,
        )
        imports = r.get("cli_imports", {})
        named = ", ".join(
            f"{k} {imports[k]:.2f}" for k in IMPORT_GROUPS if imports.get(k, 0.0) >= 0.005
        )
        rows.append(
            (
                "Imports of one `ctzarr convert` (`-X importtime`, one run)",
                f"{imports.get('total', float('nan')):.2f} s ({named})",
                f"nibabel child: import {statistics.median(x['import_seconds'] for x in nib['runs']):.2f} s",
                "—",
                "—",
                "—",
            )
        )
    t_ratio = conv["wall_s"] / nib["wall_s"]
    row(
        f"Conversion wall time, {n0} slices (child process)",
        f"{conv['wall_s']:.2f} s",
        f"nibabel load {nib['wall_s']:.2f} s",
        t_ratio,
        f"<= {TARGET_TIME_RATIO}x",
        t_ratio <= TARGET_TIME_RATIO,
    )
    i_ratio = conv["inproc_s"] / nib["inproc_s"]
    row(
        f"Conversion in-process (`convert()` call), {n0} slices",
        f"{conv['inproc_s']:.2f} s",
        f"nibabel load {nib['inproc_s']:.2f} s",
        i_ratio,
        f"<= {TARGET_TIME_RATIO}x",
        i_ratio <= TARGET_TIME_RATIO,
    )

    def second(stat: dict[str, Any]) -> float:
        return statistics.median(run["second_seconds"] for run in stat["runs"])

    twice, nib_twice = r["convert_twice"], r["nib_load_twice"]
    s_ratio = second(twice) / second(nib_twice)
    row(
        f"Conversion per case in a running process (second case), {n0} slices",
        f"{second(twice):.2f} s",
        f"nibabel second load {second(nib_twice):.2f} s",
        s_ratio,
        f"<= {TARGET_TIME_RATIO}x",
        s_ratio <= TARGET_TIME_RATIO,
    )
    rows.append(
        (
            f"Where the child's wall time goes, {n0} slices",
            _breakdown(conv),
            _breakdown(nib),
            "—",
            "—",
            "—",
        )
    )
    row(
        f"Conversion peak RSS, {n0} slices",
        f"{conv['peak_mb']:.0f} MB",
        f"nibabel load {nib['peak_mb']:.0f} MB",
        conv["peak_mb"] / nib["peak_mb"],
        f"<= {TARGET_PEAK_MB:.0f} MB",
        conv["peak_mb"] <= TARGET_PEAK_MB,
    )
    t4 = conv4["wall_s"] / nib4["wall_s"]
    row(
        f"Conversion wall time, {n1} slices (child process)",
        f"{conv4['wall_s']:.2f} s",
        f"nibabel load {nib4['wall_s']:.2f} s",
        t4,
        f"<= {TARGET_TIME_RATIO}x",
        t4 <= TARGET_TIME_RATIO,
    )
    i4 = conv4["inproc_s"] / nib4["inproc_s"]
    row(
        f"Conversion in-process, {n1} slices",
        f"{conv4['inproc_s']:.2f} s",
        f"nibabel load {nib4['inproc_s']:.2f} s",
        i4,
        f"<= {TARGET_TIME_RATIO}x",
        i4 <= TARGET_TIME_RATIO,
    )
    growth = conv4["peak_mb"] / conv["peak_mb"]
    row(
        f"Conversion peak RSS, {n1} slices",
        f"{conv4['peak_mb']:.0f} MB",
        f"{n0} slices {conv['peak_mb']:.0f} MB (nibabel {nib4['peak_mb']:.0f} MB)",
        growth,
        f"<= {TARGET_PEAK_MB:.0f} MB and <= {TARGET_GROWTH}x",
        conv4["peak_mb"] <= TARGET_PEAK_MB and growth <= TARGET_GROWTH,
    )
    ct_ratio = sz["ct_level0"] / src["ct"]
    row(
        "Level-0 CT array",
        _mb(sz["ct_level0"]),
        f"CT .nii.gz {_mb(src['ct'])}",
        ct_ratio,
        f"<= {TARGET_CT_RATIO}x",
        ct_ratio <= TARGET_CT_RATIO,
    )
    m_ratio = sz["mask_level0"] / src["mask"]
    row(
        "Level-0 mask array",
        _mb(sz["mask_level0"]),
        f"mask .nii.gz {_mb(src['mask'])}",
        m_ratio,
        f"<= {TARGET_MASK_RATIO}x",
        m_ratio <= TARGET_MASK_RATIO,
    )
    row(
        f"CT pyramid, levels 1..{sz['levels'] - 1}",
        _mb(sz["ct_levels1plus"]),
        f"level 0 {_mb(sz['ct_level0'])}",
        sz["ct_levels1plus"] / sz["ct_level0"],
        "—",
        None,
    )
    row(
        f"Mask pyramid, levels 1..{sz['levels'] - 1}",
        _mb(sz["mask_levels1plus"]),
        f"level 0 {_mb(sz['mask_level0'])}",
        sz["mask_levels1plus"] / sz["mask_level0"],
        "—",
        None,
    )
    row(
        f"Label index ({r['index']['labels']} labels)",
        _mb(sz["index"]),
        f"mask level 0 {_mb(sz['mask_level0'])}",
        sz["index"] / sz["mask_level0"],
        "—",
        None,
    )
    total_src = src["ct"] + src["mask"]
    row(
        "Whole store (all levels, index, header, metadata)",
        _mb(sz["store_total"]),
        f"both .nii.gz {_mb(total_src)}",
        sz["store_total"] / total_src,
        "—",
        None,
    )
    nz = r.get("niizarr")
    if nz and "wall_s" in nz:
        row(
            f"nifti-zarr `nii2zarr` CT, defaults ({n0} slices), wall time",
            f"{nz['wall_s']:.2f} s",
            f"ctzarr CT + mask {conv['wall_s']:.2f} s",
            nz["wall_s"] / conv["wall_s"],
            "—",
            None,
        )
        row(
            "nifti-zarr `nii2zarr` CT, peak RSS",
            f"{nz['peak_mb']:.0f} MB",
            f"ctzarr {conv['peak_mb']:.0f} MB",
            nz["peak_mb"] / conv["peak_mb"],
            "—",
            None,
        )
        row(
            "nifti-zarr `nii2zarr` CT store (all levels)",
            _mb(nz["store_bytes"]),
            f"ctzarr CT all levels {_mb(sz['ct_level0'] + sz['ct_levels1plus'])}",
            nz["store_bytes"] / (sz["ct_level0"] + sz["ct_levels1plus"]),
            "—",
            None,
        )
    else:
        rows.append(
            ("nifti-zarr `nii2zarr` CT", (nz or {}).get("status", "not run"), "—", "—", "—", "—")
        )

    head = ("Measure", "ctzarr", "Baseline", "Ratio", "Target", "Met")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(x) + " |" for x in rows]
    return "\n".join(lines)


def describe(r: dict[str, Any]) -> str:
    """One paragraph about the data and the machine, printed above the table."""
    d = r["data"]
    return (
        f"Case: int16 CT {' x '.join(map(str, d['shape_zyx']))} (z, y, x) at "
        f"{' x '.join(map(str, d['spacing_zyx']))} mm, uint8 mask with {d['label_ids']} label ids "
        f"({d['phantom_label_ids']} from make_phantom, the rest by z-subdivision), "
        f"{100 * d['labelled_fraction']:.0f} % of voxels labelled; growth case tiled "
        f"{d['tile_z']}x along z. Times: median of {r['repeats']} runs; peak RSS: max of the runs. "
        f"{r['machine']}."
    )


# ------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------


def _ctzarr_location() -> str:
    """Where the children import ctzarr from (PYTHONPATH may point at another checkout)."""
    return subprocess.run(
        [sys.executable, "-c", "import ctzarr, os; print(os.path.dirname(ctzarr.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--data",
        type=Path,
        default=REPO / "bench-data",
        help="data directory (default bench-data/)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="small 100x256x256 case, one repeat (smoke test)"
    )
    ap.add_argument(
        "--repeats", type=int, default=None, help="runs per timed step (default 3, quick 1)"
    )
    ap.add_argument("--skip-niizarr", action="store_true", help="do not install or run nifti-zarr")
    args = ap.parse_args(argv)
    data: Path = args.data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    geo = QUICK if args.quick else FULL
    n = args.repeats or (1 if args.quick else 3)
    tag = "quick" if args.quick else "dap"
    out = data / "out"
    out.mkdir(exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    base, tiled, warm = prepare_data(data, geo, tag)
    compile_package()
    log("warm-up conversion of a tiny case (kernel cache) ...")
    warm_run = bench_convert(warm, out / "warmup.zarr", 1)

    slices = [geo.shape_zyx[0], geo.shape_zyx[0] * geo.tile_z]
    r: dict[str, Any] = {
        "quick": args.quick,
        "repeats": n,
        "slices": slices,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "data": {
            **asdict(geo),
            **{
                k: base.info[k]
                for k in ("phantom_label_ids", "label_ids", "labelled_fraction", "split")
            },
        },
        "source_bytes": {"ct": base.ct.stat().st_size, "mask": base.mask.stat().st_size},
        "source_bytes_tiled": {"ct": tiled.ct.stat().st_size, "mask": tiled.mask.stat().st_size},
        "warmup": asdict(warm_run),
        "nib_load": {},
        "convert": {},
        "ctzarr": _ctzarr_location(),
    }
    for ds, slices_n in ((base, slices[0]), (tiled, slices[1])):
        log(f"nibabel load, {slices_n} slices x{n} ...")
        r["nib_load"][str(slices_n)] = asdict(bench_nib_load(ds, n))
        log(f"ctzarr.convert, {slices_n} slices x{n} ...")
        dest = out / f"ctzarr-{tag}-{slices_n}.zarr"
        r["convert"][str(slices_n)] = asdict(bench_convert(ds, dest, n))
        if ds is base:
            log(f"`ctzarr convert` command, {slices_n} slices x{n} ...")
            nib_alt, cli = bench_cli_convert(ds, dest, max(n, 5))
            r["cli_nib_load"], r["cli_convert"] = asdict(nib_alt), asdict(cli)
            r["cli_imports"] = cli_import_times(ds, dest)
        if ds is base:
            log(f"nibabel load twice in one process, {slices_n} slices x{n} ...")
            r["nib_load_twice"] = asdict(bench_nib_load(ds, n, "nib_load_twice"))
            log(f"ctzarr.convert twice in one process, {slices_n} slices x{n} ...")
            r["convert_twice"] = asdict(
                repeat(
                    lambda ds=ds, dest=dest: _self_cmd("convert_twice", str(ds.root), str(dest)),
                    n,
                    before=lambda dest=dest: (
                        shutil.rmtree(dest, ignore_errors=True),
                        shutil.rmtree(str(dest) + "-second", ignore_errors=True),
                    ),
                )
            )
            shutil.rmtree(str(dest) + "-second", ignore_errors=True)
            bench_convert(ds, dest, 1)  # leave the store of a single conversion for the size rows
            r["sizes"] = store_sizes(dest)
            r["index"] = index_summary(dest)

    if args.skip_niizarr:
        r["niizarr"] = {"status": "skipped (--skip-niizarr)"}
    elif args.quick and not (data / "venv-niizarr" / "bin" / "nii2zarr").exists():
        r["niizarr"] = {"status": "skipped in --quick (venv not installed yet)"}
    else:
        log("nifti-zarr venv ...")
        exe, status = ensure_niizarr_venv(data)
        r["niizarr"] = {"status": status}
        if exe is not None:
            log(f"nii2zarr CT x{n} ...")
            dest = out / f"niizarr-{tag}-{slices[0]}.nii.zarr"
            try:
                r["niizarr"].update(asdict(bench_niizarr(exe, base, dest, n)))
                r["niizarr"]["store_bytes"] = tree_bytes(dest)
            except RuntimeError as exc:
                r["niizarr"]["status"] = f"{status}; run failed: {str(exc)[-500:]}"

    r["table"] = build_table(r)
    (data / "bench_convert.json").write_text(json.dumps(r, indent=1) + "\n")
    print(describe(r))
    print()
    print(r["table"])
    log(f"\nresults: {data / 'bench_convert.json'}")
    return r


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
