"""Dataset layouts: where the files of each case are, and which label maps apply.

- ``dap_atlas``: ``images/<name>.nii.gz`` + ``masks/<name>.nii.gz`` + optional ``labels.json``
  (the built-in 144-id table when it is missing); one segmentation, ``anatomy``.
- ``saros``: ``case_XXX/image.nii.gz``, ``body-regions.nii.gz`` (``body_regions``),
  ``body-parts.nii.gz`` (``body_parts``); 255 = ignore; an optional case CSV (column ``id``).
- ``totalsegmentator``: ``<image_id>/ct.nii.gz`` + ``<image_id>/segmentations/<structure>.nii.gz``
  (one 0/1 mask per structure, merged into TotalSegmentator's ``total`` label map; masks of
  other tasks such as ``tissue_types`` become further segmentations, see
  :mod:`ctzarr.sources.totalsegmentator`) + an optional ``meta.csv`` (``image_id``, ``;`` or ``,``).
- ``pairs``: a CSV manifest ``case_id, image, <segmentation>...`` with label maps given per
  segmentation (``--labels FILE`` or ``--labels NAME=FILE``).
"""

from __future__ import annotations

import csv
import io
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec

from ctzarr.errors import InvalidCaseIdError, LayoutError
from ctzarr.io.urls import url_protocol
from ctzarr.model.labels import (
    TOTALSEGMENTATOR_TASKS,
    LabelMap,
    builtin_label_map,
    label_map_file_suffix,
    parse_label_map_text,
    totalsegmentator_label_map,
)
from ctzarr.sources.totalsegmentator import (
    CT_FILE,
    MASK_FOLDER,
    META_CSV,
    mask_stem,
    parse_meta_csv,
    task_folder,
    task_of_mask,
)

LAYOUTS = ("dap_atlas", "saros", "totalsegmentator", "pairs")


#: a case id: plain ASCII letters, digits, '.', '_' and '-' (no look-alikes from other scripts,
#: no control characters), matched as a whole with fullmatch and anchored with \A...\Z: with
#: re.match and "^...$", "AutoPET_x\n" passed, because "$" also matches before a final newline
_CASE_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


#: a segmentation name (a pairs manifest column): it names a node of every case, so it is a
#: plain ASCII name too (no '.', which would read as a file suffix), matched as a whole
_SEGMENTATION_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,127}\Z")


_NII = (".nii.gz", ".nii")


def validate_case_id(case_id: str, *, where: str = "") -> str:
    """Return the case id, or raise if it could escape the store or is not a plain name.

    The message names ``where`` (the file or manifest line) and shows the id with ``repr``, so
    that a newline, a NUL or a look-alike letter is visible.
    """
    if (
        not isinstance(case_id, str)
        or not _CASE_ID.fullmatch(case_id)
        or ".." in case_id
        or case_id.lower() == "zarr.json"
    ):  # would collide with the cases group's metadata
        raise InvalidCaseIdError(
            f"{where + ': ' if where else ''}invalid case id {case_id!r}: use letters, digits, '.', '_' "
            "and '-' (no path separators, no '..', at most 128 characters)"
        )
    return case_id


@dataclass(frozen=True)
class CaseSpec:
    """The files of one case.

    ``segmentations`` maps a segmentation to its one label file; ``masks`` maps a segmentation
    made of one binary mask per structure (``totalsegmentator``) to its files, by file name
    (``liver.nii.gz``).
    """

    case_id: str
    image: str
    segmentations: Mapping[str, str]
    attributes: Mapping[str, Any] = field(default_factory=dict)
    masks: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetSource:
    """A dataset found at a source location, ready to convert."""

    layout: str
    root: str
    cases: tuple[CaseSpec, ...]
    label_maps: Mapping[str, LabelMap]
    sparse: Mapping[str, bool]
    dataset_id: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)


def _fs(url: str, storage_options: Mapping[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url, **storage_options)
    return fs, path.rstrip("/")


def _strip_nii(name: str) -> str | None:
    for ext in _NII:
        if name.endswith(ext):
            return name[: -len(ext)]
    return None


def detect_layout(source: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Name the layout of a source directory (or manifest file)."""
    so = dict(storage_options or {})
    fs, path = _fs(source, so)
    if fs.isfile(path):
        if path.endswith((".csv", ".tsv")):
            return "pairs"
        raise LayoutError(f"{source}: a file source must be a CSV manifest (pairs layout)")
    if not fs.isdir(path):
        raise LayoutError(f"{source}: no such directory")
    if fs.isdir(f"{path}/images") and fs.isdir(f"{path}/masks"):
        return "dap_atlas"
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    if any(
        fs.isfile(f"{path}/{n}/body-regions.nii.gz") or fs.isfile(f"{path}/{n}/body-parts.nii.gz")
        for n in names
        if n.startswith("case_")
    ):
        return "saros"
    if any(
        fs.isfile(f"{path}/{n}/{CT_FILE}") and fs.isdir(f"{path}/{n}/{MASK_FOLDER}") for n in names
    ):
        return "totalsegmentator"
    if "manifest.csv" in names:
        return "pairs"
    raise LayoutError(
        f"{source}: matches no known layout (dap_atlas: images/ and masks/; saros: case_XXX/ with "
        f"body-regions.nii.gz; totalsegmentator: <case>/{CT_FILE} and <case>/{MASK_FOLDER}/; "
        "pairs: manifest.csv); name one with --layout"
    )


def load_source(
    source: str,
    *,
    layout: str | None = None,
    labels: Sequence[str] | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> DatasetSource:
    """Find the cases and label maps of a dataset.

    Parameters
    ----------
    source : str
        Directory (or manifest CSV for ``pairs``), local or fsspec URL.
    layout : str, optional
        One of :data:`LAYOUTS`; detected when omitted.
    labels : str or list of str, optional
        Label map files: ``FILE`` (every segmentation) or ``NAME=FILE`` (one segmentation).
    """
    so = dict(storage_options or {})
    source = str(source)
    layout = layout or detect_layout(source, so)
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    loader = {
        "dap_atlas": _dap_atlas,
        "saros": _saros,
        "totalsegmentator": _totalsegmentator,
        "pairs": _pairs,
    }[layout]
    return loader(source, so, _label_args(labels))


def _label_args(labels: Sequence[str] | str | None) -> dict[str | None, str]:
    if labels is None:
        return {}
    items = [labels] if isinstance(labels, str) else list(labels)
    out: dict[str | None, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if sep and "/" not in name and name:
            out[name] = path
        else:
            out[None] = item
    return out


def _label_map_for(
    name: str,
    label_files: Mapping[str | None, str],
    default: LabelMap | None,
    so: Mapping[str, Any],
) -> LabelMap:
    path = label_files.get(name) or label_files.get(None)
    if path:
        return _read_label_map(path, name, so)
    if default is None:
        raise LayoutError(
            f"segmentation {name!r} needs a label map: pass --labels {name}=FILE (JSON or YAML id -> name)"
        )
    return default


def _read_label_map(path: str, name: str, so: Mapping[str, Any]) -> LabelMap:
    """A label map file, local or at an fsspec URL (read with the source's storage options)."""
    suffix = label_map_file_suffix(path)
    with fsspec.open(path, "rb", **(so if url_protocol(path) else {})) as f:
        data: bytes = f.read()
    return parse_label_map_text(data.decode("utf-8"), suffix=suffix, name=name, where=path)


def _dap_atlas(
    source: str, so: dict[str, Any], label_files: Mapping[str | None, str]
) -> DatasetSource:
    fs, root = _fs(source, so)
    images = _nifti_files(source, fs, f"{root}/images")
    masks = _nifti_files(source, fs, f"{root}/masks")
    missing = sorted(set(images) ^ set(masks))
    cases = []
    for name in sorted(set(images) & set(masks)):
        cases.append(
            CaseSpec(
                name, _url(source, fs, images[name]), {"anatomy": _url(source, fs, masks[name])}
            )
        )
    if missing:
        raise LayoutError(f"{source}: images without masks or masks without images: {missing[:10]}")
    if not cases:
        raise LayoutError(f"{source}: no cases found in images/ and masks/")
    labels_json = f"{root}/labels.json"
    if "anatomy" not in label_files and None not in label_files and fs.isfile(labels_json):
        label_files = {"anatomy": _url(source, fs, labels_json)}
    lm = _label_map_for("anatomy", label_files, builtin_label_map("dap_atlas"), so)
    return DatasetSource(
        "dap_atlas", source, tuple(cases), {"anatomy": lm}, {"anatomy": False}, "dap_atlas", so
    )


def _nifti_files(source: str, fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, str]:
    """Case id -> path of the NIfTI files in a folder; every id checked (the file named)."""
    found = {}
    for p in fs.ls(folder, detail=False):
        name = posixpath.basename(p)
        stem = _strip_nii(name)
        if stem is not None:  # the file name as repr: a newline in it stays visible, on one line
            where = f"{_url(source, fs, folder)}: file {name!r}"
            found[validate_case_id(stem, where=where)] = p
    return found


def _url(source: str, fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path listed by fs, as a URL of the same kind as source."""
    if not url_protocol(source):
        return path
    return fs.unstrip_protocol(path)  # type: ignore[no-any-return]


_SAROS_FILES = {"body_regions": "body-regions.nii.gz", "body_parts": "body-parts.nii.gz"}


def _saros(source: str, so: dict[str, Any], label_files: Mapping[str | None, str]) -> DatasetSource:
    fs, root = _fs(source, so)
    rows = _saros_csv(fs, root)
    cases = []
    for p in sorted(fs.ls(root, detail=False)):
        name = posixpath.basename(p.rstrip("/"))
        if not name.startswith("case_") or not fs.isdir(p):
            continue
        validate_case_id(name, where=f"{source}: folder {name!r}")
        segs = {seg: f"{p}/{fn}" for seg, fn in _SAROS_FILES.items() if fs.isfile(f"{p}/{fn}")}
        image = f"{p}/image.nii.gz"
        if not fs.isfile(image):
            raise LayoutError(f"{source}: case {name!r} has no image.nii.gz")
        cases.append(
            CaseSpec(
                name,
                _url(source, fs, image),
                {k: _url(source, fs, v) for k, v in segs.items()},
                rows.get(name, {}),
            )
        )
    if not cases:
        raise LayoutError(f"{source}: no case_XXX directories found")
    maps = {
        seg: _label_map_for(seg, label_files, builtin_label_map(f"saros_{seg}"), so)
        for seg in _SAROS_FILES
    }
    return DatasetSource(
        "saros", source, tuple(cases), maps, dict.fromkeys(_SAROS_FILES, True), "saros", so
    )


def _saros_csv(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict[str, str]]:
    """Rows of the case CSV (any CSV at the root with an ``id`` column), keyed by case id."""
    for p in sorted(fs.ls(root, detail=False)):
        if p.endswith(".csv") and fs.isfile(p):
            text = fs.cat_file(p).decode("utf-8-sig")
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames and "id" in reader.fieldnames:
                return {
                    row["id"]: {k: v for k, v in row.items() if k and k != "id"} for row in reader
                }
    return {}


def _totalsegmentator(
    source: str, so: dict[str, Any], label_files: Mapping[str | None, str]
) -> DatasetSource:
    """Case folders holding ct.nii.gz and mask folders; see :mod:`ctzarr.sources.totalsegmentator`.

    A case folder is a folder holding ``ct.nii.gz`` or ``segmentations/``; one with masks and
    no image is an error of the dataset. Label maps are TotalSegmentator's (``--labels``
    overrides one by segmentation name); the collection has each task that any case has masks of.
    """
    fs, root = _fs(source, so)
    meta_path = f"{root}/{META_CSV}"
    rows = (
        parse_meta_csv(fs.cat_file(meta_path).decode("utf-8"), _url(source, fs, meta_path))
        if fs.isfile(meta_path)
        else {}
    )
    # one listing of the whole tree (a single paginated listing on an object store, not two
    # requests per case): <case>/ct.nii.gz and <case>/<mask folder>/<file>
    images: set[str] = set()
    found: dict[str, dict[str, dict[str, str]]] = {}
    for f in fs.find(root, maxdepth=3):
        parts = f[len(root) + 1 :].split("/")
        if len(parts) == 2 and parts[1] == CT_FILE:
            images.add(parts[0])
        elif len(parts) == 3 and (parts[1] == MASK_FOLDER or task_folder(parts[1])):
            filename = parts[2]
            if mask_stem(filename) is None:
                continue
            # a name no task knows stays with "total" (or the folder's task): converting the
            # case then fails naming it and the closest names, and the other cases go on
            task = task_folder(parts[1]) or task_of_mask(filename) or "total"
            found.setdefault(parts[0], {}).setdefault(task, {})[filename] = _url(source, fs, f)
    cases = []
    for name in sorted(images | set(found)):
        validate_case_id(name, where=f"{source}: folder {name!r}")
        if name not in images:
            raise LayoutError(f"{source}: case {name!r} has masks but no {CT_FILE}")
        masks = found.get(name, {})
        cases.append(
            CaseSpec(
                name,
                _url(source, fs, f"{root}/{name}/{CT_FILE}"),
                {},
                rows.get(name, {}),
                {
                    task: dict(sorted(masks[task].items()))
                    for task in TOTALSEGMENTATOR_TASKS
                    if task in masks
                },
            )
        )
    if not cases:
        raise LayoutError(f"{source}: no case folders with {CT_FILE} found")
    present = [t for t in TOTALSEGMENTATOR_TASKS if any(t in c.masks for c in cases)]
    maps = {
        task: _label_map_for(task, label_files, totalsegmentator_label_map(task), so)
        for task in present
    }
    return DatasetSource(
        "totalsegmentator",
        source,
        tuple(cases),
        maps,
        dict.fromkeys(present, False),
        "totalsegmentator",
        so,
    )


def _pairs(source: str, so: dict[str, Any], label_files: Mapping[str | None, str]) -> DatasetSource:
    fs, path = _fs(source, so)
    manifest = path if fs.isfile(path) else f"{path}/manifest.csv"
    base = posixpath.dirname(manifest)
    try:
        text = fs.cat_file(manifest).decode("utf-8-sig")
    except FileNotFoundError as exc:
        raise LayoutError(f"{source}: manifest not found") from exc
    delim = "\t" if manifest.endswith(".tsv") else ","
    try:
        reader = csv.DictReader(io.StringIO(text), delimiter=delim)
        cols = reader.fieldnames or []
        # (line where the record starts, record): a quoted field may span lines
        rows: list[tuple[int, dict[Any, Any]]] = []
        start = reader.line_num + 1
        for row in reader:
            rows.append((start, row))
            start = reader.line_num + 1
    except csv.Error as exc:  # e.g. a field beyond the csv module's size limit
        raise LayoutError(f"{manifest}: unreadable CSV: {exc}") from exc
    if "case_id" not in cols or "image" not in cols:
        raise LayoutError(f"{manifest}: manifest needs columns case_id and image (has {cols})")
    seg_cols = [c for c in cols if c not in ("case_id", "image")]
    if not seg_cols:
        raise LayoutError(
            f"{manifest}: no segmentation columns (one column per segmentation, named after it)"
        )
    for c in seg_cols:
        if not isinstance(c, str) or not _SEGMENTATION_NAME.fullmatch(c):
            raise LayoutError(
                f"{manifest}: segmentation column {c!r} is not a plain name (ASCII letters, "
                "digits, '_' and '-', at most 128 characters)"
            )
    cases = []
    seen = set()
    for line, row in rows:
        # only spaces are trimmed: a newline, tab or other control character is refused
        cid = validate_case_id((row.get("case_id") or "").strip(" "), where=f"{manifest}:{line}")
        if cid in seen:
            raise LayoutError(f"{manifest}:{line}: duplicate case id {cid!r}")
        seen.add(cid)

        def resolve(p: str) -> str:
            p = p.strip()
            if url_protocol(p) or p.startswith("/"):
                return p
            return _url(source, fs, f"{base}/{p}")

        image = (row.get("image") or "").strip()
        if not image:
            raise LayoutError(f"{manifest}:{line}: case {cid!r} has no image")
        segs = {c: resolve(row[c]) for c in seg_cols if (row.get(c) or "").strip()}
        cases.append(CaseSpec(cid, resolve(image), segs))
    if not cases:
        raise LayoutError(f"{manifest}: no cases")
    maps = {c: _label_map_for(c, label_files, None, so) for c in seg_cols}
    sparse = {c: maps[c].ignore_value is not None for c in seg_cols}
    dataset_id = posixpath.basename(base.rstrip("/")) or "pairs"
    return DatasetSource("pairs", source, tuple(cases), maps, sparse, dataset_id, so)
