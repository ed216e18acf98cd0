"""Optional dependencies: a feature that needs one asks for it here and gets a typed error.

``pip install ctzarr`` installs what converting and querying need; a few features need more
(``ctzarr[show]``: matplotlib for the PNG of ``ctzarr show``; ``ctzarr[parquet]``: pyarrow for
``ctzarr stats -o OUT.parquet``). :func:`require` imports such a module or raises
:class:`~ctzarr.errors.MissingDependencyError` naming the extra to install, which the CLI prints
as its one error line.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ctzarr.errors import MissingDependencyError

__all__ = ["require"]


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
