"""Opening a store: a collection of cases, its label maps and its collection table.

Opening a collection reads its root metadata only; a case reads its group metadata when first
indexed (``col[case_id]``). Catalog names resolve through :mod:`ctzarr.catalog`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from dask.base import compute
from zarr.abc.store import Store

from ctzarr.catalog import load_catalog, resolve_entry
from ctzarr.errors import (
    CaseNotFoundError,
    IncompleteCaseError,
    StoreCorruptError,
    StoreError,
    UnsafeStoreError,
)
from ctzarr.io.stores import codec_pipeline, make_store, zarr_settings
from ctzarr.io.strict import open_collection_root, open_group_cached
from ctzarr.io.urls import url_protocol
from ctzarr.model.case import is_committed
from ctzarr.model.collection import CollectionAttributes
from ctzarr.model.labels import LabelMap
from ctzarr.model.table import (
    PROFILE_COLUMNS,
    SLICE_COLUMNS,
    STATS_COLUMNS,
    WITHIN_COLUMNS,
    structure_name,
)
from ctzarr.read.case import Case
from ctzarr.read.composition import collection_query
from ctzarr.read.stats import collection_stats, scan_index_graph
from ctzarr.sources.layouts import validate_case_id
from ctzarr.write.table import collection_problems, read_table_columns


def open_collection(
    url_or_catalog_name: str | os.PathLike[str] | Store,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> Collection:
    """Open a converted collection.

    Parameters
    ----------
    url_or_catalog_name : str or path
        Local path, fsspec URL (``s3://``, ``gs://``, ``https://``, ``memory://``), or the
        name of an entry of ``catalog.yaml`` (``"dap_atlas"``, ``"saros"``).
    storage_options : dict, optional
        fsspec options for remote URLs.

    Returns
    -------
    Collection
    """
    if isinstance(url_or_catalog_name, Store):
        store = make_store(url_or_catalog_name, storage_options=storage_options)
        return _open_root(repr(url_or_catalog_name), store, None)
    target, so = _resolve(url_or_catalog_name, storage_options)
    return _open_root(target, make_store(target, storage_options=so, read_only=True), so)


def _resolve(
    url_or_catalog_name: str | os.PathLike[str], storage_options: Mapping[str, Any] | None
) -> tuple[str, dict[str, Any] | None]:
    """The store URL and storage options of a path, URL or catalog entry name."""
    target = os.fspath(url_or_catalog_name)
    so = dict(storage_options) if storage_options else None
    if not url_protocol(target) and not Path(target).exists() and "/" not in target:
        if target not in load_catalog():
            raise StoreError(
                f"{target}: no collection store here, and no catalog entry of that name"
            )
        target, entry_so = resolve_entry(target)
        so = {**(entry_so or {}), **(so or {})} or None
    return target, so


def open_collection_unverified(
    url: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None
) -> Collection:
    """Open a collection whose own commit record may not match its attributes (for
    ``ctzarr verify``, which reports that and goes on checking everything else); cases and the
    table are still held to theirs. Everything else opens with :func:`open_collection`."""
    target, so = _resolve(url, storage_options)
    return _open_root(target, make_store(target, storage_options=so, read_only=True), so, False)


def _open_root(
    target: str, store: Store, storage_options: dict[str, Any] | None, check: bool = True
) -> Collection:
    """Open the root group of a collection store and check it is one."""
    root = open_collection_root(store, target)
    return Collection(target, root, storage_options, check=check)


class Collection:
    """A converted dataset: cases, label maps and the collection-wide index table."""

    def __init__(
        self,
        url: str,
        root: zarr.Group,
        storage_options: dict[str, Any] | None = None,
        *,
        check: bool = True,
    ) -> None:
        self.url = url
        self.root = root
        # kept to reopen the store on cluster workers; never shown (may hold credentials)
        self._storage_options = storage_options
        attributes = root.attrs.asdict()
        #: the collection's attributes (typed: dataset, label maps, committed cases)
        self.meta: CollectionAttributes = CollectionAttributes.from_attributes(attributes, url)
        #: what is wrong with the collection's own commit record (label maps, case list)
        self.integrity_problems: list[str] = collection_problems(self.meta, attributes)
        if self.meta.cases and not self.meta.segmentations:
            self.integrity_problems.append(
                "attribute ctzarr.segmentations: no label maps, yet cases are listed"
            )
        if check and self.integrity_problems:
            raise StoreCorruptError(f"{url}: zarr.json: {self.integrity_problems[0]}", "zarr.json")

    @property
    def storage_options(self) -> dict[str, Any] | None:
        """The options the store was opened with (for workers that reopen it; never shown)."""
        return dict(self._storage_options) if self._storage_options else None

    @property
    def scan_task(self) -> Callable[..., Any]:
        """The worker side of a cluster scan (a module-level function: tasks pickle it by name)."""
        return scan_task

    def __repr__(self) -> str:
        return (
            f"<ctzarr.Collection {self.meta.dataset_id!r}: {len(self)} cases, "
            f"segmentations {list(self.segmentations)}>"
        )

    @property
    def dataset_id(self) -> str:
        return self.meta.dataset_id

    @property
    def case_ids(self) -> list[str]:
        """Ids of the committed cases, sorted."""
        return list(self.meta.cases)

    @cached_property
    def segmentations(self) -> dict[str, LabelMap]:
        """Label map of each segmentation, by segmentation name."""
        return dict(self.meta.segmentations)

    def __len__(self) -> int:
        return len(self.case_ids)

    def __iter__(self) -> Iterator[Case]:
        for cid in self.case_ids:
            yield self[cid]

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.case_ids

    def __getitem__(self, case_id: str) -> Case:

        try:
            validate_case_id(case_id)
        except ValueError as exc:  # never let a hostile id reach a store key
            raise CaseNotFoundError(f"no case {case_id!r} in {self.url}: {exc}") from exc
        try:
            # parsed once per process for the same document bytes (a re-converted case is
            # parsed afresh): see ctzarr.io.strict.open_group_cached
            with codec_pipeline(self.root.store):
                grp, token = open_group_cached(
                    self.root.store,
                    f"cases/{case_id}",
                    f"case {case_id!r} in {self.url}",
                    self.url,
                )
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as exc:
            if case_id in self.case_ids:
                # zarr's own text ("No group found in store LocalStore(...)") names neither
                # the case nor what to do
                missing = isinstance(exc, (FileNotFoundError, zarr.errors.GroupNotFoundError))
                raise StoreError(
                    f"case {case_id!r} in {self.url} is listed but its group (cases/{case_id}/"
                    "zarr.json) cannot be opened: "
                    + ("the document is missing" if missing else f"{type(exc).__name__}: {exc}")
                    + " (run ctzarr verify)"
                ) from exc
            raise CaseNotFoundError(
                f"no case {case_id!r} in {self.url}; cases: {self.case_ids[:10]}"
            ) from exc
        except (ValueError, TypeError, zarr.errors.BaseZarrError) as exc:  # unknown codec, bad JSON
            raise UnsafeStoreError(
                f"case {case_id!r} in {self.url}: cases/{case_id}/zarr.json: metadata refused: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if not is_committed(grp.attrs.asdict()):
            raise IncompleteCaseError(
                f"case {case_id!r} in {self.url} is incomplete (an interrupted conversion)"
            )
        case = Case(self, case_id, grp, token)
        for seg in case.segmentation_names:
            if seg not in self.segmentations:
                raise StoreCorruptError(
                    f"{self.url}: zarr.json: attribute ctzarr.segmentations has no label map "
                    f"{seg!r}, which case {case_id!r} uses",
                    "zarr.json",
                )
        return case

    def stats(
        self,
        structures: Sequence[str | int] | None = None,
        cases: Sequence[str] | None = None,
        segmentation: str | None = None,
        method: str = "index",
        client: Any = None,
        within: tuple[str, str | int] | str | None = None,
    ) -> pd.DataFrame:
        """Per-structure statistics for a cohort, one row per (case, segmentation, structure).

        Parameters
        ----------
        structures : list of str or int, optional
            Names (matched case-insensitively, ignoring spaces, hyphens and underscores; also
            normalised and TotalSegmentator names) or ids. Default: every structure present.
        cases : list of str, optional
            Default: every case.
        segmentation : str, optional
            Default: every segmentation that has the structures.
        method : {"index", "scan"}
            ``"index"`` reads only the stored index; ``"scan"`` recomputes from the voxels in
            one blockwise pass per case. Both give identical numbers.
        client : dask.distributed.Client, optional
            Run the scan on this cluster.
        within : (str, str or int) or str, optional
            ``(other_segmentation, structure)`` or ``"other_segmentation:structure"``: count
            only the voxels inside that structure (ignore-valued voxels of either map never
            count); one task per case. Answered from the joint index when the store has one,
            else by one scan per case (two label maps and the image, blockwise).

        Returns
        -------
        pandas.DataFrame
            Columns of :data:`ctzarr.stats.STATS_COLUMNS` (plus ``annotated_slices`` for sparse
            label maps); with ``within``, :data:`ctzarr.model.table.WITHIN_COLUMNS`. Cases
            without the ``within`` segmentation give no rows.
        """

        if within is not None:
            params = {
                "structures": None if structures is None else list(structures),
                "segmentation": segmentation,
                "within": within,
                "method": method,
            }
            return collection_query(
                self, "within", params, cases, client, open_collection, WITHIN_COLUMNS
            )
        return collection_stats(self, structures, cases, segmentation, method, client)

    def profile(
        self,
        structure: str | int,
        segmentation: str | None = None,
        cases: Sequence[str] | None = None,
        method: str = "index",
        client: Any = None,
    ) -> pd.DataFrame:
        """Axial profiles of a structure over a cohort (see :meth:`Case.profile`), one task per
        case; cases without the structure's segmentation give no rows.

        Returns
        -------
        pandas.DataFrame
            Columns :data:`ctzarr.model.table.PROFILE_COLUMNS`, cases in order.
        """

        params = {"structure": structure, "segmentation": segmentation, "method": method}
        return collection_query(
            self, "profile", params, cases, client, open_collection, PROFILE_COLUMNS
        )

    def slice_stats(
        self,
        at: str | int,
        structures: Sequence[str | int] | None = None,
        segmentation: str | None = None,
        cases: Sequence[str] | None = None,
        client: Any = None,
    ) -> pd.DataFrame:
        """Statistics on the axial slice through ``at``'s centroid, per case (see
        :meth:`Case.slice_stats`), one task per case.

        A case without ``at`` is not an error here: it gives one row with ``note`` saying why
        (``label`` -1, ``voxel_count`` 0, ``z`` -1, statistics NaN); every other row has an
        empty ``note``.

        Returns
        -------
        pandas.DataFrame
            Columns :data:`ctzarr.model.table.SLICE_COLUMNS` plus ``note``.
        """

        params = {
            "at": at,
            "structures": None if structures is None else list(structures),
            "segmentation": segmentation,
        }
        return collection_query(
            self, "slice_stats", params, cases, client, open_collection, [*SLICE_COLUMNS, "note"]
        )

    def table(self) -> pd.DataFrame:
        """The collection table: statistics of every (case, segmentation, structure), read from
        one small group of the store (no case is opened), then the cases' dataset attributes
        (``meta.csv`` fields such as age, gender, split) as text columns."""

        with codec_pipeline(self.root.store):
            found = read_table_columns(self.root)
        if found is None:
            raise StoreError(
                f"{self.url}: no collection table (written by ctzarr convert; rebuild with "
                "ctzarr verify --repair)"
            )
        cols, attrs = found
        lms = self.segmentations
        seg_names = attrs.segmentations
        for seg in seg_names:
            if seg not in lms:
                raise StoreCorruptError(
                    f"{self.url}: zarr.json: attribute ctzarr.segmentations has no label map "
                    f"{seg!r}, which the collection table uses",
                    "zarr.json",
                )
        data: dict[str, Any] = {
            "case_id": np.asarray(attrs.cases, dtype=object)[cols["case"]]
            if len(cols["case"])
            else [],
            "segmentation": np.asarray(seg_names, dtype=object)[cols["segmentation"]]
            if len(cols["case"])
            else [],
            "label": cols["label"],
            "structure": _structure_names(
                [lms[seg] for seg in seg_names], cols["segmentation"], cols["label"]
            ),
        }

        for c in STATS_COLUMNS[4:]:
            data[c] = cols[c]
        df = pd.DataFrame(data)
        if len(df) and (cols["annotated_slices"] >= 0).any():
            df["annotated_slices"] = cols["annotated_slices"]
        # the cases' dataset attributes (TotalSegmentator meta.csv, SAROS case CSV: age,
        # gender, split, ...) as text columns after the statistics; a name that is already a
        # column is skipped
        keys = dict.fromkeys(k for m in attrs.case_meta.values() for k in m.attributes)
        for key in keys:
            if key not in df.columns:
                by_case = {cid: m.attributes.get(key) for cid, m in attrs.case_meta.items()}
                df[key] = df["case_id"].map(by_case)
        return df


def _structure_names(
    label_maps: list[LabelMap], segmentation: np.ndarray, label: np.ndarray
) -> list[str]:
    """The structure column of table rows: one dictionary per (segmentation, label) present,
    not one label-map lookup per row (a 500-case table has 70,000 rows)."""
    names: dict[tuple[int, int], str] = {}
    out = []
    for key in zip(segmentation.tolist(), label.tolist(), strict=True):
        name = names.get(key)
        if name is None:
            name = names[key] = structure_name(label_maps[key[0]], int(key[1]))
        out.append(name)
    return out


def scan_task(url: str, options: dict[str, Any], case_id: str, segmentation: str) -> Any:
    """Worker side of a cluster scan: open the case from its URL, rebuild one index from its
    voxels (blockwise, with the worker's threads); None when the case lacks the segmentation."""
    from distributed import get_worker  # only on cluster workers (optional dependency)

    # use the threads the worker was given, not every core of the machine (oversubscription
    # cost 35 % per case with two 1-thread workers on 2 cores, benchmarks/CLOUD.md): the dask
    # pool inside the task, and the zarrs codec pipeline's decoding threads (bound when the
    # arrays are opened, so the setting wraps the open)
    nthreads = get_worker().state.nthreads
    with zarr_settings({"threading.max_workers": nthreads}):
        col = open_collection(url, storage_options=options or None)
        case = col[case_id]
        if segmentation not in case.segmentation_names:
            return None  # the case has no such segmentation (the client did not open it)
        graph = scan_index_graph(case, segmentation)
        if nthreads <= 1:
            (idx,) = compute(graph, scheduler="sync")
        else:
            (idx,) = compute(graph, scheduler="threads", num_workers=nthreads)
    return idx
