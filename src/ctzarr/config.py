"""ctzarr's settings: one donfig configuration, environment variables under ``CTZARR_``.

Every setting has a flat key and an environment variable named after it (``retries`` and
``CTZARR_RETRIES``, ``lock_ttl_s`` and ``CTZARR_LOCK_TTL_S``). A value is looked up when it is
used, strongest first:

1. ``ctzarr.config.set(retries=0)``, for the process or, as a context manager, a block;
2. the environment variable, read at the moment of use (so ``import ctzarr`` never reads or
   fails on one, and a variable set later in the process counts);
3. the default in :data:`DEFAULTS`.

:func:`get` validates the value and raises :class:`~ctzarr.errors.ConfigError` (also a
``ValueError``) naming the variable and the expected form.

>>> import ctzarr.config
>>> ctzarr.config.get("retries")
3
>>> with ctzarr.config.set(retries=0):
...     ctzarr.config.get("retries")
0

Why the environment is not collected into the donfig object when it is made (dask and
zarr-python do so at import): a malformed variable would then have to fail ``import ctzarr``
or be dropped silently, and one set after the import would be ignored.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from donfig import Config
from donfig.config_obj import ConfigSet

from ctzarr.errors import ConfigError

__all__ = ["DEFAULTS", "ENV_PREFIX", "SETTINGS", "config", "env_name", "get", "set"]

ENV_PREFIX = "CTZARR_"


# ------------------------------------------------------------------------------------------------
# parsers: return the normalised value or raise ValueError("must be ...")
# ------------------------------------------------------------------------------------------------
def parse_whole_number(value: object, low: int, high: int) -> int:
    """An integer in [low, high], from an int or its decimal text."""
    text = value.strip() if isinstance(value, str) else None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif text is not None and text.isdigit():
        number = int(text)
    else:
        raise ValueError(f"must be a whole number from {low} to {high}")
    if not low <= number <= high:
        raise ValueError(f"must be a whole number from {low} to {high}")
    return number


def parse_seconds(value: object, *, allow_zero: bool) -> float:
    """A finite number of seconds, > 0 (or >= 0 with ``allow_zero``)."""
    try:
        seconds = math.nan if isinstance(value, bool) else float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(f"must be a finite number of seconds {'>= 0' if allow_zero else '> 0'}")
    return seconds


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError("must be 1 or 0 (true/false, yes/no, on/off)")


def _choice(*choices: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = str(value).strip().lower() or choices[0]
        if text not in choices:
            raise ValueError(f"must be {', '.join(repr(c) for c in choices)}")
        return text

    return parse


def _text(value: object) -> str:
    if not isinstance(value, str | os.PathLike):
        raise ValueError("must be a string")
    return os.fspath(value)


def _optional_text(value: object) -> str | None:
    return _text(value) or None


@dataclass(frozen=True)
class Setting:
    """One setting: its default, its parser, and what it means."""

    default: Any
    parse: Callable[[object], Any]
    doc: str


#: every setting ctzarr reads; the environment variable is ``CTZARR_`` + the key in capitals
SETTINGS: Mapping[str, Setting] = {
    "retries": Setting(
        3, lambda v: parse_whole_number(v, 0, 100), "attempts after the first of a remote call"
    ),
    "timeout_s": Setting(
        30.0,
        lambda v: parse_seconds(v, allow_zero=False),
        "connect and read timeout of a remote call",
    ),
    "backoff_s": Setting(
        0.2, lambda v: parse_seconds(v, allow_zero=True), "sleep before the first retry"
    ),
    "max_backoff_s": Setting(
        2.0, lambda v: parse_seconds(v, allow_zero=True), "cap on any one sleep between retries"
    ),
    "io": Setting(
        "auto", _choice("auto", "obstore", "fsspec"), "library of read-only s3/http(s) stores"
    ),
    "lock_ttl_s": Setting(
        600.0,
        lambda v: parse_seconds(v, allow_zero=False),
        "age of a lock heartbeat after which the lock is stale",
    ),
    "collection_lock_wait_s": Setting(
        300.0,
        lambda v: parse_seconds(v, allow_zero=True),
        "how long a run waits for another converter's update of the collection table",
    ),
    "allow_local": Setting(
        False, _flag, "catalog entries may name local paths, http:// and private hosts"
    ),
    "data_root": Setting(
        None, _text, "where the user's converted stores live ({{ env(CTZARR_DATA_ROOT) }})"
    ),
    "catalog": Setting(None, _optional_text, "the catalog file (default: the shipped one)"),
    "debug": Setting(False, _flag, "the command line shows tracebacks"),
}

#: the defaults, key to value
DEFAULTS: Mapping[str, Any] = {key: s.default for key, s in SETTINGS.items()}

#: the donfig object: it holds what was set in Python (None: not set here, see :func:`get`)
config = Config(
    "ctzarr", defaults=[dict.fromkeys(SETTINGS)], paths=[], env={}, env_prefix=ENV_PREFIX
)


def env_name(key: str) -> str:
    """The environment variable of a setting: ``lock_ttl_s`` -> ``CTZARR_LOCK_TTL_S``."""
    return ENV_PREFIX + key.replace("-", "_").replace(".", "__").upper()


def get(key: str) -> Any:
    """The validated value of a setting: set in Python, else its environment variable, else its
    default.

    Raises
    ------
    KeyError
        For a key that is not in :data:`SETTINGS`.
    ConfigError
        When the value is malformed; the message names the variable and the expected form.
    """
    key = key.replace("-", "_")
    setting = SETTINGS[key]
    value = config.get(key, None)
    source = "set by ctzarr.config.set"
    if value is None:
        value = os.environ.get(env_name(key))
        source = "from the environment"
        if value is None:
            return setting.default
    try:
        return setting.parse(value)
    except ValueError as exc:
        raise ConfigError(
            f"{env_name(key)} {exc}, got {value!r} {source} (ctzarr.config {key!r}: {setting.doc})"
        ) from None


def set(arg: Mapping[str, Any] | None = None, **kwargs: Any) -> ConfigSet:
    """Set settings for the process, or for a block when used as a context manager.

    ``ctzarr.config.set(retries=0)``, ``with ctzarr.config.set({"lock_ttl_s": 60}): ...``;
    a value of None goes back to the environment and the default. Unknown keys are refused.
    """
    unknown = sorted(
        {*(arg or {}), *kwargs} - {*SETTINGS, *(k.replace("_", "-") for k in SETTINGS)}
    )
    if unknown:
        raise KeyError(f"unknown ctzarr setting(s) {unknown}; known: {sorted(SETTINGS)}")
    return config.set(arg, **kwargs)
