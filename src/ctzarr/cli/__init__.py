"""The command line: `ctzarr COMMAND ...`, a thin layer over the library."""

import gc
import os
import sys

from ctzarr.cli.main import main

__all__ = ["OWNS_PROCESS", "main", "run"]

#: True in the ``ctzarr`` console script's own process (:func:`run`), where a command may tune
#: process-wide settings (the collector, malloc); False when :func:`main` is called from another
#: program or a test.
OWNS_PROCESS = False


def run() -> None:
    """The ``ctzarr`` console script: :func:`main`, then exit with its status.

    The objects a command leaves behind are frozen first, so that the interpreter's shutdown
    does not walk them all in a last collection (0.24 s after a conversion, measured).

    OpenBLAS gets one thread unless the user says otherwise: no command does linear algebra
    worth a thread pool, and the pool numpy's import starts spins for ~0.1 CPU-s (measured on a
    conversion, where that CPU is wanted by the conversion's own threads).
    """
    global OWNS_PROCESS
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    OWNS_PROCESS = True
    status = main()
    gc.freeze()
    sys.exit(status)
