"""zarr-python's store conformance suite (``zarr.testing.store.StoreTests``) run against every
store wrapper of ours: a wrapper must behave as a zarr store, whatever it adds.

- :class:`~ctzarr.io.retry.RetryingStore` over a ``LocalStore`` (retries are proven against
  real servers in test_remote_faults.py; here: the store contract itself);
- :class:`~ctzarr.io.strict.StrictStore` over a ``LocalStore`` and a ``MemoryStore``, with no
  case layouts: it then checks no key and must be exactly a plain store (its checks apply
  to chunk keys of the case's arrays only, proven in test_integrity.py).
"""

from __future__ import annotations

import functools
import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from zarr.core.buffer import default_buffer_prototype
from zarr.core.buffer.cpu import Buffer
from zarr.storage import LocalStore, MemoryStore
from zarr.testing.store import StoreTests

from ctzarr.io.retry import RetryingStore, RetryPolicy
from ctzarr.io.strict import StrictStore


class _AsyncTests:
    """StoreTests' async fixtures and tests under pytest-asyncio's strict mode (zarr-python
    runs its suite in auto mode; ours stays strict)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # the asyncio mark on the coroutine tests only (a class-wide mark warns on the others);
        # a wrapper per class, so that StoreTests' own functions stay unmarked
        super().__init_subclass__(**kwargs)
        for name in dir(cls):
            test = getattr(cls, name)
            if name.startswith("test_") and inspect.iscoroutinefunction(test):

                @functools.wraps(test)
                async def run(self: Any, *args: Any, _test: Any = test, **kw: Any) -> None:
                    await _test(self, *args, **kw)

                setattr(cls, name, pytest.mark.asyncio(run))

    @pytest_asyncio.fixture
    async def store(self, open_kwargs: dict[str, Any]) -> Any:
        return await self.store_cls.open(**open_kwargs)  # type: ignore[attr-defined]

    @pytest_asyncio.fixture
    async def store_not_open(self, store_kwargs: dict[str, Any]) -> Any:
        return self.store_cls(**store_kwargs)  # type: ignore[attr-defined]


class _OverLocalStore(_AsyncTests):
    """Reads and writes behind the wrapper's back: the files of the wrapped LocalStore."""

    buffer_cls = Buffer

    async def set(self, store: Any, key: str, value: Buffer) -> None:
        path = Path(store._store.root) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(value.to_bytes())

    async def get(self, store: Any, key: str) -> Buffer:
        return self.buffer_cls.from_bytes((Path(store._store.root) / key).read_bytes())

    @pytest.fixture
    def store_kwargs(self, tmp_path: Path) -> dict[str, Any]:
        return {"store": LocalStore(str(tmp_path))}

    @pytest.fixture
    def open_kwargs(self, tmp_path: Path) -> dict[str, Any]:
        return {"store_cls": LocalStore, "root": str(tmp_path)}

    def test_store_supports_writes(self, store: Any) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: Any) -> None:
        assert store.supports_listing


class TestRetryingStore(_OverLocalStore, StoreTests[RetryingStore, Buffer]):  # type: ignore[misc]
    store_cls = RetryingStore

    def test_store_repr(self, store: RetryingStore) -> None:
        assert repr(store).startswith(f"RetryingStore({str(store)!r}, retries=3")

    def test_policy_survives_the_wrapper_protocol(self, store: RetryingStore) -> None:
        quick = RetryingStore(store._store, policy=RetryPolicy(retries=0))
        assert quick.with_read_only(True).policy == quick.policy
        assert quick.with_read_only(True).read_only
        assert quick != store  # same files, another policy

    def test_sync_io_goes_through_the_retries(self, store: RetryingStore) -> None:
        # zarr's sync fast path would reach the wrapped store directly
        assert not store._supports_sync_io


class TestStrictStoreOverLocal(_OverLocalStore, StoreTests[StrictStore, Buffer]):  # type: ignore[misc]
    store_cls = StrictStore

    def test_store_repr(self, store: StrictStore) -> None:
        assert repr(store).startswith("StrictStore(")


class TestStrictStoreOverMemory(_AsyncTests, StoreTests[StrictStore, Buffer]):  # type: ignore[misc]
    store_cls = StrictStore
    buffer_cls = Buffer

    async def set(self, store: StrictStore, key: str, value: Buffer) -> None:
        store._store._store_dict[key] = value  # type: ignore[attr-defined]

    async def get(self, store: StrictStore, key: str) -> Buffer:
        return store._store._store_dict[key]  # type: ignore[attr-defined,no-any-return]

    @pytest.fixture
    def store_kwargs(self) -> dict[str, Any]:
        return {"store": MemoryStore({})}

    @pytest.fixture
    def open_kwargs(self) -> dict[str, Any]:
        return {"store_cls": MemoryStore, "store_dict": {}}

    def test_store_repr(self, store: StrictStore) -> None:
        assert repr(store).startswith("StrictStore(")

    def test_store_supports_writes(self, store: StrictStore) -> None:
        assert store.supports_writes

    def test_store_supports_listing(self, store: StrictStore) -> None:
        assert store.supports_listing

    def test_store_eq(self, store: StrictStore, store_kwargs: dict[str, Any]) -> None:
        # a MemoryStore equals another only when both hold the same dict object, and
        # store_kwargs makes a new one: compare over the same dict instead
        assert store == store
        assert StrictStore(store._store) == store

    async def test_serializable_store(self, store: StrictStore) -> None:
        # a pickled MemoryStore is a copy of its dict, not the same store (zarr's own
        # TestMemoryStore skips this test for the same reason); the wrapper must pickle
        clone = pickle.loads(pickle.dumps(store))
        assert isinstance(clone, StrictStore)
        assert clone.read_only == store.read_only
        await store.set("foo", self.buffer_cls.from_bytes(b"\x01"))
        assert await store.get("foo", default_buffer_prototype()) is not None
