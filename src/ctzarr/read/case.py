"""One case as lazy xarray objects: the CT image, its segmentations, crops and NIfTI export.

Nothing is read until values are needed: the image and labels are dask arrays over the stored
shards, and a crop reads only the chunks its box touches (from the per-label index).
"""

from __future__ import annotations

import functools
import logging
import math
import operator
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr
import zarr
from dask.highlevelgraph import HighLevelGraph
from zarr.core.group import AsyncGroup, GroupMetadata
from zarr.storage import LocalStore, StorePath

from ctzarr.errors import (
    ChunkCorruptError,
    MetadataError,
    SegmentationNotFoundError,
    StructureNotFoundError,
)
from ctzarr.io.stores import codec_pipeline
from ctzarr.io.strict import (
    ArrayLayout,
    CaseIntegrity,
    CheckedArray,
    StrictStore,
    check_local_links,
    read_boxes,
    validate_case_metadata,
)
from ctzarr.model.attributes import check_format_version
from ctzarr.model.case import CaseAttributes
from ctzarr.model.index import IndexTable, JointInfo, LabelIndex
from ctzarr.model.labels import Label
from ctzarr.model.manifest import Manifest
from ctzarr.read.composition import case_profile, case_slice_stats, case_within_stats
from ctzarr.read.export import case_to_nifti, crop_to_nifti
from ctzarr.read.stats import case_stats

if TYPE_CHECKING:
    from ctzarr.read.collection import Collection

logger = logging.getLogger(__name__)


class Case:
    """One case: the CT image and its segmentations as lazy xarray objects."""

    def __init__(
        self,
        collection: Collection,
        case_id: str,
        group: zarr.Group,
        token: str | None = None,
    ) -> None:
        """``token``: the digest of the case's ``zarr.json`` bytes the group was parsed from
        (:func:`ctzarr.io.strict.open_group_cached`); with it, the checks and parsing below
        run once per process for those bytes."""
        self.collection = collection
        self.case_id = case_id
        self.group = group
        self._arrays: dict[str, CheckedArray] = {}
        where = f"case {case_id!r} in {collection.url}"
        key = None if token is None else (collection.url, case_id, token)
        parsed = None if key is None else _parsed_get(key)
        if parsed is None:
            parsed = _ParsedCase.parse(case_id, group, where)
            if key is not None:
                _parsed_put(key, parsed)
        self._layouts = parsed.layouts
        #: the case's attributes (typed: geometry, NIfTI header summary, sources, manifest)
        self.meta: CaseAttributes = parsed.meta
        self._manifest: Manifest = parsed.manifest
        self.integrity = parsed.integrity
        self._nodes = parsed.nodes
        store = group.store
        if isinstance(store, LocalStore):
            check_local_links(Path(store.root), Path(store.root) / group.path, where)
        else:
            strict = StrictStore(store, group.path, self._layouts, self._manifest, where)
            self.group = zarr.Group(
                AsyncGroup(metadata=group.metadata, store_path=StorePath(strict, group.path))
            )

    def __repr__(self) -> str:
        return f"<ctzarr.Case {self.case_id!r} shape(z,y,x)={tuple(self.shape)} segmentations={self.segmentation_names}>"

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape (z, y, x) of level 0."""
        return self.meta.shape_zyx

    @property
    def affine(self) -> np.ndarray:
        """The NIfTI affine (voxel (i, j, k) = (x, y, z) to RAS+ mm)."""
        return self.meta.affine_matrix

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (z, y, x) in millimetres."""
        return self.meta.spacing_zyx

    @property
    def segmentation_names(self) -> list[str]:
        return list(self.meta.segmentations)

    @property
    def attributes(self) -> dict[str, Any]:
        """Per-case attributes from the dataset (e.g. the SAROS case CSV row)."""
        return dict(self.meta.attributes)

    @property
    def manifest(self) -> Manifest:
        """Every stored object of the case with its size and checksums."""
        return self._manifest

    @property
    def array_paths(self) -> list[str]:
        """Paths (relative to the case) of every array of the case, sorted."""
        return sorted(self._layouts)

    def array(self, path: str) -> CheckedArray:
        """An array of the case, opened once (from the consolidated metadata: no request); its
        reads are strict (see :mod:`ctzarr.io.strict`)."""
        arr = self._arrays.get(path)
        if arr is None:
            layout = self._layouts.get(path)  # every array of the case, validated
            if layout is None:
                raise KeyError(f"case {self.case_id!r}: {path} is not an array")
            self.integrity.check_node(path)
            group, store = self.group, self.group.store

            def open_array() -> zarr.Array[Any]:
                # the zarr array, for reads other than boxes of a local store (which decode
                # directly: ctzarr.io.chunks) and for its attributes (shards, chunks, ...)
                with codec_pipeline(store):
                    node = group[path]
                if not isinstance(node, zarr.Array):
                    raise KeyError(f"case {self.case_id!r}: {path} is not an array")
                return node

            local = Path(store.root) / group.path / path if isinstance(store, LocalStore) else None
            arr = self._arrays[path] = CheckedArray(
                open_array,
                layout,
                self._manifest.records(path),
                f"case {self.case_id!r}",
                local_dir=local,
            )
        return arr

    def _coords(self, level: int = 0) -> dict[str, Any]:
        """Millimetre coordinates per axis: world (RAS) when the affine is axis-aligned."""
        shape = self.array(str(level)).shape
        aff = self.affine
        f = 2**level
        coords = {}
        lin = aff[:3, :3]
        aligned = self.coordinate_kind == "world_ras_mm"
        for ax, (dim, world_row) in enumerate(zip("zyx", (2, 1, 0), strict=True)):
            idx = np.arange(shape[ax]) * f + (f - 1) / 2
            if aligned:
                coords[dim] = lin[world_row, world_row] * idx + aff[world_row, 3]
            else:
                coords[dim] = idx * self.spacing[ax]
        return coords

    def _dataarray(
        self, arr: CheckedArray, name: str, level: int, attrs: dict[str, Any]
    ) -> xr.DataArray:
        shard = arr.shards or arr.chunks
        data = da.from_array(
            arr,
            chunks=shard,
            name=f"ctzarr-{self.case_id}-{name}-{level}-{id(arr)}",
            lock=False,
            asarray=True,
            inline_array=True,
        )
        return xr.DataArray(
            data,
            dims=("z", "y", "x"),
            coords=self._coords(level),
            name=name,
            attrs={
                "affine": self.level_affine(level),
                "spacing_mm": tuple(s * 2**level for s in self.spacing),
                "units": "mm",
                "case_id": self.case_id,
                "coordinates": self.coordinate_kind,
                **attrs,
            },
        )

    @property
    def coordinate_kind(self) -> str:
        lin = self.affine[:3, :3]
        return "world_ras_mm" if np.allclose(lin, np.diag(np.diag(lin))) else "voxel_mm"

    def level_affine(self, level: int = 0) -> np.ndarray:
        """Affine of a pyramid level (voxel centres of 2**level blocks)."""
        if level == 0:
            return self.affine
        f = 2**level
        scale = np.diag([f, f, f, 1.0])
        scale[:3, 3] = (f - 1) / 2
        return self.affine @ scale

    @property
    def levels(self) -> int:
        """Number of pyramid levels."""
        return len(self.meta.level_shapes)

    def image_at(self, level: int = 0) -> xr.DataArray:
        """The CT image at a pyramid level, values as nibabel returns them (scaling applied)."""
        arr = self.array(str(level))
        nifti = self.meta.nifti
        da_ = self._dataarray(arr, "image", level, {})
        if nifti.scaled:
            da_ = da_.copy(data=da_.data.map_blocks(nifti.scale, dtype=nifti.value_dtype))
        return da_

    @property
    def image(self) -> xr.DataArray:
        """The CT image (level 0), dask-backed, dims (z, y, x), coordinates in mm."""
        return self.image_at(0)

    def labels(self, segmentation: str | None = None, level: int = 0) -> xr.DataArray:
        """A segmentation as a lazy uint DataArray on the image grid."""
        name = self._segmentation_name(segmentation)
        lm = self.collection.segmentations.get(name)
        arr = self.array(f"labels/{name}/{level}")
        return self._dataarray(
            arr,
            name,
            level,
            {"segmentation": name, "ignore_value": None if lm is None else lm.ignore_value},
        )

    def _segmentation_name(self, segmentation: str | None) -> str:
        names = self.segmentation_names
        if segmentation is None:
            if len(names) != 1:
                raise SegmentationNotFoundError(
                    f"case {self.case_id!r} has segmentations {names}: name one"
                )
            return names[0]
        if segmentation not in names:
            raise SegmentationNotFoundError(
                f"case {self.case_id!r} has no segmentation {segmentation!r}; it has {names}"
            )
        return segmentation

    def _index_attributes(self, segmentation: str) -> tuple[dict[str, Any], str]:
        """The attributes of a segmentation's index group (consolidated: no request)."""
        path = f"labels/{segmentation}/index"
        node = self._nodes.get(path)  # the consolidated metadata, already parsed
        if not isinstance(node, GroupMetadata):
            grp = self.group[path]  # raises what zarr raises for a missing or wrong node
            assert isinstance(grp, zarr.Group)
            node = grp.metadata
        self.integrity.check_node(path)
        where = f"case {self.case_id!r} in {self.collection.url}: index of {segmentation!r}"
        return dict(node.attributes), where

    def index(self, segmentation: str | None = None) -> LabelIndex:
        """The per-label index written at conversion (histograms included: one small read;
        format 3: per-slice rows too, one more)."""
        name = self._segmentation_name(segmentation)
        hist = np.asarray(self.array(f"labels/{name}/index/histogram")[:])
        attributes, where = self._index_attributes(name)
        slices = f"labels/{name}/index/slices"
        rows = np.asarray(self.array(slices)[:]) if slices in self._layouts else None
        return LabelIndex.from_attributes(attributes, hist, where, rows)

    def joint_index(
        self, a_segmentation: str, b_segmentation: str
    ) -> tuple[LabelIndex, int, bool] | None:
        """The joint index of two segmentations: ``(index, radix, flipped)``, or None when the
        case has none (a store older than format 3).

        The index is over pair codes ``code = a * radix + b`` of the alphabetically first
        segmentation (a) and the other (b); ``flipped`` is True when ``a_segmentation`` is the
        second of the two, so its labels are ``code % radix``.
        """
        names = [self._segmentation_name(a_segmentation), self._segmentation_name(b_segmentation)]
        if names[0] == names[1]:
            raise ValueError(f"a joint index pairs two segmentations, got {names[0]!r} twice")
        first, second = sorted(names)
        path = f"labels/{first}/joint/{second}"
        if f"{path}/histogram" not in self._layouts:
            return None
        grp = self.group[path]
        assert isinstance(grp, zarr.Group)
        self.integrity.check_node(path)
        where = (
            f"case {self.case_id!r} in {self.collection.url}: joint index of {first!r} and "
            f"{second!r}"
        )
        attributes = grp.attrs.asdict()
        info = JointInfo.from_attributes(attributes, where)
        if (info.segmentation, info.other) != (first, second):
            raise MetadataError(
                where,
                "ctzarr.joint",
                f"names segmentations {info.segmentation!r} and {info.other!r}",
            )
        hist = np.asarray(self.array(f"{path}/histogram")[:])
        rows = (
            np.asarray(self.array(f"{path}/slices")[:])
            if f"{path}/slices" in self._layouts
            else None
        )
        index = LabelIndex.from_attributes(attributes, hist, where, rows)
        return index, info.radix, names[0] != first

    def stats(
        self,
        structures: Sequence[str | int] | None = None,
        segmentation: str | None = None,
        method: str = "index",
        client: Any = None,
        within: tuple[str, str | int] | str | None = None,
    ) -> pd.DataFrame:
        """Per-structure statistics of this case (see :meth:`Collection.stats`).

        ``within=(other_segmentation, structure)`` (or ``"other_segmentation:structure"``)
        restricts every structure to its voxels inside that structure of another segmentation
        (columns ``within_segmentation``, ``within_structure`` added); see
        :mod:`ctzarr.read.composition`.
        """

        if within is not None:
            if client is not None:  # the cohort form runs the case on the cluster
                return self.collection.stats(
                    structures, [self.case_id], segmentation, method, client, within=within
                )
            return case_within_stats(self, structures, segmentation, within, method)
        return case_stats(self, structures, segmentation, method, client)

    def profile(
        self, structure: str | int, segmentation: str | None = None, method: str = "index"
    ) -> pd.DataFrame:
        """One row per axial slice holding a structure: area and mean value along z.

        Parameters
        ----------
        structure : str or int
            Name or id.
        segmentation : str, optional
            Default: the case's segmentation that has the structure.
        method : {"index", "scan"}
            ``"index"`` reads the per-slice index (format 3; an older store is scanned);
            ``"scan"`` recomputes from the voxels. Both give identical numbers.

        Returns
        -------
        pandas.DataFrame
            Columns :data:`ctzarr.model.table.PROFILE_COLUMNS`: case_id, segmentation, label,
            structure, z (stored index), z_mm (world z of the slice centre, RAS+), voxel_count,
            area_mm2, hu_mean; no row for a slice without the structure.
        """

        return case_profile(self, structure, segmentation, method)

    def slice_stats(
        self,
        at: str | int,
        structures: Sequence[str | int] | None = None,
        segmentation: str | None = None,
    ) -> pd.DataFrame:
        """Statistics on the axial slice through the centroid of the landmark ``at``.

        The slice is ``z = floor(mean z index of at + 0.5)`` (from the index); ``at`` may
        belong to any segmentation of the case (``"segmentation:structure"`` when the name fits
        several). Only that slice is read.

        Returns
        -------
        pandas.DataFrame
            Columns :data:`ctzarr.model.table.SLICE_COLUMNS`: the statistics columns on the
            slice, plus at_segmentation, at_structure, z and area_mm2.

        Raises
        ------
        StructureNotFoundError
            ``at`` is unknown, ambiguous, or absent from this case.
        """

        return case_slice_stats(self, at, structures, segmentation)

    def resolve(self, structure: str | int, segmentation: str | None = None) -> tuple[str, Label]:
        """(segmentation, label) of a structure named by id or name."""

        names = [self._segmentation_name(segmentation)] if segmentation else self.segmentation_names
        errors = []
        for name in names:
            try:
                return name, self.collection.segmentations[name].resolve(structure)
            except StructureNotFoundError as exc:
                errors.append(str(exc))
        raise StructureNotFoundError(f"case {self.case_id!r}: " + "; ".join(errors))

    def crop_box(
        self, structure: str | int, margin_mm: float = 0.0, segmentation: str | None = None
    ) -> tuple[str, Label, tuple[slice, slice, slice]]:
        """Bounding box of a structure (from the index) grown by a margin, clipped to the volume."""

        if margin_mm < 0 or not np.isfinite(margin_mm):
            raise ValueError(f"margin_mm must be a finite number >= 0, got {margin_mm}")
        seg, label = self.resolve(structure, segmentation)
        # the bounding boxes, without the histograms
        table = IndexTable.from_attributes(*self._index_attributes(seg))
        b = table.bounding_box(label.value)
        if b is None:
            raise StructureNotFoundError(
                f"case {self.case_id!r}: structure {label.name!r} (label {label.value}) is absent from "
                f"segmentation {seg!r}"
            )
        box = []
        for ax in range(3):
            grow = math.ceil(margin_mm / self.spacing[ax] - 1e-9) if margin_mm else 0
            box.append(
                slice(max(int(b[2 * ax]) - grow, 0), min(int(b[2 * ax + 1]) + grow, self.shape[ax]))
            )
        return seg, label, (box[0], box[1], box[2])

    def crop(
        self,
        structure: str | int,
        margin_mm: float = 0.0,
        segmentation: str | None = None,
        *,
        lazy: bool = True,
    ) -> xr.Dataset:
        """A crop around a structure: ``image`` and ``labels`` over its bounding box.

        The box comes from the index (no voxel is scanned), grown by ``ceil(margin_mm /
        spacing)`` voxels per axis and clipped to the volume; only the chunks inside it are read.

        ``lazy=True`` (default): dask-backed, read on ``.compute()`` by one task that reads both
        boxes together (computing either array reads both).
        ``lazy=False``: read now, numpy-backed, with no dask graph: the inner chunks of both
        arrays are read once, checked (manifest, digests, crc32c, frame headers) and decoded
        in one parallel batch; the same arrays as ``crop(...).compute()`` in 30-40 % less
        time (benchmarks/QUERY.md). Use it when the values are wanted now.

        Returns
        -------
        xarray.Dataset
            ``image`` and ``labels`` with world coordinates; ``attrs["affine"]`` is the crop's
            affine, so the crop saved as NIfTI overlays the original.
        """
        seg, label, (zs, ys, xs) = self.crop_box(structure, margin_mm, segmentation)
        box = (zs, ys, xs)
        shift = np.eye(4)
        shift[:3, 3] = [xs.start, ys.start, zs.start]
        affine = self.affine @ shift
        coords = {
            dim: values[sl] for (dim, values), sl in zip(self._coords(0).items(), box, strict=True)
        }
        common = {
            "affine": affine,
            "spacing_mm": self.spacing,
            "units": "mm",
            "case_id": self.case_id,
            "coordinates": self.coordinate_kind,
        }
        nifti = self.meta.nifti
        image_arr, labels_arr = self.array("0"), self.array(f"labels/{seg}/0")
        image_data: Any
        labels_data: Any
        if not lazy:
            image_data, labels_data = read_boxes([(image_arr, box), (labels_arr, box)])
            image_data = nifti.scale(image_data)
        else:
            image_data, labels_data = _crop_arrays(
                image_arr, labels_arr, box, f"ctzarr-crop-{seg}-{self.case_id}"
            )
        if lazy and nifti.scaled:
            # da.map_blocks(f, x) is what x.map_blocks(f) calls; the method's functools.wraps
            # signature is typed as the module function's (func first), so mypy rejects it
            image_data = da.map_blocks(nifti.scale, image_data, dtype=nifti.value_dtype)
        lm = self.collection.segmentations.get(seg)
        dims = ("z", "y", "x")
        # variables and coordinates given to the Dataset at once: one index per axis, no
        # alignment of two DataArrays (half the cost of building the result)
        image = xr.Variable(dims, image_data, attrs=dict(common))
        labels = xr.Variable(
            dims,
            labels_data,
            attrs={
                **common,
                "segmentation": seg,
                "ignore_value": None if lm is None else lm.ignore_value,
            },
        )
        return xr.Dataset(
            {"image": image, "labels": labels},
            coords=coords,
            attrs={
                "affine": affine,
                "case_id": self.case_id,
                "segmentation": seg,
                "structure": label.name,
                "label": label.value,
                "margin_mm": margin_mm,
                "box_zyx": [zs.start, zs.stop, ys.start, ys.stop, xs.start, xs.stop],
            },
        )

    def crop_to_nifti(
        self,
        structure: str | int,
        out_path: str | os.PathLike[str],
        margin_mm: float = 0.0,
        segmentation: str | None = None,
    ) -> dict[str, Path]:
        """Write a structure crop as ``.nii.gz`` (see :func:`ctzarr.read.export.crop_to_nifti`).

        Returns
        -------
        dict
            ``{"image": path, "labels": path}``.
        """
        return crop_to_nifti(self, structure, out_path, margin_mm, segmentation)

    @property
    def nifti_header_bytes(self) -> bytes:
        """The stored NIfTI header of the image (the case's ``nifti`` array: 348 bytes, or 540
        for NIfTI-2)."""
        return bytes(self.array("nifti")[:].tobytes())

    def segmentation_header_bytes(self, segmentation: str | None = None) -> bytes | None:
        """The stored NIfTI header of a segmentation (its label group's ``nifti`` array: the
        source file's header with the stored label dtype), or None in a format-1 case, which
        has none."""
        name = self._segmentation_name(segmentation)
        path = f"labels/{name}/nifti"
        if path not in self._layouts:
            return None
        return bytes(self.array(path)[:].tobytes())

    def to_nifti(self, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
        """Write the image and each segmentation back to ``.nii.gz`` files
        (see :func:`ctzarr.read.export.case_to_nifti`).

        Returns
        -------
        dict
            Paths written, by role (``"image"`` and each segmentation name).
        """
        return case_to_nifti(self, out_dir)


@dataclass(frozen=True)
class _ParsedCase:
    """What opening a case derives from its document alone (a pure function of its bytes and
    the case id): cached per process by :class:`Case`, keyed by the document's digest."""

    layouts: dict[str, ArrayLayout]
    meta: CaseAttributes
    manifest: Manifest
    integrity: CaseIntegrity
    nodes: Mapping[str, Any]  # consolidated metadata of the member nodes, by path

    @classmethod
    def parse(cls, case_id: str, group: zarr.Group, where: str) -> _ParsedCase:
        # Safety and integrity checks, before any graph is built or chunk read
        # (see ctzarr.io.strict): metadata against the allowlist and caps, the attributes and
        # manifest parsed (local links contained and remote reads re-rooted by Case).
        attributes = group.attrs.asdict()
        # a case of a newer store format is refused first: its layout may be anything
        check_format_version(attributes, where)
        layouts = validate_case_metadata(group, where)
        meta = CaseAttributes.from_attributes(attributes, where)
        if meta.manifest is None:  # from_attributes requires it of a committed case
            raise ChunkCorruptError(f"{where}: malformed chunk manifest: none")
        _check_shapes(layouts, meta, where)
        # the case's document against its digests (bound to the case id); member nodes are
        # checked when first used (ctzarr.io.strict.CaseIntegrity)
        consolidated = group.metadata.consolidated_metadata
        nodes = {} if consolidated is None else consolidated.flattened_metadata
        integrity = CaseIntegrity(
            case_id, attributes, nodes, where, required=meta.format_version >= 2
        )
        if meta.segmentations:  # the label image groups (names, colours, label maps)
            for path in ("labels", *(f"labels/{s}" for s in meta.segmentations)):
                integrity.check_node(path)
        return cls(layouts, meta, meta.manifest, integrity, nodes)


#: parsed cases by (collection URL, case id, digest of the case document), most recent last
_PARSED: OrderedDict[tuple[str, str, str], _ParsedCase] = OrderedDict()
_PARSED_SIZE = 64
_PARSED_LOCK = threading.Lock()


def _parsed_get(key: tuple[str, str, str]) -> _ParsedCase | None:
    with _PARSED_LOCK:
        parsed = _PARSED.get(key)
        if parsed is not None:
            _PARSED.move_to_end(key)
        return parsed


def _parsed_put(key: tuple[str, str, str], parsed: _ParsedCase) -> None:
    with _PARSED_LOCK:
        _PARSED[key] = parsed
        while len(_PARSED) > _PARSED_SIZE:
            _PARSED.popitem(last=False)


def _check_shapes(layouts: Mapping[str, Any], meta: CaseAttributes, where: str) -> None:
    """Image and label levels must have the shapes the case attributes imply (an edited
    ``shape`` would read fill beyond the stored objects)."""
    levels = meta.level_shapes
    for path, layout in layouts.items():
        level = path.rpartition("/")[2]
        is_level = path == level or (path.startswith("labels/") and path.count("/") == 2)
        if is_level and level.isdigit():
            want = levels[int(level)] if int(level) < len(levels) else None
            if layout.shape != want:
                raise ChunkCorruptError(
                    f"{where}: array {path!r} has shape {layout.shape}, the case is {want}"
                )


def _crop_arrays(
    image: CheckedArray, labels: CheckedArray, box: tuple[slice, slice, slice], name: str
) -> tuple[da.Array, da.Array]:
    """A crop's image and labels as one-chunk dask arrays whose boxes one task reads with
    :func:`~ctzarr.io.strict.read_boxes`, their inner chunks decoded in one batch as
    ``crop(..., lazy=False)`` does.

    One task for the box, not a dask array over the stored chunks: slicing a shard-chunked
    dask array builds and schedules a graph over every shard the box touches, most of a crop's
    cost. One task for both arrays, not one per array: each decoded its box in a batch of its
    own, 0.9 ms more per warm crop (9.65 vs 8.72 ms, median of 60 alternating runs). The graph
    is written out (dask's graph spec: the read, then one item of its result per array's chunk)
    rather than through ``dask.delayed`` and ``from_delayed``, whose tokenising, extra layers
    and getitem tasks cost 0.5-1 ms more per crop (benchmarks/QUERY.md).
    """
    token = "-".join(f"{sl.start}:{sl.stop}" for sl in box)
    chunks = tuple((sl.stop - sl.start,) for sl in box)
    key = f"{name}-{token}-{id(image)}"
    read_both = functools.partial(read_boxes, [(image, box), (labels, box)])
    arrays = []
    for i, (arr, part) in enumerate(((image, "image"), (labels, "labels"))):
        array_name = f"{key}-{part}"
        graph: dict[Any, Any] = {
            key: (read_both,),
            (array_name, 0, 0, 0): (operator.getitem, key, i),
        }
        arrays.append(
            da.Array(
                HighLevelGraph.from_collections(array_name, graph),
                array_name,
                chunks,
                dtype=arr.dtype,
                meta=np.empty((0, 0, 0), arr.dtype),
            )
        )
    return arrays[0], arrays[1]
