"""Where the data lives: one function turns a path, URL or store into a zarr store."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any, cast

import zarr
import zarr.registry
from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from ctzarr.io.obstore import object_store
from ctzarr.io.retry import RetryingStore, RetryPolicy
from ctzarr.io.urls import is_remote, local_path, redact_url, url_protocol

# zarr-python's Rust codec pipeline (PyPI ``zarrs``) reads 2-3x faster than the default pipeline
# on sharded arrays (benchmarks/README.md). Arrays bind their pipeline when they are opened, so
# it is set around our own opens only (``codec_pipeline`` below), and for local stores only.

# -- fork safety ----------------------------------------------------------------------------------
# Two Rust runtimes do not survive fork(): zarrs' rayon thread pool (zarrs-python#195, rayon#708)
# and the tokio runtime behind obstore's async calls (obstore: "not fork safe"; tokio#4301). Each
# starts with its first call and keeps no thread in a forked child, where the first call then
# waits forever: a torch DataLoader worker (fork is its default start method) hung on its first
# read after the parent had read once (tests/test_fork_safety.py). Neither can be reset from
# Python, so a child forked from a process that had loaded them never uses them: arrays opened
# there get zarr's default pipeline and read-only remote stores fsspec (both reset their own
# state after fork: zarr's event loop, fsspec's loop and instance caches). Python-side pools
# are reset by their owners (ctzarr.io.chunks' decode pool), except dask's: its threaded
# scheduler keeps the parent's default ThreadPoolExecutor, whose threads a child lacks, and a
# child's first compute (``case.image.values``) waited forever on it; the child drops it, and
# dask makes a new one on the next compute.

#: Rust runtimes loaded in a process this one was forked from (inherited by its own children)
_INHERITED_RUNTIMES: frozenset[str] = frozenset()


def _after_fork_in_child() -> None:
    global _INHERITED_RUNTIMES
    loaded = {name for name in ("zarrs", "obstore") if name in sys.modules}
    _INHERITED_RUNTIMES = _INHERITED_RUNTIMES | loaded
    _SETTINGS.reset_after_fork()  # a parent thread's block must not outlive it here
    threaded: Any = sys.modules.get("dask.threaded")  # only when the parent had loaded it
    if threaded is not None and hasattr(threaded, "default_pool"):
        threaded.default_pool = None
        threaded.pools = type(threaded.pools)(dict)  # keyed by the parent's threads
        threaded.pools_lock = threading.Lock()  # it may have been held at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def inherited_runtime(name: str) -> bool:
    """Whether this process was forked from one that had loaded the Rust library ``name``
    (``"zarrs"`` or ``"obstore"``), whose runtime the fork left without threads."""
    return name in _INHERITED_RUNTIMES


class _ZarrSettings:
    """zarr config keys set for the duration of ``with`` blocks, correctly across threads.

    ``zarr.config.set`` as a context manager restores on exit what *it* saw on entry: two
    threads whose blocks interleave (A enters, B enters, A leaves, B leaves) leave B's entry
    value for good. That is how the zarrs pipeline leaked into a whole test process, which then
    read HTTP stores through it, and handed it to forked children, whose rayon pool has no thread
    (both seen in CI). Here a key is held by a count of blocks: the first saves its value and
    sets the block's, the last restores the saved one. Blocks that hold a key together must
    ask the same value of it (a different one raises: a programming error, never waited for,
    since a block may be waiting on another thread that opens arrays). A ``zarr.config.set``
    by the user during a block is undone when the last block ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, list[Any]] = {}  # key -> [value, count, saved value]
        self._generation = 0

    @contextlib.contextmanager
    def hold(self, settings: Mapping[str, Any]) -> Iterator[None]:
        with self._lock:
            for key, value in settings.items():
                if key in self._held and self._held[key][0] != value:
                    raise RuntimeError(
                        f"zarr setting {key!r} is held at {self._held[key][0]!r} by another "
                        f"block; this one asks {value!r}"
                    )
            generation = self._generation
            for key, value in settings.items():
                held = self._held.get(key)
                if held is None:
                    held = self._held[key] = [value, 0, zarr.config.get(key, None)]
                    zarr.config.set({key: value})
                held[1] += 1
        try:
            yield
        finally:
            with self._lock:
                if generation == self._generation:  # else a fork ended it (see below)
                    for key in settings:
                        held = self._held[key]
                        held[1] -= 1
                        if held[1] == 0:
                            del self._held[key]
                            zarr.config.set({key: held[2]})

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's blocks end (their threads are not here)."""
        for key, (_value, _count, saved) in self._held.items():
            zarr.config.set({key: saved})
        self._held = {}
        self._lock = threading.Lock()
        self._generation += 1

    def outside(self, key: str) -> Any:
        """The value of ``key`` outside every block."""
        with self._lock:
            held = self._held.get(key)
            return zarr.config.get(key, None) if held is None else held[2]


_SETTINGS = _ZarrSettings()


def zarr_settings(settings: Mapping[str, Any]) -> contextlib.AbstractContextManager[None]:
    """zarr config ``settings`` inside this block, safe when threads' blocks interleave.

    Use this, never ``zarr.config.set`` as a context manager, for settings that must not
    outlive the block (see :class:`_ZarrSettings`).
    """
    return _SETTINGS.hold(settings)


class LocalStoresThroughZarrs:
    """The codec pipeline ``codec_pipeline`` sets: zarrs for arrays of local stores, the
    pipeline configured outside ctzarr's blocks for any other.

    zarr builds an array's pipeline from the global config on its event-loop thread, so a block
    of one thread sets it for arrays that other threads open meanwhile too (a remote store's,
    which zarrs would read through its own HTTP client, or the user's). Choosing by the array's
    store, which zarr passes here, keeps those on the pipeline they would have had. Never
    instantiated: zarr calls the two class methods.
    """

    @classmethod
    def from_array_metadata_and_store(cls, array_metadata: Any, store: Store) -> Any:
        if isinstance(store, LocalStore) and not inherited_runtime("zarrs"):
            from zarrs import ZarrsCodecPipeline

            return ZarrsCodecPipeline.from_array_metadata_and_store(array_metadata, store)
        # zarr's own pipeline raises NotImplementedError here; zarr then calls from_codecs
        return _outside_pipeline().from_array_metadata_and_store(array_metadata, store)

    @classmethod
    def from_codecs(cls, codecs: Any) -> Any:
        # arrays of other stores, and the inner pipeline of zarr's sharding codec
        return _outside_pipeline().from_codecs(codecs)


zarr.registry.register_pipeline(cast(Any, LocalStoresThroughZarrs))
_FAST_PIPELINE = f"{__name__}.{LocalStoresThroughZarrs.__qualname__}"
_DEFAULT_PIPELINE = "zarr.core.codec_pipeline.BatchedCodecPipeline"


@functools.cache
def _pipeline_class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _outside_pipeline() -> Any:
    """The pipeline class configured outside ctzarr's blocks (zarr's registry names a pipeline
    by its module and class name, which is how it is imported here)."""
    path = _SETTINGS.outside("codec_pipeline.path")
    if path == _FAST_PIPELINE:  # the user set ours for good: zarr's default for the others
        path = _DEFAULT_PIPELINE
    return _pipeline_class(path)


@contextlib.contextmanager
def codec_pipeline(store: Store | None = None) -> Iterator[None]:
    """Open arrays inside this block to give those of local stores the fast codec pipeline.

    Only local stores: with fsspec's HTTP filesystem the Rust pipeline deadlocks on
    zarr-python's event loop (observed with zarrs 0.2.3), and remote reads are bound by
    requests, not decoding (:class:`LocalStoresThroughZarrs` chooses by each array's store).
    Never in a process forked from one that had loaded zarrs (its thread pool did not survive
    the fork: see above).
    """
    if inherited_runtime("zarrs") or (store is not None and not isinstance(store, LocalStore)):
        yield
        return
    try:
        import zarrs  # noqa: F401
    except ImportError:  # pragma: no cover - zarrs is a dependency, but stay usable without it
        yield
        return
    with zarr_settings({"codec_pipeline.path": _FAST_PIPELINE}):
        yield


def compact_json() -> contextlib.AbstractContextManager[None]:
    """Write zarr.json documents without indentation.

    A case's consolidated zarr.json shrinks from 170 KB to 46 KB and opens in 7 ms instead of
    11 ms (it is read by every crop and every statistics call).
    """
    return zarr_settings({"json_indent": None})


#: protocols whose libraries retry on their own and cannot be set to one attempt per
#: filesystem: ctzarr maps their errors but adds no retries (gcsfs: 6 tries, sleeps up to 32 s)
_SELF_RETRYING = frozenset({"gs", "gcs"})


def remote_storage_options(
    url: str, storage_options: Mapping[str, Any] | None, policy: RetryPolicy | None = None
) -> dict[str, Any]:
    """fsspec options for ``url`` with ctzarr's timeouts, and library retries set to one attempt.

    Only options the user left unset are filled in (theirs always win), so a user who sets
    botocore ``config_kwargs["retries"]`` multiplies ctzarr's attempts by botocore's. What is
    set, for ``t = policy.timeout_s``:

    * ``http(s)://`` (fsspec HTTP: no retries of its own; aiohttp waits 5 min in total by
      default): ``client_kwargs["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=t,
      sock_read=t)``;
    * ``s3://`` (botocore retries underneath s3fs): ``config_kwargs`` ``connect_timeout=t``,
      ``read_timeout=t``, ``retries={"total_max_attempts": 1, "mode": "standard"}``. s3fs's own
      loop (5 tries) is not a constructor option: :class:`~ctzarr.io.retry.RetryingStore` sets the
      attribute ``retries = 1`` on its filesystem (again after unpickling). One store call is
      then ``policy.attempts`` S3 requests at most (a whole-object read is a HEAD and a GET);
    * ``gs://`` (gcsfs): ``requests_timeout=t``; gcsfs keeps its own 6 tries.

    Other protocols are passed through unchanged. No credentials are read or added.
    """
    policy = policy if policy is not None else RetryPolicy.from_config()
    options = dict(storage_options or {})
    protocol = url_protocol(url)
    t = policy.timeout_s
    if protocol in ("http", "https"):
        import aiohttp  # optional: comes with fsspec's HTTP filesystem (the http extra)

        client_kwargs = dict(options.get("client_kwargs") or {})
        client_kwargs.setdefault(
            "timeout", aiohttp.ClientTimeout(total=None, sock_connect=t, sock_read=t)
        )
        options["client_kwargs"] = client_kwargs
    elif protocol in ("s3", "s3a"):
        config_kwargs = dict(options.get("config_kwargs") or {})
        config_kwargs.setdefault("connect_timeout", t)
        config_kwargs.setdefault("read_timeout", t)
        config_kwargs.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        options["config_kwargs"] = config_kwargs
    elif protocol in _SELF_RETRYING:
        options.setdefault("requests_timeout", t)
    return options


def read_key(store: Store, key: str) -> bytes | None:
    """The bytes stored under one key, or None when absent (local files read directly)."""
    if isinstance(store, LocalStore):
        try:
            return (store.root / key).read_bytes()
        except FileNotFoundError:
            return None
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def write_key(store: Store, key: str, data: bytes) -> None:
    """Store the bytes under one key (a whole object).

    A local store is written through zarr's synchronous surface (``LocalStore.set_sync``, the
    same atomic file write): no round trip through zarr's event loop and its worker thread per
    object. Any other store (wrappers included, whose ``set`` may do more) goes through ``set``.
    """
    buffer = default_buffer_prototype().buffer.from_bytes(data)
    if type(store) is LocalStore:
        store.set_sync(key, buffer)
    else:
        sync(store.set(key, buffer))


def make_store(
    url_or_store: str | os.PathLike[str] | Store,
    *,
    storage_options: Mapping[str, Any] | None = None,
    read_only: bool = False,
    retry: RetryPolicy | None = None,
    io: str | None = None,
) -> Store:
    """Return the zarr store for a local path, an fsspec URL or an existing store.

    Remote stores retry transient faults (HTTP 5xx and 429, S3 ``SlowDown``, dropped
    connections, cut bodies, timeouts) under a :class:`~ctzarr.io.retry.RetryPolicy` and raise
    :class:`~ctzarr.errors.RemoteStoreError` naming the key when they give up; a missing key
    (404) stays missing, 401/403 fail at once. With the default policy a call gives up after 4
    attempts: about 1.4 s of backoff when the server keeps answering with errors, at most
    4 x 30 s + 1.4 s ≈ 121 s when it stops answering.

    Parameters
    ----------
    url_or_store : str, path or zarr Store
        ``/data/dap.zarr``, ``s3://bucket/dap.zarr``, ``https://host/dap.zarr``,
        ``memory://dap.zarr``, or a store object (returned as is).
    storage_options : dict, optional
        fsspec options, for remote URLs only. Timeouts and library retries that they leave
        unset are filled in from the policy (:func:`remote_storage_options`).
    read_only : bool
        Open read-only.
    retry : RetryPolicy, optional
        Retries and timeouts of a remote store (local paths and ``memory://`` have none).
        Default: :meth:`~ctzarr.io.retry.RetryPolicy.from_config` (``ctzarr.config.set``, else
        the ``CTZARR_RETRIES`` / ``CTZARR_TIMEOUT_S`` / ``CTZARR_BACKOFF_S`` /
        ``CTZARR_MAX_BACKOFF_S`` environment variables, else the defaults). The store carries
        its policy, also to dask workers.
    io : {"auto", "fsspec", "obstore"}, optional
        The I/O library of a read-only ``s3://`` or ``http(s)://`` store. ``auto`` (the default,
        or the ``CTZARR_IO`` environment variable) reads through obstore when it is installed
        and can express the options (:mod:`ctzarr.io.obstore`: a new client in milliseconds, no
        HEAD before GETs), else through fsspec; ``obstore`` is the same; ``fsspec`` always uses
        fsspec. Writable stores always use fsspec, and so does every store of a process
        forked from one that had loaded obstore (its runtime does not survive a fork: see "fork
        safety" above).

    Raises
    ------
    TypeError
        When ``storage_options`` are given for a local path or a store object: they would be
        silently ignored.
    ConfigError
        When a setting (``CTZARR_*`` environment variable) is malformed; also a ValueError.
    """
    if isinstance(url_or_store, Store):
        if storage_options:
            raise TypeError("storage_options are only for URLs, not for store objects")
        return url_or_store
    url = os.fspath(url_or_store)
    if is_remote(url):
        protocol = url_protocol(url)
        if protocol == "memory":  # in-process: nothing transient to retry, nothing to time out
            return FsspecStore.from_url(
                url, storage_options=dict(storage_options or {}), read_only=read_only
            )
        policy = retry if retry is not None else RetryPolicy.from_config()
        if read_only and not inherited_runtime("obstore"):  # see "fork safety" above
            fast = object_store(url, storage_options, policy, io)
            if fast is not None:
                return RetryingStore(fast, policy=policy, url=redact_url(url))
        options = remote_storage_options(url, storage_options, policy)
        inner = FsspecStore.from_url(url, storage_options=options, read_only=read_only)
        if protocol in _SELF_RETRYING:
            policy = policy.replace(retries=0)
        return RetryingStore(inner, policy=policy, url=redact_url(url))
    if storage_options:
        raise TypeError(f"storage_options are only for remote URLs, not for the local path {url!r}")
    return LocalStore(local_path(url), read_only=read_only)
