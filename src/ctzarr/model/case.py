"""The attributes of a case group: geometry, the NIfTI header summary, source files, commit.

A case group's ``zarr.json`` holds an OME ``multiscales`` block and a ``ctzarr`` block
(:class:`CaseAttributes`); each segmentation's label image group holds an OME ``image-label``
block and a small ``ctzarr`` block (:class:`SegmentationAttributes`). A case is committed
(visible) once its ``ctzarr.complete`` is true: that marker is written last.

Format 2 places every array for outside readers: the case group and every label image group
hold a NIfTI-Zarr ``nifti`` header array (the image's header; each segmentation's own header
with the stored label dtype and no scaling), and their OME axes carry the RFC-4 anatomical
orientation with a translation at every level, derived from the affine
(:mod:`ctzarr.model.ome`). OME 0.5 has no rotation: for an oblique affine the orientation is
each axis's dominant direction and the translation the origin's coordinate along it (an
approximation); the exact affine is ``ctzarr.affine`` and the ``nifti`` arrays. Format-1 cases
have neither (readers must not require them).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from nibabel.volumeutils import apply_read_scaling

from ctzarr.errors import MetadataError
from ctzarr.model.attributes import (
    CTZARR_KEY,
    FORMAT_VERSION,
    Affine,
    check_format_version,
    parse_affine,
    parse_block,
    parse_bool,
    parse_dtype,
    parse_float,
    parse_format_version,
    parse_int,
    parse_optional_str,
    parse_shape,
    parse_spacing,
    parse_str,
    parse_str_list,
    require,
)
from ctzarr.model.layout import level_shapes
from ctzarr.model.manifest import Integrity, Manifest
from ctzarr.model.ome import image_attributes, parse_level_paths
from ctzarr.model.table import CaseGeometry

_K = CTZARR_KEY


def apply_scaling(raw: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """Values of raw voxels under a NIfTI header scaling, exactly as nibabel's ArrayProxy.

    The factors are typed as nibabel types them (Python floats, so float64; the intercept
    cast to the slope's type when it can be), then :func:`nibabel.volumeutils.
    apply_read_scaling` is applied (elementwise: slabs and whole volumes give the same values
    and dtype). ``(1.0, 0.0)`` returns ``raw`` itself.
    """
    s = np.asanyarray(slope)
    i = np.asanyarray(inter)
    if np.can_cast(i, s.dtype):
        i = i.astype(s.dtype)
    # nibabel annotates scalars; its ArrayProxy passes these 0-d arrays, and so must we
    out: np.ndarray = apply_read_scaling(raw, s, i)  # type: ignore[arg-type]
    return out


@dataclass(frozen=True)
class NiftiBlock:
    """What the case keeps of the source image's NIfTI header (``ctzarr.nifti``)."""

    version: int
    raw_dtype: np.dtype[Any]  # stored (native byte order) dtype of the image arrays
    source_byteorder: Literal["big", "little"]
    value_dtype: np.dtype[Any]  # dtype of the values read back (scaling applied)
    scl_slope: float
    scl_inter: float
    qform_code: int
    sform_code: int
    notes: tuple[str, ...] = ()

    @property
    def scaled(self) -> bool:
        """True when the header scaling changes values."""
        return (self.scl_slope, self.scl_inter) != (1.0, 0.0)

    def scale(self, raw: np.ndarray) -> np.ndarray:
        """Values of stored voxels (see :func:`apply_scaling`)."""
        return apply_scaling(raw, self.scl_slope, self.scl_inter) if self.scaled else raw

    def to_attributes(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "raw_dtype": self.raw_dtype.str,
            "source_byteorder": self.source_byteorder,
            "value_dtype": self.value_dtype.str,
            "scl_slope": self.scl_slope,
            "scl_inter": self.scl_inter,
            "qform_code": self.qform_code,
            "sform_code": self.sform_code,
            "notes": list(self.notes),
        }

    @classmethod
    def from_attributes(cls, d: Any, where: str = "", prefix: str = f"{_K}.nifti") -> NiftiBlock:
        if not isinstance(d, Mapping):
            raise MetadataError(where, prefix, f"expected a JSON object, got {d!r}")

        def get(key: str) -> Any:
            return require(d, key, prefix, where)

        version = parse_int(get("version"), f"{prefix}.version", where)
        if version not in (1, 2):
            raise MetadataError(where, f"{prefix}.version", f"expected 1 or 2, got {version!r}")
        order = get("source_byteorder")
        if order not in ("big", "little"):
            raise MetadataError(
                where, f"{prefix}.source_byteorder", f"expected 'big' or 'little', got {order!r}"
            )
        return cls(
            version=version,
            raw_dtype=parse_dtype(get("raw_dtype"), f"{prefix}.raw_dtype", where),
            source_byteorder=order,
            value_dtype=parse_dtype(get("value_dtype"), f"{prefix}.value_dtype", where),
            scl_slope=parse_float(get("scl_slope"), f"{prefix}.scl_slope", where),
            scl_inter=parse_float(get("scl_inter"), f"{prefix}.scl_inter", where),
            qform_code=parse_int(get("qform_code"), f"{prefix}.qform_code", where, minimum=0),
            sform_code=parse_int(get("sform_code"), f"{prefix}.sform_code", where, minimum=0),
            notes=parse_str_list(d.get("notes", []), f"{prefix}.notes", where),
        )


@dataclass(frozen=True)
class SourceFile:
    """One source file of a case: path (relative to the dataset root), size, mtime, digest."""

    path: str
    size: int
    mtime: float | None
    sha256: str | None = None

    def to_attributes(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "size": self.size, "mtime": self.mtime}
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return out

    @classmethod
    def from_attributes(cls, d: Any, where: str = "", prefix: str = "") -> SourceFile:
        if not isinstance(d, Mapping):
            raise MetadataError(where, prefix, f"expected a JSON object, got {d!r}")
        mtime = d.get("mtime")
        return cls(
            path=parse_str(require(d, "path", prefix, where), f"{prefix}.path", where),
            size=parse_int(require(d, "size", prefix, where), f"{prefix}.size", where, minimum=0),
            mtime=None if mtime is None else parse_float(mtime, f"{prefix}.mtime", where),
            sha256=parse_optional_str(d.get("sha256"), f"{prefix}.sha256", where),
        )


@dataclass(frozen=True)
class CaseAttributes:
    """The ``ctzarr`` attributes of a case group (and the OME block derived from them).

    Before the commit ``manifest`` is None and ``complete`` False; :meth:`committed` adds both
    (and the time) for the final write of the case's ``zarr.json``.
    """

    case_id: str
    shape_zyx: tuple[int, int, int]
    spacing_zyx: tuple[float, float, float]
    affine: Affine
    nifti: NiftiBlock
    segmentations: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = field(default_factory=dict)
    source_files: Mapping[str, SourceFile] = field(default_factory=dict)
    run: str | None = None
    manifest: Manifest | None = None
    complete: bool = False
    committed_at: str | None = None
    format_version: int = FORMAT_VERSION
    #: digests of the commit record (format 2; see ctzarr.model.manifest), written last
    integrity: Integrity | None = None

    @property
    def affine_matrix(self) -> np.ndarray:
        """The NIfTI affine as a 4 x 4 float64 array."""
        return np.asarray(self.affine, dtype=np.float64)

    @property
    def level_shapes(self) -> list[tuple[int, int, int]]:
        """Shapes of the pyramid levels."""
        return level_shapes(self.shape_zyx)

    def geometry(self) -> CaseGeometry:
        """What statistics need to know of the case besides its index."""
        return CaseGeometry(
            self.case_id,
            self.affine_matrix,
            self.spacing_zyx,
            self.shape_zyx,
            self.nifti.value_dtype,
        )

    def committed(self, manifest: Manifest, committed_at: str) -> CaseAttributes:
        """These attributes with the commit marker, for the last write of the case."""
        return replace(self, manifest=manifest, complete=True, committed_at=committed_at)

    def to_attributes(self) -> dict[str, Any]:
        """The case group's attributes (``ome`` and ``ctzarr``), as stored."""
        block: dict[str, Any] = {
            "format_version": self.format_version,
            "case_id": self.case_id,
            "shape_zyx": list(self.shape_zyx),
            "spacing_zyx": list(self.spacing_zyx),
            "affine": [list(row) for row in self.affine],
            "nifti": self.nifti.to_attributes(),
            "segmentations": list(self.segmentations),
            "attributes": dict(self.attributes),
            "source": {"files": {k: f.to_attributes() for k, f in self.source_files.items()}},
            "run": self.run,
        }
        if self.manifest is not None:
            block["manifest"] = self.manifest.to_dict()
        if self.complete or self.manifest is not None:
            block["complete"] = self.complete
        if self.committed_at is not None:
            block["committed_at"] = self.committed_at
        if self.integrity is not None:
            block["integrity"] = self.integrity.to_dict()
        return {"ome": self.ome_attributes(), _K: block}

    @property
    def placed(self) -> bool:
        """True when the OME metadata places the arrays (format 2: anatomical orientation and
        translations) and every label image group has its ``nifti`` header array."""
        return self.format_version >= 2

    def ome_attributes(self) -> dict[str, Any]:
        """The case group's ``ome`` block (format 1: without orientation, as it was written)."""
        return image_attributes(
            self.case_id,
            self.spacing_zyx,
            self.level_shapes,
            self.affine_matrix if self.placed else None,
        )

    @classmethod
    def from_attributes(cls, attributes: Mapping[str, Any], where: str = "") -> CaseAttributes:
        """Parse a case group's attributes; raises :class:`~ctzarr.errors.MetadataError`.

        A committed case must carry its manifest (a malformed one raises too). A case of a
        newer store format raises :class:`~ctzarr.errors.UnsupportedFormatError` before anything
        else is parsed.
        """
        check_format_version(attributes, where)
        d = parse_block(attributes, _K, where)

        def get(key: str) -> Any:
            return require(d, key, _K, where)

        shape = parse_shape(get("shape_zyx"), f"{_K}.shape_zyx", where)
        complete = d.get("complete", False) is True
        manifest = d.get("manifest")
        if complete or manifest is not None:
            parsed_manifest: Manifest | None = Manifest.from_dict(manifest, where)
        else:
            parsed_manifest = None
        source = d.get("source", {})
        files = source.get("files", {}) if isinstance(source, Mapping) else None
        if not isinstance(files, Mapping):
            raise MetadataError(
                where, f"{_K}.source.files", f"expected a JSON object, got {source!r}"
            )
        user_attributes = d.get("attributes", {})
        if not isinstance(user_attributes, Mapping):
            raise MetadataError(
                where, f"{_K}.attributes", f"expected a JSON object, got {user_attributes!r}"
            )
        out = cls(
            case_id=parse_str(get("case_id"), f"{_K}.case_id", where),
            shape_zyx=shape,
            spacing_zyx=parse_spacing(get("spacing_zyx"), f"{_K}.spacing_zyx", where),
            affine=parse_affine(get("affine"), f"{_K}.affine", where),
            nifti=NiftiBlock.from_attributes(get("nifti"), where),
            segmentations=parse_str_list(d.get("segmentations", []), f"{_K}.segmentations", where),
            attributes=dict(user_attributes),
            source_files={
                str(role): SourceFile.from_attributes(rec, where, f"{_K}.source.files.{role}")
                for role, rec in files.items()
            },
            run=parse_optional_str(d.get("run"), f"{_K}.run", where),
            manifest=parsed_manifest,
            complete=complete,
            committed_at=parse_optional_str(d.get("committed_at"), f"{_K}.committed_at", where),
            format_version=parse_format_version(
                get("format_version"), f"{_K}.format_version", where
            ),
            integrity=Integrity.parse(d.get("integrity"), where, f"{_K}.integrity"),
        )
        if "ome" in attributes:
            paths = parse_level_paths(attributes["ome"], where)
            if len(paths) != len(out.level_shapes):
                raise MetadataError(
                    where,
                    "ome.multiscales",
                    f"{len(paths)} levels listed, the case's shape_zyx {list(shape)} has "
                    f"{len(out.level_shapes)}",
                )
        return out


def is_committed(attributes: Mapping[str, Any]) -> bool:
    """True when a case group's attributes carry the commit marker (``ctzarr.complete``)."""
    block = attributes.get(_K)
    return isinstance(block, Mapping) and block.get("complete") is True


def without_commit_marker(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """A case group's attributes with ``ctzarr.complete = false`` (the case disappears)."""
    out = copy.deepcopy(dict(attributes))
    block = out.get(_K)
    if not isinstance(block, dict):
        block = out[_K] = {}
    block["complete"] = False
    return out


@dataclass(frozen=True)
class SegmentationAttributes:
    """The ``ctzarr`` attributes of a segmentation's label image group."""

    label_map: str  # the label map's name; the full map is in the collection attributes
    ignore_value: int | None
    sparse: bool
    source_file: str | None

    def to_attributes(self) -> dict[str, Any]:
        """The ``ctzarr`` part of the label image group's attributes (beside its ``ome``)."""
        return {
            _K: {
                "label_map": self.label_map,
                "ignore_value": self.ignore_value,
                "sparse": self.sparse,
                "source_file": self.source_file,
            }
        }

    @classmethod
    def from_attributes(
        cls, attributes: Mapping[str, Any], where: str = ""
    ) -> SegmentationAttributes:
        d = parse_block(attributes, _K, where)
        ignore = d.get("ignore_value")
        return cls(
            label_map=parse_str(require(d, "label_map", _K, where), f"{_K}.label_map", where),
            ignore_value=None
            if ignore is None
            else parse_int(ignore, f"{_K}.ignore_value", where, minimum=0),
            sparse=parse_bool(d.get("sparse", False), f"{_K}.sparse", where),
            source_file=parse_optional_str(d.get("source_file"), f"{_K}.source_file", where),
        )
