"""Remote I/O faults: a bounded retry policy and the zarr store that applies it.

fsspec's HTTP filesystem never retries and waits up to aiohttp's 5-minute default; s3fs retries
five times itself on top of botocore's own retries; a 404 from a flaky CDN is read by zarr as
"chunk missing". ctzarr owns one retry loop instead, around every store call
(:class:`RetryingStore`), and sets the libraries below it to a single attempt with its timeout
(:func:`ctzarr.storage.remote_storage_options`), so that the number of requests and the time to
failure are known:

* **retried**: HTTP 408, 429, 500, 502, 503, 504 (and S3 ``SlowDown``, ``InternalError``,
  throttling codes), dropped connections, bodies cut short, read timeouts;
* **not retried**: 404 / missing keys (zarr reads them as "absent": ``None`` stays ``None`` so a
  strict layer above decides), 401 / 403 (:class:`RemotePermissionError` at once), other 4xx,
  TLS certificate errors, and a refused connection or unknown host before the server has ever
  answered this store (a wrong URL, reported at once); a refused connection after the server
  has answered is a restart and is retried.

Settings, strongest first: ``make_store(..., retry=RetryPolicy(...))``; :func:`set_retry_policy`
or the :func:`retry_policy` context manager (process-wide); the environment variables
``CTZARR_RETRIES``, ``CTZARR_TIMEOUT_S``, ``CTZARR_BACKOFF_S``, ``CTZARR_MAX_BACKOFF_S``; the
defaults of :class:`RetryPolicy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zarr.core.buffer import Buffer, BufferPrototype

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
import threading
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Self

from zarr.abc.store import ByteRequest, Store
from zarr.storage import WrapperStore

from ctzarr.errors import RemotePermissionError, RemoteStoreError
from ctzarr.io.faults import Fault, FaultKind, classify
from ctzarr.io.urls import redact_url

logger = logging.getLogger(__name__)


ENV_RETRIES = "CTZARR_RETRIES"


ENV_TIMEOUT_S = "CTZARR_TIMEOUT_S"


ENV_BACKOFF_S = "CTZARR_BACKOFF_S"


ENV_MAX_BACKOFF_S = "CTZARR_MAX_BACKOFF_S"


# ------------------------------------------------------------------------------------------------
# the policy
# ------------------------------------------------------------------------------------------------
def parse_retries(value: str | int, name: str = "retries") -> int:
    """Return a number of retries (a whole number, 0..100) or raise ValueError naming ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and value.strip().isdigit():
        number = int(value.strip())
    else:
        raise ValueError(f"{name} must be a whole number of retries, got {value!r}")
    if not 0 <= number <= 100:
        raise ValueError(f"{name} must be between 0 and 100, got {value!r}")
    return number


def parse_seconds(value: str | float, name: str, *, allow_zero: bool) -> float:
    """Return a finite number of seconds (> 0, or >= 0 with allow_zero) or raise ValueError."""
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        seconds = math.nan
    if (
        isinstance(value, bool)
        or not math.isfinite(seconds)
        or seconds < 0
        or (seconds == 0 and not allow_zero)
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number of seconds {bound}, got {value!r}")
    return seconds


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
        gcsfs ``requests_timeout``). Default 30 s (aiohttp's default is 5 min in total, botocore's
        60 s): a shard range is a few MB, a server silent for 30 s is gone. It is not a cap on a
        transfer that keeps making progress.

    Notes
    -----
    **Worst-case time to failure** of one store call, with ``d_i = min(max_backoff_s,
    backoff_s * 2**i)``:

    * every attempt answered at once with a retried fault (5xx, reset): ``sum(d_i for i <
      retries)`` plus ``attempts`` round trips, 1.4 s with the defaults;
    * every attempt hanging: ``attempts * timeout_s + sum(d_i)``, 4 x 30 + 1.4 ≈ 121 s with the
      defaults (:attr:`worst_case_s`);
    * 401/403, other 4xx, refused before the server ever answered: one round trip.

    A read that keeps receiving a byte just before every ``timeout_s`` is not cut off (use the
    aiohttp ``total`` timeout in ``storage_options`` for that).
    """

    retries: int = 3
    backoff_s: float = 0.2
    max_backoff_s: float = 2.0
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "retries", parse_retries(self.retries))
        object.__setattr__(
            self, "backoff_s", parse_seconds(self.backoff_s, "backoff_s", allow_zero=True)
        )
        object.__setattr__(
            self,
            "max_backoff_s",
            parse_seconds(self.max_backoff_s, "max_backoff_s", allow_zero=True),
        )
        object.__setattr__(
            self, "timeout_s", parse_seconds(self.timeout_s, "timeout_s", allow_zero=False)
        )

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
        nominal = self.nominal_backoff_s(retry)
        delay = nominal * (0.5 + 0.5 * random.random())
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self.max_backoff_s))
        return delay

    def replace(self, **changes: Any) -> RetryPolicy:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, base: RetryPolicy | None = None
    ) -> RetryPolicy:
        """The policy of ``base`` (default: the built-in defaults) with the CTZARR_* variables set
        in ``environ`` (default ``os.environ``) applied; raises ValueError naming a bad one."""
        env = os.environ if environ is None else environ
        policy = base or cls()
        changes: dict[str, Any] = {}
        if env.get(ENV_RETRIES, "").strip():
            changes["retries"] = parse_retries(env[ENV_RETRIES], ENV_RETRIES)
        for var, fld, zero in (
            (ENV_TIMEOUT_S, "timeout_s", False),
            (ENV_BACKOFF_S, "backoff_s", True),
            (ENV_MAX_BACKOFF_S, "max_backoff_s", True),
        ):
            if env.get(var, "").strip():
                changes[fld] = parse_seconds(env[var], var, allow_zero=zero)
        return dataclasses.replace(policy, **changes) if changes else policy

    def describe(self) -> str:
        """One line for messages: the settings and where to change them."""
        return (
            f"retries={self.retries}, timeout_s={self.timeout_s:g} "
            f"(set {ENV_RETRIES} / {ENV_TIMEOUT_S}, or retry=RetryPolicy(...))"
        )


_lock = threading.Lock()


_process_policy: RetryPolicy | None = None


def set_retry_policy(policy: RetryPolicy | None) -> RetryPolicy | None:
    """Set the process-wide policy of stores made from now on; None goes back to the environment
    and the defaults. Returns the previous setting. Stores already made keep theirs."""
    global _process_policy
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise TypeError(f"expected a RetryPolicy or None, got {type(policy).__name__}")
    with _lock:
        previous, _process_policy = _process_policy, policy
    return previous


def current_retry_policy() -> RetryPolicy:
    """The policy a new store gets: set_retry_policy's, else the environment over the defaults."""
    with _lock:
        policy = _process_policy
    return policy if policy is not None else RetryPolicy.from_env()


@contextlib.contextmanager
def retry_policy(policy: RetryPolicy | None = None, /, **changes: Any) -> Iterator[RetryPolicy]:
    """Within the block, new stores get ``policy`` (default: the current one) with ``changes``.

    Process-wide, not per thread: meant for scripts and tests, e.g.
    ``with retry_policy(retries=0, timeout_s=5): col = ctzarr.open_collection(url)``.
    """
    chosen = (policy if policy is not None else current_retry_policy()).replace(**changes)
    previous = set_retry_policy(chosen)
    try:
        yield chosen
    finally:
        set_retry_policy(previous)


# ------------------------------------------------------------------------------------------------
# the store
# ------------------------------------------------------------------------------------------------
def _join(root: str, key: str) -> str:
    return f"{root.rstrip('/')}/{key}" if key else root


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
    """A zarr store (normally an ``FsspecStore``) whose calls are retried under a :class:`RetryPolicy`.

    Reads (``get``, ``get_partial_values``, ``get_ranges``, ``exists``, sizes, listings), writes
    (``set``, whole objects, so a retry is idempotent) and deletes are retried; missing keys stay
    missing (``get`` returns None). Pickles with its policy (dask ships stores to workers); its
    repr shows the URL without user info or query string, never storage options.

    Parameters
    ----------
    store : Store
        The store to wrap.
    policy : RetryPolicy
        Retries and timeouts (the timeouts must already be in the wrapped store's filesystem:
        :func:`ctzarr.storage.make_store` does that).
    url : str
        The store's URL, for messages (redacted here again).
    """

    def __init__(self, store: Store, *, policy: RetryPolicy | None = None, url: str = "") -> None:
        super().__init__(store)
        self.policy = policy if policy is not None else current_retry_policy()
        self.url = redact_url(url or str(getattr(store, "path", "")))
        self._answered = False  # has the server answered this store yet (see FaultKind.CONNECT)
        _single_try_filesystem(store)

    # -- plumbing ---------------------------------------------------------------------------------
    def _with_store(self, store: Store) -> Self:
        return type(self)(store, policy=self.policy, url=self.url)

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
            and super().__eq__(value)
        )

    def __repr__(self) -> str:
        return f"RetryingStore({self.url!r}, retries={self.policy.retries}, timeout_s={self.policy.timeout_s:g})"

    def __str__(self) -> str:
        return self.url

    async def _call[T](self, operation: str, key: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` under the policy; raise RemoteStoreError naming the key when it gives up."""
        policy = self.policy
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await call()
            except Exception as exc:
                fault = classify(exc)
                if fault.kind is FaultKind.PASS:
                    if fault.answered:
                        self._answered = True
                    raise
                if fault.answered:
                    self._answered = True
                retry = fault.kind is FaultKind.TRANSIENT or (
                    fault.kind is FaultKind.CONNECT and self._answered
                )
                if not retry or attempt >= policy.attempts:
                    raise self._error(
                        operation, key, fault, attempt, time.monotonic() - start, retried=retry
                    ) from exc
                delay = policy.sleep_s(attempt - 1, fault.retry_after_s)
                logger.info(
                    "%s %s: %s; retry %d of %d in %.2f s",
                    operation,
                    _join(self.url, key),
                    fault.description,
                    attempt,
                    policy.retries,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                self._answered = True
                return result

    def _error(
        self,
        operation: str,
        key: str,
        fault: Fault,
        attempts: int,
        elapsed_s: float,
        *,
        retried: bool,
    ) -> RemoteStoreError:
        url = _join(self.url, key)
        if retried:
            how = f"gave up after {attempts} attempt{'s' if attempts > 1 else ''} in {elapsed_s:.1f} s"
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
        kwargs = {
            k: v
            for k, v in (
                ("max_concurrency", max_concurrency),
                ("max_gap_bytes", max_gap_bytes),
                ("max_coalesced_bytes", max_coalesced_bytes),
            )
            if v is not None
        }
        try:
            async for group in Store.get_ranges(
                self, key, byte_ranges, prototype=prototype, **kwargs
            ):
                yield group
        except BaseExceptionGroup as group_error:
            # the sharding codec reads FileNotFoundError in the group as "shard gone"; our own
            # error is raised bare so that it reaches the user as one clear line
            ours, _ = group_error.split(RemoteStoreError)
            if ours is not None:
                first: BaseException = ours
                while isinstance(first, BaseExceptionGroup):
                    first = first.exceptions[0]
                raise first from None
            raise

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
                return bool(await fs._exists(_join(self._store.path, key), strict=True))  # type: ignore[attr-defined]
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
