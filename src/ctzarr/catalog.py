"""The dataset catalog (``catalog.yaml``, intake v1 shape): names to store URLs and facts.

A catalog is a file that someone else may have written, and fsspec opens whatever a URL names:
``simplecache::file:///etc/passwd`` reads a local file, ``reference://`` maps keys to arbitrary
URLs, ``http://169.254.169.254/`` is the cloud metadata service. So where an entry points is
checked before anything is opened (:func:`parse_catalog_url`,
:func:`parse_catalog_storage_options`):

- only ``s3://``, ``gs://`` and ``https://`` to public hosts; no ``::`` (protocol chaining),
  ``reference://``, ``memory://`` or any other protocol; no ``..``, NUL, backslash or control
  characters; no credentials in the URL or the storage options;
- local paths, ``file://``, ``http://`` and private, loopback or link-local hosts only when the
  user opts in: ``allow_local=True``, :func:`allow_local_targets`, ``CTZARR_ALLOW_LOCAL=1``, or
  an entry that lives under the user's own ``$CTZARR_DATA_ROOT``
  (``urlpath: "{{ env(CTZARR_DATA_ROOT) }}/name.zarr"``, as in the shipped catalog).

This applies to catalog entries only: a path or URL passed to ``open_collection`` directly is
the user's own choice and is opened as given.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ctzarr import config
from ctzarr.errors import CatalogError
from ctzarr.io.urls import (
    ALLOW_LOCAL_ENV,
    DATA_ROOT_ENV,
    REMOTE_PROTOCOLS,
    ResolveHost,
    allow_local_targets,
    expand_env,
    local_opt_in,
    parse_catalog_storage_options,
    parse_catalog_url,
    under_user_root,
)

__all__ = [
    "ALLOW_LOCAL_ENV",
    "DATA_ROOT_ENV",
    "REMOTE_PROTOCOLS",
    "allow_local_targets",
    "catalog_path",
    "load_catalog",
    "parse_catalog_storage_options",
    "parse_catalog_url",
    "resolve_entry",
]


logger = logging.getLogger(__name__)


def catalog_path() -> str:
    """The catalog in use: the ``catalog`` setting ($CTZARR_CATALOG), else the shipped one."""
    return config.get("catalog") or str(resources.files("ctzarr") / "data" / "catalog.yaml")


def load_catalog(path: str | None = None) -> dict[str, Any]:
    """Read a catalog file and return its ``sources`` mapping."""
    path = path or catalog_path()
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as exc:
        # ValueError: not UTF-8; RecursionError: absurdly nested YAML
        raise CatalogError(f"{path}: cannot read the catalog: {exc}") from exc
    sources = doc.get("sources") if isinstance(doc, dict) else None
    if not isinstance(sources, dict):
        raise CatalogError(f"{path}: not an intake v1 catalog (no 'sources' mapping)")
    return sources


def resolve_entry(
    name: str,
    path: str | None = None,
    *,
    allow_local: bool | None = None,
    resolve_host: ResolveHost | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """URL and storage options of a catalog entry, checked against the catalog URL policy.

    Parameters
    ----------
    name : str
        Entry name (``"dap_atlas"``).
    path : str, optional
        Catalog file; default :func:`catalog_path`.
    allow_local : bool, optional
        Allow local paths, ``file://``, ``http://`` and private, loopback or link-local hosts.
        ``None`` (default): the :func:`allow_local_targets` block, else ``$CTZARR_ALLOW_LOCAL``.
        An entry under ``$CTZARR_DATA_ROOT`` needs no opt-in.
    resolve_host : callable, optional
        Host name to IP address strings, for the private-host check; default
        ``socket.getaddrinfo``.

    Returns
    -------
    (str, dict or None)
        The normalised URL (a plain path for local stores) and the storage options.

    Raises
    ------
    CatalogError
        Unknown or malformed entry, or a target the policy refuses; the message names the
        entry and the reason.
    """
    sources = load_catalog(path)
    if name not in sources:
        raise CatalogError(f"no catalog entry {name!r}; entries: {sorted(map(str, sources))}")
    entry = sources[name]
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, dict):
        raise CatalogError(f"catalog entry {name!r} has no args mapping")
    raw = args.get("urlpath")
    if not isinstance(raw, str):
        raise CatalogError(f"catalog entry {name!r} has no args.urlpath")
    opted_in = local_opt_in(allow_local)
    url = parse_catalog_url(
        expand_env(raw, name),
        entry=name,
        allow_local=opted_in or under_user_root(raw, name),
        resolve_host=resolve_host,
    )
    # storage options come from the catalog author even when the root is the user's, so only
    # the explicit opt-in lets them point an endpoint at a private host
    options = parse_catalog_storage_options(
        args.get("storage_options"),
        entry=name,
        url=url,
        allow_local=opted_in,
        resolve_host=resolve_host,
    )
    return url, options
