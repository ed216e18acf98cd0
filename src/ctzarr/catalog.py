"""The dataset catalog (``catalog.yaml``, intake v1 shape): names to store URLs and facts."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import CatalogError

__all__ = ["load_catalog", "resolve_entry"]

#: intake's template syntax for environment variables, the only template ctzarr expands
_ENV = re.compile(r"\{\{\s*env\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*\}\}")


def catalog_path() -> str:
    """The catalog in use: $CTZARR_CATALOG, else the one shipped with the package."""
    return os.environ.get("CTZARR_CATALOG") or str(
        resources.files("ctzarr") / "data" / "catalog.yaml"
    )


def load_catalog(path: str | None = None) -> dict[str, Any]:
    """Read a catalog file and return its ``sources`` mapping."""
    path = path or catalog_path()
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise CatalogError(f"{path}: cannot read the catalog: {exc}") from exc
    sources = doc.get("sources") if isinstance(doc, dict) else None
    if not isinstance(sources, dict):
        raise CatalogError(f"{path}: not an intake v1 catalog (no 'sources' mapping)")
    return sources


def _expand(value: str, name: str) -> str:
    def sub(m: re.Match[str]) -> str:
        var = m.group(1)
        if var not in os.environ:
            raise CatalogError(
                f"catalog entry {name!r} needs the environment variable {var} (where its store lives)"
            )
        return os.environ[var].rstrip("/")

    return _ENV.sub(sub, value)


def resolve_entry(name: str, path: str | None = None) -> tuple[str, dict[str, Any] | None]:
    """URL and storage options of a catalog entry."""
    sources = load_catalog(path)
    if name not in sources:
        raise CatalogError(f"no catalog entry {name!r}; entries: {sorted(sources)}")
    args = sources[name].get("args") or {}
    url = args.get("urlpath")
    if not isinstance(url, str):
        raise CatalogError(f"catalog entry {name!r} has no args.urlpath")
    so = args.get("storage_options") or None
    return _expand(url, name), so
