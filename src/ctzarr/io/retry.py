"""Remote I/O faults: a bounded retry policy, and the zarr store that applies it with tenacity.

fsspec's HTTP filesystem never retries and waits up to aiohttp's 5-minute default; s3fs retries
five times itself on top of botocore's own retries; obstore retries what it likes; a 404 from a
flaky CDN is read by zarr as "chunk missing". ctzarr retries in one place instead, around every
store call (:class:`RetryingStore`, a tenacity loop deciding with the one fault classifier
:func:`ctzarr.io.faults.classify`), and sets the libraries below it to a single attempt with its
timeout (:func:`ctzarr.io.stores.remote_storage_options`, obstore's ``RetryConfig``), so that
the number of requests and the time to failure are known whatever library reads:

* **retried**: HTTP 408, 429, 500, 502, 503, 504 (and S3 ``SlowDown``, ``InternalError``,
  throttling codes), dropped connections, bodies cut short, read timeouts;
* **not retried**: 404 / missing keys (zarr reads them as "absent": ``None`` stays ``None`` so a
  strict layer above decides), 401 / 403 (:class:`RemotePermissionError` at once), other 4xx,
  TLS certificate errors, and a refused connection or unknown host before the server has ever
  answered this store (a wrong URL, reported at once); a refused connection after the server
  has answered is a restart and is retried.

Settings, strongest first: ``make_store(..., retry=RetryPolicy(...))``; ``ctzarr.config.set(
retries=..., timeout_s=..., backoff_s=..., max_backoff_s=...)``; the environment variables
``CTZARR_RETRIES``, ``CTZARR_TIMEOUT_S``, ``CTZARR_BACKOFF_S``, ``CTZARR_MAX_BACKOFF_S``; the
defaults (:mod:`ctzarr.config`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)
from zarr.abc.store import ByteRequest, Store
from zarr.storage import WrapperStore

from ctzarr import config
from ctzarr.errors import RemotePermissionError, RemoteStoreError
from ctzarr.io.faults import Fault, FaultKind, classify
from ctzarr.io.urls import redact_url

if TYPE_CHECKING:
    from zarr.core.buffer import Buffer, BufferPrototype

logger = logging.getLogger(__name__)

_FIELDS = ("retries", "backoff_s", "max_backoff_s", "timeout_s")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long ctzarr tries a remote store call before it gives up.

    Parameters
    ----------
    retries : int
        Attempts after the first one (``attempts = retries + 1``); 0 disables retries.
        Default 3: transient faults of object stores and CDNs (a 503 during a deploy, a throttled
        burst, a connection reset) clear within a second or two, and a conversion that still
        fails is resumed by re-running it, so failing within seconds beats retrying for minutes.
    backoff_s : float
        Sleep before the first retry; doubled before each next one (exponential backoff, each
        sleep drawn in [0.5, 1] x its nominal value so that many workers do not retry in step).
        Default 0.2 s: 0.2, 0.4, 0.8 s, 1.4 s of sleep in all. A ``Retry-After`` header raises a
        sleep up to ``max_backoff_s``.
    max_backoff_s : float
        Cap on any one sleep. Default 2 s (reached from the 5th retry on).
    timeout_s : float
        Connect timeout, and read timeout: the longest wait for the next bytes of a response
        (aiohttp ``sock_connect``/``sock_read``; botocore ``connect_timeout``/``read_timeout``;
        obstore ``connect_timeout``/``read_timeout``; gcsfs ``requests_timeout``). Default 30 s.

    Notes
    -----
    **Worst-case time to failure** of one store call, with ``d_i = min(max_backoff_s,
    backoff_s * 2**i)``:

    * every attempt answered at once with a retried fault (5xx, reset): ``sum(d_i for i <
      retries)`` plus ``attempts`` round trips, 1.4 s with the defaults;
    * every attempt hanging: ``attempts * timeout_s + sum(d_i)``, 4 x 30 + 1.4 ≈ 121 s with the
      defaults (:attr:`worst_case_s`); no retry starts after that much time;
    * 401/403, other 4xx, refused before the server ever answered: one round trip.
    """

    retries: int = config.DEFAULTS["retries"]
    backoff_s: float = config.DEFAULTS["backoff_s"]
    max_backoff_s: float = config.DEFAULTS["max_backoff_s"]
    timeout_s: float = config.DEFAULTS["timeout_s"]

    def __post_init__(self) -> None:
        for name in _FIELDS:  # the parsers of the settings of the same names
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, config.SETTINGS[name].parse(value))
            except ValueError as exc:
                raise ValueError(f"{name} {exc}, got {value!r}") from None

    @classmethod
    def from_config(cls) -> RetryPolicy:
        """The policy of the settings (``ctzarr.config``, ``CTZARR_RETRIES``... , defaults)."""
        return cls(**{name: config.get(name) for name in _FIELDS})

    @property
    def attempts(self) -> int:
        """Total attempts per call: ``retries + 1``."""
        return self.retries + 1

    def nominal_backoff_s(self, retry: int) -> float:
        """Nominal sleep before retry number ``retry`` (0-based): the upper end of its range."""
        return min(self.max_backoff_s, self.backoff_s * 2.0**retry)

    @property
    def max_sleep_s(self) -> float:
        """Longest total sleep between the attempts of one call."""
        return sum(self.nominal_backoff_s(i) for i in range(self.retries))

    @property
    def worst_case_s(self) -> float:
        """Upper bound on the time to failure when every attempt hangs until its timeout."""
        return self.attempts * self.timeout_s + self.max_sleep_s

    def sleep_s(self, retry: int, retry_after_s: float | None = None) -> float:
        """Sleep before retry number ``retry`` (0-based): jittered backoff, raised by Retry-After."""
        delay = self.nominal_backoff_s(retry) * (0.5 + 0.5 * random.random())
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_backoff_s))
        return delay

    def replace(self, **changes: Any) -> RetryPolicy:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for messages: the settings and where to change them."""
        return (
            f"retries={self.retries}, timeout_s={self.timeout_s:g} "
            "(set CTZARR_RETRIES / CTZARR_TIMEOUT_S, ctzarr.config.set, or retry=RetryPolicy(...))"
        )


def _single_try_filesystem(store: Store) -> None:
    """Make s3fs try once: its own loop (``S3FileSystem.retries``, 5 tries, up to 1.9 s of sleep)
    would multiply ours, and it is a class attribute, not a constructor option."""
    fs = getattr(store, "fs", None)
    protocols = getattr(fs, "protocol", ())
    protocols = (protocols,) if isinstance(protocols, str) else tuple(protocols)
    if (
        fs is not None
        and {"s3", "s3a"} & set(protocols)
        and isinstance(getattr(fs, "retries", None), int)
    ):
        fs.retries = 1


class RetryingStore(WrapperStore[Store]):
    """A zarr store whose calls are retried under a :class:`RetryPolicy`.

    Reads (``get``, ``get_partial_values``, ``get_ranges``, ``exists``, sizes, listings), writes
    (``set``, whole objects, so a retry is idempotent) and deletes are retried; missing keys stay
    missing (``get`` returns None). Pickles with its policy (dask ships stores to workers); its
    repr shows the URL without user info or query string, never storage options.

    Parameters
    ----------
    store : Store
        The store to wrap (an ``FsspecStore`` or obstore's ``ObjectStore``, each set to try once:
        :func:`ctzarr.io.stores.make_store` does that).
    policy : RetryPolicy, optional
        Retries and timeouts; default :meth:`RetryPolicy.from_config`.
    url : str
        The store's URL, for messages (redacted here again).
    """

    def __init__(self, store: Store, *, policy: RetryPolicy | None = None, url: str = "") -> None:
        super().__init__(store)
        self.policy = policy if policy is not None else RetryPolicy.from_config()
        self.url = redact_url(url or str(getattr(store, "path", "")))
        self._answered = False  # has the server answered this store yet (see FaultKind.CONNECT)
        _single_try_filesystem(store)

    # -- plumbing ---------------------------------------------------------------------------------
    def _with_store(self, store: Store) -> Self:
        return type(self)(store, policy=self.policy, url=self.url)

    @property
    def _supports_sync_io(self) -> bool:
        return False  # zarr's sync fast path would call the wrapped store and skip the retries

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_answered"] = False  # a new process has not reached the server yet
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        _single_try_filesystem(self._store)  # the unpickled filesystem has the class default

    def __eq__(self, value: object) -> bool:
        return (
            isinstance(value, RetryingStore)
            and self.policy == value.policy
            and self._store == value._store
        )

    def __repr__(self) -> str:
        p = self.policy
        return f"RetryingStore({self.url!r}, retries={p.retries}, timeout_s={p.timeout_s:g})"

    def __str__(self) -> str:
        return self.url

    def _worth_retrying(self, exc: BaseException) -> bool:
        fault = classify(exc)
        self._answered |= fault.answered
        return fault.kind is FaultKind.TRANSIENT or (
            fault.kind is FaultKind.CONNECT and self._answered
        )

    def _wait_s(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        after = classify(exc).retry_after_s if exc is not None else None
        return self.policy.sleep_s(state.attempt_number - 1, after)

    async def _call[T](self, operation: str, key: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` under the policy; raise RemoteStoreError naming the key when it gives up."""
        attempts = 0

        async def attempt() -> T:
            nonlocal attempts
            attempts += 1
            return await call()

        def log_retry(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            logger.info(
                "%s %s: %s; retry %d of %d in %.2f s",
                operation,
                _join(self.url, key),
                classify(exc).description if exc else "",
                state.attempt_number,
                self.policy.retries,
                state.upcoming_sleep,
            )

        start = time.monotonic()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.policy.attempts)
            | stop_after_delay(self.policy.worst_case_s),
            wait=self._wait_s,
            retry=retry_if_exception(self._worth_retrying),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            result: T = await retrying(attempt)
        except Exception as exc:
            fault = classify(exc)
            if fault.kind in (FaultKind.UNKNOWN, FaultKind.MISSING):
                raise
            raise self._error(
                operation, key, fault, attempts, time.monotonic() - start, exc
            ) from exc
        self._answered = True
        return result

    def _error(
        self,
        operation: str,
        key: str,
        fault: Fault,
        attempts: int,
        elapsed_s: float,
        exc: BaseException,
    ) -> RemoteStoreError:
        url = _join(self.url, key)
        if self._worth_retrying(exc):
            plural = "s" if attempts > 1 else ""
            how = f"gave up after {attempts} attempt{plural} in {elapsed_s:.1f} s"
        elif fault.kind is FaultKind.CONNECT:
            how = "not retried: the server has not answered this store yet (check the URL)"
        else:
            how = "not retried"
        cls = RemotePermissionError if fault.kind is FaultKind.PERMISSION else RemoteStoreError
        err = cls(f"{operation} {url}: {fault.description}; {how} [{self.policy.describe()}]")
        err.url, err.operation, err.fault = url, operation, fault.description
        err.attempts, err.elapsed_s, err.status = attempts, elapsed_s, fault.status
        return err

    # -- reads ------------------------------------------------------------------------------------
    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await self._call("read", key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        pairs = list(key_ranges)
        keys = sorted({k for k, _ in pairs})
        label = keys[0] if len(keys) == 1 else f"{{{len(keys)} keys}}"
        return await self._call(
            "read", label, lambda: self._store.get_partial_values(prototype, pairs)
        )

    async def get_ranges(
        self,
        key: str,
        byte_ranges: Sequence[ByteRequest | None],
        *,
        prototype: BufferPrototype,
        max_concurrency: int | None = None,
        max_gap_bytes: int | None = None,
        max_coalesced_bytes: int | None = None,
    ) -> AsyncIterator[Sequence[tuple[int, Buffer | None]]]:
        # zarr's own coalescing over our (retried) get; the wrapped FsspecStore has no override
        limits = {
            "max_concurrency": max_concurrency,
            "max_gap_bytes": max_gap_bytes,
            "max_coalesced_bytes": max_coalesced_bytes,
        }
        kwargs = {k: v for k, v in limits.items() if v is not None}
        try:
            async for group in Store.get_ranges(
                self, key, byte_ranges, prototype=prototype, **kwargs
            ):
                yield group
        except BaseExceptionGroup as group_error:
            # the sharding codec reads FileNotFoundError in the group as "shard gone"; our own
            # error is raised bare so that it reaches the user as one clear line
            ours, _ = group_error.split(RemoteStoreError)
            if ours is None:
                raise
            first: BaseException = ours
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncGenerator[tuple[str, Buffer | None], None]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def exists(self, key: str) -> bool:
        return await self._call("exists", key, lambda: self._exists(key))

    async def _exists(self, key: str) -> bool:
        """fsspec's HTTP ``exists`` reads any error as "absent"; ask it to raise instead."""
        fs = getattr(self._store, "fs", None)
        if fs is not None and type(fs).__name__ == "HTTPFileSystem":
            try:
                path = _join(self._store.path, key)  # type: ignore[attr-defined]
                return bool(await fs._exists(path, strict=True))
            except FileNotFoundError:
                return False
        return await self._store.exists(key)

    async def getsize(self, key: str) -> int:
        return await self._call("size", key, lambda: self._store.getsize(key))

    async def is_empty(self, prefix: str) -> bool:
        return await self._call("list", prefix, lambda: self._store.is_empty(prefix))

    async def _listed(self, prefix: str, lister: Callable[[], AsyncIterator[str]]) -> list[str]:
        async def collect() -> list[str]:
            return [k async for k in lister()]

        return await self._call("list", prefix, collect)

    async def list(self) -> AsyncIterator[str]:
        for k in await self._listed("", self._store.list):
            yield k

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for k in await self._listed(prefix, lambda: self._store.list_prefix(prefix)):
            yield k

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        for k in await self._listed(prefix, lambda: self._store.list_dir(prefix)):
            yield k

    # -- writes -----------------------------------------------------------------------------------
    async def set(self, key: str, value: Buffer) -> None:
        await self._call("write", key, lambda: self._store.set(key, value))

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        if not await self.exists(key):
            await self.set(key, value)

    async def _set_many(self, values: Iterable[tuple[str, Buffer]]) -> None:
        await asyncio.gather(*(self.set(k, v) for k, v in values))

    async def delete(self, key: str) -> None:
        await self._call("delete", key, lambda: self._store.delete(key))

    async def delete_dir(self, prefix: str) -> None:
        await self._call("delete", prefix, lambda: self._store.delete_dir(prefix))

    async def clear(self) -> None:
        await self._call("delete", "", self._store.clear)


def _join(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}" if key else root
