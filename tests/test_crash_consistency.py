"""Crash consistency (reliability checklist B1-B7): a SIGKILL, a failing write, a failing commit,
a failing replacement and two converters on one store never leave a case that reads wrong, and a
plain re-run completes the store exactly.

Fault injection: :class:`FaultyStore` is a real ``zarr.storage.WrapperStore`` around a real
``LocalStore`` whose n-th matching ``set`` raises (once), passed to ``ctzarr.convert`` as the
destination. Being no ``LocalStore`` itself, it takes the code paths of object stores: locks by
write-then-read-back, the copying ``swap_in``, zarr's own codec pipeline.

Every comparison is an equality with nibabel's read of the source file (``nifti_zyx``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, WrapperStore

import ctzarr
from ctzarr.io.transactions import STAGING, case_state
from ctzarr.read.verify import verify
from ctzarr.testing.phantom import write_dap_atlas

from .conftest import nifti_zyx

#: two pyramid levels and two 64-slice shards at level 0: every kind of object, still small
SHAPE = (70, 64, 40)
#: the commit marker as the writer spells it (compact JSON: ``json_indent=None``)
MARKER = b'"complete": true'

LOCK_BUSY = "another converter is writing it"
LOCK_CONTENDED = "could not take its lock (contended)"
CASE_EXISTS = "already in the store from different source files"


# -- sources ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """Three DAP Atlas cases (RAS, LPS, big-endian); never modified by a test."""
    root = tmp_path_factory.mktemp("crash") / "DAP_Atlas"
    ids = write_dap_atlas(root, n_cases=3, shape_zyx=SHAPE, seed=21)
    return root, ids


@pytest.fixture(scope="module")
def other_source(tmp_path_factory: pytest.TempPathFactory, source: tuple[Path, list[str]]) -> Path:
    """The same case ids as ``source`` (same layout, same labels.json), other phantoms."""
    root, ids = source
    tmp = tmp_path_factory.mktemp("other")
    raw_ids = write_dap_atlas(tmp / "raw", n_cases=len(ids), shape_zyx=SHAPE, seed=22)
    out = tmp / "DAP_Atlas"
    for sub in ("images", "masks"):
        (out / sub).mkdir(parents=True)
        for cid, raw in zip(ids, raw_ids, strict=True):
            shutil.copy2(tmp / "raw" / sub / f"{raw}.nii.gz", out / sub / f"{cid}.nii.gz")
    shutil.copy2(root / "labels.json", out / "labels.json")
    for cid in ids:  # the two sources really differ, image and labels alike
        for sub in ("images", "masks"):
            assert not np.array_equal(
                nifti_zyx(root / sub / f"{cid}.nii.gz"), nifti_zyx(out / sub / f"{cid}.nii.gz")
            )
    return out


@pytest.fixture(scope="module")
def converted(source: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``source`` converted once; tests copy it (:func:`copy_store`) before changing anything."""
    dest = tmp_path_factory.mktemp("converted") / "dap.zarr"
    assert ctzarr.convert(source[0], dest, progress=False).ok
    return dest


def copy_store(converted: Path, dest: Path) -> Path:
    shutil.copytree(converted, dest)
    return dest


# -- helpers ---------------------------------------------------------------------------------------


def source_arrays(src: Path, cid: str) -> tuple[np.ndarray, np.ndarray]:
    return nifti_zyx(src / "images" / f"{cid}.nii.gz"), nifti_zyx(src / "masks" / f"{cid}.nii.gz")


def assert_case_equals(col: Any, cid: str, src: Path) -> None:
    """Image and labels of the stored case equal nibabel's read of ``src``'s files."""
    image, labels = source_arrays(src, cid)
    case = col[cid]
    np.testing.assert_array_equal(case.image.values, image, err_msg=f"{cid}: image")
    np.testing.assert_array_equal(case.labels().values, labels, err_msg=f"{cid}: labels")


def store_keys(dest: Path, prefix: str) -> list[str]:
    """Keys under ``prefix`` in the store at ``dest`` (a plain read-only LocalStore)."""
    if not dest.exists():
        return []
    store = LocalStore(dest, read_only=True)

    async def collect() -> list[str]:
        return sorted([k async for k in store.list_prefix(prefix)])

    return sync(collect())


def io_error(code: int) -> Callable[[str], OSError]:
    """An OSError like the kernel's for one key (``[Errno 28] No space left on device: 'key'``)."""
    return lambda key: OSError(code, os.strerror(code), key)


class Fault:
    """The ``nth`` (0-based) set whose key and bytes satisfy ``match`` raises ``error(key)``, once.

    ``on_fault(key)`` runs first, in a worker thread (the store call is on zarr's event loop,
    which stays free for what ``on_fault`` does through another store: read, or convert). With
    ``error=None`` the set then goes through: ``on_fault`` only interleaves something with it.
    """

    def __init__(
        self,
        match: Callable[[str, bytes], bool],
        nth: int,
        error: Callable[[str], BaseException] | None,
        on_fault: Callable[[str], Any] | None = None,
    ) -> None:
        self.match, self.nth, self.error, self.on_fault = match, nth, error, on_fault
        self.matched = 0
        self.fired: list[str] = []
        self._lock = threading.Lock()

    def hit(self, key: str, value: Buffer) -> bool:
        with self._lock:
            if not self.match(key, value.to_bytes()):
                return False
            n, self.matched = self.matched, self.matched + 1
            if n != self.nth:
                return False
            self.fired.append(key)
            return True


class FaultyStore(WrapperStore[LocalStore]):
    """A real LocalStore whose writes fail as its :class:`Fault` says; all else passes through."""

    def __init__(self, store: LocalStore, fault: Fault) -> None:
        super().__init__(store)
        self.fault = fault

    def _with_store(self, store: LocalStore) -> FaultyStore:
        return FaultyStore(store, self.fault)  # same fault, same count

    async def set(self, key: str, value: Buffer) -> None:
        if self.fault.hit(key, value):
            if self.fault.on_fault is not None:
                await asyncio.to_thread(self.fault.on_fault, key)
            if self.fault.error is not None:
                raise self.fault.error(key)
        await self._store.set(key, value)

    async def _set_many(self, values: Any) -> None:
        for key, value in values:
            await self.set(key, value)

    def set_sync(self, key: str, value: Buffer) -> None:
        if self.fault.hit(key, value):
            if self.fault.on_fault is not None:
                self.fault.on_fault(key)
            if self.fault.error is not None:
                raise self.fault.error(key)
        self._store.set_sync(key, value)


def faulty(dest: Path, fault: Fault) -> FaultyStore:
    return FaultyStore(LocalStore(dest), fault)


def assert_only_interruption_leftovers(report: Any) -> None:
    """verify() found only what an interrupted run leaves: never a fault in a complete case."""
    leftovers = (
        "incomplete (left by an interrupted conversion)",
        "stale lock (",
        "leftover of an interrupted replacement",
        "from an interrupted update",
        "leftover temporary file of an interrupted write",
    )
    assert all(any(s in p for s in leftovers) for p in report.problems), str(report)


# -- B1: SIGKILL a real conversion -----------------------------------------------------------------

#: 3 cases of this shape: ~1.3 s from "go" to the end on 2 idle cores
KILL_SHAPE = (100, 80, 80)
#: seconds after "go" over which the kill moments are drawn: about the duration of an
#: uninterrupted conversion of kill_source; a kill after the end (slow machine) only means that
#: seed found a finished store
KILL_WINDOW_S = 1.5
#: seeds whose random.Random(seed).uniform(0, 1) spread over the window: 8 %, 32 %, 46 %, 71 %, 96 %
KILL_SEEDS = [32, 7, 9, 24, 2]

_KILL_CHILD = """
import sys
from ctzarr import convert  # the writing side loads on first use: before "go", not after
print("go", flush=True)
convert(sys.argv[1], sys.argv[2], progress=False)
"""


@pytest.fixture(scope="module")
def kill_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("kill") / "DAP_Atlas"
    return root, write_dap_atlas(root, n_cases=3, shape_zyx=KILL_SHAPE, seed=9)


@pytest.mark.parametrize(
    "seed",
    KILL_SEEDS,
    ids=[
        f"seed{s}-kill-{random.Random(s).uniform(0, KILL_WINDOW_S):.2f}s-after-go"
        for s in KILL_SEEDS
    ],
)
def test_b1_sigkill_at_a_seeded_moment_then_plain_rerun(
    seed: int, kill_source: tuple[Path, list[str]], tmp_path: Path
) -> None:
    src, ids = kill_source
    dest = tmp_path / "k.zarr"
    delay = random.Random(seed).uniform(0, KILL_WINDOW_S)
    with open(tmp_path / "child.stderr", "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", _KILL_CHILD, str(src), str(dest)],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "go"  # imports done: convert() starts now
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)  # a no-op when the run has already finished
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
            proc.stdout.close()  # type: ignore[union-attr]
    assert proc.returncode in (-signal.SIGKILL, 0), (tmp_path / "child.stderr").read_text()

    # what the kill left: nothing that reads wrong
    if (dest / "zarr.json").exists():
        col = ctzarr.open_collection(dest)
        for cid in col.case_ids:
            assert_case_equals(col, cid, src)
        root = zarr.open_group(dest, mode="r")
        on_disk = (
            sorted(p.name for p in (dest / "cases").iterdir() if p.is_dir())
            if (dest / "cases").exists()
            else []
        )
        for cid in on_disk:
            if case_state(root, cid)[0] == "complete":  # committed (maybe not yet listed)
                assert_case_equals(col, cid, src)
            else:
                assert cid not in col.case_ids
                with pytest.raises((ctzarr.IncompleteCaseError, KeyError)):
                    col[cid]
        # a repairing run reports what it found (and removes it)
        assert_only_interruption_leftovers(verify(dest, repair=True))
        assert verify(dest).ok, str(verify(dest))

    report = ctzarr.convert(src, dest, progress=False)
    assert report.ok, str(report)
    col = ctzarr.open_collection(dest)
    assert col.case_ids == sorted(ids)
    for cid in ids:
        assert_case_equals(col, cid, src)
    third = ctzarr.convert(src, dest, progress=False)
    assert third.skipped == sorted(ids)
    assert third.converted == []
    assert third.ok


# -- B2 / B5: a write of one case fails (EIO, ENOSPC) ----------------------------------------------

WRITE_FAULTS = [
    # (keys counted, k: the k-th matching set fails, errno); SHAPE gives 28 sets per case
    # (no lock row: on a local disk the lock file is created with O_EXCL under any wrapper)
    pytest.param("case", 25, errno.EIO, id="EIO-case-set-25-label-group-commit"),
    pytest.param("case", 10, errno.ENOSPC, id="ENOSPC-case-set-10-shard"),
    pytest.param("case", 7, errno.ENOSPC, id="ENOSPC-case-set-7-nifti-header"),
    # one set of a zarr call that writes several documents at once: the others still land
    # while the case is removed
    pytest.param("case", 19, errno.EIO, id="EIO-case-set-19-index-array"),
]


@pytest.mark.parametrize(("where", "k", "code"), WRITE_FAULTS)
def test_b2_b5_failing_write_fails_only_that_case(
    where: str, k: int, code: int, source: tuple[Path, list[str]], tmp_path: Path
) -> None:
    src, ids = source
    cid, others = ids[1], [ids[0], ids[2]]
    dest = tmp_path / "f.zarr"
    prefix = f"locks/{cid}.json" if where == "lock" else f"cases/{cid}/"
    fault = Fault(lambda key, _: key.startswith(prefix), k, io_error(code))
    report = ctzarr.convert(src, faulty(dest, fault), progress=False)  # does not raise

    assert len(fault.fired) == 1, f"only {fault.matched} sets matched {prefix!r}"
    [key] = fault.fired
    assert [r.case_id for r in report.failed] == [cid]
    error = report.failed[0].error
    assert os.strerror(code) in error, error
    assert key in error, error
    assert report.converted == others
    # the failed case is gone entirely: not listed, no key left (the code deletes cases/<cid>/)
    col = ctzarr.open_collection(dest)
    assert col.case_ids == others
    with pytest.raises(KeyError) as exc:
        col[cid]
    assert not isinstance(exc.value, ctzarr.IncompleteCaseError)
    assert store_keys(dest, f"cases/{cid}/") == []
    assert not (dest / "cases" / cid).exists()
    assert store_keys(dest, "locks/") == []
    assert verify(dest).ok, str(verify(dest))
    for other in others:
        assert_case_equals(col, other, src)

    rerun = ctzarr.convert(src, dest, progress=False)
    assert rerun.ok, str(rerun)
    assert rerun.converted == [cid], str(rerun)
    assert rerun.skipped == others, str(rerun)
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ids
    for c in ids:
        assert_case_equals(col, c, src)


# -- B3: the commit itself fails -------------------------------------------------------------------


def test_b3_failing_commit_marker_write_leaves_the_case_absent(
    source: tuple[Path, list[str]], tmp_path: Path
) -> None:
    src, ids = source
    cid, others = ids[1], [ids[0], ids[2]]
    dest = tmp_path / "c.zarr"
    seen: dict[str, Any] = {}

    def observe(key: str) -> None:  # a reader at the moment the commit write fails
        col = ctzarr.open_collection(str(dest))
        seen["listed"] = cid in col.case_ids
        try:
            col[cid]
            seen["opened"] = "complete"
        except Exception as exc:
            seen["opened"] = type(exc).__name__

    commit_key = f"cases/{cid}/zarr.json"
    fault = Fault(
        lambda key, data: key == commit_key and MARKER in data, 0, io_error(errno.EIO), observe
    )
    store = faulty(dest, fault)
    report = ctzarr.convert(src, store, progress=False)

    assert fault.fired == [commit_key]  # the marker is spelled as MARKER in the committing write
    assert MARKER in (dest / "cases" / others[0] / "zarr.json").read_bytes()
    assert seen == {"listed": False, "opened": "IncompleteCaseError"}
    assert [r.case_id for r in report.failed] == [cid]
    assert "Input/output error" in report.failed[0].error
    assert commit_key in report.failed[0].error
    assert report.converted == others
    col = ctzarr.open_collection(dest)
    assert col.case_ids == others
    with pytest.raises(KeyError):
        col[cid]
    assert store_keys(dest, f"cases/{cid}/") == []
    assert verify(dest).ok, str(verify(dest))

    # the same command again (the one-shot fault is spent) completes the store
    again = ctzarr.convert(src, store, progress=False)
    assert again.ok, str(again)
    assert again.converted == [cid], str(again)
    assert again.skipped == others, str(again)
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ids
    for c in ids:
        assert_case_equals(col, c, src)
    assert ctzarr.convert(src, dest, progress=False).skipped == ids


# -- B4: --overwrite fails midway ------------------------------------------------------------------


@pytest.fixture
def replaced(
    source: tuple[Path, list[str]], other_source: Path, converted: Path, tmp_path: Path
) -> tuple[Path, Path, str]:
    """A store converted from a copy of ``source`` whose case ids[1] then changed on disk.

    Returns (changed source dir, store, changed case id); ``source`` keeps the old files.
    """
    old, ids = source
    src = tmp_path / "src" / "DAP_Atlas"
    shutil.copytree(old, src, copy_function=shutil.copy2)
    dest = copy_store(converted, tmp_path / "o.zarr")  # paths in the store are relative to src
    assert ctzarr.convert(src, dest, progress=False).skipped == ids
    cid = ids[1]
    for sub in ("images", "masks"):
        shutil.copy2(other_source / sub / f"{cid}.nii.gz", src / sub / f"{cid}.nii.gz")
    return src, dest, cid


def assert_no_staging(dest: Path) -> None:
    """Nothing of a replacement is left: no key under staging/, no ``staging`` group."""
    assert store_keys(dest, f"{STAGING}/") == []
    assert STAGING not in set(zarr.open_group(dest, mode="r").group_keys())


STAGING_FAULTS = [
    pytest.param(8, False, id="staging-set-8-shard"),
    pytest.param(0, True, id="staging-commit-marker"),
]


@pytest.mark.parametrize(("k", "on_marker"), STAGING_FAULTS)
def test_b4_failing_overwrite_keeps_the_old_case(
    k: int, on_marker: bool, replaced: tuple[Path, Path, str], source: tuple[Path, list[str]]
) -> None:
    src, dest, cid = replaced
    old, ids = source
    others = [c for c in ids if c != cid]
    seen: dict[str, Any] = {}

    def read_meanwhile(key: str) -> None:  # another reader, through a plain path, at the fault
        try:
            col = ctzarr.open_collection(str(dest))
            seen["listed"] = cid in col.case_ids
            seen["image"], seen["labels"] = col[cid].image.values, col[cid].labels().values
        except Exception as exc:
            seen["error"] = repr(exc)

    staged = f"{STAGING}/{cid}-"
    fault = Fault(
        lambda key, data: key.startswith(staged) and (not on_marker or MARKER in data),
        k,
        io_error(errno.EIO),
        read_meanwhile,
    )
    report = ctzarr.convert(src, faulty(dest, fault), progress=False, overwrite=True)

    assert len(fault.fired) == 1
    assert fault.fired[0].startswith(staged)
    assert [r.case_id for r in report.failed] == [cid]
    assert fault.fired[0] in report.failed[0].error
    assert "Input/output error" in report.failed[0].error
    assert report.skipped == others
    assert "error" not in seen, seen["error"]
    assert seen["listed"]
    old_image, old_labels = source_arrays(old, cid)
    np.testing.assert_array_equal(seen["image"], old_image)
    np.testing.assert_array_equal(seen["labels"], old_labels)
    # afterwards: the old case, whole; the staged replacement removed
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ids
    assert_case_equals(col, cid, old)
    assert_no_staging(dest)
    assert store_keys(dest, "locks/") == []
    assert verify(dest).ok, str(verify(dest))  # nothing to repair

    refused = ctzarr.convert(src, dest, progress=False)  # no --overwrite: still refused
    assert [r.case_id for r in refused.failed] == [cid]
    assert CASE_EXISTS in refused.failed[0].error
    assert_case_equals(ctzarr.open_collection(dest), cid, old)
    done = ctzarr.convert(src, dest, progress=False, overwrite=True)
    assert done.ok, str(done)
    assert done.converted == [cid], str(done)
    assert done.skipped == others, str(done)
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ids
    assert_case_equals(col, cid, src)  # the NEW files
    for c in others:
        assert_case_equals(col, c, old)
    assert_no_staging(dest)
    assert verify(dest).ok


SWAP_FAULTS = [
    # (k-th set under cases/<cid>/ during the --overwrite run, only swap_in writes there; what is
    # left). Set 0 marks the old case incomplete; then the staged objects are copied over it, the
    # new commit marker last (so a fault there comes after every other object was replaced).
    pytest.param(0, False, "old", id="swap-marking-the-old-case-incomplete"),
    pytest.param(0, True, "incomplete", id="swap-writing-the-new-commit-marker"),
]


@pytest.mark.parametrize(("k", "on_marker", "left"), SWAP_FAULTS)
def test_b4_failing_object_store_swap_in_never_leaves_a_mix(
    k: int,
    on_marker: bool,
    left: str,
    replaced: tuple[Path, Path, str],
    source: tuple[Path, list[str]],
) -> None:
    """Object stores have no rename: swap_in first marks the old case incomplete, then copies.

    A fault in the copy loses the old case (it reads as incomplete, never as a mix of old and
    new objects) and the next plain run converts the case again, from the new files.
    """
    src, dest, cid = replaced
    old, ids = source
    others = [c for c in ids if c != cid]
    target = f"cases/{cid}/"
    seen: dict[str, str] = {}

    def read_meanwhile(key: str) -> None:
        try:
            case = ctzarr.open_collection(str(dest))[cid]
            for name, got, want in zip(
                ("image", "labels"),
                (case.image.values, case.labels().values),
                source_arrays(old, cid),
                strict=True,
            ):
                seen[name] = "old" if np.array_equal(got, want) else "other"
        except Exception as exc:
            seen["error"] = type(exc).__name__

    fault = Fault(
        lambda key, data: key.startswith(target) and (not on_marker or MARKER in data),
        k,
        io_error(errno.EIO),
        read_meanwhile,
    )
    report = ctzarr.convert(
        src, faulty(dest, fault), progress=False, overwrite=True
    )  # does not raise

    assert len(fault.fired) == 1
    assert fault.fired[0].startswith(target)
    assert [r.case_id for r in report.failed] == [cid]
    assert fault.fired[0] in report.failed[0].error
    assert report.skipped == others
    col = ctzarr.open_collection(dest)
    if left == "old":
        assert seen == {"image": "old", "labels": "old"}
        assert col.case_ids == ids
        assert_case_equals(col, cid, old)
        assert verify(dest).ok, str(verify(dest))
        rerun = ctzarr.convert(src, dest, progress=False, overwrite=True)
    else:
        assert seen == {"error": "IncompleteCaseError"}
        assert col.case_ids == others
        with pytest.raises(ctzarr.IncompleteCaseError):
            col[cid]
        found = verify(dest)
        assert found.problems, str(found)
        assert all(cid in p and "incomplete" in p for p in found.problems), str(found)
        rerun = ctzarr.convert(src, dest, progress=False)  # a plain run: the case is not complete
    assert rerun.ok, str(rerun)
    assert rerun.converted == [cid], str(rerun)
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ids
    assert_case_equals(col, cid, src)
    assert_no_staging(dest)
    assert verify(dest).ok


# -- B6: two converters, one store -----------------------------------------------------------------

_RACE_CHILD = """
import json, sys
import ctzarr
print("ready", flush=True)
sys.stdin.readline()
report = ctzarr.convert(sys.argv[1], sys.argv[2], progress=False)
print(json.dumps([[r.case_id, r.status, r.error] for r in report.results]), flush=True)
"""


@pytest.mark.parametrize("first", ["A", "B"], ids=["A-released-first", "B-released-first"])
def test_b6_two_converters_one_store_never_mix_a_case(
    first: str, source: tuple[Path, list[str]], other_source: Path, tmp_path: Path
) -> None:
    """Two processes, same case ids from different files, one new store, released together
    once their imports are done; without --overwrite."""
    src_a, ids = source
    sources = {"A": src_a, "B": other_source}
    dest = tmp_path / "race.zarr"
    order = [first, "B" if first == "A" else "A"]
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", _RACE_CHILD, str(sources[name]), str(dest)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in order
    }
    try:
        for p in procs.values():
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        for name in order:
            procs[name].stdin.write("go\n")  # type: ignore[union-attr]
            procs[name].stdin.flush()  # type: ignore[union-attr]
        outputs = {name: p.communicate(timeout=180) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    reports: dict[str, dict[str, tuple[str, str | None]]] = {}
    for name, (out, err) in outputs.items():
        assert procs[name].returncode == 0, err
        reports[name] = {
            cid: (status, error) for cid, status, error in json.loads(out.splitlines()[-1])
        }
        assert sorted(reports[name]) == ids

    col = ctzarr.open_collection(dest)
    root = zarr.open_group(dest, mode="r")
    assert [cid for cid in ids if case_state(root, cid)[0] == "complete"] == ids
    for cid in ids:
        outcome = {name: reports[name][cid] for name in sources}
        winners = [name for name, (status, _) in outcome.items() if status == "converted"]
        # every case written by exactly one converter (at most one; at least one, as no fault)
        assert len(winners) == 1, outcome
        [loser] = [name for name in sources if name not in winners]
        status, error = outcome[loser]
        assert status == "failed"
        assert error is not None
        assert any(s in error for s in (LOCK_BUSY, LOCK_CONTENDED, CASE_EXISTS)), error
        # image AND labels from the winner's files, never a mix
        assert_case_equals(col, cid, sources[winners[0]])
    # Both runs end by updating the collection table and case list, one after the other under
    # the collection lock (test_two_converters_finishing_at_once pins that interleaving)
    report = verify(dest)
    known = ("stale lock (",)
    assert all(any(k in p for k in known) for p in report.problems), str(report)
    if not report.ok:
        verify(dest, repair=True)
    assert verify(dest).ok
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ids  # each case committed by one of the two, and listed
    assert set(col.table().case_id) == set(col.case_ids)


class RacingStore(WrapperStore[LocalStore]):
    """Runs ``meanwhile()`` (another converter) just after the first read of the root zarr.json
    found no collection, before the caller acts on that: the interleaving of two converters
    started at once on a new store, made deterministic."""

    def __init__(
        self, store: LocalStore, meanwhile: Callable[[], Any], state: dict[str, Any] | None = None
    ) -> None:
        super().__init__(store)
        self.meanwhile = meanwhile
        self.state = {"done": False} if state is None else state

    def _with_store(self, store: LocalStore) -> RacingStore:
        return RacingStore(store, self.meanwhile, self.state)

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        out = await self._store.get(key, prototype, byte_range)
        if key == "zarr.json" and out is None and not self.state["done"]:
            self.state["done"] = True
            self.state["result"] = await asyncio.to_thread(self.meanwhile)
        return out


def test_b6_another_converter_creates_the_store_between_open_and_create(
    source: tuple[Path, list[str]], other_source: Path, tmp_path: Path
) -> None:
    src, ids = source
    dest = tmp_path / "new.zarr"
    store = RacingStore(
        LocalStore(dest),
        lambda: ctzarr.convert(other_source, str(dest), cases=ids[:1], progress=False),
    )
    report = ctzarr.convert(src, store, progress=False)
    assert store.state["done"]
    assert store.state["result"].converted == ids[:1]
    # the other converter's case stays theirs; this one adds the rest
    assert [r.case_id for r in report.failed] == ids[:1]
    assert CASE_EXISTS in report.failed[0].error
    assert report.converted == ids[1:]
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ids
    assert_case_equals(col, ids[0], other_source)
    for cid in ids[1:]:
        assert_case_equals(col, cid, src)
    assert verify(dest).ok


def test_two_converters_finishing_at_once(source: tuple[Path, list[str]], tmp_path: Path) -> None:
    """Converter 1 is inside its update of the collection table (between its two table arrays)
    when converter 2, in another thread, converts a case and updates the table: the collection
    lock makes converter 2 wait, then its update starts from converter 1's."""
    src, ids = source
    dest = tmp_path / "two.zarr"
    second: dict[str, Any] = {}

    def run_second() -> None:
        second["report"] = ctzarr.convert(src, str(dest), cases=[ids[1]], progress=False)

    thread = threading.Thread(target=run_second)

    def other_converter(key: str) -> None:
        thread.start()
        # converter 2 converts its case, then waits for the collection lock held by converter 1
        deadline = time.monotonic() + 60
        while not (dest / "cases" / ids[1] / "zarr.json").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)

    meanwhile = Fault(
        lambda key, data: key == "index/float_columns/zarr.json", 0, None, other_converter
    )
    first = ctzarr.convert(src, faulty(dest, meanwhile), cases=[ids[0]], progress=False)
    thread.join(60)
    assert not thread.is_alive()
    assert meanwhile.fired == ["index/float_columns/zarr.json"]
    assert first.converted == [ids[0]]
    assert second["report"].converted == [ids[1]]
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ids[:2]  # both committed cases listed
    assert set(col.table().case_id) == set(ids[:2])
    assert verify(dest).ok, str(verify(dest))


# -- B7: a case without its commit marker ----------------------------------------------------------


def drop_commit_marker(dest: Path, cid: str) -> None:
    """Delete ``ctzarr.complete`` from the case's zarr.json, everything else kept."""
    path = dest / "cases" / cid / "zarr.json"
    doc = json.loads(path.read_bytes())
    del doc["attributes"]["ctzarr"]["complete"]
    path.write_text(json.dumps(doc))


def test_b7_case_without_commit_marker_is_incomplete(
    source: tuple[Path, list[str]], converted: Path, tmp_path: Path
) -> None:
    src, ids = source
    cid = ids[1]
    dest = copy_store(converted, tmp_path / "m.zarr")
    drop_commit_marker(dest, cid)

    col = ctzarr.open_collection(dest)
    with pytest.raises(ctzarr.IncompleteCaseError):
        col[cid]
    assert case_state(zarr.open_group(dest, mode="r"), cid)[0] == "partial"
    report = verify(dest)
    assert any(cid in p and "incomplete" in p for p in report.problems), str(report)
    repaired = verify(dest, repair=True)
    assert cid in repaired.repaired
    assert verify(dest).ok
    col = ctzarr.open_collection(dest)
    assert cid not in col.case_ids
    assert not (dest / "cases" / cid).exists()
    rerun = ctzarr.convert(src, dest, progress=False)
    assert rerun.ok, str(rerun)
    assert rerun.converted == [cid], str(rerun)
    assert_case_equals(ctzarr.open_collection(dest), cid, src)


# -- interruptions outside a case: the collection itself -------------------------------------------


def test_failing_collection_creation_then_plain_rerun(
    source: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """The root zarr.json is written once, with its attributes: a fault there leaves no store
    that a re-run refuses."""
    src, ids = source
    dest = tmp_path / "new.zarr"
    fault = Fault(
        lambda key, data: key == "zarr.json" and b'"ctzarr"' in data, 0, io_error(errno.EIO)
    )
    with pytest.raises(
        OSError, match="Input/output error"
    ):  # the store itself failed: convert raises
        ctzarr.convert(src, faulty(dest, fault), progress=False)
    assert fault.fired == ["zarr.json"]
    report = ctzarr.convert(src, dest, progress=False)
    assert report.ok, str(report)
    assert report.converted == ids, str(report)
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ids
    for cid in ids:
        assert_case_equals(col, cid, src)


def test_interrupted_collection_table_update_is_found_and_rebuilt(
    source: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """A fault between the table's arrays and its attributes: verify reports it, a re-run
    rebuilds it (the table and the case list then cover every committed case)."""
    src, ids = source
    dest = tmp_path / "t.zarr"
    assert ctzarr.convert(src, dest, cases=ids[:1], progress=False).ok
    fault = Fault(
        lambda key, data: key == "index/zarr.json" and b"stats-table-1" in data,
        0,
        io_error(errno.EIO),
    )
    with pytest.raises(OSError, match="Input/output error"):  # the collection table: convert raises
        ctzarr.convert(src, faulty(dest, fault), cases=ids[:2], progress=False)
    assert fault.fired == ["index/zarr.json"]
    found = verify(dest)
    assert not found.ok, str(found)
    assert all("interrupted update" in p for p in found.problems), str(found)
    report = ctzarr.convert(src, dest, progress=False)
    assert report.ok, str(report)
    assert report.converted == [ids[2]], str(report)
    assert report.skipped == ids[:2], str(report)
    col = ctzarr.open_collection(dest)
    assert col.case_ids == ids
    assert set(col.table().case_id) == set(ids)
    assert verify(dest).ok


def test_first_run_stopped_before_its_table_is_an_interruption(
    source: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """The first run of a new store fails its very first table write (index/ exists, empty, no
    case listed yet): verify reports an interrupted update, repair and a re-run complete it."""
    src, ids = source
    dest = tmp_path / "first.zarr"
    fault = Fault(
        lambda key, data: key == "index/zarr.json" and b"stats-table-1" in data,
        0,
        io_error(errno.EIO),
    )
    with pytest.raises(OSError, match="Input/output error"):
        ctzarr.convert(src, faulty(dest, fault), cases=ids[:1], progress=False)
    assert fault.fired == ["index/zarr.json"]
    found = verify(dest)
    assert found.problems, str(found)
    assert_only_interruption_leftovers(found)
    repaired = verify(dest, repair=True)
    assert "collection table" in repaired.repaired, str(repaired)
    report = ctzarr.convert(src, dest, progress=False)
    assert report.ok, str(report)
    assert ctzarr.open_collection(dest).case_ids == ids
    assert verify(dest).ok


def test_wrapped_local_store_leaves_no_empty_directories(replaced: tuple[Path, Path, str]) -> None:
    src, dest, cid = replaced
    never = Fault(lambda key, data: False, 0, io_error(errno.EIO))
    report = ctzarr.convert(src, faulty(dest, never), progress=False, overwrite=True)
    assert report.converted == [cid]
    assert_case_equals(ctzarr.open_collection(dest), cid, src)
    leftovers = sorted(p.name for p in dest.iterdir() if p.is_dir() and not any(p.iterdir()))
    assert leftovers == []
