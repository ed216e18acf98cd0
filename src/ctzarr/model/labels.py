"""Label maps: which structure each value of a segmentation mask stands for.

A :class:`LabelMap` is an immutable table of :class:`Label` entries (value, name as the source
spells it, normalized name, TotalSegmentator class name, display colour). Built-in maps ship as
package data copied from the project's reference tables:

- ``dap_atlas``: DAP Atlas, 144 values (0..144 without the disputed, unused id 11). Id 1
  ("Left to annotate") is a placeholder, not an anatomical structure.
- ``saros_body_regions`` (0..13) and ``saros_body_parts`` (0..6): SAROS, whose non-annotated
  axial slices hold the ignore value 255, kept in :attr:`LabelMap.ignore_value` and not a label.
- ``totalsegmentator_total`` (0..117) and the other TotalSegmentator tasks
  (:data:`TOTALSEGMENTATOR_TASKS`), from :func:`totalsegmentator_label_map`: TotalSegmentator's
  class ids and names (the mask file names of its outputs), 0 = background.

TotalSegmentator crosswalk
--------------------------
:func:`enrich` fills :attr:`Label.totalsegmentator_name` only when the correspondence is one to
one: by exact match of :func:`match_key` against the TotalSegmentator class maps (``total``,
``trunk_cavities``, ``tissue_types``, ``body``, ``breasts``, ``head_glands_cavities``), plus an
explicit rename table for DAP spellings (``bladder`` -> ``urinary_bladder``, ``clavicle left`` ->
``clavicula_left``, ``rib_cartilage`` -> ``costal_cartilages``, the neck vessels). A whole-organ
TotalSegmentator class is withheld from a label when the same map also holds parts of that
organ: DAP ``heart`` (105) sits beside the heart chambers and DAP ``sternum`` (92, the corpus)
beside ``manubrium of sternum`` (135), so neither equals TotalSegmentator ``heart``/``sternum``.

DAP ribs ("costa") are numbered by DAP itself, from the lowest rib upwards, which is the reverse
of TotalSegmentator (neck downwards; AtlasDataset issue #7). The maintainer's table suggests
``costa k side`` = ``rib_side_(13 - k)``, but only eight pairs could be read from the source
(``totalsegmentator_total_rib_ids_read`` in ``data/dap_atlas_labels.yaml``): costa 1..4 left and
right -> ``rib_left_12`` .. ``rib_left_9`` and ``rib_right_12`` .. ``rib_right_9``. Only these
are mapped; costa 5..12 get no TotalSegmentator name, because a user also reported that the rib
definitions may differ beyond the order, and we do not guess.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache, cached_property
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, TypeGuard

import yaml

from ctzarr.errors import LabelMapError, StructureNotFoundError

MAX_LABEL_VALUE = 65535


_NO_COLOUR = (0, 0, 0, 0)


_PUNCTUATION = re.compile(r"[\W_]+")


#: a label id written as text: ASCII digits only (int() would also take other scripts' digits)
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)


#: Unicode categories a name may not contain: control (C0, DEL, C1: newline, tab, NUL, U+0085),
#: format (invisible: zero-width characters, bidirectional overrides that make text display in
#: another order than it is stored), surrogates, private use, unassigned, and the line and
#: paragraph separators U+2028/U+2029. Structure names are human text from a dataset's label
#: file and may be in any script, so letters, marks, digits, punctuation, symbols and spaces of
#: every script stay allowed; what is refused is what cannot be seen, or breaks one-line
#: output, CSV rows and file names, or lets two different names look the same.
_NOT_IN_NAMES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


#: printable ASCII: the common case, checked by one regex instead of per character
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


def unprintable_character(text: str) -> str | None:
    """The first character of text that may not appear in a name (see above), or None."""
    if _PRINTABLE_ASCII.fullmatch(text):  # every collection open parses its label maps
        return None
    for ch in text:
        if unicodedata.category(ch) in _NOT_IN_NAMES:
            return ch
    return None


def check_name_text(text: str, what: str) -> None:
    """Raise :class:`LabelMapError` when text holds a control or other invisible character.

    The message shows the text with ``repr`` and names the character by its code point.
    """
    ch = unprintable_character(text)
    if ch is not None:
        kind = unicodedata.category(ch)
        raise LabelMapError(
            f"{what} {text!r} contains U+{ord(ch):04X} (Unicode category {kind}): names must "
            "be printable text without control characters or line separators"
        )


_ID_KEYS = ("label-value", "value", "id")


_LABEL_KEYS = frozenset(
    {"label-value", "name", "normalized_name", "totalsegmentator_name", "rgba", "placeholder"}
)


_MAP_KEYS = frozenset({"name", "background", "ignore_value", "labels"})


# "Left to annotate" in the DAP release, "unknown_tissue" in the Hugging Face repack's labels.json.
_PLACEHOLDER_KEYS = frozenset({"lefttoannotate", "unknowntissue"})


# DAP spellings whose TotalSegmentator class differs by more than separators and case.
_DAP_RENAMES = {
    "bladder": "urinary_bladder",
    "clavicle left": "clavicula_left",
    "clavicle right": "clavicula_right",
    "rib_cartilage": "costal_cartilages",
    "right common carotid artery": "common_carotid_artery_right",
    "left common carotid artery": "common_carotid_artery_left",
    "right brachiocephalic vein": "brachiocephalic_vein_right",
    "left brachiocephalic vein": "brachiocephalic_vein_left",
    "right subclavian artery": "subclavian_artery_right",
    "left subclavian artery": "subclavian_artery_left",
    # TotalSegmentator task headneck_bones_vessels, not total.
    "right internal carotid artery": "internal_carotid_artery_right",
    "left internal carotid artery": "internal_carotid_artery_left",
    "right internal jugular vein": "internal_jugular_vein_right",
    "left internal jugular vein": "internal_jugular_vein_left",
}


# A map holding any of these parts cannot mean the whole organ by the organ's own name.
_PARTS_OF = {
    "heart": frozenset(
        {
            "heartatriumleft",
            "heartatriumright",
            "heartventricleleft",
            "heartventricleright",
            "heartmyocardium",
            "hearttissue",
        }
    ),
    "sternum": frozenset({"manubriumofsternum", "sternummanubrium"}),
}


def normalize_name(name: str) -> str:
    """Normalize a structure name to lower-case snake case.

    Parameters
    ----------
    name : str
        Name as a source spells it.

    Returns
    -------
    str
        Lower case, every run of spaces, hyphens, underscores or other punctuation replaced by
        one ``"_"``, without leading or trailing ``"_"``: ``"Kidney left"`` -> ``"kidney_left"``.
    """
    return _PUNCTUATION.sub("_", name.lower()).strip("_")


def match_key(name: str) -> str:
    """Key under which two spellings of a structure name compare equal.

    Parameters
    ----------
    name : str
        Any spelling of a name.

    Returns
    -------
    str
        Lower case without spaces, hyphens, underscores or other punctuation, so that
        ``"kidney left"``, ``"kidney_left"`` and ``"Kidney-Left"`` share one key.
    """
    return _PUNCTUATION.sub("", name.lower())


def color_for(normalized_name: str) -> tuple[int, int, int, int]:
    """Stable display colour for a structure name.

    Parameters
    ----------
    normalized_name : str
        Structure name; it is normalized again, so any spelling of a name gives one colour.

    Returns
    -------
    tuple of int
        ``(r, g, b, 255)`` derived from a SHA-256 of the normalized name, each channel in
        64..255 so that no structure is near-black; ``(0, 0, 0, 0)`` for ``"background"``.
    """
    key = normalize_name(normalized_name)
    if key == "background":
        return _NO_COLOUR
    r, g, b = (64 + byte * 3 // 4 for byte in hashlib.sha256(key.encode()).digest()[:3])
    return (r, g, b, 255)


@dataclass(frozen=True)
class Label:
    """One value of a label mask.

    Attributes
    ----------
    value : int
        Label id in the mask, 0..65535.
    name : str
        Name as the source table spells it.
    normalized_name : str
        ``normalize_name(name)`` unless the table gives a better one.
    totalsegmentator_name : str or None
        TotalSegmentator class name when the correspondence is one to one.
    rgba : tuple of int
        Display colour; ``(0, 0, 0, 0)`` for background (and for "not yet coloured").
    placeholder : bool
        True for a "not yet annotated" value such as DAP id 1 ("Left to annotate").
    """

    value: int
    name: str
    normalized_name: str
    totalsegmentator_name: str | None = None
    rgba: tuple[int, int, int, int] = _NO_COLOUR
    placeholder: bool = False

    def __post_init__(self) -> None:
        where = f"label {self.value!r} ({self.name!r})"
        _check_value(self.value, where)
        if not isinstance(self.name, str) or not self.name.strip():
            raise LabelMapError(f"{where}: name must be a non-empty string")
        if not isinstance(self.normalized_name, str):
            raise LabelMapError(f"{where}: normalized_name must be a string")
        if not (self.totalsegmentator_name is None or isinstance(self.totalsegmentator_name, str)):
            raise LabelMapError(f"{where}: totalsegmentator_name must be a string or null")
        for field, text in (
            ("name", self.name),
            ("normalized_name", self.normalized_name),
            ("totalsegmentator_name", self.totalsegmentator_name or ""),
        ):
            try:
                check_name_text(text, field)
            except LabelMapError as exc:
                raise LabelMapError(f"label {self.value!r}: {exc}") from None
        if not isinstance(self.placeholder, bool):
            raise LabelMapError(f"{where}: placeholder must be true or false")
        rgba = self.rgba
        if not (
            isinstance(rgba, tuple)
            and len(rgba) == 4
            and all(_is_int(c) and 0 <= c <= 255 for c in rgba)
        ):
            raise LabelMapError(f"{where}: rgba must be 4 integers 0..255, got {rgba!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``totalsegmentator_name`` and ``placeholder`` only when set.

        Returns
        -------
        dict
            Keys ``"label-value"``, ``"name"``, ``"normalized_name"``,
            ``"totalsegmentator_name"`` (omitted when None), ``"rgba"`` (a list) and
            ``"placeholder"`` (omitted when False).
        """
        d: dict[str, Any] = {
            "label-value": self.value,
            "name": self.name,
            "normalized_name": self.normalized_name,
        }
        if self.totalsegmentator_name is not None:
            d["totalsegmentator_name"] = self.totalsegmentator_name
        d["rgba"] = list(self.rgba)
        if self.placeholder:
            d["placeholder"] = True
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Label:
        """Inverse of :meth:`to_dict`.

        Parameters
        ----------
        d : Mapping
            Dict as written by :meth:`to_dict`. ``normalized_name`` defaults to
            ``normalize_name(name)`` and ``rgba`` to ``(0, 0, 0, 0)``.

        Returns
        -------
        Label

        Raises
        ------
        LabelMapError
            Unknown or missing keys, a value that is not an integer 0..65535, a name that is not
            a string, or an rgba that is not 4 integers 0..255.
        """
        if not isinstance(d, Mapping):
            raise LabelMapError(f"label entry must be a mapping, got {d!r}")
        unknown = sorted(str(k) for k in d if k not in _LABEL_KEYS)
        if unknown:
            raise LabelMapError(f"label entry {dict(d)!r}: unknown keys {unknown}")
        if "label-value" not in d or "name" not in d:
            raise LabelMapError(f"label entry {dict(d)!r}: needs 'label-value' and 'name'")
        name = d["name"]
        if not isinstance(name, str):
            raise LabelMapError(f"label {d['label-value']!r}: name must be a string, got {name!r}")
        rgba = d.get("rgba", _NO_COLOUR)
        if not isinstance(rgba, Sequence) or isinstance(rgba, str):
            raise LabelMapError(
                f"label {d['label-value']!r} ({name!r}): rgba must be 4 integers, got {rgba!r}"
            )
        return cls(
            value=d["label-value"],
            name=name,
            normalized_name=d.get("normalized_name") or normalize_name(name),
            totalsegmentator_name=d.get("totalsegmentator_name"),
            rgba=tuple(rgba),  # length and range checked in __post_init__
            placeholder=d.get("placeholder", False),
        )


@dataclass(frozen=True)
class LabelMap:
    """Immutable label table of one kind of mask.

    Attributes
    ----------
    name : str
        ``"dap_atlas"``, ``"saros_body_regions"``, ``"saros_body_parts"`` or a user-given name.
    labels : tuple of Label
        Sorted by value (sorted on construction), unique values; includes the background label
        when the source table has it.
    background : int or None
        Value of the background, normally 0.
    ignore_value : int or None
        Value of voxels that were not annotated (SAROS: 255); never one of ``labels``.
    """

    name: str
    labels: tuple[Label, ...]
    background: int | None = 0
    ignore_value: int | None = None

    def __post_init__(self) -> None:
        where = f"label map {self.name!r}"
        if not isinstance(self.name, str) or not self.name:
            raise LabelMapError(f"label map name must be a non-empty string, got {self.name!r}")
        check_name_text(self.name, "label map name")
        if not all(isinstance(lab, Label) for lab in self.labels):
            raise LabelMapError(f"{where}: labels must be Label instances")
        labels = tuple(sorted(self.labels, key=lambda lab: lab.value))
        if not labels:
            raise LabelMapError(f"{where}: has no labels")
        for prev, lab in itertools.pairwise(labels):
            if prev.value == lab.value:
                raise LabelMapError(
                    f"{where}: duplicate id {lab.value} ({prev.name!r} and {lab.name!r})"
                )
        object.__setattr__(self, "labels", labels)  # frozen: canonical order set once, here
        for field in ("background", "ignore_value"):
            value = getattr(self, field)
            if value is not None:
                _check_value(value, f"{where}: {field}")
        if self.ignore_value is not None and self.ignore_value in self:
            raise LabelMapError(
                f"{where}: ignore_value {self.ignore_value} is also a label "
                f"({self[self.ignore_value].name!r})"
            )

    @cached_property
    def _by_value(self) -> dict[int, Label]:
        """Labels by value."""
        return {lab.value: lab for lab in self.labels}

    @cached_property
    def _by_key(self) -> tuple[dict[str, tuple[Label, ...]], ...]:
        """Labels by match key of name, normalized_name and totalsegmentator_name, in that order."""
        tiers: list[dict[str, tuple[Label, ...]]] = []
        for attr in ("name", "normalized_name", "totalsegmentator_name"):
            tier: dict[str, tuple[Label, ...]] = {}
            for lab in self.labels:
                text = getattr(lab, attr)
                if text:
                    key = match_key(text)
                    tier[key] = (*tier.get(key, ()), lab)
            tiers.append(tier)
        return tuple(tiers)

    @property
    def values(self) -> tuple[int, ...]:
        """Label values in ascending order."""
        return tuple(lab.value for lab in self.labels)

    @property
    def max_value(self) -> int:
        """Largest value a mask of this map may hold (labels and ignore value)."""
        return max(self.labels[-1].value, -1 if self.ignore_value is None else self.ignore_value)

    def __getitem__(self, value: int) -> Label:
        label = self._by_value.get(value) if _is_int(value) else None
        if label is None:
            raise StructureNotFoundError(f"no label value {value!r} in label map {self.name!r}")
        return label

    def __contains__(self, value: object) -> bool:
        return _is_int(value) and value in self._by_value

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    def structures(self) -> tuple[Label, ...]:
        """Labels other than the background (placeholders included).

        Returns
        -------
        tuple of Label
        """
        return tuple(lab for lab in self.labels if lab.value != self.background)

    def resolve(self, structure: str | int) -> Label:
        """Find a label by id or by any spelling of its name.

        Parameters
        ----------
        structure : str or int
            Label value (an int or a string of digits), or a name, normalized name or
            TotalSegmentator name, compared with :func:`match_key`. Names beat normalized names,
            which beat TotalSegmentator names.

        Returns
        -------
        Label

        Raises
        ------
        StructureNotFoundError
            The structure is not in the map (the message lists up to 5 close matches), or the
            name fits more than one label.
        """
        if isinstance(structure, int) and not isinstance(structure, bool):
            return self[structure]
        if not isinstance(structure, str):
            raise StructureNotFoundError(
                f"structure must be a name or an integer id, got {structure!r}"
            )
        if _INTEGER.fullmatch(structure):
            return self[int(structure)]
        key = match_key(structure)
        for tier in self._by_key:
            hits = tier.get(key, ())
            if len(hits) == 1:
                return hits[0]
            if hits:
                ids = ", ".join(f"{lab.value} ({lab.name!r})" for lab in hits)
                raise StructureNotFoundError(
                    f"structure {structure!r} is ambiguous in label map {self.name!r}: {ids}"
                )
        display = {k: labs[0].name for tier in reversed(self._by_key) for k, labs in tier.items()}
        close = difflib.get_close_matches(key, list(display), n=5)
        names = list(dict.fromkeys(display[k] for k in close))
        hint = "close matches: " + ", ".join(map(repr, names)) if names else "no close matches"
        raise StructureNotFoundError(
            f"no structure {structure!r} in label map {self.name!r}; {hint}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; :meth:`from_dict` restores an equal map.

        Returns
        -------
        dict
            Keys ``"name"``, ``"background"``, ``"ignore_value"`` and ``"labels"`` (a list of
            :meth:`Label.to_dict`).
        """
        return {
            "name": self.name,
            "background": self.background,
            "ignore_value": self.ignore_value,
            "labels": [lab.to_dict() for lab in self.labels],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LabelMap:
        """Inverse of :meth:`to_dict`; does not enrich.

        Parameters
        ----------
        d : Mapping
            Dict as written by :meth:`to_dict`.

        Returns
        -------
        LabelMap

        Raises
        ------
        LabelMapError
            Unknown or missing keys, invalid labels, duplicate values.
        """
        if not isinstance(d, Mapping):
            raise LabelMapError(f"label map must be a mapping, got {type(d).__name__}")
        unknown = sorted(str(k) for k in d if k not in _MAP_KEYS)
        if unknown:
            raise LabelMapError(f"label map {d.get('name')!r}: unknown keys {unknown}")
        labels = d.get("labels")
        if not isinstance(labels, Sequence) or isinstance(labels, str):
            raise LabelMapError(f"label map {d.get('name')!r}: 'labels' must be a list")
        return cls(
            name=d.get("name"),  # type: ignore[arg-type]  # checked in __post_init__
            labels=tuple(Label.from_dict(entry) for entry in labels),
            background=d.get("background", 0),
            ignore_value=d.get("ignore_value"),
        )


def parse_label_map(obj: Any, *, name: str, ignore_value: int | None = None) -> LabelMap:
    """Build an enriched label map from a parsed JSON or YAML table.

    Parameters
    ----------
    obj : Any
        One of

        - ``{id: name}`` with int or digit-string ids, as in the DAP Hugging Face repack's
          ``labels.json``; keys starting with ``"_"`` (``"_source"``, ``"_note"``) are skipped;
        - ``{"labels": <table>, "background": ..., "ignore_value": ...}``, other keys ignored
          (so the reference YAML files and :meth:`LabelMap.to_dict` output load);
        - a list of ``{"label-value" | "value" | "id": int, "name": str, "rgba": [...], ...}``.
    name : str
        Name of the map.
    ignore_value : int, optional
        Value of non-annotated voxels; overrides ``obj["ignore_value"]``. A table entry with
        this value (SAROS ``255: ignore``) is dropped.

    Returns
    -------
    LabelMap
        Passed through :func:`enrich`.

    Raises
    ------
    LabelMapError
        Non-integer, negative or too large ids, duplicate ids, non-string names, bad colours;
        the message names the map and the entry.
    """
    try:
        background: int | None = 0
        table = obj
        if isinstance(obj, Mapping) and "labels" in obj:
            table = obj["labels"]
            background = obj.get("background", 0)
            if ignore_value is None:
                ignore_value = obj.get("ignore_value")
        if isinstance(table, Mapping):
            labels = _labels_from_mapping(table)
        elif isinstance(table, Sequence) and not isinstance(table, str | bytes):
            labels = _labels_from_list(table)
        else:
            raise LabelMapError(
                f"expected a mapping id -> name or a list of entries, got {type(table).__name__}"
            )
        kept = tuple(lab for lab in labels if lab.value != ignore_value)
        return enrich(LabelMap(name, kept, background, ignore_value))
    except LabelMapError as exc:
        raise LabelMapError(f"label map {name!r}: {exc}") from None


def load_label_map_file(path: str | os.PathLike[str], *, name: str | None = None) -> LabelMap:
    """Read a label map from a local ``.json``, ``.yaml`` or ``.yml`` file.

    Files at fsspec URLs are read by the source layer (:mod:`ctzarr.sources.layouts`), which
    hands their text to :func:`parse_label_map_text`.

    Parameters
    ----------
    path : str or os.PathLike
        File in any form :func:`parse_label_map` accepts. Duplicate keys are an error, not
        silently overwritten.
    name : str, optional
        Name of the map; defaults to the file stem.

    Returns
    -------
    LabelMap

    Raises
    ------
    LabelMapError
        Unsupported suffix, unparsable file or invalid table; the message starts with the path.
    OSError
        The file cannot be read.
    """
    p = Path(path)
    suffix = label_map_file_suffix(str(p))
    text = p.read_text(encoding="utf-8")
    return parse_label_map_text(text, suffix=suffix, name=name or p.stem, where=str(p))


def label_map_file_suffix(filename: str) -> str:
    """The lower-case suffix (``.json``, ``.yaml`` or ``.yml``) of a label map file name or URL.

    Raises
    ------
    LabelMapError
        Any other suffix; the message starts with ``filename``.
    """
    suffix = PurePosixPath(filename).suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise LabelMapError(
            f"{filename}: unsupported label map file type {suffix!r} (use .json or .yaml)"
        )
    return suffix


def parse_label_map_text(text: str, *, suffix: str, name: str, where: str) -> LabelMap:
    """Parse the text of a label map file (no I/O): JSON for ``.json``, else YAML.

    Parameters
    ----------
    text : str
        The file's content, in any form :func:`parse_label_map` accepts. Duplicate keys are an
        error, not silently overwritten.
    suffix : str
        The file's suffix, as :func:`label_map_file_suffix` returns it.
    name : str
        Name of the map.
    where : str
        The file, for error messages.

    Raises
    ------
    LabelMapError
        Unparsable text or invalid table; the message starts with ``where``.
    """
    try:
        if suffix == ".json":
            obj = json.loads(text, object_pairs_hook=_unique_pairs)
        else:
            obj = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
        return parse_label_map(obj, name=name)
    except (ValueError, yaml.YAMLError) as exc:  # LabelMapError and JSONDecodeError included
        raise LabelMapError(f"{where}: {exc}") from exc


def builtin_label_map(name: str) -> LabelMap:
    """Label map shipped with ctzarr.

    Parameters
    ----------
    name : str
        One of :func:`builtin_label_map_names`.

    Returns
    -------
    LabelMap
        ``"dap_atlas"``: 144 values 0..144 without 11, id 1 a placeholder.
        ``"saros_body_regions"``: 0..13, ``"saros_body_parts"``: 0..6, both with ignore value 255.

    Raises
    ------
    LabelMapError
        Unknown name; the message lists the available names.
    """
    if name not in _BUILTIN_NAMES:
        raise LabelMapError(
            f"unknown built-in label map {name!r}; available: {', '.join(_BUILTIN_NAMES)}"
        )
    return _builtin(name)


def builtin_label_map_names() -> tuple[str, ...]:
    """Names accepted by :func:`builtin_label_map`.

    Returns
    -------
    tuple of str
    """
    return _BUILTIN_NAMES


def enrich(label_map: LabelMap) -> LabelMap:
    """Fill missing normalized names, TotalSegmentator names, colours and placeholder flags.

    Values already present are kept, so enriching twice changes nothing. See the module
    docstring for how TotalSegmentator names are matched.

    Parameters
    ----------
    label_map : LabelMap

    Returns
    -------
    LabelMap
        Equal to ``label_map`` except for the filled fields. The background gets
        ``(0, 0, 0, 0)`` and no TotalSegmentator name; every other label without a colour gets
        :func:`color_for` of its normalized name; names such as "Left to annotate" or
        "unknown_tissue" become placeholders.
    """
    present = {match_key(t) for lab in label_map for t in (lab.name, lab.normalized_name) if t}
    filled: list[Label] = []
    inferred: set[int] = set()
    for lab in label_map:
        norm = lab.normalized_name or normalize_name(lab.name)
        is_background = lab.value == label_map.background or norm == "background"
        ts = lab.totalsegmentator_name
        if ts is None and not is_background:
            ts = _infer_ts_name(lab.name, norm, present)
            if ts is not None:
                inferred.add(lab.value)
        rgba = lab.rgba
        if rgba == _NO_COLOUR and not is_background:
            rgba = color_for(norm)
        placeholder = lab.placeholder or match_key(lab.name) in _PLACEHOLDER_KEYS
        filled.append(
            replace(
                lab,
                normalized_name=norm,
                totalsegmentator_name=ts,
                rgba=rgba,
                placeholder=placeholder,
            )
        )
    # Two labels claiming one TotalSegmentator class make the guess ambiguous for both.
    claims = Counter(lab.totalsegmentator_name for lab in filled)
    filled = [
        replace(lab, totalsegmentator_name=None)
        if lab.value in inferred and claims[lab.totalsegmentator_name] > 1
        else lab
        for lab in filled
    ]
    return replace(label_map, labels=tuple(filled))


#: TotalSegmentator tasks with a class map in package data (``data/totalsegmentator_total_labels
#: .yaml``, read from TotalSegmentator's ``map_to_binary.class_map``), ``total`` first
TOTALSEGMENTATOR_TASKS = (
    "total",
    "trunk_cavities",
    "tissue_types",
    "body",
    "breasts",
    "head_glands_cavities",
)


#: prefix of the built-in label map of a TotalSegmentator task (``totalsegmentator_total``)
TOTALSEGMENTATOR_PREFIX = "totalsegmentator_"


_BUILTIN_NAMES = ("dap_atlas", "saros_body_regions", "saros_body_parts")


def totalsegmentator_label_map(task: str) -> LabelMap:
    """The label map of a TotalSegmentator task: its class ids and names, 0 = background.

    Parameters
    ----------
    task : str
        One of :data:`TOTALSEGMENTATOR_TASKS`.

    Returns
    -------
    LabelMap
        Named ``totalsegmentator_<task>``; each label's name and TotalSegmentator name are the
        class name TotalSegmentator writes (``kidney_left``, the stem of ``kidney_left.nii.gz``).

    Raises
    ------
    LabelMapError
        Unknown task; the message lists the known ones.
    """
    if task not in TOTALSEGMENTATOR_TASKS:
        raise LabelMapError(
            f"unknown TotalSegmentator task {task!r}; known: {', '.join(TOTALSEGMENTATOR_TASKS)}"
        )
    return _builtin(TOTALSEGMENTATOR_PREFIX + task)


@cache
def _builtin(name: str) -> LabelMap:
    """Parse one built-in map from package data (cached: maps are immutable)."""
    if name.startswith(TOTALSEGMENTATOR_PREFIX):
        classes = _read_data("totalsegmentator_total_labels.yaml")[
            name.removeprefix(TOTALSEGMENTATOR_PREFIX)
        ]
        table: dict[int, Any] = {0: "background"}
        table.update({int(k): {"name": v, "totalsegmentator_name": v} for k, v in classes.items()})
        return parse_label_map(table, name=name)
    if name == "dap_atlas":
        doc = _read_data("dap_atlas_labels.yaml")
        return parse_label_map(
            {"labels": doc["labels"], "background": doc["background"]}, name=name
        )
    doc = _read_data("saros_labels.yaml")
    return parse_label_map(
        doc[name.removeprefix("saros_")], name=name, ignore_value=doc["ignore_value"]
    )


@cache
def _read_data(filename: str) -> dict[str, Any]:
    """Load a YAML file from ``ctzarr/data``."""
    text = resources.files("ctzarr").joinpath("data", filename).read_text(encoding="utf-8")
    doc: dict[str, Any] = yaml.load(text, Loader=_UniqueKeyLoader)
    return doc


@cache
def _ts_index() -> dict[str, str]:
    """Match key -> TotalSegmentator class name over all tasks in package data, unique keys only."""
    names: dict[str, set[str]] = {}
    for task in _read_data("totalsegmentator_total_labels.yaml").values():
        for ts_name in task.values():
            names.setdefault(match_key(ts_name), set()).add(ts_name)
    return {key: next(iter(found)) for key, found in names.items() if len(found) == 1}


@cache
def _crosswalk() -> dict[str, str]:
    """Match key of a DAP name -> TotalSegmentator name, from the renames and the costa pairs."""
    walk = {match_key(dap): ts for dap, ts in _DAP_RENAMES.items()}
    dap = _read_data("dap_atlas_labels.yaml")
    total = _read_data("totalsegmentator_total_labels.yaml")["total"]
    for dap_id, ts_id in dap["totalsegmentator_total_rib_ids_read"].items():
        walk[match_key(dap["labels"][dap_id])] = total[ts_id]
    return walk


def _infer_ts_name(name: str, normalized: str, present: set[str]) -> str | None:
    """TotalSegmentator name for a label, or None unless the match is one to one."""
    for key in dict.fromkeys((match_key(name), match_key(normalized))):
        ts = _crosswalk().get(key) or _ts_index().get(key)
        if ts is not None:
            return None if _PARTS_OF.get(ts, frozenset()) & present else ts
    return None


def _labels_from_mapping(table: Mapping[Any, Any]) -> list[Label]:
    """Labels of an ``{id: name}`` table (``{id: {"name": ..., ...}}`` also accepted)."""
    labels: dict[int, Label] = {}
    for key, entry in table.items():
        if isinstance(key, str) and key.startswith("_"):
            continue  # metadata such as "_source" and "_note" in the DAP repack's labels.json
        value = _parse_id(key)
        if isinstance(entry, Mapping):
            label = _label_from_entry({**entry, "label-value": value}, f"id {key!r}")
        elif isinstance(entry, str) and entry.strip():
            # only spaces are trimmed: a newline or tab left in a name is refused by Label
            label = Label(value, entry.strip(" "), normalize_name(entry))
        else:
            raise LabelMapError(f"id {key!r}: name must be a non-empty string, got {entry!r}")
        _add_unique(labels, label)
    return list(labels.values())


def _labels_from_list(items: Sequence[Any]) -> list[Label]:
    """Labels of a list of ``{"label-value"/"value"/"id": int, "name": str, ...}`` entries."""
    labels: dict[int, Label] = {}
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise LabelMapError(f"entry {i}: expected a mapping, got {item!r}")
        id_keys = [k for k in _ID_KEYS if k in item]
        if len(id_keys) != 1:
            raise LabelMapError(f"entry {i} {dict(item)!r}: needs exactly one of {_ID_KEYS}")
        entry = {k: v for k, v in item.items() if k not in _ID_KEYS}
        entry["label-value"] = item[id_keys[0]]
        _add_unique(labels, _label_from_entry(entry, f"entry {i}"))
    return list(labels.values())


def _label_from_entry(entry: Mapping[str, Any], where: str) -> Label:
    """Label.from_dict with a stripped name and the entry named in errors."""
    name = entry.get("name")
    try:
        return Label.from_dict(
            {**entry, "name": name.strip(" ") if isinstance(name, str) else name}
        )
    except LabelMapError as exc:
        raise LabelMapError(f"{where}: {exc}") from None


def _add_unique(labels: dict[int, Label], label: Label) -> None:
    """Add a label, rejecting a second label with the same value."""
    if label.value in labels:
        raise LabelMapError(
            f"duplicate id {label.value} ({labels[label.value].name!r} and {label.name!r})"
        )
    labels[label.value] = label


def _parse_id(key: object) -> int:
    """Label id from an int or a string of digits."""
    if _is_int(key):
        value = key
    elif isinstance(key, str) and _INTEGER.fullmatch(key):
        value = int(key)
    else:
        raise LabelMapError(f"non-integer id {key!r}")
    _check_value(value, f"id {key!r}")
    return value


def _check_value(value: object, where: str) -> None:
    """Raise unless value is an int label value 0..65535."""
    if not _is_int(value) or not 0 <= value <= MAX_LABEL_VALUE:
        raise LabelMapError(
            f"{where}: value must be an integer 0..{MAX_LABEL_VALUE}, got {value!r}"
        )


def _is_int(value: object) -> TypeGuard[int]:
    """True for int but not bool (YAML reads 'yes' as True)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object_pairs_hook that rejects duplicate keys instead of keeping the last."""
    d: dict[str, Any] = {}
    for key, value in pairs:
        if key in d:
            raise LabelMapError(f"duplicate key {key!r}")
        d[key] = value
    return d


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise LabelMapError(f"duplicate key {key!r} (line {line})")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)
