"""``--storage-options JSON``: fsspec options of a remote store, parsed with a clear error."""

from __future__ import annotations

import json
from typing import Any

from ctzarr.errors import CtzarrError

__all__ = ["storage_options"]


def storage_options(text: str | None) -> dict[str, Any] | None:
    """The options of ``--storage-options`` (a JSON object), or None when not given."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CtzarrError(f"--storage-options must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise CtzarrError("--storage-options must be a JSON object")
    return value
