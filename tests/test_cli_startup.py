"""The command line starts fast: what each kind of call imports, checked in a fresh process.

Startup *time* is measured in ``benchmarks/bench_startup.py`` (ratios to bare Python in the same
run); here the imports that cost it are pinned: ``--help``, ``CMD --help`` and usage errors import
nothing heavy, and ``info`` reads metadata without the dask/xarray/pandas reading side.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ctzarr.cli.main import build_parser

#: modules that cost 0.1-1 s to import; none is needed to parse arguments
HEAVY = ("numpy", "zarr", "dask", "xarray", "pandas", "numba", "scipy", "matplotlib", "fsspec")

#: the reading side: never needed to print what a store holds
READ_SIDE = ("dask", "xarray", "pandas", "numba", "matplotlib", "distributed")


def _imported_by(argv: list[str]) -> tuple[int, set[str], str]:
    """Run the CLI in a fresh process; (exit status, top-level modules imported, stdout)."""
    code = textwrap.dedent(
        f"""
        import contextlib, io, json, sys
        from ctzarr.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                status = main({argv!r})
            except SystemExit as exc:
                status = exc.code
        print(json.dumps([status, sorted({{m.partition(".")[0] for m in sys.modules}}),
                          out.getvalue()]))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    status, modules, out = json.loads(proc.stdout)
    return int(status), set(modules), str(out)


COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--version"],
        *([command, "--help"] for command in COMMANDS),
        ["crop", "store.zarr"],  # a usage error: arguments missing
        ["show", "s", "c", "x", "-o", "x.png", "--plane", "oblique"],
        ["no-such-command"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_help_and_usage_errors_import_nothing_heavy(argv: list[str]) -> None:
    status, modules, _ = _imported_by(argv)
    assert status in (0, 2)
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_info_reads_metadata_without_the_reading_side(saros_store: Path) -> None:
    status, modules, out = _imported_by(["info", str(saros_store), "--case", "case_000"])
    assert status == 0
    assert "muscle" in out
    assert not modules & set(READ_SIDE), sorted(modules & set(READ_SIDE))


GOLDEN = sorted((Path(__file__).parent / "golden").glob("format-*/*.zarr"))


def test_info_prints_what_open_collection_sees(saros_store: Path, dap_store: Path) -> None:
    """The light path of ``info`` and the library agree on every case and voxel count, for
    new stores and the committed stores of every earlier format."""
    import ctzarr

    assert GOLDEN
    for store in (saros_store, dap_store, *GOLDEN):
        col = ctzarr.open_collection(store)
        for cid in col.case_ids:
            _, _, out = _imported_by(["info", str(store), "--case", cid])
            case = col[cid]
            assert f"  {cid}: (z, y, x) {case.shape}," in out
            assert f"{case.levels} levels" in out
            for seg in case.segmentation_names:
                idx = case.index(seg)
                lm = col.segmentations[seg]
                assert f"    {seg}: {len(idx.labels)} labels present" in out
                for label, n in zip(idx.labels.tolist(), idx.voxel_count.tolist(), strict=True):
                    assert f"      {label:>4} {lm[label].name:<32} {n:>12} voxels" in out


def test_info_refuses_an_edited_case_as_the_library_does(dap_store: Path, tmp_path: Path) -> None:
    """The light path holds a case's document to its commit record, as opening the case does."""
    import shutil

    import ctzarr

    store = tmp_path / "edited.zarr"
    shutil.copytree(dap_store, store)
    cid = ctzarr.open_collection(store).case_ids[1]
    doc_path = store / "cases" / cid / "zarr.json"
    doc = json.loads(doc_path.read_text())
    doc["attributes"]["ctzarr"]["affine"][0][3] += 1.0  # a shifted origin: same shape, wrong place
    doc_path.write_text(json.dumps(doc))
    with pytest.raises(ctzarr.MetadataError) as info:
        ctzarr.open_collection(store)[cid]
    status, _, _ = _imported_by(["info", str(store)])
    assert status == 1
    proc = subprocess.run(
        [sys.executable, "-m", "ctzarr.cli", "info", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr == f"ctzarr: error: {info.value}\n"
