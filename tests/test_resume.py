"""Commit last, resume after interruption (a real SIGKILL included), skip unchanged, refuse changed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import ctzarr
from ctzarr.io.transactions import case_state

from .conftest import nifti_zyx


@pytest.fixture
def dap_copy(dap_source: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(dap_source, dst, copy_function=shutil.copy2)
    return dst


def test_rerun_skips_unchanged_cases(dap_copy: Path, tmp_path: Path) -> None:
    dest = tmp_path / "s.zarr"
    first = ctzarr.convert(dap_copy, dest, progress=False)
    assert len(first.converted) == 3
    second = ctzarr.convert(dap_copy, dest, progress=False)
    assert second.converted == []
    assert len(second.skipped) == 3
    assert second.ok


def test_leftovers_of_an_interrupted_case_are_invisible_and_replaced(
    dap_copy: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "s.zarr"
    assert ctzarr.convert(dap_copy, dest, progress=False).ok
    cid = ctzarr.open_collection(dest).case_ids[1]
    # what a kill before the commit leaves: arrays written, group metadata without the marker
    grp = zarr.open_group(dest / "cases" / cid, mode="r+")
    attrs = dict(grp.attrs)
    grp.attrs.put({})
    (dest / "cases" / cid / "0" / "c" / "0" / "0" / "0").write_bytes(b"garbage")
    assert case_state(zarr.open_group(dest, mode="r"), cid)[0] == "partial"
    with pytest.raises(ctzarr.IncompleteCaseError):
        ctzarr.open_collection(dest)[cid]
    report = ctzarr.convert(dap_copy, dest, progress=False)
    assert report.converted == [cid]
    assert report.ok
    case = ctzarr.open_collection(dest)[cid]
    np.testing.assert_array_equal(
        case.image.values, nifti_zyx(dap_copy / "images" / f"{cid}.nii.gz")
    )
    assert case.meta.to_attributes()["ctzarr"]["source"] == attrs["ctzarr"]["source"]


def test_changed_source_is_an_error_unless_overwrite(dap_copy: Path, tmp_path: Path) -> None:
    dest = tmp_path / "s.zarr"
    assert ctzarr.convert(dap_copy, dest, progress=False).ok
    cid = ctzarr.open_collection(dest).case_ids[0]
    other = ctzarr.open_collection(dest).case_ids[1]
    # the same case id now comes from another (valid) file
    shutil.copy(dap_copy / "images" / f"{other}.nii.gz", dap_copy / "images" / f"{cid}.nii.gz")
    shutil.copy(dap_copy / "masks" / f"{other}.nii.gz", dap_copy / "masks" / f"{cid}.nii.gz")
    report = ctzarr.convert(dap_copy, dest, progress=False)
    assert [r.case_id for r in report.failed] == [cid]
    assert "--overwrite" in report.failed[0].error
    assert cid in report.failed[0].error
    assert len(report.skipped) == 2
    # the old case is untouched
    assert ctzarr.open_collection(dest)[cid].image.shape != ()
    assert cid in ctzarr.open_collection(dest).case_ids
    report = ctzarr.convert(dap_copy, dest, progress=False, overwrite=True)
    assert report.converted == [cid]
    assert report.ok
    np.testing.assert_array_equal(
        ctzarr.open_collection(dest)[cid].image.values,
        nifti_zyx(dap_copy / "images" / f"{other}.nii.gz"),
    )


def test_touched_but_identical_source_is_skipped(dap_copy: Path, tmp_path: Path) -> None:
    dest = tmp_path / "s.zarr"
    assert ctzarr.convert(dap_copy, dest, progress=False).ok
    for p in (dap_copy / "images").iterdir():
        os.utime(p, (time.time() + 100, time.time() + 100))
    report = ctzarr.convert(dap_copy, dest, progress=False)
    assert len(report.skipped) == 3, report


_KILL_SCRIPT = """
import sys, ctzarr
ctzarr.convert(sys.argv[1], sys.argv[2], progress=False)
"""


@pytest.mark.parametrize("delay_s", [0.05, 0.6, 1.2], ids=["early", "middle", "late"])
def test_sigkill_at_any_moment_then_rerun(tmp_path: Path, delay_s: float) -> None:
    """SIGKILL a real conversion; nothing partial is visible; a plain re-run completes it exactly."""
    from ctzarr.testing.phantom import write_dap_atlas

    src = tmp_path / "src"
    write_dap_atlas(src, n_cases=4, shape_zyx=(130, 96, 96), seed=9)
    dest = tmp_path / "k.zarr"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(src), str(dest)])
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (dest / "zarr.json").exists():
        root = zarr.open_group(dest, mode="r")
        for cid in sorted(root["cases"].group_keys()) if "cases" in root else []:
            state, _ = case_state(root, cid)
            if state != "complete":
                with pytest.raises((ctzarr.IncompleteCaseError, KeyError)):
                    ctzarr.open_collection(dest)[cid]
    report = ctzarr.convert(src, dest, progress=False)
    assert report.ok, report
    col = ctzarr.open_collection(dest)
    assert len(col.case_ids) == 4
    for cid in col.case_ids:
        np.testing.assert_array_equal(
            col[cid].image.values, nifti_zyx(src / "images" / f"{cid}.nii.gz")
        )
        np.testing.assert_array_equal(
            col[cid].labels().values, nifti_zyx(src / "masks" / f"{cid}.nii.gz")
        )
    assert ctzarr.convert(src, dest, progress=False).skipped == col.case_ids


def test_verify_reports_and_repair_removes_leftovers(dap_copy: Path, tmp_path: Path) -> None:
    from ctzarr.read.verify import verify

    dest = tmp_path / "s.zarr"
    assert ctzarr.convert(dap_copy, dest, progress=False).ok
    cid = ctzarr.open_collection(dest).case_ids[0]
    # a leftover of an interrupted run of another case id, next to the committed ones
    shutil.copytree(dest / "cases" / cid, dest / "cases" / "interrupted_case")
    grp = zarr.open_group(dest / "cases" / "interrupted_case", mode="r+")
    grp.attrs.put({})
    report = verify(dest)
    assert not report.ok
    assert any("interrupted_case" in p for p in report.problems)
    assert "interrupted_case" not in ctzarr.open_collection(dest).case_ids
    repaired = verify(dest, repair=True)
    assert repaired.repaired == ["interrupted_case"]
    assert not (dest / "cases" / "interrupted_case").exists()
    assert verify(dest).ok


def test_verify_finds_and_repair_removes_temporary_files_of_interrupted_writes(
    dap_copy: Path, tmp_path: Path
) -> None:
    """B9: zarr's LocalStore writes ``<key>.<hex>.partial`` then renames it; a kill in between
    leaves the temporary file. Reads are unaffected, verify flags it, --repair removes it."""
    from ctzarr.read.verify import verify

    dest = tmp_path / "p.zarr"
    assert ctzarr.convert(dap_copy, dest, progress=False).ok
    col = ctzarr.open_collection(dest)
    cid = col.case_ids[0]
    stray = dest / "cases" / cid / "zarr.0123abcd.partial"
    stray.write_bytes(b'{"zarr_format": 3, "node_type": "gr')
    before = col[cid].image.values
    report = verify(dest)
    assert report.problems == [
        f"leftover temporary file of an interrupted write: cases/{cid}/zarr.0123abcd.partial"
    ]
    np.testing.assert_array_equal(ctzarr.open_collection(dest)[cid].image.values, before)
    assert verify(dest, repair=True).repaired == [f"cases/{cid}/zarr.0123abcd.partial"]
    assert not stray.exists()
    assert verify(dest).ok
