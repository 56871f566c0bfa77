"""Class-balanced batches for methods trained on class labels: m images of each of B/m classes per batch.

Why: a method that mines its pairs from class labels (LAM with ``method.pairs=labels``, as metric
learning trains) needs positives in every batch, so a batch is ``B/m`` distinct classes with ``m``
images each — the "m per class" sampler of metric learning (e.g. pytorch-metric-learning's
``MPerClassSampler``). It is written here rather than taken from that library because the training
loop needs what :class:`~probssl.data.pipeline.BatchPlan` guarantees: the items of step ``s`` are a
pure function of (seed, s) — no sampler state, no global RNG — so ``--resume`` at any step sees the
same batches as an uninterrupted run, and the DDP ranks take disjoint slices of one global batch.

Epoch ``e`` (``num_items // batch_size`` steps, as for :class:`BatchPlan`, so the learning-rate
schedule means the same) is drawn from a generator seeded by (seed, e):

- each step picks ``B/m`` distinct classes uniformly at random (every class when ``B/m`` equals the
  number of classes);
- each class hands out its items in a random order, ``m`` at a time; once fewer than ``m`` are left
  it appends a fresh random order of all its items (those still due placed last), so a class's items
  are seen equally often (±1) and a batch never holds an item twice;
- except for a class with fewer than ``m`` items, which must repeat items to fill its ``m`` slots.

The global batch is laid out class by class ([c₁ × m, c₂ × m, ...]); rank ``r`` takes the items
``r·B/W .. (r+1)·B/W − 1`` of it, exactly as :class:`BatchPlan` splits its batches. Methods that mine
pairs gather the whole global batch (features and labels, in rank order), so the split changes
nothing they compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from probssl.data.pipeline import BatchPlan

__all__ = ["ClassBalancedBatchPlan", "class_balanced_epoch"]


def class_balanced_epoch(
    labels: torch.Tensor, batch_size: int, images_per_class: int, steps: int, seed: int, epoch: int
) -> torch.Tensor:
    """The global batches of one epoch, ``[steps, batch_size]`` item indices (module docstring)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    classes = torch.unique(labels)  # sorted: the same order on every rank and every resume
    members = [torch.nonzero(labels == c, as_tuple=True)[0] for c in classes]
    queues = [m[torch.randperm(m.numel(), generator=gen)] for m in members]
    cursors = [0] * len(members)
    per_batch = batch_size // images_per_class
    batches = torch.empty((steps, batch_size), dtype=torch.long)
    for step in range(steps):
        chosen = torch.randperm(len(members), generator=gen)[:per_batch].tolist()
        for slot, c in enumerate(chosen):
            while queues[c].numel() - cursors[c] < images_per_class:  # a fresh order of all its items
                rest = queues[c][cursors[c] :]
                fresh = members[c][torch.randperm(members[c].numel(), generator=gen)]
                again = torch.isin(fresh, rest)  # the items still due go last in the fresh order,
                fresh = torch.cat([fresh[~again], fresh[again]])  # so a batch never holds one twice
                queues[c], cursors[c] = torch.cat([rest, fresh]), 0
            lo = slot * images_per_class
            batches[step, lo : lo + images_per_class] = queues[c][cursors[c] : cursors[c] + images_per_class]
            cursors[c] += images_per_class
    return batches


@dataclass(frozen=True)
class ClassBalancedBatchPlan(BatchPlan):
    """A :class:`BatchPlan` whose batches hold ``images_per_class`` items of each of ``B/m`` classes.

    ``labels`` are the training items' class labels ([num_items], int64, no -1 = unlabelled item).
    Bad combinations raise ``ValueError`` with what to change (the training loop reports them as
    config errors).
    """

    labels: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long), compare=False)
    images_per_class: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        labels = torch.as_tensor(np.asarray(self.labels), dtype=torch.long)
        object.__setattr__(self, "labels", labels)
        if labels.shape != (self.num_items,):
            raise ValueError(f"{labels.shape[0]} labels for {self.num_items} training items")
        unlabelled = int((labels < 0).sum())
        if unlabelled:
            raise ValueError(
                f"class-balanced batches need a class label for every training image; {unlabelled} of "
                f"{self.num_items} are unlabelled (-1). Train on a labelled set, or use the method's "
                "self-supervised mode"
            )
        m, b = self.images_per_class, self.batch_size
        if m < 1 or b % m:
            raise ValueError(
                f"train.batch_size={b} must be a multiple of images_per_class={m} (m images of each class "
                "per batch)"
            )
        num_classes = int(torch.unique(labels).numel())
        if b // m > num_classes:
            # the smallest m' that divides the batch and asks for no more classes than there are
            fits = next(k for k in range(-(-b // num_classes), b + 1) if b % k == 0)
            raise ValueError(
                f"train.batch_size={b} / images_per_class={m} = {b // m} classes per batch, but the training "
                f"set has {num_classes}; set images_per_class to a divisor of the batch size of at least "
                f"{-(-b // num_classes)} (e.g. {fits}) or lower the batch size"
            )

    def steps(self, start_step: int, stop_step: int) -> Iterator[torch.Tensor]:
        """The index tensor of each step in ``start_step..stop_step-1``; one table per epoch."""
        epoch_cached, table = -1, None
        for step in range(start_step, stop_step):
            epoch, it = divmod(step, self.steps_per_epoch)
            if epoch != epoch_cached:
                table = class_balanced_epoch(
                    self.labels,
                    self.batch_size,
                    self.images_per_class,
                    self.steps_per_epoch,
                    self.seed,
                    epoch,
                )
                epoch_cached = epoch
            lo = self.rank * self.local_batch
            yield table[it, lo : lo + self.local_batch]
