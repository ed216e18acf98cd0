"""The attributes of a collection's root group: dataset, label maps, committed case list."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ctzarr.errors import LabelMapError, MetadataError
from ctzarr.model.attributes import (
    CTZARR_KEY,
    FORMAT_VERSION,
    check_format_version,
    parse_block,
    parse_bool,
    parse_format_version,
    parse_optional_str,
    parse_str,
    parse_str_list,
    require,
)
from ctzarr.model.labels import LabelMap
from ctzarr.model.manifest import Integrity
from ctzarr.model.ome import OME_VERSION

_K = CTZARR_KEY

#: ``ctzarr.kind`` of a collection's root group
COLLECTION_KIND = "collection"

#: the group beside ``cases/`` that lists the case images for OME-Zarr readers: OME-Zarr 0.5's
#: way to describe a collection of images is the bioformats2raw layout (root
#: ``ome["bioformats2raw.layout"] = 3``, and an ``OME`` group whose ``series`` lists the image
#: paths), so a tool given the store root finds every case at ``cases/<case_id>``
OME_SERIES_GROUP = "OME"


def is_collection(attributes: Any) -> bool:
    """True when a root group's attributes say it is a ctzarr collection (``ctzarr.kind``)."""
    if not isinstance(attributes, Mapping):
        return False
    block = attributes.get(_K)
    return isinstance(block, Mapping) and block.get("kind") == COLLECTION_KIND


@functools.lru_cache(maxsize=32)
def _label_map(document: str) -> LabelMap:
    """A label map from its JSON text, validated once per process: every open of a collection
    reads the same few maps, and validating a 144-label map cost ~2.5 ms, about a tenth of a
    cold crop. LabelMap is immutable, so opens may share it; a malformed map raises every time
    (lru_cache keeps results, not exceptions)."""
    return LabelMap.from_dict(json.loads(document))


@dataclass(frozen=True)
class CollectionAttributes:
    """The ``ctzarr`` attributes of a collection's root group."""

    dataset_id: str
    layout: str | None
    segmentations: Mapping[str, LabelMap]
    sparse: Mapping[str, bool] = field(default_factory=dict)
    cases: tuple[str, ...] = ()
    writer: str | None = None
    format_version: int = FORMAT_VERSION
    #: digests of the collection's commit record and of the table it lists (format 2)
    integrity: Integrity | None = None

    def with_cases(self, cases: list[str] | tuple[str, ...]) -> CollectionAttributes:
        """These attributes listing ``cases`` as the committed cases."""
        return replace(self, cases=tuple(cases))

    def to_attributes(self) -> dict[str, Any]:
        """The root group's attributes, as stored."""
        return {
            # format 2: the root is an OME-Zarr bioformats2raw group (see OME_SERIES_GROUP)
            **({"ome": _bioformats2raw_root()} if self.format_version >= 2 else {}),
            _K: {
                "kind": COLLECTION_KIND,
                "format_version": self.format_version,
                "dataset_id": self.dataset_id,
                "layout": self.layout,
                "segmentations": {k: v.to_dict() for k, v in self.segmentations.items()},
                "sparse": dict(self.sparse),
                "cases": list(self.cases),
                "writer": self.writer,
            }
            | ({} if self.integrity is None else {"integrity": self.integrity.to_dict()}),
        }

    def series_attributes(self) -> dict[str, Any]:
        """Attributes of the :data:`OME_SERIES_GROUP` group: the path of every committed case.

        An empty collection lists none (``series``, when present, names at least one image).
        """
        series = [f"cases/{case_id}" for case_id in self.cases]
        return {"ome": {"version": OME_VERSION, **({"series": series} if series else {})}}

    @classmethod
    def from_attributes(
        cls, attributes: Mapping[str, Any], where: str = ""
    ) -> CollectionAttributes:
        """Parse a root group's attributes; raises :class:`~ctzarr.errors.MetadataError`.

        Check :func:`is_collection` first to tell a foreign store from a damaged collection.
        """
        check_format_version(attributes, where)
        d = parse_block(attributes, _K, where)
        kind = d.get("kind")
        if kind != COLLECTION_KIND:
            raise MetadataError(where, f"{_K}.kind", f"expected {COLLECTION_KIND!r}, got {kind!r}")
        segs = d.get("segmentations", {})
        if not isinstance(segs, Mapping):
            raise MetadataError(
                where, f"{_K}.segmentations", f"expected a JSON object, got {segs!r}"
            )
        label_maps = {}
        for name, value in segs.items():
            try:
                label_maps[str(name)] = _label_map(json.dumps(value, sort_keys=True))
            except (LabelMapError, KeyError, TypeError, ValueError) as exc:
                raise MetadataError(where, f"{_K}.segmentations.{name}", str(exc)) from None
        sparse = d.get("sparse", {})
        if not isinstance(sparse, Mapping):
            raise MetadataError(where, f"{_K}.sparse", f"expected a JSON object, got {sparse!r}")
        return cls(
            dataset_id=parse_str(require(d, "dataset_id", _K, where), f"{_K}.dataset_id", where),
            layout=parse_optional_str(d.get("layout"), f"{_K}.layout", where),
            segmentations=label_maps,
            sparse={str(k): parse_bool(v, f"{_K}.sparse.{k}", where) for k, v in sparse.items()},
            cases=parse_str_list(d.get("cases", []), f"{_K}.cases", where),
            writer=parse_optional_str(d.get("writer"), f"{_K}.writer", where),
            format_version=parse_format_version(
                require(d, "format_version", _K, where),
                f"{_K}.format_version",
                where,
                writer=d.get("writer") if isinstance(d.get("writer"), str) else None,
            ),
            integrity=Integrity.parse(d.get("integrity"), where, f"{_K}.integrity"),
        )


def _bioformats2raw_root() -> dict[str, Any]:
    """The OME block of a collection's root: a bioformats2raw collection of images."""
    return {"version": OME_VERSION, "bioformats2raw.layout": 3}
