"""Exceptions and warnings raised by ctzarr.

Every error derives from :class:`CtzarrError` and also from the builtin it resembles, so that
``except KeyError`` keeps working for code that does not know ctzarr. Messages name the file,
the case and the value at fault.
"""

from __future__ import annotations

__all__ = [
    "CaseExistsError",
    "CaseLockedError",
    "CaseMismatchError",
    "CaseNotFoundError",
    "CatalogError",
    "ChunkCorruptError",
    "ChunkMissingError",
    "ClientGoneError",
    "ConfigError",
    "CtzarrError",
    "CtzarrWarning",
    "IncompleteCaseError",
    "IndexUnavailableError",
    "InvalidCaseIdError",
    "InvalidNiftiError",
    "LabelMapError",
    "LayoutError",
    "MetadataError",
    "MissingDependencyError",
    "OutputPathError",
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
]


class CtzarrError(Exception):
    """Root of every error ctzarr raises on purpose."""


class ConfigError(CtzarrError, ValueError):
    """A setting (``ctzarr.config`` or its ``CTZARR_*`` environment variable) is malformed."""


class CtzarrWarning(UserWarning):
    """Root of every warning ctzarr emits (qform/sform disagreement, unknown units, ...)."""


class InvalidNiftiError(CtzarrError, ValueError):
    """A NIfTI file is malformed, truncated, corrupt or of an unsupported kind."""

    def __init__(self, path: str, fault: str, case_id: str | None = None) -> None:
        self.path = path
        self.fault = fault
        self.case_id = case_id
        where = f"case {case_id!r}: " if case_id else ""
        super().__init__(f"{where}{path}: {fault}")


class CaseMismatchError(CtzarrError, ValueError):
    """Image and segmentation of a case do not share shape or affine."""


class UnknownLabelError(CtzarrError, ValueError):
    """A segmentation holds label ids that its label map does not define."""


class LabelMapError(CtzarrError, ValueError):
    """A label map file is malformed (not id -> name, duplicate ids, bad colours)."""


class LayoutError(CtzarrError, ValueError):
    """A source directory matches no known dataset layout, or a manifest is malformed."""


class InvalidCaseIdError(CtzarrError, ValueError):
    """A case id could write outside the store or is not a plain name."""


class CaseExistsError(CtzarrError, FileExistsError):
    """A complete case with a different source digest is already in the store."""


class IncompleteCaseError(CtzarrError, KeyError):
    """A case exists in the store but was never committed (an interrupted conversion)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class CaseNotFoundError(CtzarrError, KeyError):
    """No case of that id in the collection; the message lists some of the ids it has."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class SegmentationNotFoundError(CtzarrError, KeyError):
    """No segmentation of that name in the collection or case (or none named where several exist)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StructureNotFoundError(CtzarrError, KeyError):
    """A structure name or id is not in the label map; the message lists close matches."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StoreError(CtzarrError, OSError):
    """A store is missing, not a ctzarr collection, or fails verification."""


class UnsupportedFormatError(StoreError):
    """A store or case was written in a newer store format than this release reads.

    Not damage (never repaired or removed): the message names the format version, the release
    that wrote it when the store says, and asks to upgrade ctzarr. Attributes ``where``,
    ``key``, ``version`` (the stored format) and ``readable`` (the newest this release reads).
    """

    def __init__(
        self, message: str, *, where: str = "", key: str = "", version: int = 0, readable: int = 0
    ) -> None:
        self.where = where
        self.key = key
        self.version = version
        self.readable = readable
        super().__init__(message)


class CatalogError(CtzarrError, KeyError):
    """A catalog entry is unknown or malformed."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StoreCorruptError(CtzarrError, ValueError):
    """A stored object or metadata document is damaged: unreadable (bad JSON or encoding,
    absurd nesting, missing keys), or not what the commit record says (bit rot, truncation,
    edits, same-size forgery, swaps between cases).

    The root of every store-damage error: :class:`ChunkCorruptError` (and its
    :class:`MetadataError`) and :class:`ChunkMissingError` derive from it, so ``except
    StoreCorruptError`` catches all damage, while callers catching those, ``ValueError`` or
    ``KeyError`` keep working. The message names the store-relative key (``zarr.json``,
    ``cases/<id>/zarr.json``, ``index/int_columns``) or the array and chunk; attribute
    ``store_key`` holds the key when one document is at fault. Damage is not a missing store
    (:class:`StoreError`) nor an interrupted update (:class:`TableMismatchError`).
    """

    def __init__(self, message: str = "", store_key: str | None = None) -> None:
        self.store_key = store_key
        super().__init__(message)

    def __reduce__(self) -> tuple[type[StoreCorruptError], tuple[str, str | None]]:
        return type(self), (str(self.args[0]) if self.args else "", self.store_key)


class ChunkMissingError(StoreCorruptError, KeyError):
    """A stored object that the case's manifest lists is missing (it would read as fill)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ChunkCorruptError(StoreCorruptError):
    """A stored object is truncated, corrupt, swapped, or would decompress beyond its size."""


class MetadataError(ChunkCorruptError):
    """Stored ctzarr attributes are malformed: a key missing, of the wrong type or out of range.

    A ``zarr.json`` is a stored object, so this is a :class:`ChunkCorruptError` (and a
    ``ValueError``). The message names the store or case and the key at fault; attributes
    ``where`` and ``key``.
    """

    def __init__(self, where: str, key: str, fault: str) -> None:
        self.where = where
        self.key = key
        self.fault = fault
        super().__init__(
            f"{where}: attribute {key}: {fault}" if where else f"attribute {key}: {fault}"
        )

    def __reduce__(self) -> tuple[type[MetadataError], tuple[str, str, str]]:  # type: ignore[override]
        return type(self), (self.where, self.key, self.fault)


class UnsafeStoreError(StoreError):
    """A store breaks a safety rule (codec, data type, caps, node names, links) before any read."""


class CaseLockedError(CtzarrError, OSError):
    """Another converter holds the case's lock (two converters aimed at one case)."""


class RemoteStoreError(StoreError):
    """A remote store call failed: retries exhausted, or a fault not worth retrying.

    The message names the operation, the URL of the key (without user info or query string),
    the fault, the attempts made and the time spent. Attributes: ``url``, ``operation``,
    ``fault``, ``attempts``, ``elapsed_s``, ``status`` (HTTP status or None).
    """

    url: str = ""
    operation: str = ""
    fault: str = ""
    attempts: int = 0
    elapsed_s: float = 0.0
    status: int | None = None


class RemotePermissionError(RemoteStoreError, PermissionError):
    """The server refused access (HTTP 401/403, S3 ``AccessDenied``...): never retried."""


class TableMismatchError(StoreError):
    """The collection table's arrays and attributes come from different updates (an interrupted one)."""


class ClientGoneError(CtzarrError, ConnectionError):
    """The dask client or scheduler went away while a job was unfinished."""


class MissingDependencyError(CtzarrError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra."""

    def __init__(self, module: str, extra: str, feature: str) -> None:
        self.module = module
        self.extra = extra
        self.feature = feature
        super().__init__(f'{feature} needs {module}: pip install "ctzarr[{extra}]"', name=module)

    def __reduce__(self) -> tuple[type[MissingDependencyError], tuple[str, str, str]]:
        return type(self), (self.module, self.extra, self.feature)


class IndexUnavailableError(StoreError):
    """A query needs index data that the case's store format does not hold (per-slice counts
    and sums, per-chunk counts: format 3), or a joint index that was not written.

    Not damage: the store predates the feature. The message names the case, the segmentation
    and the format version, and says how to get the data (convert again; ``ctzarr reindex``).
    """


class OutputPathError(CtzarrError, ValueError):
    """An output path a command cannot write: an extension that names no supported format, or
    a file where a folder is needed. The message names the option, the path and the formats."""
