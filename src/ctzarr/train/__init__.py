"""Training patches drawn from the index: :class:`ctzarr.PatchSampler` (``train/sampler.py``).

The worker side (``reader``, ``patches``, ``counts``) imports only the ``io`` and ``model``
layers, never dask, xarray or pandas: a DataLoader worker started by spawn pays ~0.7 s and
~55 MB of imports for it instead of ~3 s and ~170 MB for the reading side.
"""
