"""Plain names: no control character or look-alike ever enters an id, a structure or a segmentation.

Every name that ends up in the store (case ids, segmentation names, structure names) is matched
as a whole string. Hostile names come in every place a dataset can carry them: DAP Atlas file
names, SAROS folder names, pairs manifest ids, pairs segmentation columns and label-map files.
Each one stops the conversion with a typed error that names the source and shows the name with
``repr`` (so a newline is visible and the message stays on one line), before anything is written.

Case ids and segmentation names are ASCII only; structure names are human text from a dataset's
label file, so letters of any script are allowed there, but no control, format or separator
character.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

import ctzarr
from ctzarr.errors import InvalidCaseIdError, LabelMapError, LayoutError
from ctzarr.model.labels import Label, LabelMap, parse_label_map
from ctzarr.model.manifest import check_relative_path
from ctzarr.sources.layouts import validate_case_id
from ctzarr.testing.phantom import write_dap_atlas, write_saros

SHAPE_ZYX = (12, 16, 16)

#: (id, text inserted into a name): control characters, separators and look-alikes
CONTROL = [
    pytest.param("\n", id="newline"),
    pytest.param("\r", id="carriage-return"),
    pytest.param("\t", id="tab"),
    pytest.param("\x00", id="nul"),
    pytest.param("\x7f", id="del"),
    pytest.param("\x1b", id="escape"),
    pytest.param("\x85", id="nel-u0085"),
    pytest.param("\u2028", id="line-separator-u2028"),
    pytest.param("\u2029", id="paragraph-separator-u2029"),
]


def _in_file_names(params: list[Any]) -> list[Any]:
    """The names a file system can hold (no NUL): DAP and SAROS names are file names."""
    return [p for p in params if "\x00" not in p.values[0]]


def _hostile_ids(base: str, at: int) -> list[Any]:
    """Names built on a plain id whose character ``at`` is an ASCII "A": a control character
    inside and at the end, and look-alikes of the "A" and of the last digit."""
    assert base[at] == "A"
    assert base[-1].isdigit()
    out = [pytest.param(base + "\n", id="trailing-newline")]
    for p in CONTROL:
        (ch,) = p.values
        out.append(pytest.param(base[: at + 1] + ch + base[at + 1 :], id=f"{p.id}-inside"))
    out += [
        pytest.param(base + "\r\n", id="trailing-crlf"),
        pytest.param(base[:at] + "\u0410" + base[at + 1 :], id="cyrillic-A-lookalike"),
        pytest.param(base[:at] + "\uff21" + base[at + 1 :], id="fullwidth-A"),
        pytest.param(base[:-1] + "\uff11", id="fullwidth-digit"),
        pytest.param(base[:-1] + "\u0661", id="arabic-indic-digit"),
        pytest.param(base + "\u200b", id="zero-width-space"),
    ]
    return out


DAP_IDS = _hostile_ids("AutoPET_0011f3deaf_10445", 0)
SAROS_IDS = _hostile_ids("case_A01", 5)  # still "case_..." folders: never silently skipped
PAIRS_IDS = _hostile_ids("AutoPET_p0001", 0)
SEG_COLUMNS = _hostile_ids("Anatomy2", 0)
LABEL_NAMES = [
    pytest.param("kidney left\n", id="trailing-newline"),
    *[pytest.param(f"kidney{p.values[0]}left", id=f"{p.id}-inside") for p in CONTROL],
    pytest.param("kidney\u202eleft", id="bidi-override-u202e"),
    pytest.param("kidney\u200bleft", id="zero-width-space"),
]


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _one_line(msg: str) -> None:
    assert msg.isprintable(), repr(msg)  # no raw newline, NUL or separator in the message


@pytest.fixture(scope="module")
def dap_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("names-dap") / "DAP"
    names = write_dap_atlas(root, n_cases=1, shape_zyx=SHAPE_ZYX, seed=5)
    return root, names


@pytest.fixture(scope="module")
def saros_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("names-saros") / "SAROS"
    write_saros(root, n_cases=1, shape_zyx=SHAPE_ZYX, seed=6, write_csv=False)
    return root


def _expect_refused(
    tmp_path: Path,
    source: Path,
    error: type[Exception],
    bad: str,
    names_source: str,
    **kwargs: object,
) -> str:
    """convert(source) raises error naming the source and repr(bad); nothing is written."""
    dest = tmp_path / "out.zarr"
    before = _tree(tmp_path)
    with pytest.raises(error) as info:
        ctzarr.convert(source, dest, progress=False, **kwargs)  # type: ignore[arg-type]
    msg = str(info.value)
    assert repr(bad) in msg, msg
    assert names_source in msg, msg
    _one_line(msg)
    assert not dest.exists()
    assert _tree(tmp_path) == before
    return msg


# -- case ids ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", DAP_IDS + SAROS_IDS + PAIRS_IDS)
def test_validate_case_id_refuses(bad: str) -> None:
    with pytest.raises(InvalidCaseIdError) as info:
        validate_case_id(bad, where="somewhere.csv:3")
    msg = str(info.value)
    assert msg.startswith("somewhere.csv:3: invalid case id ")
    assert repr(bad) in msg
    _one_line(msg)


@pytest.mark.parametrize("name", ["zarr.json\n", "ZARR.JSON", "zarr.json"])
def test_case_id_like_store_metadata_is_refused(name: str) -> None:
    with pytest.raises(InvalidCaseIdError, match="invalid case id"):
        validate_case_id(name)


@pytest.mark.parametrize("bad", _in_file_names(DAP_IDS))
def test_dap_file_name_refused(
    tmp_path: Path, dap_template: tuple[Path, list[str]], bad: str
) -> None:
    template, names = dap_template
    src = tmp_path / "DAP"
    shutil.copytree(template, src)
    for sub in ("images", "masks"):
        shutil.copyfile(src / sub / f"{names[0]}.nii.gz", src / sub / f"{bad}.nii.gz")
    msg = _expect_refused(tmp_path, src, InvalidCaseIdError, bad, str(src / "images"))
    assert repr(f"{bad}.nii.gz") in msg  # the file, named as repr


@pytest.mark.parametrize("bad", _in_file_names(SAROS_IDS))
def test_saros_folder_name_refused(tmp_path: Path, saros_template: Path, bad: str) -> None:
    src = tmp_path / "SAROS"
    shutil.copytree(saros_template, src)
    shutil.copytree(src / "case_000", src / bad)
    _expect_refused(tmp_path, src, InvalidCaseIdError, bad, str(src))


def _pairs(
    tmp_path: Path,
    dap_template: tuple[Path, list[str]],
    case_id: str = "AutoPET_p0001",
    column: str = "seg",
    labels: dict[str, str] | None = None,
) -> Path:
    template, names = dap_template
    d = tmp_path / "pairs"
    d.mkdir()
    shutil.copyfile(template / "images" / f"{names[0]}.nii.gz", d / "ct.nii.gz")
    shutil.copyfile(template / "masks" / f"{names[0]}.nii.gz", d / "seg.nii.gz")
    table = labels or json.loads((template / "labels.json").read_text(encoding="utf-8"))
    (d / "labels.json").write_text(json.dumps(table), encoding="utf-8")
    with open(d / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)  # quotes fields with a newline or carriage return
        w.writerow(["case_id", "image", column])
        w.writerow([case_id, "ct.nii.gz", "seg.nii.gz"])
    return d


@pytest.mark.parametrize("bad", PAIRS_IDS)
def test_pairs_manifest_id_refused(
    tmp_path: Path, dap_template: tuple[Path, list[str]], bad: str
) -> None:
    d = _pairs(tmp_path, dap_template, case_id=bad)
    msg = _expect_refused(
        tmp_path,
        d / "manifest.csv",
        InvalidCaseIdError,
        bad,
        f"{d / 'manifest.csv'}:2",
        labels=[str(d / "labels.json")],
    )
    assert "invalid case id" in msg


@pytest.mark.parametrize("bad", SEG_COLUMNS)
def test_pairs_segmentation_column_refused(
    tmp_path: Path, dap_template: tuple[Path, list[str]], bad: str
) -> None:
    d = _pairs(tmp_path, dap_template, column=bad)
    msg = _expect_refused(
        tmp_path,
        d / "manifest.csv",
        LayoutError,
        bad,
        str(d / "manifest.csv"),
        labels=[str(d / "labels.json")],
    )
    assert "segmentation column" in msg


def test_pairs_plain_names_convert(tmp_path: Path, dap_template: tuple[Path, list[str]]) -> None:
    """Control for the refusals: the same manifest with plain names converts."""
    d = _pairs(tmp_path, dap_template, case_id=" AutoPET_p0001 ")  # spaces are trimmed
    report = ctzarr.convert(
        d / "manifest.csv", tmp_path / "out.zarr", labels=[str(d / "labels.json")], progress=False
    )
    assert report.ok, str(report)
    col = ctzarr.open_collection(tmp_path / "out.zarr")
    assert col.case_ids == ["AutoPET_p0001"]
    assert col["AutoPET_p0001"].segmentation_names == ["seg"]


def test_dap_and_saros_plain_names_convert(
    tmp_path: Path, dap_template: tuple[Path, list[str]], saros_template: Path
) -> None:
    template, names = dap_template
    assert ctzarr.convert(template, tmp_path / "dap.zarr", progress=False).ok
    assert ctzarr.open_collection(tmp_path / "dap.zarr").case_ids == names
    assert ctzarr.convert(saros_template, tmp_path / "saros.zarr", progress=False).ok
    assert ctzarr.open_collection(tmp_path / "saros.zarr").case_ids == ["case_000"]


# -- structure names ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", LABEL_NAMES)
def test_label_map_name_refused(
    tmp_path: Path, dap_template: tuple[Path, list[str]], bad: str
) -> None:
    """A structure name with a control character in the DAP labels.json stops the run."""
    template, _ = dap_template
    src = tmp_path / "DAP"
    shutil.copytree(template, src)
    table = json.loads((src / "labels.json").read_text(encoding="utf-8"))
    table["2"] = bad
    (src / "labels.json").write_text(json.dumps(table), encoding="utf-8")
    msg = _expect_refused(tmp_path, src, LabelMapError, bad, str(src / "labels.json"))
    assert "U+" in msg  # names the character by its code point


@pytest.mark.parametrize("bad", LABEL_NAMES)
def test_label_map_name_refused_in_pairs_labels_file(
    tmp_path: Path, dap_template: tuple[Path, list[str]], bad: str
) -> None:
    d = _pairs(tmp_path, dap_template, labels={"0": "background", "1": bad, "2": "liver"})
    _expect_refused(
        tmp_path,
        d / "manifest.csv",
        LabelMapError,
        bad,
        str(d / "labels.json"),
        labels=[str(d / "labels.json")],
    )


@pytest.mark.parametrize(
    ("field", "entry"),
    [
        pytest.param("name", {"label-value": 1, "name": "a\nb"}, id="name"),
        pytest.param(
            "normalized_name",
            {"label-value": 1, "name": "a", "normalized_name": "a\x00"},
            id="normalized-name",
        ),
        pytest.param(
            "totalsegmentator_name",
            {"label-value": 1, "name": "a", "totalsegmentator_name": "a\u2028"},
            id="totalsegmentator-name",
        ),
    ],
)
def test_stored_label_entries_refuse_control_characters(field: str, entry: dict[str, Any]) -> None:
    """The same rule holds for label maps read back from a store (Label.from_dict)."""
    with pytest.raises(LabelMapError, match=field) as info:
        Label.from_dict(entry)
    _one_line(str(info.value))


def test_label_map_name_itself_refuses_control_characters() -> None:
    with pytest.raises(LabelMapError, match="label map name"):
        LabelMap("seg\n", (Label(1, "a", "a"),))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("Niere links", id="latin"),
        pytest.param("rein gauche \u00e9", id="accent"),
        pytest.param("\u043f\u043e\u0447\u043a\u0430", id="cyrillic"),
        pytest.param("\u814e\u81d3", id="cjk"),
        pytest.param("\uff2b\uff49\uff44\uff4e\uff45\uff59", id="fullwidth"),
        pytest.param("kidney\u00a0left", id="no-break-space"),
    ],
)
def test_structure_names_in_any_script_are_kept(name: str) -> None:
    """Structure names are human text: printable letters of any script are kept as written."""
    lm = parse_label_map({"0": "background", "1": f"  {name}  "}, name="anatomy")
    assert lm[1].name == name  # only the surrounding spaces are trimmed
    assert lm.resolve(name).value == 1


def test_label_ids_are_ascii_digits() -> None:
    """int() reads other scripts' digits; a label id in a label file must be ASCII."""
    with pytest.raises(LabelMapError, match="non-integer id"):
        parse_label_map({"0": "background", "\u0661": "kidney"}, name="anatomy")


# -- node names in the store -------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["seg\n", "labels/seg\n/0", "0\n", "\u0410/0", "labels/se\x00g", "labels/seg/0\u2028"],
)
def test_node_paths_are_matched_whole(path: str) -> None:
    with pytest.raises(ValueError, match="not a plain relative name"):
        check_relative_path(path)
