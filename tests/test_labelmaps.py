"""Tests for ctzarr.labelmaps: built-in tables, name matching, resolve, round trips, parsing."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctzarr.errors import LabelMapError, StructureNotFoundError
from ctzarr.model.labels import (
    Label,
    LabelMap,
    builtin_label_map,
    builtin_label_map_names,
    color_for,
    enrich,
    load_label_map_file,
    match_key,
    normalize_name,
    parse_label_map,
)

#: the reference tables, copied into the repository (tests/data/reference/README.md)
REFERENCE = Path(__file__).parent / "data" / "reference"
DATA_FILES = ("dap_atlas_labels.yaml", "saros_labels.yaml", "totalsegmentator_total_labels.yaml")

SAROS_REGIONS = {
    0: "background",
    1: "subcutaneous_tissue",
    2: "muscle",
    3: "abdominal_cavity",
    4: "thoracic_cavity",
    5: "bone",
    6: "parotid_glands",
    7: "pericardium",
    8: "breast_implant",
    9: "mediastinum",
    10: "brain",
    11: "spinal_cord",
    12: "thyroid_glands",
    13: "submandibular_glands",
}
SAROS_PARTS = {
    0: "background",
    1: "torso",
    2: "head",
    3: "right_leg",
    4: "left_leg",
    5: "right_arm",
    6: "left_arm",
}


def _packaged_yaml(filename: str) -> Any:
    return yaml.safe_load(resources.files("ctzarr").joinpath("data", filename).read_text())


@pytest.fixture(scope="module")
def dap() -> LabelMap:
    return builtin_label_map("dap_atlas")


# --- built-in tables -------------------------------------------------------------------------


def test_builtin_names() -> None:
    assert builtin_label_map_names() == ("dap_atlas", "saros_body_regions", "saros_body_parts")


def test_dap_ids_are_0_to_144_without_11(dap: LabelMap) -> None:
    assert len(dap) == 144
    assert dap.values == tuple(v for v in range(145) if v != 11)
    assert 11 not in dap
    assert dap.background == 0
    assert dap.ignore_value is None
    assert dap.max_value == 144
    assert len(dap.structures()) == 143  # 142 structures + the placeholder


def test_dap_names_equal_packaged_table(dap: LabelMap) -> None:
    table = _packaged_yaml("dap_atlas_labels.yaml")["labels"]
    assert {lab.value: lab.name for lab in dap} == table


@pytest.mark.parametrize("filename", DATA_FILES)
def test_package_data_is_the_reference_table(filename: str) -> None:
    packaged = resources.files("ctzarr").joinpath("data", filename).read_text()
    assert packaged == (REFERENCE / filename).read_text()


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (0, "Background"),
        (1, "Left to annotate"),
        (10, "colon"),
        (12, "gallbladder"),
        (91, "rib_cartilage"),
        (105, "heart"),
        (132, "nasal cavity"),
        (135, "manubrium of sternum"),
        (144, "left subclavian artery"),
    ],
    ids=lambda x: str(x),
)
def test_dap_spot_names(dap: LabelMap, value: int, name: str) -> None:
    assert dap[value].name == name


def test_dap_placeholder_is_only_id_1(dap: LabelMap) -> None:
    assert [lab.value for lab in dap if lab.placeholder] == [1]
    assert dap[1] in dap.structures()
    assert dap[0] not in dap.structures()


@pytest.mark.parametrize(
    ("name", "table"),
    [("saros_body_regions", SAROS_REGIONS), ("saros_body_parts", SAROS_PARTS)],
)
def test_saros_tables_exact(name: str, table: dict[int, str]) -> None:
    lm = builtin_label_map(name)
    assert lm.name == name
    assert {lab.value: lab.name for lab in lm} == table
    assert lm.ignore_value == 255
    assert 255 not in lm
    assert lm.max_value == 255
    assert lm.background == 0
    assert not any(lab.placeholder for lab in lm)


def test_unknown_builtin_lists_names() -> None:
    with pytest.raises(LabelMapError, match="available: dap_atlas, saros_body_regions"):
        builtin_label_map("saros")


# --- TotalSegmentator crosswalk --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "ts_name"),
    [
        (13, "liver"),
        (15, "kidney_left"),
        (17, "urinary_bladder"),
        (43, "vertebrae_C1"),
        (67, "rib_left_12"),  # costa 1 left: reversed numbering, pair read from issue #7
        (68, "rib_right_12"),
        (73, "rib_left_9"),
        (74, "rib_right_9"),
        (75, None),  # costa 5..12: pairs not in the reference, not guessed
        (90, None),
        (91, "costal_cartilages"),
        (92, None),  # sternum corpus: the map also holds the manubrium
        (93, "clavicula_left"),
        (105, None),  # heart beside its chambers
        (118, "portal_vein_and_splenic_vein"),
        (127, None),  # pulmonary artery is not pulmonary_vein
        (132, None),  # nasal cavity vs nasal_cavity_left/right
        (133, "common_carotid_artery_right"),
        (136, "internal_carotid_artery_right"),
        (140, "brachiocephalic_trunk"),
        (142, "brachiocephalic_vein_left"),
        (0, None),
        (1, None),
    ],
    ids=lambda x: str(x),
)
def test_dap_totalsegmentator_names(dap: LabelMap, value: int, ts_name: str | None) -> None:
    assert dap[value].totalsegmentator_name == ts_name


@pytest.mark.parametrize(
    ("name", "ts_name"),
    [
        ("mediastinum", "mediastinum"),
        ("abdominal_cavity", "abdominal_cavity"),
        ("spinal_cord", "spinal_cord"),
        ("thyroid_glands", None),
        ("parotid_glands", None),
    ],
)
def test_saros_totalsegmentator_names(name: str, ts_name: str | None) -> None:
    assert builtin_label_map("saros_body_regions").resolve(name).totalsegmentator_name == ts_name


def test_whole_heart_maps_when_no_chambers_present() -> None:
    lm = parse_label_map({1: "heart", 2: "sternum"}, name="user")
    assert [lab.totalsegmentator_name for lab in lm.structures()] == ["heart", "sternum"]


def test_two_labels_claiming_one_ts_class_get_none() -> None:
    lm = parse_label_map({1: "bladder", 2: "urinary bladder"}, name="user")
    assert [lab.totalsegmentator_name for lab in lm.structures()] == [None, None]


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Kidney left", "kidney_left"),
        ("kidney_left", "kidney_left"),
        ("  Kidney--Left ", "kidney_left"),
        ("heart   ", "heart"),
        ("vertebrae C1", "vertebrae_c1"),
        ("portal vein / splenic vein", "portal_vein_splenic_vein"),
        ("rib__cartilage", "rib_cartilage"),
        ("Left to annotate", "left_to_annotate"),
    ],
    ids=lambda x: repr(x),
)
def test_normalize_name(raw: str, normalized: str) -> None:
    assert normalize_name(raw) == normalized


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        ("kidney left", "kidney_left", True),
        ("Kidney-Left", "kidney_left", True),
        ("vertebrae_C1", "Vertebrae c1", True),
        ("kidney left", "kidney right", False),
        ("rib_left_1", "rib_left_12", False),
    ],
    ids=lambda x: repr(x),
)
def test_match_key(a: str, b: str, equal: bool) -> None:
    assert (match_key(a) == match_key(b)) is equal


# --- resolve ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "value"),
    [
        (15, 15),
        ("15", 15),
        ("kidney left", 15),
        ("Kidney-Left", 15),
        ("kidney_left", 15),
        ("urinary_bladder", 17),  # TotalSegmentator name
        ("bladder", 17),
        ("rib_right_12", 68),
        ("costa 1 right", 68),
        ("vertebrae_C1", 43),
        ("Background", 0),
        ("unknown_tissue", None),  # repack spelling is not an alias of the DAP name
    ],
    ids=lambda x: repr(x),
)
def test_resolve(dap: LabelMap, query: str | int, value: int | None) -> None:
    if value is None:
        with pytest.raises(StructureNotFoundError):
            dap.resolve(query)
    else:
        assert dap.resolve(query).value == value


def test_resolve_lists_close_matches(dap: LabelMap) -> None:
    with pytest.raises(StructureNotFoundError) as info:
        dap.resolve("kidny left")
    message = str(info.value)
    assert message.startswith("no structure 'kidny left' in label map 'dap_atlas'; close matches: ")
    assert "'kidney left'" in message
    assert "'kidney right'" in message
    assert message.count("', '") <= 4  # at most 5 matches


def test_resolve_without_close_matches(dap: LabelMap) -> None:
    with pytest.raises(StructureNotFoundError, match="no close matches"):
        dap.resolve("zzzz")


@pytest.mark.parametrize("query", [11, "11", 145, -1], ids=repr)
def test_resolve_unknown_id(dap: LabelMap, query: int | str) -> None:
    with pytest.raises(StructureNotFoundError, match="label map 'dap_atlas'"):
        dap.resolve(query)


def test_getitem_and_contains(dap: LabelMap) -> None:
    assert dap[13].name == "liver"
    with pytest.raises(KeyError):  # StructureNotFoundError is a KeyError
        dap[11]
    assert 13 in dap
    assert "liver" not in dap  # membership is by value
    assert True not in dap
    with pytest.raises(KeyError):
        dap[True]  # YAML reads "yes" as True; a bool is not a label value
    assert list(dap) == list(dap.labels)


def test_resolve_ambiguous_name() -> None:
    lm = LabelMap("user", (Label(1, "a b", "a_b"), Label(2, "a_b", "a_b")))
    with pytest.raises(StructureNotFoundError, match="ambiguous"):
        lm.resolve("ab")


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", builtin_label_map_names())
def test_builtin_json_round_trip(name: str) -> None:
    lm = builtin_label_map(name)
    d = json.loads(json.dumps(lm.to_dict()))
    assert LabelMap.from_dict(d) == lm
    assert parse_label_map(d, name=name) == lm
    assert enrich(lm) == lm


def test_label_to_dict_keys(dap: LabelMap) -> None:
    assert dap[1].to_dict() == {
        "label-value": 1,
        "name": "Left to annotate",
        "normalized_name": "left_to_annotate",
        "rgba": list(color_for("left_to_annotate")),
        "placeholder": True,
    }
    assert dap[17].to_dict()["totalsegmentator_name"] == "urinary_bladder"
    assert "placeholder" not in dap[17].to_dict()


def test_ignore_value_must_not_be_a_label() -> None:
    with pytest.raises(LabelMapError, match=r"ignore_value 2 is also a label \('b'\)"):
        LabelMap("user", (Label(1, "a", "a"), Label(2, "b", "b")), ignore_value=2)


def test_labels_are_sorted_on_construction() -> None:
    lm = LabelMap("user", (Label(5, "b", "b"), Label(2, "a", "a")))
    assert lm.values == (2, 5)


# --- parsing ---------------------------------------------------------------------------------

DAP_REPACK_JSON = {
    "_source": "Jaus et al., arXiv:2307.13375v1, Table 2 (page 15)",
    "_note": "ID 11 is intentionally absent (gap).",
    "0": "background",
    "1": "unknown_tissue",
    "2": "muscles",
    "10": "colon",
    "12": "gallbladder",
    "15": "kidney_left",
}


def test_parse_dap_repack_labels_json(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(json.dumps(DAP_REPACK_JSON))
    lm = load_label_map_file(path)
    assert lm.name == "labels"
    assert lm.values == (0, 1, 2, 10, 12, 15)
    assert lm[1].placeholder
    assert lm[0].rgba == (0, 0, 0, 0)
    assert lm.resolve("kidney left").totalsegmentator_name == "kidney_left"


@pytest.mark.parametrize(
    "obj",
    [
        {0: "background", 3: "liver"},
        {"labels": {"0": "background", "3": "liver"}},
        [{"value": 0, "name": "background"}, {"id": 3, "name": "liver"}],
        [{"label-value": 0, "name": "background"}, {"label-value": 3, "name": " liver "}],
    ],
    ids=["int-keys", "labels-wrapper", "list-value-id", "list-label-value"],
)
def test_parse_forms_agree(obj: Any) -> None:
    lm = parse_label_map(obj, name="user")
    assert lm == LabelMap(
        "user",
        (
            Label(0, "background", "background"),
            Label(3, "liver", "liver", "liver", color_for("liver")),
        ),
    )


def test_parse_ignore_value_drops_table_entry() -> None:
    lm = parse_label_map({0: "background", 1: "torso", 255: "ignore"}, name="p", ignore_value=255)
    assert lm.values == (0, 1)
    assert lm.ignore_value == 255


def test_parse_keeps_given_rgba() -> None:
    lm = parse_label_map([{"value": 1, "name": "liver", "rgba": [1, 2, 3, 4]}], name="u")
    assert lm[1].rgba == (1, 2, 3, 4)


def test_load_yaml_reference_style(tmp_path: Path) -> None:
    path = tmp_path / "dap.yaml"
    path.write_text(resources.files("ctzarr").joinpath("data", "dap_atlas_labels.yaml").read_text())
    assert load_label_map_file(path, name="dap_atlas") == builtin_label_map("dap_atlas")


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({1: "a", "1": "b"}, r"duplicate id 1 \('a' and 'b'\)"),
        ([{"value": 2, "name": "a"}, {"value": 2, "name": "b"}], "duplicate id 2"),
        ({"one": "a"}, "non-integer id 'one'"),
        ({1.5: "a"}, "non-integer id 1.5"),
        ({True: "a"}, "non-integer id True"),
        ({"-1": "a"}, "id '-1'"),
        ({70000: "a"}, "0..65535"),
        ({1: 7}, "name must be a non-empty string"),
        ({1: ""}, "name must be a non-empty string"),
        ([{"value": 1, "name": "a", "rgba": [1, 2, 3]}], "entry 0: .*rgba must be 4 integers"),
        ([{"value": 1, "name": "a", "rgba": [0, 0, 0, 256]}], "rgba must be 4 integers 0..255"),
        ([{"value": 1, "name": "a", "rgba": "red"}], "rgba must be 4 integers"),
        ([{"value": "1", "name": "a"}], "value must be an integer"),
        ([{"name": "a"}], "needs exactly one of"),
        ([{"value": 1, "name": "a", "colour": 1}], "unknown keys"),
        ({}, "has no labels"),
        ("liver", "expected a mapping"),
        ({"labels": {1: "a"}, "background": -1}, "background: value must be an integer"),
    ],
    ids=lambda x: repr(x)[:40],
)
def test_parse_errors(obj: Any, message: str) -> None:
    with pytest.raises(LabelMapError, match=message) as info:
        parse_label_map(obj, name="bad")
    assert "label map 'bad'" in str(info.value)


@pytest.mark.parametrize(
    ("filename", "text", "message"),
    [
        ("dup.json", '{"1": "a", "1": "b"}', "duplicate key '1'"),
        ("dup.yaml", "1: a\n1: b\n", r"duplicate key 1 \(line 2\)"),
        ("broken.json", "{", "Expecting"),
        ("broken.yaml", "a: [", "expected"),
        ("table.csv", "1,a", "unsupported label map file type '.csv'"),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_load_file_errors_name_the_file(
    tmp_path: Path, filename: str, text: str, message: str
) -> None:
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(LabelMapError, match=message) as info:
        load_label_map_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"label-value": 1, "name": "a", "normalized_name": "a", "rgba": [0, 0, 0]}, "rgba"),
        ({"label-value": True, "name": "a"}, "value must be an integer"),
        ({"label-value": 1, "name": "a", "placeholder": "yes"}, "placeholder"),
        ({"label-value": 1}, "needs 'label-value' and 'name'"),
    ],
    ids=["short-rgba", "bool-value", "str-placeholder", "no-name"],
)
def test_label_from_dict_errors(d: dict[str, Any], message: str) -> None:
    with pytest.raises(LabelMapError, match=message):
        Label.from_dict(d)


def test_label_map_from_dict_rejects_unknown_keys() -> None:
    d = builtin_label_map("saros_body_parts").to_dict() | {"extra": 1}
    with pytest.raises(LabelMapError, match="unknown keys"):
        LabelMap.from_dict(d)


# --- colours ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["liver", "kidney_left", "costa 1 left", "brain"], ids=lambda x: str(x)
)
def test_color_is_stable(name: str) -> None:
    rgba = color_for(name)
    assert rgba == color_for(name)
    assert rgba[3] == 255
    assert all(64 <= c <= 255 for c in rgba[:3])


def test_color_known_value() -> None:
    # Pinned so that a change of the hash scheme is noticed: colours are part of stored metadata.
    assert color_for("liver") == (240, 195, 118, 255)


def test_background_is_transparent() -> None:
    assert color_for("background") == (0, 0, 0, 0)
    assert color_for("Background") == (0, 0, 0, 0)
    for name in builtin_label_map_names():
        assert builtin_label_map(name)[0].rgba == (0, 0, 0, 0)


def test_same_name_same_colour_across_maps(dap: LabelMap) -> None:
    regions = builtin_label_map("saros_body_regions")
    assert dap.resolve("brain").rgba == regions.resolve("brain").rgba == color_for("brain")
    user = parse_label_map({1: "Kidney-Left"}, name="user")
    assert user[1].rgba == dap.resolve("kidney left").rgba


def test_distinct_structures_get_distinct_colours(dap: LabelMap) -> None:
    colours = [lab.rgba for lab in dap.structures()]
    assert len(set(colours)) == len(colours)
