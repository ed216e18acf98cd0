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

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  head: bool = False) -> None:
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
                self._send(206, data[start : stop + 1], {"Content-Range": f"bytes {start}-{stop}/{size}",
                                                          "Accept-Ranges": "bytes"}, head=head)
                return
            log.add(self.command, self.path, None, 200)
            self._send(200, data, {"Accept-Ranges": "bytes"}, head=head)

        def do_GET(self) -> None:  # noqa: N802
            self._serve(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
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
