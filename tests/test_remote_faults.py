"""Remote I/O faults (issue 5, group E) against real servers on 127.0.0.1: bounded retries with
backoff, timeouts, fail-fast faults, and the settings that change them.

The fault server (tests/servers.py) answers per path: status sequences, bodies cut short,
hangs, dropped connections. Request counts are taken at the server, times with a monotonic
clock; the policies are small (a few ms of backoff, 1 s timeouts) so that the file stays quick.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import ctzarr
from ctzarr.errors import ConfigError, RemotePermissionError, RemoteStoreError
from ctzarr.io.retry import RetryingStore, RetryPolicy
from ctzarr.io.stores import make_store, remote_storage_options
from ctzarr.io.urls import redact_url

from .servers import FaultServer, Reply, fault_server, s3_error, unused_port

s3fs = pytest.importorskip("s3fs")

#: 3 attempts, 10-20 ms then 20-40 ms of backoff, 1 s timeouts
FAST = RetryPolicy(retries=2, backoff_s=0.02, max_backoff_s=0.04, timeout_s=1.0)
SLOWDOWN = s3_error(503, "SlowDown", "Please reduce your request rate.")
INTERNAL = s3_error(500, "InternalError", "We encountered an internal error. Please try again.")
ACCESS_DENIED = s3_error(403, "AccessDenied", "Access Denied")
VALUES = np.arange(64, dtype=np.int16).reshape(8, 8)
FILL = -1
CHUNK = "/bucket/x.zarr/c/0/0"  # the first of the four 4x4 chunks
#: scheduling slack on a shared 2-core machine, added to every upper time bound
SLACK_S = 1.0


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bucket/x.zarr (8x8 int16 in four 4x4 chunks) and bucket/sharded.zarr (one 8x8 shard of
    four 4x4 chunks): served over HTTP as ``/bucket/...`` and as S3 path-style ``s3://bucket/``."""
    root = tmp_path_factory.mktemp("fault-site")
    plain = zarr.create_array(
        root / "bucket" / "x.zarr", shape=(8, 8), chunks=(4, 4), dtype="int16", fill_value=FILL
    )
    plain[:] = VALUES
    sharded = zarr.create_array(
        root / "bucket" / "sharded.zarr",
        shape=(8, 8),
        chunks=(4, 4),
        shards=(8, 8),
        dtype="int16",
        fill_value=FILL,
    )
    sharded[:] = VALUES
    return root


@pytest.fixture(scope="module")
def module_server(site: Path) -> Iterator[FaultServer]:
    with fault_server(site) as server:
        yield server


@pytest.fixture
def server(module_server: FaultServer) -> FaultServer:
    module_server.reset()
    return module_server


@pytest.fixture(autouse=True)
def clean_policy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No CTZARR_* variable from the caller's environment, no setting made in Python; the
    process-wide settings restored afterwards."""
    for name in ("CTZARR_RETRIES", "CTZARR_TIMEOUT_S", "CTZARR_BACKOFF_S", "CTZARR_MAX_BACKOFF_S"):
        monkeypatch.delenv(name, raising=False)
    with ctzarr.config.set(dict.fromkeys(("retries", "timeout_s", "backoff_s", "max_backoff_s"))):
        yield


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials, no profile, no metadata service: signed requests to the fake S3."""
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "AWS_ACCESS_KEY_ID": "ctzarr-fake-key",
        "AWS_SECRET_ACCESS_KEY": "ctzarr-fake-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(params=["fsspec", "obstore"])
def io(request: pytest.FixtureRequest) -> str:
    """The library read-only stores go through: fsspec (aiohttp, s3fs) or obstore (ctzarr.obstore_io)."""
    return str(request.param)


def http_url(server: FaultServer, name: str = "x.zarr") -> str:
    return f"{server.base}/bucket/{name}"


def reader(url: str, io: str, **kwargs: Any) -> Any:
    """A read-only store (what open_collection makes) through the chosen library."""
    store = make_store(url, read_only=True, io=io, **kwargs)
    inner = type(store._store).__name__
    assert inner == {"fsspec": "FsspecStore", "obstore": "ObjectStore"}[io], inner
    return store


def s3_store(
    server: FaultServer, policy: RetryPolicy | None = FAST, io: str | None = None, **options: Any
) -> Any:
    """An S3 store on the fault server: writable (fsspec) by default, read-only through ``io``."""
    so = {"client_kwargs": {"endpoint_url": server.base}, **options}
    if io is None:
        return make_store("s3://bucket/x.zarr", storage_options=so, retry=policy)
    return reader("s3://bucket/x.zarr", io, storage_options=so, retry=policy)


def read_all(store: Any) -> np.ndarray:
    return zarr.open_array(store=store, mode="r", zarr_format=3)[:]


def count(server: FaultServer, path: str, status: int | None = None) -> int:
    return sum(1 for *_, s in server.requests(path) if status is None or s == status)


# --------------------------------------------------------------------------------------------
# the policy itself
# --------------------------------------------------------------------------------------------
def test_default_policy_and_its_stated_bounds() -> None:
    policy = RetryPolicy()
    assert (
        policy.retries,
        policy.attempts,
        policy.backoff_s,
        policy.max_backoff_s,
        policy.timeout_s,
    ) == (3, 4, 0.2, 2.0, 30.0)
    assert [policy.nominal_backoff_s(i) for i in range(6)] == pytest.approx(
        [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    )
    assert policy.max_sleep_s == pytest.approx(1.4)
    assert policy.worst_case_s == pytest.approx(4 * 30 + 1.4)
    for i in range(3):  # jitter stays within [1/2, 1] of the nominal sleep
        assert 0.5 * policy.nominal_backoff_s(i) <= policy.sleep_s(i) <= policy.nominal_backoff_s(i)
    assert policy.sleep_s(0, retry_after_s=60) == 2.0  # Retry-After raises a sleep up to the cap
    assert pickle.loads(pickle.dumps(policy)) == policy


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"backoff_s": -0.1}, "backoff_s"),
    ],
    ids=[
        "negative-retries",
        "fractional-retries",
        "zero-timeout",
        "nan-timeout",
        "negative-backoff",
    ],
)
def test_policy_rejects_bad_values(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**changes)


def test_bad_environment_value_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, server: FaultServer
) -> None:
    monkeypatch.setenv("CTZARR_RETRIES", "three")
    with pytest.raises(ConfigError, match=r"CTZARR_RETRIES.*'three'") as info:
        make_store(http_url(server))
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------------------------
# E2: 5xx for the first N requests of a key
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("failures", [1, 2])
def test_e2_http_5xx_then_ok_recovers(
    server: FaultServer, status: int, failures: int, io: str
) -> None:
    server.plan(CHUNK, [status] * failures)
    np.testing.assert_array_equal(read_all(reader(http_url(server), io, retry=FAST)), VALUES)
    assert count(server, CHUNK, status) == failures
    assert count(server, CHUNK) == failures + 1  # then one good answer
    assert count(server, "/bucket/x.zarr/c/1/1") == 1  # the healthy chunks: one request each


@pytest.mark.parametrize("status", [500, 503])
def test_e2_http_5xx_beyond_budget_fails_within_the_bound(
    server: FaultServer, status: int, io: str
) -> None:
    policy = RetryPolicy(retries=2, backoff_s=0.1, max_backoff_s=0.15, timeout_s=1.0)
    server.plan(CHUNK, [status] * policy.attempts)  # exactly the budget: the last attempt fails too
    store = reader(http_url(server), io, retry=policy)
    arr = zarr.open_array(store=store, mode="r", zarr_format=3)
    start = time.monotonic()
    with pytest.raises(RemoteStoreError) as info:
        arr[:]  # never read as fill
    elapsed = time.monotonic() - start
    err = info.value
    assert count(server, CHUNK) == policy.attempts == err.attempts == 3
    assert err.status == status
    assert isinstance(err, OSError)
    assert isinstance(err, ctzarr.CtzarrError)
    assert f"{server.base}/bucket/x.zarr/c/0/0" in str(err)
    assert f"HTTP {status}" in str(err)
    assert "gave up after 3 attempts" in str(err)
    # two jittered sleeps: at least half of 0.1 + 0.15 s, at most all of it (plus round trips)
    assert 0.5 * policy.max_sleep_s <= elapsed <= policy.max_sleep_s + SLACK_S
    assert policy.max_sleep_s == pytest.approx(0.25)


def test_e2_429_honours_retry_after_up_to_the_cap(server: FaultServer, io: str) -> None:
    policy = RetryPolicy(retries=1, backoff_s=0.01, max_backoff_s=0.3, timeout_s=1.0)
    server.plan(CHUNK, [Reply(429, b"slow down", (("Retry-After", "5"),))])
    start = time.monotonic()
    np.testing.assert_array_equal(read_all(reader(http_url(server), io, retry=policy)), VALUES)
    elapsed = time.monotonic() - start
    assert count(server, CHUNK) == 2
    # waited the capped Retry-After, not 5 s, not 10 ms (obstore hides the header: it waits the
    # longest backoff, which is the same here)
    assert 0.3 <= elapsed <= 0.3 + SLACK_S


# --------------------------------------------------------------------------------------------
# E3: connection closed mid-body, or without an answer
# --------------------------------------------------------------------------------------------
def test_e3_body_cut_short_is_retried(server: FaultServer, io: str) -> None:
    server.plan(CHUNK, ["truncate", "truncate"])
    np.testing.assert_array_equal(read_all(reader(http_url(server), io, retry=FAST)), VALUES)
    assert count(server, CHUNK, -3) == 2
    assert count(server, CHUNK) == 3


def test_e3_body_cut_short_every_time_is_an_error(server: FaultServer, io: str) -> None:
    server.plan(CHUNK, [], then="truncate")
    arr = zarr.open_array(store=reader(http_url(server), io, retry=FAST), mode="r", zarr_format=3)
    with pytest.raises(RemoteStoreError, match=r"ClientPayloadError|body error") as info:
        arr[:]
    assert info.value.attempts == 3
    assert count(server, CHUNK) == 3


def test_e3_connection_dropped_without_answer(server: FaultServer, io: str) -> None:
    server.plan(CHUNK, [], then="drop")
    arr = zarr.open_array(store=reader(http_url(server), io, retry=FAST), mode="r", zarr_format=3)
    with pytest.raises(
        RemoteStoreError, match=r"Server ?Disconnected|ClientOSError|Connection"
    ) as info:
        arr[:]
    assert info.value.attempts == 3
    # aiohttp itself re-sends an idempotent request once when a kept-alive connection turns out
    # closed, so one attempt is one or two requests
    assert 3 <= count(server, CHUNK) <= 6


# --------------------------------------------------------------------------------------------
# E4: the server accepts and never answers
# --------------------------------------------------------------------------------------------
def test_e4_hang_times_out_within_the_timeout(server: FaultServer, io: str) -> None:
    policy = RetryPolicy(retries=0, timeout_s=1.0)
    store = reader(http_url(server), io, retry=policy)
    arr = zarr.open_array(store=store, mode="r", zarr_format=3)
    server.plan(CHUNK, [], then="hang")
    start = time.monotonic()
    with pytest.raises(RemoteStoreError, match="no response in time") as info:
        arr[:]
    elapsed = time.monotonic() - start
    assert count(server, CHUNK) == 1
    assert info.value.attempts == 1
    assert 0.9 <= elapsed <= policy.worst_case_s + SLACK_S


def test_e4_hang_then_answer_recovers_within_timeout_plus_backoff(
    server: FaultServer, io: str
) -> None:
    policy = RetryPolicy(retries=1, backoff_s=0.01, timeout_s=0.5)
    server.plan(CHUNK, ["hang"])
    start = time.monotonic()
    np.testing.assert_array_equal(read_all(reader(http_url(server), io, retry=policy)), VALUES)
    elapsed = time.monotonic() - start
    assert count(server, CHUNK) == 2
    assert 0.45 <= elapsed <= policy.worst_case_s + SLACK_S


# --------------------------------------------------------------------------------------------
# E5: connection refused
# --------------------------------------------------------------------------------------------
def test_e5_refused_at_first_is_a_clear_error_at_once(io: str) -> None:
    url = f"http://127.0.0.1:{unused_port()}/bucket/x.zarr"
    policy = RetryPolicy()  # 4 attempts and 1.4 s of backoff, were it retried
    start = time.monotonic()
    with pytest.raises(RemoteStoreError) as info:
        read_all(reader(url, io, retry=policy))
    elapsed = time.monotonic() - start
    assert elapsed < 0.2 + SLACK_S / 2  # not retried: a wrong URL or port is reported at once
    assert info.value.attempts == 1
    assert f"{url}/zarr.json" in str(info.value)
    assert "cannot connect" in str(info.value)
    assert "not retried" in str(info.value)


def test_e5_refused_after_the_server_answered_is_retried(site: Path, io: str) -> None:
    with fault_server(site) as gone:
        store = reader(http_url(gone), io, retry=FAST)
        arr = zarr.open_array(store=store, mode="r", zarr_format=3)  # reached: metadata read
    start = time.monotonic()
    with pytest.raises(RemoteStoreError) as info:  # the server went away: a restart, retried
        arr[:]
    assert info.value.attempts == FAST.attempts
    assert time.monotonic() - start <= FAST.max_sleep_s + SLACK_S


# --------------------------------------------------------------------------------------------
# E7: a fake S3 endpoint answering SlowDown / InternalError (s3fs + botocore underneath)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reply", [SLOWDOWN, INTERNAL], ids=["503-SlowDown", "500-InternalError"])
def test_e7_s3_errors_bounded_attempts_and_time(
    server: FaultServer, aws_env: None, reply: Reply, io: str
) -> None:
    policy = RetryPolicy(retries=2, backoff_s=0.05, max_backoff_s=0.1, timeout_s=1.0)
    store = s3_store(server, policy, io=io)
    assert sync(store.getsize("zarr.json")) > 0  # the S3 client is made (not timed below)
    if io == "fsspec":  # s3fs would try 5 times and botocore up to 3 times under each: set to one
        assert store._store.fs.retries == 1
    server.reset()
    server.plan("/", [], then=reply)
    start = time.monotonic()
    with pytest.raises(RemoteStoreError) as info:
        read_all(store)
    elapsed = time.monotonic() - start
    assert len(server.requests()) == policy.attempts == info.value.attempts == 3
    assert info.value.status == reply.status
    assert "s3://bucket/x.zarr/zarr.json" in str(info.value)
    assert elapsed <= policy.max_sleep_s + SLACK_S

    # writes (a conversion writes to S3, always through s3fs) are retried the same way
    store = s3_store(server, policy)
    server.reset()
    server.plan("/", [], then=reply)
    start = time.monotonic()
    with pytest.raises(RemoteStoreError, match=r"write s3://bucket/x.zarr/c/9/9"):
        sync(store.set("c/9/9", default_buffer_prototype().buffer.from_bytes(b"payload")))
    assert [m for m, *_ in server.requests()] == ["PUT"] * policy.attempts
    assert time.monotonic() - start <= policy.max_sleep_s + SLACK_S


def test_e7_s3_slowdown_then_ok_recovers(server: FaultServer, aws_env: None, io: str) -> None:
    server.plan(CHUNK, [SLOWDOWN, SLOWDOWN])
    np.testing.assert_array_equal(read_all(s3_store(server, io=io)), VALUES)
    assert count(server, CHUNK, 503) == 2

    server.reset()
    server.plan("/bucket/x.zarr/c/9/9", [SLOWDOWN], method="PUT")
    store = s3_store(server)
    sync(store.set("c/9/9", default_buffer_prototype().buffer.from_bytes(b"payload")))
    assert [s for m, _, _, s in server.requests("/bucket/x.zarr/c/9/9") if m == "PUT"] == [503, 200]


# --------------------------------------------------------------------------------------------
# E8: 403 is a permission error at once; 404 stays "missing" for the strict layer above
# --------------------------------------------------------------------------------------------
def test_e8_http_403_is_a_permission_error_never_fill(server: FaultServer, io: str) -> None:
    server.plan(CHUNK, [], then=403)
    arr = zarr.open_array(store=reader(http_url(server), io, retry=FAST), mode="r", zarr_format=3)
    with pytest.raises(RemotePermissionError) as info:
        arr[:]
    assert isinstance(info.value, PermissionError)
    assert isinstance(info.value, ctzarr.CtzarrError)
    assert "HTTP 403" in str(info.value)
    assert "not retried" in str(info.value)
    assert count(server, CHUNK) == 1


def test_e8_s3_403_is_a_permission_error_never_fill(
    server: FaultServer, aws_env: None, io: str
) -> None:
    store = s3_store(server, io=io)
    arr = zarr.open_array(store=store, mode="r", zarr_format=3)
    server.plan(CHUNK, [], then=ACCESS_DENIED)
    with pytest.raises(RemotePermissionError, match=r"s3://bucket/x.zarr/c/0/0.*403") as info:
        arr[:]
    assert info.value.attempts == 1
    assert count(server, CHUNK) == 1


def test_e8_404_stays_missing_and_is_not_retried(server: FaultServer, io: str) -> None:
    store = reader(http_url(server), io, retry=FAST)
    assert sync(store.get("c/7/7", default_buffer_prototype())) is None  # no such chunk
    assert count(server, "/bucket/x.zarr/c/7/7") == 1
    assert sync(store.exists("c/7/7")) is False
    server.plan("/bucket/x.zarr/zarr.json", [503])  # exists() sees faults (fsspec HTTP hides them)
    assert sync(store.exists("zarr.json")) is True
    assert count(server, "/bucket/x.zarr/zarr.json") == 2


# --------------------------------------------------------------------------------------------
# E9: anonymous S3 never asks the instance metadata service
# --------------------------------------------------------------------------------------------
def test_e9_anonymous_s3_needs_no_credentials_or_metadata_service(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_EC2_METADATA_DISABLED",
        "AWS_ENDPOINT_URL",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # a probe would wait 2 s: well above a new client's time on a loaded 2-core machine (~0.3-1.1 s)
    monkeypatch.setenv("AWS_METADATA_SERVICE_TIMEOUT", "2")
    monkeypatch.setenv("AWS_METADATA_SERVICE_NUM_ATTEMPTS", "1")
    with fault_server() as imds:  # a metadata service that never answers: any probe costs time
        imds.plan("/", [], then="hang")
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.base)

        np.testing.assert_array_equal(read_all(s3_store(server, anon=True)), VALUES)
        start = time.monotonic()  # a second, new S3 client: its time without the imports
        np.testing.assert_array_equal(
            read_all(s3_store(server, anon=True, skip_instance_cache=True)), VALUES
        )
        assert time.monotonic() - start < 1.9  # a probe would cost the 2 s metadata timeout
        assert imds.requests() == []

        # control: without anon the same environment does probe it (so the check above can fail)
        start = time.monotonic()
        with pytest.raises(Exception, match=r"[Cc]redentials"):
            read_all(s3_store(server, anon=False))
        assert time.monotonic() - start >= 1.9
        assert len(imds.requests()) >= 1


# --------------------------------------------------------------------------------------------
# settable: environment, keyword, process-wide setter, context manager
# --------------------------------------------------------------------------------------------
def _failing_read_attempts(server: FaultServer, **make_kwargs: Any) -> int:
    server.reset()
    server.plan("/bucket/x.zarr/zarr.json", [], then=503)
    with pytest.raises(RemoteStoreError):
        read_all(make_store(http_url(server), **make_kwargs))
    return count(server, "/bucket/x.zarr/zarr.json")


def test_environment_sets_retries_and_timeout(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch, io: str
) -> None:
    monkeypatch.setenv("CTZARR_BACKOFF_S", "0.01")
    monkeypatch.setenv("CTZARR_RETRIES", "0")
    assert _failing_read_attempts(server) == 1
    monkeypatch.setenv("CTZARR_RETRIES", "4")
    assert _failing_read_attempts(server) == 5
    assert RetryPolicy.from_config() == RetryPolicy(retries=4, backoff_s=0.01)

    # the timeout reaches aiohttp and obstore: one hang costs 0.5 s, not 30 s
    monkeypatch.setenv("CTZARR_TIMEOUT_S", "0.5")
    server.reset()
    server.plan(CHUNK, ["hang"])
    start = time.monotonic()
    np.testing.assert_array_equal(read_all(reader(http_url(server), io)), VALUES)
    assert 0.45 <= time.monotonic() - start <= 0.5 + SLACK_S
    assert count(server, CHUNK) == 2


def test_keyword_setter_and_context_manager(
    server: FaultServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CTZARR_RETRIES", "0")
    quick = RetryPolicy(retries=3, backoff_s=0.01)
    assert _failing_read_attempts(server, retry=quick) == 4  # the keyword beats the environment
    assert _failing_read_attempts(server) == 1

    ctzarr.config.set(retries=1, backoff_s=0.01)  # process-wide beats the environment
    try:
        assert _failing_read_attempts(server) == 2
        with ctzarr.config.set(retries=2):  # a block, over the process-wide settings
            assert RetryPolicy.from_config() == quick.replace(retries=2)
            assert _failing_read_attempts(server) == 3
        assert _failing_read_attempts(server) == 2
    finally:
        ctzarr.config.set(retries=None, backoff_s=None)  # back to the environment
    assert _failing_read_attempts(server) == 1


def test_open_collection_uses_the_policy(server: FaultServer) -> None:
    """The library entry point goes through make_store: a 503 on the root becomes our error."""
    server.plan("/bucket/x.zarr/zarr.json", [], then=503)
    with (
        ctzarr.config.set(retries=1, backoff_s=0.01),
        pytest.raises(RemoteStoreError, match="gave up after 2"),
    ):
        ctzarr.open_collection(http_url(server))
    assert count(server, "/bucket/x.zarr/zarr.json") == 2


# --------------------------------------------------------------------------------------------
# shards: ranged reads go through zarr's get_ranges, also retried, errors not wrapped in groups
# --------------------------------------------------------------------------------------------
def test_sharded_ranges_are_retried_and_fail_as_one_error(server: FaultServer, io: str) -> None:
    shard = "/bucket/sharded.zarr/c/0/0"
    server.plan(shard, [503, "serve", 503])  # the shard index once, then one inner chunk once
    arr = zarr.open_array(
        store=reader(http_url(server, "sharded.zarr"), io, retry=FAST), mode="r", zarr_format=3
    )
    np.testing.assert_array_equal(arr[:4, :4], VALUES[:4, :4])
    assert count(server, shard, 503) == 2
    assert all(rng for _, _, rng, _ in server.requests(shard))  # ranged, never the whole shard

    server.reset()
    server.plan(shard, ["serve"], then=500)  # index fine, the chunk range never
    arr = zarr.open_array(
        store=reader(http_url(server, "sharded.zarr"), io, retry=FAST), mode="r", zarr_format=3
    )
    with pytest.raises(RemoteStoreError, match="HTTP 500") as info:
        arr[:4, :4]
    assert not isinstance(info.value, BaseExceptionGroup)
    assert count(server, shard, 500) == FAST.attempts


# --------------------------------------------------------------------------------------------
# pickling (dask ships stores and errors) and credential hygiene
# --------------------------------------------------------------------------------------------
def test_store_pickles_with_its_policy(server: FaultServer, aws_env: None, io: str) -> None:
    store = reader(http_url(server), io, retry=FAST)
    assert isinstance(store, RetryingStore)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.policy == FAST
    assert clone == store
    server.plan(CHUNK, [503, 503])
    np.testing.assert_array_equal(read_all(clone), VALUES)
    assert count(server, CHUNK) == 3

    s3 = s3_store(server, io=io)
    s3_clone = pickle.loads(pickle.dumps(s3))
    assert s3_clone.policy == FAST
    if io == "fsspec":
        assert s3_clone._store.fs.retries == 1  # s3fs's own loop is set to one try again on arrival
    server.reset()
    server.plan(CHUNK, [SLOWDOWN])
    np.testing.assert_array_equal(read_all(s3_clone), VALUES)  # retried by the clone
    assert count(server, CHUNK, 503) == 1

    err = RemoteStoreError("read x: HTTP 503")
    err.url, err.attempts, err.status = "http://h/x", 3, 503
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.url, back.attempts, back.status) == (
        RemoteStoreError,
        "read x: HTTP 503",
        "http://h/x",
        3,
        503,
    )


def test_no_credentials_in_repr_or_errors(server: FaultServer) -> None:
    secret = "CTZARR-FAKE-PASSWORD-99"
    url = server.base.replace("http://", f"http://reader:{secret}@") + "/bucket/x.zarr"
    server.plan("/bucket/x.zarr/zarr.json", [], then=503)
    store = make_store(url, retry=FAST)
    with pytest.raises(RemoteStoreError) as info:
        read_all(store)
    assert count(server, "/bucket/x.zarr/zarr.json") == FAST.attempts
    for text in (repr(store), str(store), str(info.value), info.value.url):
        assert secret not in text, text
        assert "reader" not in text, text
    s3 = make_store(
        "s3://bucket/x.zarr", storage_options={"key": "AKIAFAKE", "secret": secret}, retry=FAST
    )
    assert secret not in repr(s3)
    assert "AKIAFAKE" not in repr(s3)
    assert (
        redact_url("see https://u:p@h/x?X-Amz-Signature=abc&t=1 now") == "see https://h/x?... now"
    )


# --------------------------------------------------------------------------------------------
# what make_store hands to the libraries
# --------------------------------------------------------------------------------------------
def test_library_options_filled_in_and_user_options_win() -> None:
    import aiohttp

    policy = RetryPolicy(timeout_s=7)
    http = remote_storage_options("https://h/x.zarr", None, policy)
    assert http["client_kwargs"]["timeout"] == aiohttp.ClientTimeout(
        total=None, sock_connect=7, sock_read=7
    )
    mine = aiohttp.ClientTimeout(total=99)
    kept = remote_storage_options(
        "https://h/x.zarr", {"client_kwargs": {"timeout": mine, "trust_env": True}}, policy
    )
    assert kept["client_kwargs"] == {"timeout": mine, "trust_env": True}

    s3 = remote_storage_options("s3://b/x.zarr", {"anon": True}, policy)
    assert s3 == {
        "anon": True,
        "config_kwargs": {
            "connect_timeout": 7,
            "read_timeout": 7,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
        },
    }
    user = {"config_kwargs": {"read_timeout": 120, "retries": {"max_attempts": 2}}}
    s3_user = remote_storage_options("s3://b/x.zarr", user, policy)
    assert s3_user["config_kwargs"] == {
        "read_timeout": 120,
        "retries": {"max_attempts": 2},
        "connect_timeout": 7,
    }
    assert user == {
        "config_kwargs": {"read_timeout": 120, "retries": {"max_attempts": 2}}
    }  # not mutated

    assert remote_storage_options("gs://b/x.zarr", None, policy) == {"requests_timeout": 7}
    assert remote_storage_options("memory://x.zarr", None, policy) == {}
    assert not isinstance(make_store("memory://faults/x.zarr"), RetryingStore)
