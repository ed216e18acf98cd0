"""URLs and storage options: parsing, redaction of secrets, and the policy for catalog targets.

- :func:`url_protocol`, :func:`is_remote`, :func:`local_path`: what a path or fsspec URL names,
  parsed one way (fsspec's ``split_protocol``) everywhere above the sources layer;
- :func:`redact_url` hides user info and query strings (tokens) in any text shown to a user;
- :data:`SECRET_OPTION_NAMES` and :func:`check_no_secrets`: storage options that carry
  credentials, refused where they would travel inside a task graph;
- :func:`parse_catalog_url` and :func:`parse_catalog_storage_options`: a catalog is a file that
  someone else may have written, and fsspec opens whatever a URL names, so a catalog entry may
  only name public s3/gs/https stores (or, with the local opt-in, paths under the user's data
  root); options are checked against an allowlist per protocol.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import logging
import os
import re
import socket
from collections.abc import (
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any
from urllib.parse import unquote

from fsspec.core import split_protocol

from ctzarr import config
from ctzarr.errors import CatalogError, CtzarrError

_USERINFO = re.compile(r"(\b[a-zA-Z][\w+.-]*://)[^/@\s'\"]*@")


_QUERY = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s?'\"]*)\?[^\s'\"]*")


logger = logging.getLogger(__name__)


def url_protocol(url: str) -> str:
    """The protocol of a URL in lower case (``s3``, ``https``, ``file``, ``simplecache::s3`` for
    a chain); "" for a plain local path."""
    protocol, _ = split_protocol(url)
    return (protocol or "").lower()


def is_remote(url: str) -> bool:
    """True for fsspec URLs other than plain local files (``file://``) and paths."""
    return url_protocol(url) not in ("", "file", "local")


def local_path(url: str) -> str:
    """The path of a local path or ``file://`` URL."""
    return split_protocol(url)[1] if url_protocol(url) in ("file", "local") else url


def redact_url(text: str) -> str:
    """Drop user info (``user:pass@``) and query strings (signed URLs) from URLs in text."""
    return _QUERY.sub(r"\1?...", _USERINFO.sub(r"\1", text))


#: storage option names that carry credentials (s3fs, gcsfs, adlfs, fsspec http auth): refused
#: in task graphs (:func:`check_no_secrets`) and in catalogs (:func:`parse_catalog_storage_options`)
SECRET_OPTION_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "username",
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


#: the explicit opt-in for local paths, file://, http:// and private hosts in catalog entries
#: (setting ``allow_local``)
ALLOW_LOCAL_ENV = config.env_name("allow_local")


#: where the user keeps converted stores; an entry under it is the user's own choice (see
#: ``under_user_root``; setting ``data_root``)
DATA_ROOT_ENV = config.env_name("data_root")


#: protocols a catalog entry may name without any opt-in
REMOTE_PROTOCOLS = ("s3", "gs", "https")


#: intake's template syntax for environment variables, the only template ctzarr expands
_ENV = re.compile(r"\{\{\s*env\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*\}\}")


_USER_ROOT = re.compile(r"\{\{\s*env\(\s*" + DATA_ROOT_ENV + r"\s*\)\s*\}\}")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


_SCHEME = re.compile(r"[a-z][a-z0-9+.-]+")


#: ``data:...``, ``zip:x`` ...: fsspec reads some of these as protocols even without ``//``
_SCHEME_LIKE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")


_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,221}")


_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}")


_PORT = re.compile(r"[0-9]{1,5}")


_MAX_URL_CHARS = 4096


#: why a protocol is refused, where a reason says more than "not allowed"
_REFUSED_PROTOCOLS = {
    "reference": "reference:// maps keys to arbitrary URLs, file:// included",
    "memory": "memory:// is this process's scratch space, not a dataset",
}


#: host names that never reach the internet, whatever DNS says: RFC 6761 localhost, mDNS,
#: home networks and cloud-internal names (metadata.google.internal)
_LOCAL_NAME_SUFFIXES = (".localhost", ".local", ".internal", ".home.arpa", ".lan")


_LOCAL_OPT_IN = f"allowed only with the local opt-in (allow_local=True or {ALLOW_LOCAL_ENV}=1)"


_allow_local_context: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "ctzarr_allow_local", default=None
)


ResolveHost = Callable[[str], Iterable[str]]


@contextlib.contextmanager
def allow_local_targets(allowed: bool | None = True) -> Iterator[None]:
    """Opt in (or out) of local and private-network catalog targets inside this block.

    For callers that cannot pass ``allow_local`` down to :func:`resolve_entry` (the command
    line's ``--allow-local``). ``None`` leaves the decision to ``$CTZARR_ALLOW_LOCAL``.
    """
    token = _allow_local_context.set(allowed)
    try:
        yield
    finally:
        _allow_local_context.reset(token)


def parse_catalog_url(
    url: object,
    *,
    entry: str,
    allow_local: bool = False,
    resolve_host: ResolveHost | None = None,
    field: str = "urlpath",
) -> str:
    """Check where a catalog entry points; return the normalised URL or raise.

    Parameters
    ----------
    url : str
        The expanded ``urlpath`` of the entry.
    entry : str
        Entry name, for the message.
    allow_local : bool
        The user's opt-in for local paths, ``file://``, ``http://`` and non-public hosts.
    resolve_host : callable, optional
        Host name to IP address strings; default ``socket.getaddrinfo``.
    field : str
        What is checked, for the message.

    Returns
    -------
    str
        ``s3://bucket/key``, ``gs://bucket/key``, ``https://host[:port]/path`` with the
        protocol and host lower-cased and no trailing slash; a plain path for local stores
        (``file://`` removed).

    Raises
    ------
    CatalogError
        Naming the entry and the reason; never another exception.
    """
    if not isinstance(url, str):
        raise CatalogError(
            f"catalog entry {entry!r}: {field} must be a string, not {type(url).__name__}"
        )
    shown = _shown(url)

    def refuse(reason: str) -> CatalogError:
        return CatalogError(f"catalog entry {entry!r}: {field} {shown} refused: {reason}")

    if not url.strip():
        raise refuse("empty")
    if len(url) > _MAX_URL_CHARS:
        raise refuse(f"longer than {_MAX_URL_CHARS} characters")
    if _CONTROL.search(url) or "\\" in url:
        raise refuse("NUL, control character or backslash")
    if "{{" in url or "}}" in url or "{%" in url:
        raise refuse("a template other than {{ env(NAME) }} (ctzarr expands nothing else)")
    # fsspec splits on '::' before anything else (it reads http://[::1]/ as the chain
    # 'http://[' + '1]/'), so no form of '::' can be opened safely
    if "::" in url:
        raise refuse(
            "'::' chains fsspec protocols (simplecache::file://..., zip::...); write IPv6 hosts without '::'"
        )
    if "?" in url or "#" in url:
        raise refuse("query or fragment ('?', '#') in a store URL")
    scheme, sep, rest = url.partition("://")
    if not sep:
        if _SCHEME_LIKE.match(url):
            raise refuse("looks like a protocol without '//' (fsspec may read it as one)")
        return _local_path(url, allow_local, refuse)
    scheme = scheme.lower()
    if not _SCHEME.fullmatch(scheme):
        raise refuse(f"malformed protocol {scheme!r}")
    if scheme == "file":
        authority, _, path = rest.partition("/")
        if authority not in ("", "localhost"):
            raise refuse("file:// with a host name")
        return _local_path("/" + path, allow_local, refuse, what="file://")
    if scheme in ("s3", "gs"):
        bucket, _, key = rest.partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise refuse(f"{bucket!r} is not a bucket name")
        _check_segments(key, refuse)
        return f"{scheme}://{bucket}/{key}".rstrip("/")
    if scheme in ("https", "http"):
        authority, _, path = rest.partition("/")
        host, port = _split_authority(authority, refuse)
        _check_segments(path, refuse)
        if not allow_local:
            reason = _non_public_host(host, resolve_host)
            if reason:
                raise refuse(
                    f"{reason}; private, loopback and link-local hosts are {_LOCAL_OPT_IN}"
                )
            # plain http lets anyone on the path swap the store (and its redirects) for another
            if scheme == "http":
                raise refuse(f"plain http:// (use https://); http:// is {_LOCAL_OPT_IN}")
        netloc = (f"[{host}]" if ":" in host else host.lower()) + (f":{port}" if port else "")
        return f"{scheme}://{netloc}/{path}".rstrip("/")
    why = _REFUSED_PROTOCOLS.get(scheme, f"protocol {scheme}:// is not allowed in a catalog")
    allowed = ", ".join(f"{p}://" for p in REMOTE_PROTOCOLS)
    raise refuse(
        f"{why} (allowed: {allowed}; http://, file:// and local paths with the local opt-in)"
    )


def parse_catalog_storage_options(
    options: object,
    *,
    entry: str,
    url: str,
    allow_local: bool = False,
    resolve_host: ResolveHost | None = None,
) -> dict[str, Any] | None:
    """Check the storage options of a catalog entry against a per-protocol allowlist.

    Only options that choose *how* to reach the store the URL names, never *what* is reached
    or *who* asks: no protocol chaining (``target_protocol``, ``fo``, ``remote_protocol``,
    ``protocol``), no credentials (``key``, ``secret``, a token file), no headers, proxies or
    client configuration. An ``endpoint_url`` passes the same check as an ``https://`` URL.

    Parameters
    ----------
    options : dict or None
        ``args.storage_options`` of the entry.
    entry : str
        Entry name, for the message.
    url : str
        The entry's URL as returned by :func:`parse_catalog_url` (decides the protocol).
    allow_local : bool
        The user's opt-in (lets ``endpoint_url`` name a private host or use ``http://``).
    resolve_host : callable, optional
        Host name to IP address strings; default ``socket.getaddrinfo``.

    Returns
    -------
    dict or None
        The options (``None`` when empty).

    Raises
    ------
    CatalogError
        Naming the entry, the option and the reason; never another exception.
    """
    if options is None:
        return None
    if not isinstance(options, dict):
        raise CatalogError(
            f"catalog entry {entry!r}: storage_options must be a mapping, not {type(options).__name__}"
        )
    if not options:
        return None
    protocol = url_protocol(url) or "local"
    spec = _OPTION_SPECS.get(protocol, {})
    ctx = _OptionContext(entry, protocol, allow_local, resolve_host)
    return _check_options(options, spec, "storage_options", ctx)


def _printable(text: str) -> str:
    """Text for a one-line message: control characters escaped, at most 200 characters."""
    text = _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)
    return text if len(text) <= 200 else text[:200] + "..."


def _shown(value: str) -> str:
    """The value as it may appear in a message: one line, short, no user:password@."""
    shown = redact_url(value)
    if len(shown) > 200:
        shown = shown[:200] + "..."
    return repr(shown)


def local_opt_in(explicit: bool | None) -> bool:
    """The user's decision: argument, else allow_local_targets block, else $CTZARR_ALLOW_LOCAL."""
    if explicit is not None:
        return bool(explicit)
    context = _allow_local_context.get()
    if context is not None:
        return context
    return bool(config.get("allow_local"))


def under_user_root(raw: str, name: str) -> bool:
    """True when the entry's URL is ``{{ env(CTZARR_DATA_ROOT) }}/relative/path``.

    Why this needs no further opt-in: the documented flow (README "Catalog", the shipped
    catalog) is ``CTZARR_DATA_ROOT=/data/stores``, and setting a variable named after ctzarr
    is the user saying where their stores live. Only that variable counts: a catalog could
    name any other one (``{{ env(HOME) }}/.ssh``), so other variables grant nothing. The
    entry must continue with '/' (``{{ env(CTZARR_DATA_ROOT) }}x`` names a sibling of the
    root) and cannot climb out of it ('..' is refused everywhere).
    """
    match = _USER_ROOT.match(raw)
    if match is None:
        return False
    suffix = raw[match.end() :]
    if suffix and not suffix.startswith("/"):
        raise CatalogError(
            f"catalog entry {name!r}: urlpath {_shown(raw)} refused: "
            f"{{{{ env({DATA_ROOT_ENV}) }}}} must be followed by '/' (else it names a sibling of your data root)"
        )
    return True


def expand_env(value: str, name: str) -> str:
    def sub(m: re.Match[str]) -> str:
        var = m.group(1)
        # the data root is a setting (ctzarr.config.set(data_root=...) counts too)
        value = config.get("data_root") if var == DATA_ROOT_ENV else os.environ.get(var)
        if not value:
            raise CatalogError(
                f"catalog entry {name!r} needs the environment variable {var} (where its store lives)"
            )
        return str(value).rstrip("/")

    return _ENV.sub(sub, value)


def _check_segments(path: str, refuse: Callable[[str], CatalogError]) -> None:
    """No '.' or '..' segment, even percent-encoded (HTTP clients decode and normalise them)."""
    for segment in path.split("/"):
        decoded = unquote(segment)
        if segment in (".", "..") or decoded in (".", ".."):
            raise refuse("'.' or '..' path segment")
        if decoded != segment and ("/" in decoded or "\\" in decoded or _CONTROL.search(decoded)):
            raise refuse("percent-encoded '/', backslash or control character")


def _local_path(
    path: str, allow_local: bool, refuse: Callable[[str], CatalogError], what: str = "local path"
) -> str:
    if not allow_local:
        raise refuse(f"a {what} in a catalog is {_LOCAL_OPT_IN}, or under ${DATA_ROOT_ENV}")
    _check_segments(path, refuse)
    return path.rstrip("/") or "/"


def _split_authority(authority: str, refuse: Callable[[str], CatalogError]) -> tuple[str, str]:
    """(host, port) of ``host[:port]`` or ``[v6]:port``; no user:password@."""
    if "@" in authority:
        raise refuse("user:password@ in a URL (credentials do not belong in a catalog)")
    if authority.startswith("["):
        end = authority.find("]")
        host, after = authority[1:end], authority[end + 1 :]
        if end < 0 or (after and not after.startswith(":")):
            raise refuse("malformed IPv6 host")
        if "%" in host:
            raise refuse("IPv6 zone id in a URL")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise refuse(f"{host!r} is not an IPv6 address") from None
        port = after[1:]
    else:
        host, _, port = authority.partition(":")
        if not _HOST.fullmatch(host) or host.strip(".") == "":
            raise refuse(f"{host!r} is not a host name (non-ASCII names: use the xn-- form)")
    if port and not (_PORT.fullmatch(port) and 0 < int(port) < 65536):
        raise refuse(f"{port!r} is not a port")
    if authority.endswith(":") and not port:
        raise refuse("empty port")
    return host, port


def _non_public_host(host: str, resolve_host: ResolveHost | None) -> str | None:
    """Why a host is not a public internet host, or None.

    Literal addresses are judged as written, including the forms libc also accepts
    (``127.1``, ``2130706433``, ``0x7f.0.0.1``). Names are resolved and every address is
    judged. A name that does not resolve passes: refusing it would break checking a catalog
    offline, and such a name cannot be connected to either. This check is not the last line:
    DNS can answer differently at connection time, so the HTTP client must re-check the
    address it connects to and must not follow redirects unchecked.
    """
    name = host.lower().rstrip(".")
    if ":" in host:
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.IPv6Address(host)
    else:
        literal = _ipv4_literal(name)
    if literal is not None:
        reason = _address_reason(literal)
        return f"host {host} is {reason}" if reason else None
    if name == "localhost" or name.endswith(_LOCAL_NAME_SUFFIXES):
        return f"host {host!r} is a local-network name"
    if "." not in name:
        return f"host {host!r} is a single-label name (resolved through the local search domains)"
    try:
        addresses = list((resolve_host or _getaddrinfo)(name))
    except (OSError, ValueError) as exc:  # gaierror offline; UnicodeError for odd labels
        logger.debug(
            "catalog host %s does not resolve (%s); checked again on connection", name, exc
        )
        return None
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            return f"host {host!r} resolves to {text!r}, not an IP address"
        reason = _address_reason(address)
        if reason:
            return f"host {host!r} resolves to {reason}"
    return None


def _getaddrinfo(host: str) -> list[str]:
    return [str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)]


def _ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address libc would read ``host`` as (``127.1``, ``0x7f000001``), or None."""
    if not host or set(host.lower()) - set("0123456789abcdefx."):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def _address_reason(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """'a loopback address 127.0.0.1' and the like, or None for a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        for embedded in _embedded_ipv4(address):
            reason = _address_reason(embedded)
            if reason:
                return f"{reason} (inside {address})"
        if address.is_site_local:
            return f"a site-local address {address}"
    kinds = (
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address (cloud metadata services live at 169.254.169.254)"),
        ("is_unspecified", "the unspecified address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    )
    for attribute, kind in kinds:
        if getattr(address, attribute):
            return f"{kind} {address}"
    if not address.is_global:
        return f"a non-public address {address}"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address reaches: mapped, 6to4, Teredo client, NAT64."""
    found = [a for a in (address.ipv4_mapped, address.sixtofour) if a is not None]
    if address.teredo is not None:
        found.append(address.teredo[1])
    if address in ipaddress.IPv6Network("64:ff9b::/96"):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


class _OptionContext:
    """What an option check needs to know to judge a value and to word its message."""

    def __init__(
        self, entry: str, protocol: str, allow_local: bool, resolve_host: ResolveHost | None
    ) -> None:
        self.entry = entry
        self.protocol = protocol
        self.allow_local = allow_local
        self.resolve_host = resolve_host

    def refuse(self, where: str, reason: str) -> CatalogError:
        return CatalogError(f"catalog entry {self.entry!r}: {where} refused: {reason}")


_OptionCheck = Callable[[object, str, _OptionContext], object]


def _boolean(value: object, where: str, ctx: _OptionContext) -> object:
    if not isinstance(value, bool):
        raise ctx.refuse(where, f"must be true or false, not {type(value).__name__}")
    return value


def _concurrency(value: object, where: str, ctx: _OptionContext) -> object:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 64:
        raise ctx.refuse(where, "must be an integer from 1 to 64")
    return value


def _matching(pattern: str, description: str) -> _OptionCheck:
    compiled = re.compile(pattern)

    def check(value: object, where: str, ctx: _OptionContext) -> object:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise ctx.refuse(where, f"must be {description}")
        return value

    return check


def _one_of(*choices: str) -> _OptionCheck:
    def check(value: object, where: str, ctx: _OptionContext) -> object:
        if value not in choices:
            raise ctx.refuse(
                where,
                f"must be one of {list(choices)} (credentials and token files do not belong in a catalog)",
            )
        return value

    return check


def _endpoint(value: object, where: str, ctx: _OptionContext) -> object:
    # an endpoint is where the client sends its requests, signed with the user's credentials:
    # the same SSRF as a URL, so the same check
    url = parse_catalog_url(
        value,
        entry=ctx.entry,
        allow_local=ctx.allow_local,
        resolve_host=ctx.resolve_host,
        field=where,
    )
    if not url.startswith(("https://", "http://")):
        raise ctx.refuse(where, "must be an https:// URL")
    return url


def _nested(spec: Mapping[str, _OptionCheck]) -> _OptionCheck:
    def check(value: object, where: str, ctx: _OptionContext) -> object:
        if not isinstance(value, dict):
            raise ctx.refuse(where, "must be a mapping")
        return _check_options(value, spec, where, ctx)

    return check


#: options a catalog may set, per protocol. anon/requester_pays/region/project choose how the
#: user's own client reaches the named bucket; max_concurrency is a tuning knob (README
#: "Buckets"); endpoint_url is checked like a URL. Everything else is refused: the keys below
#: chain filesystems or carry credentials, and unknown keys may do either in a future fsspec.
_OPTION_SPECS: dict[str, dict[str, _OptionCheck]] = {
    "s3": {
        "anon": _boolean,
        "requester_pays": _boolean,
        "max_concurrency": _concurrency,
        "endpoint_url": _endpoint,
        "client_kwargs": _nested(
            {
                "region_name": _matching(r"[a-z0-9-]{1,64}", "an AWS region name"),
                "endpoint_url": _endpoint,
            }
        ),
    },
    "gs": {
        "token": _one_of("anon", "google_default"),
        "requester_pays": _boolean,
        "project": _matching(r"[a-z0-9.:-]{1,100}", "a Google Cloud project id"),
    },
}


_CHAINING_KEYS = frozenset(
    {
        "protocol",
        "target_protocol",
        "target_options",
        "fo",
        "remote_protocol",
        "remote_options",
        "fs",
        "target",
        "cache_storage",
        "template",
        "ref_storage_args",
    }
)


def _check_options(
    options: Mapping[Any, Any], spec: Mapping[str, _OptionCheck], where: str, ctx: _OptionContext
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        here = _printable(f"{where}.{key}" if isinstance(key, str) else f"{where}[{key!r}]")
        check = spec.get(key) if isinstance(key, str) else None
        if check is None:
            if ctx.protocol == "local":
                reason = "storage options are for remote URLs, not local paths"
            elif key in _CHAINING_KEYS:
                reason = "chains or redirects to another filesystem"
            elif key in SECRET_OPTION_NAMES:
                reason = (
                    "not an option a catalog may set: it carries credentials or headers, which do "
                    "not belong in a catalog (use your environment or profile)"
                )
            else:
                allowed = sorted(spec) or "none"
                reason = (
                    f"not an option a catalog may set for {ctx.protocol}:// (allowed: {allowed})"
                )
            raise ctx.refuse(here, reason)
        out[key] = check(value, here, ctx)
    return out
