"""Outside readers are the judges of the format.

nifti-zarr, ome-zarr-models, ome-zarr-py, TensorStore, xarray (through the ``ctzarr`` engine)
and zarrita under node read converted stores as their users run them, and what they read must
equal what nibabel reads from the source files: for the DAP Atlas, SAROS and pairs layouts, with
RAS, LAS and LPS sources. ctzarr's own reader is not used here except to run ``ctzarr verify``.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import niizarr
import numpy as np
import pytest
import tensorstore as ts
import xarray as xr
import zarr
from numcodecs import Blosc
from ome_zarr.io import parse_url
from ome_zarr.reader import Label, Multiscales, Reader
from ome_zarr_models import open_ome_zarr
from ome_zarr_models.v05.image import Image
from ome_zarr_models.v05.image_label import ImageLabel

import ctzarr
from ctzarr.testing.phantom import make_phantom, write_dap_atlas, write_saros

from .conftest import nifti_zyx, write_pairs

LAYOUTS = ("dap_atlas", "saros", "pairs")

#: the zarrita release the README's table names; pinned so that a new release cannot change what
#: passes. @zarrita/storage brings the FileSystemStore, numcodecs (a zarrita dependency) blosc.
ZARRITA_PACKAGES = ("zarrita@0.7.5", "@zarrita/storage@0.2.0")

#: an npm install that cannot reach the registry fails after this long instead of hanging
NPM_TIMEOUT_S = 240

#: a reader run as a subprocess (a console script, node) that takes longer than this has hung
TOOL_TIMEOUT_S = 120

#: RFC-4 anatomical orientation: the direction in which the index increases, per nibabel axis code
RFC4_VALUE = {
    "R": "left-to-right",
    "L": "right-to-left",
    "A": "posterior-to-anterior",
    "P": "anterior-to-posterior",
    "S": "inferior-to-superior",
    "I": "superior-to-inferior",
}


# -- sources in three orientations, converted once per layout ---------------------------------------
@dataclass(frozen=True)
class Converted:
    """A converted store and, per case, the source file of each of its OME groups."""

    layout: str
    store: Path
    #: case id -> group path inside the case ("" for the image, "labels/<seg>") -> source NIfTI
    sources: dict[str, dict[str, Path]]

    def group(self, case_id: str, rel: str = "") -> Path:
        case = self.store / "cases" / case_id
        return case / rel if rel else case

    def groups(self) -> Iterator[tuple[str, str, Path]]:
        """(case id, group path inside the case, source file) of every image and label group."""
        for case_id, groups in self.sources.items():
            for rel, src in groups.items():
                yield case_id, rel, src

    def first_case(self, orientation: str) -> str:
        """The first case whose source has this orientation (e.g. "LPS")."""
        return next(
            cid
            for cid, groups in self.sources.items()
            if "".join(nib.aff2axcodes(nib.load(groups[""]).affine)) == orientation
        )


def _reflect_x(path: Path) -> None:
    """Rewrite a NIfTI file with its first voxel axis reversed: an RAS file becomes LAS.

    The anatomy stays where it was in world space: voxel data and affine flip together.
    """
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    affine = img.affine.copy()
    affine[:3, 3] += affine[:3, 0] * (data.shape[0] - 1)
    affine[:3, 0] *= -1
    out = nib.Nifti1Image(np.ascontiguousarray(data[::-1]), affine, header=img.header)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    nib.save(out, path)


def _dap_atlas(root: Path) -> dict[str, dict[str, Path]]:
    # cases cycle RAS, LPS (as ITK writes it), RAS big-endian; the fourth is made LAS.
    # 72 voxels in y: a shard holds two inner chunks; 70 slices: two shards in z.
    names = write_dap_atlas(root, n_cases=4, shape_zyx=(70, 72, 36), seed=21)
    for sub in ("images", "masks"):
        _reflect_x(root / sub / f"{names[3]}.nii.gz")
    return {
        n: {"": root / "images" / f"{n}.nii.gz", "labels/anatomy": root / "masks" / f"{n}.nii.gz"}
        for n in names
    }


def _saros(root: Path) -> dict[str, dict[str, Path]]:
    # cases alternate RAS and LPS; the third is made LAS
    ids = write_saros(root, n_cases=3, shape_zyx=(20, 32, 28), seed=22)
    for name in ("image", "body-regions", "body-parts"):
        _reflect_x(root / ids[2] / f"{name}.nii.gz")
    return {
        cid: {
            "": root / cid / "image.nii.gz",
            "labels/body_regions": root / cid / "body-regions.nii.gz",
            "labels/body_parts": root / cid / "body-parts.nii.gz",
        }
        for cid in ids
    }


def _pairs(root: Path) -> tuple[dict[str, dict[str, Path]], Path]:
    shape, spacing = (24, 30, 26), (2.5, 1.5, 1.25)
    cases = {}
    for i, code in enumerate(("RAS", "LAS", "LPS")):
        ct, mask = make_phantom(shape, spacing, seed=30 + i)
        affine = np.diag([spacing[2], spacing[1], spacing[0], 1.0])
        affine[:3, 3] = (-16.0, -22.0, -30.0)
        for axis, letter in enumerate(code[:2]):
            if letter in "LP":  # index runs the other way; the origin moves to the far corner
                affine[axis, 3] += affine[axis, axis] * (shape[2 - axis] - 1)
                affine[axis, axis] *= -1
        cases[code.lower()] = (ct, mask, affine)
    ids = sorted(set().union(*(np.unique(mask).tolist() for _, mask, _ in cases.values())))
    names = {i: ("background" if i == 0 else f"structure {i}") for i in ids}
    _, labels = write_pairs(root, cases, labels=names)
    sources = {
        cid: {"": root / f"{cid}_ct.nii.gz", "labels/seg": root / f"{cid}_seg.nii.gz"}
        for cid in cases
    }
    return sources, labels


def _convert(layout: str, tmp: pytest.TempPathFactory) -> Converted:
    src = tmp.mktemp(f"{layout}-src")
    labels: list[str] = []
    if layout == "dap_atlas":
        sources = _dap_atlas(src)
    elif layout == "saros":
        sources = _saros(src)
    else:
        sources, label_map = _pairs(src)
        labels = [f"seg={label_map}"]
    store = tmp.mktemp(f"{layout}-store") / f"{layout}.zarr"
    report = ctzarr.convert(src, store, layout=layout, labels=labels or None, progress=False)
    assert report.ok, report
    return Converted(layout, store, sources)


@pytest.fixture(scope="module")
def dap_converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    return _convert("dap_atlas", tmp_path_factory)


@pytest.fixture(scope="module")
def saros_converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    return _convert("saros", tmp_path_factory)


@pytest.fixture(scope="module")
def pairs_converted(tmp_path_factory: pytest.TempPathFactory) -> Converted:
    return _convert("pairs", tmp_path_factory)


@pytest.fixture(params=LAYOUTS)
def converted(request: pytest.FixtureRequest) -> Converted:
    name = {"dap_atlas": "dap", "saros": "saros", "pairs": "pairs"}[request.param]
    return request.getfixturevalue(f"{name}_converted")


def _console_script(name: str) -> str:
    """The console script installed beside this Python, as a user of the venv runs it."""
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    assert path is not None, f"{name}: console script not installed beside {sys.executable}"
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=TOOL_TIMEOUT_S)


def _ome(group: Path) -> dict[str, Any]:
    """The ``ome`` attributes of a group, as any reader finds them in its zarr.json."""
    return json.loads((group / "zarr.json").read_text())["attributes"]["ome"]


def _crop_box(shape: tuple[int, ...]) -> tuple[slice, ...]:
    """A box that crosses chunk boundaries where there are any and misses every edge."""
    return tuple(slice(n // 4, max(n // 4 + 1, n - n // 5)) for n in shape)


def _last_chunk_box(arr: zarr.Array) -> tuple[slice, ...]:
    """The region of the last inner chunk of the last shard (a non-first shard index entry)."""
    return tuple(slice((n - 1) // c * c, n) for n, c in zip(arr.shape, arr.chunks, strict=True))


def test_sources_cover_ras_las_and_lps(converted: Converted) -> None:
    codes = {"".join(nib.aff2axcodes(nib.load(src).affine)) for _, _, src in converted.groups()}
    assert {"RAS", "LAS", "LPS"} <= codes, codes
    for cid, groups in converted.sources.items():
        listed = _ome(converted.group(cid, "labels"))["labels"]
        assert sorted(f"labels/{s}" for s in listed) == sorted(r for r in groups if r)


# -- nifti-zarr ---------------------------------------------------------------------------------------
def _nifti_mismatch(got_path: Path, src: Path) -> str | None:
    got, ref = nib.load(got_path), nib.load(src)
    got_data, ref_data = np.asanyarray(got.dataobj), np.asanyarray(ref.dataobj)
    if got_data.shape != ref_data.shape or not np.array_equal(got_data, ref_data):
        return f"values differ (shape {got_data.shape} vs {ref_data.shape})"
    if got_data.dtype.name != ref_data.dtype.name:
        return f"dtype {got_data.dtype} vs {ref_data.dtype}"
    if not np.allclose(got.affine, ref.affine, atol=1e-5):
        return f"affine\n{got.affine}\nvs the source's\n{ref.affine}"
    return None


def test_nifti_zarr_gives_back_every_source_file(converted: Converted, tmp_path: Path) -> None:
    """niizarr.zarr2nii on the image group and on every label group: the source file again."""
    problems = []
    for cid, rel, src in converted.groups():
        out = tmp_path / f"{cid}-{rel.replace('/', '-') or 'image'}.nii.gz"
        niizarr.zarr2nii(str(converted.group(cid, rel)), str(out))
        if (why := _nifti_mismatch(out, src)) is not None:
            problems.append(f"{converted.layout} {cid} {rel or 'image'}: {why}")
    assert not problems, "\n".join(problems)


def test_zarr2nii_console_script(converted: Converted, tmp_path: Path) -> None:
    """``zarr2nii GROUP OUT.nii.gz`` as a user runs it, on a label group of an LPS case (every
    group goes through ``niizarr.zarr2nii`` above; one run costs ~1.5 s of imports)."""
    cid = converted.first_case("LPS")
    rel, src = next((rel, src) for rel, src in converted.sources[cid].items() if rel)
    out = tmp_path / "label.nii.gz"
    proc = _run([_console_script("zarr2nii"), str(converted.group(cid, rel)), str(out)])
    assert proc.returncode == 0, proc.stderr
    assert _nifti_mismatch(out, src) is None, (
        converted.layout,
        cid,
        rel,
        _nifti_mismatch(out, src),
    )


# -- ome-zarr-models ----------------------------------------------------------------------------------
def test_ome_zarr_models_validates_every_image_and_label_group(converted: Converted) -> None:
    for cid, groups in converted.sources.items():
        image = open_ome_zarr(zarr.open_group(converted.group(cid), mode="r"))
        assert isinstance(image, Image), (cid, type(image))
        levels = len(image.attributes.ome.multiscales[0].datasets)
        for rel in groups:
            if not rel:
                continue
            label = open_ome_zarr(zarr.open_group(converted.group(cid, rel), mode="r"))
            assert isinstance(label, ImageLabel), (cid, rel, type(label))
            assert len(label.attributes.ome.multiscales[0].datasets) == levels, (cid, rel)


def test_ome_zarr_models_cli_validates(converted: Converted) -> None:
    """``ome-zarr-models validate`` on the image group of an LPS case (with its labels)."""
    cid = converted.first_case("LPS")
    proc = _run([_console_script("ome-zarr-models"), "validate", str(converted.group(cid))])
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "Valid OME-Zarr" in proc.stdout, proc.stdout


# -- RFC-4 orientation --------------------------------------------------------------------------------
def test_rfc4_orientation_matches_the_source_affine(converted: Converted) -> None:
    """Each OME axis's orientation is nibabel's axis code of the source, in (z, y, x) order."""
    problems = []
    for cid, rel, src in converted.groups():
        codes = nib.aff2axcodes(nib.load(src).affine)  # (i, j, k) = (x, y, z)
        expected = [{"type": "anatomical", "value": RFC4_VALUE[c]} for c in reversed(codes)]
        axes = _ome(converted.group(cid, rel))["multiscales"][0]["axes"]
        got = [axis.get("orientation") for axis in axes]
        if [a["name"] for a in axes] != ["z", "y", "x"] or got != expected:
            problems.append(f"{cid} {rel or 'image'} ({''.join(codes)}): {got} != {expected}")
    assert not problems, "\n".join(problems)


# -- TensorStore --------------------------------------------------------------------------------------
def _tensorstore(path: Path) -> ts.TensorStore:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return ts.open(spec, open=True, read=True).result()


def test_tensorstore_reads_level_0_and_a_crop(converted: Converted) -> None:
    for cid, rel, src in converted.groups():
        ref = nifti_zyx(src)
        arr = _tensorstore(converted.group(cid, rel) / "0")
        assert arr.domain.labels == ("z", "y", "x"), (cid, rel)
        np.testing.assert_array_equal(arr.read().result(), ref, err_msg=f"{cid} {rel}")
        box = _crop_box(ref.shape)
        np.testing.assert_array_equal(arr[box].read().result(), ref[box], err_msg=f"{cid} {rel}")


def test_scaled_source_outside_readers_see_stored_integers(tmp_path: Path) -> None:
    """A scaled source (uint16 CT with scl_inter -1024) is stored as its raw integers, losslessly:
    TensorStore reads those, and the scaling of the group's NIfTI-Zarr ``nifti`` header maps them
    to nibabel's values (the recipe the README gives to raw array readers)."""
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 3000, size=(10, 12, 14)).astype(np.uint16)
    mask = rng.integers(0, 3, size=raw.shape).astype(np.uint8)
    manifest, labels = write_pairs(tmp_path / "src", {"scaled": (raw, mask, np.eye(4))})
    ct = tmp_path / "src" / "scaled_ct.nii.gz"
    img = nib.load(ct)
    img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, header=img.header)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, ct)
    ref = nifti_zyx(ct)
    assert ref.dtype == np.float64  # nibabel applies the scaling
    store = tmp_path / "scaled.zarr"
    assert ctzarr.convert(manifest, store, labels=[f"seg={labels}"], progress=False).ok
    case = store / "cases" / "scaled"
    stored = _tensorstore(case / "0").read().result()
    header_bytes = _tensorstore(case / "nifti").read().result().tobytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(header_bytes))
    slope, inter = header.get_slope_inter()
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, raw)
    np.testing.assert_array_equal(stored * slope + inter, ref)


# -- xarray through the ctzarr engine -----------------------------------------------------------------
def test_xarray_open_dataset_with_the_ctzarr_engine(converted: Converted) -> None:
    for cid, groups in converted.sources.items():
        ds = xr.open_dataset(converted.store, engine="ctzarr", group=f"cases/{cid}")
        for rel, src in groups.items():
            var = ds["image" if not rel else rel.removeprefix("labels/")]
            assert var.dims == ("z", "y", "x"), (cid, rel)
            np.testing.assert_array_equal(var.values, nifti_zyx(src), err_msg=f"{cid} {rel}")


def test_xarray_open_datatree_with_the_ctzarr_engine(converted: Converted) -> None:
    tree = xr.open_datatree(converted.store, engine="ctzarr")
    for cid, rel, src in converted.groups():
        node = tree[f"cases/{cid}"]
        var = node["image" if not rel else rel.removeprefix("labels/")]
        np.testing.assert_array_equal(var.values, nifti_zyx(src), err_msg=f"{cid} {rel}")


# -- ome-zarr-py --------------------------------------------------------------------------------------
def test_ome_zarr_py_reader_finds_image_and_label_layers(converted: Converted) -> None:
    for cid, groups in converted.sources.items():
        location = parse_url(str(converted.group(cid)))
        assert location is not None, cid
        nodes = list(Reader(location)())
        images = [n for n in nodes if n.load(Multiscales) and not n.load(Label)]
        labels = {n.metadata["name"]: n for n in nodes if n.load(Label)}
        assert len(images) == 1, (cid, nodes)
        assert sorted(f"labels/{name}" for name in labels) == sorted(r for r in groups if r)
        levels = len(images[0].data)
        for rel, src in groups.items():
            node = images[0] if not rel else labels[rel.removeprefix("labels/")]
            assert len(node.data) == levels, (cid, rel)
            np.testing.assert_array_equal(
                node.data[0].compute(), nifti_zyx(src), err_msg=f"{cid} {rel}"
            )


def test_ome_zarr_info_lists_image_and_labels(converted: Converted) -> None:
    cid = converted.first_case("LPS")
    proc = _run([_console_script("ome_zarr"), "info", str(converted.group(cid))])
    assert proc.returncode == 0, proc.stderr
    assert "Multiscales" in proc.stdout, proc.stdout
    for rel, src in converted.sources[cid].items():
        shape = str(nifti_zyx(src).shape)
        assert shape in proc.stdout, (shape, proc.stdout)
        if rel:
            assert f"{rel} [zgroup]" in proc.stdout, (rel, proc.stdout)


# -- zarrita under node -------------------------------------------------------------------------------
# Reads [{"path", "box": [[start, stop], ...]}, ...] of the store at argv[2] (argv[3], JSON) and
# prints [{"dtype", "shape", "data"}, ...].
_ZARRITA_READ = """
import * as zarr from "zarrita";
import FileSystemStore from "@zarrita/storage/fs";
const [root, requests] = process.argv.slice(2);
const store = new FileSystemStore(root);
const out = [];
for (const { path, box } of JSON.parse(requests)) {
  const arr = await zarr.open(zarr.root(store).resolve(path), { kind: "array" });
  const got = await zarr.get(arr, box.map(([start, stop]) => zarr.slice(start, stop)));
  out.push({ dtype: arr.dtype, shape: got.shape, data: Array.from(got.data, Number) });
}
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="session")
def zarrita(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with zarrita installed from the npm registry and the read script; once a session."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("zarrita runs under node: node and npm are not installed on this machine")
    prefix = tmp_path_factory.mktemp("zarrita")
    argv = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund"]
    argv += ["--fetch-timeout=60000", "--fetch-retries=1", *ZARRITA_PACKAGES]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"npm install {' '.join(ZARRITA_PACKAGES)} did not finish in {NPM_TIMEOUT_S} s: "
            "is the npm registry reachable?"
        )
    if proc.returncode != 0:
        pytest.fail(f"npm install {' '.join(ZARRITA_PACKAGES)} failed:\n{proc.stderr[-2000:]}")
    (prefix / "read.mjs").write_text(_ZARRITA_READ)
    return prefix


def _zarrita_read(
    prefix: Path, store: Path, requests: list[tuple[str, tuple[slice, ...]]]
) -> list[np.ndarray]:
    payload = [{"path": path, "box": [[s.start, s.stop] for s in box]} for path, box in requests]
    proc = _run(["node", str(prefix / "read.mjs"), str(store), json.dumps(payload)])
    assert proc.returncode == 0, proc.stderr
    return [
        np.asarray(r["data"], dtype=r["dtype"]).reshape(r["shape"]) for r in json.loads(proc.stdout)
    ]


@pytest.mark.timeout(NPM_TIMEOUT_S + 120)
def test_zarrita_reads_sharded_chunks(zarrita: Path, converted: Converted) -> None:
    """zarrita reads the last inner chunk of the last shard and a box across chunks."""
    requests, expected = [], []
    for cid, rel, src in converted.groups():
        ref = nifti_zyx(src)
        path = f"cases/{cid}/{rel + '/' if rel else ''}0"
        level0 = zarr.open_array(converted.store / path, mode="r")
        for box in (_last_chunk_box(level0), _crop_box(ref.shape)):
            requests.append((path, box))
            expected.append(ref[box])
    got = _zarrita_read(zarrita, converted.store, requests)
    assert len(got) == len(expected)
    for (path, box), g, e in zip(requests, got, expected, strict=True):
        assert g.dtype.name == e.dtype.name, (path, g.dtype, e.dtype)
        np.testing.assert_array_equal(g, e, err_msg=f"{path} {box}")


def _flip_a_payload_bit(shard: Path, chunks_per_shard: int) -> None:
    """Flip one bit inside the first inner chunk's compressed bytes, at a place where blosc
    still decodes (to other values): damage that only the crc32c after the chunk reveals."""
    data = bytearray(shard.read_bytes())
    # index at the end: (offset, nbytes) uint64 pairs per inner chunk, then its crc32c
    index = data[-(16 * chunks_per_shard + 4) : -4]
    entries = np.frombuffer(bytes(index), dtype="<u8").reshape(-1, 2)
    offset, nbytes = (int(v) for v in entries[0])
    frame = bytes(data[offset : offset + nbytes - 4])  # the blosc frame before the crc32c
    codec = Blosc()
    clean = codec.decode(frame)
    for i in range(len(frame) // 2, len(frame)):
        damaged = bytearray(frame)
        damaged[i] ^= 0x10
        try:
            decoded = codec.decode(bytes(damaged))
        except (RuntimeError, ValueError):
            continue
        if len(decoded) == len(clean) and bytes(decoded) != bytes(clean):
            data[offset + i] ^= 0x10
            shard.write_bytes(bytes(data))
            return
    raise AssertionError(f"{shard}: no bit flip that still decodes")


@pytest.mark.timeout(NPM_TIMEOUT_S + 120)
def test_zarrita_ignores_crc32c_ctzarr_verify_finds_the_object(
    zarrita: Path, dap_converted: Converted, tmp_path: Path
) -> None:
    """zarrita drops the crc32c after each chunk unchecked: a damaged chunk that still
    decompresses reads as wrong numbers without an error. TensorStore checks the digest, and
    ``ctzarr verify`` names the object (the README's answer)."""
    store = tmp_path / "damaged.zarr"
    shutil.copytree(dap_converted.store, store)
    cid = next(iter(dap_converted.sources))
    level0 = zarr.open_array(store / "cases" / cid / "0", mode="r")
    assert level0.shards is not None
    per_shard = int(np.prod([s // c for s, c in zip(level0.shards, level0.chunks, strict=True)]))
    _flip_a_payload_bit(store / "cases" / cid / "0" / "c" / "0" / "0" / "0", per_shard)
    box = tuple(slice(0, c) for c in level0.chunks)  # the first inner chunk
    ref = nifti_zyx(dap_converted.sources[cid][""])[box]

    (got,) = _zarrita_read(zarrita, store, [(f"cases/{cid}/0", box)])
    assert got.shape == ref.shape
    assert not np.array_equal(got, ref)  # silently wrong

    with pytest.raises(ValueError, match=r"[Dd]igest mismatch"):
        _tensorstore(store / "cases" / cid / "0")[box].read().result()

    proc = _run([sys.executable, "-m", "ctzarr.cli", "verify", str(store)])
    assert proc.returncode == 1, proc.stdout
    assert cid in proc.stdout, proc.stdout
    assert "array '0' chunk c/0/0/0" in proc.stdout, proc.stdout
