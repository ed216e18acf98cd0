"""One classifier of I/O faults: what a failed store call means and whether to try again.

Every remote library reports faults its own way (aiohttp and fsspec exceptions, botocore error
codes, obstore's Rust error strings). :func:`classify` maps any of them to a :class:`Fault`
with the HTTP status where there is one. Its users: the store retries
(:class:`ctzarr.io.retry.RetryingStore`), the cluster runner (:func:`is_transient`: run a task
again?) and the case locks (an S3 412 is "lock taken").
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import math
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from ctzarr.errors import CtzarrError
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


class FaultKind(enum.Enum):
    UNKNOWN = "unknown"  # not a fault of a remote library (a programming error...): untouched
    MISSING = "missing"  # not found, exists, is a directory: an answer, untouched
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


_MISSING = (FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError)


@functools.cache
def _optional(module: str) -> ModuleType | None:
    """aiohttp / botocore, imported on first use: both come with optional extras only."""
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        return None


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


#: S3 codes that mean the credentials in use are wrong or stale (not that access is refused)
BAD_CREDENTIAL_S3_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)


def _status_fault(status: int, text: str, headers: Any = None, code: str = "") -> Fault:
    if code in BAD_CREDENTIAL_S3_CODES:
        text += (
            " (the AWS credentials in use are wrong or expired: check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN or AWS_PROFILE)"
        )
    if status in (401, 403) or code in PERMISSION_S3_CODES:
        return Fault(FaultKind.PERMISSION, text, status, answered=True)
    if status in RETRY_STATUSES or code in RETRY_S3_CODES:
        return Fault(FaultKind.TRANSIENT, text, status, _retry_after(headers), answered=True)
    return Fault(FaultKind.PERMANENT, text, status, answered=True)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _botocore_fault(exc: Any) -> Fault:
    response = getattr(exc, "response", None) or {}
    err = response.get("Error", {}) or {}
    meta = response.get("ResponseMetadata", {}) or {}
    code = str(err.get("Code", ""))
    status = int(meta.get("HTTPStatusCode") or (int(code) if code.isdigit() else 0))
    message = str(err.get("Message", "") or "")
    text = " ".join(p for p in ("HTTP", str(status), "" if code == str(status) else code) if p)
    text += f": {message}" if message and message != code else ""
    return _status_fault(status, text, meta.get("HTTPHeaders"), code)


#: what to do when no AWS credentials are found (botocore's NoCredentialsError, or obstore
#: falling back to the instance metadata service, which is absent or refuses off EC2)
NO_AWS_CREDENTIALS = (
    "no AWS credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with "
    "AWS_SESSION_TOKEN for temporary keys) or AWS_PROFILE; a public bucket needs storage "
    'options {"anon": true} (ctzarr CLI: --storage-options \'{"anon": true}\')'
)

# where AWS SDKs look for credentials last: EC2 instance metadata (its address, or any
# endpoint set by AWS_EC2_METADATA_SERVICE_ENDPOINT: its paths), ECS/EKS container endpoints
_CREDENTIAL_ENDPOINTS = (
    "169.254.169.254",
    "169.254.170.2",
    "169.254.170.23",
    "fd00:ec2::254",
    "/latest/api/token",
    "/latest/meta-data/iam",
)


def _credentials_fault(exc: BaseException) -> Fault | None:
    """A missing or unusable credential (not an answer of the store's server), or None."""
    name = type(exc).__name__
    if type(exc).__module__.startswith("botocore"):
        if name in ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"):
            return Fault(FaultKind.PERMISSION, f"{NO_AWS_CREDENTIALS} ({_describe(exc)})")
        if name == "ProfileNotFound":
            return Fault(
                FaultKind.PERMISSION,
                f"AWS profile {getattr(exc, 'kwargs', {}).get('profile', '')!r} not found "
                "(AWS_PROFILE names a profile of ~/.aws/config or ~/.aws/credentials)",
            )
    if type(exc).__module__.startswith("obstore") and any(
        host in str(exc) for host in _CREDENTIAL_ENDPOINTS
    ):
        return Fault(FaultKind.PERMISSION, NO_AWS_CREDENTIALS)
    return None


def _one(exc: BaseException) -> Fault | None:
    """The fault one exception of a chain stands for, or None to look further down the chain."""
    fault = _credentials_fault(exc)
    if fault is not None:
        return fault
    fault = _obstore_fault(exc)
    if fault is not None:
        return fault
    aiohttp, boto = _optional("aiohttp"), _optional("botocore.exceptions")
    if aiohttp and isinstance(exc, aiohttp.ClientResponseError):
        return _status_fault(exc.status, f"HTTP {exc.status} {exc.message}".strip(), exc.headers)
    if boto and isinstance(exc, boto.ClientError):
        return _botocore_fault(exc)
    if isinstance(exc, PermissionError):
        return Fault(FaultKind.PERMISSION, _describe(exc), 403, answered=True)
    # before the connection errors: certificate and TLS faults are not transient
    if (aiohttp and isinstance(exc, aiohttp.ClientSSLError)) or (
        boto and isinstance(exc, boto.SSLError)
    ):
        return Fault(FaultKind.PERMANENT, _describe(exc))
    connect: tuple[type[BaseException], ...] = (ConnectionRefusedError,)
    transient: tuple[type[BaseException], ...] = (
        TimeoutError,
        ConnectionError,
        asyncio.IncompleteReadError,
    )
    if aiohttp:
        connect += (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
        transient += (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)
    if boto:
        connect += (boto.EndpointConnectionError, boto.ConnectTimeoutError)
        transient += (boto.HTTPClientError, boto.IncompleteReadError, boto.ConnectionError)
    if isinstance(exc, connect):
        return Fault(FaultKind.CONNECT, f"cannot connect ({_describe(exc)})")
    if isinstance(exc, TimeoutError):
        return Fault(FaultKind.TRANSIENT, f"no response in time ({_describe(exc)})")
    if isinstance(exc, transient):
        answered = not isinstance(exc, ConnectionError)
        return Fault(FaultKind.TRANSIENT, _describe(exc), answered=answered)
    if type(exc).__name__ == "ResponseParserError":  # botocore: throttling with invalid XML
        return Fault(FaultKind.TRANSIENT, _describe(exc), answered=True)
    if aiohttp and isinstance(exc, aiohttp.ClientError):
        return Fault(FaultKind.PERMANENT, _describe(exc))
    return None


def classify(exc: BaseException) -> Fault:
    """What an exception raised by a store call means.

    A missing key (``FileNotFoundError``..., or any 404) is :attr:`FaultKind.MISSING`.
    Otherwise the chain (``__cause__``/``__context__``) is searched for an HTTP status first
    (s3fs raises an ``OSError`` or ``PermissionError`` whose cause is botocore's
    ``ClientError``, which has the status and the S3 code), then each exception is matched by
    type, outermost first. Descriptions never hold user info or query strings.
    """
    if isinstance(exc, _MISSING):
        return Fault(FaultKind.MISSING, answered=True)
    chain = list(_chain(exc))
    aiohttp, boto = _optional("aiohttp"), _optional("botocore.exceptions")
    with_status = tuple(
        t
        for t in (aiohttp and aiohttp.ClientResponseError, boto and boto.ClientError)
        if isinstance(t, type)
    )
    for item in [e for e in chain if isinstance(e, with_status)] + chain:
        fault = _one(item)
        if fault is not None:
            if fault.status == 404 or fault.kind is FaultKind.MISSING:
                return Fault(FaultKind.MISSING, answered=True)
            return dataclasses.replace(fault, description=redact_url(fault.description))
    return Fault(FaultKind.UNKNOWN)


def is_transient(exc: BaseException) -> bool:
    """True for an I/O fault worth running a whole task again (cluster runner).

    ctzarr's own errors are final (a :class:`~ctzarr.errors.RemoteStoreError` already spent
    the store's retries), and so are missing files and refused permissions; any other
    ``OSError`` may be the moment's.
    """
    if not isinstance(exc, OSError) or isinstance(exc, CtzarrError):
        return False
    return classify(exc).kind not in (FaultKind.MISSING, FaultKind.PERMISSION, FaultKind.PERMANENT)


# ------------------------------------------------------------------------------------------------
# obstore raises one exception per failed request, its text describing the HTTP error
# ------------------------------------------------------------------------------------------------
_STATUS = re.compile(r"non-2xx status code: (\d{3})(?: ([A-Za-z -]+))?")
_S3_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")
_S3_MESSAGE = re.compile(r"<Message>([^<]*)</Message>")
_KIND = re.compile(r"HttpError \{\s*kind: (\w+)")
_OS_MESSAGE = re.compile(r'(?:message|error): "([^"]+)"')
_ENDPOINT = re.compile(r"Error performing \w+ (\w+://\S+)")
_PREFIX = re.compile(r"^Generic \w+ error: |Error performing \w+ \S+ in [\d.]+\S* - ")


def _origin(url: str) -> str:
    """``scheme://host:port`` of a URL: no user info, path or query."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        port = ""
    host = parts.hostname or ""
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{port}"


def _first_line(exc: BaseException) -> str:
    """obstore's one-line summary, without its store prefix, URL and timing."""
    text = str(exc).split("\n\nDebug source:", 1)[0]
    return _PREFIX.sub("", " ".join(text.split())).strip()


def _obstore_fault(exc: BaseException) -> Fault | None:
    """The fault an obstore exception stands for, or None when ``exc`` is not one of obstore's.

    Descriptions follow the fsspec path's (``HTTP 503 Service Unavailable SlowDown: ...``).
    """
    if not type(exc).__module__.startswith("obstore"):
        return None
    from obstore import exceptions as obx  # only reached with an obstore exception in hand

    if isinstance(exc, obx.NotFoundError):
        return Fault(FaultKind.MISSING, answered=True)
    denied = isinstance(exc, obx.PermissionDeniedError | obx.UnauthenticatedError)
    text, head = str(exc), _first_line(exc)
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
        fault = _status_fault(status, description, None, code)
        if denied:
            return Fault(FaultKind.PERMISSION, fault.description, status, answered=True)
        if status == 429:
            # obstore keeps the response headers to itself, so a Retry-After cannot be read: a
            # rate-limited request waits the policy's longest backoff instead (max_backoff_s)
            fault = dataclasses.replace(fault, retry_after_s=math.inf)
        return fault
    if denied:
        return Fault(FaultKind.PERMISSION, head, 403, answered=True)
    if "certificate" in text.lower():
        return Fault(FaultKind.PERMANENT, head)
    kind = _KIND.search(text)
    kind_name = kind.group(1) if kind else ""
    detail = _OS_MESSAGE.search(text)
    if kind_name == "Connect":
        endpoint = _ENDPOINT.search(text)  # name the server: an S3 endpoint is not in the URL
        where = f" to {_origin(endpoint.group(1))}" if endpoint else ""
        return Fault(
            FaultKind.CONNECT, f"cannot connect{where} ({detail.group(1) if detail else head})"
        )
    if kind_name == "Timeout":
        return Fault(FaultKind.TRANSIENT, f"no response in time ({head})")
    if kind_name == "Request" and "IncompleteMessage" in text:
        return Fault(FaultKind.TRANSIENT, f"Connection closed without an answer ({head})")
    if kind_name in ("Request", "Interrupted", "Decode") or "body error" in text:
        return Fault(FaultKind.TRANSIENT, head, answered=kind_name in ("Interrupted", "Decode"))
    return Fault(FaultKind.PERMANENT, head)
