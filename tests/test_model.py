"""The typed model of the store format: every block round-trips to the JSON written today, and a
malformed attribute is a MetadataError naming the key and where it was read."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import ctzarr
from ctzarr.errors import ChunkCorruptError, MetadataError
from ctzarr.model.case import (
    CaseAttributes,
    NiftiBlock,
    SegmentationAttributes,
    SourceFile,
    apply_scaling,
    is_committed,
    without_commit_marker,
)
from ctzarr.model.collection import CollectionAttributes, is_collection
from ctzarr.model.index import IndexTable, LabelIndex
from ctzarr.model.table import TableAttributes, absent_row, is_table


def _attrs(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text())["attributes"])


@pytest.fixture(scope="module")
def stored(dap_store: Path) -> dict[str, Any]:
    """Attributes of each kind of group, as the converter wrote them."""
    col = ctzarr.open_collection(dap_store)
    cid = col.case_ids[0]
    case = dap_store / "cases" / cid
    return {
        "collection": _attrs(dap_store / "zarr.json"),
        "case": _attrs(case / "zarr.json"),
        "segmentation": _attrs(case / "labels" / "anatomy" / "zarr.json"),
        "index": _attrs(case / "labels" / "anatomy" / "index" / "zarr.json"),
        "table": _attrs(dap_store / "index" / "zarr.json"),
        "histogram": np.asarray(
            zarr.open_array(case / "labels" / "anatomy" / "index" / "histogram", mode="r")[:]
        ),
        "slices": np.asarray(
            zarr.open_array(case / "labels" / "anatomy" / "index" / "slices", mode="r")[:]
        ),
    }


# -- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "model"),
    [
        ("collection", CollectionAttributes),
        ("case", CaseAttributes),
        ("table", TableAttributes),
    ],
    ids=["collection", "case", "table"],
)
def test_stored_attributes_round_trip_exactly(
    stored: dict[str, Any], kind: str, model: Any
) -> None:
    parsed = model.from_attributes(stored[kind], where="here")
    assert parsed.to_attributes() == stored[kind]
    # same JSON text, key order included: the bytes of a rewritten zarr.json do not change
    assert json.dumps(parsed.to_attributes()) == json.dumps(stored[kind])
    assert model.from_attributes(parsed.to_attributes()) == parsed


def test_segmentation_attributes_round_trip(stored: dict[str, Any]) -> None:
    parsed = SegmentationAttributes.from_attributes(stored["segmentation"])
    assert parsed.to_attributes() == {"ctzarr": stored["segmentation"]["ctzarr"]}
    assert parsed.label_map
    assert parsed.sparse is False


def test_index_round_trips(stored: dict[str, Any]) -> None:
    idx = LabelIndex.from_attributes(stored["index"], stored["histogram"], slices=stored["slices"])
    assert idx.to_attributes() == stored["index"]
    np.testing.assert_array_equal(idx.histogram_array(), stored["histogram"])
    np.testing.assert_array_equal(idx.slices_array(), stored["slices"])
    assert idx.chunk_counts is not None
    assert idx.problems() == []
    again = LabelIndex.from_attributes(
        idx.to_attributes(), idx.histogram_array(), slices=idx.slices_array()
    )
    for name in (
        "labels",
        "voxel_count",
        "bbox",
        "coord_sum",
        "hist_keys",
        "hist_counts",
        "slice_counts",
        "slice_sums",
    ):
        np.testing.assert_array_equal(getattr(again, name), getattr(idx, name))
    assert again.chunk_counts is not None
    for got, want in zip(again.chunk_counts, idx.chunk_counts, strict=True):
        np.testing.assert_array_equal(got, want)
    table = IndexTable.from_attributes(stored["index"])
    label = int(idx.labels[0])
    assert table.bounding_box(label) == tuple(idx.bbox[0].tolist())
    assert table.bounding_box(10**6) is None


def test_index_repr_and_dataframe(stored: dict[str, Any]) -> None:
    idx = LabelIndex.from_attributes(stored["index"], stored["histogram"], slices=stored["slices"])
    text = repr(idx)
    assert len(text) < 200, text
    assert f"{len(idx.labels)} labels" in text
    assert f"{int(idx.voxel_count.sum()):,} voxels" in text
    assert str(idx.chunk_grid) in text
    frame = idx.to_dataframe()
    assert list(frame.columns) == [
        "label",
        "voxel_count",
        "z_start",
        "z_stop",
        "y_start",
        "y_stop",
        "x_start",
        "x_stop",
        "centroid_z_index",
        "centroid_y_index",
        "centroid_x_index",
        "chunk_count",
    ]
    assert frame["label"].tolist() == idx.labels.tolist()
    np.testing.assert_array_equal(frame[["z_start", "z_stop"]].to_numpy(), idx.bbox[:, :2])
    np.testing.assert_array_equal(
        frame["centroid_y_index"].to_numpy(), idx.coord_sum[:, 1] / idx.voxel_count
    )
    assert frame["chunk_count"].tolist() == [len(c) for c in idx.chunk_ids]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d, s: d["ctzarr"]["chunk_counts"][0].append(1), "one count per listed chunk"),
        (lambda d, s: d["ctzarr"].update(chunk_counts=[[1]]), "one count per listed chunk"),
        (lambda d, s: s.__setitem__(0, s[1:]), "rows, the bounding boxes' z extents need"),
    ],
    ids=["extra-chunk-count", "too-few-lists", "slices-short"],
)
def test_malformed_format3_index_is_refused(
    stored: dict[str, Any], edit: Callable[[dict[str, Any], list[Any]], None], match: str
) -> None:
    attributes = copy.deepcopy(stored["index"])
    slices = [stored["slices"]]
    edit(attributes, slices)
    with pytest.raises(MetadataError, match=match):
        LabelIndex.from_attributes(attributes, stored["histogram"], "here", slices[0])


def test_case_attributes_typed(stored: dict[str, Any]) -> None:
    case = CaseAttributes.from_attributes(stored["case"])
    assert case.complete
    assert case.manifest is not None
    assert case.committed_at
    assert isinstance(case.nifti, NiftiBlock)
    assert case.nifti.value_dtype == np.dtype("<i2")
    assert all(isinstance(f, SourceFile) and f.sha256 for f in case.source_files.values())
    assert case.level_shapes[0] == case.shape_zyx
    assert is_committed(stored["case"])
    hidden = without_commit_marker(stored["case"])
    assert not is_committed(hidden)
    assert is_committed(stored["case"])
    assert CaseAttributes.from_attributes(hidden).complete is False


def test_collection_and_table_recognised(stored: dict[str, Any]) -> None:
    assert is_collection(stored["collection"])
    assert not is_collection(stored["case"])
    assert is_table(stored["table"])
    assert not is_table(stored["collection"])


# -- malformed attributes name the key ------------------------------------------------------------
def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value

    return edit


_DELETE = object()

MALFORMED = [
    ("case", "ctzarr.shape_zyx", [10, -1, 3], "expected 3 positive integers"),
    ("case", "ctzarr.shape_zyx", "big", "expected 3 positive integers"),
    ("case", "ctzarr.shape_zyx", _DELETE, "missing"),
    ("case", "ctzarr.spacing_zyx", [1.0, 0.0, 1.0], "positive finite"),
    ("case", "ctzarr.affine", [[1, 0], [0, 1]], "4 x 4"),
    ("case", "ctzarr.nifti.value_dtype", "object", "dtype"),
    ("case", "ctzarr.nifti.scl_slope", "one", "expected a number"),
    ("case", "ctzarr.nifti.source_byteorder", "middle", "'big' or 'little'"),
    # a newer format_version is not damage: UnsupportedFormatError (tests/test_format_v2.py)
    ("case", "ctzarr.case_id", 7, "expected a string"),
    ("case", "ctzarr.segmentations", "anatomy", "list of strings"),
    ("case", "ctzarr.manifest", _DELETE, "manifest"),
    ("collection", "ctzarr.dataset_id", None, "expected a string"),
    ("collection", "ctzarr.cases", [1, 2], "list of strings"),
    ("collection", "ctzarr.format_version", "1", "expected an integer"),
    ("table", "ctzarr.int_columns", None, "list of strings"),
    ("table", "ctzarr.update", _DELETE, "missing"),
]


@pytest.mark.parametrize(
    ("kind", "key", "value", "fault"),
    MALFORMED,
    ids=[
        f"{k}-{key.removeprefix('ctzarr.')}-{'deleted' if v is _DELETE else v!r}"
        for k, key, v, _ in MALFORMED
    ],
)
def test_malformed_attribute_names_key_and_place(
    stored: dict[str, Any], kind: str, key: str, value: Any, fault: str
) -> None:
    model = {"case": CaseAttributes, "collection": CollectionAttributes, "table": TableAttributes}[
        kind
    ]
    attrs = copy.deepcopy(stored[kind])
    _set(key, value)(attrs)
    with pytest.raises(MetadataError, match=fault) as info:
        model.from_attributes(attrs, where="case 'x' in /p/s.zarr")
    assert str(info.value).startswith("case 'x' in /p/s.zarr: attribute ctzarr")
    assert info.value.key.startswith(key.rsplit(".", 1)[0])
    # callers catching the error types of before keep working
    assert isinstance(info.value, ChunkCorruptError)
    assert isinstance(info.value, ValueError)


def test_malformed_shape_in_store_is_refused_on_open(dap_store: Path, tmp_path: Path) -> None:
    import shutil

    store = tmp_path / "s.zarr"
    shutil.copytree(dap_store, store)
    cid = ctzarr.open_collection(store).case_ids[0]
    path = store / "cases" / cid / "zarr.json"
    doc = json.loads(path.read_text())
    doc["attributes"]["ctzarr"]["shape_zyx"] = [0, 1]
    path.write_text(json.dumps(doc))
    with pytest.raises(
        MetadataError, match=rf"case '{cid}' in .*attribute ctzarr.shape_zyx: expected 3"
    ):
        ctzarr.open_collection(store)[cid]


# -- one home for shared rules --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw_dtype", "slope", "inter"),
    [("<i2", 1.0, 0.0), ("<i2", 2.0, -1024.0), ("|u1", 0.5, 0.25), ("<f4", 1.5, 0.0)],
    ids=["identity", "int16-ct", "uint8-fraction", "float32"],
)
def test_apply_scaling_equals_nibabel(raw_dtype: str, slope: float, inter: float) -> None:
    import nibabel as nib

    raw = np.arange(24, dtype=raw_dtype).reshape(2, 3, 4)
    img = nib.Nifti1Image(raw.transpose(2, 1, 0), np.eye(4))
    img.header.set_slope_inter(slope, inter)
    proxy = nib.Nifti1Image.from_bytes(img.to_bytes())
    want = np.asanyarray(proxy.dataobj).transpose(2, 1, 0)
    got = apply_scaling(raw, slope, inter)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_absent_row_is_the_one_absent_row() -> None:
    lm = ctzarr.LabelMap.from_dict({"name": "m", "labels": [{"label-value": 1, "name": "liver"}]})
    row = absent_row("c", "seg", lm, 1)
    assert row["structure"] == "liver"
    assert row["voxel_count"] == 0
    assert row["z_start"] == -1
    assert np.isnan(row["hu_mean"])
    assert row["touches_border"] is False
