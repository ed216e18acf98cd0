"""Running task functions on a Dask distributed cluster (imports nothing of ctzarr above it)."""
