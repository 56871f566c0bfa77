"""Class-balanced batches (probssl.data.class_balanced): composition, balance, sharding, exact resume.

Every property is checked by counting the indices with collections.Counter / numpy on the labels,
independently of how the plan draws them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from probssl.data.class_balanced import ClassBalancedBatchPlan, class_balanced_epoch
from probssl.data.pipeline import InMemoryBatches, StepBatchSampler

pytestmark = pytest.mark.usefixtures("single_thread")


def _labels(counts: list[int], seed: int = 0) -> torch.Tensor:
    """Class c repeated counts[c] times, shuffled (a plan must not rely on sorted labels)."""
    labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c, n in enumerate(counts)])
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def _plan(labels: torch.Tensor, batch: int, m: int, seed: int = 3, world: int = 1, rank: int = 0):
    return ClassBalancedBatchPlan(
        labels.numel(), batch, seed, world_size=world, rank=rank, labels=labels, images_per_class=m
    )


def test_every_batch_holds_m_distinct_images_of_each_of_b_over_m_distinct_classes():
    labels = _labels([37, 50, 41, 60, 45, 52])  # uneven classes, 285 items
    plan = _plan(labels, batch=16, m=4)
    assert plan.steps_per_epoch == 285 // 16
    for indices in plan.steps(0, 3 * plan.steps_per_epoch):  # three epochs
        assert indices.shape == (16,)
        assert len(set(indices.tolist())) == 16  # no image twice in a batch
        per_class = Counter(labels[indices].tolist())
        assert len(per_class) == 4 and set(per_class.values()) == {4}
        # laid out class by class: each block of m shares one label
        assert all(len(set(block.tolist())) == 1 for block in labels[indices].split(4))


def test_a_class_hands_out_its_images_equally_often():
    """Within an epoch every image of a class is drawn as often as any other (±1)."""
    labels = _labels([30, 31, 29, 30])
    plan = _plan(labels, batch=20, m=5)  # 4 classes per batch: every class in every batch
    seen = Counter(i for indices in plan.steps(0, plan.steps_per_epoch) for i in indices.tolist())
    for c in range(4):
        items = torch.nonzero(labels == c, as_tuple=True)[0].tolist()
        counts = [seen[i] for i in items]
        assert max(counts) - min(counts) <= 1, (c, counts)
        assert sum(counts) == 5 * plan.steps_per_epoch  # m per batch, every batch


def test_classes_are_drawn_uniformly_when_fewer_fit_in_a_batch():
    labels = _labels([200] * 10)
    plan = _plan(labels, batch=32, m=8)  # 4 of 10 classes per batch
    picks = Counter(
        int(labels[indices[0]]) for s in range(0, 400) for indices in [next(plan.steps(s, s + 1))]
    )
    # 400 batches × 1 first class: each class ~40 times; a χ² test against uniform (p > 0.001)
    from scipy.stats import chisquare

    assert chisquare([picks[c] for c in range(10)]).pvalue > 1e-3


def test_a_class_smaller_than_m_repeats_its_images_and_nothing_else_does():
    labels = _labels([3, 40])
    plan = _plan(labels, batch=8, m=4)
    for indices in plan.steps(0, 6):
        small = [i for i in indices.tolist() if labels[i] == 0]
        large = [i for i in indices.tolist() if labels[i] == 1]
        assert len(small) == 4 and len(set(small)) == 3  # 3 images fill 4 slots
        assert len(large) == 4 and len(set(large)) == 4


def test_the_plan_is_a_pure_function_of_seed_and_step():
    labels = _labels([25, 25, 25, 25])
    plan = _plan(labels, batch=20, m=5)
    straight = [t.tolist() for t in plan.steps(0, 12)]
    resumed = [t.tolist() for t in _plan(labels, batch=20, m=5).steps(7, 12)]  # a fresh plan, mid-epoch
    assert resumed == straight[7:]
    other_seed = [t.tolist() for t in _plan(labels, batch=20, m=5, seed=4).steps(0, 12)]
    assert other_seed != straight
    assert straight[: plan.steps_per_epoch] != straight[plan.steps_per_epoch :][: plan.steps_per_epoch]
    # the epoch table is deterministic in (seed, epoch) on its own
    a = class_balanced_epoch(labels, 20, 5, 5, seed=3, epoch=1)
    assert torch.equal(a, class_balanced_epoch(labels, 20, 5, 5, seed=3, epoch=1))


def test_ranks_take_disjoint_slices_that_make_up_the_global_batch():
    labels = _labels([30, 30, 30, 30])
    whole = _plan(labels, batch=16, m=4)
    shards = [_plan(labels, batch=16, m=4, world=2, rank=r) for r in range(2)]
    for step in range(10):
        parts = [next(s.steps(step, step + 1)) for s in shards]
        assert torch.equal(torch.cat(parts), next(whole.steps(step, step + 1)))
        assert not set(parts[0].tolist()) & set(parts[1].tolist())


def test_the_input_pipelines_read_the_plans_items():
    labels = _labels([12, 12, 12])
    images = torch.arange(36, dtype=torch.uint8).reshape(36, 1, 1, 1).expand(36, 1, 2, 2).contiguous()
    plan = _plan(labels, batch=6, m=2)
    for batch, indices in zip(InMemoryBatches(images, plan).batches(0, 6), plan.steps(0, 6), strict=True):
        assert torch.equal(batch[:, 0, 0, 0].long(), indices)
    assert [list(b) for b in StepBatchSampler(plan, 2, 4)] == [t.tolist() for t in plan.steps(2, 4)]


@pytest.mark.parametrize(
    ("labels", "batch", "m", "message"),
    [
        (torch.tensor([0, 1, -1, 1] * 5), 4, 2, "unlabelled"),
        (torch.tensor([0, 1] * 10), 6, 4, "multiple of images_per_class=4"),
        (
            torch.tensor([0, 1, 2] * 10),
            8,
            2,
            r"4 classes per batch, but the training set has 3.*at least 3 \(e\.g\. 4\)",
        ),
    ],
)
def test_impossible_batches_are_refused_with_what_to_change(labels, batch, m, message):
    with pytest.raises(ValueError, match=message):
        _plan(labels, batch=batch, m=m)


def test_labels_may_come_as_a_numpy_array():
    """Streamed sources hold their labels as numpy arrays."""
    labels = np.array([0, 1] * 10)
    plan = ClassBalancedBatchPlan(20, 4, 0, labels=labels, images_per_class=2)
    assert plan.labels.dtype == torch.long and plan.labels.tolist() == labels.tolist()
