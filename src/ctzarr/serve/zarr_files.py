"""``/zarr/{name}/{key}``: a store's own bytes over HTTP, for zarr-python, zarrita and viewers.

Objects are sent as stored (never re-encoded, never compressed on the fly), read-only, with what
browser viewers need to read sharded arrays: an exact ``Content-Length`` on ``HEAD``, single
byte ranges (``bytes=a-b``, ``a-``, suffix ``-n``) answered 206 with ``Content-Range`` (shard
indexes are read that way), 416 when nothing of the range lies in the object, ``ETag`` with
``If-None-Match``, ``Cache-Control`` and CORS headers.

A key names an object inside the store or nothing: empty, ``.`` and ``..`` segments, absolute
paths, backslashes and NUL are refused before any I/O, and on disk the resolved path (symlinks
followed) must still lie inside the store's folder. Every refusal is the same 404 as a missing
key, so a client learns nothing about the host's files. A multi-range request (rarely sent by
readers) is answered with the whole object, which HTTP allows.

Local stores are read with ``os.pread`` (one open, one read of the range: cheaper than zarr's
LocalStore, which reads and slices); other stores through the zarr store's own ``getsize`` and
ranged ``get`` (fsspec, obstore: S3, GCS, HTTPS), on zarr's event loop.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import Response
from zarr.abc.store import RangeByteRequest, Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, WrapperStore

from ctzarr.serve.problems import Problem

__all__ = ["ByteRange", "StoreFiles", "parse_range", "safe_key"]

#: headers a browser script may read from a /zarr answer
EXPOSED_HEADERS = "Content-Range, Content-Length, ETag, Accept-Ranges"

_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")


@dataclass(frozen=True)
class ByteRange:
    """A satisfiable range of an object: bytes ``start`` to ``stop`` (exclusive)."""

    start: int
    stop: int


class Unsatisfiable(Exception):  # noqa: N818 - a condition, answered 416
    """The range lies wholly outside the object."""


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """The one byte range a ``Range`` header asks of an object of ``size`` bytes.

    Returns None (send the whole object) without a header, for another unit, for a malformed or
    multi-range header (RFC 9110 lets a server ignore those); raises :class:`Unsatisfiable` when
    the range starts at or past the end, or is an empty suffix.
    """
    if not header:
        return None
    m = _RANGE.match(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:  # suffix: the last n bytes
        n = int(last)
        if n == 0 or size == 0:
            raise Unsatisfiable
        return ByteRange(max(size - n, 0), size)
    start = int(first)
    stop = size if not last else int(last) + 1
    if last and int(last) < start:
        return None  # invalid: ignored
    if start >= size:
        raise Unsatisfiable
    return ByteRange(start, min(stop, size))


def safe_key(key: str) -> str | None:
    """The key if it can only name an object inside a store, else None."""
    if not key or len(key) > 1024 or "\x00" in key or "\\" in key or key.startswith("/"):
        return None
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    return key


@dataclass(frozen=True)
class _Object:
    size: int
    etag: str | None
    path: Path | None  # on disk


class StoreFiles:
    """The objects of one store, looked up and read safely."""

    def __init__(
        self,
        store: Store,
        allow_origin: str = "*",
        run: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self.store = store
        # runs blocking I/O off the event loop (the app passes its bounded thread pool)
        self.run = run or anyio.to_thread.run_sync
        self.allow_origin = allow_origin
        self.root: Path | None = None
        if isinstance(store, LocalStore):
            self.root = Path(os.path.realpath(store.root))
        self._prototype = default_buffer_prototype()

    def cors_headers(self) -> dict[str, str]:
        """CORS headers of every /zarr answer."""
        headers = {
            "Access-Control-Allow-Origin": self.allow_origin,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
        }
        if self.allow_origin != "*":
            headers["Vary"] = "Origin"
        return headers

    def _stat(self, key: str) -> _Object | None:
        """Size, ETag and (on disk) path of an object; None when there is none."""
        if self.root is not None:
            path = Path(os.path.realpath(self.root / key))
            if path != self.root and self.root not in path.parents:
                return None  # a symlink out of the store
            try:
                st = path.stat()
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                return None
            if not path.is_file():
                return None
            return _Object(st.st_size, f'"{st.st_size:x}-{st.st_mtime_ns:x}"', path)
        try:
            size = int(sync(self.store.getsize(key)))
        except (FileNotFoundError, KeyError):
            return None
        return _Object(size, self._remote_etag(key, size), None)

    def _remote_etag(self, key: str, size: int) -> str | None:
        """The bucket's own ETag (or generation/mtime): from fsspec's info or obstore's head,
        whichever the store (under ctzarr's retrying wrapper) reads through."""
        store: Any = self.store
        while isinstance(store, WrapperStore):  # ctzarr's RetryingStore, zarr's wrappers
            store = store._store
        info: Mapping[str, Any] | None = None
        try:
            fs: Any = getattr(store, "fs", None)
            base = getattr(store, "path", None)
            if fs is not None and base is not None:
                path = f"{base}/{key}"
                info = sync(fs._info(path)) if fs.async_impl else fs.info(path)
            elif getattr(store, "store", None) is not None:  # zarr's ObjectStore over obstore
                import obstore  # present whenever an ObjectStore is: it is what it wraps

                info = dict(obstore.head(store.store, key))
        except Exception:  # no ETag is better than no answer
            return None
        if not info:
            return None
        for field in ("ETag", "etag", "e_tag", "md5Hash", "generation", "mtime", "LastModified"):
            if info.get(field):
                token = hashlib.sha256(f"{field}:{info[field]}:{size}".encode()).hexdigest()
                return f'"{token[:32]}"'
        return None

    def _read(self, key: str, obj: _Object, rng: ByteRange | None) -> bytes:
        start, stop = (0, obj.size) if rng is None else (rng.start, rng.stop)
        if obj.path is not None:
            fd = os.open(obj.path, os.O_RDONLY)
            try:
                chunks = []
                offset = start
                while offset < stop:  # pread may return less than asked
                    got = os.pread(fd, stop - offset, offset)
                    if not got:
                        break
                    chunks.append(got)
                    offset += len(got)
                return b"".join(chunks)
            finally:
                os.close(fd)
        buf = sync(
            self.store.get(
                key, self._prototype, None if rng is None else RangeByteRequest(start, stop)
            )
        )
        if buf is None:
            raise FileNotFoundError(key)
        return bytes(buf.to_bytes())

    async def answer(self, request: Request, key: str) -> Response:
        """The answer to a GET, HEAD or OPTIONS of one key."""
        cors = self.cors_headers()
        if request.method == "OPTIONS":
            return Response(
                status_code=204,
                headers={
                    **cors,
                    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
                    "Access-Control-Allow-Headers": "Range, If-None-Match, Authorization",
                    "Access-Control-Max-Age": "600",
                },
            )
        checked = safe_key(key)
        obj = None if checked is None else await self.run(self._stat, checked)
        if checked is None or obj is None:
            raise Problem(404, "no such object in this store", title="Not found", headers=cors)
        headers = {
            **cors,
            "Accept-Ranges": "bytes",
            "Cache-Control": "no-cache"
            if checked.endswith("zarr.json")
            else "public, max-age=3600",
            "Content-Type": "application/json"
            if checked.endswith(".json")
            else "application/octet-stream",
        }
        if obj.etag:
            headers["ETag"] = obj.etag
            if request.headers.get("if-none-match") in (obj.etag, "*"):
                return Response(status_code=304, headers=headers)
        if_range = request.headers.get("if-range")
        range_header = request.headers.get("range")
        if if_range is not None and if_range != obj.etag:
            range_header = None  # the client's copy is stale: send the whole object
        try:
            rng = parse_range(range_header, obj.size)
        except Unsatisfiable:
            raise Problem(
                416,
                f"the range lies outside the object ({obj.size} bytes)",
                title="Range not satisfiable",
                headers={**cors, "Content-Range": f"bytes */{obj.size}"},
            ) from None
        status = 200
        length = obj.size
        if rng is not None:
            status = 206
            length = rng.stop - rng.start
            headers["Content-Range"] = f"bytes {rng.start}-{rng.stop - 1}/{obj.size}"
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        try:
            body = await self.run(self._read, checked, obj, rng)
        except FileNotFoundError:  # removed between the stat and the read
            raise Problem(
                404, "no such object in this store", title="Not found", headers=cors
            ) from None
        headers["Content-Length"] = str(len(body))
        return Response(body, status_code=status, headers=headers)
