"""ctzarr.config: every CTZARR_* variable read where it is used, validated with a clear error.

Table-driven: for each setting a good environment value and what it parses to, and a bad one
(a ConfigError, also a ValueError, naming the variable); ``import ctzarr`` never fails on one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

import ctzarr
from ctzarr import config
from ctzarr.errors import ConfigError, CtzarrError

#: (key, variable, good text, parsed value, bad text)
CASES = [
    ("retries", "CTZARR_RETRIES", "5", 5, "three"),
    ("retries", "CTZARR_RETRIES", " 0 ", 0, "-1"),
    ("retries", "CTZARR_RETRIES", "100", 100, "101"),
    ("timeout_s", "CTZARR_TIMEOUT_S", "0.5", 0.5, "0"),
    ("timeout_s", "CTZARR_TIMEOUT_S", "1e2", 100.0, "nan"),
    ("backoff_s", "CTZARR_BACKOFF_S", "0", 0.0, "-0.1"),
    ("max_backoff_s", "CTZARR_MAX_BACKOFF_S", "3", 3.0, "inf"),
    ("io", "CTZARR_IO", "FSSPEC", "fsspec", "boto"),
    ("io", "CTZARR_IO", "", "auto", "s3fs"),
    ("lock_ttl_s", "CTZARR_LOCK_TTL_S", "60", 60.0, "ten"),
    ("collection_lock_wait_s", "CTZARR_COLLECTION_LOCK_WAIT_S", "0", 0.0, "soon"),
    ("allow_local", "CTZARR_ALLOW_LOCAL", "1", True, "perhaps"),
    ("allow_local", "CTZARR_ALLOW_LOCAL", "off", False, "2"),
    ("debug", "CTZARR_DEBUG", "yes", True, "verbose"),
]

#: settings whose every text is valid: (key, variable, text, parsed value)
FREE_TEXT = [
    ("data_root", "CTZARR_DATA_ROOT", "s3://bucket/stores", "s3://bucket/stores"),
    ("data_root", "CTZARR_DATA_ROOT", "", ""),  # empty: refused where it is substituted
    ("catalog", "CTZARR_CATALOG", "/etc/my-catalog.yaml", "/etc/my-catalog.yaml"),
    ("catalog", "CTZARR_CATALOG", "", None),  # empty: the shipped catalog
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in config.SETTINGS:
        monkeypatch.delenv(config.env_name(key), raising=False)
    with config.set(dict.fromkeys(config.SETTINGS)):
        yield


def _id(case: tuple[Any, ...]) -> str:
    return f"{case[1]}={case[2]!r}"


def test_every_setting_has_a_default_and_a_readme_name() -> None:
    assert {config.env_name(k) for k in config.SETTINGS} == {
        "CTZARR_RETRIES",
        "CTZARR_TIMEOUT_S",
        "CTZARR_BACKOFF_S",
        "CTZARR_MAX_BACKOFF_S",
        "CTZARR_IO",
        "CTZARR_LOCK_TTL_S",
        "CTZARR_COLLECTION_LOCK_WAIT_S",
        "CTZARR_ALLOW_LOCAL",
        "CTZARR_DATA_ROOT",
        "CTZARR_CATALOG",
        "CTZARR_DEBUG",
    }
    for key, value in config.DEFAULTS.items():
        assert config.get(key) == value, key


@pytest.mark.parametrize(("key", "var", "good", "parsed", "bad"), CASES, ids=map(_id, CASES))
def test_environment_value_read_where_used(
    key: str, var: str, good: str, parsed: Any, bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(var, good)
    assert config.get(key) == parsed
    monkeypatch.setenv(var, bad)  # after the import, after a first use: still read
    with pytest.raises(ConfigError, match=var) as info:
        config.get(key)
    err = info.value
    assert isinstance(err, ValueError)
    assert isinstance(err, CtzarrError)
    assert repr(bad) in str(err)
    assert "must be" in str(err)


@pytest.mark.parametrize(("key", "var", "good", "parsed", "bad"), CASES, ids=map(_id, CASES))
def test_set_beats_the_environment_and_is_validated(
    key: str, var: str, good: str, parsed: Any, bad: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(var, bad)
    with config.set({key: good}):
        assert config.get(key) == parsed
    with config.set({key: bad}), pytest.raises(ConfigError, match=f"{var}.*ctzarr.config.set"):
        config.get(key)
    with pytest.raises(ConfigError):  # the block is over: the environment again
        config.get(key)


@pytest.mark.parametrize(("key", "var", "text", "parsed"), FREE_TEXT, ids=map(_id, FREE_TEXT))
def test_free_text_settings(
    key: str, var: str, text: str, parsed: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(var, text)
    assert config.get(key) == parsed


def test_set_refuses_unknown_keys_and_works_process_wide() -> None:
    with pytest.raises(KeyError, match="retrys"):
        config.set(retrys=1)
    config.set(retries=7)
    try:
        assert config.get("retries") == 7
        assert ctzarr.config.get("retries") == 7
    finally:
        config.set(retries=None)
    assert config.get("retries") == 3


def test_import_never_fails_on_bad_variables() -> None:
    env = {**os.environ, **{var: bad for _, var, _, _, bad in CASES}}  # every one malformed
    code = "import ctzarr, ctzarr.io.locks, ctzarr.io.stores, ctzarr.cli.main; print('ok')"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_cli_reports_a_bad_setting_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ctzarr.cli.main import main

    monkeypatch.setenv("CTZARR_DEBUG", "verbose")
    assert main(["catalog"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctzarr: error: CTZARR_DEBUG must be")
    assert "\n" not in err
