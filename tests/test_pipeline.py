"""The input pipeline: the in-memory and streaming paths give the same batches as the old training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probssl.data import DatasetError, ImageDataset
from probssl.data.pipeline import (
    BatchPlan,
    InMemoryBatches,
    StreamingBatches,
    SubsetSource,
    build_pipeline,
    choose_pipeline,
    epoch_permutation,
)
from probssl.data.sources import ArraySource

pytestmark = pytest.mark.usefixtures("single_thread")


def _images(n: int, channels: int = 3, size: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, channels, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _source(images: torch.Tensor) -> ArraySource:
    return ArraySource(images, torch.zeros(len(images), dtype=torch.long), ["x"], "toy", "train")


def _reference_batches(images, batch, world, rank, seed, start, stop):
    """The loop train.py ran before the pipeline existed, written out independently."""
    n, local = len(images), batch // world
    per_epoch = n // batch
    out = []
    for step in range(start, stop):
        epoch, it = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        lo = it * batch + rank * local
        out.append(images[perm[lo : lo + local]])
    return out


@pytest.mark.parametrize(("world", "rank"), [(1, 0), (2, 1)])
def test_in_memory_batches_equal_the_old_training_loop(world, rank):
    images = _images(37)
    plan = BatchPlan(len(images), batch_size=8, seed=3, world_size=world, rank=rank)
    got = list(InMemoryBatches(images, plan).batches(2, 13))  # 4 steps/epoch: mid-epoch 0 into epoch 3
    want = _reference_batches(images, 8, world, rank, 3, 2, 13)
    assert len(got) == len(want) == 11
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_and_in_memory_give_identical_batches_from_any_step(workers):
    images = _images(41, seed=1)
    plan = BatchPlan(len(images), batch_size=10, seed=7)  # 4 steps per epoch, one item dropped
    memory = InMemoryBatches(images, plan)
    stream = StreamingBatches(_source(images), plan, workers=workers, prefetch_factor=2)
    for start in (0, 3, 5):  # from the start, the last step of epoch 0, the middle of epoch 1
        a, b = list(memory.batches(start, 8)), list(stream.batches(start, 8))  # to the end of epoch 1
        assert len(a) == len(b) == 8 - start
        for x, y in zip(a, b, strict=True):
            assert x.dtype == y.dtype == torch.uint8 and torch.equal(x, y)


def test_each_epoch_covers_distinct_items_and_ranks_split_them():
    n, batch = 50, 12
    seen = []
    for rank in range(3):
        plan = BatchPlan(n, batch_size=batch, seed=0, world_size=3, rank=rank)
        seen.append(torch.cat(list(plan.steps(0, plan.steps_per_epoch))))
    allseen = torch.cat(seen)
    assert len(allseen) == (n // batch) * batch and len(set(allseen.tolist())) == len(allseen)
    assert torch.equal(allseen.sort().values, epoch_permutation(n, 0, 0)[:48].sort().values)


def test_streaming_leaves_the_global_rng_alone():
    """Creating a DataLoader iterator draws a seed; from the global RNG it would shift the augmentations."""
    stream = StreamingBatches(_source(_images(16)), BatchPlan(16, 4, seed=0), workers=0)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    list(stream.batches(0, 3))
    assert torch.equal(before, torch.get_rng_state())


class _Corrupt(ArraySource):
    def read(self, index: int) -> np.ndarray:
        if index == 3:
            raise DatasetError("cannot decode /data/x/3.jpg; delete it or set data.skip_corrupt=true")
        return super().read(index)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_read_error_in_a_worker_comes_back_as_the_same_clean_error(workers):
    images = _images(8)
    source = _Corrupt(images, torch.zeros(8, dtype=torch.long), ["x"], "toy", "train")
    stream = StreamingBatches(source, BatchPlan(8, 8, seed=0), workers=workers)
    with pytest.raises(DatasetError) as err:
        list(stream.batches(0, 1))
    assert str(err.value) == "cannot decode /data/x/3.jpg; delete it or set data.skip_corrupt=true"


def test_subset_source_reads_the_chosen_items():
    images = _images(10)
    sub = SubsetSource(_source(images), torch.tensor([7, 2, 5]))
    assert len(sub) == 3 and sub.item_id(1) == "toy/train[2]"
    assert np.array_equal(sub.read(2), images[5].numpy())


def test_choose_and_build():
    assert choose_pipeline("auto", 2**30, 1.0) == "memory"
    assert choose_pipeline("auto", 2**30 + 1, 1.0) == "stream"
    assert choose_pipeline("memory", 10**15, 1.0) == "memory"
    assert choose_pipeline("stream", 1, 1.0) == "stream"
    images = _images(8)
    data = ImageDataset("toy", "train", images, torch.zeros(8, dtype=torch.long), ["x"])
    plan = BatchPlan(8, 4, seed=0)
    assert build_pipeline(data, plan, "memory").kind == "memory"
    stream = build_pipeline(data, plan, "stream", workers=0)
    assert stream.kind == "stream" and torch.equal(
        next(iter(stream.batches(0, 1))), images[epoch_permutation(8, 0, 0)[:4]]
    )
    with pytest.raises(ValueError, match="decoded ImageDataset"):
        build_pipeline(_source(images), plan, "memory")
