"""Synthetic whole-body CT phantoms written in the layouts and quirks of DAP Atlas, SAROS and
TotalSegmentator.

The real datasets need TCIA logins and hundreds of gigabytes, so the demo and the tests run on
phantoms instead. :func:`make_phantom` builds a CT volume in Hounsfield units with a matching
DAP Atlas label volume; :func:`write_dap_atlas` and :func:`write_saros` write directory trees that
mimic the Hugging Face DAP Atlas repack and the SAROS release, including the quirks a converter
must cope with: LPS-derived affines as ITK writes them, big-endian files, odd float32 spacings,
sparse SAROS annotation with whole slices of 255; :func:`write_totalsegmentator` writes one binary
mask file per structure, empty masks included, with a ``;``-separated ``meta.csv``.

Anatomy is defined in a canonical body frame in millimetres (u to the patient's right, v to the
anterior, w from the thighs at 0 to the vertex at 1200). It is drawn at physical size whenever the
field of view holds it and shrunk to fit otherwise, so tiny test volumes still show the whole body.
Arrays are indexed (z, y, x) with x towards the patient's right, y anterior and z superior (RAS).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib_typed
import numpy as np
from numpy.typing import NDArray

from ctzarr.model.labels import builtin_label_map, totalsegmentator_label_map

# nibabel's partial annotations make --strict reject every header call (no-untyped-call).
nib: Any = nib_typed


def _dap_names() -> dict[int, str]:
    """DAP Atlas id -> name (ids 0..144 without the reserved 11)."""
    # Comma-separated blocks keep 144 names on a screen; ruff would want one per line.
    head = (  # noqa: SIM905
        "Background,Left to annotate,muscles,fat,abdominal tissue,mediastinal tissue,esophagus,"
        "stomach,small bowel,duodenum,colon,,gallbladder,liver,pancreas,kidney left,kidney right,"
        "bladder,gonads,prostate,uterocervix,uterus,breast left,breast right,spinal canal,brain,"
        "spleen,adrenal gland left,adrenal gland right,thyroid left,thyroid right,thymus,"
        "gluteus maximus left,gluteus maximus right,gluteus medius left,gluteus medius right,"
        "gluteus minimus left,gluteus minimus right,iliopsoas left,iliopsoas right,"
        "autochthon left,autochthon right,skin"
    ).split(",")
    spine = [
        f"vertebrae {r}{i}" for r, n in (("C", 7), ("T", 12), ("L", 5)) for i in range(1, n + 1)
    ]
    ribs = [f"costa {k} {side}" for k in range(1, 13) for side in ("left", "right")]
    tail = (  # noqa: SIM905
        "rib_cartilage,sternum,clavicle left,clavicle right,scapula left,scapula right,"
        "humerus left,humerus right,skull,hip left,hip right,sacrum,femur left,femur right,heart,"
        "heart atrium left,heart tissue,heart atrium right,heart myocardium,heart ventricle left,"
        "heart ventricle right,iliac artery left,iliac artery right,aorta,iliac vena left,"
        "iliac vena right,inferior vena cava,portal vein and splenic vein,celiac trunk,"
        "lung lower lobe left,lung upper lobe left,lung lower lobe right,lung middle lobe right,"
        "lung upper lobe right,bronchie,trachea,pulmonary artery,cheek left,cheek right,"
        "eyeball left,eyeball right,nasal cavity,right common carotid artery,"
        "left common carotid artery,manubrium of sternum,right internal carotid artery,"
        "left internal carotid artery,right internal jugular vein,left internal jugular vein,"
        "brachiocephalic trunk,right brachiocephalic vein,left brachiocephalic vein,"
        "right subclavian artery,left subclavian artery"
    ).split(",")
    return {i: name for i, name in enumerate(head + spine + ribs + tail) if name}


_DAP_NAMES = _dap_names()


# Mean HU per DAP id; ids not listed get soft tissue (40).
_HU: dict[int, float] = {
    0: -1000, 1: 45, 2: 50, 3: -100, 4: 20, 5: 30, 6: 40, 7: 30, 8: 35, 9: 35, 10: 15,
    12: 8, 13: 60, 14: 45, 15: 140, 16: 140, 17: 10, 24: 15, 25: 35, 26: 50, 27: 25, 28: 25,
    29: 90, 30: 90, 31: 20, 92: 450, 97: 950, 98: 950, 99: 1150, 100: 550, 101: 550, 102: 380,
    103: 1000, 104: 1000, 105: 45, 114: 170, 117: 110, 118: 150, 126: -990, 127: 160,
    130: 15, 131: 15, 135: 450,
}  # fmt: skip
_HU.update(dict.fromkeys(range(43, 67), 420.0))  # vertebrae
_HU.update(dict.fromkeys(range(120, 125), -850.0))  # lung lobes


# Organ ellipsoids in priority order (n_structures takes a prefix), canonical frame:
# (DAP id, centre u v w, semi-axes u v w). Left structures sit at u < 0.
_ORGANS: tuple[tuple[int, tuple[float, float, float], tuple[float, float, float]], ...] = (
    (13, (75, 5, 650), (70, 65, 75)),  # liver
    (26, (-85, -30, 660), (32, 42, 45)),  # spleen
    (15, (-62, -50, 580), (24, 30, 48)),  # kidney left
    (16, (62, -50, 560), (24, 30, 48)),  # kidney right
    (17, (0, 45, 320), (42, 32, 38)),  # bladder
    (105, (-20, 25, 800), (55, 48, 58)),  # heart
    (114, (-12, -28, 690), (11, 11, 240)),  # aorta
    (117, (18, -25, 620), (11, 11, 150)),  # inferior vena cava
    (7, (-50, 40, 690), (42, 30, 40)),  # stomach
    (14, (-10, 0, 610), (48, 11, 14)),  # pancreas
    (12, (55, 55, 615), (14, 14, 22)),  # gallbladder
    (126, (0, 10, 940), (9, 9, 70)),  # trachea
    (6, (-6, -12, 870), (7, 7, 170)),  # esophagus
    (10, (0, 25, 450), (105, 45, 35)),  # colon
    (8, (-5, 45, 520), (65, 35, 45)),  # small bowel
    (40, (-32, -88, 700), (17, 16, 270)),  # autochthon left
    (41, (32, -88, 700), (17, 16, 270)),  # autochthon right
    (29, (-16, 22, 985), (9, 7, 20)),  # thyroid left
    (30, (16, 22, 985), (9, 7, 20)),  # thyroid right
    (9, (25, 15, 590), (25, 12, 20)),  # duodenum
    (38, (-45, -35, 430), (16, 16, 95)),  # iliopsoas left
    (39, (45, -35, 430), (16, 16, 95)),  # iliopsoas right
    (32, (-75, -85, 310), (55, 28, 75)),  # gluteus maximus left
    (33, (75, -85, 310), (55, 28, 75)),  # gluteus maximus right
    (27, (-45, -40, 625), (6, 10, 14)),  # adrenal gland left
    (28, (42, -38, 635), (6, 10, 14)),  # adrenal gland right
    (92, (0, 95, 840), (14, 8, 75)),  # sternum
    (135, (0, 92, 925), (18, 8, 20)),  # manubrium of sternum
    (130, (-30, 78, 1090), (11, 11, 11)),  # eyeball left
    (131, (30, 78, 1090), (11, 11, 11)),  # eyeball right
    (118, (30, 10, 640), (15, 6, 6)),  # portal vein and splenic vein
    (31, (0, 60, 880), (25, 12, 30)),  # thymus
    (127, (-5, 35, 860), (14, 14, 20)),  # pulmonary artery
)


# SAROS body-region id per DAP id; ids absent here map to background.
_REGION_SETS: tuple[tuple[int, frozenset[int]], ...] = (
    (1, frozenset({3, 22, 23, 42})),  # subcutaneous_tissue
    (2, frozenset({2, *range(32, 42)})),  # muscle
    (3, frozenset({4, 7, 8, 9, 10, *range(12, 22), 26, 27, 28, 112, 113, 115, 116, 118, 119})),
    (4, frozenset(range(120, 126))),  # thoracic_cavity (lungs, bronchi)
    (5, frozenset({*range(43, 105), 135})),  # bone
    (7, frozenset(range(105, 112))),  # pericardium
    (9, frozenset({5, 6, 31, 114, 117, 126, 127, 133, 134, *range(136, 145)})),  # mediastinum
    (10, frozenset({25})),  # brain
    (11, frozenset({24})),  # spinal_cord
    (12, frozenset({29, 30})),  # thyroid_glands
)


_MEDIASTINAL = _REGION_SETS[6][1]


# Canonical field of view the anatomy is drawn in: thighs to vertex, and in-plane width.
_BODY_LENGTH = 1200.0


_BODY_WIDTH = 520.0


_DIAPHRAGM_W = 700.0


_NECK_W = 960.0


@dataclass(frozen=True)
class _Blob:
    """Elliptic body cross-section: fat rim, muscle layer, then a filled core."""

    cu: float
    cv: float
    ru: float
    rv: float
    fat: float
    muscle: float
    fill: int
    part: int


@dataclass(frozen=True)
class _Plane:
    """Canonical coordinates of the columns (u) and rows (v) of one axial slice."""

    u: NDArray[np.float64]
    v: NDArray[np.float64]

    def ellipse(
        self, cu: float, cv: float, ru: float, rv: float
    ) -> tuple[tuple[slice, slice], NDArray[np.bool_]] | None:
        """Bounding box and mask of an ellipse, or None if it misses the slice."""
        if ru <= 0 or rv <= 0:
            return None
        i0, i1 = (int(i) for i in np.searchsorted(self.u, [cu - ru, cu + ru], side="left"))
        j0, j1 = (int(j) for j in np.searchsorted(self.v, [cv - rv, cv + rv], side="left"))
        if i0 >= i1 or j0 >= j1:
            return None
        qu = ((self.u[i0:i1] - cu) / ru) ** 2
        qv = ((self.v[j0:j1] - cv) / rv) ** 2
        return (slice(j0, j1), slice(i0, i1)), qv[:, None] + qu[None, :] <= 1.0


type Where = Literal["all", "body"] | int


def _paint(
    lab: NDArray[np.uint8], plane: _Plane, cu: float, cv: float, ru: float, rv: float,
    value: int, where: Where = "body",
) -> None:  # fmt: skip
    """Set an ellipse to value, restricted to all voxels, body voxels, or one label."""
    hit = plane.ellipse(cu, cv, ru, rv)
    if hit is None:
        return
    box, mask = hit
    sub = lab[box]
    if where == "body":
        mask &= sub != 0
    elif not isinstance(where, str):
        mask &= sub == where
    np.copyto(sub, value, where=mask)


def _paint_ellipsoid(
    lab: NDArray[np.uint8], plane: _Plane, w: float, oid: int,
    c: tuple[float, ...] | NDArray[np.float64], r: tuple[float, ...] | NDArray[np.float64],
) -> None:  # fmt: skip
    """Paint the cross-section at height w of an ellipsoid (centre c, semi-axes r) into body."""
    f = 1 - ((w - c[2]) / r[2]) ** 2
    if f > 0:
        _paint(lab, plane, c[0], c[1], r[0] * np.sqrt(f), r[1] * np.sqrt(f), oid)


def _interp(w: float, knots: tuple[float, ...], values: tuple[float, ...]) -> float:
    """Piecewise-linear profile along w."""
    return float(np.interp(w, knots, values))


def _blobs(w: float) -> list[_Blob]:
    """Body cross-sections at height w, in painting order (later wins for body parts)."""
    out: list[_Blob] = []
    if w < 300:  # thighs; taper towards the knees and continue below the FOV bottom
        r = _interp(w, (0, 300), (62, 72))
        out += [_Blob(s * 88, 0, r, r + 6, 12, 0, 2, 3 if s > 0 else 4) for s in (1, -1)]
    if 600 <= w <= 960:
        out += [_Blob(s * 212, -5, 34, 40, 8, 0, 2, 5 if s > 0 else 6) for s in (1, -1)]
    if 230 <= w <= _NECK_W:
        knots = (230, 300, 420, 560, 700, 850, 920, 960)
        ru = _interp(w, knots, (140, 165, 160, 155, 160, 165, 150, 80))
        rv = _interp(w, knots, (100, 115, 115, 110, 110, 110, 100, 60))
        fill = 4 if w < _DIAPHRAGM_W else 5
        out.append(_Blob(0, 0, ru, rv, 18 if w < _DIAPHRAGM_W else 14, 18, fill, 1))
    if 920 <= w <= 1060:
        out.append(_Blob(0, -10, 58, 60, 8, 0, 2, 2))
    if 1020 < w < 1200:
        f = np.sqrt(max(0.0, 1 - ((w - 1110) / 90) ** 2))
        out.append(_Blob(0, 5, 75 * f, 95 * f, 6, 0, 1, 2))
    return out


def _paint_slice(
    lab: NDArray[np.uint8], part: NDArray[np.uint8] | None, plane: _Plane, w: float,
    organs: list[tuple[int, NDArray[np.float64], NDArray[np.float64]]],
) -> None:  # fmt: skip
    """Draw all labels (and body parts) of the axial slice at height w."""
    blobs = _blobs(w)
    # Painting every rim before every core makes overlapping blobs (thighs into pelvis) merge.
    for b in blobs:
        _paint(lab, plane, b.cu, b.cv, b.ru, b.rv, 3, "all")
        if part is not None:
            _paint(part, plane, b.cu, b.cv, b.ru, b.rv, b.part, "all")
    for b in blobs:
        _paint(lab, plane, b.cu, b.cv, b.ru - b.fat, b.rv - b.fat, 2)
    for b in blobs:
        t = b.fat + b.muscle
        _paint(lab, plane, b.cu, b.cv, b.ru - t, b.rv - t, b.fill)

    # Lungs fill the thoracic core only; the oblique fissure rises towards the back.
    for side, lower, middle, upper in ((-1, 120, 0, 121), (1, 122, 123, 124)):
        g = np.sqrt(max(0.0, 1 - ((w - 830) / 125) ** 2))
        hit = plane.ellipse(side * 75, 0, 62 * g, 80 * g)
        if hit is None:
            continue
        box, mask = hit
        v = plane.v[box[0]][:, None]
        lobe = np.where(v < (810 - w) / 0.6, lower, upper)
        if middle:
            lobe = np.where((v >= (810 - w) / 0.6) & (w < 855) & (v > -10), middle, lobe)
        sub = lab[box]
        np.copyto(sub, lobe.astype(np.uint8), where=mask & (sub == 5))

    for oid, c, r in organs:
        _paint_ellipsoid(lab, plane, w, oid, c, r)

    _paint_skeleton(lab, plane, w)


def _paint_skeleton(lab: NDArray[np.uint8], plane: _Plane, w: float) -> None:
    """Vertebrae with discs and spinal canal, pelvis, long bones, skull and brain."""
    if 400 <= w <= 1045:
        neck = w >= 940
        k = 0.7 if neck else 1.0
        cv = -30.0 if neck else -55.0
        if 420 <= w <= 1040:
            span = (1040 - 420) / 24
            level = min(int((1040 - w) / span), 23)
            disc = (1040 - w) % span > span - 4  # the lowest 4 mm of each level
            vid = 1 if disc else 43 + level  # C1 = 43 at the top, L5 = 66 at the bottom
            _paint(lab, plane, 0, cv, 20 * k, 17 * k, vid)
            _paint(lab, plane, 0, cv - 27 * k, 15 * k, 14 * k, 43 + level)  # posterior arch
        _paint(lab, plane, 0, cv - 27 * k, 8 * k, 8 * k, 24)  # spinal canal
    for oid, c, r in (
        (102, (0, -60, 375), (45, 22, 50)),  # sacrum
        (100, (-105, -15, 340), (22, 55, 75)),  # hip left
        (101, (105, -15, 340), (22, 55, 75)),  # hip right
    ):
        _paint_ellipsoid(lab, plane, w, oid, c, r)
    if w < 300:
        for s, oid in ((-1, 103), (1, 104)):
            _paint(lab, plane, s * 88, 0, 14, 14, oid)
    if 620 <= w <= 955:
        for s, oid in ((-1, 97), (1, 98)):
            _paint(lab, plane, s * 212, -5, 12, 12, oid)
    f = 1 - ((w - 1130) / 68) ** 2
    if f > 0:
        g = np.sqrt(f)
        _paint(lab, plane, 0, -5, 68 * g, 80 * g, 99)  # skull
        _paint(lab, plane, 0, -5, 61 * g, 73 * g, 25)  # brain fills the skull's inside


def _lin_weights(n: int, c: int) -> tuple[NDArray[np.intp], NDArray[np.float32]]:
    """Lower index and weight of linear interpolation from c coarse to n fine samples."""
    p = np.linspace(0.0, c - 1.0, n)
    i0 = np.clip(np.floor(p).astype(np.intp), 0, c - 2)
    return i0, (p - i0).astype(np.float32)


def _lin_matrix(n: int, c: int) -> NDArray[np.float32]:
    """Dense n x c linear interpolation matrix."""
    i0, f = _lin_weights(n, c)
    m = np.zeros((n, c), np.float32)
    m[np.arange(n), i0] = 1 - f
    m[np.arange(n), i0 + 1] = f
    return m


@dataclass(frozen=True)
class _Phantom:
    """A phantom with the extras the SAROS writer needs."""

    ct: NDArray[np.int16]
    labels: NDArray[np.uint8]
    parts: NDArray[np.uint8] | None
    w: NDArray[np.float64]


def _check_geometry(
    shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float]
) -> None:
    """Reject shapes and spacings that cannot describe a volume."""
    if len(shape_zyx) != 3 or any(int(n) < 1 for n in shape_zyx):
        raise ValueError(f"shape_zyx must be three positive ints, got {shape_zyx!r}")
    if len(spacing_zyx) != 3 or not all(float(d) > 0 for d in spacing_zyx):
        raise ValueError(f"spacing_zyx must be three positive floats, got {spacing_zyx!r}")


def _build(
    shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float], seed: int,
    n_structures: int, with_parts: bool,
) -> _Phantom:  # fmt: skip
    """Build CT, DAP labels and optionally SAROS body parts slice by slice."""
    _check_geometry(shape_zyx, spacing_zyx)
    if n_structures < 0:
        raise ValueError(f"n_structures must be >= 0, got {n_structures}")
    nz, ny, nx = (int(n) for n in shape_zyx)
    dz, dy, dx = (float(d) for d in spacing_zyx)
    rng = np.random.default_rng(seed)

    # Physical size when the FOV allows it, shrunk to fit otherwise; the subject's build varies.
    s = min(1.0, nx * dx / _BODY_WIDTH, ny * dy / _BODY_WIDTH) * rng.uniform(0.93, 1.0)
    plane = _Plane(
        u=(np.arange(nx, dtype=np.float64) - (nx - 1) / 2) * (dx / s),
        v=(np.arange(ny, dtype=np.float64) - (ny - 1) / 2) * (dy / s),
    )
    length = nz * dz
    sz = min(1.0, length / _BODY_LENGTH)
    # A FOV longer than the body keeps the vertex at the top and shows more of the legs.
    w = ((np.arange(nz, dtype=np.float64) + 0.5) * dz - max(0.0, length - _BODY_LENGTH)) / sz

    # Jitter is drawn for every organ so that n_structures does not shift the other draws.
    organs = []
    for oid, c, r in _ORGANS:
        jc = np.asarray(c, float) + rng.uniform(-4, 4, 3)
        jr = np.asarray(r, float) * rng.uniform(0.9, 1.1, 3)
        organs.append((oid, jc, jr))
    organs = organs[:n_structures]
    lut = np.full(256, 40.0, np.float32)
    for i, hu in _HU.items():
        lut[i] = hu
    lut += rng.normal(0, 4, 256).astype(np.float32)
    lut[0] = -1000

    # Smooth texture: coarse random planes, linearly interpolated (separable, no scipy).
    cz = max(2, min(nz, 6))
    coarse = rng.normal(0, 10, (cz, 5, 5)).astype(np.float32)
    planes = _lin_matrix(ny, 5) @ coarse @ _lin_matrix(nx, 5).T
    iz, fz = _lin_weights(nz, cz)

    ct = np.empty((nz, ny, nx), np.int16)
    labels = np.zeros((nz, ny, nx), np.uint8)
    parts = np.zeros((nz, ny, nx), np.uint8) if with_parts else None
    for k in range(nz):
        lab = labels[k]
        _paint_slice(lab, None if parts is None else parts[k], plane, float(w[k]), organs)
        hu = lut[lab]
        tex = (1 - fz[k]) * planes[iz[k]] + fz[k] * planes[iz[k] + 1]
        hu += np.where(lab != 0, tex, np.float32(0))
        hu += rng.standard_normal((ny, nx), dtype=np.float32) * np.float32(15)
        # Real scanners clip at -1024 and 12-bit data tops out at 3071.
        np.clip(np.rint(hu), -1024, 3071, out=hu)
        ct[k] = hu
    return _Phantom(ct, labels, parts, w)


def make_phantom(
    shape_zyx: tuple[int, int, int],
    spacing_zyx: tuple[float, float, float],
    *,
    seed: int = 0,
    n_structures: int = 20,
) -> tuple[NDArray[np.int16], NDArray[np.uint8]]:
    """Build a synthetic whole-body CT volume and its DAP Atlas label volume.

    Parameters
    ----------
    shape_zyx : tuple of int
        Number of voxels along (z, y, x).
    spacing_zyx : tuple of float
        Voxel size in millimetres along (z, y, x).
    seed : int, optional
        Seed of every random choice (build, organ jitter, tissue HU, texture, noise).
    n_structures : int, optional
        How many organ ellipsoids to draw, in priority order (liver, spleen, kidneys, bladder,
        heart, aorta, ...; at most 33). Body outline, fat, muscle, lungs and skeleton are
        always drawn.

    Returns
    -------
    ct : numpy.ndarray
        int16 (z, y, x) array in HU: air -1000 outside the body, Gaussian noise (sigma 15 HU)
        everywhere, clipped to [-1024, 3071].
    labels : numpy.ndarray
        uint8 (z, y, x) array of DAP Atlas ids: 0 outside the body, 1 ("Left to annotate")
        for body voxels of no other structure; never the reserved id 11.

    Notes
    -----
    Axes are RAS: x increases towards the patient's right, y anteriorly, z superiorly, so
    left organs have smaller x indices. The body runs from the thighs (z = 0) to the vertex.
    Anatomy keeps its physical size when the field of view holds a 520 mm wide, 1200 mm long
    body and is shrunk to fit otherwise.
    """
    p = _build(shape_zyx, spacing_zyx, seed, n_structures, with_parts=False)
    return p.ct, p.labels


def _affine(
    shape_zyx: tuple[int, int, int], spacing_zyx: tuple[float, float, float], *, lps: bool
) -> NDArray[np.float64]:
    """RAS affine of the voxel grid, or the one ITK writes for the same grid stored in LPS order."""
    nz, ny, nx = shape_zyx
    dz, dy, dx = spacing_zyx
    aff = np.diag([dx, dy, dz, 1.0])
    aff[:3, 3] = (-(nx - 1) * dx / 2, -(ny - 1) * dy / 2, -(nz - 1) * dz)
    if lps:
        # ITK negates the x and y rows; the origin moves to the opposite corner so the voxel
        # centres cover the same world box.
        aff[0, 0], aff[1, 1] = -dx, -dy
        aff[0, 3] += (nx - 1) * dx
        aff[1, 3] += (ny - 1) * dy
    return aff


def _to_file_order(arr: NDArray[np.generic], lps: bool) -> NDArray[np.generic]:
    """Voxel order on disk for an RAS (z, y, x) array; LPS flips x and y like ITK does."""
    return arr[:, ::-1, ::-1] if lps else arr


def _save_nifti(
    path: Path, data_zyx: NDArray[np.generic], affine: NDArray[np.float64], *, big_endian: bool
) -> None:
    """Write an unscaled .nii.gz with qform/sform code 1 and mm units."""
    hdr = nib.Nifti1Header(endianness=">" if big_endian else "<")
    hdr.set_data_dtype(data_zyx.dtype)
    hdr.set_xyzt_units("mm", "sec")
    # NIfTI is (i, j, k) = (x, y, z) in Fortran order, which is exactly the transposed C array.
    img = nib.Nifti1Image(data_zyx.transpose(2, 1, 0), affine, header=hdr)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_slope_inter(1.0, 0.0)
    nib.save(img, str(path))


@dataclass(frozen=True)
class _DapCase:
    """Name, geometry and quirks of one synthetic DAP Atlas case."""

    name: str
    seed: int
    spacing_zyx: tuple[float, float, float]
    lps: bool
    big_endian: bool


# (spacing zyx, LPS, big-endian), cycled over the sorted cases. 3.27 and 0.977 have no exact
# float32 form, so the header zooms differ from the nominal values in the 7th digit.
_DAP_QUIRKS: tuple[tuple[tuple[float, float, float], bool, bool], ...] = (
    ((3.0, 0.9765625, 0.9765625), False, False),
    ((2.0, 1.3671875, 1.3671875), True, False),
    ((3.27, 0.977, 0.977), False, True),
)


def _dap_cases(n_cases: int, seed: int) -> list[_DapCase]:
    """Sorted synthetic cases with their quirks."""
    rng = np.random.default_rng((seed, 0xDA9))
    names: set[str] = set()
    while len(names) < n_cases:
        subject = int(rng.integers(0, 16**10))
        names.add(f"AutoPET_{subject:010x}_{int(rng.integers(0, 100_000)):05d}")
    cases = []
    for i, name in enumerate(sorted(names)):
        spacing, lps, big = _DAP_QUIRKS[i % len(_DAP_QUIRKS)]
        cases.append(_DapCase(name, int(rng.integers(0, 2**31)), spacing, lps, big))
    return cases


def _dap_labels_json() -> dict[str, str]:
    """labels.json of the Hugging Face repack (id strings -> names, plus its notes)."""
    out = {
        "_source": "Jaus et al., arXiv:2307.13375v1, Table 2 (page 15)",
        "_note": "ID 11 is intentionally absent (gap). Total: 144 entries. Excluding background "
        "(0) and unknown_tissue (1) gives 142 anatomical structures.",
    }
    out.update({str(i): name for i, name in _DAP_NAMES.items()})
    out["1"] = "unknown_tissue"  # the repack renames the "Left to annotate" placeholder
    return out


def write_dap_atlas(
    root: str | os.PathLike[str],
    *,
    n_cases: int = 3,
    shape_zyx: tuple[int, int, int] = (48, 64, 64),
    seed: int = 0,
    write_labels_json: bool = True,
) -> list[str]:
    """Write synthetic cases in the layout of the Hugging Face DAP Atlas repack.

    Parameters
    ----------
    root : str or os.PathLike
        Dataset root; created if missing. Existing files of the same names are overwritten.
    n_cases : int, optional
        Number of cases.
    shape_zyx : tuple of int, optional
        Voxels per case along (z, y, x).
    seed : int, optional
        Seed of names and phantoms.
    write_labels_json : bool, optional
        Also write ``root/labels.json`` (144 id -> name entries without "11", plus the repack's
        ``_source`` and ``_note`` keys; id 1 is named ``unknown_tissue`` as in the repack).

    Returns
    -------
    list of str
        Case names ``AutoPET_<10 hex>_<5 digits>``, sorted. Each has
        ``root/images/<name>.nii.gz`` (int16 CT) and ``root/masks/<name>.nii.gz`` (uint8 ids)
        with identical headers: qform and sform code 1, units mm, unscaled data.

    Notes
    -----
    Quirks cycle over the sorted cases: case 0 has an RAS affine; case 1 is stored as ITK
    writes an LPS image (negative x and y steps, origin at the opposite corner, voxel data
    flipped in x and y so the anatomy stays at the same world position); case 2 is big-endian
    with the odd spacing 0.977 x 0.977 x 3.27 mm.
    """
    root = Path(root)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    cases = _dap_cases(n_cases, seed)
    for case in cases:
        ct, labels = make_phantom(shape_zyx, case.spacing_zyx, seed=case.seed)
        aff = _affine(shape_zyx, case.spacing_zyx, lps=case.lps)
        for sub, arr in (("images", ct), ("masks", labels)):
            path = root / sub / f"{case.name}.nii.gz"
            _save_nifti(path, _to_file_order(arr, case.lps), aff, big_endian=case.big_endian)
    if write_labels_json:
        with open(root / "labels.json", "w", encoding="utf-8") as f:
            json.dump(_dap_labels_json(), f, indent=2)
            f.write("\n")
    return [c.name for c in cases]


_SAROS_INPLANE = (0.78125, 0.904, 1.1)


_SAROS_SPLITS = ("fold-1", "fold-2", "fold-3", "fold-4", "fold-5", "test")


_SAROS_COLLECTIONS = (  # (collection, anatomic_region, tcia_case_id prefix)
    ("NSCLC Radiogenomics", "thorax", "R01-"),
    ("ACRIN-HNSCC-FDG-PET/CT", "wholebody", "ACRIN-HNSCC-FDG-PET-CT-"),
    ("C4KC-KiTS", "abdomen", "KiTS-"),
    ("Anti-PD-1_MELANOMA", "wholebody", "PD-1-Melanoma-"),
    ("CPTAC-PDA", "thorax-abdomen", "C3L-"),
)


def _region_luts() -> dict[str, NDArray[np.uint8]]:
    """DAP id -> SAROS body region, for abdominal, thoracic and head/neck slices."""
    base = np.zeros(256, np.uint8)
    for region, ids in _REGION_SETS:
        base[list(ids)] = region
    abdomen, neck = base.copy(), base.copy()
    abdomen[list(_MEDIASTINAL)] = 3  # aorta, IVC, oesophagus below the diaphragm
    neck[list(_MEDIASTINAL)] = 0  # airway and oesophagus of the neck belong to no region
    # Placeholder voxels are discs in the trunk and unlabelled soft tissue in the head.
    abdomen[1] = base[1] = 5
    neck[1] = 2
    return {"abdomen": abdomen, "thorax": base, "neck": neck}


def _saros_regions(labels: NDArray[np.uint8], w: NDArray[np.float64]) -> NDArray[np.uint8]:
    """SAROS body regions from DAP labels, choosing the table by the height of each slice."""
    luts = _region_luts()
    out = np.empty_like(labels)
    for k, wk in enumerate(w):
        key = "abdomen" if wk < _DIAPHRAGM_W else "thorax" if wk < _NECK_W else "neck"
        out[k] = luts[key][labels[k]]
    return out


def _saros_offset(index: int) -> int:
    """Annotated-slice offset (z % 5) of the case at this index."""
    return (3 * index) % 5


def write_saros(
    root: str | os.PathLike[str],
    *,
    n_cases: int = 2,
    shape_zyx: tuple[int, int, int] = (40, 64, 64),
    seed: int = 0,
    write_csv: bool = True,
) -> list[str]:
    """Write synthetic cases in the SAROS layout (after the authors' download script).

    Parameters
    ----------
    root : str or os.PathLike
        Dataset root; created if missing. Existing files of the same names are overwritten.
    n_cases : int, optional
        Number of cases, named ``case_000``, ``case_001``, ...
    shape_zyx : tuple of int, optional
        Voxels per case along (z, y, x).
    seed : int, optional
        Seed of the phantoms and the CSV.
    write_csv : bool, optional
        Also write ``root/Segmentation-Info.csv`` with columns ``id``, ``split`` (fold-1 ...
        fold-5, test), ``tcia_collection``, ``tcia_series_instance_uid``, ``tcia_case_id``
        and ``anatomic_region``.

    Returns
    -------
    list of str
        Case ids, sorted. Each case folder holds ``image.nii.gz`` (int16 CT, z spacing 5 mm,
        in-plane spacing 0.78125, 0.904 or 1.1 mm by case), ``body-regions.nii.gz`` (uint8,
        0..13) and ``body-parts.nii.gz`` (uint8, 0..6).

    Notes
    -----
    Only axial slices with ``z % 5 == offset`` are annotated, the offset being
    ``(3 * case index) % 5``; every voxel of every other slice is 255 in both label files.
    Affines alternate between RAS (even cases) and ITK-style LPS (odd cases, voxel data
    flipped in x and y, see :func:`write_dap_atlas`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((seed, 0x5A2))
    ids, rows = [], []
    for i in range(n_cases):
        case_id = f"case_{i:03d}"
        inplane = _SAROS_INPLANE[i % len(_SAROS_INPLANE)]
        spacing = (5.0, inplane, inplane)
        lps = i % 2 == 1
        p = _build(shape_zyx, spacing, int(rng.integers(0, 2**31)), 20, with_parts=True)
        assert p.parts is not None
        regions, parts = _saros_regions(p.labels, p.w), p.parts
        ignored = np.arange(shape_zyx[0]) % 5 != _saros_offset(i)
        regions[ignored] = 255
        parts[ignored] = 255
        folder = root / case_id
        folder.mkdir(exist_ok=True)
        aff = _affine(shape_zyx, spacing, lps=lps)
        for fname, arr in (
            ("image.nii.gz", p.ct),
            ("body-regions.nii.gz", regions),
            ("body-parts.nii.gz", parts),
        ):
            _save_nifti(folder / fname, _to_file_order(arr, lps), aff, big_endian=False)
        collection, region, prefix = _SAROS_COLLECTIONS[int(rng.integers(len(_SAROS_COLLECTIONS)))]
        uid = "1.3.6.1.4.1.14519.5.2.1." + ".".join(str(int(x)) for x in rng.integers(1, 10**9, 3))
        tcia_case = f"{prefix}{int(rng.integers(1000)):03d}"
        rows.append((case_id, _SAROS_SPLITS[i % 6], collection, uid, tcia_case, region))
        ids.append(case_id)
    if write_csv:
        with open(root / "Segmentation-Info.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(
                ("id", "split", "tcia_collection", "tcia_series_instance_uid", "tcia_case_id",
                 "anatomic_region")
            )  # fmt: skip
            writer.writerows(rows)
    return sorted(ids)


#: DAP ids of the tissues that TotalSegmentator's ``tissue_types`` task segments
_TISSUE_TYPES_FROM_DAP = {"skeletal_muscle": 2, "subcutaneous_fat": 3}


#: TotalSegmentator meta.csv columns after image_id (the public training set's first ones)
_TS_META_COLUMNS = ("age", "gender", "institute", "study_type", "split")


def totalsegmentator_masks(labels: NDArray[np.uint8], task: str = "total") -> dict[str, Any]:
    """Binary masks (uint8 0/1) of a TotalSegmentator task from a DAP Atlas label volume.

    ``total``: every DAP structure with a one-to-one TotalSegmentator class (the crosswalk of
    :func:`ctzarr.model.labels.enrich`); ``tissue_types``: ``skeletal_muscle`` from DAP muscles,
    ``subcutaneous_fat`` from DAP fat. Keys are TotalSegmentator class names; structures the
    volume lacks are not listed.
    """
    if task == "tissue_types":
        pairs = list(_TISSUE_TYPES_FROM_DAP.items())
    elif task == "total":
        known = {lab.name for lab in totalsegmentator_label_map("total")}
        pairs = [
            (lab.totalsegmentator_name, lab.value)
            for lab in builtin_label_map("dap_atlas")
            if lab.totalsegmentator_name in known
        ]
    else:
        raise ValueError(f"no phantom masks for TotalSegmentator task {task!r}")
    present = set(np.unique(labels).tolist())
    return {
        name: (labels == value).astype(np.uint8)
        for name, value in pairs
        if name is not None and value in present
    }


def write_totalsegmentator(
    root: str | os.PathLike[str],
    *,
    n_cases: int = 2,
    shape_zyx: tuple[int, int, int] = (40, 48, 48),
    seed: int = 0,
    n_structures: int = 20,
    tasks: tuple[str, ...] = ("total",),
    all_structures: bool = False,
    meta_delimiter: str | None = ";",
) -> list[str]:
    """Write synthetic cases in TotalSegmentator's dataset layout.

    Parameters
    ----------
    root : str or os.PathLike
        Dataset root; created if missing. Existing files of the same names are overwritten.
    n_cases : int, optional
        Number of cases, named ``s0000``, ``s0001``, ...
    shape_zyx : tuple of int, optional
        Voxels per case along (z, y, x).
    seed : int, optional
        Seed of the phantoms and of meta.csv.
    n_structures : int, optional
        Organs drawn by :func:`make_phantom`.
    tasks : tuple of str, optional
        ``"total"`` and/or ``"tissue_types"``; all masks go to ``segmentations/`` (told apart
        by name, as TotalSegmentator's class names are unique across tasks).
    all_structures : bool, optional
        Write a mask for every class of each task (empty files for absent structures, as the
        training set has), not only the structures present plus one empty mask.
    meta_delimiter : str or None, optional
        Write ``root/meta.csv`` with this separator (``;`` as in the training set), columns
        ``image_id``, ``age``, ``gender``, ``institute``, ``study_type``, ``split``; None: none.

    Returns
    -------
    list of str
        Case ids, sorted. Each case folder holds ``ct.nii.gz`` (int16) and
        ``segmentations/<class name>.nii.gz`` (uint8 0/1, the CT's header).

    Notes
    -----
    Even cases have an RAS affine, odd cases ITK's LPS form (voxel data flipped in x and y,
    see :func:`write_dap_atlas`); spacing 1.5 mm, as in the training set's resampled CTs.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng((seed, 0x7075))
    spacing = (1.5, 1.5, 1.5)
    ids, rows = [], []
    for i in range(n_cases):
        case_id = f"s{i:04d}"
        lps = i % 2 == 1
        ct, labels = make_phantom(
            shape_zyx, spacing, seed=int(rng.integers(0, 2**31)), n_structures=n_structures
        )
        folder = root / case_id
        (folder / "segmentations").mkdir(parents=True, exist_ok=True)
        aff = _affine(shape_zyx, spacing, lps=lps)
        _save_nifti(folder / "ct.nii.gz", _to_file_order(ct, lps), aff, big_endian=False)
        empty = np.zeros(shape_zyx, np.uint8)
        for task in tasks:
            masks = totalsegmentator_masks(labels, task)
            absent = [
                lab.name
                for lab in totalsegmentator_label_map(task)
                if lab.value and lab.name not in masks
            ]
            for name in absent if all_structures else absent[:1]:
                masks[name] = empty
            for name, mask in masks.items():
                path = folder / "segmentations" / f"{name}.nii.gz"
                _save_nifti(path, _to_file_order(mask, lps), aff, big_endian=False)
        ids.append(case_id)
        rows.append(
            (
                case_id,
                str(int(rng.integers(18, 90))),
                ("m", "f")[int(rng.integers(2))],
                "ABCDEFGH"[int(rng.integers(8))],
                ("ct thorax-abdomen", "ct abdomen", "ct whole body")[int(rng.integers(3))],
                ("train", "train", "val", "test")[i % 4],
            )
        )
    if meta_delimiter is not None:
        with open(root / "meta.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=meta_delimiter)
            writer.writerow(("image_id", *_TS_META_COLUMNS))
            writer.writerows(rows)
    return sorted(ids)
