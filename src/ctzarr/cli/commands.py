"""The commands of ``ctzarr``: each parses its arguments and calls one library function.

Imported only when a command runs (see :mod:`ctzarr.cli.main`); the reading side (dask, xarray,
pandas) and the writing side (zarr's writer, the index kernels) load inside the commands that
need them, so that ``ctzarr convert`` does not pay for the reading side, nor ``ctzarr stats`` for
the writer.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctzarr import cli
from ctzarr.cli.paths import TABLE_FORMATS, output_path
from ctzarr.cli.storage import storage_options
from ctzarr.errors import CtzarrError, LayoutError
from ctzarr.extras import require

NIFTI_FORMATS = {".nii.gz": "nifti", ".nii": "nifti"}

if TYPE_CHECKING:
    import pandas as pd

    from ctzarr.read.collection import Collection

__all__ = [
    "cmd_catalog",
    "cmd_convert",
    "cmd_crop",
    "cmd_demo",
    "cmd_export",
    "cmd_profile",
    "cmd_reindex",
    "cmd_serve",
    "cmd_show",
    "cmd_stats",
    "cmd_verify",
]


def _structure(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def _open(args: argparse.Namespace) -> Collection:
    from ctzarr.read.collection import open_collection  # the reading side

    return open_collection(args.store, storage_options=storage_options(args.storage_options))


def _client(args: argparse.Namespace) -> Any:
    """A dask client from --scheduler ADDRESS or --workers N, else None (local threads)."""
    if not (getattr(args, "scheduler", None) or getattr(args, "workers", None)):
        return None
    option = "--scheduler" if args.scheduler else "--workers"
    require("distributed", "distributed", f"ctzarr {args.command} {option}")
    from ctzarr.run import cluster

    if args.scheduler:
        client = cluster.connect(args.scheduler)
    else:
        client = cluster.start_local_cluster(args.workers)
    print(f"dask dashboard: {client.dashboard_link}")
    return client


def cmd_demo(args: argparse.Namespace) -> int:
    from ctzarr.demo import run_demo

    run_demo(args.directory, progress=not args.quiet)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ctzarr.write.case_writer import retain_freed_memory
    from ctzarr.write.convert import convert

    if cli.OWNS_PROCESS:  # the console script's own process, not a caller's
        # The modules just imported live until exit: the collector need not walk them again
        # (full collections during a conversion scanned them, ~0.03 CPU-s per case).
        gc.freeze()
        retain_freed_memory()

    options = storage_options(args.storage_options)
    client = _client(args)
    try:
        report = convert(
            args.source,
            args.dest,
            layout=args.layout,
            cases=args.case or None,
            overwrite=args.overwrite,
            storage_options=options,
            progress=not args.quiet,
            labels=args.labels or None,
            client=client,
        )
    except FileNotFoundError as exc:
        if args.layout is None or isinstance(exc, CtzarrError) or exc.filename is None:
            raise
        # a layout forced on a dataset of another layout looks for files that are not there
        raise LayoutError(
            f"{args.source}: {exc.filename} not found: not a {args.layout} dataset "
            "(omit --layout to detect the layout)"
        ) from exc
    finally:
        if client is not None:
            client.close()
    print(report)
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    case = _open(args)[args.case]  # an unknown case fails before any folder is made
    for role, path in case.to_nifti(output_path(args.outdir, None, "OUTDIR")[0]).items():
        print(f"{role}: {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ctzarr.read.verify import verify

    report = verify(
        args.store, storage_options=storage_options(args.storage_options), repair=args.repair
    )
    print(report)
    for note in report.notes:  # what the store's format cannot prove
        print(f"ctzarr: note: {note}", file=sys.stderr)
    return 0 if report.ok or (args.repair and len(report.problems) == len(report.repaired)) else 1


def _check_table_output(out: str, command: str) -> None:
    """A table's -o: a known extension, and its library installed (before any work)."""
    _, fmt = output_path(out, TABLE_FORMATS, "-o", create=False)
    if fmt == "parquet":
        require("pyarrow", "parquet", f"{command} -o OUT.parquet")


def _write_table(df: pd.DataFrame, out: str, command: str) -> None:
    """Write a table in the format its extension names (checked before any work)."""
    path, fmt = output_path(out, TABLE_FORMATS, "-o", create=True)
    if fmt == "parquet":
        require("pyarrow", "parquet", f"{command} -o OUT.parquet")
        df.to_parquet(path, index=False)
    elif fmt == "json":
        _write_json(df, path)
    else:
        df.to_csv(path, index=False)
    print(f"{len(df)} rows -> {path}")


def _write_json(df: pd.DataFrame, path: Path) -> None:
    """Rows as JSON objects keyed by column, NaN as null, floats exact (pandas' own to_json
    rounds to 10 significant digits; Python's json writes the shortest exact repr)."""
    import pandas as pd

    records = df.astype(object).where(pd.notna(df), None).to_dict(orient="records")
    with path.open("w", encoding="utf-8") as f:
        json.dump(
            records, f, indent=1, default=lambda v: v.item() if hasattr(v, "item") else str(v)
        )
        f.write("\n")


def _print_table(df: pd.DataFrame, columns: list[str]) -> None:
    import pandas as pd

    if df.empty:  # not pandas' "Empty DataFrame / Columns: [...]"
        print("0 rows")
        return

    with pd.option_context("display.max_rows", None, "display.width", 200, "display.precision", 2):
        print(df[[c for c in columns if c in df]].to_string(index=False))


def cmd_stats(args: argparse.Namespace) -> int:
    from ctzarr.model.table import SUMMARY_COLUMNS

    if args.output:  # a bad -o fails before any case is read
        _check_table_output(args.output, "ctzarr stats")
    if args.at and args.within:
        raise ValueError("--at and --within: choose one (a slice, or voxels inside a structure)")
    if args.at and args.scan:
        raise ValueError("--at reads the one slice through the landmark: --scan does not apply")
    col = _open(args)
    client = _client(args)
    try:
        if args.at:
            df = col.slice_stats(
                at=_structure(args.at),
                structures=args.structure or None,
                segmentation=args.segmentation,
                cases=args.case or None,
                client=client,
            )
            extra = ["at_structure", "z", "area_mm2", "note"]
        else:
            df = col.stats(
                structures=args.structure or None,
                cases=args.case or None,
                segmentation=args.segmentation,
                method="scan" if args.scan else "index",
                client=client,
                within=args.within,
            )
            extra = ["within_structure", "annotated_slices"]
    finally:
        if client is not None:
            client.close()
    if args.output:
        _write_table(df, args.output, "ctzarr stats")
    else:
        if "note" in df and not df["note"].astype(bool).any():
            extra.remove("note")
        _print_table(df, [*SUMMARY_COLUMNS, *extra])
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    if args.output:
        _check_table_output(args.output, "ctzarr profile")
    if args.plot:
        from ctzarr.read.show import PICTURE_FORMATS

        output_path(args.plot, PICTURE_FORMATS, "--plot", create=False)
        require("matplotlib", "show", "ctzarr profile --plot")
    case = _open(args)[args.case]
    df = case.profile(
        _structure(args.structure),
        segmentation=args.segmentation,
        method="scan" if args.scan else "index",
    )
    if args.output:
        _write_table(df, args.output, "ctzarr profile")
    else:
        _print_table(df, list(df.columns))
    if args.plot:
        from ctzarr.read.show import render_profile

        path, _ = output_path(args.plot, PICTURE_FORMATS, "--plot", create=True)
        print(render_profile(case, df, path))
    return 0


def cmd_crop(args: argparse.Namespace) -> int:
    output_path(args.output, NIFTI_FORMATS, "-o", create=False)
    col = _open(args)
    case = col[args.case]
    structure = _structure(args.structure)
    case.crop_box(structure, args.margin_mm, args.segmentation)  # bad input: before any folder
    path, _ = output_path(args.output, NIFTI_FORMATS, "-o", create=True)
    written = case.crop_to_nifti(
        structure, path, margin_mm=args.margin_mm, segmentation=args.segmentation
    )
    for role, written_path in written.items():
        print(f"{role}: {written_path}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from ctzarr.read.show import PICTURE_FORMATS, parse_window, render_structure

    output_path(args.output, PICTURE_FORMATS, "-o", create=False)
    window = parse_window(args.window) if args.window else None
    if args.slice is not None and args.plane == "all":
        raise ValueError("--slice N needs one --plane (axial, coronal or sagittal)")
    require("matplotlib", "show", "ctzarr show")
    col = _open(args)
    case = col[args.case]
    structure = _structure(args.structure)
    case.crop_box(structure, args.margin_mm, args.segmentation)  # bad input: before any folder
    path, _ = output_path(args.output, PICTURE_FORMATS, "-o", create=True)
    out = render_structure(
        case,
        structure,
        path,
        segmentation=args.segmentation,
        margin_mm=args.margin_mm,
        window=window,
        plane=args.plane,
        slice_index=args.slice,
    )
    print(out)
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from ctzarr.catalog import catalog_path, load_catalog

    sources = load_catalog(args.catalog)
    print(f"catalog: {args.catalog or catalog_path()}")
    for name, entry in sources.items():
        desc = " ".join(str(entry.get("description", "")).split())
        url = (entry.get("args") or {}).get("urlpath", "")
        print(f"{name}\n  {desc[:160]}{'...' if len(desc) > 160 else ''}\n  store: {url}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    for module in ("fastapi", "uvicorn", "PIL"):
        require(module, "serve", "ctzarr serve")
    from ctzarr.serve.app import create_app
    from ctzarr.serve.server import check_bind, read_token_file, serve

    token = read_token_file(args.token_file) if args.token_file else None
    check_bind(args.host, token=token, no_auth=args.no_auth)  # before opening any store
    client = _client(argparse.Namespace(**{**vars(args), "workers": None}))
    app = create_app(
        args.stores,
        names=args.name,
        storage_options=storage_options(args.storage_options),
        token=token,
        allow_origin=args.allow_origin,
        max_crop_voxels=args.max_crop_voxels,
        client=client,
        slab_cache_mb=args.slab_cache_mb,
    )
    serve(app, host=args.host, port=args.port, token=token, no_auth=args.no_auth)
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    from ctzarr.train.counts import reindex

    report = reindex(
        args.store, storage_options=storage_options(args.storage_options), cases=args.case
    )
    print(report)
    for case_id, seg, message in report.failed:
        where = f"{case_id} {seg}".strip()
        print(f"ctzarr: error: {where}: {' '.join(message.split())}", file=sys.stderr)
    return 0 if report.ok else 1
