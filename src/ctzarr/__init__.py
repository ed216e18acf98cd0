"""ctzarr: whole-body CT segmentation datasets as chunked OME-Zarr v3 stores, queried lazily.

>>> import ctzarr
>>> report = ctzarr.convert("DAP_Atlas/", "dap.zarr")          # doctest: +SKIP
>>> col = ctzarr.open_collection("dap.zarr")                   # doctest: +SKIP
>>> col["AutoPET_0011f3deaf_10445"].labels("anatomy")          # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

from .convert import CaseResult, ConversionReport, convert
from .errors import (
    CaseExistsError,
    CaseMismatchError,
    CatalogError,
    CtzarrError,
    CtzarrWarning,
    IncompleteCaseError,
    InvalidCaseIdError,
    InvalidNiftiError,
    LabelMapError,
    LayoutError,
    StoreError,
    StructureNotFoundError,
    UnknownLabelError,
)
from .labelmaps import Label, LabelMap

if TYPE_CHECKING:
    from .collection import Case, Collection, open_collection

# The reading side pulls in dask.array, xarray and pandas (~1.5 s, ~140 MB); a conversion needs
# none of them, so they load on first use.
_LAZY = {"Case", "Collection", "open_collection"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import collection

        return getattr(collection, name)
    if name == "stats":
        import importlib

        return importlib.import_module(".stats", __name__)
    raise AttributeError(f"module 'ctzarr' has no attribute {name!r}")


__all__ = [
    "Case",
    "CaseExistsError",
    "CaseMismatchError",
    "CaseResult",
    "CatalogError",
    "Collection",
    "ConversionReport",
    "CtzarrError",
    "CtzarrWarning",
    "IncompleteCaseError",
    "InvalidCaseIdError",
    "InvalidNiftiError",
    "Label",
    "LabelMap",
    "LabelMapError",
    "LayoutError",
    "StoreError",
    "StructureNotFoundError",
    "UnknownLabelError",
    "__version__",
    "convert",
    "open_collection",
]
