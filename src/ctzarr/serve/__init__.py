"""``ctzarr serve``: the query layer over HTTP (JSON API, ``/zarr`` bytes, the web page).

Needs the ``serve`` extra (``pip install "ctzarr[serve]"``: FastAPI, uvicorn, Pillow).

>>> from ctzarr.serve import create_app
>>> app = create_app(["dap.zarr"])          # doctest: +SKIP   any ASGI server runs it
"""

from __future__ import annotations

from ctzarr.serve.app import create_app
from ctzarr.serve.server import serve

__all__ = ["create_app", "serve"]
