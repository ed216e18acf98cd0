"""Drawing centres and reading patches: the part of a sampler that runs in DataLoader workers.

A :class:`SamplingPlan` is plain data (case ids, class values and weights, voxel counts per
class and case, patch geometry, seed) plus a :class:`~ctzarr.train.reader.StoreReader`; it
pickles small and is all a worker needs. :func:`draw_centre` turns ``(seed, epoch, index)``
into one centre, exactly:

1. one counter-based stream per sample: Philox keyed by ``seed`` and ``epoch``, its counter
   starting at ``index`` (:class:`Stream`), so a sample does not depend on which process draws
   it, in which order, or how many workers there are;
2. with probability ``foreground_ratio`` a class by weight, then one integer uniform over all
   voxels of that class in the selected cases. Its rank picks the case (cumulative voxel
   counts of the class per case, from the collection table), then the chunk (cumulative
   per-chunk counts of the index), then the voxel (the rank-th voxel of the class in the one
   label chunk read, C order). Case by count, chunk by count, voxel uniformly within the chunk
   is thus exactly uniform over the class's voxels in the cohort;
3. otherwise one integer uniform over all voxels of the selected cases (case by voxel count):
   no read at all.

Integers come from the stream's raw 64-bit words by Lemire's multiply-and-reject method
(exactly uniform; written here, not taken from ``numpy.random.Generator.integers``, so that the
draws depend on Philox's specified output alone, not on how a numpy release maps bits to
integers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from zarr.abc.store import Store

from ctzarr.errors import ChunkCorruptError
from ctzarr.train.counts import chunk_counts, writable_local_store
from ctzarr.train.reader import StoreReader

_MASK64 = (1 << 64) - 1
#: raw words fetched from Philox at a time (a sample uses 2-6)
_BLOCK = 8


class Stream:
    """The random stream of one sample: Philox-4x64 keyed by (seed, epoch), counter at index.

    Philox is counter-based: the words of sample ``i`` are a fixed function of
    ``(seed, epoch, i)`` on every machine, whatever was drawn before.
    """

    def __init__(self, seed: int, epoch: int, index: int) -> None:
        key = (seed & _MASK64) | ((epoch & _MASK64) << 64)
        # the counter's second word holds the index: sample i's blocks run [k, i, 0, 0] for
        # k = 0, 1, ... and never meet another sample's
        self._bits = np.random.Philox(key=key, counter=(index & _MASK64) << 64)
        self._words: list[int] = []

    def word(self) -> int:
        """The next raw 64-bit word."""
        if not self._words:
            self._words = [int(w) for w in self._bits.random_raw(_BLOCK)][::-1]
        return self._words.pop()

    def below(self, n: int) -> int:
        """An integer uniform in ``[0, n)`` (Lemire 2019, exact: biased products rejected)."""
        if n <= 0:
            raise ValueError(f"no integer below {n}")
        threshold = ((1 << 64) - n) % n
        while True:
            product = self.word() * n
            if (product & _MASK64) >= threshold:
                return product >> 64

    def unit(self) -> float:
        """A float uniform in ``[0, 1)`` (53 random bits)."""
        return (self.word() >> 11) * 2.0**-53


@dataclass(frozen=True)
class Centre:
    """One drawn centre: ``voxel`` is level 0, ``level_voxel`` the voxel of the sampling level
    that holds it; ``label`` -1 (structure "") for a centre drawn over all voxels."""

    case_id: str
    label: int
    structure: str
    voxel: tuple[int, int, int]
    level_voxel: tuple[int, int, int]


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a worker needs to draw centres and read patches (picklable, small)."""

    reader: StoreReader
    segmentation: str
    case_ids: tuple[str, ...]
    #: label values of the classes, and their names
    classes: tuple[int, ...]
    class_names: tuple[str, ...]
    #: cumulative class probabilities (last = 1)
    class_cdf: tuple[float, ...]
    #: per class, cumulative voxel counts over case_ids (shape (K, C))
    class_case_cumsum: np.ndarray
    #: cumulative voxel counts of the cases (None when foreground_ratio == 1: never needed)
    case_voxels_cumsum: np.ndarray | None
    foreground_ratio: float
    patch_size: tuple[int, int, int]
    level: int
    image_pad: float
    label_pad: int
    seed: int
    #: where first-use counts of an older store are cached (None: not writable, kept in memory)
    cache_url: str | None = None

    def cache_store(self) -> Store | None:
        return None if self.cache_url is None else writable_local_store(self.cache_url)


def draw_centre(plan: SamplingPlan, epoch: int, index: int) -> Centre:
    """Centre ``index`` of ``epoch`` (see the module's notes). Reads at most one label chunk."""
    stream = Stream(plan.seed, epoch, index)
    foreground = stream.unit() < plan.foreground_ratio
    if foreground:
        k = min(
            int(np.searchsorted(plan.class_cdf, stream.unit(), side="right")), len(plan.classes) - 1
        )
        cumsum = plan.class_case_cumsum[k]
        rank = stream.below(int(cumsum[-1]))
        c = int(np.searchsorted(cumsum, rank, side="right"))
        rank -= int(cumsum[c - 1]) if c else 0
        case_id, label = plan.case_ids[c], plan.classes[k]
        voxel = _class_voxel(plan, case_id, label, rank)
        structure = plan.class_names[k]
    else:
        assert plan.case_voxels_cumsum is not None
        cumsum = plan.case_voxels_cumsum
        rank = stream.below(int(cumsum[-1]))
        c = int(np.searchsorted(cumsum, rank, side="right"))
        rank -= int(cumsum[c - 1]) if c else 0
        case_id, label, structure = plan.case_ids[c], -1, ""
        shape = plan.reader.case(case_id).shape
        z, y, x = np.unravel_index(rank, shape)
        voxel = (int(z), int(y), int(x))
    f = plan.level
    level_voxel = (voxel[0] >> f, voxel[1] >> f, voxel[2] >> f)
    return Centre(case_id, label, structure, voxel, level_voxel)


def _class_voxel(plan: SamplingPlan, case_id: str, label: int, rank: int) -> tuple[int, int, int]:
    """The rank-th voxel of a label in a case: chunk by cumulative per-chunk counts, then the
    voxel within the one label chunk read."""
    reader = plan.reader
    case = reader.case(case_id)
    table = case.index_chunks(plan.segmentation)
    if table.counts is None:  # a store older than format 3: counted once per process, cached
        table = chunk_counts(case, plan.segmentation, reader.store, plan.cache_store())
    i = table.position(label)
    assert table.counts is not None
    if i is None or int(table.voxel_count[i]) <= rank:
        raise ChunkCorruptError(
            f"{case.where}: the index of {plan.segmentation!r} holds "
            f"{0 if i is None else int(table.voxel_count[i])} voxels of label {label}, the "
            f"collection table more (rank {rank}): the table and the case disagree"
        )
    cumsum = np.cumsum(table.counts[i])
    j = int(np.searchsorted(cumsum, rank, side="right"))
    rank -= int(cumsum[j - 1]) if j else 0
    chunk_id = int(table.chunk_ids[i][j])
    chunk = reader.label_chunk(case_id, plan.segmentation, chunk_id)
    hits = np.flatnonzero(chunk == label)
    if len(hits) != int(table.counts[i][j]):
        raise ChunkCorruptError(
            f"{case.where}: label chunk {chunk_id} of {plan.segmentation!r} holds {len(hits)} "
            f"voxels of label {label}, the per-chunk counts ({table.source}) say "
            f"{int(table.counts[i][j])}"
        )
    dz, dy, dx = np.unravel_index(int(hits[rank]), chunk.shape)
    box = table.chunk_box(chunk_id)
    return (box[0].start + int(dz), box[1].start + int(dy), box[2].start + int(dx))


def read_sample(plan: SamplingPlan, epoch: int, index: int) -> dict[str, Any]:
    """Sample ``index`` of ``epoch``: the patch around its centre, and where it lies."""
    centre = draw_centre(plan, epoch, index)
    case = plan.reader.case(centre.case_id)
    half = [s // 2 for s in plan.patch_size]
    origin = tuple(v - h for v, h in zip(centre.level_voxel, half, strict=True))
    image, labels = case.read_patch(
        plan.segmentation, plan.level, origin, plan.patch_size, plan.image_pad, plan.label_pad
    )
    shift = np.eye(4)
    shift[:3, 3] = [origin[2], origin[1], origin[0]]  # NIfTI voxel order (i, j, k) = (x, y, z)
    return {
        "image": image,
        "labels": labels,
        "case_id": centre.case_id,
        "label": centre.label,
        "structure": centre.structure,
        "centre": np.array(centre.level_voxel, np.int64),
        "origin": np.array(origin, np.int64),
        "affine": case.level_affine(plan.level) @ shift,
    }


def check_index(value: Any, what: str) -> int:
    """A whole number in [0, 2**64) (an epoch or a sample index)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{what} must be a whole number >= 0, got {value!r}")
    if not 0 <= int(value) < 2**64:
        raise ValueError(f"{what} must be from 0 to 2**64 - 1, got {value}")
    return int(value)


class PatchDataset:
    """A map-style dataset of ``length`` patches of a :class:`~ctzarr.PatchSampler`.

    ``len(ds)``, ``ds[i]`` (the dict of :meth:`PatchSampler.sample`), ``ds.set_epoch(e)``.
    Picklable (the plan and epoch only); each process opens its own store on first use, so
    ``torch.utils.data.DataLoader(ds, num_workers=k)`` works with fork, spawn or forkserver
    workers, and gives the same batches for any ``k``. Call ``set_epoch`` before each epoch
    (with persistent workers, through a ``worker_init_fn`` or a fresh DataLoader).
    """

    def __init__(self, plan: SamplingPlan, length: int, epoch: int = 0) -> None:
        self.plan = plan
        self.length = check_index(length, "length")
        self.epoch = check_index(epoch, "epoch")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
            i = int(index)
            if -self.length <= i < self.length:
                return read_sample(self.plan, self.epoch, i % self.length)
            raise IndexError(f"patch index {i} out of range for a dataset of {self.length}")
        raise TypeError(f"patch indices are integers, got {type(index).__name__}")

    def set_epoch(self, epoch: int) -> None:
        """Draw the patches of another epoch (the same epoch gives the same patches)."""
        self.epoch = check_index(epoch, "epoch")

    def __repr__(self) -> str:
        return (
            f"<ctzarr.PatchDataset {self.length} patches of {self.plan.patch_size} (level "
            f"{self.plan.level}), epoch {self.epoch}, {len(self.plan.classes)} classes>"
        )
