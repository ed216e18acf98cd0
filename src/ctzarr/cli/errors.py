"""The one error line of the command line: what went wrong, where, and what to do.

ctzarr's own errors already name the file, case and fault; this module words the rest, which
escape from the standard library and the remote-storage libraries: raw ``OSError`` (``[Errno
2]``, ``[Errno 17]``), a missing optional package, missing credentials or an unreachable
endpoint (through :func:`ctzarr.io.faults.classify`, the one classifier of I/O faults).
Imported only when a command failed.
"""

from __future__ import annotations

import argparse
import errno
from pathlib import Path

from ctzarr.errors import CtzarrError
from ctzarr.extras import missing_extra
from ctzarr.io.faults import FaultKind, classify

__all__ = ["describe"]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _os_error(exc: OSError) -> str | None:
    """A raw OSError naming its path, in words and with what to do; None without a path."""
    if exc.filename is None:
        return None
    # a rename (of a temporary file over the target) fails for its target
    path = str(exc.filename if exc.filename2 is None else exc.filename2)
    if isinstance(exc, FileExistsError):
        if Path(path).is_file():
            return f"{path}: is a file, where a directory is needed (choose another path)"
        return f"{path}: already exists (remove it or choose another path)"
    if isinstance(exc, NotADirectoryError):
        return f"{path}: a part of this path is a file, not a directory"
    if isinstance(exc, IsADirectoryError):
        return f"{path}: is a directory, where a file is needed"
    if isinstance(exc, FileNotFoundError):
        return f"{path}: no such file or directory"
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied"
    if exc.errno == errno.ENOSPC:
        return f"{path}: no space left on the device"
    reason = exc.strerror or type(exc).__name__
    return f"{path}: {reason[:1].lower()}{reason[1:]}"


def describe(exc: BaseException, args: argparse.Namespace | None = None) -> str:
    """The one line (without the ``ctzarr: error:`` prefix) that reports ``exc``."""
    command = f"ctzarr {args.command}" if args is not None else "ctzarr"
    if isinstance(exc, CtzarrError):
        text = _one_line(str(exc))
        return text or type(exc).__name__
    missing = missing_extra(exc, command)
    if missing is not None:
        return str(missing)
    if isinstance(exc, OSError):
        worded = _os_error(exc)
        if worded is not None:
            return worded
    fault = classify(exc)  # remote libraries: credentials, endpoints, HTTP statuses
    if fault.kind not in (FaultKind.UNKNOWN, FaultKind.MISSING) and fault.description:
        return _one_line(fault.description)
    if isinstance(exc, KeyError) and exc.args:
        return _one_line(str(exc.args[0]))
    text = _one_line(str(exc))
    if isinstance(exc, (ValueError, TypeError, OSError)) and text:
        return text
    # not an error we know: say so, and how to see more
    what = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"{what} (unexpected; CTZARR_DEBUG=1 shows the traceback)"
