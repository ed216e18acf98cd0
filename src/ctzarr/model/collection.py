"""The attributes of a collection's root group: dataset, label maps, committed case list."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ctzarr.errors import LabelMapError, MetadataError
from ctzarr.model.attributes import (
    CTZARR_KEY,
    FORMAT_VERSION,
    parse_block,
    parse_bool,
    parse_format_version,
    parse_optional_str,
    parse_str,
    parse_str_list,
    require,
)
from ctzarr.model.labels import LabelMap

_K = CTZARR_KEY

#: ``ctzarr.kind`` of a collection's root group
COLLECTION_KIND = "collection"


def is_collection(attributes: Any) -> bool:
    """True when a root group's attributes say it is a ctzarr collection (``ctzarr.kind``)."""
    if not isinstance(attributes, Mapping):
        return False
    block = attributes.get(_K)
    return isinstance(block, Mapping) and block.get("kind") == COLLECTION_KIND


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

    def with_cases(self, cases: list[str] | tuple[str, ...]) -> CollectionAttributes:
        """These attributes listing ``cases`` as the committed cases."""
        return replace(self, cases=tuple(cases))

    def to_attributes(self) -> dict[str, Any]:
        """The root group's attributes, as stored."""
        return {
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
        }

    @classmethod
    def from_attributes(
        cls, attributes: Mapping[str, Any], where: str = ""
    ) -> CollectionAttributes:
        """Parse a root group's attributes; raises :class:`~ctzarr.errors.MetadataError`.

        Check :func:`is_collection` first to tell a foreign store from a damaged collection.
        """
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
                label_maps[str(name)] = LabelMap.from_dict(value)
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
                require(d, "format_version", _K, where), f"{_K}.format_version", where
            ),
        )
