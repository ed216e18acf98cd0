"""Write the golden stores under ``tests/golden/format-<N>/`` and the answers they must give.

The committed ``format-1`` directory was made by ctzarr 0.1.0 as released before the package was
split into layers (commit afc2c2a, store ``format_version`` 1), with that release's own venv::

    /path/to/ctzarr-0.1.0/.venv/bin/python tests/golden/make_golden.py tests/golden/format-1

It is never run by the tests, and a committed ``format-N`` directory is never regenerated: it
pins what a release wrote, and every later version must read it unchanged
(``tests/test_golden_store.py`` via :func:`ctzarr.testing.golden.check_golden_store`). When the
store format changes, run this script with the new release into a new ``format-<N+1>``
directory and keep the old ones.

What it writes into OUT (refused if OUT exists):

- ``dap_atlas.zarr``: 3 DAP Atlas-layout phantom cases (12 x 20 x 16 voxels): one RAS, one
  stored as ITK writes LPS (flipped x and y), one big-endian with odd float32 spacings;
- ``saros.zarr``: 2 SAROS-layout cases (10 x 20 x 16; the second LPS), only every fifth axial
  slice annotated and every other slice 255 (the ignore value) in both label maps;
- ``expected/golden.json``: how it was made, and which store each ``expected/<collection>``
  directory belongs to;
- ``expected/<collection>/index.json``: the collection's dataset id, case ids and segmentations,
  per case its shape and, per segmentation, the labels present with their voxel counts and
  half-open (z, y, x) bounding boxes, and the annotated slice indices of sparse maps; from
  format 3 on also, per label, ``chunk_counts`` (``[chunk id, voxels]`` of every chunk holding
  it, chunk ids flat in C order of the index's chunk grid) and ``slices`` (``[z, voxels, sum of
  values]`` of every slice holding it), and per case with two segmentations A < B a ``joint``
  entry ``"A/B"``: radix, pair codes ``a * radix + b`` present, their voxel counts and slices;
- ``expected/<collection>/<case_id>.npz``: the level-0 image and label arrays and the affine,
  read by nibabel from the source NIfTI files (``np.asanyarray(img.dataobj)`` transposed to
  (z, y, x)), not from the store (the big-endian case's image stays big-endian, as nibabel
  returns it; the store reads it back in native byte order);
- ``expected/<collection>/stats.csv``: ``col.stats(method="index")`` of the release, written only
  after every row was checked against a numpy computation on the nibabel arrays (integers,
  bounding boxes, minima, maxima and percentiles exactly; means, standard deviations, volumes and
  centroids to 1e-12 relative).

Only the index facts and arrays come from nibabel alone; the statistics table is the release's
output, so a later version must reproduce the release's floating-point results bit for bit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd

import ctzarr

try:  # the release that wrote format 1 had a flat package
    from ctzarr.phantom import write_dap_atlas, write_saros
except ImportError:  # layered package (ctzarr >= the restructure)
    from ctzarr.testing.phantom import write_dap_atlas, write_saros

DAP_SHAPE_ZYX = (12, 20, 16)
SAROS_SHAPE_ZYX = (10, 20, 16)
SEED = 1
IGNORE = {"dap_atlas": None, "saros": 255}
PERCENTILES = {"hu_median": 50, "hu_p05": 5, "hu_p25": 25, "hu_p75": 75, "hu_p95": 95}


def _zyx(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Values in stored (z, y, x) order and the affine, as nibabel reads the file."""
    img = nib.load(path)
    return np.ascontiguousarray(np.asanyarray(img.dataobj).T), np.asarray(img.affine, np.float64)


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


def _numpy_rows(
    case_id: str, seg: str, image: np.ndarray, labels: np.ndarray, affine: np.ndarray, ignore: Any
) -> dict[int, dict[str, Any]]:
    """Statistics of every label present, from the arrays alone."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[::-1]  # (z, y, x) mm
    rows = {}
    for label in np.unique(labels).tolist():
        if label == 0 or label == ignore:
            continue
        mask = labels == label
        values = image[mask].astype(np.int64)
        idx = np.argwhere(mask)
        lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
        mean_zyx = idx.mean(axis=0)
        world = affine @ np.array([mean_zyx[2], mean_zyx[1], mean_zyx[0], 1.0])
        row = {
            "case_id": case_id,
            "segmentation": seg,
            "label": label,
            "voxel_count": int(mask.sum()),
            "volume_ml": float(mask.sum() * np.prod(spacing) / 1000.0),
            "hu_mean": float(values.mean()),
            "hu_std": float(values.std()),
            "hu_min": float(values.min()),
            "hu_max": float(values.max()),
            "centroid_x": world[0],
            "centroid_y": world[1],
            "centroid_z": world[2],
            "z_start": int(lo[0]),
            "z_stop": int(hi[0]),
            "y_start": int(lo[1]),
            "y_stop": int(hi[1]),
            "x_start": int(lo[2]),
            "x_stop": int(hi[2]),
            "touches_border": bool((lo == 0).any() or (hi == np.array(labels.shape)).any()),
        }
        row.update({k: float(np.percentile(values, q)) for k, q in PERCENTILES.items()})
        if ignore is not None:
            row["annotated_slices"] = int((~(labels == ignore).all(axis=(1, 2))).sum())
        rows[label] = row
    return rows


def _check_rows(stats: pd.DataFrame, expected: dict[tuple[str, str, int], dict[str, Any]]) -> None:
    """The release's statistics equal the numpy computation (floats to 1e-12 relative)."""
    got = {(r.case_id, r.segmentation, int(r.label)): r for r in stats.itertuples(index=False)}
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    inexact = {"volume_ml", "hu_mean", "hu_std", "centroid_x", "centroid_y", "centroid_z"}
    for key, want in expected.items():
        row = got[key]._asdict()
        for col, value in want.items():
            if col in inexact:
                np.testing.assert_allclose(
                    row[col], value, rtol=1e-12, atol=1e-9, err_msg=f"{key} {col}"
                )
            else:
                assert row[col] == value, (key, col, row[col], value)


def _chunk_and_slice_facts(
    codes: np.ndarray, image: np.ndarray, labels: list[int], chunk: tuple[int, int, int]
) -> dict[str, Any]:
    """Per label: [chunk id, voxels] of its chunks and [z, voxels, value sum] of its slices."""
    starts = [np.arange(0, n, c) for n, c in zip(codes.shape, chunk, strict=True)]
    values = image.astype(np.int64)  # integer phantoms: the histogram key is the value
    chunk_counts, slices = [], []
    for label in labels:
        mask = codes == label
        per_chunk = mask.astype(np.int64)
        for axis, s in enumerate(starts):
            per_chunk = np.add.reduceat(per_chunk, s, axis=axis)
        flat = per_chunk.ravel()
        chunk_counts.append([[int(i), int(flat[i])] for i in np.flatnonzero(flat)])
        counts = mask.sum(axis=(1, 2))
        sums = np.where(mask, values, 0).sum(axis=(1, 2))
        slices.append([[int(z), int(counts[z]), int(sums[z])] for z in np.flatnonzero(counts)])
    return {"chunk_counts": chunk_counts, "slices": slices}


def _index_facts(idx: Any) -> dict[str, Any]:
    """The same facts as the release's index holds them."""
    chunk_counts, slices = [], []
    for label in idx.labels.tolist():
        ids, counts = idx.chunk_voxel_counts(label)
        chunk_counts.append([[int(i), int(c)] for i, c in zip(ids, counts, strict=True)])
        z, n, s = idx.slice_profile(label)
        slices.append([[int(a), int(b), int(c)] for a, b, c in zip(z, n, s, strict=True)])
    return {"chunk_counts": chunk_counts, "slices": slices}


def _joint_facts(
    case: Any, layout: str, arrays: dict[str, np.ndarray], image: np.ndarray
) -> dict[str, Any]:
    """Joint index facts of each pair of segmentations A < B, from the arrays alone."""
    out: dict[str, Any] = {}
    names = sorted(k.removeprefix("labels/") for k in arrays if k.startswith("labels/"))
    skip = {0, IGNORE[layout]}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            la, lb = arrays[f"labels/{a}"], arrays[f"labels/{b}"]
            found = case.joint_index(a, b)
            assert found is not None, (case.case_id, a, b)
            joint, radix, flipped = found
            assert not flipped
            valid = ~np.isin(la, list(skip - {None})) & ~np.isin(lb, list(skip - {None}))
            codes = np.where(valid, la.astype(np.int64) * radix + lb, -1)
            present = sorted(set(np.unique(codes).tolist()) - {-1})
            facts = {
                "radix": radix,
                "labels": present,
                "voxel_count": [int((codes == c).sum()) for c in present],
                **_chunk_and_slice_facts(codes, image, present, joint.chunk_shape),
            }
            assert joint.labels.tolist() == present, (case.case_id, a, b)
            assert joint.voxel_count.tolist() == facts["voxel_count"], (case.case_id, a, b)
            assert _index_facts(joint) == {k: facts[k] for k in ("chunk_counts", "slices")}
            out[f"{a}/{b}"] = facts
    return out


def _collection(layout: str, src: Path, dest: Path, expected: Path) -> dict[str, Any]:
    report = ctzarr.convert(src, dest, layout=layout, progress=False)
    assert report.ok, report
    col = ctzarr.open_collection(dest)
    (expected / layout).mkdir(parents=True)
    facts: dict[str, Any] = {
        "dataset_id": col.dataset_id,
        "case_ids": list(col.case_ids),
        "segmentations": list(col.segmentations),
        "cases": {},
    }
    numpy_rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for case_id in col.case_ids:
        image_path, label_paths = _sources(layout, src, case_id)
        image, affine = _zyx(image_path)
        arrays = {"image": image, "affine": affine}
        case_facts: dict[str, Any] = {"shape_zyx": list(image.shape), "index": {}}
        case = col[case_id]
        for seg, path in label_paths.items():
            labels, label_affine = _zyx(path)
            assert np.array_equal(label_affine, affine), (case_id, seg)
            arrays[f"labels/{seg}"] = labels
            rows = _numpy_rows(case_id, seg, image, labels, affine, IGNORE[layout])
            numpy_rows.update({(case_id, seg, k): v for k, v in rows.items()})
            idx = case.index(seg)
            seg_facts = {
                "labels": sorted(rows),
                "voxel_count": [rows[k]["voxel_count"] for k in sorted(rows)],
                "bbox": [
                    [
                        rows[k][c]
                        for c in ("z_start", "z_stop", "y_start", "y_stop", "x_start", "x_stop")
                    ]
                    for k in sorted(rows)
                ],
                "annotated_slices": None
                if IGNORE[layout] is None
                else np.flatnonzero(~(labels == IGNORE[layout]).all(axis=(1, 2))).tolist(),
            }
            # the release's index says the same
            assert idx.labels.tolist() == seg_facts["labels"], (case_id, seg)
            assert idx.voxel_count.tolist() == seg_facts["voxel_count"], (case_id, seg)
            assert idx.bbox.tolist() == seg_facts["bbox"], (case_id, seg)
            got_slices = None if idx.annotated_slices is None else idx.annotated_slices.tolist()
            assert got_slices == seg_facts["annotated_slices"], (case_id, seg)
            if getattr(idx, "chunk_counts", None) is not None:  # format 3 on
                extra = _chunk_and_slice_facts(labels, image, sorted(rows), idx.chunk_shape)
                assert _index_facts(idx) == extra, (case_id, seg)
                seg_facts.update(extra)
            case_facts["index"][seg] = seg_facts
        if len(label_paths) > 1 and hasattr(case, "joint_index"):  # format 3 on
            case_facts["joint"] = _joint_facts(case, layout, arrays, image)
        # the release reads back exactly what nibabel reads from the source
        assert np.array_equal(case.affine, affine), case_id
        assert np.array_equal(case.image.values, image), case_id
        for seg in label_paths:
            assert np.array_equal(case.labels(seg).values, arrays[f"labels/{seg}"]), case_id
        np.savez_compressed(expected / layout / f"{case_id}.npz", **arrays)
        facts["cases"][case_id] = case_facts
    stats = col.stats(method="index")
    pd.testing.assert_frame_equal(col.stats(method="scan"), stats, check_exact=True)
    _check_rows(stats, numpy_rows)
    stats.to_csv(expected / layout / "stats.csv", index=False)
    with open(expected / layout / "index.json", "w", encoding="utf-8") as f:
        json.dump(facts, f, indent=1)
        f.write("\n")
    return {"store": dest.name}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(ctzarr.__file__).parent,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="new directory, e.g. tests/golden/format-2")
    parser.add_argument(
        "--made-by",
        default=None,
        help="what wrote the stores (default: ctzarr version and git commit, when known)",
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    if out.exists():
        parser.error(f"{out} exists: golden stores are never regenerated, write a new format-N")
    expected = out / "expected"
    expected.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        dap_src, saros_src = Path(tmp) / "dap", Path(tmp) / "saros"
        write_dap_atlas(dap_src, n_cases=3, shape_zyx=DAP_SHAPE_ZYX, seed=SEED)
        write_saros(saros_src, n_cases=2, shape_zyx=SAROS_SHAPE_ZYX, seed=SEED)
        collections = {
            "dap_atlas": _collection("dap_atlas", dap_src, out / "dap_atlas.zarr", expected),
            "saros": _collection("saros", saros_src, out / "saros.zarr", expected),
        }
    commit = _git_commit()
    made_by = args.made_by or f"ctzarr {ctzarr.__version__}" + (f" ({commit})" if commit else "")
    golden = {
        "made_by": made_by,
        "python": sys.version.split()[0],
        "versions": {m.__name__: m.__version__ for m in (np, pd, nib)},
        "phantoms": {
            "dap_shape_zyx": DAP_SHAPE_ZYX,
            "saros_shape_zyx": SAROS_SHAPE_ZYX,
            "seed": SEED,
        },
        "collections": collections,
    }
    with open(expected / "golden.json", "w", encoding="utf-8") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
