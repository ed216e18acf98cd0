"""Quick-look pictures: CT slices through a structure with its outline, and profiles along z.

:func:`render_structure` writes a picture a radiologist can read at a glance: axial, coronal and
sagittal slices through the structure's centroid (or one plane, at a chosen slice), each cropped to the structure's bounding box
grown by a margin, in radiological convention (axial: patient's right on the image left,
anterior up; coronal: patient's right on the left, superior up; sagittal: anterior on the left,
superior up), with square millimetres, a CT window suited to the tissue, the label outline in
its colour, a millimetre scale bar and orientation letters at every edge.

Only the voxels shown are read: the lazy image and label arrays are sliced to the box and the
single slice before anything is computed, so a whole-body case costs three small reads.

Orientation comes from the affine, not from assumptions about the file: the voxel axis nearest
each world axis (``nibabel.orientations.io_orientation``) is found, and each slice is transposed
and flipped so that its rows and columns run R->L, A->P or S->I. An LPS-stored case (as ITK
writes it) and an RAS-stored one therefore look the same.

:func:`render_profile` draws a structure's area and mean HU along z (``Case.profile``) with
landmark slices marked: the structure's centroid, and the vertebrae of the case.

The output file's extension decides the format (:data:`PICTURE_FORMATS`: PNG, JPEG); any other
is refused, never a PNG under another name. Matplotlib is used through :class:`~matplotlib.figure.Figure` and
:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg` only, so the caller's pyplot backend
and global state are never touched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from ctzarr.read.case import Case

import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from dask.base import compute as dask_compute
from nibabel.orientations import io_orientation

from ctzarr.errors import OutputPathError
from ctzarr.extras import require
from ctzarr.model.labels import Label
from ctzarr.read.composition import slice_z_mm


class Window(NamedTuple):
    """A CT display window in Hounsfield units."""

    width: float
    level: float

    @property
    def limits(self) -> tuple[float, float]:
        """(lowest, highest) HU mapped to black and white."""
        return self.level - self.width / 2, self.level + self.width / 2


# the presets as OHIF names them (and the web viewer offers them), W/L in HU
LUNG_WINDOW = Window(1500.0, -600.0)


BONE_WINDOW = Window(2500.0, 480.0)


SOFT_TISSUE_WINDOW = Window(400.0, 40.0)


LIVER_WINDOW = Window(150.0, 90.0)


BRAIN_WINDOW = Window(80.0, 40.0)


#: window presets by name (``--window``; spaces, hyphens and case do not matter)
WINDOW_PRESETS: dict[str, Window] = {
    "soft_tissue": SOFT_TISSUE_WINDOW,
    "lung": LUNG_WINDOW,
    "liver": LIVER_WINDOW,
    "bone": BONE_WINDOW,
    "brain": BRAIN_WINDOW,
}


_WINDOW_NAMES = {w: name.replace("_", " ") for name, w in WINDOW_PRESETS.items()}


#: extension of a picture -> the format matplotlib writes (with Pillow for JPEG)
PICTURE_FORMATS: dict[str, str] = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}


#: the planes of :func:`render_structure`; ``"all"`` draws the three side by side
PLANES = ("axial", "coronal", "sagittal")


#: size of every three-plane picture, so the PNG is FIGSIZE_INCHES * dpi pixels (no tight
#: bounding box, whose size would depend on the text)
FIGSIZE_INCHES = (12.0, 4.8)


#: size of a one-plane picture
SINGLE_FIGSIZE_INCHES = (6.0, 6.4)


#: size of a profile plot
PROFILE_FIGSIZE_INCHES = (9.0, 6.0)


# Each panel: (key, title, normal world axis, (row world axis, column world axis)). World axes
# are RAS+ (0 = x towards R, 1 = y towards A, 2 = z towards S). Every display axis runs towards
# the *negative* world direction: columns R->L (radiological), rows A->P and S->I (anterior and
# superior up), sagittal columns A->P (anterior on the left, as viewers show it).
_PANELS: tuple[tuple[str, str, int, tuple[int, int]], ...] = (
    ("axial", "Axial", 2, (1, 0)),
    ("coronal", "Coronal", 1, (2, 0)),
    ("sagittal", "Sagittal", 0, (2, 1)),
)


# letters at the start and the end of a display axis running towards negative world direction
_AXIS_LETTERS = {0: ("R", "L"), 1: ("A", "P"), 2: ("S", "I")}


_SCALE_BAR_CHOICES_MM = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)


# used when a label has no colour (alpha 0) or a grey one, which would vanish over the grey CT
_FALLBACK_COLOUR = (1.0, 0.85, 0.0, 1.0)


def choose_window(median_hu: float) -> Window:
    """The CT window for a structure of this median attenuation.

    Parameters
    ----------
    median_hu : float
        Median HU of the structure's voxels (``hu_median`` of :meth:`Case.stats`).

    Returns
    -------
    Window
        :data:`LUNG_WINDOW` (W1500 L-600) below -400 HU, :data:`BONE_WINDOW` (W2500 L480) above
        300 HU, else :data:`SOFT_TISSUE_WINDOW` (W400 L40), also for NaN.
    """
    if median_hu < -400:
        return LUNG_WINDOW
    if median_hu > 300:
        return BONE_WINDOW
    return SOFT_TISSUE_WINDOW


def window_name(window: Sequence[float]) -> str:
    """``"soft tissue"``, ``"lung"``, ``"liver"``, ``"bone"``, ``"brain"`` for the presets, else
    ``"custom"``."""
    return _WINDOW_NAMES.get(Window(float(window[0]), float(window[1])), "custom")


def parse_window(text: str) -> Window:
    """A window from a preset name (:data:`WINDOW_PRESETS`) or ``"WIDTH,LEVEL"`` in HU.

    Raises
    ------
    ValueError
        Neither a preset nor two numbers with a positive width; the message lists the presets.
    """
    key = "_".join(text.strip().lower().replace("-", " ").replace("_", " ").split())
    if key in WINDOW_PRESETS:
        return WINDOW_PRESETS[key]
    parts = text.replace("/", ",").split(",")
    try:
        width, level = (float(p) for p in parts)
    except ValueError:
        width = level = math.nan
    if not (math.isfinite(width) and math.isfinite(level) and width > 0):
        presets = ", ".join(
            f"{name} (W{w.width:g} L{w.level:g})" for name, w in WINDOW_PRESETS.items()
        )
        raise ValueError(
            f"window {text!r}: name a preset ({presets}) or give WIDTH,LEVEL in HU with WIDTH > 0"
        )
    return Window(width, level)


def picture_format(path: str | os.PathLike[str]) -> str:
    """The format a picture's extension names (:data:`PICTURE_FORMATS`).

    Raises
    ------
    OutputPathError
        Any other extension: nothing is written under a name that says another format.
    """
    name = Path(path).name.lower()
    for ext, fmt in PICTURE_FORMATS.items():
        if name.endswith(ext) and len(name) > len(ext):
            return fmt
    raise OutputPathError(
        f"{os.fspath(path)}: unsupported picture extension; write one of "
        f"{', '.join(PICTURE_FORMATS)}"
    )


def scale_bar_mm(panel_width_mm: float) -> float:
    """A round scale-bar length (1, 2, 5 x 10**k mm) nearest to a quarter of the panel width."""
    target = max(panel_width_mm, 1e-9) / 4
    return min(_SCALE_BAR_CHOICES_MM, key=lambda c: abs(math.log(c / target)))


@dataclass(frozen=True)
class Panel:
    """One displayed slice, already in display orientation (row 0 at the top).

    Attributes
    ----------
    key : str
        ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    title : str
        E.g. ``"Axial z=17 (+12.5 mm)"``: the stored dimension sliced, the index along it and its
        coordinate.
    image : numpy.ndarray
        HU values, float32, shape (rows, columns).
    labels : numpy.ndarray
        Label values of the same pixels.
    mask : numpy.ndarray
        ``labels == label.value``.
    pixel_mm : tuple of float
        (row height, column width) in millimetres.
    letters : tuple of str
        Orientation letters at the (top, bottom, left, right) edges.
    dim : str
        Stored dimension sliced (``"z"``, ``"y"`` or ``"x"``).
    index : int
        Index of the slice along ``dim``.
    """

    key: str
    title: str
    image: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    pixel_mm: tuple[float, float]
    letters: tuple[str, str, str, str]
    dim: str
    index: int

    @property
    def size_mm(self) -> tuple[float, float]:
        """(height, width) of the panel in millimetres."""
        return self.image.shape[0] * self.pixel_mm[0], self.image.shape[1] * self.pixel_mm[1]


def _world_axes(affine: np.ndarray) -> tuple[dict[int, int], dict[int, float]]:
    """For each RAS world axis: the stored (z, y, x) dimension nearest to it, and whether the
    index along that dimension runs towards +world (+1) or -world (-1)."""
    # row per voxel axis (i, j, k): (world axis, +-1)
    ornt = np.asarray(io_orientation(affine))
    if np.isnan(ornt).any():
        raise ValueError(f"affine has a degenerate axis; cannot orient slices:\n{affine}")
    dim_of: dict[int, int] = {}
    sign_of: dict[int, float] = {}
    for voxel_axis, (world, sign) in enumerate(ornt):
        dim_of[int(world)] = 2 - voxel_axis  # voxel (i, j, k) is stored as (x, y, z)
        sign_of[int(world)] = float(sign)
    return dim_of, sign_of


def _orient(
    arr: np.ndarray, normal_dim: int, row_dim: int, flip_rows: bool, flip_cols: bool
) -> np.ndarray:
    """Transpose a 2-D slice across stored dimension ``normal_dim`` (its axes are the other two
    dimensions in stored order) so ``row_dim`` runs down, and flip it into display orientation."""
    if min(d for d in range(3) if d != normal_dim) != row_dim:
        arr = arr.T
    if flip_rows:
        arr = arr[::-1, :]
    if flip_cols:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)


def _planes(plane: str) -> tuple[str, ...]:
    if plane == "all":
        return PLANES
    if plane not in PLANES:
        raise ValueError(f"plane {plane!r}: one of {', '.join(PLANES)} or all")
    return (plane,)


def structure_panels(
    case: Case,
    structure: str | int,
    *,
    segmentation: str | None = None,
    margin_mm: float = 20.0,
    plane: str = "all",
    slice_index: int | None = None,
) -> tuple[str, Label, list[Panel]]:
    """Slices through a structure, display-oriented: axial, coronal and sagittal through its
    centroid, or one plane.

    Parameters
    ----------
    case : Case
    structure : str or int
        Name or label value.
    segmentation : str, optional
        Required when the case has several segmentations that could hold the structure.
    margin_mm : float, optional
        Grow the structure's bounding box by this much on every side (clipped to the volume).
    plane : {"all", "axial", "coronal", "sagittal"}
        The three planes, or one.
    slice_index : int, optional
        With one plane: the stored index of the slice along the plane's normal (the stored
        dimension nearest to it: axial z, coronal y, sagittal x for a scanner-aligned case).
        Default: through the structure's centroid (the nearest slice holding it).

    Returns
    -------
    (segmentation, Label, panels in the order axial, coronal, sagittal)

    Raises
    ------
    StructureNotFoundError
        The structure is not in the label map, or absent from this case.
    ValueError
        Unknown plane, ``slice_index`` with all planes, or out of the volume (never clamped).
    """
    planes = _planes(plane)
    if slice_index is not None and len(planes) != 1:
        raise ValueError("slice_index needs one plane (axial, coronal or sagittal)")
    seg, label, box = case.crop_box(structure, margin_mm, segmentation)
    idx = case.index(seg)
    row = np.nonzero(idx.labels == label.value)[0][0]
    centroid = np.asarray(idx.coord_sum[row], dtype=np.float64) / float(idx.voxel_count[row])
    bbox = [int(b) for b in idx.bbox[row]]  # z0, z1, y0, y1, x0, x1 of the structure itself
    dim_of, sign_of = _world_axes(case.affine)
    spacing = case.spacing

    # one DataArray each, so the dask keys of a chunk shared by two slices are identical and
    # one compute reads it once
    image = case.image
    labels = case.labels(seg)
    plans = []
    lazy = []
    for key, title, normal, (row_world, col_world) in _PANELS:
        if key not in planes:
            continue
        dn = dim_of[normal]
        if slice_index is not None:
            extent = case.shape[dn]
            if not 0 <= slice_index < extent:
                raise ValueError(
                    f"slice {slice_index} of the {key} plane (stored dimension "
                    f"{'zyx'[dn]}) is outside case {case.case_id!r}: 0..{extent - 1}"
                )
            k = int(slice_index)
        else:
            # the centroid of a curved structure may fall outside it; clip to its extent at least
            k = min(max(math.floor(centroid[dn] + 0.5), bbox[2 * dn]), bbox[2 * dn + 1] - 1)
        sel: list[slice | int] = list(box)
        sel[dn] = k
        plans.append((key, title, row_world, col_world, dn, k))
        lazy += [image[tuple(sel)].data, labels[tuple(sel)].data]
    computed = dask_compute(*lazy)

    panels = []
    for p, (key, title, row_world, col_world, dn, k) in enumerate(plans):
        img2d, lab2d = computed[2 * p], computed[2 * p + 1]
        if slice_index is None and not (lab2d == label.value).any():
            # a non-convex structure can miss the slice at its centroid: move to the nearest
            # slice holding it (reads the label box once; rare)
            k = _nearest_slice(labels[box], dn, label.value, k - box[dn].start) + box[dn].start
            sel = list(box)
            sel[dn] = k
            img2d, lab2d = dask_compute(image[tuple(sel)].data, labels[tuple(sel)].data)
        rd, cd = dim_of[row_world], dim_of[col_world]
        # display axes run towards negative world: flip where the stored index runs positive
        flips = (sign_of[row_world] > 0, sign_of[col_world] > 0)
        img = _orient(np.asarray(img2d, dtype=np.float32), dn, rd, *flips)
        lab = _orient(np.asarray(lab2d), dn, rd, *flips)
        top, bottom = _AXIS_LETTERS[row_world]
        left, right = _AXIS_LETTERS[col_world]
        dim_name = str(image.dims[dn])
        coord = float(image[dim_name].values[k])
        panels.append(
            Panel(
                key=key,
                title=f"{title} {dim_name}={k} ({coord:+.1f} mm)",
                image=img,
                labels=lab,
                mask=lab == label.value,
                pixel_mm=(float(spacing[rd]), float(spacing[cd])),
                letters=(top, bottom, left, right),
                dim=dim_name,
                index=k,
            )
        )
    return seg, label, panels


def _nearest_slice(labels_box: Any, dim: int, value: int, centre: int) -> int:
    """Index (within the box) of the slice along ``dim`` holding ``value`` nearest ``centre``."""
    other = tuple(d for d in range(3) if d != dim)
    counts = np.asarray((labels_box.data == value).sum(axis=other).compute())
    hits = np.nonzero(counts)[0]
    if not len(hits):  # the index says it is here; fall back to the centroid slice
        return centre
    return int(hits[np.argmin(np.abs(hits - centre))])


def _outline_colour(rgba: Sequence[int]) -> tuple[float, float, float, float]:
    """The label's colour, opaque; a fallback when it has none or is too grey to see on CT."""
    r, g, b, a = (float(c) / 255 for c in rgba)
    if a == 0 or max(r, g, b) - min(r, g, b) < 0.12:
        return _FALLBACK_COLOUR
    return (r, g, b, 1.0)


def _draw_panel(
    ax: Axes, panel: Panel, window: Window, colour: tuple[float, float, float, float]
) -> None:
    from matplotlib import patheffects

    height_mm, width_mm = panel.size_mm
    rows, cols = panel.image.shape
    dy, dx = panel.pixel_mm
    lo, hi = window.limits
    # extent in millimetres from the top-left corner: square millimetres whatever the spacing
    ax.imshow(
        panel.image,
        cmap="gray",
        vmin=lo,
        vmax=hi,
        extent=(0, width_mm, height_mm, 0),
        origin="upper",
        interpolation="bilinear",
    )
    # pad the mask with background so the outline closes along a structure cut by the panel edge
    # (and so a one-voxel-thin mask still has a 2-D grid to contour); contour coordinates are
    # voxel centres, so the 0.5 level falls on voxel edges
    mask = np.pad(panel.mask.astype(np.float32), 1)
    xs = (np.arange(cols + 2) - 0.5) * dx
    ys = (np.arange(rows + 2) - 0.5) * dy
    if panel.mask.any():
        outline = ax.contour(xs, ys, mask, levels=[0.5], colors=[colour], linewidths=1.4)
        # a thin dark rim keeps pale label colours visible over bright bone and contrast
        outline.set_path_effects([patheffects.withStroke(linewidth=2.6, foreground=(0, 0, 0, 0.6))])
    ax.set_xlim(0, width_mm)
    ax.set_ylim(height_mm, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("0.3")
    ax.set_title(panel.title, color="white", fontsize=9)

    halo = [patheffects.withStroke(linewidth=2.5, foreground="black")]
    top, bottom, left, right = panel.letters
    for text, x, y, ha, va in (
        (top, 0.5, 0.985, "center", "top"),
        (bottom, 0.5, 0.015, "center", "bottom"),
        (left, 0.012, 0.5, "left", "center"),
        (right, 0.988, 0.5, "right", "center"),
    ):
        ax.text(
            x,
            y,
            text,
            transform=ax.transAxes,
            ha=ha,
            va=va,
            color="white",
            fontsize=10,
            fontweight="bold",
            path_effects=halo,
        )

    # scale bar in data (mm) coordinates at the lower left, clear of the edge-centre letters
    bar = scale_bar_mm(width_mm)
    x0 = 0.06 * width_mm
    y0 = height_mm * 0.94
    ax.plot(
        [x0, x0 + bar],
        [y0, y0],
        color="white",
        linewidth=2.5,
        solid_capstyle="butt",
        path_effects=[patheffects.withStroke(linewidth=4.5, foreground="black")],
    )
    ax.text(
        x0 + bar / 2,
        y0 - 0.02 * height_mm,
        f"{bar:g} mm",
        ha="center",
        va="bottom",
        color="white",
        fontsize=8,
        path_effects=halo,
    )


def render_structure(
    case: Case,
    structure: str | int,
    out_png: str | os.PathLike[str],
    *,
    segmentation: str | None = None,
    margin_mm: float = 20.0,
    window: tuple[float, float] | str | None = None,
    dpi: int = 150,
    plane: str = "all",
    slice_index: int | None = None,
) -> Path:
    """Write a picture of a structure: axial, coronal and sagittal slices with its outline.

    Slices pass through the structure's centroid (from the stored index), or with one
    ``plane`` through ``slice_index``, and show its bounding box grown by ``margin_mm``; only
    those voxels are read. Panels are in radiological convention
    (patient's right on the image left, anterior and superior up; sagittal anterior on the left)
    whatever the storage order, with square millimetres, orientation letters, a millimetre scale
    bar and the label outline in the label's colour.

    Parameters
    ----------
    case : Case
        The case to picture.
    structure : str or int
        Structure name (any spelling :meth:`Case.resolve` accepts) or label value.
    out_png : str or os.PathLike
        Output file, ``.png``, ``.jpg`` or ``.jpeg`` (:data:`PICTURE_FORMATS`: the extension
        decides the format); its directory must exist. Written to a temporary file in the same
        directory, then renamed, so readers never see a partial picture.
    segmentation : str, optional
        Segmentation holding the structure; needed only when several could.
    margin_mm : float, optional
        Context around the bounding box, in millimetres (>= 0).
    window : (float, float) or str, optional
        CT window as ``(width, level)`` in HU, or a preset name or ``"W,L"`` text
        (:func:`parse_window`). Default: from the structure's median HU, a lung window
        (W1500 L-600) below -400, a bone window (W2500 L480) above 300, else soft tissue
        (W400 L40); see :func:`choose_window`.
    dpi : int, optional
        Resolution; the picture is ``FIGSIZE_INCHES * dpi`` pixels (one plane:
        ``SINGLE_FIGSIZE_INCHES * dpi``).
    plane : {"all", "axial", "coronal", "sagittal"}
        The three planes side by side (default), or one.
    slice_index : int, optional
        With one plane, the stored index of the slice along its normal (see
        :func:`structure_panels`); default through the centroid.

    Returns
    -------
    pathlib.Path
        The written PNG.

    Raises
    ------
    StructureNotFoundError
        The structure is not in the label map (a ``KeyError``; the message lists close names),
        or is absent from this case.
    ValueError
        ``margin_mm``, ``window``, ``dpi``, ``plane`` or ``slice_index`` is invalid.
    OutputPathError
        The extension names no supported picture format.
    """
    fmt = picture_format(out_png)
    require("matplotlib", "show", "ctzarr show")
    if fmt == "jpeg":
        require("PIL", "show", "ctzarr show -o OUT.jpg")  # matplotlib writes JPEG through Pillow
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(structure, np.integer):  # label maps accept Python ints only
        structure = int(structure)
    if not (isinstance(dpi, (int, np.integer)) and not isinstance(dpi, bool) and dpi > 0):
        raise ValueError(f"dpi must be a positive integer, got {dpi!r}")
    if isinstance(window, str):
        window = parse_window(window)
    if window is not None:
        if len(window) != 2 or not all(np.isfinite(window)) or window[0] <= 0:
            raise ValueError(f"window must be (width > 0, level) in HU, got {window!r}")
        win = Window(float(window[0]), float(window[1]))
    out = Path(out_png)

    seg, label, panels = structure_panels(
        case,
        structure,
        segmentation=segmentation,
        margin_mm=margin_mm,
        plane=plane,
        slice_index=slice_index,
    )
    median = float("nan")
    if window is None:
        st = case.stats(structures=[label.value], segmentation=seg)
        if len(st):
            median = float(st["hu_median"].iloc[0])
        win = choose_window(median)
    colour = _outline_colour(label.rgba)

    single = len(panels) == 1
    fig = Figure(
        figsize=SINGLE_FIGSIZE_INCHES if single else FIGSIZE_INCHES, dpi=dpi, facecolor="black"
    )
    FigureCanvasAgg(fig)
    # panel widths follow their physical aspect so each fills its cell; clamped so a long thin
    # box (a spine in coronal view) cannot squeeze the others to nothing
    ratios = [min(max(p.size_mm[1] / p.size_mm[0], 0.25), 3.0) for p in panels]
    grid = fig.add_gridspec(
        1,
        len(panels),
        width_ratios=ratios,
        left=0.01,
        right=0.99,
        bottom=0.02,
        top=0.86 if single else 0.80,
        wspace=0.05,
    )
    for cell, panel in enumerate(panels):
        _draw_panel(fig.add_subplot(grid[0, cell]), panel, win, colour)
    median_txt = f", median {median:.0f} HU" if np.isfinite(median) else ""
    fig.suptitle(
        f"{case.case_id} \u2014 {label.name} (label {label.value}, segmentation {seg})\n"
        f"window W{win.width:g} L{win.level:g} ({window_name(win)}{median_txt}), "
        f"margin {margin_mm:g} mm",
        color="white",
        fontsize=10 if single else 11,
        y=0.975,
    )
    _save(fig, out, fmt, dpi)
    return out


def _save(fig: Any, out: Path, fmt: str, dpi: int) -> None:
    """Write a figure atomically: a temporary name in the target directory, renamed over the
    target; O_EXCL with mode 0o666 lets the umask decide permissions as for any new file."""
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, dpi=dpi, facecolor=fig.get_facecolor())
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _is_vertebra(name: str) -> bool:
    return "vertebra" in name.lower()


def _short_name(name: str) -> str:
    """``"vertebrae L3"`` / ``"vertebrae_L3"`` -> ``"L3"``: a mark's label on the plot."""
    return name.replace("_", " ").split()[-1] if _is_vertebra(name) else name


def profile_landmarks(
    case: Case, structure: str | int, segmentation: str | None = None
) -> list[tuple[str, int, float]]:
    """The slices a profile plot marks: the structure's centroid slice, and the centroid slice of
    each vertebra present in the case (any segmentation), from the index (no voxel read).

    A centroid slice is ``z = floor(mean z index + 0.5)``, as :meth:`Case.slice_stats` takes it.

    Returns
    -------
    list of (name, z, z_mm)
        The structure first, then the vertebrae in the order of their z index.
    """
    seg, label = case.resolve(structure, segmentation)
    wanted: list[tuple[str, int, str]] = [(seg, label.value, label.name)]
    for name in case.segmentation_names:
        for lab in case.collection.segmentations[name].structures():
            if _is_vertebra(lab.name) and (name, lab.value) != (seg, label.value):
                wanted.append((name, lab.value, lab.name))
    marks: list[tuple[str, int, float]] = []
    indexes: dict[str, Any] = {}
    for name, value, title in wanted:
        if name not in indexes:
            indexes[name] = case.index(name)
        idx = indexes[name]
        rows = np.flatnonzero(idx.labels == value)
        if not len(rows) or idx.voxel_count[rows[0]] == 0:
            continue  # not in this case
        z = math.floor(float(idx.coord_sum[rows[0]][0]) / float(idx.voxel_count[rows[0]]) + 0.5)
        z_mm = float(slice_z_mm(case.affine, case.shape, np.asarray([z]))[0])
        marks.append((title, z, z_mm))
    return [marks[0], *sorted(marks[1:], key=lambda m: m[1])] if marks else marks


def render_profile(
    case: Case, profile: Any, out: str | os.PathLike[str], *, dpi: int = 120
) -> Path:
    """Draw a profile (:meth:`Case.profile`): area (mm²) and mean HU along world z, with the
    landmark slices of :func:`profile_landmarks` marked.

    Parameters
    ----------
    case : Case
        The case the profile is of (for the landmarks).
    profile : pandas.DataFrame
        One structure's profile: columns ``structure``, ``segmentation``, ``z_mm``,
        ``area_mm2``, ``hu_mean``.
    out : str or os.PathLike
        ``.png``, ``.jpg`` or ``.jpeg`` (the extension decides); its directory must exist.
    dpi : int, optional
        Resolution; the picture is ``PROFILE_FIGSIZE_INCHES * dpi`` pixels.

    Returns
    -------
    pathlib.Path
        The written picture.
    """
    fmt = picture_format(out)
    require("matplotlib", "show", "ctzarr profile --plot")
    if fmt == "jpeg":
        require("PIL", "show", "ctzarr profile --plot OUT.jpg")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(out)
    if not len(profile):
        raise ValueError(f"case {case.case_id!r}: the profile is empty; nothing to draw")
    structure = str(profile["structure"].iloc[0])
    segmentation = str(profile["segmentation"].iloc[0])
    marks = profile_landmarks(case, int(profile["label"].iloc[0]), segmentation)
    z_mm = np.asarray(profile["z_mm"], np.float64)
    fig = Figure(figsize=PROFILE_FIGSIZE_INCHES, dpi=dpi)
    FigureCanvasAgg(fig)
    area_ax, hu_ax = fig.subplots(2, 1, sharex=True)
    area_ax.plot(z_mm, profile["area_mm2"], marker=".", color="tab:blue")
    area_ax.set_ylabel("area (mm²)")
    hu_ax.plot(z_mm, profile["hu_mean"], marker=".", color="tab:red")
    hu_ax.set_ylabel("mean HU")
    hu_ax.set_xlabel("z (mm, world, RAS+: superior to the right)")
    for ax in (area_ax, hu_ax):
        ax.grid(alpha=0.3)
    for n, (name, z, zmm) in enumerate(marks):
        own = n == 0
        for ax in (area_ax, hu_ax):
            ax.axvline(
                zmm,
                color="black" if own else "0.55",
                linestyle="--" if own else ":",
                linewidth=1.2 if own else 0.9,
            )
        # the structure's own mark labelled above, the vertebrae below: never on top of each other
        (area_ax if own else hu_ax).annotate(
            f"{structure} centroid (z={z})" if own else _short_name(name),
            xy=(zmm, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(2, -2),
            textcoords="offset points",
            rotation=90,
            ha="left",
            va="top",
            fontsize=7,
            color="black" if own else "0.35",
        )
    fig.suptitle(f"{case.case_id} \u2014 {structure} ({segmentation}): area and mean HU along z")
    fig.tight_layout()
    _save(fig, path, fmt, dpi)
    return path
