"""`python -m ctzarr.cli`."""

from ctzarr.cli import run

run()
