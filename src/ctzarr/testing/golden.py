"""Golden-store checks: a store written by an earlier release still gives the same answers.

A golden directory (``tests/golden/format-<N>/`` in the repository, written once by
``tests/golden/make_golden.py`` with the release that introduced format N) holds collection
stores and, per collection, the answers computed when they were written:

- ``index.json``: dataset id, case ids, segmentations; per case its shape and, per segmentation,
  the labels present with voxel counts, half-open (z, y, x) bounding boxes and annotated slices;
  from format 3 on, per label its per-chunk counts and per-slice (count, value sum), and per
  pair of segmentations its joint index (``make_golden.py`` describes the keys);
- ``<case_id>.npz``: the level-0 ``image``, ``labels/<segmentation>`` arrays and the ``affine``,
  as nibabel read them from the source files;
- ``stats.csv``: the statistics table of the release (``col.stats(method="index")``).

:func:`check_golden_store` asserts that the running version reads all of it back exactly. It
raises :class:`AssertionError` and imports no test framework, so other packages' test suites
can run it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctzarr.model.index import LabelIndex
from ctzarr.read.collection import Collection, open_collection
from ctzarr.read.verify import verify

__all__ = ["check_golden_store", "read_expected_stats"]

_TEXT_COLUMNS = ("case_id", "segmentation", "structure")


def read_expected_stats(path: str | os.PathLike[str]) -> pd.DataFrame:
    """A committed statistics table, every float exactly as written.

    Float columns are parsed by Python's ``float`` (correctly rounded), not by the CSV reader,
    whose fast parser may be off by an ulp in some pandas versions.
    """
    table = pd.read_csv(path, dtype=dict.fromkeys(_TEXT_COLUMNS, str))
    text = pd.read_csv(path, dtype=str, keep_default_na=False)
    for column in table.columns:
        if table[column].dtype.kind == "f":
            table[column] = np.array(
                [float(v) if v else np.nan for v in text[column]], dtype=np.float64
            )
    return table


def check_golden_store(
    store_path: str | os.PathLike[str], expected_dir: str | os.PathLike[str]
) -> None:
    """Check that a collection store gives exactly the committed answers.

    Parameters
    ----------
    store_path : str or path
        The collection store (a copy, if the caller must keep the original untouched).
    expected_dir : str or path
        The directory of the collection's ``index.json``, ``<case_id>.npz`` and ``stats.csv``.

    Raises
    ------
    AssertionError
        Naming the store, case, segmentation or column that differs.
    """
    store = Path(store_path)
    expected = Path(expected_dir)
    with open(expected / "index.json", encoding="utf-8") as f:
        facts: dict[str, Any] = json.load(f)
    col = open_collection(store)
    where = f"golden store {store}"
    _equal(col.dataset_id, facts["dataset_id"], f"{where}: dataset id")
    _equal(list(col.case_ids), facts["case_ids"], f"{where}: case ids")
    _equal(list(col.segmentations), facts["segmentations"], f"{where}: segmentations")
    for case_id, case_facts in facts["cases"].items():
        _check_case(col, case_id, case_facts, expected / f"{case_id}.npz", where)
    _check_stats(col, read_expected_stats(expected / "stats.csv"), where)
    report = verify(store)
    if not report.ok or report.problems:
        raise AssertionError(f"{where}: verify reports problems:\n{report}")


def _check_case(
    col: Collection, case_id: str, facts: dict[str, Any], arrays_path: Path, where: str
) -> None:
    case = col[case_id]
    where = f"{where}, case {case_id!r}"
    _equal(list(case.shape), facts["shape_zyx"], f"{where}: shape (z, y, x)")
    with np.load(arrays_path) as npz:
        arrays = {name: npz[name] for name in npz.files}
    _equal_arrays(case.affine, arrays["affine"], f"{where}: affine")
    _equal_arrays(case.image.values, arrays["image"], f"{where}: level-0 image")
    _equal(case.segmentation_names, list(facts["index"]), f"{where}: segmentations")
    for seg, seg_facts in facts["index"].items():
        _equal_arrays(case.labels(seg).values, arrays[f"labels/{seg}"], f"{where}: labels {seg!r}")
        idx = case.index(seg)
        _equal(idx.labels.tolist(), seg_facts["labels"], f"{where}: index {seg!r} labels")
        _equal(
            idx.voxel_count.tolist(),
            seg_facts["voxel_count"],
            f"{where}: index {seg!r} voxel counts",
        )
        _equal(idx.bbox.tolist(), seg_facts["bbox"], f"{where}: index {seg!r} bounding boxes")
        slices = None if idx.annotated_slices is None else idx.annotated_slices.tolist()
        _equal(slices, seg_facts["annotated_slices"], f"{where}: index {seg!r} annotated slices")
        if "chunk_counts" in seg_facts:  # format 3 on
            _check_format3_parts(idx, seg_facts, f"{where}: index {seg!r}")
    for pair, joint_facts in facts.get("joint", {}).items():
        a, b = pair.split("/")
        found = case.joint_index(a, b)
        what = f"{where}: joint index {pair}"
        if found is None:
            raise AssertionError(f"{what}: missing")
        joint, radix, flipped = found
        _equal((radix, flipped), (joint_facts["radix"], False), f"{what}: radix, flipped")
        _equal(joint.labels.tolist(), joint_facts["labels"], f"{what}: pair codes")
        _equal(joint.voxel_count.tolist(), joint_facts["voxel_count"], f"{what}: voxel counts")
        _check_format3_parts(joint, joint_facts, what)


def _check_format3_parts(idx: LabelIndex, facts: dict[str, Any], what: str) -> None:
    """Per-chunk counts and per-slice (count, value sum) of every label, as committed."""
    for label, chunks, slices in zip(
        idx.labels.tolist(), facts["chunk_counts"], facts["slices"], strict=True
    ):
        ids, counts = idx.chunk_voxel_counts(label)
        got = [[int(i), int(c)] for i, c in zip(ids, counts, strict=True)]
        _equal(got, chunks, f"{what} label {label}: per-chunk counts")
        z, n, key_sum = idx.slice_profile(label)
        got = [[int(a), int(b), int(c)] for a, b, c in zip(z, n, key_sum, strict=True)]
        _equal(got, slices, f"{what} label {label}: per-slice counts and sums")


def _check_stats(col: Collection, expected: pd.DataFrame, where: str) -> None:
    for method in ("index", "scan"):
        _equal_tables(col.stats(method=method), expected, f"{where}: col.stats(method={method!r})")
        for case_id in col.case_ids:
            want = expected[expected["case_id"] == case_id].reset_index(drop=True)
            _equal_tables(
                col[case_id].stats(method=method),
                want,
                f"{where}: case {case_id!r} .stats(method={method!r})",
            )


def _equal(got: Any, want: Any, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, committed {want!r}")


def _equal_arrays(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any], what: str) -> None:
    # values as nibabel reads them, in native byte order (a big-endian source reads back native)
    if got.dtype.newbyteorder("=") != want.dtype.newbyteorder("=") or got.shape != want.shape:
        raise AssertionError(
            f"{what}: got {got.dtype} {got.shape}, committed {want.dtype} {want.shape}"
        )
    if not np.array_equal(got, want):
        diff = np.argwhere(got != want)
        first = tuple(int(i) for i in diff[0])
        raise AssertionError(
            f"{what}: {len(diff)} values differ, first at {first}: got {got[first]!r}, "
            f"committed {want[first]!r}"
        )


def _equal_tables(got: pd.DataFrame, want: pd.DataFrame, what: str) -> None:
    """Same columns, same kinds of values (text, integer, float, bool) and exactly equal values."""
    _equal(list(got.columns), list(want.columns), f"{what}: columns")
    for column in want.columns:
        if column in _TEXT_COLUMNS:
            continue  # object or str dtype, depending on the pandas version
        _equal(got[column].dtype.kind, want[column].dtype.kind, f"{what}: dtype kind of {column!r}")
    try:
        pd.testing.assert_frame_equal(
            got.reset_index(drop=True), want, check_exact=True, check_dtype=False
        )
    except AssertionError as exc:
        raise AssertionError(f"{what} differs from the committed table: {exc}") from None
