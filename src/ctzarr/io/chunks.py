"""Reading a box of a sharded array by decoding its inner chunks directly.

A crop of a kidney touches 8 inner chunks of 64^3; through zarr-python every read pays its
selection machinery, codec-pipeline set-up and event loop (2-4 ms per array above the decode
itself, benchmarks/QUERY.md), and our strict checks read the same bytes once more before it.
Here the bytes are read once (:class:`~ctzarr.io.strict.CheckedArray` checks them: crc32c,
blosc header against the chunk size, format-2 digest), decoded with numcodecs' blosc straight
into a preallocated buffer, and the overlap copied into the output. Why by hand: no library
decodes a box from already-fetched, already-checked inner-chunk bytes — zarr-python, zarrs and
TensorStore all fetch the bytes themselves, which would bypass (or repeat) the checks.

This module knows geometry and codecs only; every integrity check lives in
:mod:`ctzarr.io.strict`, which calls it.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from numcodecs import blosc

#: inner chunks decoded in parallel when a read needs at least this many (blosc releases the
#: GIL; below it, the hand-off to the pool costs more than it saves)
PARALLEL_MIN_CHUNKS = 2

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()
_POOL_PREFIX = "ctzarr-decode"
_MAX_WORKERS = 8


def _forget_pool() -> None:
    """In a forked child the parent's pool threads do not exist: start a new pool there."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    """The process's decode pool (created on first use; one thread per core, at most 8)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_MAX_WORKERS, thread_name_prefix=_POOL_PREFIX)
        return _pool


@dataclass(frozen=True)
class InnerRead:
    """One inner chunk a box needs: where it is stored and where its overlap goes."""

    key: str  # the stored object ("c/i/j/k")
    inner: int  # flat index of the chunk in its shard (0 when unsharded)
    source: tuple[slice, ...]  # the overlap, in the decoded chunk
    target: tuple[slice, ...]  # the overlap, in the output


def box_of(selection: Any, shape: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
    """``selection`` as per-axis ``[start, stop)`` when it is a box (ints and unit-step slices,
    each axis at most once), else None. An int keeps its axis here (the caller drops it)."""
    sel = selection if isinstance(selection, tuple) else (selection,)
    if len(sel) > len(shape) or any(k is Ellipsis or k is None for k in sel):
        return None
    sel = sel + (slice(None),) * (len(shape) - len(sel))
    out = []
    for k, n in zip(sel, shape, strict=True):
        if isinstance(k, slice):
            start, stop, step = k.indices(n)
            if step != 1:
                return None
            out.append((start, max(start, stop)))
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k)
            if not -n <= i < n:
                return None  # let the caller raise its IndexError
            i %= n
            out.append((i, i + 1))
        else:
            return None
    return tuple(out)


def squeeze_ints(selection: Any, ndim: int) -> tuple[Any, ...]:
    """The index that drops the axes ``selection`` picks with an int (numpy semantics)."""
    sel = selection if isinstance(selection, tuple) else (selection,)
    sel = sel + (slice(None),) * (ndim - len(sel))
    return tuple(0 if isinstance(k, (int, np.integer)) else slice(None) for k in sel)


def plan(
    box: Sequence[tuple[int, int]],
    grid: Sequence[int],
    inner: Sequence[int],
) -> dict[str, list[InnerRead]]:
    """The inner chunks a box touches, by stored object, with their overlaps."""
    out: dict[str, list[InnerRead]] = {}
    if any(stop <= start for start, stop in box):
        return out
    per_shard = [g // c for g, c in zip(grid, inner, strict=True)]
    axes = [
        range(start // c, (stop - 1) // c + 1) for (start, stop), c in zip(box, inner, strict=True)
    ]
    for idx in itertools.product(*axes):  # global inner-chunk coordinates
        shard = [i // p for i, p in zip(idx, per_shard, strict=True)]
        local = [i % p for i, p in zip(idx, per_shard, strict=True)]
        flat = 0
        for j, p in zip(local, per_shard, strict=True):
            flat = flat * p + j
        source, target = [], []
        for i, c, (start, stop) in zip(idx, inner, box, strict=True):
            lo, hi = max(start, i * c), min(stop, (i + 1) * c)
            source.append(slice(lo - i * c, hi - i * c))
            target.append(slice(lo - start, hi - start))
        key = "c/" + "/".join(map(str, shard))
        out.setdefault(key, []).append(InnerRead(key, flat, tuple(source), tuple(target)))
    return out


def _blosc_getitem() -> Callable[..., int] | None:
    """c-blosc's ``blosc_getitem`` (decode a range of items of a frame: only the blocks that
    hold them), from the extension numcodecs already loaded; None when it is not exported.

    Why by hand: numcodecs 0.17 dropped its Python binding (``decompress_partial``), and a crop
    needs a third to a half of the z-slabs of each inner chunk it touches; a frame's blocks are
    z-slabs (64^3 int16: 4 blocks of 16 slices), so decoding only those halves the work.
    """
    try:
        lib = ctypes.CDLL(blosc.__file__)
        fn = lib.blosc_getitem
    except (OSError, AttributeError):  # pragma: no cover - a numcodecs build without it
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return cast("Callable[..., int]", fn)


_GETITEM = _blosc_getitem()

#: decode only the needed items when they are at most this fraction of the chunk
PARTIAL_MAX_FRACTION = 0.75


def decode(
    chunk: bytes,
    blosc_frame: bool,
    stored: np.dtype[Any],
    shape: Sequence[int],
    source: Sequence[slice] | None = None,
) -> np.ndarray:
    """One checked inner chunk (``chunk``: its stored bytes, crc32c trailer included) as an
    array of ``shape``; with ``source``, only the region ``source`` of it is guaranteed decoded
    (blosc frames: the items from its first to its last element, see :func:`_blosc_getitem`).

    The caller has checked the blosc header against the chunk size: the buffer allocated here is
    exactly one chunk, whatever the frame declares.
    """
    n_items = int(np.prod(shape))
    if not blosc_frame:
        return np.frombuffer(chunk, dtype=stored, count=n_items).reshape(shape)
    out = np.empty(n_items * stored.itemsize, dtype=np.uint8)
    lo, hi = 0, n_items
    if source is not None and _GETITEM is not None:
        first = [sl.start for sl in source]
        last = [sl.stop - 1 for sl in source]
        lo = int(np.ravel_multi_index(first, shape))
        hi = int(np.ravel_multi_index(last, shape)) + 1
    if hi - lo <= PARTIAL_MAX_FRACTION * n_items:
        assert _GETITEM is not None
        got = _GETITEM(chunk, lo, hi - lo, out.ctypes.data + lo * stored.itemsize)
        if got != (hi - lo) * stored.itemsize:
            raise ValueError(f"blosc_getitem returned {got}")
    else:
        blosc.decompress(memoryview(chunk)[:-4], out)
    return out.view(stored).reshape(shape)


def fill(shape: Sequence[int], dtype: np.dtype[Any], fill_value: Any) -> np.ndarray:
    """The output of a read, filled with the array's fill value."""
    if fill_value is None or fill_value == 0:
        return np.zeros(tuple(shape), dtype=dtype)
    return np.full(tuple(shape), fill_value, dtype=dtype)


def run(tasks: Sequence[Callable[[], None]]) -> None:
    """Run decode-and-copy tasks, in parallel when there are enough of them.

    The tasks are dealt into one batch per core; the calling thread runs the first batch
    itself, the pool the others (one hand-off per core, not one per chunk: on a busy machine
    each hand-off can wait for a time slice).
    """
    workers = min(len(tasks), os.cpu_count() or 1, _MAX_WORKERS)
    if (
        len(tasks) < PARALLEL_MIN_CHUNKS
        or workers < 2
        or threading.current_thread().name.startswith(_POOL_PREFIX)  # never wait on our own pool
    ):
        for task in tasks:
            task()
        return
    batches = [tasks[i::workers] for i in range(workers)]
    futures = [_executor().submit(_run_all, batch) for batch in batches[1:]]
    try:
        _run_all(batches[0])
    finally:
        wait(futures)  # never leave tasks writing into an output the caller has dropped
    for fut in futures:
        fut.result()  # re-raises a pool batch's failure


def _run_all(tasks: Sequence[Callable[[], None]]) -> None:
    for task in tasks:
        task()
