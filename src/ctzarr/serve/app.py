"""The HTTP app of ``ctzarr serve``: the JSON API, ``/zarr`` and the web page.

:func:`create_app` opens the collections once and answers from the library: every number,
row, crop and affine is what ``col.stats``, ``case.crop``, ``case.profile`` give in-process.
Blocking work (metadata, index and voxel reads) runs in worker threads, so a slow request
never stalls the event loop. Every bound (crop voxels, page length, picture size, slice index)
is checked from metadata before any voxel is read.

The docs page at ``/api/v1/docs`` is rendered here from the OpenAPI document as plain HTML:
FastAPI's Swagger and ReDoc pages load their scripts from a CDN, which an offline service must
not depend on, so they are switched off.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hmac
import html
import io
import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
import nibabel as nib
import numpy as np
import pandas as pd
from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from nibabel.orientations import aff2axcodes
from starlette.types import ASGIApp, Receive, Scope, Send

from ctzarr._version import __version__
from ctzarr.extras import require
from ctzarr.read.case import Case
from ctzarr.read.collection import Collection, open_collection
from ctzarr.read.show import parse_window
from ctzarr.serve.neuroglancer import neuroglancer_url
from ctzarr.serve.problems import Problem, install_problem_handlers, problem_response
from ctzarr.serve.render import (
    OVERLAY_OPACITY,
    SlabCache,
    middle_index,
    render_slice,
    slice_index_at,
)
from ctzarr.serve.zarr_files import StoreFiles
from ctzarr.sources.nifti import header_from_bytes

__all__ = ["DEFAULT_MAX_CROP_VOXELS", "DEFAULT_SLAB_CACHE_MB", "MAX_PAGE", "create_app"]

#: largest crop answered by default (voxels): 64 M, e.g. 400 x 400 x 400
DEFAULT_MAX_CROP_VOXELS = 64 * 1024 * 1024

#: memory for decoded slabs of the slices shown (an axial slab of a 512² int16 case with
#: 64-voxel inner chunks and its labels: 48 MB)
DEFAULT_SLAB_CACHE_MB = 128

#: longest page of the case list
MAX_PAGE = 1000

#: cases kept open (their parsed metadata and arrays) per app
CASE_CACHE_SIZE = 256

#: the cookie that carries the token for a browser (set by ``/?token=...``)
TOKEN_COOKIE = "ctzarr_token"

API = "/api/v1"

_PARQUET = "application/vnd.apache.parquet"
_FORMAT_OF_MEDIA = {
    "application/json": "json",
    "text/csv": "csv",
    _PARQUET: "parquet",
    "application/x-parquet": "parquet",
}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _structure(text: str) -> str | int:
    text = text.strip()
    return int(text) if text.isdigit() else text


def _split(values: Sequence[str] | None) -> list[str] | None:
    """Repeated keys and comma-separated values, as one list (None when not given)."""
    if not values:
        return None
    out = [part.strip() for value in values for part in value.split(",")]
    return [p for p in out if p] or None


def _native(value: Any) -> Any:
    """A JSON value: numpy scalars as Python numbers, NaN and infinities as null."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    return value


def _rows(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: _native(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


def _orientation(affine: np.ndarray) -> str:
    """Axis codes of the stored (z, y, x) axes: the direction each index increases towards."""
    codes = aff2axcodes(affine)  # (i, j, k) = (x, y, z)
    return "".join(str(c) for c in reversed(codes))


class _Token:
    """Bearer-token check of every request except ``/healthz`` and CORS preflights (pure ASGI:
    no per-request task as in Starlette's BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    def _ok(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if (scheme.lower() == "bearer" and self._ok(given.strip())) or self._ok(
            request.cookies.get(TOKEN_COOKIE)
        ):
            await self.app(scope, receive, send)
            return
        query_token = request.query_params.get("token")
        if scope["path"] == "/" and self._ok(query_token):
            # a browser opens /?token=T once: the token moves into a cookie, out of the URL
            response: Response = RedirectResponse("/", status_code=303)
            response.set_cookie(
                TOKEN_COOKIE, query_token or "", httponly=True, samesite="strict", path="/"
            )
        else:
            response = problem_response(
                Problem(
                    401,
                    "a valid bearer token is required (Authorization: Bearer TOKEN)",
                    title="Unauthorized",
                    headers={"WWW-Authenticate": 'Bearer realm="ctzarr"'},
                )
            )
        await response(scope, receive, send)


class _Service:
    """The collections served, their open cases and the service's bounds."""

    def __init__(
        self,
        collections: Mapping[str, Collection],
        *,
        max_crop_voxels: int,
        client: Any,
        allow_origin: str,
        slab_cache_bytes: int = 0,
    ) -> None:
        self.collections = dict(collections)
        self.max_crop_voxels = max_crop_voxels
        self.client = client
        self._limiter: anyio.CapacityLimiter | None = None
        #: decoded slabs of the slices shown (a viewer steps through neighbouring slices)
        self.slabs = SlabCache(slab_cache_bytes)
        self.files = {
            name: StoreFiles(col.root.store, allow_origin, self.run)
            for name, col in collections.items()
        }
        self._cases: OrderedDict[tuple[str, str], Case] = OrderedDict()
        self._lock = threading.Lock()

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` in a worker thread of the service's pool."""
        if self._limiter is None:  # made inside the event loop that uses it
            self._limiter = anyio.CapacityLimiter(READ_THREADS)
        return await anyio.to_thread.run_sync(func, *args, limiter=self._limiter)

    def collection(self, name: str) -> Collection:
        col = self.collections.get(name)
        if col is None:
            close = difflib.get_close_matches(name, list(self.collections), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise Problem(
                404,
                f"no collection {name!r}{hint} (served: {', '.join(sorted(self.collections))})",
                title="Collection not found",
            )
        return col

    def case(self, name: str, case_id: str) -> Case:
        """A case, opened once and kept (blocking: call from a worker thread)."""
        key = (name, case_id)
        with self._lock:
            case = self._cases.get(key)
            if case is not None:
                self._cases.move_to_end(key)
                return case
        col = self.collection(name)
        if case_id not in col:
            close = difflib.get_close_matches(case_id, col.case_ids, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise Problem(
                404, f"no case {case_id!r} in collection {name!r}{hint}", title="Case not found"
            )
        case = col[case_id]
        with self._lock:
            self._cases[key] = case
            while len(self._cases) > CASE_CACHE_SIZE:
                self._cases.popitem(last=False)
        return case


#: worker threads for blocking reads: enough to overlap remote reads, few enough that each
#: thread's malloc arena and decode buffers do not grow the process under load (anyio's
#: default is 40 threads)
READ_THREADS = max(4, min(16, 4 * (os.cpu_count() or 1)))


def _case_summary(case: Case) -> dict[str, Any]:
    return {
        "case_id": case.case_id,
        "shape": list(case.shape),
        "spacing_mm": [float(s) for s in case.spacing],
        "orientation": _orientation(case.affine),
        "metadata": {k: _native(v) for k, v in case.attributes.items()},
    }


def _case_detail(case: Case) -> dict[str, Any]:
    voxel_ml = float(np.prod(case.spacing)) / 1000.0
    structures = []
    for seg in case.segmentation_names:
        lm = case.collection.segmentations[seg]
        idx = case.index(seg)
        for value, count in zip(idx.labels.tolist(), idx.voxel_count.tolist(), strict=True):
            if value == lm.background or value == lm.ignore_value or value not in lm:
                continue
            lab = lm[value]
            structures.append(
                {
                    "segmentation": seg,
                    "label": int(value),
                    "structure": lab.name,
                    "voxel_count": int(count),
                    "volume_ml": int(count) * voxel_ml,
                    "rgba": list(lab.rgba),
                }
            )
    return {
        **_case_summary(case),
        "affine": np.asarray(case.affine, dtype=float).tolist(),
        "segmentations": case.segmentation_names,
        "levels": case.levels,
        "structures": structures,
    }


def _label_maps(col: Collection) -> dict[str, Any]:
    return {
        seg: {
            "background": lm.background,
            "ignore_value": lm.ignore_value,
            "labels": [
                {"label": lab.value, "structure": lab.name, "rgba": list(lab.rgba)} for lab in lm
            ],
        }
        for seg, lm in col.segmentations.items()
    }


def _table_response(df: pd.DataFrame, fmt: str, filename: str) -> Response:
    if fmt == "csv":
        text = df.to_csv(index=False, quoting=csv.QUOTE_MINIMAL)
        return Response(
            text,
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{filename}.csv"'},
        )
    if fmt == "parquet":
        require("pyarrow", "parquet", "ctzarr serve stats as Parquet")
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return Response(
            buf.getvalue(),
            media_type=_PARQUET,
            headers={"Content-Disposition": f'attachment; filename="{filename}.parquet"'},
        )
    return JSONResponse({"items": _rows(df)})


def _stats_format(request: Request, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    for part in request.headers.get("accept", "").split(","):
        media = part.split(";")[0].strip().lower()
        if media in _FORMAT_OF_MEDIA:
            return _FORMAT_OF_MEDIA[media]
    return "json"


def _crop_body(case: Case, crop: Any, part: str, fmt: str) -> bytes:
    data = crop.image if part == "image" else crop.labels
    values = np.asarray(data.values)
    if fmt == "npy":
        buf = io.BytesIO()
        np.save(buf, values, allow_pickle=False)
        return buf.getvalue()
    # as ctzarr.read.export.crop_to_nifti writes it: the image header's kind, units and codes
    hdr = header_from_bytes(case.nifti_header_bytes)
    qcode, scode = int(hdr["qform_code"]) or 1, int(hdr["sform_code"]) or 1
    affine = crop.attrs["affine"]
    klass: type[nib.Nifti1Image] = (
        nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
    )
    img = klass(values.transpose(2, 1, 0), affine)
    img.header.set_xyzt_units(*hdr.get_xyzt_units())
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    # nibabel's own level for .nii.gz files (1): crops are sent, not archived
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def _docs_page(schema: Mapping[str, Any]) -> str:
    """A plain-HTML reference of the API from its OpenAPI document (no script, no CDN)."""
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ctzarr API</title>",
        "<style>body{font:14px system-ui,sans-serif;max-width:60em;margin:2em auto}"
        "code{background:#eee;padding:0 .2em}td,th{padding:.2em .6em;text-align:left;"
        "vertical-align:top}h2{font-size:1.1em;margin-top:2em}</style></head><body>",
        f"<h1>{html.escape(str(schema.get('info', {}).get('title', 'ctzarr')))} "
        f"{html.escape(str(schema.get('info', {}).get('version', '')))}</h1>",
        "<p>The machine-readable description: <a href='openapi.json'>openapi.json</a>.</p>",
    ]
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            out.append(f"<h2><code>{method.upper()} {html.escape(path)}</code></h2>")
            out.append(f"<p>{html.escape(str(op.get('description') or op.get('summary', '')))}</p>")
            params = op.get("parameters", [])
            if params:
                out.append("<table><tr><th>parameter</th><th>in</th><th>description</th></tr>")
                for p in params:
                    out.append(
                        f"<tr><td><code>{html.escape(p['name'])}</code></td>"
                        f"<td>{html.escape(p.get('in', ''))}</td>"
                        f"<td>{html.escape(str(p.get('description', '')))}</td></tr>"
                    )
                out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


def _static_dir() -> Path:
    return Path(str(resources.files("ctzarr.serve"))) / "static"


def create_app(
    stores: Sequence[str | os.PathLike[str] | Collection],
    *,
    names: Sequence[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    token: str | None = None,
    allow_origin: str = "*",
    max_crop_voxels: int = DEFAULT_MAX_CROP_VOXELS,
    client: Any = None,
    static_dir: str | os.PathLike[str] | None = None,
    slab_cache_mb: int = DEFAULT_SLAB_CACHE_MB,
) -> FastAPI:
    """The ASGI app serving collections: the JSON API, ``/zarr`` and the web page.

    Parameters
    ----------
    stores : list of str, path or Collection
        Collection stores (paths, URLs, catalog names) or open collections.
    names : list of str, optional
        Public name of each store (default: its dataset id).
    storage_options : dict, optional
        fsspec options for remote stores.
    token : str, optional
        Bearer token every request but ``/healthz`` must carry (compared in constant time).
    allow_origin : str
        ``Access-Control-Allow-Origin`` of ``/zarr`` answers.
    max_crop_voxels : int
        Largest crop answered; a larger one is a 413, refused before any voxel is read.
    client : dask.distributed.Client, optional
        Runs ``method=scan`` statistics.
    static_dir : path, optional
        The web page's files (default: the ones shipped in ``ctzarr/serve/static``).
    slab_cache_mb : int
        Memory for decoded slabs of the slices shown (0: none): stepping to the next slice
        then reads no chunk again.

    Returns
    -------
    fastapi.FastAPI
    """
    if slab_cache_mb < 0:
        raise ValueError(f"slab_cache_mb must be >= 0, got {slab_cache_mb}")
    if max_crop_voxels < 1:
        raise ValueError(f"max_crop_voxels must be >= 1, got {max_crop_voxels}")
    if names is not None and len(names) != len(stores):
        raise ValueError(f"{len(names)} names for {len(stores)} stores")
    collections: dict[str, Collection] = {}
    for i, store in enumerate(stores):
        col = (
            store
            if isinstance(store, Collection)
            else open_collection(store, storage_options=storage_options)
        )
        name = names[i] if names is not None else col.dataset_id
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(f"collection name {name!r}: letters, digits, '.', '_', '-' only")
        if name in collections:
            raise ValueError(f"two collections named {name!r}; name them with --name")
        collections[name] = col
    service = _Service(
        collections,
        max_crop_voxels=max_crop_voxels,
        client=client,
        allow_origin=allow_origin,
        slab_cache_bytes=slab_cache_mb * 2**20,
    )
    secrets = [str(col.url) for col in collections.values()]

    app = FastAPI(
        title="ctzarr",
        version=__version__,
        description="Whole-body CT segmentation collections: cases, statistics, crops, slices.",
        openapi_url=f"{API}/openapi.json",
        docs_url=None,
        redoc_url=None,
    )
    install_problem_handlers(app, secrets)
    if token is not None:
        if not token.strip():
            raise ValueError("the token is empty")
        app.add_middleware(_Token, token=token.strip())
    app.state.service = service

    static = Path(static_dir) if static_dir is not None else _static_dir()
    if static.is_dir():
        app.mount("/static", StaticFiles(directory=static), name="static")

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "collections": len(service.collections)}

    @app.get("/", include_in_schema=False, response_model=None)
    async def index() -> Response:
        page = static / "index.html"
        if page.is_file():
            return HTMLResponse(await anyio.Path(page).read_text())
        return HTMLResponse(
            "<!doctype html><title>ctzarr</title><p>ctzarr serve: the web page is not "
            f"installed. The API: <a href='{API}/docs'>{API}/docs</a>.</p>"
        )

    @app.get(f"{API}/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(_docs_page(app.openapi()))

    @app.get(f"{API}/collections")
    async def collections_list() -> dict[str, Any]:
        """Every collection served: name, dataset, case count, segmentations (with their
        label maps), store format version."""
        return {
            "items": [
                {
                    "name": name,
                    "dataset": col.dataset_id,
                    "case_count": len(col),
                    "segmentations": list(col.segmentations),
                    "format_version": col.meta.format_version,
                    "label_maps": _label_maps(col),
                }
                for name, col in service.collections.items()
            ]
        }

    @app.get(f"{API}/collections/{{name}}/cases")
    async def cases_list(
        name: str,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE, description="cases per page")] = 100,
        offset: Annotated[int, Query(ge=0, description="first case of the page")] = 0,
    ) -> dict[str, Any]:
        """A page of cases (sorted by id): id, shape and spacing (z, y, x), orientation (the
        direction each stored axis increases towards), and the dataset's case metadata."""
        col = service.collection(name)
        ids = col.case_ids[offset : offset + limit]

        def page() -> list[dict[str, Any]]:
            return [_case_summary(service.case(name, cid)) for cid in ids]

        return {
            "total": len(col),
            "offset": offset,
            "limit": limit,
            "items": await service.run(page),
        }

    @app.get(f"{API}/collections/{{name}}/cases/{{case_id}}")
    async def case_detail(name: str, case_id: str) -> dict[str, Any]:
        """One case: affine, shape, spacing, segmentations, and the structures present with
        their voxel counts, volumes and colours (from the index: no voxel read)."""

        def detail() -> dict[str, Any]:
            return _case_detail(service.case(name, case_id))

        result: dict[str, Any] = await service.run(detail)
        return result

    @app.get(f"{API}/collections/{{name}}/stats", response_model=None)
    async def stats(
        request: Request,
        name: str,
        structures: Annotated[
            list[str] | None, Query(description="names or ids; repeated or comma-separated")
        ] = None,
        cases: Annotated[list[str] | None, Query(description="case ids (default: all)")] = None,
        segmentation: str | None = None,
        within: Annotated[
            str | None, Query(description="SEGMENTATION:STRUCTURE (body composition)")
        ] = None,
        method: Literal["index", "scan"] = "index",
        format: Annotated[
            Literal["json", "csv", "parquet"] | None,
            Query(description="default: from Accept, else json"),
        ] = None,
    ) -> Response:
        """The rows of ``col.stats(...)``: JSON ``{"items": [...]}``, CSV or Parquet."""
        col = service.collection(name)
        wanted = _split(structures)
        case_ids = _split(cases)
        if case_ids is not None:
            missing = [c for c in case_ids if c not in col]
            if missing:
                raise Problem(
                    404, f"no case {missing[0]!r} in collection {name!r}", title="Case not found"
                )
        fmt = _stats_format(request, format)

        def query() -> pd.DataFrame:
            return col.stats(
                structures=None if wanted is None else [_structure(s) for s in wanted],
                cases=case_ids,
                segmentation=segmentation,
                method=method,
                client=service.client if method == "scan" else None,
                within=within,
            )

        df = await service.run(query)
        return _table_response(df, fmt, f"{name}_stats")

    @app.get(f"{API}/collections/{{name}}/cases/{{case_id}}/crop", response_model=None)
    async def crop(
        name: str,
        case_id: str,
        structure: Annotated[str, Query(description="name or id")],
        margin_mm: Annotated[float, Query(ge=0, le=10000)] = 0.0,
        segmentation: str | None = None,
        part: Literal["image", "labels"] = "image",
        format: Literal["nii.gz", "npy"] = "nii.gz",
    ) -> Response:
        """The crop of ``case.crop(structure, margin_mm, segmentation)``: the image or labels as
        ``.nii.gz`` (the crop's affine in its header) or ``.npy`` (the affine in the
        ``Ctzarr-Affine`` header, JSON). Over ``--max-crop-voxels``: 413, nothing read."""

        def build() -> tuple[bytes, dict[str, str]]:
            case = service.case(name, case_id)
            _, label, box = case.crop_box(_structure(structure), margin_mm, segmentation)
            voxels = math.prod(s.stop - s.start for s in box)
            if voxels > service.max_crop_voxels:
                raise Problem(
                    413,
                    f"the crop of {label.name!r} in case {case_id!r} with margin {margin_mm:g} "
                    f"mm holds {voxels} voxels; this server answers at most "
                    f"{service.max_crop_voxels}",
                    title="Crop too large",
                )
            ds = case.crop(_structure(structure), margin_mm, segmentation, lazy=False)
            body = _crop_body(case, ds, part, format)
            stem = _SAFE_NAME.sub("_", f"{case_id}_{label.name}_{part}")
            headers = {
                "Content-Disposition": f'attachment; filename="{stem}.{format}"',
                "Ctzarr-Affine": json.dumps(np.asarray(ds.attrs["affine"], float).tolist()),
                "Ctzarr-Box-Zyx": json.dumps([int(v) for v in ds.attrs["box_zyx"]]),
            }
            return body, headers

        body, headers = await service.run(build)
        media = "application/gzip" if format == "nii.gz" else "application/octet-stream"
        return Response(body, media_type=media, headers=headers)

    @app.get(f"{API}/collections/{{name}}/cases/{{case_id}}/slice.png", response_model=None)
    async def slice_png(
        name: str,
        case_id: str,
        plane: Literal["axial", "coronal", "sagittal"] = "axial",
        index: Annotated[
            int | None, Query(description="stored index along the plane's normal")
        ] = None,
        at: Annotated[
            str | None, Query(description="a structure: the slice through its centroid")
        ] = None,
        window: Annotated[
            str, Query(description="soft_tissue, lung, liver, bone, brain or WIDTH,LEVEL")
        ] = "soft_tissue",
        overlay: Annotated[str | None, Query(description="segmentation drawn filled")] = None,
        structures: Annotated[
            list[str] | None, Query(description="only these structures of the overlay")
        ] = None,
        opacity: Annotated[
            float, Query(ge=0.0, le=1.0, description="overlay opacity, 0 to 1")
        ] = OVERLAY_OPACITY,
    ) -> Response:
        """A rendered slice (radiological convention, square mm pixels), default the middle
        one; the ``Ctzarr-Slice`` header (JSON) says where its pixels come from."""
        if index is not None and at is not None:
            raise Problem(422, "give index or at, not both", title="Invalid parameter")
        try:
            win = parse_window(window)
        except ValueError as exc:
            raise Problem(422, str(exc), title="Invalid parameter") from None
        wanted = _split(structures)

        def build() -> tuple[bytes, dict[str, Any]]:
            case = service.case(name, case_id)
            seg = overlay
            if seg is not None and seg not in case.segmentation_names:
                raise Problem(
                    404,
                    f"case {case_id!r} has no segmentation {seg!r} "
                    f"(it has {', '.join(case.segmentation_names)})",
                    title="Segmentation not found",
                )
            picked = None if wanted is None else [_structure(s) for s in wanted]
            if picked and seg is None:
                seg = case.resolve(picked[0])[0]
            if at is not None:
                k = slice_index_at(case, plane, _structure(at))
            elif index is not None:
                k = index
            else:
                k = middle_index(case, plane)
            png, geometry = render_slice(
                case,
                plane=plane,
                index=k,
                window=win,
                overlay=seg,
                structures=picked,
                opacity=opacity,
                slabs=service.slabs if service.slabs.max_bytes else None,
            )
            return png, geometry.to_json()

        png, geometry = await service.run(build)
        return Response(
            png,
            media_type="image/png",
            headers={"Ctzarr-Slice": json.dumps(geometry), "Cache-Control": "no-cache"},
        )

    @app.get(f"{API}/collections/{{name}}/cases/{{case_id}}/voxel")
    async def voxel(
        name: str,
        case_id: str,
        z: Annotated[int, Query(description="stored z index")],
        y: Annotated[int, Query(description="stored y index")],
        x: Annotated[int, Query(description="stored x index")],
    ) -> dict[str, Any]:
        """The value of one voxel (``hu``: as ``case.image`` reads it, scaling applied) and the
        label of each segmentation there (the page's hover): one inner chunk per array."""

        def query() -> dict[str, Any]:
            case = service.case(name, case_id)
            shape = case.meta.shape_zyx
            if not all(0 <= v < n for v, n in zip((z, y, x), shape, strict=True)):
                raise Problem(
                    422,
                    f"voxel (z, y, x) = ({z}, {y}, {x}) is outside the volume {list(shape)}",
                    title="Invalid parameter",
                )
            box = (slice(z, z + 1), slice(y, y + 1), slice(x, x + 1))
            raw = np.asarray(case.array("0")[box])
            value = np.asarray(case.meta.nifti.scale(raw)).reshape(-1)[0].item()
            labels: dict[str, Any] = {}
            for seg in case.segmentation_names:
                v = int(np.asarray(case.array(f"labels/{seg}/0")[box]).reshape(-1)[0])
                lm = case.collection.segmentations.get(seg)
                known = lm is not None and v != lm.background and v != lm.ignore_value
                labels[seg] = {
                    "label": v,
                    "structure": lm[v].name if known and lm is not None and v in lm else None,
                }
            return {"z": z, "y": y, "x": x, "hu": value, "labels": labels}

        answer: dict[str, Any] = await service.run(query)
        return answer

    @app.get(f"{API}/collections/{{name}}/cases/{{case_id}}/profile")
    async def profile(
        name: str,
        case_id: str,
        structure: Annotated[str, Query(description="name or id")],
        segmentation: str | None = None,
        method: Literal["index", "scan"] = "index",
    ) -> dict[str, Any]:
        """The rows of ``case.profile(structure)``: one per axial slice holding it."""

        def query() -> pd.DataFrame:
            return service.case(name, case_id).profile(_structure(structure), segmentation, method)

        return {"items": _rows(await service.run(query))}

    @app.get(f"{API}/collections/{{name}}/cases/{{case_id}}/neuroglancer", response_model=None)
    async def open_neuroglancer(
        request: Request,
        name: str,
        case_id: str,
        window: Annotated[
            str, Query(description="first window of the image layer: preset or WIDTH,LEVEL")
        ] = "soft_tissue",
    ) -> Response:
        """Redirect to a Neuroglancer viewer of the case (Neuroglancer's own server on
        127.0.0.1, needs ``ctzarr[neuroglancer]``), its layers read through ``/zarr``."""
        try:
            win = parse_window(window)
        except ValueError as exc:
            raise Problem(422, str(exc), title="Invalid parameter") from None
        col = service.collection(name)
        zarr_url = f"{str(request.base_url).rstrip('/')}/zarr/{name}"

        def viewer() -> str:
            service.case(name, case_id)  # 404 with close matches for an unknown case
            return neuroglancer_url(col, case_id, zarr_url=zarr_url, window=(win.width, win.level))

        return RedirectResponse(await service.run(viewer), status_code=307)

    @app.api_route("/zarr/{name}/{key:path}", methods=["GET", "HEAD", "OPTIONS"])
    async def zarr_object(request: Request, name: str, key: str) -> Response:
        """The store's own bytes: exact HEAD, byte ranges, ETag, CORS."""
        files = service.files.get(name)
        if files is None:
            raise Problem(404, "no such object in this store", title="Not found")
        return await files.answer(request, key)

    return app
