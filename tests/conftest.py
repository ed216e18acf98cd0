"""Shared fixtures: small phantom datasets in the DAP Atlas and SAROS layouts, converted once."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import ctzarr
from ctzarr.testing.phantom import write_dap_atlas, write_saros

# Tests read nothing outside the repository: an audit hook records every file this process
# opens beside the checkout (a sibling directory, another checkout), and the session fails on any.
_REPO = Path(__file__).resolve().parents[1]
_BESIDE = str(_REPO.parent) + os.sep
_TEMP = tempfile.gettempdir() + os.sep
# a checkout directly in /, the home or the temp directory has no "beside" to guard
_GUARDED = _BESIDE not in ("/", str(Path.home()) + os.sep, _TEMP)
_OUTSIDE_READS: list[str] = []


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event != "open" or not _GUARDED or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.path.abspath(os.fsdecode(args[0]))  # noqa: PTH100 - normalises "..", no symlink resolution
    if path.startswith(_BESIDE) and not path.startswith((str(_REPO) + os.sep, _TEMP)):
        _OUTSIDE_READS.append(path)


sys.addaudithook(_audit)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OUTSIDE_READS:
        print(f"\ntests opened files outside the repository: {sorted(set(_OUTSIDE_READS))[:10]}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def dap_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dap") / "DAP_Atlas"
    write_dap_atlas(root, n_cases=3, shape_zyx=(70, 40, 36), seed=3)
    return root


@pytest.fixture(scope="session")
def saros_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("saros") / "SAROS"
    write_saros(root, n_cases=2, shape_zyx=(30, 32, 40), seed=4)
    return root


@pytest.fixture(scope="session")
def dap_store(dap_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("stores") / "dap.zarr"
    report = ctzarr.convert(dap_source, dest, progress=False)
    assert report.ok, report
    return dest


@pytest.fixture(scope="session")
def saros_store(saros_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("stores") / "saros.zarr"
    report = ctzarr.convert(saros_source, dest, progress=False)
    assert report.ok, report
    return dest


def nifti_zyx(path: Path | str) -> np.ndarray:
    """What nibabel reads, in ctzarr's (z, y, x) order."""
    data = np.asanyarray(nib.load(str(path)).dataobj)
    if data.ndim == 4:
        data = data[..., 0]
    return data.transpose(2, 1, 0)


def write_pairs(
    root: Path,
    cases: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    labels: dict[int, str] | None = None,
) -> tuple[Path, Path]:
    """A pairs-layout dataset from (ct_zyx, mask_zyx, affine) per case; returns (manifest, labels.json)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["case_id,image,seg"]
    for cid, (ct, mask, affine) in cases.items():
        nib.Nifti1Image(ct.transpose(2, 1, 0), affine).to_filename(root / f"{cid}_ct.nii.gz")
        nib.Nifti1Image(mask.transpose(2, 1, 0), affine).to_filename(root / f"{cid}_seg.nii.gz")
        lines.append(f"{cid},{cid}_ct.nii.gz,{cid}_seg.nii.gz")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(lines) + "\n")
    lab = root / "labels.json"
    lab.write_text(
        json.dumps(
            {str(k): v for k, v in (labels or {0: "background", 1: "a", 2: "b", 3: "c"}).items()}
        )
    )
    return manifest, lab
