"""``ctzarr.PatchSampler``: class-balanced training patches drawn exactly from the index.

The sampler is built in the main process from the collection table (one small read: voxel
counts of every label in every case); it scans nothing. A centre reads one label chunk (cached
per process), a patch the chunks its box touches. The worker side (drawing, reading) lives in
:mod:`ctzarr.train.patches` and :mod:`ctzarr.train.reader`, which import neither dask, xarray
nor pandas. See DESIGN.md "Training patches" and :mod:`ctzarr.train.patches` for the exact
draw.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ctzarr.errors import CaseNotFoundError, SegmentationNotFoundError, StructureNotFoundError
from ctzarr.io.urls import is_remote
from ctzarr.model.labels import Label, LabelMap
from ctzarr.model.layout import MAX_LEVELS
from ctzarr.read.collection import Collection
from ctzarr.train.counts import writable_local_store
from ctzarr.train.patches import (
    PatchDataset,
    SamplingPlan,
    check_index,
    draw_centre,
    read_sample,
)
from ctzarr.train.reader import StoreReader

#: image padding outside the volume when no pad_value is given: air in HU
DEFAULT_PAD_VALUE = -1024.0

CENTRE_COLUMNS = ("case_id", "label", "structure", "z", "y", "x")


def _patch_size(value: Any) -> tuple[int, int, int]:
    sizes = (value,) * 3 if isinstance(value, (int, np.integer)) else value
    try:
        out = tuple(sizes)
    except TypeError:
        out = ()
    if (
        len(out) != 3
        or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) for s in out)
        or any(int(s) < 1 for s in out)
    ):
        raise ValueError(f"patch_size must be 3 whole numbers >= 1 (z, y, x), got {value!r}")
    return (int(out[0]), int(out[1]), int(out[2]))


class PatchSampler:
    """Training patches centred on voxels of each class, drawn exactly from the index.

    Parameters
    ----------
    collection : Collection
        An open collection (:func:`ctzarr.open_collection`): a local path, s3:// or https://.
    patch_size : int or tuple of 3 int
        Patch shape (z, y, x) in voxels of ``level``.
    segmentation : str, optional
        Segmentation whose labels are the classes (default: the only one).
    classes : None, list or dict, optional
        None: every label present in the selected cases except background and the ignore
        value, equally weighted (labels of the map with no voxel are skipped and listed in
        :attr:`skipped_classes`); a list of names or ids restricts to those; a dict name/id ->
        weight gives relative weights (0 leaves a class out). A named class with no voxel in
        the selected cases is an error naming it; an unknown name lists close matches.
    foreground_ratio : float
        Probability that a centre is drawn from a class; otherwise it is uniform over all
        voxels of the selected cases.
    cases : list of str, optional
        Case ids to draw from (default: all).
    seed : int
        Key of the random stream, with the epoch and the sample index.
    pad_value : float, optional
        Image value outside the volume (default -1024, air in HU); labels are padded with 0, or
        with the ignore value for sparse maps (SAROS: 255).
    level : int
        Pyramid level of the patches; a centre is the level-L voxel holding the level-0 voxel
        drawn.

    Notes
    -----
    Guarantees: a centre of class c is uniform over all voxels of c in the selected cases
    (case by its voxel count of c, chunk by its count in the index, voxel uniformly within the
    one label chunk read); the same ``(seed, epoch, i)`` gives the same patch on any machine
    with any number of workers; ``centres(n, epoch)`` row i is the centre of
    ``sample(i, epoch)``; patches equal numpy slicing of nibabel's arrays, padded outside.
    Stores older than format 3 get per-chunk counts from one pass over a case's label chunks
    the first time a process needs them, cached in the store when it is a writable local
    directory (``ctzarr reindex`` caches them for any store, ahead of time).
    """

    def __init__(
        self,
        collection: Collection,
        patch_size: int | Sequence[int] = (96, 160, 160),
        segmentation: str | None = None,
        classes: Sequence[str | int] | Mapping[str | int, float] | None = None,
        foreground_ratio: float = 1.0,
        cases: Sequence[str] | None = None,
        seed: int = 0,
        pad_value: float | None = None,
        level: int = 0,
    ) -> None:
        if not isinstance(collection, Collection):
            raise TypeError(
                f"PatchSampler takes an open collection (ctzarr.open_collection(...)), got "
                f"{type(collection).__name__}"
            )
        size = _patch_size(patch_size)
        if isinstance(foreground_ratio, bool) or not isinstance(
            foreground_ratio, (int, float, np.integer, np.floating)
        ):
            raise ValueError(
                f"foreground_ratio must be a number from 0 to 1, got {foreground_ratio!r}"
            )
        ratio = float(foreground_ratio)
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"foreground_ratio must be from 0 to 1, got {foreground_ratio!r}")
        seed_ = check_index(seed, "seed")
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)):
            raise ValueError(
                f"level must be a whole number from 0 to {MAX_LEVELS - 1}, got {level!r}"
            )
        if not 0 <= int(level) < MAX_LEVELS:
            raise ValueError(f"level must be from 0 to {MAX_LEVELS - 1}, got {level}")
        pad = DEFAULT_PAD_VALUE if pad_value is None else pad_value
        if isinstance(pad, bool) or not isinstance(pad, (int, float, np.integer, np.floating)):
            raise ValueError(f"pad_value must be a number, got {pad_value!r}")
        if not math.isfinite(float(pad)):
            raise ValueError(f"pad_value must be finite, got {pad_value!r}")

        self.collection = collection
        seg = self._segmentation(segmentation)
        label_map = collection.segmentations[seg]
        case_ids = self._cases(cases)
        table = collection.table()
        table = table[(table["segmentation"] == seg) & table["case_id"].isin(case_ids)]
        counts = (
            table.pivot_table(index="label", columns="case_id", values="voxel_count", aggfunc="sum")
            .reindex(columns=list(case_ids))
            .fillna(0)
            .astype(np.int64)
        )
        chosen, weights, self.skipped_classes = self._classes(classes, label_map, counts, ratio)
        class_counts = np.array(
            [counts.loc[label.value].to_numpy() for label in chosen], np.int64
        ).reshape(len(chosen), len(case_ids))

        url = collection.url
        reopen = is_remote(url) or Path(url).exists()
        reader = StoreReader(
            url,
            collection.storage_options,
            store=None if reopen else collection.root.store,
        )
        cache_url = url if reopen and writable_local_store(url) is not None else None
        case_voxels = None
        if ratio < 1.0:
            case_voxels = np.cumsum(self._case_voxels(reader, case_ids, seg))
        total = float(sum(weights)) if weights else 1.0
        self.plan = SamplingPlan(
            reader=reader,
            segmentation=seg,
            case_ids=tuple(case_ids),
            classes=tuple(label.value for label in chosen),
            class_names=tuple(label.name for label in chosen),
            class_cdf=tuple(float(x) for x in np.cumsum(np.array(weights, float) / total)),
            class_case_cumsum=np.cumsum(class_counts, axis=1),
            case_voxels_cumsum=case_voxels,
            foreground_ratio=ratio,
            patch_size=size,
            level=int(level),
            image_pad=float(pad),
            label_pad=0 if label_map.ignore_value is None else int(label_map.ignore_value),
            seed=seed_,
            cache_url=cache_url,
        )
        self._weights = tuple(w / total for w in weights)
        self._class_counts = class_counts

    # -- construction helpers --------------------------------------------------------------
    def _segmentation(self, segmentation: str | None) -> str:
        names = list(self.collection.segmentations)
        if segmentation is None:
            if len(names) != 1:
                raise SegmentationNotFoundError(
                    f"{self.collection.url} has segmentations {names}: name one"
                )
            return names[0]
        if segmentation not in names:
            raise SegmentationNotFoundError(
                f"{self.collection.url} has no segmentation {segmentation!r}; it has {names}"
            )
        return segmentation

    def _cases(self, cases: Sequence[str] | None) -> list[str]:
        known = self.collection.case_ids
        if cases is None:
            if not known:
                raise ValueError(f"{self.collection.url} has no case to draw patches from")
            return list(known)
        if isinstance(cases, str):
            raise ValueError(f"cases must be a list of case ids, got the string {cases!r}")
        wanted = list(cases)
        if not wanted:
            raise ValueError("cases is empty: give at least one case id, or None for all")
        if len(set(wanted)) != len(wanted):
            raise ValueError(f"cases lists a case more than once: {wanted}")
        missing = [c for c in wanted if c not in known]
        if missing:
            raise CaseNotFoundError(
                f"no case {missing[0]!r} in {self.collection.url}; cases: {known[:10]}"
            )
        return wanted

    @staticmethod
    def _classes(
        classes: Sequence[str | int] | Mapping[str | int, float] | None,
        label_map: LabelMap,
        counts: pd.DataFrame,
        ratio: float,
    ) -> tuple[list[Label], list[float], list[str]]:
        excluded = {label_map.background, label_map.ignore_value}
        present = {int(v) for v, n in zip(counts.index, counts.sum(axis=1), strict=True) if n > 0}
        if classes is None:
            every = [label for label in label_map if label.value not in excluded]
            chosen = [label for label in every if label.value in present]
            skipped = [label.name for label in every if label.value not in present]
            return chosen, [1.0] * len(chosen), skipped
        if isinstance(classes, (str, bytes)):
            raise ValueError(
                f"classes must be a list or a dict of names, got the string {classes!r}"
            )
        if isinstance(classes, Mapping):
            items = list(classes.items())
        else:
            items = [(name, 1.0) for name in classes]
        if not items:
            raise ValueError("classes is empty: give at least one class, or None for all")
        chosen, weights, seen = [], [], set()
        for name, weight in items:
            label = label_map.resolve(name)  # unknown: StructureNotFoundError with close matches
            if label.value in excluded:
                raise ValueError(
                    f"class {name!r} is the {'background' if label.value == label_map.background else 'ignore value'} "
                    f"of segmentation {label_map.name!r}: not a class to sample"
                )
            if label.value in seen:
                raise ValueError(f"class {label.name!r} is named more than once in classes")
            seen.add(label.value)
            if isinstance(weight, bool) or not isinstance(
                weight, (int, float, np.integer, np.floating)
            ):
                raise ValueError(
                    f"the weight of class {label.name!r} must be a number, got {weight!r}"
                )
            if not math.isfinite(float(weight)) or float(weight) < 0:
                raise ValueError(
                    f"the weight of class {label.name!r} must be a finite number >= 0, got {weight!r}"
                )
            if float(weight) == 0:
                continue
            if label.value not in present:
                raise StructureNotFoundError(
                    f"class {label.name!r} (label {label.value}) has no voxel in the selected "
                    f"cases of segmentation {label_map.name!r}"
                )
            chosen.append(label)
            weights.append(float(weight))
        if not chosen and ratio > 0:
            raise ValueError("every class weight is 0: give at least one class a weight > 0")
        return chosen, weights, []

    @staticmethod
    def _case_voxels(reader: StoreReader, case_ids: Sequence[str], segmentation: str) -> np.ndarray:
        """Voxel count of every case (one metadata read each, in parallel for remote stores)."""

        def size(case_id: str) -> int:
            case = reader.case(case_id)
            if segmentation not in case.meta.segmentations:
                raise SegmentationNotFoundError(
                    f"case {case_id!r} has no segmentation {segmentation!r} to draw patches "
                    f"from; it has {list(case.meta.segmentations)} (leave it out with cases=)"
                )
            return math.prod(case.shape)

        workers = 1 if not is_remote(reader.url) else min(16, max(1, len(case_ids)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return np.array(list(pool.map(size, case_ids)), np.int64)

    # -- public surface ---------------------------------------------------------------------
    def __repr__(self) -> str:
        p = self.plan
        return (
            f"<ctzarr.PatchSampler {len(p.case_ids)} cases, {len(p.classes)} classes of "
            f"{p.segmentation!r}, patch {p.patch_size} at level {p.level}, foreground_ratio "
            f"{p.foreground_ratio}, seed {p.seed}>"
        )

    @property
    def classes(self) -> pd.DataFrame:
        """The classes drawn from: label, structure, weight (normalised), voxel_count (in the
        selected cases) and cases (how many hold it)."""
        p = self.plan
        return pd.DataFrame(
            {
                "label": list(p.classes),
                "structure": list(p.class_names),
                "weight": list(self._weights),
                "voxel_count": self._class_counts.sum(axis=1),
                "cases": (self._class_counts > 0).sum(axis=1),
            }
        )

    def centres(self, n: int, epoch: int = 0) -> pd.DataFrame:
        """The centres of samples ``0 .. n-1`` of an epoch.

        Returns
        -------
        pandas.DataFrame
            case_id, label, structure, z, y, x (voxel of ``level``); row i is the centre of
            ``sample(i, epoch)``. A centre drawn over all voxels (``foreground_ratio`` < 1) has
            label -1 and structure "".
        """
        count = check_index(n, "n")
        ep = check_index(epoch, "epoch")
        rows = [draw_centre(self.plan, ep, i) for i in range(count)]
        return pd.DataFrame(
            {
                "case_id": [r.case_id for r in rows],
                "label": np.array([r.label for r in rows], np.int64),
                "structure": [r.structure for r in rows],
                "z": np.array([r.level_voxel[0] for r in rows], np.int64),
                "y": np.array([r.level_voxel[1] for r in rows], np.int64),
                "x": np.array([r.level_voxel[2] for r in rows], np.int64),
            },
            columns=list(CENTRE_COLUMNS),
        )

    def sample(self, i: int, epoch: int = 0) -> dict[str, Any]:
        """Sample ``i`` of an epoch.

        Returns
        -------
        dict
            ``image`` and ``labels`` (numpy, ``patch_size``; image values as nibabel returns
            them), ``case_id``, ``label`` and ``structure`` of the centre, ``centre`` and
            ``origin`` (level voxels (z, y, x) of the centre and of ``patch[0, 0, 0]``, which
            may lie outside the volume), ``affine`` (the patch's NIfTI affine).
        """
        return read_sample(self.plan, check_index(epoch, "epoch"), check_index(i, "i"))

    def dataset(self, length: int, epoch: int = 0) -> PatchDataset:
        """A map-style dataset of ``length`` samples (see :class:`~ctzarr.train.patches.PatchDataset`)."""
        return PatchDataset(self.plan, length, epoch)
