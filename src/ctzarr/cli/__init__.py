"""The command line: `ctzarr COMMAND ...`, a thin layer over the library."""

from ctzarr.cli.main import main

__all__ = ["main"]
