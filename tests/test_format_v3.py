"""Store format 3: per-chunk voxel counts, per-slice counts and value sums, and the joint index of
each pair of segmentations, written by the converter's one pass, equal numpy on nibabel's arrays.

The phantoms are larger than a chunk along every axis (64 voxels), so per-chunk counts span a
grid of chunks; DAP cases are RAS and LPS, SAROS cases sparse (255 on unannotated slices).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import ctzarr
from ctzarr.errors import IndexUnavailableError
from ctzarr.model.index import FLOAT_HISTOGRAM_RESOLUTION, LabelIndex
from ctzarr.read.verify import verify
from ctzarr.testing.phantom import write_dap_atlas, write_saros
from ctzarr.write.index_builder import JointIndexBuilder, LabelIndexBuilder

GOLDEN = Path(__file__).parent / "golden"
SHAPE_ZYX = (70, 68, 66)  # over one 64-voxel chunk along every axis


def _zyx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    return np.ascontiguousarray(np.asanyarray(img.dataobj).T), np.asarray(img.affine)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """(source root, store) per layout."""
    root = tmp_path_factory.mktemp("format3")
    write_dap_atlas(root / "dap", n_cases=2, shape_zyx=SHAPE_ZYX, seed=7)
    write_saros(root / "saros", n_cases=2, shape_zyx=SHAPE_ZYX, seed=8)
    out = {}
    for layout, src in (("dap_atlas", root / "dap"), ("saros", root / "saros")):
        dest = root / f"{layout}.zarr"
        report = ctzarr.convert(src, dest, layout=layout, progress=False)
        assert report.ok, report
        out[layout] = (src, dest)
    return out


def _sources(layout: str, root: Path, case_id: str) -> tuple[Path, dict[str, Path]]:
    if layout == "dap_atlas":
        return root / "images" / f"{case_id}.nii.gz", {
            "anatomy": root / "masks" / f"{case_id}.nii.gz"
        }
    folder = root / case_id
    return folder / "image.nii.gz", {
        "body_regions": folder / "body-regions.nii.gz",
        "body_parts": folder / "body-parts.nii.gz",
    }


def _chunk_counts(mask: np.ndarray, chunk: tuple[int, int, int]) -> np.ndarray:
    """Voxels of a mask in each chunk, flattened in C order of the chunk grid."""
    starts = [np.arange(0, n, c) for n, c in zip(mask.shape, chunk, strict=True)]
    out = mask.astype(np.int64)
    for axis, s in enumerate(starts):
        out = np.add.reduceat(out, s, axis=axis)
    return out.ravel()


def _check_index(idx: LabelIndex, labels: np.ndarray, image: np.ndarray, where: str) -> None:
    """Every format-3 number of an index against numpy on the arrays (labels: index codes)."""
    assert idx.chunk_counts is not None
    assert idx.problems() == [], where
    keys = image.astype(np.int64)  # integer CT: the key is the value
    assert idx.histogram_resolution == 1.0
    for i, label in enumerate(idx.labels.tolist()):
        mask = labels == label
        held = np.flatnonzero(mask.any(axis=(1, 2)))
        z, count, key_sum = idx.slice_profile(label)
        np.testing.assert_array_equal(z, held, err_msg=f"{where} label {label}: z")
        np.testing.assert_array_equal(
            count, mask.sum(axis=(1, 2))[held], err_msg=f"{where} label {label}: counts"
        )
        np.testing.assert_array_equal(
            key_sum,
            np.where(mask, keys, 0).sum(axis=(1, 2))[held],
            err_msg=f"{where} label {label}: key sums",
        )
        per_chunk = _chunk_counts(mask, idx.chunk_shape)
        ids, counts = idx.chunk_voxel_counts(label)
        np.testing.assert_array_equal(ids, np.flatnonzero(per_chunk), err_msg=where)
        np.testing.assert_array_equal(counts, per_chunk[ids], err_msg=where)
        assert idx.voxel_count[i] == mask.sum()


@pytest.mark.parametrize("layout", ["dap_atlas", "saros"])
def test_per_slice_and_per_chunk_counts_equal_numpy(
    stores: dict[str, tuple[Path, Path]], layout: str
) -> None:
    src, dest = stores[layout]
    col = ctzarr.open_collection(dest)
    assert col.meta.format_version == 3
    lps = 0
    for case_id in col.case_ids:
        case = col[case_id]
        image_path, label_paths = _sources(layout, src, case_id)
        image, affine = _zyx(image_path)
        lps += affine[0, 0] < 0
        for seg, path in label_paths.items():
            labels, _ = _zyx(path)
            idx = case.index(seg)
            assert idx.chunk_grid == (2, 2, 2)
            # every label present, and no other
            lm = col.segmentations[seg]
            present = sorted(set(np.unique(labels).tolist()) - {0, lm.ignore_value})
            assert idx.labels.tolist() == present
            _check_index(idx, labels, image, f"{case_id} {seg}")
            if lm.ignore_value is not None:  # ignore-valued slices hold no label voxel
                ignored = (labels == lm.ignore_value).any(axis=(1, 2))
                for label in idx.labels.tolist():
                    z, _, _ = idx.slice_profile(label)
                    assert not ignored[z].any()
    assert lps >= 1  # an LPS case was among them


def test_joint_index_equals_numpy(stores: dict[str, tuple[Path, Path]]) -> None:
    src, dest = stores["saros"]
    col = ctzarr.open_collection(dest)
    for case_id in col.case_ids:
        case = col[case_id]
        image_path, paths = _sources("saros", src, case_id)
        image, _ = _zyx(image_path)
        parts, _ = _zyx(paths["body_parts"])
        regions, _ = _zyx(paths["body_regions"])
        found = case.joint_index("body_regions", "body_parts")
        assert found is not None
        joint, radix, flipped = found
        assert flipped  # body_parts < body_regions: body_regions is the second
        again = case.joint_index("body_parts", "body_regions")
        assert again is not None
        assert again[1:] == (radix, False)
        lm = col.segmentations["body_regions"]
        assert radix == max(set(lm.values) - {lm.background, lm.ignore_value}) + 1
        valid = (parts != 0) & (parts != 255) & (regions != 0) & (regions != 255)
        codes = np.where(valid, parts.astype(np.int64) * radix + regions, -1)
        present = sorted(set(np.unique(codes).tolist()) - {-1})
        assert joint.labels.tolist() == present
        for i, code in enumerate(present):
            mask = codes == code
            assert joint.voxel_count[i] == mask.sum()
            values, counts = joint.histogram(code)
            want_values, want_counts = np.unique(image[mask], return_counts=True)
            np.testing.assert_array_equal(values, want_values)
            np.testing.assert_array_equal(counts, want_counts)
            idx = np.argwhere(mask)
            np.testing.assert_array_equal(joint.coord_sum[i], idx.sum(axis=0))
            np.testing.assert_array_equal(
                joint.bbox[i], np.stack([idx.min(axis=0), idx.max(axis=0) + 1], 1).ravel()
            )
        _check_index(joint, codes, image, f"{case_id} joint")


def test_joint_index_only_with_two_segmentations(stores: dict[str, tuple[Path, Path]]) -> None:
    _, dest = stores["dap_atlas"]
    col = ctzarr.open_collection(dest)
    case = col[col.case_ids[0]]
    with pytest.raises(ValueError, match="twice"):
        case.joint_index("anatomy", "anatomy")
    assert not any("/joint/" in p for p in case.array_paths)


def test_verify_checks_format3_parts(stores: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    for _, dest in stores.values():
        report = verify(dest)
        assert report.ok, report
    # an index whose parts disagree is named (the committed digests stop edits on disk first)
    _, dest = stores["saros"]
    case = ctzarr.open_collection(dest)["case_000"]
    idx = case.index("body_parts")
    assert idx.slice_counts is not None
    assert idx.chunk_counts is not None
    counts = idx.slice_counts.copy()
    counts[0] += 1
    chunks = (idx.chunk_counts[0] + 1, *idx.chunk_counts[1:])
    bad = dataclasses.replace(idx, slice_counts=counts, chunk_counts=chunks)
    problems = bad.problems()
    label = int(idx.labels[0])
    assert f"label {label}: per-chunk counts sum to" in problems[0]
    assert f"label {label}: per-slice counts sum to" in problems[1]
    sums = idx.slice_sums.copy() if idx.slice_sums is not None else None
    assert sums is not None
    sums[-1] += 1
    assert (
        "per-slice value sums add up to" in dataclasses.replace(idx, slice_sums=sums).problems()[0]
    )


def test_edited_slices_array_is_found_by_verify(
    stores: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    _, dest = stores["saros"]
    copy = tmp_path / "s.zarr"
    shutil.copytree(dest, copy)
    chunk = (
        copy / "cases" / "case_000" / "labels" / "body_parts" / "index" / "slices" / "c" / "0" / "0"
    )
    chunk.write_bytes(chunk.read_bytes()[:-1] + bytes([chunk.read_bytes()[-1] ^ 1]))
    report = verify(copy)
    assert not report.ok
    assert any("body_parts/index/slices" in p for p in report.problems), report


def test_older_formats_have_no_format3_parts(tmp_path: Path) -> None:
    for fmt in ("format-1", "format-2"):
        copy = tmp_path / fmt
        shutil.copytree(GOLDEN / fmt / "saros.zarr", copy)
        case = ctzarr.open_collection(copy)["case_000"]
        idx = case.index("body_parts")
        assert idx.chunk_counts is None
        assert idx.slice_counts is None
        assert idx.slice_sums is None
        with pytest.raises(IndexUnavailableError, match="format < 3"):
            idx.slice_profile(int(idx.labels[0]))
        with pytest.raises(IndexUnavailableError, match="format < 3"):
            idx.chunk_voxel_counts(int(idx.labels[0]))
        assert case.joint_index("body_parts", "body_regions") is None
        assert "per-chunk" not in repr(idx)


def _profile(mask: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return mask.sum(axis=(1, 2)), np.where(mask, keys, 0).sum(axis=(1, 2))


def test_float_values_with_nan_and_merged_slabs() -> None:
    """Float images: keys at the histogram resolution; a NaN voxel counts and adds 0; a
    builder merged from slab builders (the scan path) gives the one-pass answer."""
    rng = np.random.default_rng(0)
    shape, chunk = (12, 9, 10), (4, 4, 4)
    labels = rng.integers(0, 4, shape).astype(np.uint8)
    values = rng.integers(-100, 100, shape).astype(np.float32)
    values[5:] += 0.25  # non-integral from slice 5 on: keys switch to the float resolution
    values[7, 1, 1] = np.nan
    labels[7, 1, 1] = 2
    one = LabelIndexBuilder(range(4), shape, chunk, label_dtype=np.dtype(np.uint8))
    parts = []
    for z0 in range(0, shape[0], 3):
        one.update(z0, labels[z0 : z0 + 3], values[z0 : z0 + 3])
        part = LabelIndexBuilder(range(4), shape, chunk, label_dtype=np.dtype(np.uint8))
        part.update(z0, labels[z0 : z0 + 3], values[z0 : z0 + 3])
        parts.append(part)
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    keys = np.rint(np.nan_to_num(values, nan=0.0).astype(np.float64) / FLOAT_HISTOGRAM_RESOLUTION)
    for idx in (one.finish(sparse_annotation=False), merged.finish(sparse_annotation=False)):
        assert idx.histogram_resolution == FLOAT_HISTOGRAM_RESOLUTION
        assert idx.problems() == []
        for label in idx.labels.tolist():
            count, key_sum = _profile(labels == label, keys.astype(np.int64))
            z, got_count, got_sum = idx.slice_profile(label)
            np.testing.assert_array_equal(got_count, count[z])
            np.testing.assert_array_equal(got_sum, key_sum[z])
            assert got_count.sum() == (labels == label).sum()
            per_chunk = _chunk_counts(labels == label, chunk)
            ids, counts = idx.chunk_voxel_counts(label)
            np.testing.assert_array_equal(counts, per_chunk[ids])
        assert idx.nonfinite_count.tolist() == [0, 1, 0]


def test_joint_builder_with_nonzero_background_codes() -> None:
    """Pair codes never collide with the fill code, whatever the label values."""
    rng = np.random.default_rng(1)
    shape = (5, 6, 7)
    a = rng.integers(0, 3, shape).astype(np.uint8)
    b = rng.integers(0, 3, shape).astype(np.uint8)
    values = rng.integers(-5, 5, shape).astype(np.int16)
    joint = JointIndexBuilder("a", "b", [0, 2], [1, 2], shape, (64, 64, 64))
    joint.update(0, a, b, values)
    idx = joint.finish()
    radix = joint.info.radix
    assert radix == 3
    valid = np.isin(a, [0, 2]) & np.isin(b, [1, 2])
    codes = np.where(valid, a.astype(np.int64) * radix + b, -1)
    assert idx.labels.tolist() == sorted(set(codes[valid].tolist()))
    for i, code in enumerate(idx.labels.tolist()):
        assert idx.voxel_count[i] == (codes == code).sum()
        assert joint.info.split(np.array([code])) == (np.array([code // 3]), np.array([code % 3]))


def test_numba_is_not_imported_by_readers() -> None:
    """The index builder (and the statistics that import it) load numba only to build."""
    code = (
        "import sys, ctzarr.write.index_builder, ctzarr.read.stats, ctzarr.model.index; "
        "print(sorted(m for m in ('numba', 'llvmlite') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
