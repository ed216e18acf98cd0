"""Conversion of a dataset into a collection store: one task per case, resumable.

A plain re-run resumes: complete cases whose source files are unchanged are skipped, leftovers
of interrupted cases are removed and redone, and a complete case whose source changed is an
error for that case unless ``overwrite=True``. One failing case never stops the others. With a
Dask client the cases run as tasks of the cluster runner (:mod:`ctzarr.run.cluster`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import CancelledError
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import zarr
from zarr.abc.store import Store

from ctzarr._version import __version__
from ctzarr.errors import (
    CaseExistsError,
    ClientGoneError,
    CtzarrError,
    LayoutError,
    StoreError,
)
from ctzarr.io.locks import case_lock, collection_lock
from ctzarr.io.stores import make_store
from ctzarr.io.transactions import (
    STAGING,
    case_state,
    discard_staged,
    remove_case,
    remove_staging,
    remove_temporary_files,
    swap_in,
)
from ctzarr.io.urls import check_no_secrets, is_remote
from ctzarr.model.attributes import FORMAT_VERSION
from ctzarr.model.case import CaseAttributes, NiftiBlock, SourceFile
from ctzarr.model.collection import CollectionAttributes, is_collection
from ctzarr.run import cluster
from ctzarr.sources.layouts import CaseSpec, DatasetSource, load_source
from ctzarr.sources.nifti import NiftiSource, check_same_grid, open_nifti
from ctzarr.sources.totalsegmentator import MaskStackSource, mask_role, open_mask_stack
from ctzarr.write.case_writer import CaseWriter, SegmentationSource
from ctzarr.write.table import seal_collection, update_collection_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseResult:
    """What happened to one case."""

    case_id: str
    status: str  # "converted", "skipped" or "failed"
    error: str | None = None
    seconds: float = 0.0


@dataclass
class ConversionReport:
    """Result of :func:`convert`: one :class:`CaseResult` per case."""

    dest: str
    results: list[CaseResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no case failed."""
        return not self.failed

    @property
    def converted(self) -> list[str]:
        return [r.case_id for r in self.results if r.status == "converted"]

    @property
    def skipped(self) -> list[str]:
        return [r.case_id for r in self.results if r.status == "skipped"]

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "failed"]

    def __str__(self) -> str:
        lines = [
            f"{self.dest}: {len(self.converted)} converted, {len(self.skipped)} skipped (unchanged), "
            f"{len(self.failed)} failed"
        ]
        lines += [f"  FAILED {r.case_id}: {r.error}" for r in self.failed]
        return "\n".join(lines)


def convert(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | Store,
    *,
    layout: str | None = None,
    cases: Sequence[str] | None = None,
    overwrite: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    client: Any = None,
    progress: bool = True,
    labels: Sequence[str] | str | None = None,
) -> ConversionReport:
    """Convert a dataset of NIfTI files into a ctzarr collection store.

    Parameters
    ----------
    source : str or path
        Dataset directory (or manifest CSV), local or fsspec URL.
    dest : str, path or zarr Store
        Collection store (``.zarr``), local or fsspec URL, or a store object (not with
        ``client``). Created if missing.
    layout : {"dap_atlas", "saros", "totalsegmentator", "pairs"}, optional
        Detected when omitted.
    cases : list of str, optional
        Convert only these case ids.
    overwrite : bool
        Replace complete cases whose source changed (otherwise such a case is an error).
    storage_options : dict, optional
        fsspec options for whichever of source and dest is a remote URL.
    client : dask.distributed.Client, optional
        Run one task per case on this cluster.
    progress : bool
        Show a progress bar.
    labels : str or list of str, optional
        Label map files (``FILE`` or ``NAME=FILE``), required for the ``pairs`` layout.

    Returns
    -------
    ConversionReport
        One result per case; ``report.ok`` is False when any case failed.
    """
    source = os.fspath(source)
    if isinstance(dest, Store):
        if client is not None:
            raise TypeError(
                "with a cluster, dest must be a path or URL (workers open it themselves), "
                "not a store object"
            )
        dest_store: Store | None = dest
        dest = str(dest)
    else:
        dest_store, dest = None, os.fspath(dest)
    so = dict(storage_options or {})
    if so and not (is_remote(source) or (dest_store is None and is_remote(dest))):
        raise TypeError("storage_options are only for remote URLs; source and dest are local")
    ds = load_source(
        source, layout=layout, labels=labels, storage_options=so if is_remote(source) else None
    )
    specs = list(ds.cases)
    if cases is not None:
        wanted = set(cases)
        unknown = sorted(wanted - {c.case_id for c in specs})
        if unknown:
            raise LayoutError(f"{source}: no such cases: {unknown}")
        specs = [c for c in specs if c.case_id in wanted]
    dest_so = so if dest_store is None and is_remote(dest) else None
    if client is not None:  # refuse credentials bound for a task graph before writing anything
        check_no_secrets(dest_so)
        check_no_secrets(ds.storage_options)
    root = open_or_create_collection(dest if dest_store is None else dest_store, ds, dest_so)
    report = ConversionReport(dest)
    run = uuid.uuid4().hex  # this conversion, in the case locks and the committed cases
    if client is not None:
        report.results.extend(
            convert_cases_on_cluster(client, ds, specs, dest, dest_so, overwrite, progress, run)
        )
    else:
        bar = _progress_bar(specs, progress)
        try:
            for spec in specs:
                report.results.append(
                    convert_case(
                        root,
                        ds,
                        spec,
                        overwrite=overwrite,
                        on_slices=bar.update if bar else None,
                        run=run,
                    )
                )
        finally:
            if bar:
                bar.close()
    with collection_lock(root.store, run):  # one update of the list and table at a time
        # skipped cases are already listed, unless a task of an earlier, interrupted run
        # committed them after that run had updated the list
        root = zarr.open_group(root.store, mode="r+", zarr_format=3)  # the list as it is now
        listed = set(CollectionAttributes.from_attributes(root.attrs.asdict(), str(dest)).cases)
        # temporary files a killed write left behind (never while another converter runs)
        for key in remove_temporary_files(root.store):
            logger.info("removed %s, left by an interrupted write", key)
        finalize_collection(
            root,
            changed=[
                r.case_id
                for r in report.results
                if r.status != "skipped" or r.case_id not in listed
            ],
        )
    return report


def _progress_bar(specs: Sequence[CaseSpec], enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm  # optional progress bars: imported only when shown

    return tqdm(total=len(specs), unit="case", desc="convert", leave=False)


def open_or_create_collection(
    dest: str | Store, ds: DatasetSource, storage_options: Mapping[str, Any] | None
) -> zarr.Group:
    """Open the collection at dest, creating it when absent; refuse foreign stores."""
    store = make_store(dest, storage_options=dict(storage_options) if storage_options else None)
    try:
        root = zarr.open_group(store, mode="r+", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        root = None
    if root is None:
        created = seal_collection(
            CollectionAttributes(
                dataset_id=ds.dataset_id,
                layout=ds.layout,
                segmentations=dict(ds.label_maps),
                sparse=dict(ds.sparse),
                cases=(),
                writer=f"ctzarr {__version__}",
                format_version=FORMAT_VERSION,
            )
        )
        attributes = created.to_attributes()
        try:
            # one write: the root zarr.json is born with its attributes (a fault between a
            # bare group and its attributes would leave a store no later run accepts)
            root = zarr.open_group(store, mode="w-", zarr_format=3, attributes=attributes)
        except (FileExistsError, zarr.errors.ContainsGroupError):
            # another converter created it meanwhile: use theirs (checked below)
            root = zarr.open_group(store, mode="r+", zarr_format=3)
        else:
            # the OME series (the case list for OME-Zarr readers) is written with the case list,
            # under the collection lock, by the end of this run (finalize_collection): written
            # here it could overwrite a concurrent converter's newer list with this empty one
            root.require_group("cases")
            return root
    attributes_found = root.attrs.asdict()
    if not is_collection(attributes_found):
        raise StoreError(f"{dest}: exists and is not a ctzarr collection")
    meta = CollectionAttributes.from_attributes(attributes_found, str(dest))
    if meta.dataset_id != ds.dataset_id or set(meta.segmentations) != set(ds.label_maps):
        raise StoreError(
            f"{dest}: holds dataset {meta.dataset_id!r} with segmentations "
            f"{sorted(meta.segmentations)}, not {ds.dataset_id!r} with {sorted(ds.label_maps)}"
        )
    return root


def file_record(path: str, storage_options: Mapping[str, Any]) -> SourceFile:
    """Size and modification time of a source file (cheap fingerprint before hashing)."""
    fs, p = fsspec.core.url_to_fs(path, **storage_options)
    info = fs.info(p)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return SourceFile(path, int(info["size"]), float(mtime) if mtime is not None else None)


def source_files(ds: DatasetSource, spec: CaseSpec) -> dict[str, SourceFile]:
    """The source files of a case as they are now, by role, paths as the dataset names them."""
    so = dict(ds.storage_options)
    files = {"image": file_record(spec.image, so)}
    for seg, path in spec.segmentations.items():
        files[seg] = file_record(path, so)
    for seg, masks in spec.masks.items():  # every mask file: a changed mask re-converts
        for filename, path in masks.items():
            files[mask_role(seg, filename)] = file_record(path, so)
    return files


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    return path[len(root) :] if path.startswith(root) else posixpath.basename(path)


def file_sha256(path: str, storage_options: Mapping[str, Any]) -> str:
    """sha256 of a source file, read with the source's storage options."""
    h = hashlib.sha256()
    with fsspec.open(path, "rb", **storage_options) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def same_source(
    old: Mapping[str, SourceFile],
    new: Mapping[str, SourceFile],
    storage_options: Mapping[str, Any],
) -> bool:
    """True when every file has the same size and mtime (or, failing mtime, the same digest).

    ``new`` holds the files as they are now (paths as the dataset names them, opened with
    ``storage_options``); ``old`` the records of the committed case.
    """
    if set(old) != set(new):
        return False
    for role, rec in new.items():
        prev = old[role]
        if prev.size != rec.size:
            return False
        changed = rec.mtime is None or prev.mtime != rec.mtime
        if changed and file_sha256(rec.path, storage_options) != prev.sha256:
            return False
    return True


def convert_case(
    root: zarr.Group,
    ds: DatasetSource,
    spec: CaseSpec,
    *,
    overwrite: bool = False,
    on_slices: Callable[[int], Any] | None = None,
    run: str | None = None,
) -> CaseResult:
    """Convert one case; never raises for bad input (the result says what failed).

    The case's lock is held throughout (one writer per case; ``run`` identifies this
    conversion so a rerun of its own task may take over the lock of a dead worker).
    """
    t0 = time.perf_counter()
    cid = spec.case_id
    try:
        files = source_files(ds, spec)
        with case_lock(root.store, cid, run) as lock:
            remove_staging(root, cid)  # leftovers of an interrupted replacement
            state, meta = case_state(root, cid)
            if state == "complete":
                old = meta.source_files if meta is not None else {}
                if same_source(old, files, ds.storage_options):
                    if run is not None and meta is not None and meta.run == run:
                        # committed by an earlier attempt of this run (its worker died after
                        # the commit): converted by this run, not found unchanged
                        return CaseResult(cid, "converted", seconds=time.perf_counter() - t0)
                    logger.info("case %s: unchanged, skipped", cid)
                    return CaseResult(cid, "skipped", seconds=time.perf_counter() - t0)
                if not overwrite:
                    raise CaseExistsError(
                        f"case {cid!r}: already in the store from different source files; pass --overwrite to replace it"
                    )
            elif state != "absent":
                remove_case(root, cid)
            # A replacement is built beside the committed case, which stays readable until the
            # new one is complete and swapped in.
            staged = f"{STAGING}/{cid}-{lock.token[:12]}" if state == "complete" else None
            so = dict(ds.storage_options)
            image = open_nifti(spec.image, case_id=cid, storage_options=so)
            segs = []
            for name, path in spec.segmentations.items():
                src = open_nifti(path, case_id=cid, storage_options=so)
                check_same_grid(cid, image, src)
                segs.append(
                    SegmentationSource(name, src, ds.label_maps[name], ds.sparse.get(name, False))
                )
            for name, masks in spec.masks.items():  # one binary mask per structure, merged
                stack = open_mask_stack(cid, name, ds.label_maps[name], masks, so, reference=image)
                segs.append(SegmentationSource(name, stack, ds.label_maps[name]))
            writer = CaseWriter(root, cid, image, segs, prefix=staged)
            try:
                writer.write()
                writer.write_index()
                digests = dict(writer.digests)
                for seg in segs:
                    if isinstance(seg.source, MaskStackSource):
                        digests.update(seg.source.file_digests)
                stored_files = {
                    role: replace(rec, path=_relative(rec.path, ds.root), sha256=digests[role])
                    for role, rec in files.items()
                }
                lock.check()
                writer.commit(case_attributes(spec, image, segs, stored_files, run))
                if staged:
                    swap_in(root, staged, cid)
            except BaseException:
                try:
                    if staged:
                        discard_staged(root, staged)
                    else:
                        remove_case(root, cid)
                except Exception:  # never hide the original fault behind a cleanup failure
                    logger.exception("case %s: could not remove the partial case", cid)
                raise
        if on_slices:
            on_slices(1)
        return CaseResult(cid, "converted", seconds=time.perf_counter() - t0)
    except (CtzarrError, OSError, ValueError, EOFError) as exc:
        logger.warning("case %s failed: %s", cid, exc)
        if on_slices:
            on_slices(1)
        return CaseResult(cid, "failed", error=str(exc), seconds=time.perf_counter() - t0)


def nifti_block(image: NiftiSource) -> NiftiBlock:
    """What a case keeps of its image's NIfTI header."""
    return NiftiBlock(
        version=image.nifti_version,
        raw_dtype=image.raw_dtype.newbyteorder("="),
        source_byteorder="big" if image.raw_dtype.byteorder == ">" else "little",
        value_dtype=image.value_dtype,
        scl_slope=image.slope,
        scl_inter=image.inter,
        qform_code=image.qform_code,
        sform_code=image.sform_code,
        notes=tuple(image.notes),
    )


def case_attributes(
    spec: CaseSpec,
    image: NiftiSource,
    segs: Iterable[SegmentationSource],
    files: Mapping[str, SourceFile],
    run: str | None = None,
) -> CaseAttributes:
    """The attributes of a case before its commit (the writer adds manifest and marker)."""
    segs = list(segs)
    # provenance: what was assumed or warned while reading each file (e.g. a pixdim that
    # contradicts the affine); a segmentation's notes carry its name
    notes = (*image.notes, *(f"segmentation {s.name!r}: {n}" for s in segs for n in s.source.notes))
    return CaseAttributes(
        case_id=spec.case_id,
        shape_zyx=image.shape_zyx,
        spacing_zyx=image.spacing_zyx,
        affine=tuple(tuple(row) for row in image.affine.tolist()),
        nifti=replace(nifti_block(image), notes=notes),
        segmentations=tuple(s.name for s in segs),
        attributes=dict(spec.attributes),
        source_files=dict(files),
        run=run,
        format_version=FORMAT_VERSION,
    )


def finalize_collection(root: zarr.Group, changed: Iterable[str] | None = None) -> list[str]:
    """Update the collection's case list and table (all cases, or only those that changed)."""

    return update_collection_table(root, changed)


#: at most this many cases that ended in ``KilledWorker`` are run again, one at a time; beyond
#: that the workers are too small for the cases, not unlucky
SOLO_RETRY_LIMIT = 8


def _convert_task(
    spec: Any, ds: Any, dest: str, dest_options: dict[str, Any], overwrite: bool, run: str | None
) -> Any:
    """Worker side: open the store from its URL and convert one case."""
    store = make_store(dest, storage_options=dest_options or None)
    root = zarr.open_group(store, mode="r+", zarr_format=3)
    return convert_case(root, ds, spec, overwrite=overwrite, run=run)


def _worker_died_message(exc: BaseException, alone: BaseException | None) -> str:
    """One line for a case whose task kept killing the workers that ran it."""
    attempts = getattr(exc, "allowed_failures", None)
    tries = f"{attempts + 1} times" if isinstance(attempts, int) else "repeatedly"
    limit = (
        f" (distributed.scheduler.allowed-failures = {attempts})" if attempts is not None else ""
    )
    if alone is not None:
        first = getattr(alone, "allowed_failures", None)
        before = f"{first + 1} times beside other cases, then " if isinstance(first, int) else ""
        tries = f"{before}{tries} when run alone"
    return (
        f"worker died: the worker process converting this case died {tries}{limit}; "
        "usually out of memory or a crash in native code (see the worker logs). "
        "Nothing of the case was committed"
    )


def convert_cases_on_cluster(
    client: Any,
    ds: Any,
    specs: Sequence[Any],
    dest: str,
    dest_options: Mapping[str, Any] | None,
    overwrite: bool,
    progress: bool,
    run: str | None = None,
) -> list[Any]:
    """Convert cases as one task each; a task that keeps killing workers fails its case only.

    Returns one :class:`~ctzarr.convert.CaseResult` per spec, in order. Never raises for a
    case: bad input, a task that kills its workers and a lost client or scheduler each end as
    a failed result naming what happened.
    """
    dest_opts = check_no_secrets(dest_options)
    ds = replace(ds, storage_options=check_no_secrets(ds.storage_options))
    killed_worker = cluster.killed_worker_type()

    def submit(spec: Any) -> Any:
        return client.submit(
            _convert_task,
            spec,
            ds,
            dest,
            dest_opts,
            overwrite,
            run,
            pure=False,
            key=f"ctzarr-convert-{spec.case_id}-{uuid.uuid4().hex}",
        )

    futures = {submit(spec): spec.case_id for spec in specs}
    bar = None
    if progress:
        from tqdm.auto import tqdm  # optional progress bars: imported only when shown

        bar = tqdm(total=len(futures), unit="case", desc="convert (cluster)", leave=False)
    outcomes: dict[str, Any] = {}  # a CaseResult, or the exception the future raised
    try:
        for fut in cluster.completed(client, list(futures)):
            outcomes[futures[fut]] = cluster.outcome(fut)
            if bar:
                bar.update(1)
    except ClientGoneError as exc:
        for cid in futures.values():
            outcomes.setdefault(cid, exc)
    finally:
        if bar:
            bar.close()

    # A worker's death counts against every task it held, the one running and those queued
    # behind it: with several KilledWorker cases some may be innocent. Run each once more,
    # alone, so that only a case that kills workers by itself fails.
    killed = [s.case_id for s in specs if isinstance(outcomes[s.case_id], killed_worker)]
    first_try: dict[str, BaseException] = {}
    if 2 <= len(killed) <= SOLO_RETRY_LIMIT:
        spec_of = {s.case_id: s for s in specs}
        for cid in killed:
            logger.warning("case %s: its worker died; running it again alone", cid)
            first_try[cid] = outcomes[cid]
            try:
                fut = submit(spec_of[cid])
                outcomes[cid] = cluster.outcome(next(cluster.completed(client, [fut])))
            except (ClientGoneError, RuntimeError) as exc:  # the client closed meanwhile
                outcomes[cid] = exc
    elif len(killed) > SOLO_RETRY_LIMIT:
        logger.warning(
            "%d cases ended with their workers dying; not retrying them one by one", len(killed)
        )
    root = None
    results = []
    for spec in specs:
        result = outcomes[spec.case_id]
        if not isinstance(result, BaseException):
            results.append(result)
            continue
        if root is None:
            root = _open_dest(dest, dest_opts)
        gone = client.status not in cluster.LIVE_CLIENT
        results.append(_failed_case(root, ds, spec, result, first_try.get(spec.case_id), gone))
    return results


def _open_dest(dest: str, options: Mapping[str, Any]) -> Any:
    store = make_store(dest, storage_options=dict(options) or None)
    return zarr.open_group(store, mode="r+", zarr_format=3)


def _committed_from(ds: Any, spec: Any, meta: CaseAttributes | None) -> bool:
    """True when the committed case was made from the case's current source files."""
    try:
        files = source_files(ds, spec)
        old = meta.source_files if meta is not None else {}
        return same_source(old, files, ds.storage_options)
    except Exception:  # a source file gone or unreadable: not provably the same
        logger.debug("case %s: could not compare its source files", spec.case_id, exc_info=True)
        return False


def _failed_case(
    root: Any,
    ds: Any,
    spec: Any,
    exc: BaseException,
    first_try: BaseException | None,
    client_gone: bool = False,
) -> Any:
    """The result of a case whose task raised on the cluster; removes what dead workers left.

    convert_case reports bad input in its result, so an exception here is the cluster's: a
    worker died, the client or scheduler went away, no worker was left. The task may have got
    past its commit first; a case committed whole from the current source is converted.
    """
    cid = spec.case_id
    killed = isinstance(exc, cluster.killed_worker_type())
    state, meta = case_state(root, cid)
    if state == "complete" and _committed_from(ds, spec, meta):
        logger.warning("case %s: committed whole before its task was lost (%s)", cid, exc)
        return CaseResult(cid, "converted")
    if killed and state == "partial":
        # every worker that ran it is dead: nothing writes there any more
        try:
            remove_case(root, cid)
        except Exception:  # the next run removes it anyway
            logger.exception("case %s: could not remove the partial case", cid)
    if killed:
        error = _worker_died_message(exc, first_try)
    elif isinstance(exc, (CancelledError, ClientGoneError)) or client_gone:
        # a task still running may yet commit the case whole; a re-run skips or redoes it
        reason = getattr(exc, "reason", None)
        why = f" (dask: {reason})" if reason and reason != "unknown" else ""
        error = (
            "not finished: the dask client or scheduler went away while the case was queued "
            f"or running{why}; re-run to resume"
        )
    else:
        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    logger.warning("case %s failed on the cluster: %s", cid, error)
    return CaseResult(cid, "failed", error=error)
