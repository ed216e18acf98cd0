"""The cases of a collection are discoverable from the store root, as OME-Zarr 0.5 describes a
collection of images: the bioformats2raw layout (root ``ome["bioformats2raw.layout"] = 3`` and an
``OME`` group whose ``series`` lists the image paths, here ``cases/<case_id>``).

ome-zarr-py's ``ome_zarr info`` (0.21) does not follow that layout from the root (its reader knows
images, labels and plates only: ome/ome-zarr-py#421), so the test runs it on every path the
series lists, which is how a tool finds the cases, and on the root, which it must not fail on.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import zarr
from ome_zarr_models.v05.bioformats2raw import BioFormats2Raw
from ome_zarr_models.v05.image import Image

import ctzarr
from ctzarr.write.table import update_collection_table

OME_ZARR = Path(sys.executable).with_name("ome_zarr")


def _series(store: Path) -> list[str]:
    root = zarr.open_group(store, mode="r", zarr_format=3)
    ome = root["OME"].attrs["ome"]
    assert ome["version"] == "0.5"
    series = ome.get("series", [])
    assert isinstance(series, list)
    return [str(s) for s in series]


@pytest.mark.parametrize("which", ["dap", "saros"])
def test_root_lists_every_case_as_an_ome_series(which: str, request: pytest.FixtureRequest) -> None:
    store: Path = request.getfixturevalue(f"{which}_store")
    col = ctzarr.open_collection(store)
    root = zarr.open_group(store, mode="r", zarr_format=3)
    assert root.attrs["ome"] == {"version": "0.5", "bioformats2raw.layout": 3}
    series = _series(store)
    assert series == [f"cases/{cid}" for cid in col.case_ids]
    # ome-zarr-models accepts the root as a bioformats2raw group, and each listed path as an image
    BioFormats2Raw.from_zarr(root)
    for path in series:
        grp = root[path]
        assert isinstance(grp, zarr.Group)
        Image.from_zarr(grp)


def test_ome_zarr_info_finds_every_listed_case(dap_store: Path) -> None:
    assert OME_ZARR.exists(), "ome-zarr (the test extra) provides the ome_zarr command"
    root = subprocess.run(
        [str(OME_ZARR), "info", str(dap_store)], capture_output=True, text=True, timeout=120
    )
    assert root.returncode == 0, root.stderr
    col = ctzarr.open_collection(dap_store)
    for path in _series(dap_store):
        out = subprocess.run(
            [str(OME_ZARR), "info", str(dap_store / path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        assert "Multiscales" in out.stdout, out.stdout
        assert f"{path}/labels/anatomy" in out.stdout, out.stdout  # its segmentation too
        level0 = col[path.removeprefix("cases/")].shape
        assert str(tuple(level0)) in out.stdout


def test_series_follows_the_case_list(dap_source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dap.zarr"
    cids = sorted(c.name.removesuffix(".nii.gz") for c in (dap_source / "images").iterdir())
    assert ctzarr.convert(dap_source, dest, cases=cids[1:2], progress=False).ok
    assert _series(dest) == [f"cases/{cids[1]}"]
    assert ctzarr.convert(dap_source, dest, progress=False).ok
    assert _series(dest) == [f"cases/{c}" for c in cids]
    # a removed case leaves the list with the next table update
    shutil.rmtree(dest / "cases" / cids[0])
    update_collection_table(zarr.open_group(dest, mode="r+", zarr_format=3))
    assert _series(dest) == [f"cases/{c}" for c in cids[1:]]
    assert ctzarr.open_collection(dest).case_ids == cids[1:]
