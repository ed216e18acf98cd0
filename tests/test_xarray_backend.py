"""xarray engine ``ctzarr``: a case opens as a Dataset and a collection as a DataTree, with
values equal to nibabel's, coordinates and affine equal to ``Case.image``'s, lazily, from local
stores, S3 (moto) and the committed format-1 golden stores."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import ctzarr
from ctzarr.sources.layouts import load_source

from .conftest import nifti_zyx
from .test_remote import (
    BUCKET,
    fake_aws_environment,
    fast_moto_server,
    s3_filesystem,
    s3_options,
    unique_prefix,
)

GOLDEN = Path(__file__).parent / "golden" / "format-1"


def _check_case(ds: xr.Dataset, case: ctzarr.Case) -> None:
    """Variables, dims, coordinates and affine of a case Dataset equal the library's, lazily."""
    assert list(ds.data_vars) == ["image", *case.segmentation_names]
    image = case.image
    for name in ds.data_vars:
        var = ds[name]
        assert var.dims == ("z", "y", "x")
        assert isinstance(var.data, da.Array), name  # nothing read yet
        want = image if name == "image" else case.labels(str(name))
        assert var.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(var.attrs["affine"]), image.attrs["affine"])
    for dim in ("z", "y", "x"):
        np.testing.assert_array_equal(ds[dim].values, image[dim].values)
    np.testing.assert_array_equal(np.asarray(ds.attrs["affine"]), image.attrs["affine"])
    assert ds.attrs["case_id"] == case.case_id


def _check_values(ds: xr.Dataset, source: Path) -> None:
    """Every variable equals what nibabel reads from the case's source file."""
    spec = {c.case_id: c for c in load_source(str(source)).cases}[ds.attrs["case_id"]]
    got = ds["image"].values
    want = nifti_zyx(spec.image)
    # values in native byte order (the phantoms include big-endian files)
    assert got.dtype == want.dtype.newbyteorder("=")
    assert np.array_equal(got, want)
    for seg, path in spec.segmentations.items():
        assert np.array_equal(ds[seg].values, nifti_zyx(path)), seg


@pytest.mark.parametrize("which", ["dap", "saros"])
def test_open_dataset_equals_case_and_nibabel(which: str, request: pytest.FixtureRequest) -> None:
    store: Path = request.getfixturevalue(f"{which}_store")
    source: Path = request.getfixturevalue(f"{which}_source")
    col = ctzarr.open_collection(store)
    for cid in col.case_ids:
        ds = xr.open_dataset(store, engine="ctzarr", group=f"cases/{cid}")
        _check_case(ds, col[cid])
        _check_values(ds, source)


def test_saros_has_one_variable_per_segmentation(saros_store: Path) -> None:
    cid = ctzarr.open_collection(saros_store).case_ids[0]
    ds = xr.open_dataset(saros_store, engine="ctzarr", group=f"cases/{cid}")
    assert list(ds.data_vars) == ["image", "body_regions", "body_parts"]
    assert ds["body_regions"].attrs["ignore_value"] == 255


def test_group_forms_name_the_same_case(dap_store: Path) -> None:
    cid = ctzarr.open_collection(dap_store).case_ids[1]
    for group in (f"cases/{cid}", f"/cases/{cid}", cid):
        ds = xr.open_dataset(dap_store, engine="ctzarr", group=group)
        assert ds.attrs["case_id"] == cid


def test_no_group_is_an_error_naming_the_way(dap_store: Path) -> None:
    cids = ctzarr.open_collection(dap_store).case_ids
    with pytest.raises(ctzarr.CaseNotFoundError, match=r"group='cases/") as info:
        xr.open_dataset(dap_store, engine="ctzarr")
    assert cids[0] in str(info.value)
    assert "open_datatree" in str(info.value)
    with pytest.raises(ctzarr.CaseNotFoundError, match="no case 'nope'"):
        xr.open_dataset(dap_store, engine="ctzarr", group="cases/nope")
    with pytest.raises(ctzarr.CaseNotFoundError, match="no case 'index'"):
        xr.open_dataset(dap_store, engine="ctzarr", group="index")
    with pytest.raises(ctzarr.CaseNotFoundError, match="'cases/a/b' is not a case"):
        xr.open_dataset(dap_store, engine="ctzarr", group="cases/a/b")


def test_chunks_argument_keeps_the_stored_shards(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    cid = col.case_ids[0]
    ds = xr.open_dataset(dap_store, engine="ctzarr", group=f"cases/{cid}", chunks={})
    assert ds["image"].data.chunksize == col[cid].image.data.chunksize
    assert np.array_equal(ds["image"].values, col[cid].image.values)


def test_drop_variables(saros_store: Path) -> None:
    cid = ctzarr.open_collection(saros_store).case_ids[0]
    ds = xr.open_dataset(
        saros_store, engine="ctzarr", group=f"cases/{cid}", drop_variables=["body_parts"]
    )
    assert list(ds.data_vars) == ["image", "body_regions"]
    ds = xr.open_dataset(saros_store, engine="ctzarr", group=f"cases/{cid}", drop_variables="image")
    assert list(ds.data_vars) == ["body_regions", "body_parts"]


def test_pyramid_level(dap_store: Path) -> None:
    col = ctzarr.open_collection(dap_store)
    case = col[col.case_ids[0]]
    ds = xr.open_dataset(dap_store, engine="ctzarr", group=f"cases/{case.case_id}", level=1)
    want = case.image_at(1)
    assert ds["image"].shape == want.shape
    assert np.array_equal(ds["image"].values, want.values)
    np.testing.assert_array_equal(ds["z"].values, want["z"].values)
    np.testing.assert_array_equal(np.asarray(ds.attrs["affine"]), want.attrs["affine"])


def test_engine_is_guessed_for_a_collection_root(dap_store: Path) -> None:
    tree = xr.open_datatree(dap_store)
    assert set(tree["cases"].children) == set(ctzarr.open_collection(dap_store).case_ids)


@pytest.mark.parametrize("which", ["dap", "saros"])
def test_open_datatree_has_a_node_per_case(which: str, request: pytest.FixtureRequest) -> None:
    store: Path = request.getfixturevalue(f"{which}_store")
    source: Path = request.getfixturevalue(f"{which}_source")
    col = ctzarr.open_collection(store)
    tree = xr.open_datatree(store, engine="ctzarr")
    assert tree.attrs["dataset_id"] == col.dataset_id
    assert tree.attrs["segmentations"] == list(col.segmentations)
    assert sorted(tree["cases"].children) == col.case_ids
    for cid in col.case_ids:
        ds = tree[f"cases/{cid}"].to_dataset()
        _check_case(ds, col[cid])
        _check_values(ds, source)


def test_open_datatree_of_one_group(dap_store: Path) -> None:
    cid = ctzarr.open_collection(dap_store).case_ids[0]
    tree = xr.open_datatree(dap_store, engine="ctzarr", group=f"cases/{cid}")
    assert tree.attrs["case_id"] == cid
    assert not tree.children
    groups = xr.open_groups(dap_store, engine="ctzarr", drop_variables="anatomy")
    cids = ctzarr.open_collection(dap_store).case_ids
    assert set(groups) == {"/", "/cases"} | {f"/cases/{c}" for c in cids}
    assert list(groups[f"/cases/{cid}"].data_vars) == ["image"]


@pytest.mark.parametrize("name", ["dap_atlas", "saros"])
def test_golden_format_1_store(name: str, tmp_path: Path) -> None:
    store = tmp_path / f"{name}.zarr"
    shutil.copytree(GOLDEN / f"{name}.zarr", store)
    col = ctzarr.open_collection(store)
    tree = xr.open_datatree(store, engine="ctzarr")
    for cid in col.case_ids:
        case = col[cid]
        ds = tree[f"cases/{cid}"].to_dataset()
        _check_case(ds, case)
        assert np.array_equal(ds["image"].values, case.image.values)
        for seg in case.segmentation_names:
            assert np.array_equal(ds[seg].values, case.labels(seg).values)


# --------------------------------------------------------------------------------------------
# S3 (moto), with storage_options
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_dap(dap_store: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with fake_aws_environment(), fast_moto_server() as endpoint:
        fs = s3_filesystem(endpoint)
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        key = f"{BUCKET}/{unique_prefix('xarray')}/dap.zarr"
        fs.put(str(dap_store), key, recursive=True)
        yield f"s3://{key}", s3_options(endpoint)


def test_open_over_s3_with_storage_options(
    s3_dap: tuple[str, dict[str, Any]], dap_store: Path, dap_source: Path
) -> None:
    url, so = s3_dap
    col = ctzarr.open_collection(dap_store)
    cid = col.case_ids[0]
    ds = xr.open_dataset(url, engine="ctzarr", group=f"cases/{cid}", storage_options=so)
    _check_case(ds, col[cid])
    _check_values(ds, dap_source)
    tree = xr.open_datatree(url, engine="ctzarr", storage_options=so)
    assert sorted(tree["cases"].children) == col.case_ids
    for c in col.case_ids:
        assert np.array_equal(tree[f"cases/{c}/anatomy"].values, col[c].labels("anatomy").values)
