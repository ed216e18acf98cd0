"""The cluster runner: runs the task functions it is handed on a Dask distributed cluster, one
task per case, and reports each task's outcome. It knows nothing of conversions or statistics
(those hand it their task functions: ``ctzarr.write.convert``, ``ctzarr.read.stats``).

Tasks carry URLs, case specs and label maps only. Storage options that hold secrets are refused
when a cluster is used (they would be pickled into the task graph); workers find credentials
where the I/O happens: environment variables, profiles, instance roles.

Faults, and what a run does about them:

- A worker dies (killed, out of memory, lost): the scheduler runs its tasks again elsewhere. A
  conversion task is safe to repeat: it removes the leftovers of an earlier attempt, writes every
  shard whole and commits the case last.
- A task keeps killing workers: after ``distributed.scheduler.allowed-failures`` deaths the
  scheduler gives up on it (``KilledWorker``). A conversion then fails that case only, with a
  message that says so, and its leftovers are removed; the other cases finish. Because a death
  is blamed on every task the dead worker held, cases queued beside the culprit can be blamed
  too: when several cases end this way each is run once more, alone.
- A read task raises a transient I/O error (:func:`ctzarr.io.faults.is_transient`: an
  ``OSError`` that is not a ctzarr error, a missing or forbidden file, or a refused request):
  dask runs it again, :data:`READ_RETRIES` times at most.
- The client or scheduler goes away: unfinished cases are reported as such and stay
  uncommitted (or are committed whole by a task that was still running); a plain re-run
  resumes.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from ctzarr.errors import ClientGoneError, CtzarrError, StoreError
from ctzarr.io.faults import is_transient

logger = logging.getLogger(__name__)


#: how many more times dask runs a read task that failed with a transient I/O error
READ_RETRIES = 2


#: how long ctzarr's own local cluster waits with no worker alive before failing the tasks
LOCAL_NO_WORKERS_TIMEOUT = "60s"


def start_local_cluster(n_workers: int) -> Any:
    """Start a local cluster of worker processes (one thread each) and return its client.

    Workers are restarted by their nanny when they die; tasks waiting with no worker alive for
    :data:`LOCAL_NO_WORKERS_TIMEOUT` fail instead of waiting forever.
    """
    # dask and distributed load only when a cluster starts: a plain `ctzarr convert` never
    # needs them (dask alone costs a convert process ~0.06 s and ~10 MB)
    import dask
    from distributed import Client, LocalCluster  # optional: the distributed extra

    # the scheduler runs in this process and reads its configuration when it starts
    with dask.config.set({"distributed.scheduler.no-workers-timeout": LOCAL_NO_WORKERS_TIMEOUT}):
        # distributed has no annotations: its calls are untyped
        cluster = LocalCluster(  # type: ignore[no-untyped-call]
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    return Client(cluster)  # type: ignore[no-untyped-call]


def connect(address: str) -> Any:
    """Client of a running scheduler."""
    from distributed import Client  # optional: the distributed extra

    return Client(address)  # type: ignore[no-untyped-call]  # distributed: no annotations


def killed_worker_type() -> type[BaseException]:
    from distributed import KilledWorker  # optional: the distributed extra

    return KilledWorker


#: client states in which its futures can still finish
LIVE_CLIENT = frozenset({"newly-created", "connecting", "running"})


def completed(client: Any, futures: Sequence[Any], poll_s: float = 0.02) -> Any:
    """Yield futures as they finish; raise :class:`ClientGoneError` if the client goes away.

    Written instead of ``distributed.as_completed``: that waits on the client's event loop,
    which a closed client no longer runs, and hung or raised "IOLoop is closed" at random in
    our client-closed test. ``Future.done()`` is local state, and polling it costs nothing
    beside tasks that take seconds.
    """
    pending = list(futures)
    while pending:
        done = [f for f in pending if f.done()]
        if done:
            # by identity: a future finishing between two done() calls must not be dropped
            finished = {id(f) for f in done}
            pending = [f for f in pending if id(f) not in finished]
            yield from done
            continue
        if client.status not in LIVE_CLIENT:
            raise ClientGoneError(f"the dask client went away ({client.status})")
        time.sleep(poll_s)


#: seconds to fetch the (small) result of a finished task; a gather from a client that closes
#: meanwhile was seen to wait forever
RESULT_TIMEOUT_S = 60


def result(fut: Any) -> Any:
    """The result of a finished future, or ClientGoneError when its client went away."""
    if fut.client.status not in LIVE_CLIENT:
        raise ClientGoneError(f"the dask client went away ({fut.client.status})")
    return fut.result(timeout=RESULT_TIMEOUT_S)


def outcome(fut: Any) -> Any:
    """The future's result, or the exception it raised (one case's fault, kept for the report)."""
    try:
        return result(fut)
    except Exception as exc:  # KilledWorker, a cancelled future, no worker left, a crash
        return exc


@dataclass(frozen=True)
class _Raised:
    """A task's non-transient error, returned instead of raised so that dask does not retry it."""

    error: BaseException
    worker_traceback: str


def _call_task(fn: Callable[..., Any], *args: Any) -> Any:
    """Worker side: run one task; a non-transient error is returned (dask would retry it)."""
    try:
        return fn(*args)
    except Exception as exc:
        if is_transient(exc):
            raise  # dask runs the task again (retries=)
        return _Raised(exc, traceback.format_exc())


def run_tasks(
    client: Any,
    fn: Callable[..., Any],
    jobs: Sequence[tuple[str, tuple[Any, ...]]],
    retries: int | None = None,
) -> Iterator[tuple[int, Any]]:
    """Run ``fn(*args)`` for each ``(name, args)`` job, one task each; yield ``(job number,
    result)`` as tasks finish, so that the caller's own work overlaps the workers'.

    A task that fails with a transient I/O error runs again, ``retries`` times at most
    (default :data:`READ_RETRIES`); the first job that still fails stops the run with an
    error naming it (``name``), and the remaining tasks are cancelled (also when the caller
    stops early).
    """
    retries = READ_RETRIES if retries is None else retries
    futures = {
        client.submit(
            _call_task,
            fn,
            *args,
            pure=False,
            retries=retries,
            key=f"ctzarr-{name}-{uuid.uuid4().hex}",
        ): i
        for i, (name, args) in enumerate(jobs)
    }
    try:
        for fut in completed(client, list(futures)):
            i = futures[fut]
            yield i, _task_result(fut, jobs[i][0], retries)
    except BaseException:
        with contextlib.suppress(Exception):  # the client may be the thing that failed
            client.cancel(list(futures))
        raise


def _task_result(fut: Any, where: str, retries: int) -> Any:
    """The value a task returned, or an error naming the job."""
    try:
        value = result(fut)
    except killed_worker_type() as exc:
        attempts = getattr(exc, "allowed_failures", None)
        tries = f"{attempts + 1} times" if isinstance(attempts, int) else "repeatedly"
        raise CtzarrError(
            f"{where}: the worker process running it died {tries}; usually out of memory or a "
            "crash in native code (see the worker logs)"
        ) from exc
    except Exception as exc:
        if is_transient(exc):
            raise StoreError(
                f"{where}: {type(exc).__name__}: {' '.join(str(exc).split())} "
                f"(tried {retries + 1} times)"
            ) from exc
        raise
    if isinstance(value, _Raised):
        value.error.add_note(f"on the worker:\n{value.worker_traceback}")
        raise value.error
    return value
