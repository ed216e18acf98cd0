"""Which library a store reads through (ctzarr.io.obstore): obstore for read-only s3/http(s)
stores whose options it can express, fsspec otherwise; and what an obstore-backed store pickles.

The read behaviour itself (values, request budget, faults and retries) is tested for both
libraries in test_remote.py and test_remote_faults.py.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zarr

from ctzarr.io.obstore import object_store
from ctzarr.io.retry import RetryPolicy
from ctzarr.io.stores import make_store

from .servers import Reply, fault_server, unused_port

pytest.importorskip("obstore")

SECRET = "CTZARR-OBSTORE-FAKE-SECRET-77"
KEY_ID = "ctzarr-obstore-fake-key"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Credentials in the environment, no profile files, a region set, no CTZARR_IO."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "CTZARR_IO",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))


def library(store: Any) -> str:
    return type(getattr(store, "_store", store)).__name__


ENDPOINT = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}


@pytest.mark.parametrize(
    ("url", "options"),
    [
        ("s3://bucket/dap.zarr", ENDPOINT),
        ("s3://bucket/dap.zarr", {"anon": True, **ENDPOINT}),
        ("s3://bucket/dap.zarr", {"key": "k", "secret": "s", "endpoint_url": "http://127.0.0.1:9"}),
        ("s3://bucket/dap.zarr", {"skip_instance_cache": True, "max_concurrency": 1, **ENDPOINT}),
        (
            "s3://bucket",
            {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}},
        ),
        ("https://data.example.org/dap.zarr", None),
        ("http://127.0.0.1:9/dap.zarr", {"headers": {"X-Token": "t"}}),
    ],
)
def test_read_only_remote_stores_read_through_obstore(
    aws_env: None, url: str, options: dict[str, Any] | None
) -> None:
    assert library(make_store(url, storage_options=options, read_only=True)) == "ObjectStore"
    # writable stores (conversion) and an explicit choice stay on fsspec
    assert library(make_store(url, storage_options=options)) == "FsspecStore"
    assert (
        library(make_store(url, storage_options=options, read_only=True, io="fsspec"))
        == "FsspecStore"
    )


@pytest.mark.parametrize(
    ("url", "options"),
    [
        (
            "s3://bucket/dap.zarr",
            {"profile": "lab", **ENDPOINT},
        ),  # botocore profiles: not in obstore
        (
            "s3://bucket/dap.zarr",
            {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "verify": False}},
        ),
        (
            "s3://bucket/dap.zarr",
            {"config_kwargs": {"s3": {"addressing_style": "virtual"}}, **ENDPOINT},
        ),
        ("s3://bucket/dap.zarr", {"unknown_option": 1, **ENDPOINT}),
        ("https://data.example.org/dap.zarr", {"client_kwargs": {"auth": "basic"}}),
        ("https://reader:pw@data.example.org/dap.zarr", None),
        ("https://data.example.org/dap.zarr?sig=abc", None),
        ("memory://x/dap.zarr", None),
        ("gs://bucket/dap.zarr", {"token": "anon"}),  # gcsfs (obstore's GCS store is not wired up)
    ],
)
def test_options_obstore_cannot_express_stay_on_fsspec(
    aws_env: None, url: str, options: dict[str, Any] | None
) -> None:
    assert library(make_store(url, storage_options=options, read_only=True)) == "FsspecStore"


def test_a_profile_without_environment_keys_stays_on_fsspec(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert (
        library(make_store("s3://b/x.zarr", storage_options=ENDPOINT, read_only=True))
        == "ObjectStore"
    )
    monkeypatch.setenv("AWS_PROFILE", "lab")
    assert (
        library(make_store("s3://b/x.zarr", storage_options=ENDPOINT, read_only=True))
        == "FsspecStore"
    )
    monkeypatch.delenv("AWS_PROFILE")
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = a\naws_secret_access_key = b\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    assert (
        library(make_store("s3://b/x.zarr", storage_options=ENDPOINT, read_only=True))
        == "FsspecStore"
    )
    # an endpoint from botocore's environment variables, not the options: left to s3fs
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    assert library(make_store("s3://b/x.zarr", read_only=True)) == "FsspecStore"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    # anonymous access needs no credentials at all: obstore again
    anon = {"anon": True, **ENDPOINT}
    assert (
        library(make_store("s3://b/x.zarr", storage_options=anon, read_only=True)) == "ObjectStore"
    )


def test_ctzarr_io_environment_variable(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CTZARR_IO", "fsspec")
    assert (
        library(make_store("s3://b/x.zarr", storage_options=ENDPOINT, read_only=True))
        == "FsspecStore"
    )
    # the keyword beats the environment
    assert (
        library(make_store("s3://b/x.zarr", storage_options=ENDPOINT, read_only=True, io="obstore"))
        == "ObjectStore"
    )
    monkeypatch.setenv("CTZARR_IO", "obstore")
    assert (
        library(make_store("s3://b/x.zarr", storage_options=ENDPOINT, read_only=True))
        == "ObjectStore"
    )
    monkeypatch.setenv("CTZARR_IO", "boto")
    with pytest.raises(ValueError, match="CTZARR_IO must be"):
        make_store("s3://b/x.zarr", storage_options=ENDPOINT, read_only=True)
    with pytest.raises(ValueError, match="io must be"):
        make_store("s3://b/x.zarr", storage_options=ENDPOINT, read_only=True, io="boto")


def test_clients_are_shared_within_a_process(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = RetryPolicy()
    a = object_store("s3://b/x.zarr", ENDPOINT, policy)
    b = object_store("s3://b/x.zarr", ENDPOINT, policy)
    assert a is not None
    assert b is not None
    assert a.store is b.store
    assert (
        object_store("s3://b/x.zarr", {"skip_instance_cache": True, **ENDPOINT}, policy).store
        is not a.store
    )
    assert object_store("s3://b/y.zarr", ENDPOINT, policy).store is not a.store
    assert object_store("s3://b/x.zarr", ENDPOINT, policy.replace(timeout_s=5)).store is not a.store
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "rotated")  # new credentials: a new client
    assert object_store("s3://b/x.zarr", ENDPOINT, policy).store is not a.store


@pytest.fixture
def site(tmp_path: Any) -> Iterator[Any]:
    arr = zarr.create_array(
        tmp_path / "bucket" / "x.zarr", shape=(8, 8), chunks=(4, 4), dtype="int16"
    )
    arr[:] = np.arange(64, dtype=np.int16).reshape(8, 8)
    with fault_server(tmp_path) as server:
        yield server


def test_pickled_store_carries_no_environment_secret_and_reads(aws_env: None, site: Any) -> None:
    so = {"client_kwargs": {"endpoint_url": site.base}}
    store = make_store("s3://bucket/x.zarr", storage_options=so, read_only=True)
    assert library(store) == "ObjectStore"
    blob = pickle.dumps(store)
    assert SECRET.encode() not in blob
    assert KEY_ID.encode() not in blob
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(
        zarr.open_array(clone, mode="r", zarr_format=3)[:],
        np.arange(64, dtype=np.int16).reshape(8, 8),
    )
    assert site.requests("/bucket/x.zarr/zarr.json")  # read by the clone, credentials resolved anew
    for text in (repr(store), str(store)):
        assert SECRET not in text
        assert KEY_ID not in text
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET


def test_bucket_region_is_asked_once_when_nothing_gives_it(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No region in the options or the environment and no custom endpoint: one anonymous HEAD
    (here to a local stand-in for s3.amazonaws.com) reads ``x-amz-bucket-region``."""
    from ctzarr.io import obstore as obstore_io

    for name in ("AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(obstore_io, "_region_cache", {})
    with fault_server() as aws:
        monkeypatch.setattr(obstore_io, "AWS_S3_URL", aws.base)
        aws.plan("/bkt-eu", [], then=Reply(301, b"", (("x-amz-bucket-region", "eu-central-1"),)))
        aws.plan("/bkt-us", [], then=Reply(200, b"", (("x-amz-bucket-region", "us-west-2"),)))
        aws.plan("/bkt-gone", [], then=404)
        for bucket, region in (("bkt-eu", "eu-central-1"), ("bkt-us", "us-west-2")):
            for _ in range(2):
                store = make_store(
                    f"s3://{bucket}/x.zarr",
                    storage_options={"skip_instance_cache": True},
                    read_only=True,
                )
                assert library(store) == "ObjectStore"
                assert store._store.store.config["region"] == region
            assert [(m, p) for m, p, *_ in aws.requests(f"/{bucket}")] == [
                ("HEAD", f"/{bucket}")
            ]  # once
        # a bucket whose region cannot be told stays on s3fs (which follows region redirects)
        assert library(make_store("s3://bkt-gone/x.zarr", read_only=True)) == "FsspecStore"
    # nobody answering: s3fs too, and the next open asks again
    monkeypatch.setattr(obstore_io, "AWS_S3_URL", f"http://127.0.0.1:{unused_port()}")
    assert library(make_store("s3://bkt-new/x.zarr", read_only=True)) == "FsspecStore"
    assert all(bucket != "bkt-new" for _, bucket in obstore_io._region_cache)
