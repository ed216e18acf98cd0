"""Reads from S3 and HTTP(S) through obstore (Rust ``object_store``), when it is installed.

Why not fsspec for reads: a cold ``open_collection(s3://...)`` plus one crop spends most of its
time creating an s3fs/aiobotocore client (session, credential chain, service model: ~200 ms
per new client here) and signing requests in Python; s3fs also sends a HEAD before every
whole-object GET. obstore's client is built in about a millisecond, signs in Rust, and sends
exactly the GET or ranged GET zarr asks for (suffix ranges included), so a cold crop over
S3 costs about what TensorStore's does (benchmarks/CLOUD.md). Writes (conversion, locks,
``verify --repair``) stay on fsspec: they need exclusive creates, listings and deletes that
our fsspec code paths already cover and test.

The translation from fsspec ``storage_options`` is deliberately narrow: an option with no exact
obstore equivalent (a botocore profile, custom ``client_kwargs``, fsspec HTTP auth...) means
the store is left to fsspec, so nothing the user set is silently dropped. ``CTZARR_IO=fsspec``
(``ctzarr.config.set(io="fsspec")``, ``make_store(..., io="fsspec")``) turns this path off.

Retries: obstore is set to one attempt (``RetryConfig(max_retries=0)``); the store above it
(:class:`ctzarr.io.retry.RetryingStore`) retries with the same policy and fault classifier as
for fsspec, so that attempts, timeouts and errors do not depend on the library that reads.

Credentials: with none in ``storage_options``, obstore resolves them itself where the I/O
happens (environment variables, web identity, ECS/instance roles) and pickles only the options
it was given, so a store shipped to a dask worker carries no secret. A botocore *profile*
(``AWS_PROFILE`` or ``~/.aws`` files without credentials in the environment) is not read by
obstore: such stores stay on fsspec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from obstore.store import ClientConfig, RetryConfig, S3Config
    from zarr.abc.store import Store

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from ctzarr import config
from ctzarr.io.retry import RetryPolicy
from ctzarr.io.urls import url_protocol

logger = logging.getLogger(__name__)


#: fsspec options that only tune fsspec's own caching or concurrency: meaningless for obstore
_S3_IGNORED = frozenset(
    {
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "max_concurrency",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
        "cache_regions",
    }
)


_HTTP_IGNORED = frozenset(
    {
        "skip_instance_cache",
        "block_size",
        "simple_links",
        "same_scheme",
        "cache_type",
        "size_policy",
    }
)


#: the botocore settings ctzarr itself fills in (storage.remote_storage_options)
_OUR_CONFIG_KWARGS = frozenset({"connect_timeout", "read_timeout", "retries"})


#: where a bucket's region is asked when neither the options nor the environment give one
AWS_S3_URL = "https://s3.amazonaws.com"


_ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT")


def available() -> bool:
    """True when obstore and zarr's ObjectStore can be imported."""
    try:  # optional: obstore comes with the s3 and http extras
        import obstore  # noqa: F401
        from zarr.storage import ObjectStore  # noqa: F401
    except ImportError:
        return False
    return True


def _client_options(policy: RetryPolicy, http: bool) -> ClientConfig:
    t = timedelta(seconds=policy.timeout_s)
    # connect and per-read timeouts as for fsspec (aiohttp sock_connect / sock_read); the total
    # is only a backstop for a body trickling in forever
    return {
        "allow_http": http,
        "connect_timeout": t,
        "read_timeout": t,
        "timeout": timedelta(seconds=max(policy.timeout_s * 20, 600.0)),
    }


def _single_attempt() -> RetryConfig:
    # ctzarr's RetryingStore owns the retry loop (ctzarr.io.retry); obstore tries once
    return {"max_retries": 0, "retry_timeout": timedelta(seconds=1)}


def _profile_in_use(environ: Mapping[str, str]) -> bool:
    """True when botocore would read a profile that obstore cannot (no keys in the environment)."""
    if environ.get("AWS_ACCESS_KEY_ID") and environ.get("AWS_SECRET_ACCESS_KEY"):
        return False
    if environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE"):
        return True
    for var, default in (
        ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        ("AWS_CONFIG_FILE", "~/.aws/config"),
    ):
        path = Path(environ.get(var) or default).expanduser()
        try:
            if path.is_file() and path.stat().st_size > 0:
                return True
        except OSError:
            continue
    return False


_region_cache: dict[tuple[str, str], str | None] = {}


_store_cache: dict[tuple[Any, ...], Any] = {}


_CACHE_SIZE = 64


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 301 names the region itself: it is the answer, not a detour


def _bucket_region(bucket: str, timeout_s: float) -> str | None:
    """The AWS region of a bucket, from the ``x-amz-bucket-region`` header of one anonymous HEAD
    to :data:`AWS_S3_URL` (AWS sends it with 200, 301 and 403 answers alike).

    botocore follows S3's region redirects by itself; object_store does not, so a bucket outside
    the default region needs its region up front. Cached per process; None when it cannot be
    told (the store then stays on fsspec).
    """
    key = (AWS_S3_URL, bucket)
    if key in _region_cache:
        return _region_cache[key]
    request = urllib.request.Request(f"{AWS_S3_URL}/{bucket}", method="HEAD")
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout_s) as response:
            region: str | None = response.headers.get("x-amz-bucket-region")
    except urllib.error.HTTPError as err:
        region = err.headers.get("x-amz-bucket-region") if err.headers else None
    except (OSError, ValueError):
        return None  # unreachable now: not cached, the next open asks again
    _region_cache[key] = region
    return region


def _s3_store(url: str, options: Mapping[str, Any], policy: RetryPolicy) -> Any | None:
    from obstore.store import S3Store  # optional, see available()

    parts = urlsplit(url)
    bucket, prefix = parts.netloc, parts.path
    if not bucket:
        return None
    config: dict[str, Any] = {}
    endpoint: str | None = None
    for name, value in options.items():
        if name in _S3_IGNORED:
            continue
        if name == "anon":
            if value:
                config["skip_signature"] = True
        elif name in ("key", "secret", "token"):
            if value is not None:
                config[
                    {
                        "key": "access_key_id",
                        "secret": "secret_access_key",
                        "token": "session_token",
                    }[name]
                ] = value
        elif name == "endpoint_url":
            endpoint = value
        elif name == "requester_pays":
            if value:
                config["request_payer"] = True
        elif name == "client_kwargs":
            for k, v in dict(value or {}).items():
                if k == "endpoint_url":
                    endpoint = v
                elif k == "region_name":
                    config["region"] = v
                else:
                    return None
        elif name == "config_kwargs":
            if set(dict(value or {})) - _OUR_CONFIG_KWARGS:
                return None
        else:
            return None
    if (
        not config.get("skip_signature")
        and "access_key_id" not in config
        and _profile_in_use(os.environ)
    ):
        return None
    if endpoint is None and any(os.environ.get(v) for v in _ENDPOINT_ENV):
        return None  # botocore's endpoint variables: left to s3fs, which reads them
    if "region" not in config and not (
        os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    ):
        if endpoint is None:
            region = _bucket_region(bucket, min(policy.timeout_s, 10.0))
            if region is None:
                return None
            config["region"] = region
        else:  # a custom endpoint (MinIO, moto, Ceph...): its region is whatever it accepts
            config["region"] = "us-east-1"
    if endpoint is not None:
        config["endpoint"] = endpoint.rstrip("/")
    http = endpoint is not None and endpoint.startswith("http://")
    return S3Store(
        bucket,
        prefix=prefix.strip("/") or None,
        config=cast("S3Config", config),  # built key by key from the fsspec options
        client_options=_client_options(policy, http),
        retry_config=_single_attempt(),
    )


def _http_store(url: str, options: Mapping[str, Any], policy: RetryPolicy) -> Any | None:
    from obstore.store import HTTPStore  # optional, see available()

    parts = urlsplit(url)
    if parts.query or parts.fragment or "?" in url or "#" in url or "@" in parts.netloc:
        return None  # a signed URL, a fragment, or user:password@ (fsspec's auth handles it)
    client = _client_options(policy, parts.scheme.lower() == "http")
    for name, value in options.items():
        if name in _HTTP_IGNORED:
            continue
        if name == "headers":
            client["default_headers"] = dict(value or {})
        elif name == "client_kwargs":
            if set(dict(value or {})) - {"timeout"}:
                return None
        else:
            return None
    return HTTPStore.from_url(
        url.rstrip("/"), client_options=client, retry_config=_single_attempt()
    )


def object_store(
    url: str,
    storage_options: Mapping[str, Any] | None,
    policy: RetryPolicy,
    io: str | None = None,
) -> Store | None:
    """A read-only zarr ``ObjectStore`` for ``url``, or None to use fsspec instead.

    None when obstore is not installed, ``io`` (default: the ``io`` setting, ``CTZARR_IO``,
    else ``auto``) is ``fsspec``, the protocol is not s3/http(s), or an option has no obstore
    equivalent.
    """
    if io is None:
        choice = config.get("io")
    else:
        try:
            choice = config.SETTINGS["io"].parse(io)
        except ValueError as exc:
            raise ValueError(f"io {exc}, got {io!r}") from None
    if choice == "fsspec" or not available():
        return None
    from zarr.storage import ObjectStore  # needs obstore, see available()

    protocol = url_protocol(url)
    if protocol not in ("s3", "s3a", "http", "https"):
        return None
    options = dict(storage_options or {})
    # one client per URL, options and timeouts in a process (fsspec's instance cache does the
    # same for its filesystems): a new obstore client costs 5-15 ms (TLS roots, connection
    # pool), once per process instead of once per open_collection
    # (obstore reads AWS_* variables when a store is made: they are part of the key)
    aws_env = hash(tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    key = (
        os.getpid(),
        url,
        repr(sorted(options.items(), key=lambda kv: kv[0])),
        policy.timeout_s,
        aws_env,
    )
    cached = None if options.get("skip_instance_cache") else _store_cache.get(key)
    if cached is not None:
        return ObjectStore(cached, read_only=True)
    if protocol in ("s3", "s3a"):
        inner = _s3_store(url, options, policy)
    else:
        inner = _http_store(url, options, policy)
    if inner is not None and not options.get("skip_instance_cache"):
        if len(_store_cache) >= _CACHE_SIZE:
            _store_cache.pop(next(iter(_store_cache)))
        _store_cache[key] = inner
    if inner is None:
        logger.debug(
            "%s: read through fsspec (options or protocol not expressible in obstore)",
            protocol or "url",
        )
        return None
    return ObjectStore(inner, read_only=True)
