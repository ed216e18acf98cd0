"""Output paths, the same rule in every command: the extension decides the format (or is
refused with a one-line error before any work), and missing parent folders are created."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ctzarr.errors import OutputPathError

__all__ = ["TABLE_FORMATS", "make_folder", "output_path"]

#: extensions of a table written with -o, and the format each names
TABLE_FORMATS: dict[str, str] = {".csv": "csv", ".parquet": "parquet", ".json": "json"}


def output_path(
    text: str, formats: Mapping[str, str] | None, option: str, *, create: bool = True
) -> tuple[Path, str]:
    """Check an output path and create its parent folders.

    Parameters
    ----------
    text : str
        The path as given.
    formats : mapping or None
        Extension (``".nii.gz"``; matched case-insensitively, longest first) -> format name;
        None for a directory (created itself, with its parents).
    option : str
        The option or argument that gave the path, for the error message.
    create : bool
        Create the parent folders (or the directory) now; False only checks the extension.

    Returns
    -------
    (pathlib.Path, str)
        The path and the format its extension names (``""`` for a directory).

    Raises
    ------
    OutputPathError
        Unknown extension, or a file is in the way of a folder to create.
    """
    path = Path(text)
    fmt = ""
    if formats is not None:
        name = path.name.lower()
        for ext in sorted(formats, key=len, reverse=True):
            if name.endswith(ext) and len(name) > len(ext):
                fmt = formats[ext]
                break
        else:
            known = ", ".join(sorted(formats, key=lambda e: (formats[e], e)))
            raise OutputPathError(f"{option} {text}: unsupported extension; write one of {known}")
    if create:
        make_folder(path if formats is None else path.parent, option, text)
        if formats is not None and path.is_dir():
            raise OutputPathError(f"{option} {text}: is a directory, not a file")
    return path, fmt


def make_folder(folder: Path, option: str, text: str) -> None:
    """Create a folder and its parents (every command creates missing output folders).

    Raises
    ------
    OutputPathError
        A file is in the way.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise OutputPathError(
            f"{option} {text}: cannot create folder {folder}: a file is in the way ({exc.filename})"
        ) from exc
