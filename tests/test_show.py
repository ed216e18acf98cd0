"""Structure pictures: valid PNGs, radiological orientation whatever the storage order, windows."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

import ctzarr
from ctzarr.errors import OutputPathError
from ctzarr.read.show import (
    BONE_WINDOW,
    FIGSIZE_INCHES,
    LUNG_WINDOW,
    PROFILE_FIGSIZE_INCHES,
    SINGLE_FIGSIZE_INCHES,
    SOFT_TISSUE_WINDOW,
    WINDOW_PRESETS,
    Window,
    choose_window,
    parse_window,
    profile_landmarks,
    render_profile,
    render_structure,
    scale_bar_mm,
    structure_panels,
    window_name,
)
from ctzarr.testing.phantom import write_dap_atlas

LIVER, SPLEEN, KIDNEY_LEFT, KIDNEY_RIGHT = 13, 26, 15, 16
AUTOCHTHON_LEFT, AORTA, LUNG_UPPER_RIGHT = 40, 114, 124


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> ctzarr.Collection:
    root = tmp_path_factory.mktemp("show")
    # case 0 is stored RAS, case 1 as ITK writes LPS (x and y flipped on disk)
    write_dap_atlas(root / "src", n_cases=2, shape_zyx=(40, 48, 48))
    report = ctzarr.convert(root / "src", root / "dap.zarr", progress=False)
    assert report.ok, report
    return ctzarr.open_collection(root / "dap.zarr")


@pytest.fixture(scope="module")
def ras_and_lps(collection: ctzarr.Collection) -> list[ctzarr.Case]:
    import nibabel as nib

    cases = [collection[cid] for cid in collection.case_ids]
    codes = [nib.orientations.aff2axcodes(c.affine) for c in cases]
    assert codes == [("R", "A", "S"), ("L", "P", "S")]  # the phantom's quirks, relied on below
    return cases


def _coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are clearly not grey: only the label outline is coloured in these pictures."""
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.15


def _centroid_col(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[1].mean())


def _centroid_row(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[0].mean())


def test_render_writes_a_valid_png_of_the_expected_size(
    ras_and_lps: list[ctzarr.Case], tmp_path: Path
) -> None:
    case = ras_and_lps[0]
    out = render_structure(case, "liver", tmp_path / "liver.png", dpi=50)
    assert out == tmp_path / "liver.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(out)
    assert img.shape[:2] == (round(FIGSIZE_INCHES[1] * 50), round(FIGSIZE_INCHES[0] * 50))
    rgb = img[..., :3]
    assert rgb.std() > 0.05  # not blank
    assert _coloured(rgb).sum() > 20  # the outline is there
    liver_rgb = np.array(case.collection.segmentations["anatomy"][LIVER].rgba[:3]) / 255
    assert (np.abs(rgb - liver_rgb).max(axis=-1) < 0.06).sum() > 5  # in the liver's colour
    assert [p.name for p in tmp_path.iterdir()] == ["liver.png"]  # no temporary file left

    # overwriting is atomic and keeps the name
    render_structure(case, LIVER, out, dpi=40)
    assert imread(out).shape[:2] == (round(FIGSIZE_INCHES[1] * 40), round(FIGSIZE_INCHES[0] * 40))
    assert [p.name for p in tmp_path.iterdir()] == ["liver.png"]


@pytest.mark.parametrize("case_no", [0, 1])
def test_panels_are_in_radiological_orientation(
    ras_and_lps: list[ctzarr.Case], case_no: int
) -> None:
    case = ras_and_lps[case_no]
    seg, label, (axial, coronal, sagittal) = structure_panels(case, "liver", margin_mm=500)
    assert (seg, label.value) == ("anatomy", LIVER)
    assert (axial.letters, coronal.letters, sagittal.letters) == (
        ("A", "P", "R", "L"),
        ("S", "I", "R", "L"),
        ("S", "I", "A", "P"),
    )
    assert axial.title.startswith("Axial z=")
    assert coronal.title.startswith("Coronal y=")
    assert sagittal.title.startswith("Sagittal x=")
    # a whole-body margin: every panel is the full slice, with physical pixel sizes
    assert axial.image.shape == (48, 48)
    assert coronal.image.shape == (40, 48) == sagittal.image.shape
    sz, sy, sx = case.spacing
    assert [p.pixel_mm for p in (axial, coronal, sagittal)] == [(sy, sx), (sz, sx), (sz, sy)]
    for p in (axial, coronal, sagittal):
        assert p.mask.any()
        assert np.array_equal(p.mask, p.labels == LIVER)

    # axial: the liver (patient's right) on the image left, the spleen on the right; the aorta
    # anterior to (above) the back muscles
    middle = axial.image.shape[1] / 2
    assert _centroid_col(axial.labels == LIVER) < middle < _centroid_col(axial.labels == SPLEEN)
    assert _centroid_row(axial.labels == AORTA) < _centroid_row(axial.labels == AUTOCHTHON_LEFT)
    # coronal: lung above liver, liver on the image left
    assert _centroid_row(coronal.labels == LUNG_UPPER_RIGHT) < _centroid_row(
        coronal.labels == LIVER
    )
    assert _centroid_col(coronal.labels == LIVER) < coronal.image.shape[1] / 2
    # sagittal through the liver: the kidney lies posterior, so to the right of the liver
    liver = sagittal.labels == LIVER
    assert _centroid_col(sagittal.labels == KIDNEY_RIGHT) > _centroid_col(liver)
    assert _centroid_row(sagittal.labels == LUNG_UPPER_RIGHT) < _centroid_row(liver)


def test_lps_and_ras_cases_give_the_same_orientation(ras_and_lps: list[ctzarr.Case]) -> None:
    # the anatomy is the same in both phantoms, so the displayed slices must agree up to the
    # pixel size; compare the side and level of each structure
    per_case = []
    for case in ras_and_lps:
        _, _, panels = structure_panels(case, "kidney left", margin_mm=500)
        axial = panels[0]
        h, w = axial.image.shape
        per_case.append(
            {
                v: (_centroid_row(axial.labels == v) / h, _centroid_col(axial.labels == v) / w)
                for v in (KIDNEY_LEFT, KIDNEY_RIGHT, AUTOCHTHON_LEFT)
                if (axial.labels == v).any()
            }
        )
        assert per_case[-1][KIDNEY_LEFT][1] > 0.5  # the left kidney on the image right
    ras, lps = per_case
    assert ras.keys() == lps.keys()
    for v in ras:
        assert np.allclose(ras[v], lps[v], atol=0.08), (v, ras[v], lps[v])


def test_left_kidney_outline_is_on_the_image_right_in_the_png(
    ras_and_lps: list[ctzarr.Case], tmp_path: Path
) -> None:
    for i, case in enumerate(ras_and_lps):
        # the lung window shows air as grey, so the panel area stands out from the black figure
        out = render_structure(
            case, "kidney left", tmp_path / f"k{i}.png", margin_mm=500, window=LUNG_WINDOW, dpi=60
        )
        rgb = imread(out)[..., :3]
        h, w, _ = rgb.shape
        band = rgb[int(0.25 * h) : int(0.95 * h), : w // 3]  # the axial panel, below the titles
        lit = np.nonzero((band.max(axis=-1) > 0.1).mean(axis=0) > 0.5)[0]
        left, right = lit.min(), lit.max()
        cols = np.nonzero(_coloured(band))[1]
        assert len(cols) > 5
        assert (cols.mean() - left) / (right - left) > 0.55, i


def test_window_choice() -> None:
    assert choose_window(-850) == LUNG_WINDOW == (1500, -600)
    assert choose_window(996) == BONE_WINDOW == (2500, 480)  # OHIF's bone preset
    assert choose_window(60) == SOFT_TISSUE_WINDOW == (400, 40)
    assert choose_window(-400) == SOFT_TISSUE_WINDOW  # the thresholds are strict
    assert choose_window(300) == SOFT_TISSUE_WINDOW
    assert choose_window(math.nan) == SOFT_TISSUE_WINDOW
    assert SOFT_TISSUE_WINDOW.limits == (-160, 240)
    assert [window_name(w) for w in (LUNG_WINDOW, BONE_WINDOW, SOFT_TISSUE_WINDOW, (350, 50))] == [
        "lung",
        "bone",
        "soft tissue",
        "custom",
    ]


def test_scale_bar_is_about_a_quarter_of_the_panel() -> None:
    assert scale_bar_mm(47) == 10
    assert scale_bar_mm(200) == 50
    assert scale_bar_mm(400) == 100
    assert scale_bar_mm(8) == 2


def test_unknown_or_absent_structure_raises(ras_and_lps: list[ctzarr.Case], tmp_path: Path) -> None:
    case = ras_and_lps[0]
    with pytest.raises(KeyError, match="no such organ"):
        render_structure(case, "no such organ", tmp_path / "x.png")
    with pytest.raises(ctzarr.StructureNotFoundError):
        render_structure(case, "no such organ", tmp_path / "x.png")
    present = {int(v) for v in case.index("anatomy").labels}
    absent = next(
        lab.value
        for lab in case.collection.segmentations["anatomy"]
        if lab.value not in present and lab.value > 1
    )
    with pytest.raises(ctzarr.StructureNotFoundError, match="absent"):
        render_structure(case, absent, tmp_path / "x.png")
    assert not any(tmp_path.iterdir())


def test_bad_arguments(ras_and_lps: list[ctzarr.Case], tmp_path: Path) -> None:
    case = ras_and_lps[0]
    for kwargs, message in (
        ({"dpi": 0}, "dpi"),
        ({"window": (0, 40)}, "window"),
        ({"window": (400, math.nan)}, "window"),
        ({"margin_mm": -1}, "margin"),
    ):
        with pytest.raises(ValueError, match=message):
            render_structure(case, "liver", tmp_path / "x.png", **kwargs)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("soft_tissue", (400, 40)),
        ("Soft Tissue", (400, 40)),
        ("soft-tissue", (400, 40)),
        ("lung", (1500, -600)),
        ("liver", (150, 90)),
        ("bone", (2500, 480)),
        ("brain", (80, 40)),
        ("350,50", (350, 50)),
        ("1500,-600", (1500, -600)),
        ("80/40", (80, 40)),
    ],
)
def test_window_presets_are_ohif_and_numbers_parse(text: str, expected: tuple[int, int]) -> None:
    assert parse_window(text) == Window(*map(float, expected))


@pytest.mark.parametrize("text", ["lungs", "0,40", "-5,40", "400", "400,40,1", "nan,4", "W400"])
def test_bad_window_lists_the_presets(text: str) -> None:
    with pytest.raises(ValueError, match=r"soft_tissue .W400 L40.*brain .W80 L40"):
        parse_window(text)


def test_window_names_cover_the_presets() -> None:
    assert {window_name(w) for w in WINDOW_PRESETS.values()} == {
        "soft tissue",
        "lung",
        "liver",
        "bone",
        "brain",
    }


def test_one_plane_through_a_chosen_slice(ras_and_lps: list[ctzarr.Case]) -> None:
    """The axial panel at slice k shows exactly the stored slice k, within the box."""
    for case in ras_and_lps:
        seg, label, box = case.crop_box("liver", 20.0)
        bbox = case.index(seg).bbox[list(case.index(seg).labels).index(label.value)]
        k = int(bbox[0])  # the first slice holding the liver: not its centroid
        _, _, panels = structure_panels(case, "liver", plane="axial", slice_index=k)
        assert [p.key for p in panels] == ["axial"]
        (panel,) = panels
        assert (panel.dim, panel.index) == ("z", k)
        stored = np.asarray(case.labels(seg).values)[k, box[1], box[2]]
        # the same voxels whatever the display flips
        assert sorted(panel.labels.ravel().tolist()) == sorted(stored.ravel().tolist())
        image = np.asarray(case.image.values)[k, box[1], box[2]].astype(np.float32)
        assert sorted(panel.image.ravel().tolist()) == sorted(image.ravel().tolist())
        # a slice outside the structure is drawn as asked, not moved to the structure
        far = case.shape[0] - 1 if bbox[1] < case.shape[0] else 0
        _, _, (far_panel,) = structure_panels(case, "liver", plane="axial", slice_index=far)
        assert far_panel.index == far


def test_each_plane_alone(ras_and_lps: list[ctzarr.Case]) -> None:
    case = ras_and_lps[1]
    _, _, every = structure_panels(case, "liver")
    for panel in every:
        _, _, (alone,) = structure_panels(case, "liver", plane=panel.key)
        assert alone.key == panel.key
        np.testing.assert_array_equal(alone.image, panel.image)
        np.testing.assert_array_equal(alone.labels, panel.labels)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"plane": "oblique"}, "plane"),
        ({"slice_index": 3}, "one plane"),
        ({"plane": "axial", "slice_index": 40}, "outside"),
        ({"plane": "sagittal", "slice_index": -1}, "outside"),
    ],
    ids=["unknown-plane", "slice-without-plane", "slice-past-end", "negative-slice"],
)
def test_bad_plane_or_slice(
    ras_and_lps: list[ctzarr.Case], tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        render_structure(ras_and_lps[0], "liver", tmp_path / "x.png", **kwargs)  # type: ignore[arg-type]
    assert not any(tmp_path.iterdir())


def test_single_plane_picture_size_and_window_by_name(
    ras_and_lps: list[ctzarr.Case], tmp_path: Path
) -> None:
    out = render_structure(
        ras_and_lps[0], "liver", tmp_path / "ax.png", plane="axial", window="liver", dpi=40
    )
    img = imread(out)
    assert img.shape[:2] == (
        round(SINGLE_FIGSIZE_INCHES[1] * 40),
        round(SINGLE_FIGSIZE_INCHES[0] * 40),
    )


def test_extension_decides_the_format(ras_and_lps: list[ctzarr.Case], tmp_path: Path) -> None:
    case = ras_and_lps[0]
    for name in ("a.jpg", "b.JPEG"):
        out = render_structure(case, "liver", tmp_path / name, dpi=30)
        assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG, not a PNG under a .jpg name
    for name in ("c.gif", "d.png.txt", "png", ".png"):
        with pytest.raises(OutputPathError, match="unsupported picture extension"):
            render_structure(case, "liver", tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jpg", "b.JPEG"]


def test_profile_landmarks_are_centroid_slices(ras_and_lps: list[ctzarr.Case]) -> None:
    import math as m

    case = ras_and_lps[0]
    marks = profile_landmarks(case, "liver")
    idx = case.index("anatomy")
    lm = case.collection.segmentations["anatomy"]
    expected = {}
    labels_zyx = np.asarray(case.labels("anatomy").values)
    for lab in lm.structures():
        if lab.name == "liver" or ("vertebra" in lab.name and lab.value in idx.labels):
            zs = np.nonzero(labels_zyx == lab.value)[0]
            if len(zs):
                expected[lab.name] = m.floor(zs.mean() + 0.5)
    assert marks[0][0] == "liver"
    assert {name: z for name, z, _ in marks} == expected
    assert [z for _, z, _ in marks[1:]] == sorted(z for _, z, _ in marks[1:])
    z_world = case.affine @ np.array([0, 0, marks[0][1], 1.0])  # axis-aligned phantom
    assert marks[0][2] == pytest.approx(z_world[2])


def test_render_profile_writes_the_picture(ras_and_lps: list[ctzarr.Case], tmp_path: Path) -> None:
    case = ras_and_lps[0]
    out = render_profile(case, case.profile("liver"), tmp_path / "p.png", dpi=40)
    img = imread(out)
    assert img.shape[:2] == (
        round(PROFILE_FIGSIZE_INCHES[1] * 40),
        round(PROFILE_FIGSIZE_INCHES[0] * 40),
    )
    assert img[..., :3].std() > 0.05
    with pytest.raises(OutputPathError):
        render_profile(case, case.profile("liver"), tmp_path / "p.svg")
