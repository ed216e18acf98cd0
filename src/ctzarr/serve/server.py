"""Running the app: the bind policy, the token file, uvicorn, the ready line, SIGTERM.

The service binds 127.0.0.1 unless told otherwise, and any other address only with a token
(``--token-file``) or an explicit ``--no-auth``: a store of patient images must not become
readable by a whole network by a typo. Once the socket listens, one line goes to stdout,
``ctzarr: serving N collection(s) at http://HOST:PORT/`` (the real port when 0 was asked). On
SIGTERM or SIGINT uvicorn stops accepting, lets requests in flight finish for at most
:data:`DRAIN_S` seconds, and the process exits.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from ctzarr.errors import ConfigError
from ctzarr.serve.neuroglancer import stop_neuroglancer

__all__ = ["DRAIN_S", "check_bind", "read_token_file", "serve"]

logger = logging.getLogger(__name__)

#: longest wait for requests in flight after SIGTERM (the process exits within 5 s)
DRAIN_S = 3


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, *, token: str | None, no_auth: bool) -> None:
    """Refuse a non-loopback address without a token or ``--no-auth``.

    Raises
    ------
    ConfigError
        The address is not loopback and the service would answer anyone, or both a token and
        ``--no-auth`` were given.
    """
    if token is not None and no_auth:
        raise ConfigError("--token-file and --no-auth contradict each other; give one")
    if not is_loopback(host) and token is None and not no_auth:
        raise ConfigError(
            f"--host {host}: binding an address other than 127.0.0.1 needs --token-file FILE "
            "(clients send 'Authorization: Bearer TOKEN') or an explicit --no-auth"
        )


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in a file, surrounding whitespace stripped.

    Raises
    ------
    ConfigError
        The file cannot be read or holds no token.
    """
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--token-file {os.fspath(path)}: cannot read it ({exc})") from None
    if not token:
        raise ConfigError(f"--token-file {os.fspath(path)}: the file holds no token")
    return token


class _Server(uvicorn.Server):
    """uvicorn's server, printing the ready line once it listens."""

    def __init__(self, config: uvicorn.Config, collections: int) -> None:
        super().__init__(config)
        self.collections = collections

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        bound = self.servers[0].sockets[0].getsockname()
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        print(
            f"ctzarr: serving {self.collections} collection(s) at http://{shown}:{bound[1]}/",
            flush=True,
        )


def serve(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    no_auth: bool = False,
    log_level: str = "warning",
    **uvicorn_options: Any,
) -> None:
    """Run ``app`` (from :func:`ctzarr.serve.create_app`) until SIGTERM or SIGINT.

    ``token`` must be the one the app was created with; it only decides whether a non-loopback
    ``host`` is allowed (see :func:`check_bind`).
    """
    check_bind(host, token=token, no_auth=no_auth)
    collections = len(app.state.service.collections)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=DRAIN_S,
        lifespan="off",
        server_header=False,
        **uvicorn_options,
    )
    server = _Server(config, collections)
    _check_listen(host, port)
    try:
        server.run()
    finally:
        stop_neuroglancer()  # its server thread, if a viewer was opened
    sys.stdout.flush()


def _check_listen(host: str, port: int) -> None:
    """Raise one clear error when the address cannot be bound (uvicorn would only log it).

    The probe socket is closed again and uvicorn binds its own: handing uvicorn a bound socket
    made /zarr transfers ~40 % slower in benchmarks/bench_serve.py (not understood yet).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host.strip("[]"), port))
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({reason})") from None
