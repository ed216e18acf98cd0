"""Neuroglancer on a case: its image and each label group as layers read through ``/zarr``.

The client bundled in the ``neuroglancer`` PyPI wheel is its Python integration: it reads its
state from Neuroglancer's own server (``/v/<token>/``, ``/state``, ``/events``) and cannot run
from a plain static folder, so this module starts that server (``neuroglancer.Viewer``) in a
background thread, bound to 127.0.0.1 on a port of its own, and hands out the URL of one viewer
per case. The browser then fetches the voxels from our ``/zarr/{name}/...`` (CORS ``*``, byte
ranges), never from another host: the client's scripts come from the wheel, the data from us.

:func:`neuroglancer_state` builds the viewer state as plain JSON (no ``neuroglancer`` import, so
it is tested without the extra); :func:`neuroglancer_url` applies it to a viewer and returns the
URL the service redirects to. Layers are placed by the store's own OME transforms (scale and
translation in mm, which equal the world coordinates of an axis-aligned affine).
"""

from __future__ import annotations

import json
import threading
from typing import Any

from ctzarr.extras import require
from ctzarr.read.collection import Collection

__all__ = ["neuroglancer_state", "neuroglancer_url", "stop_neuroglancer"]

#: OHIF "soft tissue" preset: the image layer's first window (width, level) in HU
SOFT_TISSUE = (400.0, 40.0)

#: rotation of the cross sections (quaternion x, y, z, w): 180 degrees about z shows the axial
#: panel in radiological convention (patient's right on the left of the screen, anterior up)
RADIOLOGICAL = [0.0, 0.0, 1.0, 0.0]

_lock = threading.Lock()
_viewers: dict[str, Any] = {}


def _hex(rgba: tuple[int, ...] | list[int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgba[:3])


def neuroglancer_state(
    collection: Collection,
    case_id: str,
    *,
    zarr_url: str,
    window: tuple[float, float] = SOFT_TISSUE,
) -> dict[str, Any]:
    """Neuroglancer viewer state (JSON) showing one case read through the service's ``/zarr``.

    Parameters
    ----------
    collection : Collection
        The collection the case belongs to.
    case_id : str
        The case; an unknown id raises :class:`~ctzarr.errors.CaseNotFoundError`.
    zarr_url : str
        Absolute URL of the collection's store as the browser reaches it, e.g.
        ``"http://127.0.0.1:8000/zarr/dap"`` (no trailing slash needed).
    window : tuple of float, optional
        Initial (width, level) of the image layer in HU; soft tissue by default.

    Returns
    -------
    dict
        The state: one ``image`` layer (the CT, level 0 and its pyramid) and one segmentation
        layer per label group, in the label colours with every present label shown; world axes
        x, y, z in mm.
    """
    case = collection[case_id]
    base = f"{zarr_url.rstrip('/')}/cases/{case_id}"
    width, level = window
    low, high = level - width / 2, level + width / 2
    layers: list[dict[str, Any]] = [
        {
            "type": "image",
            "name": "image",
            "source": f"zarr3://{base}/",
            "shader": (
                f"#uicontrol invlerp normalized(range=[{low:g}, {high:g}])\n"
                "void main() { emitGrayscale(normalized()); }\n"
            ),
        }
    ]
    for segmentation in case.segmentation_names:
        label_map = collection.segmentations[segmentation]
        present = {int(v) for v in case.index(segmentation).labels}
        colours = {
            str(lab.value): _hex(lab.rgba)
            for lab in label_map.labels
            if lab.value in present and lab.value != label_map.background
        }
        layers.append(
            {
                "type": "segmentation",
                "name": segmentation,
                "source": f"zarr3://{base}/labels/{segmentation}/",
                "segments": sorted(colours, key=int),
                "segmentColors": colours,
                "selectedAlpha": 0.45,
            }
        )
    # zoom so that the longest side of the volume fills about 400 screen pixels of a panel
    extent_mm = max(n * abs(d) for n, d in zip(case.shape, case.spacing, strict=True))
    return {
        "dimensions": {axis: [0.001, "m"] for axis in ("x", "y", "z")},
        "crossSectionScale": extent_mm / 400,
        "projectionScale": extent_mm * 1.5,
        "crossSectionOrientation": RADIOLOGICAL,
        "layers": layers,
        "selectedLayer": {"layer": "image"},
        "layout": "4panel",
    }


def neuroglancer_url(
    collection: Collection,
    case_id: str,
    *,
    zarr_url: str,
    window: tuple[float, float] = SOFT_TISSUE,
) -> str:
    """URL of a Neuroglancer viewer on one case (blocking: starts the viewer server once).

    The viewer server is Neuroglancer's own (tornado, in a daemon thread), bound to 127.0.0.1
    on a free port; one viewer per (store URL, case, window) is kept and reused.

    Parameters
    ----------
    collection, case_id, zarr_url, window
        As in :func:`neuroglancer_state`.

    Returns
    -------
    str
        ``http://127.0.0.1:PORT/v/TOKEN/``, to redirect the browser to.

    Raises
    ------
    MissingDependencyError
        The ``neuroglancer`` package is not installed (extra ``ctzarr[neuroglancer]``).
    CaseNotFoundError
        No such case.
    """
    ng = require("neuroglancer", "neuroglancer", "Open in Neuroglancer")
    state = neuroglancer_state(collection, case_id, zarr_url=zarr_url, window=window)
    key = json.dumps(state, sort_keys=True)
    with _lock:
        viewer = _viewers.get(key)
        if viewer is None:
            if not ng.server.is_server_running():
                # loopback only: the viewer server has no token check of ours
                ng.set_server_bind_address("127.0.0.1", 0)
            viewer = ng.Viewer()
            viewer.set_state(ng.ViewerState(state))
            _viewers[key] = viewer
        return str(viewer.get_viewer_url())


def stop_neuroglancer() -> None:
    """Stop Neuroglancer's server if it was started (for a prompt shutdown)."""
    with _lock:
        _viewers.clear()
        try:
            ng = require("neuroglancer", "neuroglancer", "Open in Neuroglancer")
        except ImportError:
            return
        if ng.server.is_server_running():
            ng.stop()
