"""Optional dependencies: a feature that needs one asks for it here and gets a typed error.

``pip install ctzarr`` installs what converting and querying need; a few features need more
(``ctzarr[show]``: matplotlib for the PNG of ``ctzarr show``; ``ctzarr[parquet]``: pyarrow for
``ctzarr stats -o OUT.parquet``; ``ctzarr[s3]``, ``[gcs]``, ``[http]``: remote stores;
``ctzarr[distributed]``: a dask cluster). :func:`require` imports such a module or raises
:class:`~ctzarr.errors.MissingDependencyError` naming the extra to install, which the CLI prints
as its one error line. :func:`missing_extra` recognises the same fault in an ``ImportError``
raised elsewhere (fsspec's "Install s3fs to access S3").
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ctzarr.errors import MissingDependencyError

__all__ = ["EXTRA_OF_MODULE", "missing_extra", "require"]

#: the extra (pyproject ``[project.optional-dependencies]``) that installs each optional module
EXTRA_OF_MODULE: dict[str, str] = {
    "matplotlib": "show",
    "pyarrow": "parquet",
    "distributed": "distributed",
    "s3fs": "s3",
    "botocore": "s3",
    "aiobotocore": "s3",
    "obstore": "s3",
    "gcsfs": "gcs",
    "aiohttp": "http",
    "requests": "http",
    "fastapi": "serve",
    "uvicorn": "serve",
    "PIL": "serve",
    "neuroglancer": "neuroglancer",
}


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import an optional dependency of a feature.

    Parameters
    ----------
    module : str
        Module to import, e.g. ``"matplotlib"``.
    extra : str
        The ctzarr extra that installs it, e.g. ``"show"``.
    feature : str
        What needs it, as the user asked for it, e.g. ``"ctzarr show"``.

    Returns
    -------
    module
        The imported module.

    Raises
    ------
    MissingDependencyError
        The module (or its top-level package) is not installed; also an ``ImportError``. An
        installed module that fails to import for another reason raises that error unchanged.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        if exc.name is not None and exc.name not in (module, top):
            raise  # installed but broken: that error says more than "install the extra"
        raise MissingDependencyError(module, extra, feature) from exc


def missing_extra(exc: BaseException, feature: str) -> MissingDependencyError | None:
    """The :class:`MissingDependencyError` an import failure stands for, or None.

    The exception and its causes are searched for an ``ImportError`` naming a module of
    :data:`EXTRA_OF_MODULE` (fsspec raises ``ImportError("Install s3fs to access S3")`` from the
    ``ModuleNotFoundError`` of ``s3fs``).

    Parameters
    ----------
    exc : BaseException
        What was raised.
    feature : str
        What needed the module, as the user asked for it, e.g. ``"ctzarr info"``.
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, MissingDependencyError):
            return cur
        if isinstance(cur, ImportError) and cur.name:
            top = cur.name.partition(".")[0]
            if top in EXTRA_OF_MODULE:
                return MissingDependencyError(top, EXTRA_OF_MODULE[top], feature)
        cur = cur.__cause__ or cur.__context__
    return None
