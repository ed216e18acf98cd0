"""Where the data lives: one function turns a path, URL or store into a zarr store."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

__all__ = ["codec_pipeline", "compact_json", "make_store"]

#: zarr-python's Rust codec pipeline (PyPI ``zarrs``): reads 2-3x faster than the default
#: pipeline on sharded arrays (benchmarks/README.md). Arrays bind their pipeline when they are
#: opened, so the setting is applied around our own opens only, never to the user's zarr config.
_ZARRS_PIPELINE = "zarrs.ZarrsCodecPipeline"


@contextlib.contextmanager
def codec_pipeline(store: Store | None = None) -> Iterator[None]:
    """Open arrays inside this block to give them the fast codec pipeline.

    Only for local stores: with fsspec's HTTP filesystem the Rust pipeline deadlocks on
    zarr-python's event loop (observed with zarrs 0.2.3), and remote reads are bound by
    requests, not decoding.
    """
    try:
        import zarrs  # noqa: F401
    except ImportError:  # pragma: no cover - zarrs is a dependency, but stay usable without it
        yield
        return
    if store is not None and not isinstance(store, LocalStore):
        yield
        return
    with zarr.config.set({"codec_pipeline.path": _ZARRS_PIPELINE}):
        yield


@contextlib.contextmanager
def compact_json() -> Iterator[None]:
    """Write zarr.json documents without indentation.

    A case's consolidated zarr.json shrinks from 170 KB to 46 KB and opens in 7 ms instead of
    11 ms (it is read by every crop and every statistics call).
    """
    with zarr.config.set({"json_indent": None}):
        yield


def is_remote(url: str) -> bool:
    """True for fsspec URLs other than plain local files."""
    return "://" in url and not url.startswith("file://")


def make_store(
    url_or_store: str | os.PathLike[str] | Store,
    *,
    storage_options: dict[str, Any] | None = None,
    read_only: bool = False,
) -> Store:
    """Return the zarr store for a local path, an fsspec URL or an existing store.

    Parameters
    ----------
    url_or_store : str, path or zarr Store
        ``/data/dap.zarr``, ``s3://bucket/dap.zarr``, ``https://host/dap.zarr``,
        ``memory://dap.zarr``, or a store object (returned as is).
    storage_options : dict, optional
        fsspec options, for remote URLs only.
    read_only : bool
        Open read-only.

    Raises
    ------
    TypeError
        When ``storage_options`` are given for a local path or a store object: they would be
        silently ignored.
    """
    if isinstance(url_or_store, Store):
        if storage_options:
            raise TypeError("storage_options are only for URLs, not for store objects")
        return url_or_store
    url = os.fspath(url_or_store)
    if is_remote(url):
        return FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=read_only)
    if storage_options:
        raise TypeError(f"storage_options are only for remote URLs, not for the local path {url!r}")
    if url.startswith("file://"):
        url = url[len("file://") :]
    return LocalStore(url, read_only=read_only)
