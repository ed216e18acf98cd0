"""Conversion of a TotalSegmentator case (one mask file per structure) against nibabel.

Usage::

    python benchmarks/bench_totalseg.py [--data DIR] [--quick] [--repeats N]

The case: an int16 CT of 400 x 512 x 512 voxels (z, y, x) at 2.5 x 0.8 x 0.8 mm and 117 uint8
0/1 mask files ``segmentations/<name>.nii.gz`` named as TotalSegmentator's ``total`` task. The
masks come from a synthetic label map: ``make_phantom``'s structures, the largest cut into z
slabs until there are 117 (so every mask is non-empty: harder than a real case, where many are
empty), written with nibabel's default gzip level. Generated once, cached in
``<data>/totalseg`` (default ``/work/bench-data``).

Each measured step runs in a fresh child process (peak RSS of that child, from
``/usr/bin/time -f %M`` when present, else ``os.wait4``); times are taken inside the child:

1. baseline: nibabel loading the 118 files one after the other (``np.asanyarray(
   nib.load(p).dataobj)``, each array dropped before the next: holding 117 masks of 100 MB is
   what the streaming merge avoids);
2. ``ctzarr.convert`` of the case: masks merged slab by slab, pyramid, index, headers;
3. reading the masks only, two ways: every mask's gzip stream kept open across slabs (what
   ``MaskStackSource`` does, merge included) and reopened per slab with the prefix inflated
   again to reach the slab (reading only, no merge).

Targets (issue 12): conversion <= 1.5x the baseline, peak RSS <= 500 MB. Times are medians of
``--repeats`` runs, peak RSS the largest. A warm-up conversion of a tiny case runs first (numba
kernels load from their on-disk cache afterwards). ``--quick``: 64 x 256 x 256, one repeat.
Output: a Markdown table, also written to ``<data>/bench_totalseg.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
CASE = "s0001"
N_MASKS = 117
DATA_VERSION = 1
TARGET_TIME_RATIO = 1.5
TARGET_PEAK_MB = 500.0


@dataclass(frozen=True)
class Geometry:
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    seed: int = 0


FULL = Geometry((400, 512, 512), (2.5, 0.8, 0.8))
QUICK = Geometry((64, 256, 256), (2.5, 1.6, 1.6))


# -- data ------------------------------------------------------------------------------------


def split_to(labels: np.ndarray, n_parts: int) -> np.ndarray:
    """Relabel labels (uint8) into n_parts ids 1..n_parts: the largest structures cut in z slabs.

    Deterministic: a part is split at the median z of its voxels while there are fewer parts
    than wanted, the largest part first.
    """
    nz = labels.shape[0]
    per_z = np.stack([np.bincount(sl.ravel(), minlength=256) for sl in labels])  # (nz, 256)
    # parts: (voxels, source id, z start, z stop)
    parts = [(int(per_z[:, i].sum()), i, 0, nz) for i in range(1, 256) if per_z[:, i].sum() > 0]
    while len(parts) < n_parts:
        parts.sort(reverse=True)
        for k, (count, sid, z0, z1) in enumerate(parts):
            cum = np.cumsum(per_z[z0:z1, sid])
            cut = z0 + int(np.searchsorted(cum, cum[-1] / 2)) + 1
            if z0 < cut < z1:
                a = int(per_z[z0:cut, sid].sum())
                parts[k : k + 1] = [(a, sid, z0, cut), (count - a, sid, cut, z1)]
                break
        else:
            raise RuntimeError("cannot split the label map further")
    parts = sorted(parts[:n_parts], key=lambda p: (p[1], p[2]))
    out = np.zeros_like(labels)
    for z in range(nz):
        lut = np.zeros(256, np.uint8)
        for new_id, (_, sid, z0, z1) in enumerate(parts, start=1):
            if z0 <= z < z1:
                lut[sid] = new_id
        out[z] = lut[labels[z]]
    return out


def generate(root: Path, geom: Geometry) -> Path:
    """The case folder, generated when missing or stale."""
    import nibabel as nib

    from ctzarr.model.labels import totalsegmentator_label_map
    from ctzarr.testing.phantom import make_phantom

    case = root / CASE
    stamp = root / "bench-meta.json"
    meta = {"version": DATA_VERSION, "shape": geom.shape_zyx, "spacing": geom.spacing_zyx}
    if stamp.exists() and json.loads(stamp.read_text()) == json.loads(json.dumps(meta)):
        return case
    shutil.rmtree(root, ignore_errors=True)
    (case / "segmentations").mkdir(parents=True)
    print(f"generating {case} ...", file=sys.stderr)
    ct, labels = make_phantom(geom.shape_zyx, geom.spacing_zyx, seed=geom.seed, n_structures=33)
    ts = split_to(labels, N_MASKS)
    del labels
    dz, dy, dx = geom.spacing_zyx
    affine = np.diag([dx, dy, dz, 1.0])

    def save(path: Path, data_zyx: np.ndarray) -> None:
        img = nib.Nifti1Image(data_zyx.transpose(2, 1, 0), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
        nib.save(img, str(path))

    save(case / "ct.nii.gz", ct)
    del ct
    for lab in totalsegmentator_label_map("total"):
        if lab.value:
            save(case / "segmentations" / f"{lab.name}.nii.gz", (ts == lab.value).view(np.uint8))
    stamp.write_text(json.dumps(meta))
    return case


# -- children --------------------------------------------------------------------------------

_BASELINE = """
import json, sys, time, glob
import numpy as np, nibabel as nib
case = sys.argv[1]
files = [case + "/ct.nii.gz"] + sorted(glob.glob(case + "/segmentations/*.nii.gz"))
t0 = time.perf_counter()
total = 0
for f in files:
    total += np.asanyarray(nib.load(f).dataobj).nbytes
print(json.dumps({"seconds": time.perf_counter() - t0, "files": len(files), "bytes": total}))
"""

_CONVERT = """
import json, sys, time, warnings
t0 = time.perf_counter()
import ctzarr
t1 = time.perf_counter()
report = ctzarr.convert(sys.argv[1], sys.argv[2], progress=False)
t2 = time.perf_counter()
assert report.ok, str(report)
print(json.dumps({"seconds": t2 - t1, "import_seconds": t1 - t0}))
"""

_READ = """
import json, sys, time
import numpy as np
from ctzarr.model.labels import totalsegmentator_label_map
from ctzarr.sources.nifti import open_nifti
from ctzarr.sources.totalsegmentator import _MaskStream, open_mask_stack
import glob, os
case, how = sys.argv[1], sys.argv[2]
files = {os.path.basename(f): f for f in glob.glob(case + "/segmentations/*.nii.gz")}
stack = open_mask_stack("bench", "total", totalsegmentator_label_map("total"), files)
t0 = time.perf_counter()
if how == "open":
    for _ in stack.iter_slabs(64, reuse_buffers=2):
        pass
else:  # reopen each file per slab and inflate its prefix again
    nz = stack.shape_zyx[0]
    scratch = bytearray(64 * stack.shape_zyx[1] * stack.shape_zyx[2])
    for z0 in range(0, nz, 64):
        depth = min(64, nz - z0)
        for m in stack.members:
            with _MaskStream(m.source) as s:
                for z in range(0, z0, 64):
                    s.read_mask(scratch, z, 64)
                s.read_mask(scratch, z0, depth)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def run_child(args: list[str]) -> dict[str, Any]:
    """Run a child Python, returning its JSON report plus wall time and peak RSS (MB)."""
    timer = shutil.which("time", path="/usr/bin:/bin")
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        cmd = [sys.executable, *args]
        full = [timer, "-f", "%M", "-o", rss.name, *cmd] if timer else cmd
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out = proc.stdout.read().decode() if proc.stdout else ""
        err = proc.stderr.read().decode() if proc.stderr else ""
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            raise RuntimeError(f"{' '.join(args[:2])} exited with {code}:\n{err[-3000:]}")
        peak_kib = int(rss.read().split()[-1]) if timer else usage.ru_maxrss
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    report.update(wall=wall, peak_mb=peak_kib / 1024)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/work/bench-data"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-reopen", action="store_true", help="skip the reopen-per-slab read")
    args = parser.parse_args()
    geom = QUICK if args.quick else FULL
    repeats = 1 if args.quick else args.repeats
    root = args.data / ("totalseg-quick" if args.quick else "totalseg")
    case = generate(root, geom)
    src = case.parent
    out_root = Path(tempfile.mkdtemp(prefix="bench-ts-", dir=args.data))
    try:
        # warm-up: a tiny case, so numba's kernels come from the on-disk cache afterwards
        warm = out_root / "warm"
        run_child(
            [
                "-c",
                "import sys, ctzarr; from ctzarr.testing.phantom import write_totalsegmentator;"
                "write_totalsegmentator(sys.argv[1] + '/src', n_cases=1, shape_zyx=(8, 16, 16));"
                "ctzarr.convert(sys.argv[1] + '/src', sys.argv[1] + '/w.zarr', progress=False);"
                "print('{}')",
                str(warm),
            ]
        )
        runs: dict[str, list[dict[str, Any]]] = {
            "nibabel": [],
            "ctzarr": [],
            "open": [],
            "reopen": [],
        }
        for i in range(repeats):
            runs["nibabel"].append(run_child(["-c", _BASELINE, str(case)]))
            dest = out_root / f"ts-{i}.zarr"
            runs["ctzarr"].append(run_child(["-c", _CONVERT, str(src), str(dest)]))
            shutil.rmtree(dest, ignore_errors=True)
            runs["open"].append(run_child(["-c", _READ, str(case), "open"]))
            if not args.skip_reopen and i == 0:
                runs["reopen"].append(run_child(["-c", _READ, str(case), "reopen"]))
    finally:
        shutil.rmtree(out_root, ignore_errors=True)

    def med(name: str, key: str = "seconds") -> float:
        return statistics.median(r[key] for r in runs[name])

    def peak(name: str) -> float:
        return max(r["peak_mb"] for r in runs[name])

    base = med("nibabel")
    ratio = med("ctzarr") / base
    print(
        f"\nTotalSegmentator case {geom.shape_zyx} (z, y, x), {N_MASKS} masks + CT; "
        f"{repeats} repeat(s), medians; machine {os.cpu_count()} cores (shared: noisy)\n"
    )
    print("| step | seconds | x nibabel | peak RSS MB | target |")
    print("|---|---:|---:|---:|---|")
    print(f"| nibabel: load 118 files one by one | {base:.2f} | 1.00 | {peak('nibabel'):.0f} | |")
    print(
        f"| ctzarr convert (in process) | {med('ctzarr'):.2f} | {ratio:.2f} | "
        f"{peak('ctzarr'):.0f} | <= {TARGET_TIME_RATIO}x, <= {TARGET_PEAK_MB:.0f} MB "
        f"{'ok' if ratio <= TARGET_TIME_RATIO and peak('ctzarr') <= TARGET_PEAK_MB else 'MISSED'} |"
    )
    print(
        f"| ctzarr convert (whole child, incl. imports) | {med('ctzarr', 'wall'):.2f} | "
        f"{med('ctzarr', 'wall') / med('nibabel', 'wall'):.2f} (child/child) | | |"
    )
    print(
        f"| masks only: streams kept open, merged | {med('open'):.2f} | "
        f"{med('open') / base:.2f} | {peak('open'):.0f} | |"
    )
    if runs["reopen"]:
        print(
            f"| masks only: reopened per slab (read, no merge) | {med('reopen'):.2f} | "
            f"{med('reopen') / base:.2f} | {peak('reopen'):.0f} | |"
        )
    (args.data / ("bench_totalseg_quick.json" if args.quick else "bench_totalseg.json")).write_text(
        json.dumps({"geometry": geom.shape_zyx, "runs": runs}, indent=1)
    )


if __name__ == "__main__":
    main()
