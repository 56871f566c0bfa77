"""The input pipeline: uint8 batches of one rank's shard, in an order that is a pure function of (seed, step).

Two paths sit behind one interface (:class:`InputPipeline`), and they produce *identical* batches:

- **in memory** (:class:`InMemoryBatches`): the split is one decoded uint8 tensor (possibly a
  memory-mapped decode cache) and a batch is ``images[indices]``: nothing is faster when it fits;
- **streaming** (:class:`StreamingBatches`): DataLoader workers call ``source.read(i)`` for the items
  of each batch, so peak memory is a few batches (``workers × prefetch_factor``), independent of the
  dataset's size: the path for sets that do not fit in memory.

Which items form the batch of step ``s`` is decided here, once, by :class:`BatchPlan`: epoch
``e = s // steps_per_epoch`` visits the items in :func:`epoch_permutation` order, and rank ``r``
takes ``local_batch`` items at ``it * batch_size + r * local_batch``. Both paths ask the plan, so a
run can switch paths, stop and ``--resume`` at any step, and still see bit-identical batches.

Augmentation is not done here: batches stay uint8 and go to the device, where
:class:`~probssl.data.views.MultiViewAugment` makes the views (1 byte per pixel crosses the bus).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from probssl.data.catalog import DatasetError, ImageDataset
from probssl.data.sources import ArraySource, ImageSource

__all__ = [
    "BatchPlan",
    "InMemoryBatches",
    "InputPipeline",
    "StepBatchSampler",
    "StreamingBatches",
    "SubsetSource",
    "build_pipeline",
    "choose_pipeline",
    "epoch_permutation",
    "sequential_batches",
]


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The data order of one epoch, independent of any global RNG state (exact resume)."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


@dataclass(frozen=True)
class BatchPlan:
    """Which items each rank trains on at each step; an epoch's last partial batch is dropped."""

    num_items: int
    batch_size: int  # global
    seed: int
    world_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size={self.batch_size} does not divide over {self.world_size} ranks")
        if not 0 < self.batch_size <= self.num_items:
            raise ValueError(f"batch_size={self.batch_size} must be in 1..{self.num_items} (the items)")

    @property
    def local_batch(self) -> int:
        return self.batch_size // self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.batch_size

    def steps(self, start_step: int, stop_step: int) -> Iterator[torch.Tensor]:
        """The index tensor of each step in ``start_step..stop_step-1``; one permutation per epoch."""
        epoch_cached, perm = -1, None
        for step in range(start_step, stop_step):
            epoch, it = divmod(step, self.steps_per_epoch)
            if epoch != epoch_cached:
                epoch_cached, perm = epoch, epoch_permutation(self.num_items, self.seed, epoch)
            lo = it * self.batch_size + self.rank * self.local_batch
            yield perm[lo : lo + self.local_batch]


class StepBatchSampler(Sampler[list[int]]):
    """A DataLoader batch sampler yielding exactly :class:`BatchPlan`'s index lists from any step on."""

    def __init__(self, plan: BatchPlan, start_step: int, stop_step: int) -> None:
        self.plan, self.start_step, self.stop_step = plan, start_step, max(start_step, stop_step)

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.plan.steps(self.start_step, self.stop_step):
            yield indices.tolist()

    def __len__(self) -> int:
        return self.stop_step - self.start_step


class InputPipeline(Protocol):
    """Batches of uint8 ``[local_batch, C, H, W]`` on the CPU for steps ``start_step..stop_step-1``."""

    kind: str  # "memory" | "stream"
    plan: BatchPlan

    def batches(self, start_step: int, stop_step: int) -> Iterator[torch.Tensor]: ...


class InMemoryBatches:
    """Index one decoded uint8 tensor: the whole split in RAM (or a memory-mapped decode cache)."""

    kind = "memory"

    def __init__(self, images: torch.Tensor, plan: BatchPlan) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
        if images.shape[0] != plan.num_items:
            raise ValueError(f"{images.shape[0]} images but the plan covers {plan.num_items}")
        self.images, self.plan = images, plan

    def batches(self, start_step: int, stop_step: int) -> Iterator[torch.Tensor]:
        for indices in self.plan.steps(start_step, stop_step):
            yield self.images[indices]


class _ReadFailure:
    """A DatasetError raised in a worker, carried back as data so the main process re-raises it cleanly
    (DataLoader would otherwise wrap it in a message holding the worker's traceback)."""

    def __init__(self, message: str) -> None:
        self.message = message


class _SourceItems(Dataset):
    """``source.read(i)`` as a map-style Dataset; what each DataLoader worker holds a copy of."""

    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> np.ndarray | _ReadFailure:
        try:
            return self.source.read(index)
        except DatasetError as err:
            return _ReadFailure(str(err))


def _collate_uint8(items: list[np.ndarray | _ReadFailure]) -> torch.Tensor | _ReadFailure:
    for item in items:
        if isinstance(item, _ReadFailure):
            return item
    return torch.from_numpy(np.stack(items))


def _one_thread_per_worker(worker_id: int) -> None:
    """Workers decode images, one each: intra-op threads would only fight the trainer for cores."""
    torch.set_num_threads(1)


class StreamingBatches:
    """DataLoader workers read and decode each batch's items: memory independent of the dataset's size.

    One DataLoader iterator spans every step of :meth:`batches` (all its epochs), so the workers start
    once per call, not once per epoch. ``workers=0`` reads in the calling process (debugging, tests).
    The loader gets a generator of its own: creating an iterator draws a seed from it, and drawing from
    the global RNG would shift the augmentation stream and break bit-exact resume.
    """

    kind = "stream"

    def __init__(
        self,
        source: ImageSource,
        plan: BatchPlan,
        workers: int = 2,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
    ) -> None:
        if len(source) != plan.num_items:
            raise ValueError(f"the source holds {len(source)} items but the plan covers {plan.num_items}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.source, self.plan = source, plan
        self.workers, self.pin_memory, self.prefetch_factor = workers, pin_memory, prefetch_factor

    def batches(self, start_step: int, stop_step: int) -> Iterator[torch.Tensor]:
        if stop_step <= start_step:
            return
        loader = DataLoader(
            _SourceItems(self.source),
            batch_sampler=StepBatchSampler(self.plan, start_step, stop_step),
            num_workers=self.workers,
            collate_fn=_collate_uint8,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.workers else None,
            worker_init_fn=_one_thread_per_worker if self.workers else None,
            generator=torch.Generator(),
        )
        for batch in loader:
            if isinstance(batch, _ReadFailure):
                raise DatasetError(batch.message)
            yield batch


def sequential_batches(source: ImageSource, batch_size: int, workers: int = 0) -> Iterator[torch.Tensor]:
    """Every item of ``source`` once, in order, as uint8 batches (inference: ``probssl embed``).

    Same reading machinery as :class:`StreamingBatches`, so at most a few batches are ever decoded.
    """
    loader = DataLoader(
        _SourceItems(source),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate_uint8,
        worker_init_fn=_one_thread_per_worker if workers else None,
        generator=torch.Generator(),
    )
    for batch in loader:
        if isinstance(batch, _ReadFailure):
            raise DatasetError(batch.message)
        yield batch


class SubsetSource:
    """The items of ``source`` at ``indices`` (e.g. ``data.subset``), read lazily like the source itself."""

    def __init__(self, source: ImageSource, indices: Sequence[int] | torch.Tensor) -> None:
        self.source = source
        self.indices = np.asarray(torch.as_tensor(indices, dtype=torch.int64))
        self.name, self.split, self.classes = source.name, source.split, list(source.classes)
        self.channels, self.image_size = source.channels, source.image_size

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.source.labels)[self.indices]

    def item_id(self, index: int) -> str:
        return self.source.item_id(int(self.indices[index]))

    def read(self, index: int) -> np.ndarray:
        return self.source.read(int(self.indices[index]))


def choose_pipeline(mode: str, decoded_bytes: int, memory_limit_gb: float) -> str:
    """``memory`` or ``stream``: ``auto`` keeps a split in memory when its decoded size is below the limit."""
    if mode in ("memory", "stream"):
        return mode
    if mode != "auto":
        raise ValueError(f"unknown pipeline mode {mode!r}; valid: auto, memory, stream")
    return "memory" if decoded_bytes <= memory_limit_gb * 2**30 else "stream"


def build_pipeline(
    data: ImageDataset | ImageSource,
    plan: BatchPlan,
    kind: str,
    workers: int = 2,
    pin_memory: bool = False,
) -> InputPipeline:
    """The pipeline of ``kind`` over ``data``; an in-memory dataset can stream too (through its array)."""
    if kind == "memory":
        if isinstance(data, ImageDataset):
            return InMemoryBatches(data.images, plan)
        raise ValueError("the in-memory path needs a decoded ImageDataset (see probssl.data.load_dataset)")
    if kind != "stream":
        raise ValueError(f"unknown pipeline kind {kind!r}; valid: memory, stream")
    if isinstance(data, ImageDataset):
        data = ArraySource(data.images, data.labels, data.classes, data.name, data.split)
    return StreamingBatches(data, plan, workers=workers, pin_memory=pin_memory)
