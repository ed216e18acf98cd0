"""RFC 9457 problem details: every error the service answers, as ``application/problem+json``.

A :class:`Problem` raised anywhere in a handler becomes one response (type, title, status,
detail). Library errors are mapped by kind (an unknown case, structure or segmentation: 404;
a bad value: 422; a damaged or unreachable store: 5xx). The detail of a library error names the
case and the structure, never a local path, URL, credential or traceback: store locations are
replaced by the collection's public name before anything is sent (:func:`scrub`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctzarr.errors import (
    CaseNotFoundError,
    CtzarrError,
    IncompleteCaseError,
    IndexUnavailableError,
    MissingDependencyError,
    RemotePermissionError,
    RemoteStoreError,
    SegmentationNotFoundError,
    StoreCorruptError,
    StoreError,
    StructureNotFoundError,
)

__all__ = ["PROBLEM_TYPE", "Problem", "install_problem_handlers", "problem_response", "scrub"]

logger = logging.getLogger(__name__)

#: media type of every error body
PROBLEM_TYPE = "application/problem+json"

#: longest detail sent (a close-match list can be long)
_MAX_DETAIL = 600

# anything that looks like a location: URLs with a scheme, absolute POSIX or Windows paths
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"),;]+")
_PATH = re.compile(r"(?<![\w.:])(?:/[^\s'\"),;:]+)+/?|\b[A-Za-z]:\\[^\s'\"),;]+")


class Problem(Exception):  # noqa: N818 - named after the RFC's object, as FastAPI's HTTPException
    """An error answer: HTTP status, a short title and a detail for people."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        title: str | None = None,
        slug: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.slug = slug or self.title.lower().replace(" ", "-")
        self.headers = headers or {}
        super().__init__(f"{status} {detail}")


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without store locations (replaced by ``<store>``), known secrets and excess
    whitespace, cut to a readable length."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "<store>")
    text = _URL.sub("<store>", text)
    text = _PATH.sub("<store>", text)
    text = " ".join(text.split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"


def problem_response(problem: Problem) -> JSONResponse:
    """The ``application/problem+json`` response of a problem."""
    body = {
        "type": f"urn:ctzarr:problem:{problem.slug}",
        "title": problem.title,
        "status": problem.status,
        "detail": problem.detail,
    }
    return JSONResponse(
        body, status_code=problem.status, media_type=PROBLEM_TYPE, headers=problem.headers
    )


def from_library_error(exc: Exception, secrets: Iterable[str] = ()) -> Problem:
    """The problem of a library error: its status by kind, its message scrubbed."""
    detail = scrub(str(exc), secrets) or type(exc).__name__
    if isinstance(exc, (CaseNotFoundError, SegmentationNotFoundError, StructureNotFoundError)):
        kind = {
            CaseNotFoundError: "case not found",
            SegmentationNotFoundError: "segmentation not found",
            StructureNotFoundError: "structure not found",
        }
        title = next(t for k, t in kind.items() if isinstance(exc, k)).capitalize()
        return Problem(404, detail, title=title)
    if isinstance(exc, MissingDependencyError):  # an optional feature of this server
        return Problem(501, detail, title="Not available on this server")
    if isinstance(exc, IncompleteCaseError):
        return Problem(404, detail, title="Case not found")
    if isinstance(exc, IndexUnavailableError):
        return Problem(422, detail, title="Index unavailable")
    if isinstance(exc, StoreCorruptError):
        return Problem(500, detail, title="Store damaged")
    if isinstance(exc, RemotePermissionError):
        return Problem(502, detail, title="Store refused access")
    if isinstance(exc, RemoteStoreError):
        return Problem(502, detail, title="Store unreachable")
    if isinstance(exc, StoreError):
        return Problem(500, detail, title="Store error")
    if isinstance(exc, (ValueError, KeyError)):
        return Problem(422, detail, title="Invalid parameter")
    return Problem(500, detail, title="Internal error")


def _validation_detail(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "path"))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_problem_handlers(app: FastAPI, secrets: Iterable[str] = ()) -> None:
    """Make every error of ``app`` a problem detail (FastAPI's own 404/405/422 too)."""
    hidden = tuple(secrets)

    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(status).phrase
        return problem_response(
            Problem(status, scrub(detail, hidden), headers=dict(exc.headers or {}))
        )

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return problem_response(
            Problem(422, scrub(_validation_detail(exc), hidden), title="Invalid parameter")
        )

    async def on_library(request: Request, exc: Exception) -> JSONResponse:
        problem = from_library_error(exc, hidden)
        if problem.status >= 500:
            logger.warning("%s %s: %s", request.method, request.url.path, exc)
        return problem_response(problem)

    async def on_any(request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server's log, never into the answer
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return problem_response(Problem(500, "the server failed to answer this request"))

    handlers: dict[Any, Any] = {
        Problem: on_problem,
        StarletteHTTPException: on_http,
        RequestValidationError: on_validation,
        CtzarrError: on_library,
        # a value the library refuses (an index outside the volume, a malformed window or
        # ``within``): the caller's parameter, never clamped
        ValueError: on_library,
        Exception: on_any,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
