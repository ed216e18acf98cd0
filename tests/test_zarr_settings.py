"""zarr config set by ctzarr for a block, across threads and forks (``ctzarr.io.stores``).

What happened before (CI, twice): ``zarr.config.set`` used as a context manager in threads
whose blocks interleaved left the zarrs codec pipeline set for the rest of the process. The
test process then read an HTTP store through it (a 502 from opendal's own requests), and a
forked child, told by the config to use zarrs, waited forever on a rayon pool without threads.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import FsspecStore, LocalStore

import ctzarr
from ctzarr.io.stores import codec_pipeline, compact_json, zarr_settings

PIPELINE = "codec_pipeline.path"
FAST = "ctzarr.io.stores.LocalStoresThroughZarrs"
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)


def _in_threads(*steps: Callable[[], None]) -> None:
    threads = [threading.Thread(target=s) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()


def test_interleaved_blocks_leave_the_config_as_it_was() -> None:
    """A enters, B enters, A leaves, B leaves: the order that leaked with zarr.config.set."""
    before = zarr.config.get(PIPELINE)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def a() -> None:
        with codec_pipeline(None):
            a_in.set()
            assert b_in.wait(10)
        a_out.set()

    def b() -> None:
        assert a_in.wait(10)
        with codec_pipeline(None), compact_json():
            b_in.set()
            assert a_out.wait(10)
            seen["pipeline"] = zarr.config.get(PIPELINE)  # A left: B's block still has it
            seen["indent"] = zarr.config.get("json_indent")

    _in_threads(a, b)
    assert seen == {"pipeline": FAST, "indent": None}
    assert zarr.config.get(PIPELINE) == before
    assert zarr.config.get("json_indent") == 2


def test_many_threads_opening_at_once_leave_nothing_behind(dap_store: Path) -> None:
    before = zarr.config.get(PIPELINE)
    col = ctzarr.open_collection(dap_store)
    case_id = col.case_ids[0]
    want = col[case_id].labels("anatomy").values
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(5):
                got = ctzarr.open_collection(dap_store)[case_id].labels("anatomy").values
                np.testing.assert_array_equal(got, want)
        except BaseException as exc:  # reported below
            errors.append(exc)

    _in_threads(*[reader] * 6)
    assert errors == []
    assert zarr.config.get(PIPELINE) == before


def _pipeline_of(arr: zarr.Array) -> str:
    return type(arr.async_array.codec_pipeline).__name__


def test_during_a_block_only_local_arrays_get_the_rust_pipeline(tmp_path: Path) -> None:
    """Arrays other threads open during a block: a remote store's keep zarr's pipeline (zarrs
    would read it through its own HTTP client), a local store's get zarrs."""
    remote = FsspecStore.from_url("memory://ctzarr-settings/a.zarr")
    zarr.create_array(remote, shape=(4, 4), chunks=(2, 2), dtype="i2", fill_value=0)[:] = 7
    local = LocalStore(tmp_path / "a.zarr")
    zarr.create_array(local, shape=(4, 4), chunks=(2, 2), dtype="i2", fill_value=0)[:] = 7
    entered, done = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def holder() -> None:
        with codec_pipeline(local):
            entered.set()
            assert done.wait(30)

    def other() -> None:
        assert entered.wait(10)
        try:
            far, near = zarr.open_array(remote, mode="r"), zarr.open_array(local, mode="r")
            seen["pipelines"] = _pipeline_of(far), _pipeline_of(near)
            seen["sums"] = int(far[:].sum()), int(near[:].sum())
        finally:
            done.set()

    _in_threads(holder, other)
    assert seen == {
        "pipelines": ("BatchedCodecPipeline", "ZarrsCodecPipeline"),
        "sums": (112, 112),
    }
    assert _pipeline_of(zarr.open_array(local, mode="r")) == "BatchedCodecPipeline"


def test_two_values_of_a_key_at_once_are_refused() -> None:
    with zarr_settings({"json_indent": None}):
        with pytest.raises(RuntimeError, match="json_indent"), zarr_settings({"json_indent": 4}):
            pass
        with zarr_settings({"json_indent": None}):  # the same value nests
            assert zarr.config.get("json_indent") is None
    assert zarr.config.get("json_indent") == 2


def _config_in_child() -> tuple[str, object]:
    return zarr.config.get(PIPELINE), zarr.config.get("json_indent")


def test_a_fork_during_another_threads_block_gets_the_config_outside_it() -> None:
    before = zarr.config.get(PIPELINE)
    entered, done = threading.Event(), threading.Event()

    def holder() -> None:
        with codec_pipeline(None), compact_json():
            entered.set()
            assert done.wait(60)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert entered.wait(10)
        with multiprocessing.get_context("fork").Pool(1) as pool:
            child = pool.apply_async(_config_in_child).get(60)
    finally:
        done.set()
        t.join(10)
    assert child == (before, 2)
    assert zarr.config.get(PIPELINE) == before
