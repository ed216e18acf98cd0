"""The ``ctzarr`` command line: argument parsing, dispatch and the one-line error report.

This module imports nothing heavy (no zarr, numpy, dask, xarray, pandas, numba): ``ctzarr
--help``, ``ctzarr CMD --help`` and usage errors answer at once. Each command lives in
:mod:`ctzarr.cli.commands` (or :mod:`ctzarr.cli.info` for ``info``), imported only when it
runs, and calls one library function.

Bad input ends with one line on stderr and exit status 1 (2 for usage errors), never a
traceback; ``CTZARR_DEBUG=1`` shows tracebacks. A closed stdout (``ctzarr info STORE | head``)
ends quietly with status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from ctzarr import config
from ctzarr._version import __version__

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Convert whole-body CT segmentation datasets (DAP Atlas, SAROS, TotalSegmentator, or any
image/mask pairs) into chunked Zarr v3 / OME-Zarr stores, and query them: per-structure volume
and HU statistics for a whole cohort, crops of one structure with context, body composition
along the body, quick-look pictures. Stores may live on disk, in S3/GCS buckets or on an
HTTPS server.
"""

EPILOG = """\
examples:
  ctzarr demo                                   phantom datasets, converted and queried
  ctzarr convert DAP_Atlas/ dap.zarr            convert a dataset (layout detected)
  ctzarr info dap.zarr                          what a store holds
  ctzarr stats dap.zarr --structure liver -o liver.csv
  ctzarr crop dap.zarr CASE "kidney left" --margin-mm 10 -o kidney.nii.gz
  ctzarr show dap.zarr CASE liver -o liver.png
  ctzarr serve dap.zarr                         HTTP API, /zarr and a web page

Run "ctzarr COMMAND --help" for the options of a command. Remote stores: s3://, gs://,
https:// URLs (credentials from the usual AWS_* / GOOGLE_* variables or --storage-options).
CTZARR_DEBUG=1 shows the traceback of an error.
"""

LAYOUTS = ("dap_atlas", "saros", "totalsegmentator", "pairs")

WINDOW_HELP = (
    "CT window: a preset (soft_tissue W400/L40, lung W1500/L-600, liver W150/L90, "
    "bone W2500/L480, brain W80/L40) or WIDTH,LEVEL in HU "
    "(default: chosen from the structure's median HU)"
)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each help text (not for flags and unset options), descriptions and
    example epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if (
            action.default is None
            or action.default is False
            or action.default == argparse.SUPPRESS
            or "%(default)" in help_text
            or "(default" in help_text
        ):
            return help_text
        return super()._get_help_string(action)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help="fsspec options for a remote store, e.g. '{\"anon\": true}' or "
        '\'{"endpoint_url": "https://s3.example.org"}\' (default: credentials and endpoint '
        "from the environment)",
    )


def _add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on this dask scheduler, e.g. tcp://10.0.0.5:8786 (needs ctzarr[distributed])",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="start a local dask cluster of N worker processes (needs ctzarr[distributed]; "
        "default: threads of this process)",
    )


def _sub(
    sub: Any, name: str, help_text: str, description: str, examples: str
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=textwrap.fill(description, 88),  # raw descriptions: wrapped here
        epilog=examples,
        formatter_class=HelpFormatter,
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command (imports nothing heavy)."""
    p = argparse.ArgumentParser(
        prog="ctzarr", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    p.add_argument("--version", action="version", version=f"ctzarr {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO level)")
    p.add_argument(
        "--allow-local",
        action="store_true",
        help="let catalog entries point at local paths, file://, http:// or private hosts",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = _sub(
        sub,
        "demo",
        "generate phantom datasets, convert them and query them",
        "Write small phantom datasets in the DAP Atlas, SAROS (and TotalSegmentator) layouts into "
        "DIRECTORY, convert them to Zarr stores and print what the queries answer.",
        _examples("ctzarr demo", "ctzarr demo /tmp/ctzarr-demo -q"),
    )
    d.add_argument("directory", nargs="?", default="ctzarr-demo", help="where to write")
    d.add_argument("-q", "--quiet", action="store_true", help="no progress bars")

    c = _sub(
        sub,
        "convert",
        "convert a dataset into a collection store",
        "Convert a dataset (DAP Atlas, SAROS, TotalSegmentator, or a manifest of image/mask "
        "pairs) into a Zarr v3 collection store. A re-run resumes: complete cases whose "
        "source did not change are skipped, interrupted ones are redone.",
        _examples(
            "ctzarr convert DAP_Atlas/ dap.zarr",
            "ctzarr convert SAROS/ s3://bucket/saros.zarr --workers 4",
            "ctzarr convert manifest.csv out.zarr --layout pairs --labels labels.json",
            "ctzarr convert TotalSegmentator/ ts.zarr --case s0011 --case s0012",
        ),
    )
    c.add_argument("source", help="dataset directory or manifest CSV/YAML (path or URL)")
    c.add_argument("dest", help="collection store to write (.zarr path or s3://, gs:// URL)")
    c.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="dataset layout (default: detected from the files)",
    )
    c.add_argument(
        "--labels",
        action="append",
        metavar="[NAME=]FILE",
        help="label map file (JSON/YAML id -> name) of segmentation NAME; repeatable "
        "(default: the layout's own label maps)",
    )
    c.add_argument(
        "--case",
        action="append",
        metavar="ID",
        help="convert only this case; repeatable (default: every case)",
    )
    c.add_argument(
        "--overwrite", action="store_true", help="replace stored cases whose source changed"
    )
    _add_cluster(c)
    _add_storage_options(c)
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    i = _sub(
        sub,
        "info",
        "describe a store (or one case with --case)",
        "Describe a collection store: its dataset, segmentations and cases; with --case, the "
        "structures of that case and their voxel counts. Reads metadata only.",
        _examples(
            "ctzarr info dap.zarr",
            "ctzarr info dap.zarr --case AutoPET_0011f3deaf_10445",
            "ctzarr info s3://bucket/saros.zarr --storage-options '{\"anon\": true}'",
        ),
    )
    i.add_argument("store", help="collection store (path, URL or catalog name)")
    i.add_argument("--case", metavar="ID", help="list the structures of this case")
    _add_storage_options(i)

    e = _sub(
        sub,
        "export",
        "write a case back to NIfTI files",
        "Write a case's image and segmentations back to .nii.gz files in OUTDIR (created if "
        "missing), with the values and affine of the source files.",
        _examples("ctzarr export dap.zarr AutoPET_0011f3deaf_10445 out/"),
    )
    e.add_argument("store", help="collection store (path, URL or catalog name)")
    e.add_argument("case", help="case id")
    e.add_argument("outdir", help="output directory (created with its parents if missing)")
    _add_storage_options(e)

    v = _sub(
        sub,
        "verify",
        "check completeness, checksums and index of a store",
        "Check a store like fsck: every case complete, every object the one its manifest "
        "lists, every chunk decodes, every index agrees with the voxels. Exit status 1 when a "
        "problem is found.",
        _examples("ctzarr verify dap.zarr", "ctzarr verify dap.zarr --repair"),
    )
    v.add_argument("store", help="collection store (path, URL or catalog name)")
    v.add_argument(
        "--repair", action="store_true", help="remove leftovers of interrupted conversions"
    )
    _add_storage_options(v)

    st = _sub(
        sub,
        "stats",
        "per-structure statistics (volume, HU, centroid, bounding box)",
        "Per-structure statistics for every case (or the chosen ones), from the index written "
        "at conversion (no voxel read) or recomputed with --scan. With --within, only the "
        "voxels inside a structure of another segmentation count (body composition); with "
        "--at, the statistics of the one axial slice through a landmark's centroid.",
        _examples(
            "ctzarr stats dap.zarr --structure liver --structure spleen",
            "ctzarr stats dap.zarr -o stats.parquet",
            "ctzarr stats saros.zarr --segmentation body_regions --within body_parts:torso",
            'ctzarr stats dap.zarr --at "vertebrae L3" --structure "autochthon left" -o l3.csv',
        ),
    )
    st.add_argument("store", help="collection store (path, URL or catalog name)")
    st.add_argument(
        "--structure",
        action="append",
        metavar="NAME",
        help="structure name or id; repeatable (default: every structure present)",
    )
    st.add_argument(
        "--case", action="append", metavar="ID", help="only this case; repeatable (default: all)"
    )
    st.add_argument(
        "--segmentation",
        metavar="NAME",
        help="segmentation of the structures (default: every segmentation that has them)",
    )
    st.add_argument(
        "--within",
        metavar="SEG:STRUCTURE",
        help="count only voxels inside this structure of another segmentation, e.g. "
        "body_parts:torso",
    )
    st.add_argument(
        "--at",
        metavar="STRUCTURE",
        help="statistics on the axial slice through this landmark's centroid, e.g. \"vertebrae "
        'L3" (SEG:STRUCTURE when several segmentations have the name)',
    )
    st.add_argument(
        "--scan", action="store_true", help="recompute from the voxels instead of the index"
    )
    st.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="write the table to OUT.csv, OUT.parquet or OUT.json (default: print a summary)",
    )
    _add_cluster(st)
    _add_storage_options(st)

    pr = _sub(
        sub,
        "profile",
        "area and mean HU of a structure along z, slice by slice",
        "One row per axial slice holding the structure: voxel count, area (mm²), mean HU and "
        "the slice's world z (z_mm), read from the index. --plot draws area and mean HU "
        "along z with landmark slices marked (the structure's centroid, and the vertebrae "
        "present in the case).",
        _examples(
            "ctzarr profile saros.zarr case_000 muscle",
            "ctzarr profile dap.zarr CASE liver -o liver_profile.csv --plot liver_profile.png",
        ),
    )
    pr.add_argument("store", help="collection store (path, URL or catalog name)")
    pr.add_argument("case", help="case id")
    pr.add_argument("structure", help="structure name or id")
    pr.add_argument(
        "--segmentation",
        metavar="NAME",
        help="segmentation of the structure (default: the one that has it)",
    )
    pr.add_argument(
        "--scan", action="store_true", help="recompute from the voxels instead of the index"
    )
    pr.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="write the table to OUT.csv, OUT.parquet or OUT.json (default: print it)",
    )
    pr.add_argument(
        "--plot",
        metavar="OUT.png",
        help="also draw area and mean HU along z to OUT.png (or .jpg); needs ctzarr[show]",
    )
    _add_storage_options(pr)

    cr = _sub(
        sub,
        "crop",
        "crop a structure with a margin and write it as NIfTI",
        "Crop a structure's bounding box grown by --margin-mm and write the image to OUT "
        "and the labels beside it (OUT_labels.nii.gz, or OUT_labels.nii for an .nii OUT), with "
        "the affine that overlays the source. Reads only the chunks the box touches.",
        _examples(
            'ctzarr crop dap.zarr AutoPET_0011f3deaf_10445 "kidney left" --margin-mm 10 '
            "-o kidney.nii.gz",
            "ctzarr crop saros.zarr case_000 torso --segmentation body_parts -o crops/torso.nii",
        ),
    )
    cr.add_argument("store", help="collection store (path, URL or catalog name)")
    cr.add_argument("case", help="case id")
    cr.add_argument("structure", help="structure name or id")
    cr.add_argument(
        "--margin-mm", type=float, default=0.0, metavar="MM", help="margin around the box in mm"
    )
    cr.add_argument(
        "--segmentation",
        metavar="NAME",
        help="segmentation of the structure (default: the one that has it)",
    )
    cr.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT.nii.gz",
        help="image file, .nii.gz or .nii (parent folders created)",
    )
    _add_storage_options(cr)

    sh = _sub(
        sub,
        "show",
        "a picture of a structure: CT slices with its outline",
        "Draw CT slices through a structure (by default axial, coronal and sagittal through "
        "its centroid) in radiological convention, cropped to its box grown by --margin-mm, "
        "with the label outlined. The extension of OUT decides the format (.png, .jpg). Needs "
        "ctzarr[show].",
        _examples(
            "ctzarr show dap.zarr AutoPET_0011f3deaf_10445 liver -o liver.png",
            "ctzarr show dap.zarr CASE liver --plane axial --slice 40 --window liver -o l.png",
            "ctzarr show saros.zarr case_000 muscle --window 400,50 -o muscle.jpg",
        ),
    )
    sh.add_argument("store", help="collection store (path, URL or catalog name)")
    sh.add_argument("case", help="case id")
    sh.add_argument("structure", help="structure name or id")
    sh.add_argument(
        "--plane",
        choices=("axial", "coronal", "sagittal", "all"),
        default="all",
        help="which slice to draw; all = the three planes side by side",
    )
    sh.add_argument(
        "--slice",
        type=int,
        metavar="N",
        help="stored index of the slice along the plane's normal (axial: z, coronal: y, "
        "sagittal: x); needs one --plane (default: through the structure's centroid)",
    )
    sh.add_argument("--window", metavar="PRESET|W,L", help=WINDOW_HELP)
    sh.add_argument(
        "--margin-mm", type=float, default=20.0, metavar="MM", help="context around the box in mm"
    )
    sh.add_argument(
        "--segmentation",
        metavar="NAME",
        help="segmentation of the structure (default: the one that has it)",
    )
    sh.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="OUT.png",
        help="picture file, .png, .jpg or .jpeg (parent folders created)",
    )
    _add_storage_options(sh)

    sv = _sub(
        sub,
        "serve",
        "serve collections over HTTP: JSON API, /zarr bytes and a web page",
        "Serve collection stores over HTTP: a JSON API (cases, statistics, crops, rendered "
        "slices, profiles; OpenAPI at /api/v1/openapi.json), the stores' own bytes under "
        "/zarr/NAME/ with byte ranges and CORS (zarr-python, zarrita, Neuroglancer read through "
        "it) and a web page at /. Binds 127.0.0.1; another address needs --token-file or "
        "--no-auth. Prints one line once ready; SIGTERM drains and exits within 5 s. Needs "
        "ctzarr[serve].",
        _examples(
            "ctzarr serve dap.zarr",
            "ctzarr serve dap.zarr saros.zarr --port 8080",
            "ctzarr serve s3://bucket/dap.zarr --host 0.0.0.0 --token-file token.txt",
            "ctzarr serve dap.zarr --name dap --max-crop-voxels 20000000",
        ),
    )
    sv.add_argument(
        "stores", nargs="+", metavar="STORE", help="collection store (path, URL or catalog name)"
    )
    sv.add_argument("--host", default="127.0.0.1", help="address to bind")
    sv.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    sv.add_argument(
        "--token-file",
        metavar="FILE",
        help="require 'Authorization: Bearer TOKEN' with the token in FILE (whitespace stripped)",
    )
    sv.add_argument(
        "--no-auth", action="store_true", help="allow a non-loopback --host without a token"
    )
    sv.add_argument(
        "--allow-origin",
        default="*",
        metavar="ORIGIN",
        help="Access-Control-Allow-Origin of /zarr answers",
    )
    sv.add_argument(
        "--max-crop-voxels",
        type=int,
        default=64 * 1024 * 1024,
        metavar="N",
        help="largest crop answered (voxels); larger ones get 413 before any read",
    )
    sv.add_argument(
        "--slab-cache-mb",
        type=int,
        default=128,
        metavar="MB",
        help="memory for decoded slabs of the slices shown, so stepping through slices "
        "decodes each chunk once (0: no cache)",
    )
    sv.add_argument(
        "--name",
        action="append",
        metavar="NAME",
        help="public name of each STORE, in order (default: its dataset id)",
    )
    sv.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run method=scan statistics on this dask scheduler (needs ctzarr[distributed])",
    )
    _add_storage_options(sv)

    rx = _sub(
        sub,
        "reindex",
        "add per-chunk label counts to an older store (for patch sampling)",
        "Give the cases of a store written before format 3 the per-chunk voxel counts of each "
        "label that PatchSampler draws patch centres from: one pass over each case's label "
        "chunks, cached in the store (which must be writable). Cases that have them are left "
        "alone. Exit status 1 when a case fails.",
        _examples("ctzarr reindex dap.zarr", "ctzarr reindex dap.zarr --case case_000"),
    )
    rx.add_argument("store", help="collection store (path or URL; writable)")
    rx.add_argument(
        "--case", action="append", metavar="ID", help="only this case; repeatable (default: all)"
    )
    _add_storage_options(rx)

    k = _sub(
        sub,
        "catalog",
        "list the datasets of the catalog",
        "List the datasets of the catalog (catalog.yaml): description and where the converted "
        "store lives. Their names open with ctzarr info NAME.",
        _examples("ctzarr catalog", "ctzarr catalog --catalog my_catalog.yaml"),
    )
    k.add_argument(
        "--catalog",
        metavar="FILE",
        help="catalog file (default: $CTZARR_CATALOG, else the catalog shipped with ctzarr)",
    )
    return p


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The function of a command, imported only now (the heavy imports are in there)."""
    if name == "info":
        from ctzarr.cli import info

        return info.cmd_info
    from ctzarr.cli import commands

    return getattr(commands, f"cmd_{name}")  # type: ignore[no-any-return]


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not raise again
    (the Python docs' note on SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    debug = False
    try:
        debug = bool(config.get("debug"))  # CTZARR_DEBUG=1
        func = _command(args.command)
        from ctzarr.io.urls import allow_local_targets

        with allow_local_targets(True if args.allow_local else None):
            status = int(func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
        return status
    except BrokenPipeError:  # `ctzarr info STORE | head -3`: the reader has what it wanted
        _quiet_stdout()
        return 0
    except KeyboardInterrupt:
        print("ctzarr: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure ends as one line, never a traceback
        if debug:
            raise
        from ctzarr.cli.errors import describe

        print(f"ctzarr: error: {describe(exc, args)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
