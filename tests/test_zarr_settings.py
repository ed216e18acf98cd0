"""zarr config set by ctzarr for a block, across threads and forks (``ctzarr.io.stores``).

What happened before (CI, twice): ``zarr.config.set`` used as a context manager in threads
whose blocks interleaved left the zarrs codec pipeline set for the rest of the process. The
test process then read an HTTP store through it (a 502 from opendal's own requests), and a
forked child, told by the config to use zarrs, waited forever on a rayon pool without threads.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.storage import FsspecStore, LocalStore

import ctzarr
from ctzarr.io.stores import UNSET, codec_pipeline, compact_json, zarr_settings

PIPELINE = "codec_pipeline.path"
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
    assert seen == {"pipeline": "zarrs.ZarrsCodecPipeline", "indent": None}
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


def test_a_remote_block_waits_for_the_rust_pipeline_to_be_unset(tmp_path: Path) -> None:
    """A remote store's arrays never get the Rust pipeline from another thread's block."""
    before = zarr.config.get(PIPELINE)
    remote = FsspecStore.from_url("memory://ctzarr-settings")
    entered, seen = threading.Event(), []

    def local() -> None:
        with codec_pipeline(LocalStore(tmp_path)):
            entered.set()
            time.sleep(0.3)
            seen.append(("local", zarr.config.get(PIPELINE)))

    def far() -> None:
        assert entered.wait(10)
        with codec_pipeline(remote):
            seen.append(("remote", zarr.config.get(PIPELINE)))

    _in_threads(local, far)
    assert seen == [("local", "zarrs.ZarrsCodecPipeline"), ("remote", before)]


def test_one_thread_asking_two_values_of_a_key_is_refused() -> None:
    with zarr_settings({"json_indent": None}):
        with pytest.raises(RuntimeError, match="json_indent"), zarr_settings({"json_indent": 4}):
            pass
        with zarr_settings({"json_indent": None}):  # the same value nests
            assert zarr.config.get("json_indent") is None
    assert zarr.config.get("json_indent") == 2
    with zarr_settings({PIPELINE: UNSET}):
        assert zarr.config.get(PIPELINE) != "zarrs.ZarrsCodecPipeline"


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
