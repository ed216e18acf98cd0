"""One classifier of I/O faults: what a failed store call means and whether to try again.

Every remote library reports faults its own way (aiohttp and fsspec exceptions, botocore error
codes, obstore's Rust error strings). :func:`classify` maps any of them to a :class:`Fault`
(transient, missing, permission, permanent) with the HTTP status where there is one; the retry
layer (:mod:`ctzarr.io.retry`) and the cluster runner decide from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import re
from collections.abc import (
    Iterator,
)
from dataclasses import dataclass
from typing import Any

from ctzarr.io.urls import redact_url

#: HTTP statuses worth another attempt: request timeout, rate limited, server-side faults.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


#: S3 error codes worth another attempt (some arrive with a 400 status).
RETRY_S3_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
    }
)


PERMISSION_S3_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "AccountProblem",
    }
)


# ------------------------------------------------------------------------------------------------
# what a fault is
# ------------------------------------------------------------------------------------------------
class FaultKind(enum.Enum):
    PASS = "pass"  # not a remote fault (missing key, programming error): untouched
    PERMISSION = "permission"  # 401/403: fail at once
    PERMANENT = "permanent"  # other 4xx, TLS: fail at once
    CONNECT = "connect"  # refused, unknown host, connect timeout: retried once reached
    TRANSIENT = "transient"  # 5xx, 429, reset, cut body, read timeout: retried


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    description: str = ""
    status: int | None = None
    retry_after_s: float | None = None
    answered: bool = False  # the server sent a response (so it exists and is reachable)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(seen) < 16:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _retry_after(headers: Any) -> float | None:
    try:
        value = headers.get("Retry-After") or headers.get("retry-after") if headers else None
        return float(value) if value is not None else None
    except (TypeError, ValueError, AttributeError):
        return None  # an HTTP date: ignored, the backoff applies


def _status_fault(status: int, text: str, headers: Any = None, code: str = "") -> Fault:
    if status in (401, 403) or code in PERMISSION_S3_CODES:
        return Fault(FaultKind.PERMISSION, text, status, answered=True)
    if status in RETRY_STATUSES or code in RETRY_S3_CODES:
        return Fault(FaultKind.TRANSIENT, text, status, _retry_after(headers), answered=True)
    return Fault(FaultKind.PERMANENT, text, status, answered=True)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one(exc: BaseException) -> Fault | None:
    """The fault one exception of a chain stands for, or None to look further down the chain."""
    name = type(exc).__name__

    fault = classify_obstore_error(exc)
    if fault is not None:
        return fault
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - fsspec's HTTP and s3fs both need it
        aiohttp = None  # type: ignore[assignment]
    try:
        import botocore.exceptions as boto
    except ImportError:  # pragma: no cover - only with s3fs
        boto = None

    if aiohttp is not None and isinstance(exc, aiohttp.ClientResponseError):
        return _status_fault(exc.status, f"HTTP {exc.status} {exc.message}".strip(), exc.headers)
    if boto is not None and isinstance(exc, boto.ClientError):
        response = getattr(exc, "response", None) or {}
        err = response.get("Error", {}) or {}
        meta = response.get("ResponseMetadata", {}) or {}
        code = str(err.get("Code", ""))
        status = int(meta.get("HTTPStatusCode") or (int(code) if code.isdigit() else 0))
        message = str(err.get("Message", "") or "")
        text = " ".join(p for p in ("HTTP", str(status), "" if code == str(status) else code) if p)
        text += f": {message}" if message and message != code else ""
        return _status_fault(status, text, meta.get("HTTPHeaders"), code)
    if isinstance(exc, PermissionError):
        return Fault(FaultKind.PERMISSION, _describe(exc), 403, answered=True)
    # before the connection errors: certificate and TLS faults are not transient
    if aiohttp is not None and isinstance(exc, aiohttp.ClientSSLError):
        return Fault(FaultKind.PERMANENT, _describe(exc))
    if boto is not None and isinstance(exc, boto.SSLError):
        return Fault(FaultKind.PERMANENT, _describe(exc))
    connect: tuple[type[BaseException], ...] = (ConnectionRefusedError,)
    if aiohttp is not None:
        connect += (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
    if boto is not None:
        connect += (boto.EndpointConnectionError, boto.ConnectTimeoutError)
    if isinstance(exc, connect):
        return Fault(FaultKind.CONNECT, f"cannot connect ({_describe(exc)})")
    transient: tuple[type[BaseException], ...] = (
        TimeoutError,
        ConnectionError,
        asyncio.IncompleteReadError,
    )
    if aiohttp is not None:
        transient += (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)
    if boto is not None:
        transient += (boto.HTTPClientError, boto.IncompleteReadError, boto.ConnectionError)
    if isinstance(exc, transient):
        if isinstance(exc, TimeoutError):
            return Fault(FaultKind.TRANSIENT, f"no response in time ({_describe(exc)})")
        return Fault(
            FaultKind.TRANSIENT, _describe(exc), answered=not isinstance(exc, ConnectionError)
        )
    if name == "ResponseParserError":  # botocore: throttling answers sometimes carry invalid XML
        return Fault(FaultKind.TRANSIENT, _describe(exc), answered=True)
    if aiohttp is not None and isinstance(exc, aiohttp.ClientError):
        return Fault(FaultKind.PERMANENT, _describe(exc))
    return None


_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)


def classify(exc: BaseException) -> Fault:
    """What to do about an exception raised by a store call.

    A missing key (``FileNotFoundError``...) is passed through untouched. Otherwise the chain
    (``__cause__``/``__context__``) is searched for an HTTP status first (s3fs raises an
    ``OSError`` or ``PermissionError`` whose cause is botocore's ``ClientError``, which has the
    status and the S3 code), then each exception is matched by type, outermost first.
    """
    if isinstance(exc, _MISSING):
        return Fault(FaultKind.PASS, answered=True)
    chain = list(_chain(exc))
    try:
        import aiohttp
        import botocore.exceptions as boto

        with_status: tuple[type[BaseException], ...] = (
            aiohttp.ClientResponseError,
            boto.ClientError,
        )
    except ImportError:  # pragma: no cover - s3fs not installed
        import aiohttp

        with_status = (aiohttp.ClientResponseError,)
    ordered = [e for e in chain if isinstance(e, with_status)] + chain
    for item in ordered:
        fault = _one(item)
        if fault is not None:
            if fault.status == 404:  # a missing key reported without FileNotFoundError
                return Fault(FaultKind.PASS, answered=True)
            return dataclasses.replace(fault, description=redact_url(fault.description))
    return Fault(FaultKind.PASS)


# ------------------------------------------------------------------------------------------------
# faults: obstore raises one exception per failed request, its text describing the HTTP error
# ------------------------------------------------------------------------------------------------
_STATUS = re.compile(r"non-2xx status code: (\d{3})(?: ([A-Za-z -]+))?")


_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")


_S3_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")


_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")


_OS_MESSAGE = re.compile(r'(?:message|error): "([^"]+)"')


_PREFIX = re.compile(r"^Generic \w+ error: |Error performing \w+ \S+ in [\d.]+\S* - ")


def _first_line(exc: BaseException) -> str:
    """obstore's one-line summary, without its store prefix, URL and timing."""
    text = str(exc).split("\n\nDebug source:", 1)[0]
    return _PREFIX.sub("", " ".join(text.split())).strip()


def classify_obstore_error(exc: BaseException) -> Fault | None:
    """The fault an obstore exception stands for, or None when ``exc`` is not one of obstore's.

    Descriptions follow the fsspec path's (``HTTP 503 Service Unavailable SlowDown: ...``).
    """
    if not type(exc).__module__.startswith("obstore"):
        return None
    from obstore import exceptions as obx


    if isinstance(exc, obx.NotFoundError):
        return Fault(FaultKind.PASS, answered=True)
    text = str(exc)
    head = _first_line(exc)
    status_match = _STATUS.search(text)
    if status_match:
        status = int(status_match.group(1))
        code_match, message_match = _S3_CODE.search(text), _S3_MESSAGE.search(text)
        code = code_match.group(1) if code_match else ""
        description = f"HTTP {status} {(status_match.group(2) or '').strip()}".strip()
        if code:
            description += f" {code}"
            if message_match and message_match.group(1).strip():
                description += f": {message_match.group(1).strip()}"
        if isinstance(exc, (obx.PermissionDeniedError, obx.UnauthenticatedError)):
            return Fault(FaultKind.PERMISSION, description, status, answered=True)
        fault = _status_fault(status, description, None, code)
        if status == 429:
            # obstore keeps the response headers to itself, so a Retry-After cannot be read: a
            # rate-limited request waits the policy's longest backoff instead (max_backoff_s)
            fault = dataclasses.replace(fault, retry_after_s=math.inf)
        return fault
    if isinstance(exc, (obx.PermissionDeniedError, obx.UnauthenticatedError)):
        return Fault(FaultKind.PERMISSION, head, 403, answered=True)
    if "certificate" in text.lower():
        return Fault(FaultKind.PERMANENT, head)
    kind = _KIND.search(text)
    kind_name = kind.group(1) if kind else ""
    detail = _OS_MESSAGE.search(text)
    if kind_name == "Connect":
        return Fault(FaultKind.CONNECT, f"cannot connect ({detail.group(1) if detail else head})")
    if kind_name == "Timeout":
        return Fault(FaultKind.TRANSIENT, f"no response in time ({head})")
    if kind_name == "Request" and "IncompleteMessage" in text:
        return Fault(FaultKind.TRANSIENT, f"Connection closed without an answer ({head})")
    if kind_name in ("Request", "Interrupted", "Decode") or "body error" in text:
        return Fault(FaultKind.TRANSIENT, head, answered=kind_name in ("Interrupted", "Decode"))
    return Fault(FaultKind.PERMANENT, head)
