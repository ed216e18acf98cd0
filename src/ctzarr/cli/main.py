"""The ``ctzarr`` command line: each command parses its arguments and calls one library function.

Bad input ends with one line on stderr and exit status 1 (2 for usage errors); never a
traceback. ``CTZARR_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ctzarr import config
from ctzarr._version import __version__
from ctzarr.catalog import catalog_path, load_catalog
from ctzarr.errors import CtzarrError
from ctzarr.extras import require
from ctzarr.io.urls import allow_local_targets
from ctzarr.model.table import SUMMARY_COLUMNS
from ctzarr.run import cluster
from ctzarr.write.convert import convert

__all__ = ["main"]


def _storage_options(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CtzarrError(f"--storage-options must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise CtzarrError("--storage-options must be a JSON object")
    return value


# The reading side (ctzarr.read, ctzarr.demo) pulls in dask.array, xarray and pandas (~1.5 s):
# imported by the commands that read, so that `ctzarr convert` and `ctzarr --help` start fast.


def cmd_demo(args: argparse.Namespace) -> int:
    from ctzarr.demo import run_demo  # heavy: the reading side

    run_demo(args.directory, progress=not args.quiet)
    return 0


def _client(args: argparse.Namespace) -> Any:
    """A dask client from --scheduler ADDRESS or --workers N, else None (local threads)."""
    if getattr(args, "scheduler", None):
        client = cluster.connect(args.scheduler)
    elif getattr(args, "workers", None):
        client = cluster.start_local_cluster(args.workers)
    else:
        return None
    print(f"dask dashboard: {client.dashboard_link}")
    return client


def cmd_convert(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        report = convert(
            args.source,
            args.dest,
            layout=args.layout,
            cases=args.case or None,
            overwrite=args.overwrite,
            storage_options=_storage_options(args.storage_options),
            progress=not args.quiet,
            labels=args.labels or None,
            client=client,
        )
    finally:
        if client is not None:
            client.close()
    print(report)
    return 0 if report.ok else 1


def cmd_info(args: argparse.Namespace) -> int:
    from ctzarr.read.collection import open_collection  # heavy: the reading side

    col = open_collection(args.store, storage_options=_storage_options(args.storage_options))
    print(col)
    for name, lm in col.segmentations.items():
        extra = f", ignore value {lm.ignore_value}" if lm.ignore_value is not None else ""
        print(
            f"  segmentation {name}: label map {lm.name!r}, {len(lm.structures())} structures{extra}"
        )
    cases = [args.case] if args.case else col.case_ids
    for cid in cases:
        case = col[cid]
        spacing = " x ".join(f"{s:g}" for s in case.spacing)
        print(
            f"  {cid}: (z, y, x) {case.shape}, spacing {spacing} mm, {case.levels} levels, "
            f"image {case.meta.nifti.value_dtype.str}"
        )
        if args.case:
            for seg in case.segmentation_names:
                idx = case.index(seg)
                lm = col.segmentations[seg]
                print(f"    {seg}: {len(idx.labels)} labels present")
                for label, n in zip(idx.labels.tolist(), idx.voxel_count.tolist(), strict=True):
                    print(f"      {label:>4} {lm[label].name:<32} {n:>12} voxels")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ctzarr.read.collection import open_collection  # heavy: the reading side

    col = open_collection(args.store, storage_options=_storage_options(args.storage_options))
    for role, path in col[args.case].to_nifti(args.outdir).items():
        print(f"{role}: {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ctzarr.read.verify import verify  # heavy: the reading side

    report = verify(
        args.store, storage_options=_storage_options(args.storage_options), repair=args.repair
    )
    print(report)
    for note in report.notes:  # what the store's format cannot prove
        print(f"ctzarr: note: {note}", file=sys.stderr)
    return 0 if report.ok or (args.repair and len(report.problems) == len(report.repaired)) else 1


def cmd_stats(args: argparse.Namespace) -> int:
    from ctzarr.read.collection import open_collection  # heavy: the reading side

    if args.output and str(args.output).endswith(".parquet"):  # before any case is read
        require("pyarrow", "parquet", "ctzarr stats -o OUT.parquet")
    col = open_collection(args.store, storage_options=_storage_options(args.storage_options))
    client = _client(args)
    try:
        df = col.stats(
            structures=args.structure or None,
            cases=args.case or None,
            segmentation=args.segmentation,
            method="scan" if args.scan else "index",
            client=client,
        )
    finally:
        if client is not None:
            client.close()
    if args.output:
        out = str(args.output)
        if out.endswith(".parquet"):
            df.to_parquet(out, index=False)
        elif out.endswith(".csv"):
            df.to_csv(out, index=False)
        else:
            raise ValueError(f"-o {out}: write .csv or .parquet")
        print(f"{len(df)} rows -> {out}")
    else:
        import pandas as pd  # heavy, and loaded by col.stats already

        cols = SUMMARY_COLUMNS + (["annotated_slices"] if "annotated_slices" in df else [])
        with pd.option_context(
            "display.max_rows", None, "display.width", 200, "display.precision", 2
        ):
            print(df[cols].to_string(index=False))
    return 0


def cmd_crop(args: argparse.Namespace) -> int:
    from ctzarr.read.collection import open_collection  # heavy: the reading side

    col = open_collection(args.store, storage_options=_storage_options(args.storage_options))
    written = col[args.case].crop_to_nifti(
        _structure(args.structure),
        args.output,
        margin_mm=args.margin_mm,
        segmentation=args.segmentation,
    )
    for role, path in written.items():
        print(f"{role}: {path}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ctzarr.read.collection import open_collection  # heavy: the reading side
    from ctzarr.read.show import render_structure  # heavy: matplotlib

    col = open_collection(args.store, storage_options=_storage_options(args.storage_options))
    path = render_structure(
        col[args.case],
        _structure(args.structure),
        args.output,
        segmentation=args.segmentation,
        margin_mm=args.margin_mm,
    )
    print(path)
    return 0


def _structure(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def cmd_catalog(args: argparse.Namespace) -> int:
    sources = load_catalog(args.catalog)
    print(f"catalog: {args.catalog or catalog_path()}")
    for name, entry in sources.items():
        desc = " ".join(str(entry.get("description", "")).split())
        url = (entry.get("args") or {}).get("urlpath", "")
        print(f"{name}\n  {desc[:160]}{'...' if len(desc) > 160 else ''}\n  store: {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    p = argparse.ArgumentParser(
        prog="ctzarr", description=__doc__.split("\n")[0] if __doc__ else None
    )
    p.add_argument("--version", action="version", version=f"ctzarr {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    p.add_argument(
        "--allow-local",
        action="store_true",
        help="let catalog entries point at local paths, file://, http:// or private hosts",
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser(
        "demo", help="generate phantom DAP Atlas and SAROS datasets, convert and query them"
    )
    d.add_argument("directory", nargs="?", default="ctzarr-demo")
    d.add_argument("-q", "--quiet", action="store_true")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser(
        "convert", help="convert a dataset (dap_atlas, saros or pairs layout) into a store"
    )
    c.add_argument("source", help="dataset directory or manifest CSV (path or fsspec URL)")
    c.add_argument("dest", help="collection store (.zarr path or fsspec URL)")
    c.add_argument("--layout", choices=["dap_atlas", "saros", "pairs"])
    c.add_argument(
        "--labels", action="append", metavar="[NAME=]FILE", help="label map (JSON/YAML id -> name)"
    )
    c.add_argument(
        "--case", action="append", metavar="ID", help="convert only this case (repeatable)"
    )
    c.add_argument("--overwrite", action="store_true", help="replace cases whose source changed")
    c.add_argument("--scheduler", metavar="ADDRESS", help="run on this dask scheduler")
    c.add_argument(
        "--workers", type=int, metavar="N", help="start a local cluster of N worker processes"
    )
    c.add_argument("--storage-options", metavar="JSON", help="fsspec options for remote URLs")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser("info", help="describe a store (or one case with --case)")
    i.add_argument("store")
    i.add_argument("--case")
    i.add_argument("--storage-options", metavar="JSON")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("export", help="write a case back to .nii.gz files")
    e.add_argument("store")
    e.add_argument("case")
    e.add_argument("outdir")
    e.add_argument("--storage-options", metavar="JSON")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("verify", help="check completeness, checksums and index of a store")
    v.add_argument("store")
    v.add_argument(
        "--repair", action="store_true", help="remove leftovers of interrupted conversions"
    )
    v.add_argument("--storage-options", metavar="JSON")
    v.set_defaults(func=cmd_verify)

    st = sub.add_parser(
        "stats", help="per-structure statistics (volume, HU, centroid, bounding box)"
    )
    st.add_argument("store")
    st.add_argument(
        "--structure", action="append", metavar="NAME", help="structure name or id (repeatable)"
    )
    st.add_argument("--case", action="append", metavar="ID", help="only this case (repeatable)")
    st.add_argument("--segmentation")
    st.add_argument(
        "--scan", action="store_true", help="recompute from the voxels instead of the index"
    )
    st.add_argument("-o", "--output", metavar="OUT.csv|OUT.parquet")
    st.add_argument("--scheduler", metavar="ADDRESS", help="run on this dask scheduler")
    st.add_argument(
        "--workers", type=int, metavar="N", help="start a local cluster of N worker processes"
    )
    st.add_argument("--storage-options", metavar="JSON")
    st.set_defaults(func=cmd_stats)

    cr = sub.add_parser("crop", help="crop a structure with a margin and write it as .nii.gz")
    cr.add_argument("store")
    cr.add_argument("case")
    cr.add_argument("structure")
    cr.add_argument("--margin-mm", type=float, default=0.0)
    cr.add_argument("--segmentation")
    cr.add_argument("-o", "--output", required=True, metavar="OUT.nii.gz")
    cr.add_argument("--storage-options", metavar="JSON")
    cr.set_defaults(func=cmd_crop)

    sh = sub.add_parser("show", help="three orthogonal slices through a structure, as PNG")
    sh.add_argument("store")
    sh.add_argument("case")
    sh.add_argument("structure")
    sh.add_argument("--margin-mm", type=float, default=20.0)
    sh.add_argument("--segmentation")
    sh.add_argument("-o", "--output", required=True, metavar="OUT.png")
    sh.add_argument("--storage-options", metavar="JSON")
    sh.set_defaults(func=cmd_show)

    k = sub.add_parser("catalog", help="list the datasets of the catalog")
    k.add_argument("--catalog", help="catalog file (default: $CTZARR_CATALOG or the shipped one)")
    k.set_defaults(func=cmd_catalog)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    debug = False
    try:
        debug = config.get("debug")  # CTZARR_DEBUG=1
        with allow_local_targets(True if args.allow_local else None):
            return int(args.func(args))
    except KeyboardInterrupt:
        print("ctzarr: interrupted", file=sys.stderr)
        return 130
    except (CtzarrError, OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        # store damage is a StoreCorruptError naming the key; whatever else escapes still ends
        # as one line, never a traceback or an empty message
        if debug:
            raise
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        msg = " ".join(msg.split())
        if isinstance(exc, RecursionError) or not msg:
            msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
        print(f"ctzarr: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
