"""The catalog URL policy (reliability.md 4.4; tests D5 and D7).

A catalog entry may name ``s3://``, ``gs://`` or ``https://`` on a public host. Everything
fsspec could turn into a local read or a request to the local network is refused with a
``CatalogError`` naming the entry, before any store is built: protocol chains (``::``),
``reference://``, ``memory://``, ``file://`` and local paths, loopback, link-local, private and
other non-public hosts, ``..`` and control characters, credentials, and storage options that
chain filesystems. The user opts in to local and private targets with ``allow_local=True``,
``CTZARR_ALLOW_LOCAL=1`` or :func:`ctzarr.catalog.allow_local_targets`; an entry under the
user's own ``$CTZARR_DATA_ROOT`` (the shipped catalog) needs no opt-in.

Host names are judged with an injected resolver, so no test needs network or DNS.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import ctzarr
from ctzarr.catalog import resolve_entry
from ctzarr.errors import CatalogError, ConfigError, CtzarrError
from ctzarr.io.urls import allow_local_targets, parse_catalog_storage_options, parse_catalog_url

ENTRY = "hostile_entry"


def offline(host: str) -> Iterable[str]:
    """DNS as on this machine: no name resolves."""
    raise socket.gaierror(socket.EAI_NONAME, f"{host}: name not known")


def no_dns(host: str) -> Iterable[str]:
    raise AssertionError(f"DNS lookup of {host!r}: literal addresses and opted-in hosts need none")


def dns(table: dict[str, list[str]]) -> Any:
    def resolve(host: str) -> Iterable[str]:
        if host not in table:
            return offline(host)
        return table[host]

    return resolve


def refused(url: str, *, allow_local: bool = False, resolve_host: Any = offline) -> str:
    with pytest.raises(CatalogError) as info:
        parse_catalog_url(url, entry=ENTRY, allow_local=allow_local, resolve_host=resolve_host)
    message = str(info.value)
    assert message.startswith(f"catalog entry {ENTRY!r}:"), message
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------------------------
# URLs: the D7 table
# --------------------------------------------------------------------------------------------

REFUSED = [
    # (id, url, words the message must contain)
    ("simplecache-chain-to-file", "simplecache::file:///etc/passwd", "'::'"),
    ("zip-chain", "zip::s3://bucket/archive.zip", "'::'"),
    ("blockcache-chain-to-https", "blockcache::https://example.org/x.zarr", "'::'"),
    ("reference-protocol", "reference://", "reference://"),
    ("reference-with-path", "reference:///tmp/refs.json", "reference://"),
    ("file-url", "file:///etc/passwd", "file://"),
    ("file-url-with-host", "file://attacker.example/share/x.zarr", "host"),
    ("memory", "memory://dap_atlas.zarr", "memory://"),
    ("unknown-protocol-ftp", "ftp://example.org/x.zarr", "ftp://"),
    ("unknown-protocol-github", "github://org:repo@main/x.zarr", "github://"),
    ("data-url", "data:application/json,{}", "protocol without '//'"),
    ("http-loopback", "http://127.0.0.1/dap.zarr", "loopback"),
    ("https-loopback", "https://127.0.0.1:8443/dap.zarr", "loopback"),
    ("http-cloud-metadata", "http://169.254.169.254/latest/meta-data/", "link-local"),
    ("https-cloud-metadata", "https://169.254.169.254/latest/meta-data/", "link-local"),
    ("http-ipv6-loopback", "http://[::1]/", "'::'"),
    ("https-ipv6-loopback-long-form", "https://[0:0:0:0:0:0:0:1]/x.zarr", "loopback"),
    ("ipv4-mapped-loopback", "https://[0:0:0:0:0:ffff:7f00:1]/x.zarr", "loopback"),
    ("ipv6-link-local", "https://[fe80:0:0:0:0:0:0:1]/x.zarr", "link-local"),
    ("ipv6-unique-local", "https://[fd00:0:0:0:0:0:0:5]/x.zarr", "private"),
    ("http-rfc1918-10", "http://10.0.0.5/x.zarr", "private"),
    ("https-rfc1918-192-168", "https://192.168.1.20/x.zarr", "private"),
    ("https-rfc1918-172-16", "https://172.16.0.1/x.zarr", "private"),
    ("https-carrier-nat", "https://100.64.0.1/x.zarr", "non-public"),
    ("https-unspecified", "https://0.0.0.0/x.zarr", "unspecified"),
    ("https-multicast", "https://224.0.0.1/x.zarr", "multicast"),
    ("loopback-decimal", "https://2130706433/x.zarr", "loopback"),
    ("loopback-short", "https://127.1/x.zarr", "loopback"),
    ("loopback-hex", "https://0x7f.0.0.1/x.zarr", "loopback"),
    ("localhost-name", "https://localhost:8443/x.zarr", "local-network name"),
    ("localhost-subdomain", "https://evil.localhost/x.zarr", "local-network name"),
    (
        "gce-metadata-name",
        "https://metadata.google.internal/computeMetadata/v1/",
        "local-network name",
    ),
    ("single-label-name", "https://intranet/x.zarr", "single-label"),
    ("http-public-host", "http://example.org/x.zarr", "plain http://"),
    ("local-absolute-path", "/data/stores/dap_atlas.zarr", "local path"),
    ("local-relative-path", "stores/dap_atlas.zarr", "local path"),
    ("dotdot-in-s3-key", "s3://bucket/stores/../secret.zarr", "'..'"),
    ("dotdot-in-https-path", "https://example.org/a/../b.zarr", "'..'"),
    ("dotdot-percent-encoded", "https://example.org/a/%2e%2E/b.zarr", "'..'"),
    ("encoded-slash", "https://example.org/a/..%2fb.zarr", "percent-encoded"),
    ("credentials-in-url", "https://user:hunter2@example.org/x.zarr", "credentials"),
    ("nul", "s3://bucket/x\x00.zarr", "NUL"),
    ("newline", "s3://bucket/x\n.zarr", "control character"),
    ("backslash", "s3://bucket/..\\secret.zarr", "backslash"),
    ("intake-template", "{{ CATALOG_DIR }}/x.zarr", "template"),
    ("intake-shell-template", "{{ shell('id') }}", "template"),
    ("query", "https://example.org/x.zarr?token=1", "query"),
    ("bad-bucket", "s3://../x.zarr", "bucket name"),
    ("bad-port", "https://example.org:99999/x.zarr", "port"),
    ("non-ascii-host", "https://exämple.org/x.zarr", "host name"),
    ("ipv6-zone-id", "https://[fe80:0:0:0:0:0:0:1%25eth0]/x.zarr", "zone id"),
    ("empty", "", "empty"),
]


@pytest.mark.parametrize(("url", "words"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_url(url: str, words: str) -> None:
    message = refused(url)
    assert words in message
    assert "hunter2" not in message  # a password in a URL is never repeated


#: refused whatever the user opts in to: these are never a store the user meant
REFUSED_EVEN_WITH_OPT_IN = [
    ("simplecache-chain-to-file", "simplecache::file:///etc/passwd"),
    ("reference-protocol", "reference://"),
    ("memory", "memory://dap_atlas.zarr"),
    ("dotdot-local", "/data/stores/../../etc"),
    ("dotdot-file-url", "file:///data/../etc/x.zarr"),
    ("dotdot-relative", "../outside.zarr"),
    ("nul-local", "/data/x\x00.zarr"),
    ("backslash-local", "..\\windows\\x.zarr"),
    ("control-character", "/data/x\x1b[2J.zarr"),
    ("template", "{{ shell('id') }}/x.zarr"),
    ("credentials-in-url", "http://user:pw@10.0.0.5/x.zarr"),
]


@pytest.mark.parametrize(
    "url", [r[1] for r in REFUSED_EVEN_WITH_OPT_IN], ids=[r[0] for r in REFUSED_EVEN_WITH_OPT_IN]
)
def test_refused_even_with_the_local_opt_in(url: str) -> None:
    refused(url, allow_local=True, resolve_host=no_dns)


ALLOWED = [
    ("s3", "s3://bucket/x.zarr", "s3://bucket/x.zarr"),
    ("s3-bucket-root", "s3://bucket", "s3://bucket"),
    ("gs", "gs://bucket/ctzarr/x.zarr", "gs://bucket/ctzarr/x.zarr"),
    ("https-name", "https://example.org/x.zarr", "https://example.org/x.zarr"),
    ("https-public-ipv4", "https://8.8.8.8/x.zarr", "https://8.8.8.8/x.zarr"),
    (
        "https-public-ipv6",
        "https://[2001:4860:4860:0:0:0:0:8888]/x.zarr",
        "https://[2001:4860:4860:0:0:0:0:8888]/x.zarr",
    ),
    (
        "https-port",
        "https://data.example.org:8443/a/x.zarr",
        "https://data.example.org:8443/a/x.zarr",
    ),
    ("normalised", "HTTPS://Data.Example.ORG/x.zarr/", "https://data.example.org/x.zarr"),
    ("s3-key-with-dots", "s3://my.bucket/v1.2/x..y.zarr", "s3://my.bucket/v1.2/x..y.zarr"),
]


@pytest.mark.parametrize(("url", "expected"), [r[1:] for r in ALLOWED], ids=[r[0] for r in ALLOWED])
def test_allowed_url(url: str, expected: str) -> None:
    assert parse_catalog_url(url, entry=ENTRY, resolve_host=offline) == expected


ALLOWED_WITH_OPT_IN = [
    ("local-absolute", "/data/stores/dap_atlas.zarr/", "/data/stores/dap_atlas.zarr"),
    ("local-relative", "stores/dap_atlas.zarr", "stores/dap_atlas.zarr"),
    ("file-url", "file:///data/stores/dap_atlas.zarr", "/data/stores/dap_atlas.zarr"),
    ("file-url-localhost", "file://localhost/data/x.zarr", "/data/x.zarr"),
    ("http-loopback-server", "http://127.0.0.1:8000/x.zarr", "http://127.0.0.1:8000/x.zarr"),
    ("https-intranet", "https://10.0.0.5/x.zarr", "https://10.0.0.5/x.zarr"),
    (
        "http-ipv6-loopback-long-form",
        "http://[0:0:0:0:0:0:0:1]:8000/x.zarr",
        "http://[0:0:0:0:0:0:0:1]:8000/x.zarr",
    ),
    ("localhost-name", "http://localhost:8000/x.zarr", "http://localhost:8000/x.zarr"),
]


@pytest.mark.parametrize(
    ("url", "expected"),
    [r[1:] for r in ALLOWED_WITH_OPT_IN],
    ids=[r[0] for r in ALLOWED_WITH_OPT_IN],
)
def test_allowed_with_the_local_opt_in(url: str, expected: str) -> None:
    assert parse_catalog_url(url, entry=ENTRY, allow_local=True, resolve_host=no_dns) == expected
    refused(url, resolve_host=offline)  # and refused without it


# --------------------------------------------------------------------------------------------
# Host names: resolved, every address judged; unresolvable names pass (offline use)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("addresses", "words"),
    [
        (["10.0.0.5"], "private"),
        (["93.184.215.14", "127.0.0.1"], "loopback"),  # one bad address is enough
        (["169.254.169.254"], "link-local"),
        (["fd00::5"], "private"),
        (["::ffff:192.168.0.1"], "private"),
        (["not-an-address"], "not an IP address"),
    ],
    ids=[
        "private",
        "one-of-several-loopback",
        "metadata-service",
        "ipv6-ula",
        "ipv4-mapped",
        "garbage",
    ],
)
def test_name_resolving_to_a_non_public_address_is_refused(
    addresses: list[str], words: str
) -> None:
    message = refused(
        "https://data.example.org/x.zarr", resolve_host=dns({"data.example.org": addresses})
    )
    assert "data.example.org" in message
    assert words in message


def test_name_resolving_to_public_addresses_passes() -> None:
    resolve = dns({"data.example.org": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"]})
    url = parse_catalog_url("https://data.example.org/x.zarr", entry=ENTRY, resolve_host=resolve)
    assert url == "https://data.example.org/x.zarr"


def test_unresolvable_name_passes_so_that_offline_use_works() -> None:
    # the client cannot connect to a name that does not resolve either; storage must re-check
    # the address it connects to (DNS may answer differently then)
    assert parse_catalog_url("https://data.example.org/x.zarr", entry=ENTRY, resolve_host=offline)


def test_literal_addresses_and_opted_in_hosts_need_no_dns() -> None:
    refused("https://10.1.2.3/x.zarr", resolve_host=no_dns)
    parse_catalog_url("https://8.8.8.8/x.zarr", entry=ENTRY, resolve_host=no_dns)
    parse_catalog_url(
        "https://intranet.example.org/x.zarr", entry=ENTRY, allow_local=True, resolve_host=no_dns
    )


def test_default_resolver_refuses_what_getaddrinfo_maps_to_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fake_getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        assert host == "rebind.example.org"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert "loopback" in refused("https://rebind.example.org/x.zarr", resolve_host=None)


# --------------------------------------------------------------------------------------------
# storage_options from a catalog entry
# --------------------------------------------------------------------------------------------

REFUSED_OPTIONS = [
    ("target-protocol", "s3://b/x.zarr", {"target_protocol": "file"}, "chains"),
    ("target-options", "s3://b/x.zarr", {"target_options": {"anon": True}}, "chains"),
    ("reference-fo", "s3://b/x.zarr", {"fo": "file:///tmp/refs.json"}, "chains"),
    ("remote-protocol", "s3://b/x.zarr", {"remote_protocol": "file"}, "chains"),
    ("protocol", "s3://b/x.zarr", {"protocol": "file"}, "chains"),
    ("s3-secret", "s3://b/x.zarr", {"key": "AKIA", "secret": "s3cr3t"}, "credentials"),
    (
        "gcs-token-file",
        "gs://b/x.zarr",
        {"token": "/home/me/.config/gcloud/creds.json"},
        "credentials",
    ),
    (
        "headers",
        "https://example.org/x.zarr",
        {"headers": {"Host": "169.254.169.254"}},
        "not an option",
    ),
    (
        "https-client-kwargs",
        "https://example.org/x.zarr",
        {"client_kwargs": {"trust_env": True}},
        "not an option",
    ),
    (
        "config-kwargs-proxy",
        "s3://b/x.zarr",
        {"config_kwargs": {"proxies": {"https": "http://10.0.0.1"}}},
        "not an option",
    ),
    (
        "endpoint-metadata",
        "s3://b/x.zarr",
        {"endpoint_url": "http://169.254.169.254"},
        "link-local",
    ),
    (
        "endpoint-loopback",
        "s3://b/x.zarr",
        {"client_kwargs": {"endpoint_url": "https://127.0.0.1:9000"}},
        "loopback",
    ),
    ("endpoint-file", "s3://b/x.zarr", {"endpoint_url": "file:///etc"}, "file://"),
    ("endpoint-s3", "s3://b/x.zarr", {"endpoint_url": "s3://other"}, "https://"),
    (
        "client-kwargs-secret",
        "s3://b/x.zarr",
        {"client_kwargs": {"aws_secret_access_key": "x"}},
        "credentials",
    ),
    (
        "client-kwargs-unknown",
        "s3://b/x.zarr",
        {"client_kwargs": {"verify": False}},
        "not an option",
    ),
    ("anon-not-bool", "s3://b/x.zarr", {"anon": "yes"}, "true or false"),
    ("concurrency-out-of-range", "s3://b/x.zarr", {"max_concurrency": 10_000}, "1 to 64"),
    ("region-garbage", "s3://b/x.zarr", {"client_kwargs": {"region_name": "x\ny"}}, "region"),
    ("local-store", "/data/x.zarr", {"anon": True}, "remote URLs"),
    ("not-a-mapping", "s3://b/x.zarr", ["anon"], "mapping"),
    ("non-string-key", "s3://b/x.zarr", {1: True}, "not an option"),
]


@pytest.mark.parametrize(
    ("url", "options", "words"),
    [r[1:] for r in REFUSED_OPTIONS],
    ids=[r[0] for r in REFUSED_OPTIONS],
)
def test_refused_storage_options(url: str, options: Any, words: str) -> None:
    with pytest.raises(CatalogError) as info:
        parse_catalog_storage_options(options, entry=ENTRY, url=url, resolve_host=offline)
    message = str(info.value)
    assert message.startswith(f"catalog entry {ENTRY!r}:"), message
    assert words in message, message
    assert "s3cr3t" not in message
    assert "\n" not in message


ALLOWED_OPTIONS = [
    ("s3-anon", "s3://b/x.zarr", {"anon": True}),
    ("s3-requester-pays", "s3://b/x.zarr", {"requester_pays": True, "max_concurrency": 1}),
    (
        "s3-region-and-endpoint",
        "s3://b/x.zarr",
        {"client_kwargs": {"region_name": "eu-west-1", "endpoint_url": "https://s3.example.org"}},
    ),
    ("s3-endpoint", "s3://b/x.zarr", {"endpoint_url": "https://s3.example.org"}),
    ("gs-anon", "gs://b/x.zarr", {"token": "anon", "project": "my-project"}),
]


@pytest.mark.parametrize(
    ("url", "options"), [r[1:] for r in ALLOWED_OPTIONS], ids=[r[0] for r in ALLOWED_OPTIONS]
)
def test_allowed_storage_options(url: str, options: dict[str, Any]) -> None:
    assert (
        parse_catalog_storage_options(options, entry=ENTRY, url=url, resolve_host=offline)
        == options
    )


def test_empty_storage_options_are_none() -> None:
    for options in (None, {}):
        assert parse_catalog_storage_options(options, entry=ENTRY, url="/data/x.zarr") is None


def test_private_endpoint_with_the_local_opt_in() -> None:
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}  # a local MinIO
    got = parse_catalog_storage_options(options, entry=ENTRY, url="s3://b/x.zarr", allow_local=True)
    assert got == options


# --------------------------------------------------------------------------------------------
# resolve_entry: the opt-in, and the user's own $CTZARR_DATA_ROOT
# --------------------------------------------------------------------------------------------


def write_catalog(directory: Path, entries: dict[str, Any]) -> Path:
    sources = {
        name: {"driver": "ctzarr", "args": entry if isinstance(entry, dict) else {"urlpath": entry}}
        for name, entry in entries.items()
    }
    path = directory / "hostile-catalog.yaml"
    path.write_text(yaml.safe_dump({"sources": sources}))
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in ("CTZARR_ALLOW_LOCAL", "CTZARR_DATA_ROOT", "CTZARR_CATALOG"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_entry_under_the_users_data_root_needs_no_opt_in(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("CTZARR_DATA_ROOT", f"{tmp_path}/stores/")
    catalog = write_catalog(tmp_path, {"dap": "{{ env(CTZARR_DATA_ROOT) }}/dap_atlas.zarr"})
    assert resolve_entry("dap", str(catalog)) == (f"{tmp_path}/stores/dap_atlas.zarr", None)


@pytest.mark.parametrize(
    "root", ["s3://my-bucket/ctzarr", "gs://my-bucket", "https://data.example.org/ctzarr"]
)
def test_shipped_catalog_resolves_under_a_remote_data_root(
    root: str, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("CTZARR_DATA_ROOT", root)
    for name in ("dap_atlas", "saros"):
        assert resolve_entry(name, resolve_host=offline) == (f"{root}/{name}.zarr", None)


@pytest.mark.parametrize(
    ("urlpath", "words"),
    [
        ("{{ env(HOME) }}/.ssh/x.zarr", "local path"),  # another variable grants nothing
        ("{{ env(CTZARR_DATA_ROOT) }}x.zarr", "followed by '/'"),  # a sibling of the root
        ("{{ env(CTZARR_DATA_ROOT) }}/../secret.zarr", "'..'"),
        ("{{env(CTZARR_DATA_ROOT)}}/a/../../secret.zarr", "'..'"),
        ("file://{{ env(CTZARR_DATA_ROOT) }}/x.zarr", "file://"),
        ("/etc/{{ env(CTZARR_DATA_ROOT) }}/x.zarr", "local path"),
        ("simplecache::{{ env(CTZARR_DATA_ROOT) }}/x.zarr", "'::'"),
    ],
    ids=[
        "other-variable",
        "sibling",
        "climb",
        "climb-deeper",
        "file-prefix",
        "root-not-first",
        "chained",
    ],
)
def test_data_root_grants_only_paths_below_it(
    urlpath: str, words: str, tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("CTZARR_DATA_ROOT", str(tmp_path / "stores"))
    clean_env.setenv("HOME", str(tmp_path))
    catalog = write_catalog(tmp_path, {ENTRY: urlpath})
    with pytest.raises(CatalogError, match=ENTRY) as info:
        resolve_entry(ENTRY, str(catalog))
    assert words in str(info.value)


def test_data_root_is_still_checked(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    catalog = write_catalog(tmp_path, {ENTRY: "{{ env(CTZARR_DATA_ROOT) }}/x.zarr"})
    for root in ("simplecache::file:///etc", "memory://scratch", "reference://"):
        clean_env.setenv("CTZARR_DATA_ROOT", root)
        with pytest.raises(CatalogError, match=ENTRY):
            resolve_entry(ENTRY, str(catalog))
    clean_env.setenv("CTZARR_DATA_ROOT", "")
    with pytest.raises(CatalogError, match="CTZARR_DATA_ROOT"):
        resolve_entry(ENTRY, str(catalog))


def test_storage_options_under_the_data_root_are_still_the_catalogs(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("CTZARR_DATA_ROOT", "s3://my-bucket")
    options = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}
    catalog = write_catalog(
        tmp_path,
        {ENTRY: {"urlpath": "{{ env(CTZARR_DATA_ROOT) }}/x.zarr", "storage_options": options}},
    )
    with pytest.raises(CatalogError, match="endpoint_url"):
        resolve_entry(ENTRY, str(catalog))
    assert resolve_entry(ENTRY, str(catalog), allow_local=True) == (
        "s3://my-bucket/x.zarr",
        options,
    )


def test_opt_in_by_keyword_environment_and_context(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    local = str(tmp_path / "dap.zarr")
    catalog = str(write_catalog(tmp_path, {ENTRY: local}))
    with pytest.raises(CatalogError, match="opt-in"):
        resolve_entry(ENTRY, catalog)
    assert resolve_entry(ENTRY, catalog, allow_local=True) == (local, None)

    clean_env.setenv("CTZARR_ALLOW_LOCAL", "1")
    assert resolve_entry(ENTRY, catalog) == (local, None)
    with pytest.raises(CatalogError):  # an explicit False beats the environment
        resolve_entry(ENTRY, catalog, allow_local=False)
    clean_env.setenv("CTZARR_ALLOW_LOCAL", "0")
    with pytest.raises(CatalogError):
        resolve_entry(ENTRY, catalog)
    clean_env.setenv("CTZARR_ALLOW_LOCAL", "perhaps")
    with pytest.raises(ConfigError, match="CTZARR_ALLOW_LOCAL"):  # a malformed setting
        resolve_entry(ENTRY, catalog)

    clean_env.delenv("CTZARR_ALLOW_LOCAL")
    with allow_local_targets():
        assert resolve_entry(ENTRY, catalog) == (local, None)
    with pytest.raises(CatalogError):  # the block is over
        resolve_entry(ENTRY, catalog)


@pytest.mark.parametrize(
    "entry",
    [
        "just a string",
        {"args": "not a mapping"},
        {"args": {"urlpath": 42}},
        {"args": {}},
        {"args": {"urlpath": "s3://b/x.zarr", "storage_options": ["anon"]}},
        None,
    ],
    ids=["entry-string", "args-string", "urlpath-int", "no-urlpath", "options-list", "entry-null"],
)
def test_malformed_entry_is_a_catalog_error(entry: Any, tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"sources": {ENTRY: entry}}))
    with pytest.raises(CatalogError, match=ENTRY):
        resolve_entry(ENTRY, str(path))


def test_unreadable_catalog_is_a_catalog_error(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_bytes(b"\xff\xfe sources: {}")
    with pytest.raises(CatalogError, match="cannot read"):
        resolve_entry(ENTRY, str(path))


# --------------------------------------------------------------------------------------------
# End to end: refused through the public API and the command line, before any I/O
# --------------------------------------------------------------------------------------------

SECRET = b"TOPSECRET-5f1c2a"


@pytest.fixture
def hostile_catalog(
    tmp_path: Path, dap_store: Path, clean_env: pytest.MonkeyPatch
) -> dict[str, Any]:
    """A catalog whose entries point at a secret directory and at a real, valid store."""
    secret = tmp_path / "secret"
    (secret / "store.zarr").mkdir(parents=True)
    (secret / "store.zarr" / "zarr.json").write_bytes(
        b'{"zarr_format": 3, "node_type": "group", "attributes": {"x": "' + SECRET + b'"}}'
    )
    refs = secret / "refs.json"
    refs.write_text(
        json.dumps({"version": 1, "refs": {"zarr.json": [f"file://{secret}/store.zarr/zarr.json"]}})
    )
    entries = {
        "chained": f"simplecache::file://{secret}/store.zarr",
        "file_url": f"file://{secret}/store.zarr",
        "valid_store_by_file_url": f"file://{dap_store}",
        "reference": {
            "urlpath": "reference://",
            "storage_options": {"fo": str(refs), "remote_protocol": "file"},
        },
        "metadata_service": "http://169.254.169.254/latest/meta-data/",
        "loopback": "https://127.0.0.1:8443/x.zarr",
        "local_path": str(secret / "store.zarr"),
        "climb": "s3://bucket/../../x.zarr",
        "memory": "memory://store.zarr",
        "zip": f"zip::file://{secret}/x.zip",
    }
    catalog = write_catalog(tmp_path, entries)
    clean_env.setenv("CTZARR_CATALOG", str(catalog))
    return {
        "catalog": catalog,
        "secret": secret,
        "entries": sorted(entries),
        "dap_store": dap_store,
    }


HOSTILE_ENTRIES = [
    "chained",
    "file_url",
    "valid_store_by_file_url",
    "reference",
    "metadata_service",
    "loopback",
    "local_path",
    "climb",
    "memory",
    "zip",
]


@pytest.mark.parametrize("name", HOSTILE_ENTRIES)
def test_open_collection_refuses_before_any_io(
    name: str, hostile_catalog: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_store(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a store was built for a refused catalog entry")

    def no_dns_lookup(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("DNS lookup for a refused catalog entry")

    monkeypatch.setattr("ctzarr.read.collection.make_store", no_store)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns_lookup)
    with pytest.raises(CatalogError) as info:
        ctzarr.open_collection(name)
    assert str(info.value).startswith(f"catalog entry {name!r}:")
    assert isinstance(info.value, CtzarrError)
    assert isinstance(info.value, KeyError)  # CatalogError's builtin


def test_the_valid_store_opens_once_the_user_opts_in(
    hostile_catalog: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refusal above is the policy, not a missing store: opted in, the same entry opens."""
    monkeypatch.setenv("CTZARR_ALLOW_LOCAL", "1")
    col = ctzarr.open_collection("valid_store_by_file_url")
    assert col.case_ids == ctzarr.open_collection(hostile_catalog["dap_store"]).case_ids


def test_cli_opt_in_flag_opens_the_same_entry(
    hostile_catalog: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    from ctzarr.cli.main import main

    assert main(["info", "valid_store_by_file_url"]) == 1
    assert "refused" in capsys.readouterr().err
    assert main(["--allow-local", "info", "valid_store_by_file_url"]) == 0
    out = capsys.readouterr().out
    assert all(cid in out for cid in ctzarr.open_collection(hostile_catalog["dap_store"]).case_ids)


#: runs the CLI with an audit hook that kills the process the moment anything under the secret
#: directory is opened or listed (exit 99): proof that refusal comes before any I/O
_AUDITED_CLI = """
import os, sys
secret = sys.argv[1]
def hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        if secret in os.fsdecode(args[0]):
            os._exit(99)
sys.addaudithook(hook)
from ctzarr.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def _cli_env(catalog: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CTZARR_ALLOW_LOCAL", "CTZARR_DEBUG", "CTZARR_DATA_ROOT")
    }
    env["CTZARR_CATALOG"] = str(catalog)
    return env


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "chained"],
        ["stats", "reference", "--structure", "liver"],
        ["verify", "file_url"],
        ["export", "zip", "case", "out"],
    ],
    ids=["info-chained", "stats-reference", "verify-file-url", "export-zip"],
)
def test_cli_refuses_in_one_line_before_any_io(
    argv: list[str], hostile_catalog: dict[str, Any], tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _AUDITED_CLI, str(hostile_catalog["secret"]), *argv],
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
        env=_cli_env(hostile_catalog["catalog"]),
    )
    assert proc.returncode == 1, (proc.returncode, proc.stderr)  # 99: the secret was touched
    err = proc.stderr.decode().strip()
    assert err.startswith(f"ctzarr: error: catalog entry {argv[1]!r}:"), err
    assert "\n" not in err
    assert SECRET not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_the_audit_hook_does_see_an_opted_in_open(
    hostile_catalog: dict[str, Any], tmp_path: Path
) -> None:
    """Control for the test above: once the user opts in, the secret store is opened (exit 99)."""
    env = _cli_env(hostile_catalog["catalog"]) | {"CTZARR_ALLOW_LOCAL": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _AUDITED_CLI, str(hostile_catalog["secret"]), "info", "file_url"],
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 99, proc.stderr


def test_cli_entry_point_refuses_a_metadata_service_entry(hostile_catalog: dict[str, Any]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ctzarr.cli", "info", "metadata_service"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_cli_env(hostile_catalog["catalog"]),
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("ctzarr: error: catalog entry 'metadata_service':")
    assert "link-local" in proc.stderr


def test_cli_catalog_listing_still_shows_hostile_entries_without_opening_them(
    hostile_catalog: dict[str, Any], tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _AUDITED_CLI, str(hostile_catalog["secret"]), "catalog"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_cli_env(hostile_catalog["catalog"]),
    )
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in hostile_catalog["entries"])


# --------------------------------------------------------------------------------------------
# Properties: whatever the text, a normalised allowed URL or a CatalogError
# --------------------------------------------------------------------------------------------


def outcome(function: Any, *args: Any, **kwargs: Any) -> Any:
    """The function's result, or the CatalogError it raised (any other exception propagates)."""
    try:
        return function(*args, **kwargs)
    except CatalogError as exc:
        return exc


_PREFIXES = st.sampled_from(
    [
        "",
        "s3://",
        "gs://",
        "https://",
        "http://",
        "file://",
        "memory://",
        "reference://",
        "simplecache::",
        "https://[",
        "https://127.0.0.1",
        "s3://bucket/",
        "/",
        "../",
        "%2e%2e/",
    ]
)
_ALPHABET = st.characters(codec="utf-8") | st.sampled_from(list("/.:[]@%?#\\{}0123456789abcdefx"))


@settings(max_examples=400, deadline=None)
@given(prefix=_PREFIXES, tail=st.text(_ALPHABET, max_size=40), allow_local=st.booleans())
def test_any_text_gives_an_allowed_url_or_a_catalog_error(
    prefix: str, tail: str, allow_local: bool
) -> None:
    got = outcome(
        parse_catalog_url, prefix + tail, entry=ENTRY, allow_local=allow_local, resolve_host=offline
    )
    if isinstance(got, CatalogError):
        assert str(got).startswith(f"catalog entry {ENTRY!r}:")
        assert "\n" not in str(got)
        return
    assert "::" not in got
    assert ".." not in got.split("/")
    scheme = got.partition("://")[0] if "://" in got else None
    if allow_local:
        assert scheme in (None, "s3", "gs", "https", "http")
    else:
        assert scheme in ("s3", "gs", "https")


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    options=st.dictionaries(
        st.sampled_from(
            ["anon", "client_kwargs", "endpoint_url", "token", "fo", "max_concurrency", "x"]
        ),
        _JSON | st.fixed_dictionaries({"endpoint_url": st.text(max_size=30)}),
        max_size=3,
    ),
    url=st.sampled_from(
        ["s3://b/x.zarr", "gs://b/x.zarr", "https://example.org/x.zarr", "/d/x.zarr"]
    ),
)
def test_any_storage_options_give_a_mapping_or_a_catalog_error(
    options: dict[str, Any], url: str
) -> None:
    got = outcome(
        parse_catalog_storage_options, options, entry=ENTRY, url=url, resolve_host=offline
    )
    if isinstance(got, CatalogError):
        assert "\n" not in str(got)
        return
    assert got is None or set(got) <= {
        "anon",
        "client_kwargs",
        "endpoint_url",
        "token",
        "max_concurrency",
    }
