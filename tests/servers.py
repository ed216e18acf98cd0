"""Real servers on 127.0.0.1 for the remote-store tests: a static HTTP server with byte ranges
(including suffix ranges) that counts requests, and moto's S3 server."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class RequestLog:
    """Every request the HTTP server answered: (method, path, range header, status)."""

    entries: list[tuple[str, str, str | None, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str, rng: str | None, status: int) -> None:
        with self.lock:
            self.entries.append((method, path, rng, status))

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def __len__(self) -> int:
        return len(self.entries)


def _handler(root: Path, log: RequestLog) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet
            pass

        def _file(self) -> Path | None:
            rel = self.path.split("?", 1)[0].lstrip("/")
            path = (root / rel).resolve()
            if root.resolve() not in path.parents and path != root.resolve():
                return None
            return path if path.is_file() else None

        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict[str, str] | None = None,
            head: bool = False,
        ) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _serve(self, head: bool) -> None:
            path = self._file()
            rng = self.headers.get("Range")
            if path is None:
                log.add(self.command, self.path, rng, 404)
                self._send(404, b"not found", head=head)
                return
            data = path.read_bytes()
            size = len(data)
            if rng:
                m = _RANGE.match(rng.strip())
                if not m or (m.group(1) == "" and m.group(2) == ""):
                    log.add(self.command, self.path, rng, 416)
                    self._send(416, headers={"Content-Range": f"bytes */{size}"}, head=head)
                    return
                if m.group(1) == "":  # suffix range: the last N bytes
                    start, stop = max(size - int(m.group(2)), 0), size - 1
                else:
                    start = int(m.group(1))
                    stop = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                if start >= size or start > stop:
                    log.add(self.command, self.path, rng, 416)
                    self._send(416, headers={"Content-Range": f"bytes */{size}"}, head=head)
                    return
                log.add(self.command, self.path, rng, 206)
                self._send(
                    206,
                    data[start : stop + 1],
                    {"Content-Range": f"bytes {start}-{stop}/{size}", "Accept-Ranges": "bytes"},
                    head=head,
                )
                return
            log.add(self.command, self.path, None, 200)
            self._send(200, data, {"Accept-Ranges": "bytes"}, head=head)

        def do_GET(self) -> None:
            self._serve(head=False)

        def do_HEAD(self) -> None:
            self._serve(head=True)

    return Handler


@contextmanager
def http_server(root: str | os.PathLike[str]) -> Iterator[tuple[str, RequestLog]]:
    """Serve a directory on 127.0.0.1 (ephemeral port); yield (base URL, request log)."""
    log = RequestLog()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Path(root), log))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (ephemeral port); yield its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


# --------------------------------------------------------------------------------------------
# fault injection (tests/test_remote_faults.py)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """An exact answer: status, body, headers (e.g. an S3 XML error)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()


def s3_error(status: int, code: str, message: str) -> Reply:
    """An S3-style XML error answer (``SlowDown``, ``InternalError``, ``AccessDenied``...)."""
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
        f"<Message>{message}</Message><RequestId>ctzarr-test</RequestId></Error>"
    ).encode()
    return Reply(status, body, (("Content-Type", "application/xml"),))


#: What the fault server does with one request:
#:   an int            answer with that status and a short text body
#:   a Reply           answer exactly that
#:   "serve"           GET/HEAD: the file under the root (byte ranges honoured), 404 when
#:                     missing; other methods: 200 (204 for DELETE), the body discarded
#:   "truncate"        like "serve", but close the connection after half the body
#:   "hang"            read the request and never answer (until the server stops)
#:   "drop"            close the connection without an answer
FaultAction = int | Reply | str


@dataclass
class _Plan:
    actions: list[FaultAction]
    then: FaultAction


class FaultServer:
    """A ThreadingHTTPServer on 127.0.0.1 whose answers are planned per path prefix.

    ``plan(prefix, [503, 503], then="serve")`` answers the next two requests whose path starts
    with ``prefix`` with 503, then serves normally; ``method="PUT"`` limits a plan to one HTTP
    method. The longest matching prefix wins (a plan for the method before one for any method);
    paths with no plan are served from ``root`` (or get 404 without a root). Every request is
    logged in ``log`` as (method, path, range, status), the status being -1 for "hang", -2 for
    "drop" and -3 for "truncate".
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else None
        self.log = RequestLog()
        self._plans: dict[tuple[str, str | None], _Plan] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def plan(
        self,
        prefix: str,
        actions: list[FaultAction] | tuple[FaultAction, ...] = (),
        then: FaultAction = "serve",
        method: str | None = None,
    ) -> None:
        with self._lock:
            self._plans[(prefix, method)] = _Plan(list(actions), then)

    def reset(self) -> None:
        with self._lock:
            self._plans.clear()
        self.log.clear()

    def requests(self, prefix: str = "/") -> list[tuple[str, str, str | None, int]]:
        with self.log.lock:
            return [e for e in self.log.entries if e[1].startswith(prefix)]

    def _next_action(self, method: str, path: str) -> FaultAction:
        with self._lock:
            matches = [(p, m) for p, m in self._plans if path.startswith(p) and m in (None, method)]
            if not matches:
                return "serve"
            plan = self._plans[max(matches, key=lambda pm: (len(pm[0]), pm[1] is not None))]
            return plan.actions.pop(0) if plan.actions else plan.then

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _send(
                self,
                status: int,
                body: bytes,
                headers: tuple[tuple[str, str], ...] = (),
                head: bool = False,
                content_length: int | None = None,
            ) -> None:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header(
                    "Content-Length", str(len(body) if content_length is None else content_length)
                )
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _file_reply(self) -> tuple[int, bytes, tuple[tuple[str, str], ...]]:
                rel = self.path.split("?", 1)[0].lstrip("/")
                root = server.root.resolve() if server.root is not None else None
                path = (root / rel).resolve() if root is not None else None
                if (
                    path is None
                    or root is None
                    or (root not in path.parents and path != root)
                    or not path.is_file()
                ):
                    return 404, b"not found", ()
                data = path.read_bytes()
                size = len(data)
                rng = self.headers.get("Range")
                if not rng:
                    return 200, data, (("Accept-Ranges", "bytes"),)
                m = _RANGE.match(rng.strip())
                if not m or (m.group(1) == "" and m.group(2) == ""):
                    return 416, b"", (("Content-Range", f"bytes */{size}"),)
                if m.group(1) == "":
                    start, stop = max(size - int(m.group(2)), 0), size - 1
                else:
                    start = int(m.group(1))
                    stop = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                if start >= size or start > stop:
                    return 416, b"", (("Content-Range", f"bytes */{size}"),)
                return (
                    206,
                    data[start : stop + 1],
                    (("Content-Range", f"bytes {start}-{stop}/{size}"), ("Accept-Ranges", "bytes")),
                )

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)  # a PUT's body, so the client is not cut off mid-send
                head = self.command == "HEAD"
                action = server._next_action(self.command, self.path.split("?", 1)[0])
                rng = self.headers.get("Range")
                if action == "hang":
                    server.log.add(self.command, self.path, rng, -1)
                    server._stop.wait(60)
                    self.close_connection = True
                    return
                if action == "drop":
                    server.log.add(self.command, self.path, rng, -2)
                    self.close_connection = True
                    return
                if isinstance(action, Reply):
                    server.log.add(self.command, self.path, rng, action.status)
                    self._send(action.status, action.body, action.headers, head=head)
                    return
                if isinstance(action, int):
                    server.log.add(self.command, self.path, rng, action)
                    self._send(
                        action,
                        f"fault {action}".encode(),
                        (("Content-Type", "text/plain"),),
                        head=head,
                    )
                    return
                if self.command not in ("GET", "HEAD"):  # a write or delete: accepted, discarded
                    status = 204 if self.command == "DELETE" else 200
                    server.log.add(self.command, self.path, rng, status)
                    self._send(status, b"", (("ETag", '"ctzarr-test"'),))
                    return
                status, body, headers = self._file_reply()
                if action == "truncate" and status in (200, 206) and not head:
                    server.log.add(self.command, self.path, rng, -3)
                    self._send(status, body[: len(body) // 2], headers, content_length=len(body))
                    self.wfile.flush()
                    self.close_connection = True
                    return
                server.log.add(self.command, self.path, rng, status)
                self._send(status, body, headers, head=head)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle  # noqa: N815

        return Handler


@contextmanager
def fault_server(root: str | os.PathLike[str] | None = None) -> Iterator[FaultServer]:
    """A :class:`FaultServer` on 127.0.0.1 (ephemeral port), stopped afterwards."""
    server = FaultServer(root).start()
    try:
        yield server
    finally:
        server.stop()


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
