"""One writer per case: a lock object per case, created exclusively, with a heartbeat.

Two converters aimed at one store must never interleave the objects of one case. Before a
case is written its lock ``locks/<case_id>.json`` is created with an exclusive create (local:
``O_CREAT | O_EXCL``; S3 and GCS: a conditional put through fsspec's ``mode="create"``), holding
who writes and a heartbeat refreshed every ``ttl / 4`` seconds. A second converter finds the
lock and fails that case with :class:`~ctzarr.errors.CaseLockedError` (its other cases go on).

A lock left by a killed converter is taken over when it is stale: its process is gone (same
host), its heartbeat is older than the time-to-live, or it belongs to the same conversion run
(a Dask task rerun after its worker died). fsspec stores (``memory://``, ``s3://``, ``gs://``;
plain HTTP is read only) create it through the filesystem's async API, under any ctzarr
wrapper. Other store objects fall back to write-then-read-back, which narrows but does not
close the race: documented in the README.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from ctzarr import config
from ctzarr.errors import CaseLockedError
from ctzarr.io.faults import classify
from ctzarr.io.stores import read_key, write_key

logger = logging.getLogger(__name__)


def lock_key(case_id: str) -> str:
    return f"locks/{case_id}.json"


def _local_path(store: LocalStore, key: str) -> Path:
    return Path(store.root) / key


def _fs_path(store: FsspecStore, key: str) -> str:
    return f"{store.path.rstrip('/')}/{key}"


def unwrap_store[S: Store](store: Store, kind: type[S]) -> S | None:
    """The store of type ``kind`` under any wrappers (``RetryingStore``, test wrappers), or None."""
    while not isinstance(store, kind):
        inner = getattr(store, "_store", None)
        if not isinstance(inner, Store):
            return None
        store = inner
    return store


def _fsspec_store(store: Store) -> FsspecStore | None:
    return unwrap_store(store, FsspecStore)


def _local_store(store: Store) -> LocalStore | None:
    return unwrap_store(store, LocalStore)


def read_lock(store: Store, case_id: str) -> dict[str, Any] | None:
    """The holder record of a case's lock, or None when unlocked."""
    raw = read_key(store, lock_key(case_id))
    if raw is None:
        return None
    try:
        rec = json.loads(raw)
    except ValueError:
        return {"token": None, "heartbeat": 0.0}  # unreadable: treat as stale
    return rec if isinstance(rec, dict) else {"token": None, "heartbeat": 0.0}


def lock_is_stale(rec: dict[str, Any], run: str | None = None, ttl_s: float | None = None) -> bool:
    """True when the holder is gone: same run, dead process on this host, or no heartbeat."""
    ttl = config.get("lock_ttl_s") if ttl_s is None else ttl_s
    if run is not None and rec.get("run") == run:
        return True
    if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
        try:
            os.kill(rec["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    try:
        return time.time() - float(rec.get("heartbeat", 0)) > ttl
    except (TypeError, ValueError):
        return True


class CaseLock:
    """The lock of one case, held while it is written (use :func:`case_lock`)."""

    def __init__(self, store: Store, case_id: str, run: str | None = None) -> None:
        self.store = store
        self.case_id = case_id
        self.run = run
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # -- record --------------------------------------------------------------------------------
    def _record(self) -> bytes:
        return json.dumps(
            {
                "token": self.token,
                "run": self.run,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": self.started,
                "heartbeat": time.time(),
            }
        ).encode()

    def _create(self, data: bytes) -> bool:
        """Exclusive create; False when the lock object exists."""
        key = lock_key(self.case_id)
        store = self.store
        if (local := _local_store(store)) is not None:
            path = _local_path(local, key)
            for attempt in range(3):
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                    break
                except FileExistsError:
                    return False
                except FileNotFoundError:  # another converter removed the empty locks/ dir
                    if attempt == 2:
                        raise
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        if (fss := _fsspec_store(store)) is not None:
            fs_path = _fs_path(fss, key)
            try:
                sync(fss.fs._pipe_file(fs_path, data, mode="create"))
            except FileExistsError:
                return False
            except (TypeError, NotImplementedError):  # no conditional put: best effort
                if sync(fss.fs._exists(fs_path)):
                    return False
                sync(fss.fs._pipe_file(fs_path, data))
            except OSError as exc:  # S3 answers 412 Precondition Failed
                if classify(exc).status == 412:
                    return False
                raise
            return self._still_ours()
        # other stores (memory): write then read back
        if read_lock(store, self.case_id) is not None:
            return False
        self._put(data)
        return self._still_ours()

    def _put(self, data: bytes) -> None:
        write_key(self.store, lock_key(self.case_id), data)  # whole object (local: rename)

    def remove(self) -> None:
        """Delete the lock object whoever holds it (``verify --repair`` of a stale lock)."""
        key = lock_key(self.case_id)
        with contextlib.suppress(FileNotFoundError):
            sync(self.store.delete(key))
        if (local := _local_store(self.store)) is not None:
            # an empty locks/ directory would be an unknown node to zarr's hierarchy walk
            with contextlib.suppress(OSError):  # not empty: another case is being written
                _local_path(local, key).parent.rmdir()

    def _still_ours(self) -> bool:
        rec = read_lock(self.store, self.case_id)
        return rec is not None and rec.get("token") == self.token

    # -- protocol --------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock, or raise :class:`CaseLockedError` naming the holder."""
        for _ in range(3):
            if self._create(self._record()):
                break
            rec = read_lock(self.store, self.case_id)
            if rec is None:
                continue  # released meanwhile
            if not lock_is_stale(rec, self.run):
                age = time.time() - float(rec.get("heartbeat", 0) or 0)
                raise CaseLockedError(
                    f"case {self.case_id!r}: another converter is writing it (host "
                    f"{rec.get('host')!r}, pid {rec.get('pid')}, heartbeat {age:.0f} s ago); "
                    f"if that process is gone the lock expires after {config.get('lock_ttl_s'):.0f} s "
                    "(CTZARR_LOCK_TTL_S), or remove it with ctzarr verify --repair"
                )
            logger.info("case %s: taking over a stale lock of pid %s", self.case_id, rec.get("pid"))
            if read_lock(self.store, self.case_id) == rec:
                self.remove()
        else:
            raise CaseLockedError(f"case {self.case_id!r}: could not take its lock (contended)")
        self._thread = threading.Thread(
            target=self._heartbeat, name=f"ctzarr-lock-{self.case_id}", daemon=True
        )
        self._thread.start()

    def _heartbeat(self) -> None:
        # the time-to-live of this lock's life, read once: a heartbeat every ttl / 4
        beat_s = config.get("lock_ttl_s") / 4
        while not self._stop.wait(beat_s):
            try:
                if not self._still_ours():
                    self.lost = True
                    return
                self._put(self._record())
            except Exception:  # a failed heartbeat is retried at the next beat
                logger.warning("case %s: lock heartbeat failed", self.case_id, exc_info=True)

    def check(self) -> None:
        """Raise unless the lock is still ours (called just before the commit)."""
        if self.lost or not self._still_ours():
            self.lost = True
            raise CaseLockedError(
                f"case {self.case_id!r}: its lock was taken by another converter while this one "
                "wrote; nothing committed"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost and self._still_ours():
            self.remove()


#: the lock of the collection's case list and table (``@`` is never part of a case id)
COLLECTION_LOCK = "@collection"


@contextlib.contextmanager
def collection_lock(store: Store, run: str | None = None) -> Iterator[CaseLock]:
    """Hold the lock of the collection's case list and table, waiting while another converter
    updates them (their update is a read-modify-write of a few objects)."""
    # how long to wait for another converter's update (setting collection_lock_wait_s)
    deadline = time.monotonic() + config.get("collection_lock_wait_s")
    pause = 0.02
    while True:
        lock = CaseLock(store, COLLECTION_LOCK, run)
        try:
            lock.acquire()
            break
        except CaseLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 0.5)
    try:
        yield lock
    finally:
        lock.release()


@contextlib.contextmanager
def case_lock(store: Store, case_id: str, run: str | None = None) -> Iterator[CaseLock]:
    """Hold the lock of one case for the duration of the block."""
    lock = CaseLock(store, case_id, run)
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()
