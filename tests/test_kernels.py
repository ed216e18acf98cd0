"""The compiled index kernels (``ctzarr.write.kernels``): built once by numba, then loaded by
llvmlite alone.

- the native kernels equal the plain Python functions they are compiled from, on every label
  and value dtype a conversion uses;
- a process with a filled cache runs them without importing numba;
- a damaged cache file, an object naming a symbol the process lacks, or no writable cache
  directory never crash or change a result: the kernel is rebuilt or run through numba.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ctzarr.write import index_builder, kernels

#: (label dtype, value dtype) pairs a conversion feeds the scan kernel
PAIRS = [
    (np.uint8, np.int16),
    (np.uint8, np.uint8),
    (np.uint16, np.int16),
    (np.uint16, np.int64),
    (np.uint32, np.int32),
]


def _scan_args(label_dtype: Any, value_dtype: Any, seed: int) -> list[Any]:
    """A small random slab and fresh accumulators in the kernel's argument order."""
    rng = np.random.default_rng(seed)
    shape = (6, 20, 24)
    runs = rng.integers(0, 6, size=(6, 20, 6)).astype(label_dtype)
    labels = np.ascontiguousarray(np.repeat(runs, 4, axis=2))  # runs along x
    labels[0, 0, :3] = 255 if np.iinfo(label_dtype).max >= 255 else 0  # the ignore value
    labels[1, 1, 5] = 9  # a value the label map does not define
    info = np.iinfo(value_dtype)
    keys = rng.integers(max(info.min, -1024), min(info.max, 3071), size=shape).astype(value_dtype)
    n = 5  # labels 1..5 are indexed
    lut = np.full(256, -1, np.int32)
    lut[0] = lut[255] = -2
    lut[1:6] = np.arange(n)
    kmin = int(keys.min())
    bins = int(keys.max()) - kmin + 1
    return [
        labels,
        keys,
        kmin,
        lut,
        10,  # z0
        4,
        8,
        8,  # chunk shape
        np.zeros((n, bins), np.int32),
        np.zeros(n, np.int64),
        np.zeros((n, 3), np.int64),
        np.full((n, 3), 2**62, np.int64),
        np.full((n, 3), -1, np.int64),
        np.zeros((n, 5, 3, 3), np.int64),
        np.zeros((n, shape[0]), np.int64),
        np.zeros((n, shape[0]), np.int64),
        np.zeros(257, np.int64),
        np.zeros(16, np.int64),
        255,
        True,
        True,
    ]


@pytest.mark.parametrize(("label_dtype", "value_dtype"), PAIRS)
def test_scan_kernel_equals_the_python_function(label_dtype: Any, value_dtype: Any) -> None:
    native = _scan_args(label_dtype, value_dtype, seed=1)
    python = _scan_args(label_dtype, value_dtype, seed=1)
    kernels.call(index_builder._scan_runs, *native)
    index_builder._scan_runs(*python)  # the plain function, interpreted
    for a, b in zip(native, python, strict=True):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
    assert native[9].sum() > 0  # something was counted
    assert kernels.loaded_natively(index_builder._scan_runs, native)


def test_pair_code_kernel_equals_the_python_function() -> None:
    rng = np.random.default_rng(2)
    a = rng.integers(0, 7, size=(5, 9, 11)).astype(np.uint8)
    b = rng.integers(0, 4, size=(5, 9, 11)).astype(np.uint8)
    ok_a = np.zeros(6, np.bool_)
    ok_a[[1, 2, 5]] = True
    ok_b = np.zeros(4, np.bool_)
    ok_b[[1, 3]] = True
    native = np.empty(a.shape, np.uint16)
    python = np.empty(a.shape, np.uint16)
    kernels.call(index_builder._pair_codes, a, b, ok_a, ok_b, 4, 0, native)
    index_builder._pair_codes(a, b, ok_a, ok_b, 4, 0, python)
    np.testing.assert_array_equal(native, python)
    assert set(np.unique(native)) <= {0, 5, 7, 9, 11, 21, 23}


def test_non_contiguous_arrays_are_refused() -> None:
    args = _scan_args(np.uint8, np.int16, seed=3)
    args[0] = np.asfortranarray(args[0])
    with pytest.raises(TypeError, match="C-contiguous"):
        kernels.call(index_builder._scan_runs, *args)


_CHILD = """
import json, sys
import numpy as np
from ctzarr.write import index_builder, kernels
from ctzarr.write.index_builder import LabelIndexBuilder
rng = np.random.default_rng(0)
labels = rng.integers(0, 4, size=(8, 32, 32)).astype(np.uint8)
values = rng.integers(-100, 100, size=(8, 32, 32)).astype(np.int16)
builder = LabelIndexBuilder(range(1, 4), (8, 32, 32), (8, 16, 16))
builder.update(0, labels, values)
index = builder.finish(sparse_annotation=False)
print(json.dumps({
    "numba": "numba" in sys.modules,
    "native": any(hasattr(f, "native") for f in kernels._LOADED.values()),
    "counts": [int(c) for c in index.voxel_count],
    "expected": [int((labels == v).sum()) for v in (1, 2, 3)],
}))
"""


def _child(cache: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    full = {**os.environ, "NUMBA_CACHE_DIR": str(cache), **(env or {})}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=full, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["counts"] == result["expected"]
    return result


def _cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "ctzarr").glob("*.ctzk"))


def test_a_filled_cache_is_loaded_without_numba(tmp_path: Path) -> None:
    first = _child(tmp_path)
    assert first["native"]
    assert len(_cache_files(tmp_path)) == 1
    second = _child(tmp_path)
    assert second == {**first, "numba": False}  # same numbers, numba never imported


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "empty"])
def test_a_damaged_cache_file_is_rebuilt(tmp_path: Path, damage: str) -> None:
    _child(tmp_path)
    (path,) = _cache_files(tmp_path)
    data = path.read_bytes()
    head, _, obj = data.partition(b"\n\n")
    damaged = {
        "garbage": os.urandom(len(data)),
        "truncated": data[: len(head) + 2 + len(obj) // 2],
        "flipped": head + b"\n\n" + obj[:100] + bytes([obj[100] ^ 0xFF]) + obj[101:],
        "empty": b"",
    }[damage]
    path.write_bytes(damaged)
    result = _child(tmp_path)  # rebuilt by numba, right numbers
    assert result["numba"]
    assert result["native"]
    assert kernels._read_entry(path) is not None  # a sound file again
    assert not _child(tmp_path)["numba"]


def test_an_object_needing_a_missing_symbol_is_not_linked(tmp_path: Path) -> None:
    _child(tmp_path)
    (path,) = _cache_files(tmp_path)
    head, _, obj = path.read_bytes().partition(b"\n\n")
    path.write_bytes(head + b"\nctzarr_no_such_symbol_anywhere\n\n" + obj)
    result = _child(tmp_path)  # not linked (it would abort the process): rebuilt
    assert result["numba"]
    assert result["native"]
    assert b"ctzarr_no_such_symbol_anywhere" not in path.read_bytes()


def test_no_writable_cache_directory_still_gives_the_right_numbers(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would be")
    result = _child(blocker)
    assert result["native"]  # built and linked in the process, not written anywhere
    assert blocker.read_text().startswith("a file")
