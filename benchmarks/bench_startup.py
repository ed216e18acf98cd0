"""Start-up benchmark of the ``ctzarr`` command line: what a per-case workflow pays per call.

Usage::

    python benchmarks/bench_startup.py [--repeats N] [--data DIR] [--top K]

Each command runs ``N`` times (default 15) in a fresh process, interleaved with the baseline
``python -c pass`` so that load on the machine hits both alike; the figure is the median wall
time of the command minus the median of the baseline, measured in the same run. Commands:

- ``ctzarr --help``, ``ctzarr stats --help``, and a usage error (``ctzarr crop STORE``): parse
  arguments only; target <= 0.20 s above bare Python;
- ``ctzarr info STORE`` and ``ctzarr info STORE --case ID``: read metadata only; target <= 0.60 s;
- ``ctzarr stats STORE --structure liver``: the reading side (dask, xarray, pandas), no target,
  shown for scale.

The store is a 2-case DAP-layout phantom (40 x 48 x 48) converted here into ``--data``
(default: a temporary directory). The entry point is run as ``python -m ctzarr.cli`` (the
console script adds only its own few lines). For each command the top entries of
``python -X importtime`` (cumulative microseconds, one run) show where the time goes.

Prints a Markdown table; ``--json FILE`` also writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_PARSE_S = 0.20
TARGET_INFO_S = 0.60


def _store(data: Path) -> tuple[Path, str]:
    """A small converted store (made once per data directory) and one of its case ids."""
    store = data / "startup.zarr"
    if not (store / "zarr.json").exists():
        import ctzarr
        from ctzarr.testing.phantom import write_dap_atlas

        write_dap_atlas(data / "src", n_cases=2, shape_zyx=(40, 48, 48), seed=5)
        report = ctzarr.convert(data / "src", store, progress=False)
        if not report.ok:
            raise SystemExit(f"conversion failed: {report}")
    import ctzarr

    return store, ctzarr.open_collection(store).case_ids[0]


def _wall(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


_IMPORTTIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)")


def _top_imports(argv: list[str], k: int) -> list[tuple[str, float]]:
    """The k packages (top-level names, at any depth of the import tree, ctzarr's excluded)
    with the largest cumulative import time, in ms."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *argv[1:]],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in proc.stderr.splitlines():
        m = _IMPORTTIME.match(line)
        if m and not m.group(4).startswith(("ctzarr", "encodings")) and "." not in m.group(4):
            rows.append((m.group(4), int(m.group(2)) / 1000))
    rows.sort(key=lambda r: -r[1])
    return rows[:k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--data", type=Path, help="where the small store goes (default: temp)")
    parser.add_argument("--top", type=int, default=4, help="importtime entries per command")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="ctzarr-bench-startup-")
        args.data = Path(tmp.name)
    args.data.mkdir(parents=True, exist_ok=True)
    store, case_id = _store(args.data)
    cli = [sys.executable, "-m", "ctzarr.cli"]
    commands: list[tuple[str, list[str], float | None]] = [
        ("ctzarr --help", [*cli, "--help"], TARGET_PARSE_S),
        ("ctzarr stats --help", [*cli, "stats", "--help"], TARGET_PARSE_S),
        ("ctzarr crop STORE (usage error)", [*cli, "crop", str(store)], TARGET_PARSE_S),
        ("ctzarr info STORE", [*cli, "info", str(store)], TARGET_INFO_S),
        (
            "ctzarr info STORE --case ID",
            [*cli, "info", str(store), "--case", case_id],
            TARGET_INFO_S,
        ),
        (
            "ctzarr stats STORE --structure liver",
            [*cli, "stats", str(store), "--structure", "liver"],
            None,
        ),
    ]
    bare = [sys.executable, "-c", "pass"]
    _wall(bare)  # warm the file cache
    for _, argv, _ in commands:
        _wall(argv)
    times: dict[str, list[float]] = {"bare": []}
    for name, _, _ in commands:
        times[name] = []
    for _ in range(args.repeats):
        times["bare"].append(_wall(bare))
        for name, argv, _ in commands:
            times[name].append(_wall(argv))
    base = statistics.median(times["bare"])
    results = []
    print(f"ctzarr CLI start-up, median of {args.repeats} fresh processes, {os.cpu_count()} cores")
    print(f"baseline `python -c pass`: {base:.3f} s ({sys.version.split()[0]})\n")
    print(
        "| command | median s | above bare python s | target | met | top imports (cumulative ms) |"
    )
    print("|---|---:|---:|---:|---|---|")
    for name, argv, target in commands:
        med = statistics.median(times[name])
        above = med - base
        top = _top_imports(argv, args.top)
        met = "" if target is None else ("yes" if above <= target else "no")
        tops = ", ".join(f"{mod} {ms:.0f}" for mod, ms in top)
        tgt = "" if target is None else f"<= {target:.2f}"
        print(f"| `{name}` | {med:.3f} | {above:.3f} | {tgt} | {met} | {tops} |")
        results.append(
            {
                "command": name,
                "median_s": med,
                "above_bare_s": above,
                "target_s": target,
                "times_s": times[name],
                "top_imports_ms": top,
            }
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"bare_s": base, "bare_times_s": times["bare"], "results": results}, indent=1
            )
        )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
