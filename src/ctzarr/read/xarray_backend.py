"""xarray backend ``engine="ctzarr"``: a case as a Dataset, a collection as a DataTree.

>>> import xarray as xr
>>> ds = xr.open_dataset("dap.zarr", engine="ctzarr", group="cases/case_000")  # doctest: +SKIP
>>> tree = xr.open_datatree("dap.zarr", engine="ctzarr")                        # doctest: +SKIP

A case opens through :func:`ctzarr.open_collection` (``collection[case_id]``), so the same
integrity checks and strict reads apply as with the library: the Dataset holds ``image`` and one
variable per segmentation (named after it) at one pyramid level (default 0), lazy dask arrays
with dims ``("z", "y", "x")``, coordinates in millimetres and ``attrs["affine"]``, exactly as
:attr:`ctzarr.Case.image` and :meth:`ctzarr.Case.labels` build them.

xarray imports this module (through the ``xarray.backends`` entry point) the first time it lists
its engines, whatever file is opened; the reading side (dask.array, the strict store) is
therefore imported when a ctzarr store is opened, not here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import xarray as xr
from xarray.backends import BackendEntrypoint

from ctzarr.errors import CaseNotFoundError
from ctzarr.io.urls import url_protocol
from ctzarr.model.collection import is_collection

if TYPE_CHECKING:
    from ctzarr.read.case import Case
    from ctzarr.read.collection import Collection

#: case groups are opened this many at a time from a remote store (each is one metadata read)
_REMOTE_OPEN_THREADS = 8


class CtzarrBackendEntrypoint(BackendEntrypoint):
    """Open ctzarr collections with xarray: ``engine="ctzarr"``.

    - ``xr.open_dataset(store, engine="ctzarr", group="cases/<case_id>")``: one case.
    - ``xr.open_datatree(store, engine="ctzarr")``: every case, at ``/cases/<case_id>``; the
      root node holds the collection's attributes.

    Parameters common to both: ``storage_options`` (fsspec options of a remote store),
    ``drop_variables`` (``"image"`` or segmentation names: those arrays are not opened) and
    ``level`` (pyramid level, default 0: the original voxels).
    """

    description = "ctzarr CT segmentation collections: image and segmentations of each case"
    open_dataset_parameters = (
        "filename_or_obj",
        "drop_variables",
        "group",
        "storage_options",
        "level",
    )
    supports_groups = True

    def guess_can_open(self, filename_or_obj: Any) -> bool:
        """True for a local directory holding a ctzarr collection (its root ``zarr.json``)."""
        if not isinstance(filename_or_obj, (str, os.PathLike)):
            return False
        path = os.fspath(filename_or_obj)
        if isinstance(path, bytes) or url_protocol(path):
            return False  # a remote store would need a request just to guess
        try:
            with open(Path(path) / "zarr.json", encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and is_collection(meta.get("attributes"))

    def open_dataset(
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        group: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        level: int = 0,
    ) -> xr.Dataset:
        """One case of a collection as a Dataset (see the class docstring).

        ``group`` names the case: ``"cases/<case_id>"`` (as in the store and the DataTree) or
        the bare case id. Without it the call fails, listing the cases: a collection holds many
        images and silently opening the first would hide that.
        """
        col = _open(filename_or_obj, storage_options)
        case_id = _case_id(col, group)
        return case_dataset(col[case_id], _names(drop_variables), level)

    def open_groups_as_dict(
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        group: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        level: int = 0,
    ) -> dict[str, xr.Dataset]:
        """``{"/": collection attributes, "/cases": empty, "/cases/<id>": case Dataset, ...}``,
        re-rooted at ``group`` when one is given (``"cases"`` or ``"cases/<case_id>"``)."""
        col = _open(filename_or_obj, storage_options)
        prefix = "/" + (group or "").strip("/")
        parts = [p for p in prefix.split("/") if p]
        if (parts and parts[0] != "cases") or len(parts) > 2:
            raise CaseNotFoundError(_naming_help(col, f"no group {group!r}"))
        case_ids = [_case_id(col, prefix)] if len(parts) == 2 else col.case_ids
        drop = _names(drop_variables)
        groups = {
            "/": xr.Dataset(attrs=collection_attributes(col)),
            "/cases": xr.Dataset(),
        }
        for case in _cases(col, case_ids):
            groups[f"/cases/{case.case_id}"] = case_dataset(case, drop, level)
        if prefix == "/":
            return groups
        return {
            "/" + path[len(prefix) :].lstrip("/"): ds
            for path, ds in groups.items()
            if path == prefix or path.startswith(prefix + "/")
        }

    def open_datatree(
        self,
        filename_or_obj: Any,
        *,
        drop_variables: str | Iterable[str] | None = None,
        group: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        level: int = 0,
    ) -> xr.DataTree:
        """The collection as a DataTree: a node ``cases/<case_id>`` per case."""
        groups = self.open_groups_as_dict(
            filename_or_obj,
            drop_variables=drop_variables,
            group=group,
            storage_options=storage_options,
            level=level,
        )
        return xr.DataTree.from_dict(groups)


def case_dataset(case: Case, drop: frozenset[str] = frozenset(), level: int = 0) -> xr.Dataset:
    """``image`` and each segmentation of a case at a pyramid level, lazily (nothing is read).

    Variables named in ``drop`` are not opened. Attributes are plain JSON values (the affine as
    nested lists) so that the Dataset writes to Zarr and netCDF as it is.
    """
    image = case.image_at(level)
    variables: dict[str, xr.DataArray] = {}
    if "image" not in drop:
        variables["image"] = image
    for seg in case.segmentation_names:
        if seg not in drop:
            variables[seg] = case.labels(seg, level)
    for var in variables.values():
        var.attrs = _plain(var.attrs)
        # chunks={} keeps the stored shards as dask chunks
        var.encoding["preferred_chunks"] = dict(zip(var.dims, var.data.chunksize, strict=True))
    coords = {dim: image.coords[dim] for dim in image.dims}
    ds = xr.Dataset(variables, coords=coords)
    ds = ds.drop_vars([n for n in drop if n in ds.variables])
    ds.attrs = _plain(
        {
            "case_id": case.case_id,
            "dataset_id": case.collection.dataset_id,
            "level": level,
            "affine": image.attrs["affine"],
            "spacing_mm": image.attrs["spacing_mm"],
            "units": "mm",
            "coordinates": image.attrs["coordinates"],
            "segmentations": case.segmentation_names,
        }
    )
    return ds


def collection_attributes(col: Collection) -> dict[str, Any]:
    """Attributes of the DataTree's root node: what the collection is."""
    return _plain(
        {
            "dataset_id": col.dataset_id,
            "layout": col.meta.layout,
            "format_version": col.meta.format_version,
            "segmentations": list(col.segmentations),
            "case_count": len(col),
        }
    )


def _open(filename_or_obj: Any, storage_options: Mapping[str, Any] | None) -> Collection:
    from ctzarr.read.collection import open_collection  # see the module docstring

    return open_collection(filename_or_obj, storage_options=storage_options)


def _case_id(col: Collection, group: str | None) -> str:
    """The case id a ``group`` argument names (``cases/<id>``, ``/cases/<id>`` or ``<id>``)."""
    parts = [p for p in (group or "").split("/") if p]
    if not parts:
        raise CaseNotFoundError(_naming_help(col, "open_dataset needs a case"))
    if len(parts) == 2 and parts[0] == "cases":
        return parts[1]
    if len(parts) == 1 and parts[0] != "cases":
        return parts[0]
    raise CaseNotFoundError(_naming_help(col, f"group {group!r} is not a case"))


def _naming_help(col: Collection, what: str) -> str:
    ids = col.case_ids
    shown = ", ".join(repr(c) for c in ids[:5]) + (
        f", ... ({len(ids)} cases)" if len(ids) > 5 else ""
    )
    example = ids[0] if ids else "<case_id>"
    return (
        f"{col.url}: {what}: pass group='cases/{example}' (one case; cases: {shown or 'none'}), "
        "or open them all with xr.open_datatree(..., engine='ctzarr')"
    )


def _cases(col: Collection, case_ids: list[str]) -> list[Case]:
    """Open cases (their metadata); a few at a time from a remote store."""
    from zarr.storage import LocalStore  # see the module docstring

    if len(case_ids) < 2 or isinstance(col.root.store, LocalStore):
        return [col[cid] for cid in case_ids]
    with ThreadPoolExecutor(min(_REMOTE_OPEN_THREADS, len(case_ids))) as pool:
        return list(pool.map(col.__getitem__, case_ids))


def _names(drop_variables: str | Iterable[str] | None) -> frozenset[str]:
    if drop_variables is None:
        return frozenset()
    if isinstance(drop_variables, str):
        return frozenset([drop_variables])
    return frozenset(drop_variables)


def _plain(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Attributes as JSON values: arrays and tuples as (nested) lists, numpy scalars as Python
    numbers, None values left out."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if value is None:
            continue
        if hasattr(value, "tolist"):
            value = value.tolist()
        elif isinstance(value, tuple):
            value = [v.item() if hasattr(v, "item") else v for v in value]
        out[key] = value
    return out
