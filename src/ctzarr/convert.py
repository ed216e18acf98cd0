"""Conversion of a dataset into a collection store: one task per case, resumable.

A plain re-run resumes: complete cases whose source files are unchanged are skipped, leftovers
of interrupted cases are removed and redone, and a complete case whose source changed is an
error for that case unless ``overwrite=True``. One failing case never stops the others.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.storage import LocalStore

from . import __version__
from .errors import CaseExistsError, CaseMismatchError, CtzarrError, LayoutError, StoreError
from .layouts import CaseSpec, DatasetSource, load_source
from .locks import case_lock, collection_lock, unwrap_store
from .nifti import NiftiSource, open_nifti
from .storage import is_remote, make_store, read_key, write_key
from .writer import FORMAT_VERSION, CaseWriter, SegmentationSource

__all__ = ["AFFINE_TOLERANCE_MM", "CaseResult", "ConversionReport", "convert"]

logger = logging.getLogger(__name__)

#: image and segmentation grids match when their voxel corners lie within this distance
AFFINE_TOLERANCE_MM = 1e-3


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
    layout : {"dap_atlas", "saros", "pairs"}, optional
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
        from .distributed import check_no_secrets

        check_no_secrets(dest_so)
        check_no_secrets(ds.storage_options)
    root = open_or_create_collection(dest if dest_store is None else dest_store, ds, dest_so)
    report = ConversionReport(dest)
    run = uuid.uuid4().hex  # this conversion, in the case locks and the committed cases
    if client is not None:
        from .distributed import convert_cases_on_cluster

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
        listed = set(root.attrs["ctzarr"].get("cases", ()))
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
    from tqdm.auto import tqdm

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
        attributes = {
            "ctzarr": {
                "kind": "collection",
                "format_version": FORMAT_VERSION,
                "dataset_id": ds.dataset_id,
                "layout": ds.layout,
                "segmentations": {k: v.to_dict() for k, v in ds.label_maps.items()},
                "sparse": dict(ds.sparse),
                "cases": [],
                "writer": f"ctzarr {__version__}",
            }
        }
        try:
            # one write: the root zarr.json is born with its attributes (a fault between a
            # bare group and its attributes would leave a store no later run accepts)
            root = zarr.open_group(store, mode="w-", zarr_format=3, attributes=attributes)
        except (FileExistsError, zarr.errors.ContainsGroupError):
            # another converter created it meanwhile: use theirs (checked below)
            root = zarr.open_group(store, mode="r+", zarr_format=3)
        else:
            root.require_group("cases")
            return root
    meta = root.attrs.get("ctzarr")
    if not isinstance(meta, dict) or meta.get("kind") != "collection":
        raise StoreError(f"{dest}: exists and is not a ctzarr collection")
    if meta.get("dataset_id") != ds.dataset_id or set(meta.get("segmentations", {})) != set(
        ds.label_maps
    ):
        raise StoreError(
            f"{dest}: holds dataset {meta.get('dataset_id')!r} with segmentations "
            f"{sorted(meta.get('segmentations', {}))}, not {ds.dataset_id!r} with {sorted(ds.label_maps)}"
        )
    return root


def _file_record(path: str, storage_options: Mapping[str, Any]) -> dict[str, Any]:
    """Size and modification time of a source file (cheap fingerprint before hashing)."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(path, **storage_options)
    info = fs.info(p)
    mtime = info.get("mtime") or info.get("LastModified") or info.get("last_modified")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return {
        "path": path,
        "size": int(info["size"]),
        "mtime": float(mtime) if mtime is not None else None,
    }


def _source_files(ds: DatasetSource, spec: CaseSpec) -> dict[str, dict[str, Any]]:
    so = dict(ds.storage_options)
    files = {"image": _file_record(spec.image, so)}
    for seg, path in spec.segmentations.items():
        files[seg] = _file_record(path, so)
    return files


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/") + "/"
    return path[len(root) :] if path.startswith(root) else posixpath.basename(path)


def _same_source(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """True when every file has the same size and mtime (or, failing mtime, the same digest)."""
    if set(old) != set(new):
        return False
    for role, rec in new.items():
        prev = old[role]
        if prev.get("size") != rec["size"]:
            return False
        if rec["mtime"] is None or prev.get("mtime") != rec["mtime"]:
            import hashlib

            import fsspec

            h = hashlib.sha256()
            with fsspec.open(rec["abs_path"], "rb") as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            if h.hexdigest() != prev.get("sha256"):
                return False
    return True


def case_state(root: zarr.Group, case_id: str) -> tuple[str, dict[str, Any] | None]:
    """("absent" | "partial" | "complete", ctzarr attributes) of a case in the store."""
    try:
        grp = zarr.open_group(root.store, path=f"cases/{case_id}", mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        if sync(root.store.exists(f"cases/{case_id}/0/zarr.json")) or _has_keys(
            root, f"cases/{case_id}/"
        ):
            return "partial", None
        return "absent", None
    meta = grp.attrs.get("ctzarr")
    if isinstance(meta, dict) and meta.get("complete") is True:
        return "complete", meta
    return "partial", None


def _has_keys(root: zarr.Group, prefix: str) -> bool:
    async def first() -> bool:
        async for _ in root.store.list_prefix(prefix):
            return True
        return False

    return sync(first())


#: where replacements of committed cases are built (``--overwrite``)
STAGING = "staging"


def remove_staging(root: zarr.Group, case_id: str) -> list[str]:
    """Delete leftover staging groups of a case (an interrupted replacement); return them."""

    async def find() -> list[str]:
        found = set()
        async for key in root.store.list_prefix(f"{STAGING}/"):
            name = key[len(STAGING) + 1 :].split("/", 1)[0]
            if name.rpartition("-")[0] == case_id:
                found.add(f"{STAGING}/{name}")
        return sorted(found)

    if not root.store.supports_listing:
        return []
    leftovers = sync(find())
    for path in leftovers:
        sync(root.store.delete_dir(path))
    if leftovers:
        _drop_empty_staging(root.store)
    return leftovers


def swap_in(root: zarr.Group, staged: str, case_id: str) -> None:
    """Put a committed replacement in place of the case.

    Local stores: one atomic ``renameat2(RENAME_EXCHANGE)`` of the two directories (readers see
    the old case or the new one, never a mix), then the old one is deleted. Object stores have no
    rename: the old case is first marked incomplete (its ``zarr.json`` rewritten without the
    commit marker), then the new objects are copied over it and the new ``zarr.json`` (marker
    and manifest) written last. During the copy the case reads as incomplete; a failure or a
    kill in it leaves an incomplete case, which the next run removes and converts again: never
    a mix of old and new objects under either manifest. A reader that opened the old case
    before the swap gets an integrity error from its manifest, never mixed voxels.
    """
    store = root.store
    target = f"cases/{case_id}"
    if isinstance(store, LocalStore):
        new, old = Path(store.root) / staged, Path(store.root) / target
        if not _exchange(new, old):
            trash = old.with_name(f".{old.name}.old")
            old.rename(trash)
            new.rename(old)
            new = trash
        shutil.rmtree(new)
        _drop_empty_staging(store)
        return

    async def keys(prefix: str) -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    from zarr.core.buffer import default_buffer_prototype

    proto = default_buffer_prototype()
    new_keys = sync(keys(f"{staged}/"))
    rel = [k[len(staged) + 1 :] for k in new_keys]
    marker = "zarr.json"
    _mark_incomplete(store, f"{target}/{marker}")
    for r in sorted(rel, key=lambda k: k == marker):  # the case's zarr.json last
        if r == marker:
            for stale in {k[len(target) + 1 :] for k in sync(keys(f"{target}/"))} - set(rel):
                sync(store.delete(f"{target}/{stale}"))
        buf = sync(store.get(f"{staged}/{r}", prototype=proto))
        assert buf is not None
        sync(store.set(f"{target}/{r}", buf))
    sync(store.delete_dir(staged))
    _drop_empty_staging(store)


def _mark_incomplete(store: Any, key: str) -> None:
    """Rewrite a case's ``zarr.json`` with ``ctzarr.complete = false`` (the case disappears)."""
    import json

    raw = read_key(store, key)
    if raw is None:
        return
    doc = json.loads(raw)
    doc.setdefault("attributes", {}).setdefault("ctzarr", {})["complete"] = False
    write_key(store, key, json.dumps(doc, separators=(",", ":")).encode())


def _drop_empty_staging(store: Any) -> None:
    """Remove ``staging/`` once no replacement is in it.

    zarr wrote ``staging/zarr.json`` (an implicit parent group) when a staged case was
    created; left behind, every ``--overwrite`` would leave an empty group at the root.
    """

    async def rest() -> list[str]:
        return [k async for k in store.list_prefix(f"{STAGING}/")]

    if not store.supports_listing:
        return
    if set(sync(rest())) <= {f"{STAGING}/zarr.json"}:
        with contextlib.suppress(FileNotFoundError):
            sync(store.delete(f"{STAGING}/zarr.json"))
        if (local := unwrap_store(store, LocalStore)) is not None:
            with contextlib.suppress(OSError):  # a replacement started meanwhile
                (Path(local.root) / STAGING).rmdir()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two directories (Linux renameat2); False where unsupported."""
    import ctypes
    import errno

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_case(root: zarr.Group, case_id: str) -> None:
    """Delete every key of a case (leftovers of an interrupted run, or a replaced case)."""
    sync(root.store.delete_dir(f"cases/{case_id}"))


def check_same_grid(case_id: str, image: NiftiSource, seg: NiftiSource) -> None:
    """Raise unless image and segmentation share shape and (within tolerance) affine."""
    if seg.shape_zyx != image.shape_zyx:
        raise CaseMismatchError(
            f"case {case_id!r}: {seg.path}: shape (z, y, x) {seg.shape_zyx} differs from the image's "
            f"{image.shape_zyx} ({image.path})"
        )
    nz, ny, nx = image.shape_zyx
    corners = np.array(
        [[i, j, k, 1] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], float
    ).T
    gap = float(np.max(np.linalg.norm(((image.affine - seg.affine) @ corners)[:3], axis=0)))
    if gap > AFFINE_TOLERANCE_MM:
        raise CaseMismatchError(
            f"case {case_id!r}: {seg.path}: affine differs from the image's ({image.path}) by {gap:.4g} mm "
            f"at the volume corners (tolerance {AFFINE_TOLERANCE_MM} mm)"
        )


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
        files = _source_files(ds, spec)
        for rec in files.values():
            rec["abs_path"] = rec["path"]
        with case_lock(root.store, cid, run) as lock:
            remove_staging(root, cid)  # leftovers of an interrupted replacement
            state, meta = case_state(root, cid)
            if state == "complete" and meta is not None:
                old = meta.get("source", {}).get("files", {})
                if _same_source(old, files):
                    if run is not None and meta.get("run") == run:
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
            writer = CaseWriter(root, cid, image, segs, prefix=staged)
            try:
                writer.write()
                writer.write_index()
                writer.write_nifti_header()
                for role, rec in files.items():
                    rec["sha256"] = writer.digests[role]
                    rec["path"] = _relative(rec.pop("abs_path"), ds.root)
                lock.check()
                writer.commit({**case_attributes(spec, image, segs, files), "run": run})
                if staged:
                    swap_in(root, staged, cid)
            except BaseException:
                try:
                    if staged:
                        sync(root.store.delete_dir(staged))
                        _drop_empty_staging(root.store)
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


def case_attributes(
    spec: CaseSpec, image: NiftiSource, segs: Iterable[SegmentationSource], files: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``ctzarr`` attributes of a committed case."""
    return {
        "format_version": FORMAT_VERSION,
        "case_id": spec.case_id,
        "shape_zyx": list(image.shape_zyx),
        "spacing_zyx": list(image.spacing_zyx),
        "affine": image.affine.tolist(),
        "nifti": {
            "version": image.nifti_version,
            "raw_dtype": image.raw_dtype.newbyteorder("=").str,
            "source_byteorder": "big" if image.raw_dtype.byteorder == ">" else "little",
            "value_dtype": image.value_dtype.str,
            "scl_slope": image.slope,
            "scl_inter": image.inter,
            "qform_code": image.qform_code,
            "sform_code": image.sform_code,
            "notes": list(image.notes),
        },
        "segmentations": [s.name for s in segs],
        "attributes": dict(spec.attributes),
        "source": {"files": dict(files)},
    }


def finalize_collection(root: zarr.Group, changed: Iterable[str] | None = None) -> list[str]:
    """Update the collection's case list and table (all cases, or only those that changed)."""
    from .collection_table import update_collection_table

    return update_collection_table(root, changed)
