"""Stores written by earlier releases still read back unchanged (tests/golden/format-<N>/).

Each golden directory was written once by the release that introduced its store format
(tests/golden/make_golden.py, never run here) together with the answers it must give. Every
check runs on a copy in tmp_path, and the copy must still be byte-identical afterwards: reading a
store never writes into it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ctzarr.cli import main
from ctzarr.testing.golden import check_golden_store, read_expected_stats

GOLDEN = Path(__file__).parent / "golden"


def _collections() -> list[tuple[Path, str, str]]:
    """(format directory, collection name, store name) of every committed golden store."""
    found = []
    for fmt in sorted(GOLDEN.glob("format-*")):
        with open(fmt / "expected" / "golden.json", encoding="utf-8") as f:
            golden = json.load(f)
        found += [(fmt, name, c["store"]) for name, c in golden["collections"].items()]
    return found


COLLECTIONS = _collections()


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _copy(fmt: Path, store: str, tmp_path: Path) -> Path:
    dest = tmp_path / store
    shutil.copytree(fmt / store, dest)
    return dest


def test_golden_stores_present() -> None:
    names = {(fmt.name, name) for fmt, name, _ in COLLECTIONS}
    assert {
        ("format-1", "dap_atlas"),
        ("format-1", "saros"),
        ("format-2", "dap_atlas"),
        ("format-2", "saros"),
        ("format-3", "dap_atlas"),
        ("format-3", "saros"),
    } <= names


@pytest.mark.parametrize(
    ("fmt", "name", "store"), COLLECTIONS, ids=[f"{f.name}-{n}" for f, n, _ in COLLECTIONS]
)
def test_golden_store_reads_unchanged(fmt: Path, name: str, store: str, tmp_path: Path) -> None:
    copy = _copy(fmt, store, tmp_path)
    before = _digest(copy)
    check_golden_store(copy, fmt / "expected" / name)
    assert _digest(copy) == before, "reading the golden store wrote into it"
    assert _digest(copy) == _digest(fmt / store)


@pytest.mark.parametrize(
    ("fmt", "name", "store"), COLLECTIONS, ids=[f"{f.name}-{n}" for f, n, _ in COLLECTIONS]
)
def test_golden_store_cli_verify(
    fmt: Path, name: str, store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = _copy(fmt, store, tmp_path)
    n_cases = len(json.loads((fmt / "expected" / name / "index.json").read_text())["case_ids"])
    assert main(["verify", str(copy)]) == 0
    out = capsys.readouterr().out
    version = int(fmt.name.removeprefix("format-"))
    assert out.strip() == f"{copy}: format {version}, {n_cases} cases checked, 0 problems"


def test_golden_check_is_exact(tmp_path: Path) -> None:
    """One float of the committed table off by one ulp, or one voxel changed, fails the check."""
    fmt, name, store = next(c for c in COLLECTIONS if c[1] == "saros")
    copy = _copy(fmt, store, tmp_path)
    expected = tmp_path / "expected"
    shutil.copytree(fmt / "expected" / name, expected)
    stats = read_expected_stats(expected / "stats.csv")
    stats.loc[3, "hu_mean"] = float(stats.loc[3, "hu_mean"]) * (1 + 2**-52)
    stats.to_csv(expected / "stats.csv", index=False)
    with pytest.raises(AssertionError, match=r"col.stats\(method='index'\) differs"):
        check_golden_store(copy, expected)

    shutil.copy(fmt / "expected" / name / "stats.csv", expected / "stats.csv")
    npz = expected / "case_001.npz"
    with np.load(npz) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["labels/body_parts"][4, 10, 8] ^= 1
    np.savez_compressed(npz, **arrays)
    with pytest.raises(
        AssertionError, match=r"case 'case_001': labels 'body_parts': 1 values differ"
    ):
        check_golden_store(copy, expected)


def test_golden_check_covers_format3_parts(tmp_path: Path) -> None:
    """A per-slice sum, a per-chunk count or a joint count off by one fails the check."""
    fmt = GOLDEN / "format-3"
    copy = _copy(fmt, "saros.zarr", tmp_path)
    expected = tmp_path / "expected"
    facts = json.loads((fmt / "expected" / "saros" / "index.json").read_text())
    edits = [
        (("index", "body_parts", "slices"), r"index 'body_parts' label \d+: per-slice counts"),
        (("index", "body_regions", "chunk_counts"), r"label \d+: per-chunk counts"),
        (("joint", "body_parts/body_regions", "slices"), r"joint index body_parts/body_regions"),
    ]
    for path, match in edits:
        shutil.rmtree(expected, ignore_errors=True)
        shutil.copytree(fmt / "expected" / "saros", expected)
        edited = json.loads(json.dumps(facts))
        node = edited["cases"]["case_001"]
        for key in path:
            node = node[key]
        node[0][-1][-1] += 1  # the last number of the first label's last row
        (expected / "index.json").write_text(json.dumps(edited))
        with pytest.raises(AssertionError, match=match):
            check_golden_store(copy, expected)
