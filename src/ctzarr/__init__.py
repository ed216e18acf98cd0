"""ctzarr: whole-body CT segmentation datasets as chunked OME-Zarr v3 stores, queried lazily.

>>> import ctzarr
>>> report = ctzarr.convert("DAP_Atlas/", "dap.zarr")          # doctest: +SKIP
>>> col = ctzarr.open_collection("dap.zarr")                   # doctest: +SKIP
>>> col["AutoPET_0011f3deaf_10445"].labels("anatomy")          # doctest: +SKIP
"""

from __future__ import annotations

__version__ = "0.1.0"

from .collection import Case, Collection, open_collection
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
