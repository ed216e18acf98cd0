"""gs:// both ways: convert to and read from Google Cloud Storage, here a real GCS JSON-API
server on 127.0.0.1 (``gcp-storage-emulator``, in memory, ephemeral port) reached by gcsfs.

gcsfs 2026.10 probes a bucket's type over gRPC first (its "experimental ZB/HNS support"), which
an emulator cannot answer (a 60 s timeout per filesystem); the variable below selects its plain
JSON-API filesystem, the one every GCS bucket supports. It must be set before gcsfs is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas.testing as pdt
import pytest

import ctzarr

from .servers import unused_port
from .test_remote import assert_same_collection

gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")

BUCKET = "ctzarr-gcs"


@pytest.fixture(scope="module")
def gcs_options() -> Iterator[dict[str, Any]]:
    """Storage options for the emulator (anonymous, as for a public bucket)."""
    logging.getLogger("gcp_storage_emulator").setLevel(logging.WARNING)
    port = unused_port()
    server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    try:
        yield {
            "endpoint_url": f"http://127.0.0.1:{port}",
            "token": "anon",
            "project": "ctzarr-test",
        }
    finally:
        with contextlib.suppress(Exception):
            server.stop()


@pytest.fixture(scope="module")
def gcs_collection(gcs_options: dict[str, Any], dap_source: Path) -> tuple[str, list[str]]:
    url = f"gs://{BUCKET}/dap.zarr"
    cases = sorted(p.name[: -len(".nii.gz")] for p in (dap_source / "images").iterdir())[:2]
    report = ctzarr.convert(
        dap_source, url, storage_options=gcs_options, cases=cases, progress=False
    )
    assert report.ok, report
    assert sorted(report.converted) == cases
    return url, cases


def test_convert_to_gcs_and_read_back_equal_to_local(
    gcs_collection: tuple[str, list[str]], gcs_options: dict[str, Any], dap_store: Path
) -> None:
    url, cases = gcs_collection
    col = ctzarr.open_collection(url, storage_options=gcs_options)
    ref = ctzarr.open_collection(dap_store)
    assert_same_collection(col, ref, cases)
    pdt.assert_frame_equal(col.stats(), ref.stats(cases=cases), check_exact=True)
    pdt.assert_frame_equal(col.stats(method="scan"), ref.stats(cases=cases), check_exact=True)
    crop, want = col[cases[0]].crop("liver", margin_mm=3), ref[cases[0]].crop("liver", margin_mm=3)
    assert crop.attrs["box_zyx"] == want.attrs["box_zyx"]
    assert (crop.image.values == want.image.values).all()


def test_rerun_into_gcs_resumes(
    gcs_collection: tuple[str, list[str]], gcs_options: dict[str, Any], dap_source: Path
) -> None:
    url, cases = gcs_collection
    again = ctzarr.convert(
        dap_source, url, storage_options=gcs_options, cases=cases, progress=False
    )
    assert again.ok, again
    assert sorted(again.skipped) == cases
    assert again.converted == []
