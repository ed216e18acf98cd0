"""Optional extras: without matplotlib or pyarrow the CLI says which extra to install, in one line.

Nothing is uninstalled: a subprocess blocks the module with ``sys.modules[name] = None`` (the
import then raises ModuleNotFoundError, as when it is absent) before it runs the CLI.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ctzarr
from ctzarr.errors import CtzarrError, MissingDependencyError
from ctzarr.extras import require


def _cli_without(blocked: tuple[str, ...], argv: list[str]) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None
        from ctzarr.cli import main
        sys.exit(main({argv!r}))
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_show_without_matplotlib(saros_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "muscle.png"
    proc = _cli_without(
        ("matplotlib",), ["show", str(saros_store), "case_000", "muscle", "-o", str(out)]
    )
    assert proc.returncode == 1, proc.stderr
    assert (
        proc.stderr == 'ctzarr: error: ctzarr show needs matplotlib: pip install "ctzarr[show]"\n'
    )
    assert proc.stdout == ""
    assert not out.exists()


def test_stats_parquet_without_pyarrow(saros_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats.parquet"
    proc = _cli_without(("pyarrow",), ["stats", str(saros_store), "-o", str(out)])
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        'ctzarr: error: ctzarr stats -o OUT.parquet needs pyarrow: pip install "ctzarr[parquet]"\n'
    )
    assert proc.stdout == ""
    assert not out.exists()


def test_profile_plot_without_matplotlib(saros_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.png"
    argv = ["profile", str(saros_store), "case_000", "muscle", "--plot", str(out)]
    proc = _cli_without(("matplotlib",), argv)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        'ctzarr: error: ctzarr profile --plot needs matplotlib: pip install "ctzarr[show]"\n'
    )
    assert proc.stdout == ""  # refused before any work
    assert not out.exists()


def test_profile_parquet_without_pyarrow(saros_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "profile.parquet"
    argv = ["profile", str(saros_store), "case_000", "muscle", "-o", str(out)]
    proc = _cli_without(("pyarrow",), argv)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (
        "ctzarr: error: ctzarr profile -o OUT.parquet needs pyarrow: "
        'pip install "ctzarr[parquet]"\n'
    )
    assert not out.exists()


def test_stats_csv_needs_no_extras(saros_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "stats.csv"
    proc = _cli_without(("matplotlib", "pyarrow"), ["stats", str(saros_store), "-o", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert out.read_text().startswith("case_id,segmentation,label,structure,")


def test_require_returns_the_module() -> None:
    import json

    assert require("json", "none", "a test") is json


def test_require_raises_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ctzarr_missing_pkg", None)
    with pytest.raises(MissingDependencyError) as info:
        require("ctzarr_missing_pkg.sub", "extra1", "ctzarr feature")
    err = info.value
    assert isinstance(err, CtzarrError)
    assert isinstance(err, ImportError)
    assert str(err) == 'ctzarr feature needs ctzarr_missing_pkg.sub: pip install "ctzarr[extra1]"'
    assert (err.module, err.extra, err.feature, err.name) == (
        "ctzarr_missing_pkg.sub",
        "extra1",
        "ctzarr feature",
        "ctzarr_missing_pkg.sub",
    )
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is MissingDependencyError
    assert str(again) == str(err)
    assert "MissingDependencyError" in ctzarr.__all__
    assert ctzarr.MissingDependencyError is MissingDependencyError


def test_require_does_not_hide_a_broken_install(tmp_path: Path) -> None:
    """A module that is installed but fails to import itself is not reported as a missing extra."""
    (tmp_path / "ctzarr_broken_mod.py").write_text("import ctzarr_no_such_dependency\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from ctzarr.extras import require
        try:
            require("ctzarr_broken_mod", "x", "y")
        except ModuleNotFoundError as exc:
            print(type(exc).__name__, exc.name)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout == "ModuleNotFoundError ctzarr_no_such_dependency\n"
