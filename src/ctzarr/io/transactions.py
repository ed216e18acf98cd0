"""Case transactions in a store: a case is visible only once complete.

The state of a case (absent, partial, complete), removal of leftovers, the staging area where
``--overwrite`` builds a replacement beside the committed case, and the swap that puts it in
place (an atomic directory exchange on local disks, marker-last copy on object stores).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ctzarr.errors import MetadataError
from ctzarr.io.locks import COLLECTION_LOCK, lock_is_stale, read_lock, unwrap_store
from ctzarr.io.stores import read_key, write_key
from ctzarr.model.case import CaseAttributes, is_committed, without_commit_marker

logger = logging.getLogger(__name__)


def case_state(root: zarr.Group, case_id: str) -> tuple[str, CaseAttributes | None]:
    """("absent" | "partial" | "complete", attributes) of a case in the store.

    A committed case whose attributes do not parse is "complete" with None: it is not a
    leftover to remove, and opening it names the key at fault.
    """
    try:
        grp = zarr.open_group(root.store, path=f"cases/{case_id}", mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        if sync(root.store.exists(f"cases/{case_id}/0/zarr.json")) or _has_keys(
            root, f"cases/{case_id}/"
        ):
            return "partial", None
        return "absent", None
    except (ValueError, TypeError, RecursionError) as exc:  # unreadable: never a leftover
        logger.warning("case %s: its zarr.json is unreadable: %s", case_id, type(exc).__name__)
        return "complete", None
    attributes = grp.attrs.asdict()
    if not is_committed(attributes):
        return "partial", None
    try:
        return "complete", CaseAttributes.from_attributes(attributes, f"case {case_id!r}")
    except MetadataError as exc:
        logger.warning("case %s: committed, but its attributes are malformed: %s", case_id, exc)
        return "complete", None


def _has_keys(root: zarr.Group, prefix: str) -> bool:
    async def first() -> bool:
        async for _ in root.store.list_prefix(prefix):
            return True
        return False

    return sync(first())


#: where replacements of committed cases are built (``--overwrite``)
STAGING = "staging"


def remove_staging(root: zarr.Group, case_id: str) -> list[str]:
    """Delete leftover staging groups of a case (an interrupted replacement); return them."""

    async def find() -> list[str]:
        found = set()
        async for key in root.store.list_prefix(f"{STAGING}/"):
            name = key[len(STAGING) + 1 :].split("/", 1)[0]
            if name.rpartition("-")[0] == case_id:
                found.add(f"{STAGING}/{name}")
        return sorted(found)

    if not root.store.supports_listing:
        return []
    leftovers = sync(find())
    for path in leftovers:
        sync(root.store.delete_dir(path))
    if leftovers:
        _drop_empty_staging(root.store)
    return leftovers


def swap_in(root: zarr.Group, staged: str, case_id: str) -> None:
    """Put a committed replacement in place of the case.

    Local stores: one atomic ``renameat2(RENAME_EXCHANGE)`` of the two directories (readers see
    the old case or the new one, never a mix), then the old one is deleted. Object stores have no
    rename: the old case is first marked incomplete (its ``zarr.json`` rewritten without the
    commit marker), then the new objects are copied over it and the new ``zarr.json`` (marker
    and manifest) written last. During the copy the case reads as incomplete; a failure or a
    kill in it leaves an incomplete case, which the next run removes and converts again: never
    a mix of old and new objects under either manifest. A reader that opened the old case
    before the swap gets an integrity error from its manifest, never mixed voxels.
    """
    store = root.store
    target = f"cases/{case_id}"
    if isinstance(store, LocalStore):
        new, old = Path(store.root) / staged, Path(store.root) / target
        if not _exchange(new, old):
            trash = old.with_name(f".{old.name}.old")
            old.rename(trash)
            new.rename(old)
            new = trash
        shutil.rmtree(new)
        _drop_empty_staging(store)
        return

    async def keys(prefix: str) -> list[str]:
        return [k async for k in store.list_prefix(prefix)]

    proto = default_buffer_prototype()
    new_keys = sync(keys(f"{staged}/"))
    rel = [k[len(staged) + 1 :] for k in new_keys]
    marker = "zarr.json"
    _mark_incomplete(store, f"{target}/{marker}")
    for r in sorted(rel, key=lambda k: k == marker):  # the case's zarr.json last
        if r == marker:
            for stale in {k[len(target) + 1 :] for k in sync(keys(f"{target}/"))} - set(rel):
                sync(store.delete(f"{target}/{stale}"))
        buf = sync(store.get(f"{staged}/{r}", prototype=proto))
        assert buf is not None
        sync(store.set(f"{target}/{r}", buf))
    sync(store.delete_dir(staged))
    _drop_empty_staging(store)


def _mark_incomplete(store: Any, key: str) -> None:
    """Rewrite a case's ``zarr.json`` with ``ctzarr.complete = false`` (the case disappears)."""
    raw = read_key(store, key)
    if raw is None:
        return
    doc = json.loads(raw)
    doc["attributes"] = without_commit_marker(doc.get("attributes") or {})
    write_key(store, key, json.dumps(doc, separators=(",", ":")).encode())


def discard_staged(root: zarr.Group, staged: str) -> None:
    """Delete a staged replacement that will not be swapped in (its conversion failed)."""
    sync(root.store.delete_dir(staged))
    _drop_empty_staging(root.store)


def _drop_empty_staging(store: Any) -> None:
    """Remove ``staging/`` once no replacement is in it.

    zarr wrote ``staging/zarr.json`` (an implicit parent group) when a staged case was
    created; left behind, every ``--overwrite`` would leave an empty group at the root.
    """

    async def rest() -> list[str]:
        return [k async for k in store.list_prefix(f"{STAGING}/")]

    if not store.supports_listing:
        return
    if set(sync(rest())) <= {f"{STAGING}/zarr.json"}:
        with contextlib.suppress(FileNotFoundError):
            sync(store.delete(f"{STAGING}/zarr.json"))
        if (local := unwrap_store(store, LocalStore)) is not None:
            with contextlib.suppress(OSError):  # a replacement started meanwhile
                (Path(local.root) / STAGING).rmdir()


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two directories (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def temporary_leftovers(store: Any) -> list[str]:
    """Temporary files of interrupted writes: zarr's LocalStore writes ``<key>.<hex>.partial``
    and renames it, so a kill in between leaves one. Empty while any case is being converted
    (a live case lock): its temporary files are not leftovers."""
    if not store.supports_listing:
        return []

    async def keys() -> list[str]:
        return [k async for k in store.list_prefix("")]

    found = sync(keys())
    for key in found:
        if key.startswith("locks/") and key.endswith(".json"):
            cid = key[len("locks/") : -len(".json")]
            rec = read_lock(store, cid)
            if cid != COLLECTION_LOCK and rec is not None and not lock_is_stale(rec):
                return []
    return sorted(k for k in found if k.endswith(".partial"))


def remove_temporary_files(store: Any) -> list[str]:
    """Delete the temporary files of interrupted writes (see :func:`temporary_leftovers`)."""
    leftovers = temporary_leftovers(store)
    for key in leftovers:
        with contextlib.suppress(FileNotFoundError):
            sync(store.delete(key))
    return leftovers


def remove_case(root: zarr.Group, case_id: str) -> None:
    """Delete every key of a case (leftovers of an interrupted run, a replaced case, or a case
    whose conversion failed).

    When a write fails inside a zarr call that writes several documents at once (an array's
    metadata and its parent groups'), zarr raises at the first failure while the other writes
    of that call still run; a directory they write into while it is removed is not empty
    ("Directory not empty"), loses a temporary file under the removal's feet ("No such
    file"), or gets a file back. The removal is then repeated once those writes have landed
    (a few milliseconds; at most 5 tries).
    """
    prefix = f"cases/{case_id}"
    for attempt in range(5):
        try:
            sync(root.store.delete_dir(prefix))
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.ENOENT) or attempt == 4:
                raise
        time.sleep(0.02 * (attempt + 1))  # a write still landing shows up by now
        if not _has_keys(root, prefix + "/"):
            return
    raise OSError(errno.ENOTEMPTY, f"{prefix}: keys keep appearing while the case is removed")
