"""H2: lazy reads of a converted case equal numpy slicing of nibabel's array, for any slicing.

The case spans several chunks and shards on every axis (chunks are 64^3, shards 64 slices of
the whole plane), so the drawn slices cross chunk and shard boundaries, run backwards, step,
and pick scattered indices; pyramid levels and crops are checked the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import ctzarr
from ctzarr.testing.phantom import write_dap_atlas

from .conftest import nifti_zyx

SHAPE_ZYX = (140, 72, 66)  # 3 shards in z, 2 chunks in y and x
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("h2")
    src = root / "dap"
    write_dap_atlas(src, n_cases=1, shape_zyx=SHAPE_ZYX, seed=21)
    dest = root / "h2.zarr"
    assert ctzarr.convert(src, dest, progress=False).ok
    col = ctzarr.open_collection(dest)
    (cid,) = col.case_ids
    return {
        "case": col[cid],
        "image": nifti_zyx(src / "images" / f"{cid}.nii.gz"),
        "labels": nifti_zyx(src / "masks" / f"{cid}.nii.gz"),
    }


@SETTINGS
@given(index=hnp.basic_indices(SHAPE_ZYX, min_dims=0, allow_newaxis=False, allow_ellipsis=True))
def test_basic_slicing_equals_numpy(case: dict[str, Any], index: Any) -> None:
    c = case["case"]
    np.testing.assert_array_equal(c.image.data[index].compute(), case["image"][index])
    np.testing.assert_array_equal(c.labels().data[index].compute(), case["labels"][index])


@SETTINGS
@given(
    axis=st.integers(0, 2),
    picks=st.lists(st.integers(0, min(SHAPE_ZYX) - 1), min_size=1, max_size=6),
    data=st.data(),
)
def test_orthogonal_indices_equal_numpy(
    case: dict[str, Any], axis: int, picks: list[int], data: st.DataObject
) -> None:
    """Scattered indices along one axis (xarray ``isel`` with a list), slices on the others."""
    dims = ("z", "y", "x")
    selection: dict[str, Any] = {dims[axis]: picks}
    for other in {0, 1, 2} - {axis}:
        n = SHAPE_ZYX[other]
        start = data.draw(st.integers(0, n - 1))
        stop = data.draw(st.integers(start + 1, n))
        selection[dims[other]] = slice(start, stop)
    numpy_index = tuple(selection[d] for d in dims)
    np.testing.assert_array_equal(
        case["case"].image.isel(selection).values, case["image"][numpy_index]
    )


def _mean2(a: np.ndarray) -> np.ndarray:
    """Independent 2x2x2 block mean: odd edges average what they hold; integers rounded."""
    pad = [(0, s % 2) for s in a.shape]
    f = np.pad(a.astype(np.float64), pad, constant_values=np.nan)
    z, y, x = f.shape
    mean = np.nanmean(f.reshape(z // 2, 2, y // 2, 2, x // 2, 2), axis=(1, 3, 5))
    return np.rint(mean).astype(a.dtype) if a.dtype.kind in "iu" else mean.astype(a.dtype)


@pytest.mark.parametrize("level", [1, 2])
def test_pyramid_levels_equal_numpy_downsampling(case: dict[str, Any], level: int) -> None:
    """Level n of the labels is every 2^n-th voxel; of the image the 2x2x2 mean of level n-1."""
    c = case["case"]
    np.testing.assert_array_equal(
        c.labels(level=level).values, case["labels"][:: 2**level, :: 2**level, :: 2**level]
    )
    ref = case["image"]  # int16, no scaling in the phantom: stored values are the values
    for _ in range(level):
        ref = _mean2(ref)
    got = c.image_at(level).values
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)


@SETTINGS
@given(data=st.data())
def test_any_crop_equals_numpy_slicing_of_its_box(
    case: dict[str, Any], data: st.DataObject
) -> None:
    c = case["case"]
    stats = c.stats()
    row = stats.iloc[data.draw(st.integers(0, len(stats) - 1))]
    margin_mm = data.draw(st.sampled_from([0.0, 1.0, 2.9, 7.5, 40.0]))
    crop = c.crop(int(row["label"]), margin_mm=margin_mm)
    box = []
    for i, axis in enumerate("zyx"):  # the statistics' bounding box, grown and clipped here
        grow = int(np.ceil(margin_mm / c.spacing[i] - 1e-9))
        box.append(
            slice(
                max(int(row[f"{axis}_start"]) - grow, 0),
                min(int(row[f"{axis}_stop"]) + grow, SHAPE_ZYX[i]),
            )
        )
    index = tuple(box)
    assert crop.attrs["box_zyx"] == [v for sl in index for v in (sl.start, sl.stop)]
    np.testing.assert_array_equal(crop["image"].values, case["image"][index])
    np.testing.assert_array_equal(crop["labels"].values, case["labels"][index])
    shift = np.eye(4)
    shift[:3, 3] = [box[2].start, box[1].start, box[0].start]
    np.testing.assert_array_equal(crop.attrs["affine"], c.affine @ shift)
