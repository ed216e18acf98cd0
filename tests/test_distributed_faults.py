"""Faults on a Dask distributed cluster (reliability.md §7.G): a worker that dies once costs
nothing; a case whose task kills every worker it runs on fails alone, named, with nothing of it
committed; transient read errors are retried a bounded number of times; a client that goes
away mid-job leaves no committed partial case and a plain re-run resumes; random worker deaths
(``distributed.chaos.KillWorker``) end in a complete job or a clean failure.

Faults are injected from outside ctzarr, by a worker plugin (:class:`Fault`): the scheduler
hands it to every worker, including the ones a nanny starts after a death, and it patches one
ctzarr function in the worker process. Its counts live in files, shared by all workers and
surviving their deaths.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas.testing as pdt
import pytest
import zarr

import ctzarr
from ctzarr.errors import StoreError
from ctzarr.io.transactions import case_state

distributed = pytest.importorskip("distributed")
from distributed.diagnostics.plugin import WorkerPlugin  # noqa: E402

#: the scheduler gives up on a task after this many worker deaths (default 3): faster tests
ALLOWED_FAILURES = 1


# --------------------------------------------------------------------------------------------
# the fault plugin
# --------------------------------------------------------------------------------------------
class Fault(WorkerPlugin):
    """On every worker: make ``where`` ("convert": the start of ``convert_case``, "commit":
    ``CaseWriter.commit``, after every array is written, or "scan": ``scan_index_graph``) do
    ``action`` for ``case_id``: "exit" (``os._exit(1)``), "oserror" (a transient
    ``ConnectionResetError``), "store_error" (ctzarr's ``StoreError``, an OSError not worth a
    retry) or "pause" (sleep ``pause_s``, then go on), the first ``times`` calls (all if None).
    """

    def __init__(
        self,
        where: str,
        case_id: str | None,
        action: str,
        marker_dir: Path,
        times: int | None = None,
        pause_s: float = 0.0,
    ) -> None:
        self.name = f"ctzarr-test-fault-{uuid.uuid4().hex[:8]}"
        self.where, self.case_id, self.action = where, case_id, action
        self.marker_dir, self.times, self.pause_s = str(marker_dir), times, pause_s

    # --- counts, in files -------------------------------------------------------------------
    def calls(self) -> int:
        """How many times a worker reached ``where`` for the case."""
        return len(list(Path(self.marker_dir).glob("call-*")))

    def faults(self) -> int:
        """How many times the fault fired."""
        return len(list(Path(self.marker_dir).glob("fault-*")))

    def _claim_fault(self) -> bool:
        """True when this call is one of the first ``times`` (atomic across processes)."""
        if self.times is None:
            Path(self.marker_dir, f"fault-{uuid.uuid4().hex}").touch()
            return True
        for n in range(self.times):
            try:
                os.close(os.open(Path(self.marker_dir, f"fault-{n}"), os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                continue
            return True
        return False

    def _hit(self, case_id: str) -> None:
        if self.case_id is not None and case_id != self.case_id:
            return
        Path(self.marker_dir, f"call-{uuid.uuid4().hex}").touch()
        if not self._claim_fault():
            return
        if self.action == "exit":
            os._exit(1)
        if self.action == "oserror":
            raise ConnectionResetError(f"injected transient fault reading case {case_id}")
        if self.action == "store_error":
            raise StoreError(f"injected permanent fault reading case {case_id}")
        if self.action == "pause":
            time.sleep(self.pause_s)
            return
        raise AssertionError(self.action)

    # --- the patch ----------------------------------------------------------------------------
    def _target(self) -> tuple[Any, str]:
        # (ctzarr.convert is the function: the package re-exports it over the module's name)
        module = importlib.import_module
        return {
            "convert": (module("ctzarr.write.convert"), "convert_case"),
            "commit": (module("ctzarr.write.case_writer").CaseWriter, "commit"),
            "scan": (
                module("ctzarr.read.collection"),
                "scan_index_graph",
            ),  # the worker task calls it there
        }[self.where]

    def setup(self, worker: Any) -> None:
        owner, attr = self._target()
        real = getattr(owner, attr)
        self._real = real
        hit = self._hit
        if self.where == "convert":

            def patched(root: Any, ds: Any, spec: Any, **kw: Any) -> Any:
                hit(spec.case_id)
                return real(root, ds, spec, **kw)
        elif self.where == "commit":

            def patched(writer: Any, *a: Any, **kw: Any) -> Any:  # type: ignore[misc]
                hit(writer.case_id)
                return real(writer, *a, **kw)
        else:

            def patched(case: Any, *a: Any, **kw: Any) -> Any:  # type: ignore[misc]
                hit(case.case_id)
                return real(case, *a, **kw)

        setattr(owner, attr, patched)

    def teardown(self, worker: Any) -> None:
        owner, attr = self._target()
        setattr(owner, attr, self._real)


@contextlib.contextmanager
def injected(
    client: Any,
    tmp_path: Path,
    where: str,
    case_id: str | None,
    action: str,
    times: int | None = None,
    pause_s: float = 0.0,
) -> Iterator[Fault]:
    """Register a :class:`Fault` on the cluster for the duration of the block."""
    marker_dir = tmp_path / f"fault-{uuid.uuid4().hex[:8]}"
    marker_dir.mkdir()
    fault = Fault(where, case_id, action, marker_dir, times, pause_s)
    client.register_plugin(fault)
    try:
        yield fault
    finally:
        with contextlib.suppress(Exception):
            client.unregister_worker_plugin(fault.name)


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------
def _local_cluster(n_workers: int = 2, threads_per_worker: int = 1, **config: Any) -> Any:
    """A LocalCluster of nanny-managed worker processes; scheduler settings from ``config``."""
    import dask

    settings = {"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}
    settings |= {f"distributed.scheduler.{k.replace('_', '-')}": v for k, v in config.items()}
    with dask.config.set(settings):  # the scheduler (in this process) reads them as it starts
        return distributed.LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=":0",
            silence_logs=logging.CRITICAL,
        )


def _close(client: Any, cluster: Any) -> None:
    """Close a test cluster; never hang the suite on it.

    After many worker deaths a nanny may be restarting its worker while the cluster closes, and
    ``LocalCluster.close()`` without a timeout was seen to wait forever (once, in a full run).
    """
    client.close(timeout=30)
    try:
        cluster.close(timeout=30)
    except (TimeoutError, OSError) as exc:
        logging.getLogger(__name__).warning("test cluster did not close in time: %r", exc)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    cluster = _local_cluster()
    client = distributed.Client(cluster)
    try:
        yield client
    finally:
        _close(client, cluster)


@pytest.fixture
def healthy(client: Any) -> Any:
    """The module's client, with both workers up (a test before may have killed some)."""
    client.wait_for_workers(2, timeout=30)
    return client


def assert_cases_equal(col: Any, ref: Any, case_ids: list[str]) -> None:
    """Each case opens (whatever the case list says) and equals the reference case."""
    for cid in case_ids:
        a, b = col[cid], ref[cid]
        np.testing.assert_array_equal(a.affine, b.affine)
        np.testing.assert_array_equal(a.image.values, b.image.values)
        for seg in b.segmentation_names:
            np.testing.assert_array_equal(a.labels(seg).values, b.labels(seg).values)
        pdt.assert_frame_equal(a.stats(), b.stats(), check_exact=True)


def states(dest: Path, case_ids: list[str]) -> dict[str, str]:
    root = zarr.open_group(dest, mode="r")
    return {cid: case_state(root, cid)[0] for cid in case_ids}


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # surfaced by the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


# --------------------------------------------------------------------------------------------
# G1: a worker dies once during a query
# (during a conversion: test_distributed.py::test_worker_killed_mid_conversion_does_not_fail_the_job)
# --------------------------------------------------------------------------------------------
def test_worker_dying_once_mid_scan_changes_nothing(
    healthy: Any, dap_store: Path, tmp_path: Path
) -> None:
    col = ctzarr.open_collection(dap_store)
    victim = col.case_ids[1]
    local = col.stats(method="scan")
    with injected(healthy, tmp_path, "scan", victim, "exit", times=1) as fault:
        scan = col.stats(method="scan", client=healthy)
        assert fault.faults() == 1, "the worker never died"
        assert fault.calls() == 2, "the scan of the victim was not run again"
    pdt.assert_frame_equal(scan, local, check_exact=True)
    pdt.assert_frame_equal(scan, col.stats(), check_exact=True)


# --------------------------------------------------------------------------------------------
# G2: a case whose task kills every worker it runs on
# --------------------------------------------------------------------------------------------
def test_case_killing_every_worker_fails_alone_and_commits_nothing(
    healthy: Any, dap_source: Path, dap_store: Path, tmp_path: Path
) -> None:
    ref = ctzarr.open_collection(dap_store)
    cids = ref.case_ids
    bad, others = cids[1], [c for c in cids if c != cids[1]]
    dest = tmp_path / "c.zarr"
    # the worker dies as it is about to commit the case: every array of it is written
    with injected(healthy, tmp_path, "commit", bad, "exit") as fault:
        t0 = time.monotonic()
        report = ctzarr.convert(dap_source, dest, client=healthy, progress=False)
        seconds = time.monotonic() - t0
        deaths = fault.faults()
    print(f"KilledWorker case: {deaths} worker deaths, job {seconds:.1f} s")

    assert [r.case_id for r in report.failed] == [bad], report
    error = report.failed[0].error or ""
    assert error.startswith("worker died:"), error
    assert f"allowed-failures = {ALLOWED_FAILURES}" in error
    assert "Nothing of the case was committed" in error
    # the scheduler gave up after allowed-failures + 1 deaths; if a death was also blamed on a
    # case queued beside it, both were run again alone, and the bad case died as often again
    assert deaths in (ALLOWED_FAILURES + 1, 2 * (ALLOWED_FAILURES + 1)), deaths
    assert sorted(report.converted) == others
    assert f"FAILED {bad}: worker died" in str(report)

    assert states(dest, cids) == {c: "absent" if c == bad else "complete" for c in cids}
    col = ctzarr.open_collection(dest)
    assert col.case_ids == others
    assert_cases_equal(col, ref, others)
    pdt.assert_frame_equal(col.stats(), ref.stats(cases=others), check_exact=True)

    # once the fault is gone a plain re-run converts the case
    healthy.wait_for_workers(2, timeout=30)
    again = ctzarr.convert(dap_source, dest, client=healthy, progress=False)
    assert again.ok, again
    assert (again.converted, sorted(again.skipped)) == ([bad], others)
    col = ctzarr.open_collection(dest)
    assert col.case_ids == cids
    assert_cases_equal(col, ref, cids)
    pdt.assert_frame_equal(col.table(), ref.table(), check_exact=True)


def test_cases_blamed_beside_a_killer_are_run_again_alone(
    dap_source: Path, dap_store: Path, tmp_path: Path
) -> None:
    # one worker with two threads: the killer and another case always run side by side, so
    # every death is blamed on both and the scheduler gives up on both
    ref = ctzarr.open_collection(dap_store)
    cids = ref.case_ids[:2]
    bad, innocent = cids
    cluster = _local_cluster(n_workers=1, threads_per_worker=2)
    client = distributed.Client(cluster)
    try:
        with injected(client, tmp_path, "convert", bad, "exit") as fault:
            report = ctzarr.convert(
                dap_source, tmp_path / "c.zarr", cases=cids, client=client, progress=False
            )
            deaths = fault.faults()
    finally:
        _close(client, cluster)
    assert [r.case_id for r in report.failed] == [bad], report
    assert report.converted == [innocent]
    assert deaths == 2 * (ALLOWED_FAILURES + 1)
    n = ALLOWED_FAILURES + 1
    assert f"died {n} times beside other cases, then {n} times when run alone" in (
        report.failed[0].error or ""
    )
    assert states(tmp_path / "c.zarr", cids) == {bad: "absent", innocent: "complete"}
    assert_cases_equal(ctzarr.open_collection(tmp_path / "c.zarr"), ref, [innocent])


def test_cli_reports_a_worker_killing_case_in_one_line_and_exits_1(
    dap_source: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import dask

    import ctzarr.run.cluster
    from ctzarr.cli.main import main

    cids = sorted(p.name[: -len(".nii.gz")] for p in (dap_source / "images").iterdir())
    bad = cids[0]
    start = ctzarr.run.cluster.start_local_cluster
    clusters: list[Any] = []

    def start_with_fault(n_workers: int) -> Any:
        client = start(n_workers)
        clusters.append(client.cluster)
        marker_dir = tmp_path / "markers"
        marker_dir.mkdir()
        client.register_plugin(Fault("commit", bad, "exit", marker_dir))
        return client

    monkeypatch.setattr(ctzarr.run.cluster, "start_local_cluster", start_with_fault)
    dest = tmp_path / "c.zarr"
    try:
        with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
            status = main(["convert", str(dap_source), str(dest), "--workers", "2", "-q"])
    finally:
        for cluster in clusters:
            cluster.close()
    out = capsys.readouterr().out
    assert status == 1
    lines = [line for line in out.splitlines() if bad in line]
    assert len(lines) == 1, out
    assert lines[0].startswith(f"  FAILED {bad}: worker died: "), lines[0]
    assert "2 converted, 0 skipped (unchanged), 1 failed" in out
    assert states(dest, cids) == {c: "absent" if c == bad else "complete" for c in cids}


# --------------------------------------------------------------------------------------------
# G3: transient read errors
# --------------------------------------------------------------------------------------------
def test_scan_retries_a_transient_read_error(
    healthy: Any, dap_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ctzarr.run.cluster

    col = ctzarr.open_collection(dap_store)
    victim = col.case_ids[0]
    assert ctzarr.run.cluster.READ_RETRIES == 2
    with injected(healthy, tmp_path, "scan", victim, "oserror", times=2) as fault:
        scan = col.stats(method="scan", client=healthy)
        assert (fault.faults(), fault.calls()) == (2, 3)
    pdt.assert_frame_equal(scan, col.stats(), check_exact=True)

    # without retries the first fault ends the scan, naming the case
    monkeypatch.setattr(ctzarr.run.cluster, "READ_RETRIES", 0)
    with (
        injected(healthy, tmp_path, "scan", victim, "oserror", times=1) as fault,
        pytest.raises(
            StoreError,
            match=f"scan of case '{victim}'.*ConnectionResetError.*"
            r"injected transient fault.*\(tried 1 times\)",
        ),
    ):
        col.stats(method="scan", client=healthy)
    assert fault.calls() == 1


def test_scan_does_not_retry_a_ctzarr_error(healthy: Any, dap_store: Path, tmp_path: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    victim = col.case_ids[0]
    # StoreError is an OSError too, but says something about the data, not the moment
    with (
        injected(healthy, tmp_path, "scan", victim, "store_error") as fault,
        pytest.raises(StoreError) as info,
    ):
        col.stats(method="scan", client=healthy)
    assert fault.calls() == 1
    # the error as raised on the worker; its worker traceback is a note (pytest's match sees it)
    assert str(info.value) == f"injected permanent fault reading case {victim}"
    assert any("on the worker:" in note for note in info.value.__notes__)


# --------------------------------------------------------------------------------------------
# G4: the client goes away mid-job
# --------------------------------------------------------------------------------------------
def test_client_closed_mid_conversion_commits_no_partial_case_and_rerun_resumes(
    healthy: Any, dap_source: Path, dap_store: Path, tmp_path: Path
) -> None:
    ref = ctzarr.open_collection(dap_store)
    cids = ref.case_ids
    dest = tmp_path / "c.zarr"
    job_client = distributed.Client(healthy.scheduler.address)
    # every case pauses just before its commit: the client closes while all are unfinished
    with injected(healthy, tmp_path, "commit", None, "pause", pause_s=1.5) as fault:
        thread, outcome = in_thread(
            lambda: ctzarr.convert(dap_source, dest, client=job_client, progress=False)
        )
        deadline = time.monotonic() + 30
        while fault.calls() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fault.calls() > 0, "no case reached its commit"
        t0 = time.monotonic()
        job_client.close()
        thread.join(30)
        assert not thread.is_alive(), "convert() hung after its client closed"
        print(f"convert() returned {time.monotonic() - t0:.2f} s after its client closed")
        assert "error" not in outcome, outcome.get("error")
        report = outcome["value"]
        assert not report.ok
        for r in report.failed:
            assert r.error, r.error
            assert r.error.startswith("not finished: the dask client or scheduler went away"), (
                r.error
            )
            assert r.error.endswith("re-run to resume")
        assert set(report.converted) | {r.case_id for r in report.failed} == set(cids)
        # whatever is committed is whole (tasks still running may commit later: also whole)
        now = states(dest, cids)
        assert set(report.converted) <= {c for c, s in now.items() if s == "complete"}
        assert_cases_equal(
            ctzarr.open_collection(dest), ref, [c for c, s in now.items() if s == "complete"]
        )
        # let the orphaned tasks finish before the re-run
        while any(healthy.run(lambda dask_worker: len(dask_worker.state.executing)).values()):
            time.sleep(0.05)
    later = states(dest, cids)
    assert_cases_equal(
        ctzarr.open_collection(dest), ref, [c for c, s in later.items() if s == "complete"]
    )

    again = ctzarr.convert(dap_source, dest, client=healthy, progress=False)
    assert again.ok, again
    assert sorted(again.converted + again.skipped) == cids
    assert states(dest, cids) == dict.fromkeys(cids, "complete")
    col = ctzarr.open_collection(dest)
    assert_cases_equal(col, ref, cids)
    assert col.case_ids == cids
    pdt.assert_frame_equal(col.stats(), ref.stats(), check_exact=True)
    pdt.assert_frame_equal(col.table(), ref.table(), check_exact=True)


# --------------------------------------------------------------------------------------------
# G5: a bounded soak with random worker deaths
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def soak_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from ctzarr.testing.phantom import write_dap_atlas

    root = tmp_path_factory.mktemp("soak")
    src = root / "dap"
    write_dap_atlas(src, n_cases=6, shape_zyx=(64, 40, 40), seed=21)
    local = root / "local.zarr"
    assert ctzarr.convert(src, local, progress=False).ok
    return src, local


@pytest.mark.parametrize(("mode", "delay"), [("sys.exit", "1.5s"), ("segfault", "1s")])
def test_random_worker_deaths_end_complete_or_cleanly(
    mode: str, delay: str, soak_source: tuple[Path, Path], tmp_path: Path
) -> None:
    from distributed.chaos import KillWorker

    src, local = soak_source
    ref = ctzarr.open_collection(local)
    cids = ref.case_ids
    dest = tmp_path / "c.zarr"
    # sys.exit retires a worker for good (its nanny closes too): with none left the remaining
    # tasks fail after no-workers-timeout rather than wait forever
    cluster = _local_cluster(allowed_failures=3, no_workers_timeout="2s")
    client = distributed.Client(cluster)
    try:
        client.register_plugin(KillWorker(delay=delay, mode=mode), name="chaos")
        t0 = time.monotonic()
        report = ctzarr.convert(src, dest, client=client, progress=False)
        seconds = time.monotonic() - t0
    finally:
        _close(client, cluster)
    print(
        f"chaos {mode}: {len(report.converted)} converted, {len(report.failed)} failed "
        f"in {seconds:.1f} s"
    )
    assert seconds < 120  # liveness (no hang), not a speed claim: deaths come every second
    assert sorted(report.converted + [r.case_id for r in report.failed]) == cids
    now = states(dest, cids)
    complete = [c for c in cids if now[c] == "complete"]
    # a worker told to exit may finish its running task first: a case reported failed can be
    # committed afterwards, whole (checked below), never the other way round
    assert set(report.converted) <= set(complete), (report, now)
    assert all(r.error for r in report.failed)
    col = ctzarr.open_collection(dest)
    assert col.case_ids == complete
    assert_cases_equal(col, ref, complete)

    # a plain re-run (here without a cluster) finishes the job
    again = ctzarr.convert(src, dest, progress=False)
    assert again.ok, again
    assert sorted(again.skipped) == complete
    col = ctzarr.open_collection(dest)
    assert col.case_ids == cids
    assert_cases_equal(col, ref, cids)
    pdt.assert_frame_equal(col.table(), ref.table(), check_exact=True)
