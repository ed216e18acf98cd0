"""ctzarr on a Dask distributed cluster: same results as local runs, one bad case fails alone, a
worker killed mid-job costs nothing, and no secret travels inside the task graph."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas.testing as pdt
import pytest

import ctzarr

from .test_remote import (
    BUCKET,
    SECRET,
    assert_same_collection,
    fake_aws_environment,
    fast_moto_server,
    s3_filesystem,
    s3_options,
    unique_prefix,
)

distributed = pytest.importorskip("distributed")
cloudpickle = pytest.importorskip("cloudpickle")


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """Fake AWS credentials (the fake secret included) in the environment *before* the cluster
    starts, so that the worker processes inherit them; moto's S3 server with the test bucket."""
    with fake_aws_environment(), fast_moto_server() as endpoint:
        with contextlib.suppress(FileExistsError):  # moto keeps its buckets per process
            s3_filesystem(endpoint).mkdir(BUCKET)
        yield endpoint


@pytest.fixture(scope="module")
def client(moto_endpoint: str) -> Iterator[Any]:
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


class RecordingClient:
    """A Client proxy that pickles everything ctzarr hands to the cluster before passing it on."""

    _RECORDED = (
        "submit",
        "map",
        "compute",
        "persist",
        "scatter",
        "run",
        "run_on_scheduler",
        "register_plugin",
        "register_worker_plugin",
        "publish_dataset",
        "upload_file",
    )

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[str] = []
        self.pickles: list[bytes] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name not in self._RECORDED or not callable(attr):
            return attr

        def record(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            self.pickles.append(cloudpickle.dumps((args, kwargs)))
            return attr(*args, **kwargs)

        return record


def _case_ids(source: Path, layout: str) -> list[str]:
    if layout == "dap":
        return sorted(p.name[: -len(".nii.gz")] for p in (source / "images").iterdir())
    return sorted(p.name for p in source.iterdir() if p.is_dir())


# --------------------------------------------------------------------------------------------
# same results as local runs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dap", "saros"])
def test_cluster_conversion_equals_local(
    client: Any, which: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    source = request.getfixturevalue(f"{which}_source")
    local = ctzarr.open_collection(request.getfixturevalue(f"{which}_store"))
    report = ctzarr.convert(source, tmp_path / "c.zarr", client=client, progress=False)
    assert report.ok, report
    assert sorted(report.converted) == local.case_ids
    col = ctzarr.open_collection(tmp_path / "c.zarr")
    assert_same_collection(col, local)
    pdt.assert_frame_equal(col.stats(), local.stats(), check_exact=True)
    pdt.assert_frame_equal(col.table(), local.table(), check_exact=True)


@pytest.mark.parametrize("which", ["dap", "saros"])
def test_cluster_scan_equals_index(client: Any, which: str, request: pytest.FixtureRequest) -> None:
    col = ctzarr.open_collection(request.getfixturevalue(f"{which}_store"))
    index = col.stats()
    assert len(index) > 0
    pdt.assert_frame_equal(col.stats(method="scan", client=client), index, check_exact=True)
    cid = col.case_ids[-1]
    pdt.assert_frame_equal(
        col[cid].stats(method="scan", client=client), col[cid].stats(), check_exact=True
    )


def test_bad_case_fails_alone_on_the_cluster(
    client: Any, dap_source: Path, dap_store: Path, tmp_path: Path
) -> None:
    src = tmp_path / "dap"
    shutil.copytree(dap_source, src)
    cids = _case_ids(src, "dap")
    bad = cids[1]
    mask = src / "masks" / f"{bad}.nii.gz"
    mask.write_bytes(mask.read_bytes()[: mask.stat().st_size // 2])  # truncated gzip stream
    report = ctzarr.convert(src, tmp_path / "c.zarr", client=client, progress=False)
    assert not report.ok
    assert [r.case_id for r in report.failed] == [bad], report
    assert report.failed[0].error
    assert sorted(report.converted) == [c for c in cids if c != bad]
    col = ctzarr.open_collection(tmp_path / "c.zarr")
    assert col.case_ids == [c for c in cids if c != bad]
    assert_same_collection(col, ctzarr.open_collection(dap_store), col.case_ids)


# --------------------------------------------------------------------------------------------
# a worker dies mid-job
# --------------------------------------------------------------------------------------------
def _processing_convert_task(scheduler_processing: dict[str, Any]) -> tuple[str, str] | None:
    for addr, keys in scheduler_processing.items():
        for key in keys:
            if str(key).startswith("ctzarr-convert-"):
                return addr, str(key)
    return None


def test_worker_killed_mid_conversion_does_not_fail_the_job(client: Any, tmp_path: Path) -> None:
    from ctzarr.testing.phantom import write_dap_atlas

    client.wait_for_workers(2, timeout=60)
    src = tmp_path / "dap"
    write_dap_atlas(src, n_cases=3, shape_zyx=(96, 48, 48), seed=11)
    local = tmp_path / "local.zarr"
    assert ctzarr.convert(src, local, progress=False).ok

    pids = client.run(os.getpid)  # worker address -> pid
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["report"] = ctzarr.convert(
                src, tmp_path / "c.zarr", client=client, progress=False
            )
        except BaseException as exc:  # surfaced by the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    victim = None
    deadline = time.monotonic() + 30
    while victim is None and thread.is_alive() and time.monotonic() < deadline:
        victim = _processing_convert_task(client.processing())
        if victim is None:
            time.sleep(0.005)
    assert victim is not None, "no conversion task was ever seen running"
    addr, key = victim
    os.kill(pids[addr], signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive(), "the conversion never finished"
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    assert report.ok, report
    assert sorted(report.converted) == _case_ids(src, "dap")

    # the killed task really was run again elsewhere
    story = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.story(key))
    assert sum(1 for t in story if t[2] == "processing") >= 2, story

    col, ref = ctzarr.open_collection(tmp_path / "c.zarr"), ctzarr.open_collection(local)
    assert_same_collection(col, ref)
    pdt.assert_frame_equal(col.stats(), ref.stats(), check_exact=True)

    client.wait_for_workers(2, timeout=60)  # the nanny brings the worker back
    assert pids[addr] not in client.run(os.getpid).values()


# --------------------------------------------------------------------------------------------
# no secret in the task graph
# --------------------------------------------------------------------------------------------
def test_task_graphs_carry_no_secret(
    client: Any, moto_endpoint: str, dap_source: Path, dap_store: Path
) -> None:
    s3fs = pytest.importorskip("s3fs")
    # the workers see the secret in their environment: that is where credentials must come from
    assert set(client.run(os.environ.get, "AWS_SECRET_ACCESS_KEY").values()) == {SECRET}
    # and the check below would see a secret if one were pickled (fsspec pickles its arguments)
    leaky = s3fs.S3FileSystem(key="k", secret=SECRET, skip_instance_cache=True)
    assert SECRET.encode() in cloudpickle.dumps(leaky)

    so = s3_options(moto_endpoint)
    url = f"s3://{BUCKET}/{unique_prefix('cluster')}/dap.zarr"
    ref = ctzarr.open_collection(dap_store)
    cids = ref.case_ids[:1]
    rec = RecordingClient(client)
    report = ctzarr.convert(
        dap_source, url, storage_options=so, cases=cids, client=rec, progress=False
    )
    assert report.ok, report
    assert sorted(report.converted) == cids

    col = ctzarr.open_collection(url, storage_options=so)
    assert_same_collection(col, ref, cids)
    scan = col.stats(method="scan", client=rec)
    pdt.assert_frame_equal(scan, ref.stats(cases=cids), check_exact=True)

    assert rec.calls.count("submit") + rec.calls.count("map") + rec.calls.count("compute") >= 2, (
        rec.calls
    )
    # the recording holds what was really sent (the endpoint travels, the secret does not)
    assert any(moto_endpoint.encode() in blob for blob in rec.pickles)
    for blob in rec.pickles:
        assert SECRET.encode() not in blob
    # nor does anything the scheduler holds on to
    held = client.run_on_scheduler(
        lambda dask_scheduler: cloudpickle.dumps(
            [ts.run_spec for ts in dask_scheduler.tasks.values()]
        )
    )
    assert SECRET.encode() not in held
