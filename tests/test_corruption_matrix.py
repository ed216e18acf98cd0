"""A seeded corruption matrix: one store damage per family (bit rot, truncation, deletion,
metadata edits, swaps between cases, same-size forgery, table damage, unreadable documents,
symlinks, leftovers). For each, every read a user makes (crop, stats from the index and by
scan, export, the collection table) either answers exactly as on the undamaged store or raises
a typed ctzarr error; reads of the damaged object raise; ``verify`` names the object; the CLI
prints one line. Never a silently wrong number."""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import nibabel as nib
import numcodecs
import numpy as np
import pandas as pd
import pytest

import ctzarr
from ctzarr.cli.main import main
from ctzarr.errors import CtzarrError, StoreCorruptError
from ctzarr.read.verify import verify

SEED = 15
SEG = "anatomy"


# -- the store and what it answers -----------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(dap_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("matrix") / "dap.zarr"
    shutil.copytree(dap_store, dest)
    return dest


def _target(store: Path) -> tuple[str, str, int]:
    """(case damaged, another case, a structure of the first) chosen with the seed."""
    col = ctzarr.open_collection(store)
    rng = random.Random(SEED)
    first, other = rng.sample(col.case_ids, 2)
    labels = col[first].index(SEG).labels.tolist()
    return first, other, int(rng.choice(labels))


def answers(store: Path, out: Path, target: tuple[str, str, int]) -> dict[str, Any]:
    """Every kind of read; each value is the answer, or the exception it raised."""
    cid, _, label = target

    def crop() -> Any:
        ds = ctzarr.open_collection(store)[cid].crop(label, margin_mm=5).compute()
        return [ds.image.values, ds.labels.values, ds.attrs["affine"]]

    def export() -> Any:
        paths = ctzarr.open_collection(store)[cid].to_nifti(out / "export")
        return [
            (np.asanyarray(nib.load(p).dataobj), nib.load(p).affine)
            for _, p in sorted(paths.items())
        ]

    reads: dict[str, Callable[[], Any]] = {
        "crop": crop,
        "stats-index": lambda: ctzarr.open_collection(store).stats(),
        "stats-index-case": lambda: ctzarr.open_collection(store)[cid].stats(),
        "stats-scan": lambda: ctzarr.open_collection(store)[cid].stats(method="scan"),
        "export": export,
        "table": lambda: ctzarr.open_collection(store).table(),
    }
    found: dict[str, Any] = {}
    for name, read in reads.items():
        try:
            found[name] = read()
        except Exception as exc:
            found[name] = exc
    return found


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, pd.DataFrame):
        return isinstance(b, pd.DataFrame) and a.equals(b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return bool(a == b)


@pytest.fixture(scope="module")
def expected(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    found = answers(pristine, tmp_path_factory.mktemp("expected"), _target(pristine))
    assert not [k for k, v in found.items() if isinstance(v, Exception)], found
    assert verify(pristine).ok
    return found


# -- the damage ------------------------------------------------------------------------------------
def _case(store: Path, cid: str) -> Path:
    return store / "cases" / cid


def _flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _store_blosc(shard: Path) -> Any:
    """The blosc codec of the array a shard (``<array>/c/z/y/x``) belongs to, as stored."""
    meta = json.loads((shard.parents[3] / "zarr.json").read_text())
    (sharding,) = meta["codecs"]
    blosc = next(c for c in sharding["configuration"]["codecs"] if c["name"] == "blosc")
    config = blosc["configuration"]
    shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[config["shuffle"]]
    return numcodecs.Blosc(
        cname=config["cname"],
        clevel=config["clevel"],
        shuffle=shuffle,
        blocksize=config.get("blocksize", 0),
    )


def forge_same_size(shard: Path) -> None:
    """Re-encode the first inner chunk of a CT shard with one voxel changed, to exactly the
    same size (the shard index, every size and every crc32c stay valid)."""
    data = bytearray(shard.read_bytes())
    n_inner = (len(data) - 4) // 16  # upper bound; the real count comes from the layout below
    index = None
    for n in range(1, n_inner + 1):  # the index is n entries + crc32c at the end
        body = bytes(data[-(16 * n + 4) : -4])
        if struct.unpack("<I", data[-4:])[0] == crc32c.crc32c(body):
            index = np.frombuffer(body, "<u8").reshape(n, 2)
            break
    assert index is not None
    off, nbytes = (int(v) for v in index[0])
    frame = bytes(data[off : off + nbytes - 4])
    blosc = _store_blosc(shard)
    raw = np.frombuffer(blosc.decode(frame), np.int16).copy()
    rng = np.random.default_rng(SEED)
    for _ in range(5000):
        changed = raw.copy()
        changed[int(rng.integers(len(raw)))] += int(rng.integers(1, 9))
        new = blosc.encode(changed)
        if len(new) == len(frame) and new != frame:
            data[off : off + nbytes] = new + struct.pack("<I", crc32c.crc32c(new))
            shard.write_bytes(bytes(data))
            return
    raise AssertionError("no same-size re-encoding found")


def _nested(path: Path) -> None:
    path.write_text('{"zarr_format": 3, "node_type": "group", "attributes": ' + "[" * 100_000)


@dataclass(frozen=True)
class Damage:
    """One family: how to damage the store, whether reads must notice, what verify names."""

    apply: Callable[[Path, str, str], None]  # (store, damaged case, other case)
    verify_names: str  # a substring of a verify problem (format: {cid}, {other})
    reads_notice: bool = True  # at least one read raises


FAMILIES: dict[str, Damage] = {
    "bit-rot-ct-shard": Damage(
        lambda s, c, o: _flip(_case(s, c) / "0" / "c" / "0" / "0" / "0"),
        "case '{cid}'...array '0' chunk c/0/0/0",
    ),
    "bit-rot-label-shard": Damage(
        lambda s, c, o: _flip(_case(s, c) / "labels" / SEG / "0" / "c" / "0" / "0" / "0", 0.3),
        f"array 'labels/{SEG}/0' chunk c/0/0/0",
    ),
    "truncated-ct-shard": Damage(
        lambda s, c, o: (p := _case(s, c) / "0" / "c" / "1" / "0" / "0").write_bytes(
            p.read_bytes()[:-100]
        ),
        "array '0' chunk c/1/0/0",
    ),
    "deleted-label-shard": Damage(
        lambda s, c, o: (_case(s, c) / "labels" / SEG / "0" / "c" / "0" / "0" / "0").unlink(),
        f"array 'labels/{SEG}/0' chunk c/0/0/0: missing",
    ),
    "same-size-forgery-ct-chunk": Damage(
        lambda s, c, o: forge_same_size(_case(s, c) / "0" / "c" / "0" / "0" / "0"),
        "array '0' chunk c/0/0/0",
    ),
    "swap-nifti-headers-between-cases": Damage(
        lambda s, c, o: _swap(_case(s, c) / "nifti" / "c" / "0", _case(s, o) / "nifti" / "c" / "0"),
        "array 'nifti' chunk c/0",
    ),
    "swap-ct-shards-between-cases": Damage(
        lambda s, c, o: _swap(
            _case(s, c) / "0" / "c" / "0" / "0" / "0", _case(s, o) / "0" / "c" / "0" / "0" / "0"
        ),
        "array '0' chunk c/0/0/0",
    ),
    "swap-whole-cases": Damage(
        lambda s, c, o: _swap(_case(s, c), _case(s, o)),
        "case '{cid}'...attribute ctzarr.integrity.digest",
    ),
    "edit-affine": Damage(
        lambda s, c, o: _edit_json(
            _case(s, c) / "zarr.json",
            lambda d: d["attributes"]["ctzarr"]["affine"][0].__setitem__(3, 7.5),
        ),
        "case '{cid}'...attribute ctzarr.integrity.digest",
    ),
    "edit-scl-slope": Damage(
        lambda s, c, o: _edit_json(
            _case(s, c) / "zarr.json",
            lambda d: d["attributes"]["ctzarr"]["nifti"].update(scl_slope=2.0),
        ),
        "case '{cid}'...attribute ctzarr.integrity.digest",
    ),
    "edit-bounding-box": Damage(
        lambda s, c, o: _edit_json(
            _case(s, c) / "zarr.json",
            lambda d: d["consolidated_metadata"]["metadata"][f"labels/{SEG}/index"]["attributes"][
                "ctzarr"
            ]["bbox"][0].__setitem__(1, 3),
        ),
        f"group 'labels/{SEG}/index'",
    ),
    "edit-fill-value": Damage(
        lambda s, c, o: _edit_json(
            _case(s, c) / "zarr.json",
            lambda d: d["consolidated_metadata"]["metadata"][f"labels/{SEG}/0"].update(
                fill_value=3
            ),
        ),
        f"array 'labels/{SEG}/0'",
    ),
    "edit-manifest-record": Damage(
        lambda s, c, o: _edit_json(
            _case(s, c) / "zarr.json",
            lambda d: d["attributes"]["ctzarr"]["manifest"]["arrays"]["0"]["c/0/0/0"].__setitem__(
                0, 1
            ),
        ),
        "array '0'",
    ),
    "edit-member-document": Damage(
        lambda s, c, o: _edit_json(
            _case(s, c) / "labels" / SEG / "zarr.json",
            lambda d: d["attributes"]["ome"].update(edited=True),
        ),
        f"cases/{{cid}}/labels/{SEG}/zarr.json: differs",
        reads_notice=False,  # readers use the consolidated copy: answers unchanged
    ),
    "swap-label-names": Damage(
        lambda s, c, o: _edit_json(
            s / "zarr.json",
            lambda d: (
                labels := d["attributes"]["ctzarr"]["segmentations"][SEG]["labels"],
                names := [lab["name"] for lab in labels[1:3]],
                labels[1].update(name=names[1]),
                labels[2].update(name=names[0]),
            ),
        ),
        "zarr.json: attributes (label maps",
    ),
    "label-maps-removed": Damage(
        lambda s, c, o: _edit_json(
            s / "zarr.json", lambda d: d["attributes"]["ctzarr"].update(segmentations={})
        ),
        "zarr.json:",
    ),
    "table-chunk-deleted": Damage(
        lambda s, c, o: (s / "index" / "float_columns" / "c" / "0" / "0").unlink(),
        "collection table",
    ),
    "table-chunk-bit-rot": Damage(
        lambda s, c, o: _flip(s / "index" / "int_columns" / "c" / "0" / "0"),
        "collection table",
    ),
    "table-case-order-reversed": Damage(
        lambda s, c, o: _edit_json(
            s / "index" / "zarr.json",
            lambda d: d["attributes"]["ctzarr"].update(
                cases=d["attributes"]["ctzarr"]["cases"][::-1]
            ),
        ),
        "collection table",
    ),
    "root-document-truncated": Damage(
        lambda s, c, o: (p := s / "zarr.json").write_text(p.read_text()[:50]),
        "zarr.json",
    ),
    "root-document-not-utf8": Damage(
        lambda s, c, o: (p := s / "zarr.json").write_bytes(b"\xff\xfe" + p.read_bytes()[2:]),
        "zarr.json",
    ),
    "root-document-deeply-nested": Damage(lambda s, c, o: _nested(s / "zarr.json"), "zarr.json"),
    "case-document-deeply-nested": Damage(
        lambda s, c, o: _nested(_case(s, c) / "zarr.json"), "cases/{cid}/zarr.json"
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES), ids=list(FAMILIES))
def test_damage_is_an_error_or_the_same_answer(
    family: str, pristine: Path, expected: dict[str, Any], tmp_path: Path
) -> None:
    damage = FAMILIES[family]
    store = tmp_path / "dap.zarr"
    shutil.copytree(pristine, store)
    target = _target(store)
    cid, other, _ = target
    damage.apply(store, cid, other)

    found = answers(store, tmp_path, target)
    for name, value in found.items():
        if isinstance(value, Exception):
            # typed, and naming what is at fault (never an empty message)
            assert isinstance(value, CtzarrError), (name, repr(value))
            assert str(value).strip(), (name, repr(value))
        else:
            assert _equal(value, expected[name]), f"{family}: {name} answered differently"
    raised = [name for name, value in found.items() if isinstance(value, Exception)]
    if damage.reads_notice:
        assert raised, f"{family}: no read noticed the damage"

    report = verify(store)
    assert not report.ok, str(report)
    want = damage.verify_names.format(cid=cid, other=other).split("...")
    assert any(all(w in p for w in want) for p in report.problems), f"{want!r} not in\n{report}"

    # the CLI: one line on stderr, non-zero exit, for a read and for verify
    assert main(["stats", str(store)]) != 0 or "stats-index" not in raised
    assert main(["verify", str(store)]) == 1


def test_store_damage_prints_one_line(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "dap.zarr"
    shutil.copytree(pristine, store)
    _nested(store / "zarr.json")
    for argv in (["stats", str(store)], ["info", str(store)], ["verify", str(store)]):
        assert main(argv) == 1
        err = capsys.readouterr().err.strip()
        if argv[0] != "verify":
            assert len(err.splitlines()) == 1, err
            assert err.startswith("ctzarr: error: "), err
            assert "zarr.json" in err, err
    with pytest.raises(StoreCorruptError, match=r"zarr.json: unreadable.*RecursionError"):
        ctzarr.open_collection(store)


def test_symlink_leaving_the_store_is_reported(pristine: Path, tmp_path: Path) -> None:
    store = tmp_path / "dap.zarr"
    shutil.copytree(pristine, store)
    outside = tmp_path / "outside"
    shutil.move(store / "index" / "int_columns", outside)
    (store / "index" / "int_columns").symlink_to(outside)
    report = verify(store)
    assert any("index/int_columns: a symlink leaving the store" in p for p in report.problems)


def test_temporary_files_are_removed_by_repair_and_by_a_rerun(
    pristine: Path, dap_source: Path, tmp_path: Path
) -> None:
    store = tmp_path / "dap.zarr"
    shutil.copytree(pristine, store)
    cid = ctzarr.open_collection(store).case_ids[0]
    strays = [store / "zarr.0a1b.partial", store / "cases" / cid / "zarr.0a1c.partial"]
    for stray in strays:
        stray.write_bytes(b'{"zarr_format": 3, "node_ty')
    report = verify(store)
    assert sorted(report.problems) == sorted(
        f"leftover temporary file of an interrupted write: {p.relative_to(store).as_posix()}"
        for p in strays
    )
    strays[0].rename(strays[0].with_name("zarr.0a1d.partial"))
    assert ctzarr.convert(dap_source, store, progress=False).ok  # a plain re-run
    assert not list(store.rglob("*.partial"))
    assert verify(store).ok
    strays[1].write_bytes(b"{")
    assert verify(store, repair=True).repaired == [strays[1].relative_to(store).as_posix()]
    assert verify(store).ok


def test_verify_goes_on_after_every_problem(pristine: Path, tmp_path: Path) -> None:
    """Several families at once: every one is reported, none stops the walk."""
    store = tmp_path / "dap.zarr"
    shutil.copytree(pristine, store)
    cid, other, _ = _target(store)
    for name in ("bit-rot-label-shard", "edit-scl-slope", "table-chunk-bit-rot"):
        FAMILIES[name].apply(store, cid, other)
    FAMILIES["swap-ct-shards-between-cases"].apply(store, other, cid)
    (store / "cases" / cid / "zarr.1234.partial").write_bytes(b"{")
    report = verify(store)
    text = str(report)
    for want in (
        f"case '{cid}' in",
        "attribute ctzarr.integrity.digest",
        f"case '{other}': array '0' chunk c/0/0/0",
        "collection table",
        f"cases/{cid}/zarr.1234.partial",
    ):
        assert want in text, f"{want!r} not in\n{text}"


def test_format_1_store_says_what_it_cannot_prove(tmp_path: Path) -> None:
    golden = Path(__file__).parent / "golden" / "format-1" / "saros.zarr"
    store = tmp_path / "saros.zarr"
    shutil.copytree(golden, store)
    report = verify(store)
    assert report.ok, str(report)
    assert any("format 1" in n and "cannot be detected" in n for n in report.notes)


@pytest.mark.parametrize(
    "family",
    ["same-size-forgery-ct-chunk", "swap-nifti-headers-between-cases", "table-chunk-deleted"],
)
def test_remote_reads_hold_the_same_digests(
    family: str, pristine: Path, expected: dict[str, Any], tmp_path: Path
) -> None:
    """Over HTTP (every request through StrictStore: ranges of inner chunks, shard indexes,
    whole objects) the damage raises as it does on a local disk."""
    from .servers import http_server

    site = tmp_path / "site"
    store = site / "dap.zarr"
    shutil.copytree(pristine, store)
    cid, other, label = _target(store)
    FAMILIES[family].apply(store, cid, other)
    with http_server(site) as (base, _log):
        url = f"{base}/dap.zarr"
        reads: dict[str, Callable[[], Any]] = {
            "table-chunk-deleted": lambda: ctzarr.open_collection(url).table(),
            "same-size-forgery-ct-chunk": lambda: (
                ctzarr.open_collection(url)[cid].image[:64].values
            ),
            "swap-nifti-headers-between-cases": lambda: (
                ctzarr.open_collection(url)[cid].nifti_header_bytes
            ),
        }
        with pytest.raises(StoreCorruptError):
            reads[family]()
        if family == "same-size-forgery-ct-chunk":  # a crop elsewhere reads as before
            crop = ctzarr.open_collection(url)[other].crop(label, margin_mm=5)
            assert crop.image.shape[0] > 0
