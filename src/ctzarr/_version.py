"""The installed version of ctzarr."""

__version__ = "0.1.0"
