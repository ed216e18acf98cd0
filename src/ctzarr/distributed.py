"""How work runs on a Dask distributed cluster: one task per case, credentials resolved on the
workers.

Tasks carry URLs, case specs and label maps only. Storage options that hold secrets are refused
when a cluster is used (they would be pickled into the task graph); workers find credentials
where the I/O happens: environment variables, profiles, instance roles.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import CtzarrError

__all__ = ["SECRET_OPTION_NAMES", "check_no_secrets", "start_local_cluster"]

logger = logging.getLogger(__name__)

#: storage option names that carry credentials (s3fs, gcsfs, adlfs, fsspec http auth)
SECRET_OPTION_NAMES = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "access_key",
        "secret_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "client_secret",
        "credentials",
        "auth",
        "headers",
    }
)


def _secret_paths(options: Any, prefix: str = "") -> list[str]:
    found = []
    if isinstance(options, Mapping):
        for k, v in options.items():
            path = f"{prefix}{k}"
            if str(k).lower() in SECRET_OPTION_NAMES:
                found.append(path)
            else:
                found += _secret_paths(v, path + ".")
    return found


def check_no_secrets(storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the options if they carry no credentials; raise (naming only the keys) if they do."""
    found = _secret_paths(storage_options or {})
    if found:
        raise CtzarrError(
            f"storage_options carry credentials ({', '.join(sorted(found))}); with a cluster they would "
            "travel inside the task graph. Give the workers credentials through their environment "
            "(e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), a profile or an instance role"
        )
    return dict(storage_options or {})


def start_local_cluster(n_workers: int) -> Any:
    """Start a local cluster of worker processes (one thread each) and return its client."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    )
    client = Client(cluster)
    print(f"dask dashboard: {client.dashboard_link}")
    return client


def connect(address: str) -> Any:
    """Client of a running scheduler."""
    from distributed import Client

    client = Client(address)
    print(f"dask dashboard: {client.dashboard_link}")
    return client


def _convert_task(
    spec: Any, ds: Any, dest: str, dest_options: dict[str, Any], overwrite: bool
) -> Any:
    """Worker side: open the store from its URL and convert one case."""
    import zarr

    from .convert import convert_case
    from .storage import make_store

    store = make_store(dest, storage_options=dest_options or None)
    root = zarr.open_group(store, mode="r+", zarr_format=3)
    return convert_case(root, ds, spec, overwrite=overwrite)


def convert_cases_on_cluster(
    client: Any,
    ds: Any,
    specs: Sequence[Any],
    dest: str,
    dest_options: Mapping[str, Any] | None,
    overwrite: bool,
    progress: bool,
) -> list[Any]:
    """Convert cases as one task each; a task that keeps killing workers fails its case only."""
    from dataclasses import replace

    from distributed import as_completed

    from .convert import CaseResult

    dest_opts = check_no_secrets(dest_options)
    src_opts = check_no_secrets(ds.storage_options)
    ds = replace(ds, storage_options=src_opts)
    futures = {
        client.submit(
            _convert_task,
            spec,
            ds,
            dest,
            dest_opts,
            overwrite,
            pure=False,
            key=f"ctzarr-convert-{spec.case_id}-{uuid.uuid4().hex}",
        ): spec.case_id
        for spec in specs
    }
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(futures), unit="case", desc="convert (cluster)", leave=False)
    results: dict[str, Any] = {}
    try:
        for fut in as_completed(list(futures)):
            cid = futures[fut]
            try:
                results[cid] = fut.result()
            except Exception as exc:  # KilledWorker and the like: this case only
                logger.warning("case %s failed on the cluster: %s", cid, exc)
                results[cid] = CaseResult(cid, "failed", error=f"{type(exc).__name__}: {exc}")
            if bar:
                bar.update(1)
    finally:
        if bar:
            bar.close()
    return [results[s.case_id] for s in specs]


def _scan_task(url: str, options: dict[str, Any], case_id: str, segmentation: str) -> Any:
    """Worker side: rebuild one case's index from its voxels (blockwise, local threads)."""
    import dask
    from distributed import get_worker

    from .collection import open_collection
    from .stats import scan_index_graph

    col = open_collection(url, storage_options=options or None)
    graph = scan_index_graph(col[case_id], segmentation)
    # use the threads the worker was given, not every core of the machine (oversubscription
    # cost 35 % per case with two 1-thread workers on 2 cores, benchmarks/CLOUD.md)
    nthreads = get_worker().state.nthreads
    if nthreads <= 1:
        (idx,) = dask.compute(graph, scheduler="sync")
    else:
        (idx,) = dask.compute(graph, scheduler="threads", num_workers=nthreads)
    return idx


def scan_on_cluster(
    client: Any, url: str, options: Mapping[str, Any] | None, jobs: Sequence[tuple[str, str]]
) -> list[Any]:
    """Scan indexes of (case, segmentation) pairs, one task each."""
    opts = check_no_secrets(options)
    futures = [client.submit(_scan_task, url, opts, cid, seg, pure=False) for cid, seg in jobs]
    return list(client.gather(futures))
