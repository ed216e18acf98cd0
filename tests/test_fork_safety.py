"""Reads in forked children after the parent has read, as torch's DataLoader forks its workers.

What hung before ``ctzarr.io.stores``' fork hook (each found by this file): a child's read
through the zarrs codec pipeline after the parent had decoded through it (rayon's pool has no
thread in the child), and a child's read of an s3/https store through obstore after the parent
had read through it (tokio's runtime likewise). Every child runs under a timeout, so a hang
fails the test instead of hanging the run. A spawned worker, for its part, must not import
dask, xarray or pandas to serve patches.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import ctzarr
from ctzarr.io.stores import codec_pipeline, inherited_runtime

from .servers import http_server

pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

TIMEOUT_S = 60


def _with_stacks_on_hang(fn: Callable[..., Any], *args: Any) -> Any:
    """In the child: ``fn(*args)``, printing every thread's stack if it hangs (to stderr, which
    pytest shows with the failure)."""
    faulthandler.dump_traceback_later(TIMEOUT_S - 10, exit=False)
    try:
        return fn(*args)
    finally:
        faulthandler.cancel_dump_traceback_later()


def _in_forked_child(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a forked child; its result, or a failure when it hangs or raises."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        pending = pool.apply_async(_with_stacks_on_hang, (fn, *args))
        try:
            return pending.get(TIMEOUT_S)
        except multiprocessing.TimeoutError:
            pool.terminate()
            pytest.fail(f"a forked child hung for {TIMEOUT_S} s on {fn.__name__}")


def _zarrs_read(path: str) -> tuple[bool, float]:
    with codec_pipeline(None):
        arr = zarr.open_array(path, mode="r")
    return inherited_runtime("zarrs"), float(np.asarray(arr[:], np.float64).sum())


def test_zarrs_pipeline_after_the_parent_decoded(dap_store: Path) -> None:
    case_id = ctzarr.open_collection(dap_store).case_ids[0]
    path = str(dap_store / "cases" / case_id / "0")
    inherited, here = _zarrs_read(path)  # the parent decodes through zarrs: its pool starts
    assert not inherited
    assert _in_forked_child(_zarrs_read, path) == (True, here)


def _crop_and_patch(url: str, case_id: str, ds: Any) -> tuple[float, float, bytes]:
    col = ctzarr.open_collection(url)
    crop = col[case_id].crop("liver", margin_mm=5, lazy=False)
    image = col[case_id].image.values  # dask's threaded scheduler
    return float(crop["image"].values.sum()), float(image.sum()), ds[3]["image"].tobytes()


def test_local_reads_after_the_parent_read(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    case_id = col.case_ids[0]
    ds = ctzarr.PatchSampler(col, patch_size=(16, 24, 24), seed=3).dataset(8)
    here = _crop_and_patch(str(dap_store), case_id, ds)
    assert _in_forked_child(_crop_and_patch, str(dap_store), case_id, ds) == here


def test_https_reads_after_the_parent_read(dap_store: Path, tmp_path: Path) -> None:
    pytest.importorskip("obstore")
    shutil.copytree(dap_store, tmp_path / "dap.zarr")
    with http_server(tmp_path) as (base, _log):
        url = f"{base}/dap.zarr"
        col = ctzarr.open_collection(url)  # through obstore: its runtime starts here
        case_id = col.case_ids[0]
        ds = ctzarr.PatchSampler(col, patch_size=(16, 24, 24), seed=3).dataset(8)
        here = _crop_and_patch(url, case_id, ds)
        assert _in_forked_child(_crop_and_patch, url, case_id, ds) == here


def _patch_and_modules(ds: Any) -> tuple[bytes, list[str]]:
    sample = ds[2]
    heavy = sorted(m for m in ("dask", "xarray", "pandas") if m in sys.modules)
    return sample["image"].tobytes(), heavy


def test_spawned_worker_imports_no_dask_xarray_or_pandas(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    ds = ctzarr.PatchSampler(col, patch_size=(16, 24, 24), seed=3).dataset(8)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        image, heavy = pool.apply_async(_patch_and_modules, (ds,)).get(120)
    assert image == ds[2]["image"].tobytes()
    assert heavy == []
