"""ctzarr: whole-body CT segmentation datasets as chunked OME-Zarr v3 stores, queried lazily.

>>> import ctzarr
>>> report = ctzarr.convert("DAP_Atlas/", "dap.zarr")          # doctest: +SKIP
>>> col = ctzarr.open_collection("dap.zarr")                   # doctest: +SKIP
>>> col["AutoPET_0011f3deaf_10445"].labels("anatomy")          # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import config
from ._version import __version__
from .errors import (
    CaseExistsError,
    CaseLockedError,
    CaseMismatchError,
    CaseNotFoundError,
    CatalogError,
    ChunkCorruptError,
    ChunkMissingError,
    ClientGoneError,
    ConfigError,
    CtzarrError,
    CtzarrWarning,
    IncompleteCaseError,
    IndexUnavailableError,
    InvalidCaseIdError,
    InvalidNiftiError,
    LabelMapError,
    LayoutError,
    MetadataError,
    MissingDependencyError,
    OutputPathError,
    RemotePermissionError,
    RemoteStoreError,
    SegmentationNotFoundError,
    StoreCorruptError,
    StoreError,
    StructureNotFoundError,
    TableMismatchError,
    UnknownLabelError,
    UnsafeStoreError,
    UnsupportedFormatError,
)
from .model.labels import Label, LabelMap

if TYPE_CHECKING:
    from .read.case import Case
    from .read.collection import Collection, open_collection
    from .train.sampler import PatchSampler
    from .write.convert import CaseResult, ConversionReport, convert

# The reading side pulls in dask.array, xarray and pandas (~1.5 s, ~140 MB); a conversion needs
# none of them, so they load on first use. The writing side (numba, the case writer) loads on
# first use too: xarray imports ctzarr (its "ctzarr" engine) whenever it lists its engines, for
# any file it opens.
_LAZY = {"Case", "Collection", "open_collection"}
_LAZY_WRITE = {"CaseResult", "ConversionReport", "convert"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from .read import case, collection

        return getattr(case if name == "Case" else collection, name)
    if name in _LAZY_WRITE:
        from .write import convert

        return getattr(convert, name)
    if name == "PatchSampler":  # over the reading side: loads it on first use too
        from .train import sampler

        return sampler.PatchSampler
    raise AttributeError(f"module 'ctzarr' has no attribute {name!r}")


__all__ = [
    "Case",
    "CaseExistsError",
    "CaseLockedError",
    "CaseMismatchError",
    "CaseNotFoundError",
    "CaseResult",
    "CatalogError",
    "ChunkCorruptError",
    "ChunkMissingError",
    "ClientGoneError",
    "Collection",
    "ConfigError",
    "ConversionReport",
    "CtzarrError",
    "CtzarrWarning",
    "IncompleteCaseError",
    "IndexUnavailableError",
    "InvalidCaseIdError",
    "InvalidNiftiError",
    "Label",
    "LabelMap",
    "LabelMapError",
    "LayoutError",
    "MetadataError",
    "MissingDependencyError",
    "OutputPathError",
    "PatchSampler",
    "RemotePermissionError",
    "RemoteStoreError",
    "SegmentationNotFoundError",
    "StoreCorruptError",
    "StoreError",
    "StructureNotFoundError",
    "TableMismatchError",
    "UnknownLabelError",
    "UnsafeStoreError",
    "UnsupportedFormatError",
    "__version__",
    "config",
    "convert",
    "open_collection",
]
