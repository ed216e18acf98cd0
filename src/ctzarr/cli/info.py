"""``ctzarr info``: what a store holds, from its metadata documents only.

Why not :func:`ctzarr.open_collection`: the reading side imports dask, xarray and pandas
(~1 s before the first byte is read), and ``info`` needs none of them; per-case workflow tools
call it once per case. This command reads through :mod:`ctzarr.model` and :mod:`ctzarr.io`
with the checks the reading side makes on the same documents: the root is a collection whose
commit record matches its attributes (:func:`ctzarr.write.table.collection_problems`), each
case is of a format this release reads, committed, its metadata safe
(:func:`ctzarr.io.strict.validate_case_metadata`) and as its commit record says
(:class:`ctzarr.io.strict.CaseIntegrity`). No voxel and no array is read: with ``--case``, the
voxel counts come from the index group's attributes.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store

from ctzarr.catalog import load_catalog, resolve_entry
from ctzarr.cli.storage import storage_options
from ctzarr.errors import (
    CaseNotFoundError,
    IncompleteCaseError,
    StoreCorruptError,
    StoreError,
    UnsafeStoreError,
)
from ctzarr.io.stores import codec_pipeline, make_store
from ctzarr.io.strict import (
    CaseIntegrity,
    open_collection_root,
    open_group_checked,
    validate_case_metadata,
)
from ctzarr.io.urls import url_protocol
from ctzarr.model.attributes import CTZARR_KEY, check_format_version
from ctzarr.model.case import CaseAttributes, is_committed
from ctzarr.model.collection import CollectionAttributes
from ctzarr.model.labels import LabelMap
from ctzarr.write.table import collection_problems

__all__ = ["cmd_info"]


def _target(text: str, options: dict[str, Any] | None) -> tuple[str, dict[str, Any] | None]:
    """The store URL and options of a path, URL or catalog name (as open_collection)."""
    if not url_protocol(text) and not Path(text).exists() and "/" not in text:
        if text not in load_catalog():
            raise StoreError(f"{text}: no collection store here, and no catalog entry of that name")
        target, entry_options = resolve_entry(text)
        return target, {**(entry_options or {}), **(options or {})} or None
    return text, options


def _open_root(target: str, store: Store) -> tuple[zarr.Group, CollectionAttributes]:
    root = open_collection_root(store, target)
    attributes = root.attrs.asdict()
    meta = CollectionAttributes.from_attributes(attributes, target)
    problems = collection_problems(meta, attributes)
    if problems:
        raise StoreCorruptError(f"{target}: zarr.json: {problems[0]}", "zarr.json")
    return root, meta


class _CaseInfo:
    """A case's metadata, checked as :class:`ctzarr.read.case.Case` checks it on opening."""

    def __init__(self, root: zarr.Group, target: str, case_id: str, listed: bool) -> None:
        where = f"case {case_id!r} in {target}"
        try:
            with codec_pipeline(root.store):
                grp = open_group_checked(root.store, f"cases/{case_id}", where)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as exc:
            if listed:
                raise StoreError(
                    f"{where} is listed but its metadata document cases/{case_id}/zarr.json is "
                    "missing (run ctzarr verify)"
                ) from exc
            raise CaseNotFoundError(f"no case {case_id!r} in {target}") from exc
        except (ValueError, TypeError, zarr.errors.BaseZarrError) as exc:
            raise UnsafeStoreError(
                f"{where}: cases/{case_id}/zarr.json: metadata refused: {type(exc).__name__}: {exc}"
            ) from exc
        attributes = grp.attrs.asdict()
        check_format_version(attributes, where)
        if not is_committed(attributes):
            raise IncompleteCaseError(f"{where} is incomplete (an interrupted conversion)")
        validate_case_metadata(grp, where)
        self.meta = CaseAttributes.from_attributes(attributes, where)
        consolidated = grp.metadata.consolidated_metadata
        self.nodes = {} if consolidated is None else consolidated.flattened_metadata
        self.integrity = CaseIntegrity(
            case_id, attributes, self.nodes, where, required=self.meta.format_version >= 2
        )
        self.where = where

    def voxel_counts(self, segmentation: str) -> Iterator[tuple[int, int]]:
        """(label, voxel count) of each label present, from the index group's attributes."""
        path = f"labels/{segmentation}/index"
        self.integrity.check_node(path)
        node = self.nodes.get(path)
        block = getattr(node, "attributes", {}).get(CTZARR_KEY) if node is not None else None
        if not isinstance(block, dict):
            raise StoreCorruptError(f"{self.where}: {path}: no index attributes", path)
        try:
            labels = [int(v) for v in block["labels"]]
            counts = [int(v) for v in block["voxel_count"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreCorruptError(
                f"{self.where}: {path}: attribute ctzarr.labels/voxel_count malformed ({exc})",
                path,
            ) from None
        if len(labels) != len(counts):
            raise StoreCorruptError(
                f"{self.where}: {path}: {len(labels)} labels but {len(counts)} voxel counts", path
            )
        return iter(zip(labels, counts, strict=True))


def _segmentation_line(name: str, label_map: LabelMap) -> str:
    extra = f", ignore value {label_map.ignore_value}" if label_map.ignore_value is not None else ""
    return (
        f"  segmentation {name}: label map {label_map.name!r}, "
        f"{len(label_map.structures())} structures{extra}"
    )


def cmd_info(args: argparse.Namespace) -> int:
    """Print the collection, its segmentations and cases (with --case: its structures)."""
    target, options = _target(os.fspath(args.store), storage_options(args.storage_options))
    store = make_store(target, storage_options=options, read_only=True)
    root, meta = _open_root(target, store)
    segmentations = dict(meta.segmentations)
    print(
        f"<ctzarr.Collection {meta.dataset_id!r}: {len(meta.cases)} cases, "
        f"segmentations {list(segmentations)}>"
    )
    for name, label_map in segmentations.items():
        print(_segmentation_line(name, label_map))
    case_ids = [args.case] if args.case else list(meta.cases)
    if args.case and args.case not in meta.cases:
        raise CaseNotFoundError(
            f"no case {args.case!r} in {target}; cases: {list(meta.cases)[:10]}"
        )
    for case_id in case_ids:
        case = _CaseInfo(root, target, case_id, listed=True)
        spacing = " x ".join(f"{s:g}" for s in case.meta.spacing_zyx)
        print(
            f"  {case_id}: (z, y, x) {case.meta.shape_zyx}, spacing {spacing} mm, "
            f"{len(case.meta.level_shapes)} levels, image {case.meta.nifti.value_dtype.str}"
        )
        for seg in case.meta.segmentations:
            if seg not in segmentations:
                raise StoreCorruptError(
                    f"{target}: zarr.json: attribute ctzarr.segmentations has no label map "
                    f"{seg!r}, which case {case_id!r} uses",
                    "zarr.json",
                )
        if not args.case:
            continue
        for seg in case.meta.segmentations:
            label_map = segmentations[seg]
            counts = list(case.voxel_counts(seg))
            print(f"    {seg}: {len(counts)} labels present")
            for label, n in counts:
                print(f"      {label:>4} {label_map[label].name:<32} {n:>12} voxels")
    return 0
