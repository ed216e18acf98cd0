"""How work runs on a Dask distributed cluster: one task per case, credentials resolved on the
workers.

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
- A read task raises a transient I/O error (``OSError`` that is not a ctzarr error nor a
  missing or forbidden file): dask runs it again, :data:`READ_RETRIES` times at most.
- The client or scheduler goes away: unfinished cases are reported as such and stay
  uncommitted (or are committed whole by a task that was still running); a plain re-run
  resumes.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import CtzarrError, StoreError

__all__ = [
    "READ_RETRIES",
    "SECRET_OPTION_NAMES",
    "SOLO_RETRY_LIMIT",
    "check_no_secrets",
    "connect",
    "is_transient",
    "start_local_cluster",
]

logger = logging.getLogger(__name__)

#: how many more times dask runs a read task that failed with a transient I/O error
READ_RETRIES = 2

#: at most this many cases that ended in ``KilledWorker`` are run again, one at a time; beyond
#: that the workers are too small for the cases, not unlucky
SOLO_RETRY_LIMIT = 8

#: how long ctzarr's own local cluster waits with no worker alive before failing the tasks
LOCAL_NO_WORKERS_TIMEOUT = "60s"

# OSErrors that say something about the data or the request, not about the moment
_PERMANENT_OS_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)

#: storage option names that carry credentials (s3fs, gcsfs, adlfs, fsspec http auth)
SECRET_OPTION_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "access_key",
        "secret_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "client_secret",
        "credentials",
        "auth",
        "headers",
    }
)


def _secret_paths(options: Any, prefix: str = "") -> list[str]:
    found = []
    if isinstance(options, Mapping):
        for k, v in options.items():
            path = f"{prefix}{k}"
            if str(k).lower() in SECRET_OPTION_NAMES:
                found.append(path)
            else:
                found += _secret_paths(v, path + ".")
    return found


def check_no_secrets(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the options if they carry no credentials; raise (naming only the keys) if they do."""
    found = _secret_paths(storage_options or {})
    if found:
        raise CtzarrError(
            f"storage_options carry credentials ({', '.join(sorted(found))}); with a cluster they would "
            "travel inside the task graph. Give the workers credentials through their environment "
            "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), a profile or an instance role"
        )
    return dict(storage_options or {})


def start_local_cluster(n_workers: int) -> Any:
    """Start a local cluster of worker processes (one thread each) and return its client.

    Workers are restarted by their nanny when they die; tasks waiting with no worker alive for
    :data:`LOCAL_NO_WORKERS_TIMEOUT` fail instead of waiting forever.
    """
    import dask
    from distributed import Client, LocalCluster

    # the scheduler runs in this process and reads its configuration when it starts
    with dask.config.set({"distributed.scheduler.no-workers-timeout": LOCAL_NO_WORKERS_TIMEOUT}):
        cluster = LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
        )
    client = Client(cluster)
    print(f"dask dashboard: {client.dashboard_link}")
    return client


def connect(address: str) -> Any:
    """Client of a running scheduler."""
    from distributed import Client

    client = Client(address)
    print(f"dask dashboard: {client.dashboard_link}")
    return client


def is_transient(exc: BaseException) -> bool:
    """True for an I/O fault worth running the task again (not a ctzarr error, not a missing file)."""
    return isinstance(exc, OSError) and not isinstance(exc, (CtzarrError, *_PERMANENT_OS_ERRORS))


def _convert_task(
    spec: Any, ds: Any, dest: str, dest_options: dict[str, Any], overwrite: bool, run: str | None
) -> Any:
    """Worker side: open the store from its URL and convert one case."""
    import zarr

    from .convert import convert_case
    from .storage import make_store

    store = make_store(dest, storage_options=dest_options or None)
    root = zarr.open_group(store, mode="r+", zarr_format=3)
    return convert_case(root, ds, spec, overwrite=overwrite, run=run)


def _killed_worker_type() -> type[BaseException]:
    from distributed import KilledWorker

    return KilledWorker


def _worker_died_message(exc: BaseException, alone: BaseException | None) -> str:
    """One line for a case whose task kept killing the workers that ran it."""
    attempts = getattr(exc, "allowed_failures", None)
    tries = f"{attempts + 1} times" if isinstance(attempts, int) else "repeatedly"
    limit = (
        f" (distributed.scheduler.allowed-failures = {attempts})" if attempts is not None else ""
    )
    if alone is not None:
        first = getattr(alone, "allowed_failures", None)
        before = f"{first + 1} times beside other cases, then " if isinstance(first, int) else ""
        tries = f"{before}{tries} when run alone"
    return (
        f"worker died: the worker process converting this case died {tries}{limit}; "
        "usually out of memory or a crash in native code (see the worker logs). "
        "Nothing of the case was committed"
    )


def convert_cases_on_cluster(
    client: Any,
    ds: Any,
    specs: Sequence[Any],
    dest: str,
    dest_options: Mapping[str, Any] | None,
    overwrite: bool,
    progress: bool,
    run: str | None = None,
) -> list[Any]:
    """Convert cases as one task each; a task that keeps killing workers fails its case only.

    Returns one :class:`~ctzarr.convert.CaseResult` per spec, in order. Never raises for a
    case: bad input, a task that kills its workers and a lost client or scheduler each end as
    a failed result naming what happened.
    """
    from dataclasses import replace

    dest_opts = check_no_secrets(dest_options)
    ds = replace(ds, storage_options=check_no_secrets(ds.storage_options))
    killed_worker = _killed_worker_type()

    def submit(spec: Any) -> Any:
        return client.submit(
            _convert_task,
            spec,
            ds,
            dest,
            dest_opts,
            overwrite,
            run,
            pure=False,
            key=f"ctzarr-convert-{spec.case_id}-{uuid.uuid4().hex}",
        )

    futures = {submit(spec): spec.case_id for spec in specs}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(futures), unit="case", desc="convert (cluster)", leave=False)
    outcomes: dict[str, Any] = {}  # a CaseResult, or the exception the future raised
    try:
        for fut in _completed(client, list(futures)):
            outcomes[futures[fut]] = _outcome(fut)
            if bar:
                bar.update(1)
    except ClientGoneError as exc:
        for cid in futures.values():
            outcomes.setdefault(cid, exc)
    finally:
        if bar:
            bar.close()

    # A worker's death counts against every task it held, the one running and those queued
    # behind it: with several KilledWorker cases some may be innocent. Run each once more,
    # alone, so that only a case that kills workers by itself fails.
    killed = [s.case_id for s in specs if isinstance(outcomes[s.case_id], killed_worker)]
    first_try: dict[str, BaseException] = {}
    if 2 <= len(killed) <= SOLO_RETRY_LIMIT:
        spec_of = {s.case_id: s for s in specs}
        for cid in killed:
            logger.warning("case %s: its worker died; running it again alone", cid)
            first_try[cid] = outcomes[cid]
            try:
                fut = submit(spec_of[cid])
                outcomes[cid] = _outcome(next(_completed(client, [fut])))
            except (ClientGoneError, RuntimeError) as exc:  # the client closed meanwhile
                outcomes[cid] = exc
    elif len(killed) > SOLO_RETRY_LIMIT:
        logger.warning(
            "%d cases ended with their workers dying; not retrying them one by one", len(killed)
        )
    root = None
    results = []
    for spec in specs:
        outcome = outcomes[spec.case_id]
        if not isinstance(outcome, BaseException):
            results.append(outcome)
            continue
        if root is None:
            root = _open_dest(dest, dest_opts)
        gone = client.status not in _LIVE_CLIENT
        results.append(_failed_case(root, ds, spec, outcome, first_try.get(spec.case_id), gone))
    return results


#: client states in which its futures can still finish
_LIVE_CLIENT = frozenset({"newly-created", "connecting", "running"})


class ClientGoneError(CtzarrError, ConnectionError):
    """The dask client or scheduler went away while a job was unfinished."""


def _completed(client: Any, futures: Sequence[Any], poll_s: float = 0.02) -> Any:
    """Yield futures as they finish; raise :class:`ClientGoneError` if the client goes away.

    Written instead of ``distributed.as_completed``: that waits on the client's event loop,
    which a closed client no longer runs, and hung or raised "IOLoop is closed" at random in
    our client-closed test. ``Future.done()`` is local state, and polling it costs nothing
    beside tasks that take seconds.
    """
    import time

    pending = list(futures)
    while pending:
        done = [f for f in pending if f.done()]
        if done:
            # by identity: a future finishing between two done() calls must not be dropped
            finished = {id(f) for f in done}
            pending = [f for f in pending if id(f) not in finished]
            yield from done
            continue
        if client.status not in _LIVE_CLIENT:
            raise ClientGoneError(f"the dask client went away ({client.status})")
        time.sleep(poll_s)


#: seconds to fetch the (small) result of a finished task; a gather from a client that closes
#: meanwhile was seen to wait forever
RESULT_TIMEOUT_S = 60


def _result(fut: Any) -> Any:
    """The result of a finished future, or ClientGoneError when its client went away."""
    if fut.client.status not in _LIVE_CLIENT:
        raise ClientGoneError(f"the dask client went away ({fut.client.status})")
    return fut.result(timeout=RESULT_TIMEOUT_S)


def _outcome(fut: Any) -> Any:
    """The future's result, or the exception it raised (one case's fault, kept for the report)."""
    try:
        return _result(fut)
    except Exception as exc:  # KilledWorker, a cancelled future, no worker left, a crash
        return exc


def _open_dest(dest: str, options: Mapping[str, Any]) -> Any:
    import zarr

    from .storage import make_store

    store = make_store(dest, storage_options=dict(options) or None)
    return zarr.open_group(store, mode="r+", zarr_format=3)


def _committed_from(ds: Any, spec: Any, meta: Mapping[str, Any] | None) -> bool:
    """True when the committed case was made from the case's current source files."""
    from .convert import _same_source, _source_files

    try:
        files = _source_files(ds, spec)
        for rec in files.values():
            rec["abs_path"] = rec["path"]
        return _same_source((meta or {}).get("source", {}).get("files", {}), files)
    except Exception:  # a source file gone or unreadable: not provably the same
        logger.debug("case %s: could not compare its source files", spec.case_id, exc_info=True)
        return False


def _failed_case(
    root: Any,
    ds: Any,
    spec: Any,
    exc: BaseException,
    first_try: BaseException | None,
    client_gone: bool = False,
) -> Any:
    """The result of a case whose task raised on the cluster; removes what dead workers left.

    convert_case reports bad input in its result, so an exception here is the cluster's: a
    worker died, the client or scheduler went away, no worker was left. The task may have got
    past its commit first; a case committed whole from the current source is converted.
    """
    from concurrent.futures import CancelledError

    from .convert import CaseResult, case_state, remove_case

    cid = spec.case_id
    killed = isinstance(exc, _killed_worker_type())
    state, meta = case_state(root, cid)
    if state == "complete" and _committed_from(ds, spec, meta):
        logger.warning("case %s: committed whole before its task was lost (%s)", cid, exc)
        return CaseResult(cid, "converted")
    if killed and state == "partial":
        # every worker that ran it is dead: nothing writes there any more
        try:
            remove_case(root, cid)
        except Exception:  # the next run removes it anyway
            logger.exception("case %s: could not remove the partial case", cid)
    if killed:
        error = _worker_died_message(exc, first_try)
    elif isinstance(exc, (CancelledError, ClientGoneError)) or client_gone:
        # a task still running may yet commit the case whole; a re-run skips or redoes it
        reason = getattr(exc, "reason", None)
        why = f" (dask: {reason})" if reason and reason != "unknown" else ""
        error = (
            "not finished: the dask client or scheduler went away while the case was queued "
            f"or running{why}; re-run to resume"
        )
    else:
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    logger.warning("case %s failed on the cluster: %s", cid, error)
    return CaseResult(cid, "failed", error=error)


@dataclass(frozen=True)
class _Raised:
    """A task's non-transient error, returned instead of raised so that dask does not retry it."""

    error: BaseException
    worker_traceback: str


def _scan_task(url: str, options: dict[str, Any], case_id: str, segmentation: str) -> Any:
    """Worker side: rebuild one case's index from its voxels (blockwise, local threads)."""
    try:
        return _scan_case(url, options, case_id, segmentation)
    except Exception as exc:
        if is_transient(exc):
            raise  # dask runs the task again (retries=)
        import traceback

        return _Raised(exc, traceback.format_exc())


def _scan_case(url: str, options: dict[str, Any], case_id: str, segmentation: str) -> Any:
    import dask
    import zarr
    from distributed import get_worker

    from .collection import open_collection
    from .stats import scan_index_graph

    # use the threads the worker was given, not every core of the machine (oversubscription
    # cost 35 % per case with two 1-thread workers on 2 cores, benchmarks/CLOUD.md): the dask
    # pool inside the task, and the zarrs codec pipeline's decoding threads (bound when the
    # arrays are opened, so the setting wraps the open)
    nthreads = get_worker().state.nthreads
    with zarr.config.set({"threading.max_workers": nthreads}):
        col = open_collection(url, storage_options=options or None)
        case = col[case_id]
        if segmentation not in case.segmentation_names:
            return None  # the case has no such segmentation (the client did not open it)
        graph = scan_index_graph(case, segmentation)
        if nthreads <= 1:
            (idx,) = dask.compute(graph, scheduler="sync")
        else:
            (idx,) = dask.compute(graph, scheduler="threads", num_workers=nthreads)
    return idx


def scan_on_cluster(
    client: Any,
    url: str,
    options: Mapping[str, Any] | None,
    jobs: Sequence[tuple[str, str]],
    retries: int | None = None,
) -> Iterator[tuple[int, Any]]:
    """Scan indexes of (case, segmentation) pairs, one task each; yield ``(job number, index)``
    as tasks finish, so that the caller's own work overlaps the workers' (the index is None
    for a case without that segmentation).

    A task that fails with a transient I/O error runs again, ``retries`` times at most
    (default :data:`READ_RETRIES`); the first case that still fails stops the scan with an
    error naming it, and the remaining tasks are cancelled (also when the caller stops early).
    """
    opts = check_no_secrets(options)
    retries = READ_RETRIES if retries is None else retries
    futures = {
        client.submit(
            _scan_task,
            url,
            opts,
            cid,
            seg,
            pure=False,
            retries=retries,
            key=f"ctzarr-scan-{cid}-{seg}-{uuid.uuid4().hex}",
        ): i
        for i, (cid, seg) in enumerate(jobs)
    }
    try:
        for fut in _completed(client, list(futures)):
            i = futures[fut]
            yield i, _scan_result(fut, *jobs[i], retries)
    except BaseException:
        with contextlib.suppress(Exception):  # the client may be the thing that failed
            client.cancel(list(futures))
        raise


def _scan_result(fut: Any, case_id: str, segmentation: str, retries: int) -> Any:
    """The index a scan task returned, or an error naming the case."""
    where = f"scan of case {case_id!r} ({segmentation})"
    try:
        value = _result(fut)
    except _killed_worker_type() as exc:
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
