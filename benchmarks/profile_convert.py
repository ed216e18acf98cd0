"""Where the time of one ``ctzarr.convert`` goes, stage by stage.

Usage::

    python benchmarks/profile_convert.py [CASE_DIR] [--cprofile OUT.prof]

CASE_DIR is a DAP-layout directory (default ``bench-data/dap-400``, written by
``bench_convert.py``). The conversion runs in this process, once to warm numba's cache and the
page cache, then once measured. Timers are wrapped around ctzarr's internals at run time (the
package itself is not modified):

- ``inflate``: the main thread waiting for the next raw slab (``NiftiSource.iter_slabs``; the
  gzip stream is inflated by isal in a reader thread, which also feeds the sha256 digest);
- ``scale``: ``NiftiSource.scale`` of CT slabs, ``labels``: ``CaseWriter._as_labels``;
- ``index kernel``: ``LabelIndexBuilder.update`` (runs in a worker thread, overlapped with the
  writes), ``wait index``: the main thread blocked on it; ``index finish``: assembly at the end;
- ``downsample``: the 2x2x2 mean (CT) and nearest (mask) of the pyramid;
- ``write CT/mask level i``: ``CaseWriter._write_slab`` per level (ctzarr's shard encoder:
  blosc, crc32c, store, manifest digests; wall time of the writer threads, overlapped), and
  inside it ``encode shards`` (blosc + crc32c only); ``zarr write ...``: arrays zarr writes;
- ``write_index`` / ``header`` / ``commit`` / ``finalize``: metadata writes after the stream.

Wall-clock totals of the main thread add up to the ``convert()`` time up to "other"; the worker
thread's ``index kernel`` overlaps them and is shown for what it would cost alone.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()


class Timers:
    """Thread-aware accumulating timers."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            self.total[name] += seconds
            self.calls[name] += 1

    def wrap(self, name: str | Any, fn: Any) -> Any:
        """fn timed under name (or name(args) when name is callable)."""

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name(*args) if callable(name) else name, time.perf_counter() - t0)

        return timed


def instrument(t: Timers) -> None:
    """Wrap ctzarr's conversion stages with timers."""
    from ctzarr.sources import nifti
    from ctzarr.write import case_writer as writer
    from ctzarr.write import convert as conv
    from ctzarr.write import index_builder as label_index

    orig_iter = nifti.NiftiSource.iter_slabs

    def iter_slabs(self: Any, *args: Any, **kwargs: Any) -> Any:
        kind = "CT" if self.raw_dtype.itemsize > 1 else "mask"
        gen = orig_iter(self, *args, **kwargs)
        while True:
            t0 = time.perf_counter()
            try:
                item = next(gen)
            except StopIteration:
                t.add(f"inflate {kind}", time.perf_counter() - t0)
                return
            t.add(f"inflate {kind}", time.perf_counter() - t0)
            yield item

    nifti.NiftiSource.iter_slabs = iter_slabs
    nifti.NiftiSource.scale = t.wrap("scale CT", nifti.NiftiSource.scale)
    writer.CaseWriter._as_labels = t.wrap("labels (mask dtype)", writer.CaseWriter._as_labels)
    label_index.LabelIndexBuilder.update = t.wrap(
        "index kernel (worker thread)", label_index.LabelIndexBuilder.update
    )
    label_index.LabelIndexBuilder.finish = t.wrap(
        "index finish", label_index.LabelIndexBuilder.finish
    )
    writer.downsample_image = t.wrap("downsample CT (2x2x2 mean)", writer.downsample_image)
    writer.downsample_labels = t.wrap("downsample mask (nearest)", writer.downsample_labels)

    class TaggingPool(concurrent.futures.ThreadPoolExecutor):
        """The writer's index pool; its futures are marked so waits on them can be timed."""

        def submit(self, *args: Any, **kwargs: Any) -> Any:
            fut = super().submit(*args, **kwargs)
            fut.ctzarr_index = True  # type: ignore[attr-defined]
            return fut

    writer.ThreadPoolExecutor = TaggingPool
    orig_result = concurrent.futures.Future.result

    def result(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not getattr(self, "ctzarr_index", False):  # zarr's own sync() also waits on futures
            return orig_result(self, *args, **kwargs)
        t0 = time.perf_counter()
        try:
            return orig_result(self, *args, **kwargs)
        finally:
            t.add("wait index (main thread)", time.perf_counter() - t0)

    concurrent.futures.Future.result = result

    def level_of(arr: Any, key: Any, value: Any) -> str:
        name = arr.path.rsplit("/", 1)[-1]
        if not name.isdigit():
            return "zarr write, other arrays (index histogram, header, collection table)"
        return f"zarr write {'CT' if arr.dtype.itemsize > 1 else 'mask'} level {name}"

    import zarr

    zarr.Array.__setitem__ = t.wrap(level_of, zarr.Array.__setitem__)

    def slab_level(self: Any, arr: Any, z0: int, slab: Any) -> str:
        name = arr.path.rsplit("/", 1)[-1]
        return f"write {'CT' if arr.dtype.itemsize > 1 else 'mask'} level {name} (writer threads)"

    writer.CaseWriter._write_slab = t.wrap(slab_level, writer.CaseWriter._write_slab)
    writer.ShardEncoder.encode = t.wrap(
        "encode shards, blosc + crc32c (writer threads)", writer.ShardEncoder.encode
    )
    writer.CaseWriter.write = t.wrap("CaseWriter.write (stream total)", writer.CaseWriter.write)
    writer.CaseWriter.write_index = t.wrap("write_index", writer.CaseWriter.write_index)
    writer.CaseWriter.write_nifti_header = t.wrap(
        "write_nifti_header", writer.CaseWriter.write_nifti_header
    )
    writer.CaseWriter.commit = t.wrap("commit", writer.CaseWriter.commit)
    conv.finalize_collection = t.wrap("finalize_collection", conv.finalize_collection)
    conv.open_or_create_collection = t.wrap(
        "open_or_create_collection", conv.open_or_create_collection
    )
    conv.case_state = t.wrap("case_state", conv.case_state)
    conv.open_nifti = t.wrap("open_nifti (headers)", conv.open_nifti)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "case_dir", nargs="?", type=Path, default=HERE.parent.parent / "bench-data" / "dap-400"
    )
    ap.add_argument("--cprofile", type=Path, help="also write a cProfile dump (main thread only)")
    args = ap.parse_args()
    import ctzarr

    with tempfile.TemporaryDirectory(dir=args.case_dir.parent) as tmp:
        dest = Path(tmp) / "profile.zarr"
        ctzarr.convert(args.case_dir, dest, layout="dap_atlas", progress=False)  # warm-up
        shutil.rmtree(dest)
        t = Timers()
        instrument(t)
        prof = None
        if args.cprofile:
            import cProfile

            prof = cProfile.Profile()
            prof.enable()
        t0 = time.perf_counter()
        report = ctzarr.convert(args.case_dir, dest, layout="dap_atlas", progress=False)
        total = time.perf_counter() - t0
        if prof is not None:
            prof.disable()
            prof.dump_stats(args.cprofile)
        if not report.ok:
            sys.exit(f"conversion failed: {report}")

    stream = t.total.pop("CaseWriter.write (stream total)")
    t.calls.pop("CaseWriter.write (stream total)")
    kernel = t.total.pop("index kernel (worker thread)")
    kcalls = t.calls.pop("index kernel (worker thread)")
    main_thread = sum(t.total.values())
    print(f"convert() {total:.2f} s, of which the slab stream (CaseWriter.write) {stream:.2f} s\n")
    print("| stage (main thread) | seconds | share | calls |")
    print("|---|---|---|---|")
    for name, sec in sorted(t.total.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {sec:.3f} | {100 * sec / total:.0f} % | {t.calls[name]} |")
    other = total - main_thread
    print(
        f"| other (hashing source files, loop, metadata, ...) | {other:.3f} | {100 * other / total:.0f} % | |"
    )
    print(
        f"| *index kernel, worker thread (overlapped)* | *{kernel:.3f}* | *{100 * kernel / total:.0f} %* "
        f"| {kcalls} |"
    )


if __name__ == "__main__":
    main()
