"""Feature bank: round trip, atomic save, cache keys, batched extraction."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from probssl.embedding import Embedding
from probssl.eval.features import FeatureBank, cached_features, extract_features


def _bank(s: int = 2, n: int = 7, d: int = 4, seed: int = 0) -> FeatureBank:
    g = torch.Generator().manual_seed(seed)
    draws = torch.randn(s, n, d, generator=g)
    return FeatureBank(
        draws=draws,
        mean=draws.mean(0),
        uncertainty=torch.rand(n, generator=g),
        labels=torch.randint(0, 3, (n,), generator=g),
    )


def _assert_same(a: FeatureBank, b: FeatureBank) -> None:
    for name in ("draws", "mean", "uncertainty", "labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_round_trip_with_metadata(tmp_path: Path) -> None:
    bank = _bank()
    assert (bank.num_samples, bank.num_items, bank.dim) == (2, 7, 4)
    path = tmp_path / "sub" / "bank.safetensors"
    bank.save(path, metadata={"key": "abc", "split": "test"})
    loaded, metadata = FeatureBank.load(path)
    _assert_same(loaded, bank)
    assert loaded.labels.dtype == torch.int64
    assert metadata == {"key": "abc", "split": "test"}
    assert [p.name for p in path.parent.iterdir()] == ["bank.safetensors"]  # no temporary left behind


def test_shapes_are_validated() -> None:
    bank = _bank()
    with pytest.raises(ValueError):
        FeatureBank(draws=bank.draws, mean=bank.mean[:3], uncertainty=bank.uncertainty, labels=bank.labels)
    with pytest.raises(ValueError):
        FeatureBank(draws=bank.mean, mean=bank.mean, uncertainty=bank.uncertainty, labels=bank.labels)


def test_failed_save_leaves_the_old_file_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bank.safetensors"
    old = _bank(seed=0)
    old.save(path, metadata={"key": "old"})

    def broken_save(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"partial garbage")  # a write that dies half-way
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _bank(seed=1).save(path, metadata={"key": "new"})
    monkeypatch.undo()
    loaded, metadata = FeatureBank.load(path)
    _assert_same(loaded, old)
    assert metadata == {"key": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["bank.safetensors"]


def test_cached_features_recomputes_only_when_the_key_changes(tmp_path: Path) -> None:
    path = tmp_path / "train.safetensors"
    calls: list[int] = []

    def compute(seed: int):
        def run() -> FeatureBank:
            calls.append(seed)
            return _bank(seed=seed)

        return run

    first = cached_features(path, "ckpt-1/train/S=2", compute(0))
    again = cached_features(path, "ckpt-1/train/S=2", compute(1))
    assert calls == [0]
    _assert_same(again, first)
    changed = cached_features(path, "ckpt-2/train/S=2", compute(2))
    assert calls == [0, 2]
    _assert_same(changed, _bank(seed=2))
    assert FeatureBank.load(path)[1]["key"] == "ckpt-2/train/S=2"


def test_cached_features_recovers_from_an_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "bank.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.warns(UserWarning, match="unreadable"):
        bank = cached_features(path, "k", lambda: _bank(seed=3))
    _assert_same(bank, _bank(seed=3))
    _assert_same(FeatureBank.load(path)[0], bank)


def _images(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.arange(n * 1 * 2 * 2, dtype=torch.int64).reshape(n, 1, 2, 2).to(torch.uint8)
    return images, torch.arange(n) % 3


def _preprocess(batch: torch.Tensor) -> torch.Tensor:
    assert batch.dtype == torch.uint8  # moved first, converted on the device
    return batch.float() / 255.0


def test_extract_deterministic_keeps_order_across_batches() -> None:
    images, labels = _images()
    batch_sizes: list[int] = []

    def embed(x: torch.Tensor) -> Embedding:
        assert not torch.is_grad_enabled()
        batch_sizes.append(x.shape[0])
        return Embedding.deterministic(x.flatten(1) * 2.0)

    bank = extract_features(embed, images, labels, _preprocess, batch_size=3, progress=True)
    assert batch_sizes == [3, 3, 3, 1]
    expected = images.flatten(1).float() / 255.0 * 2.0
    assert bank.draws.shape == (1, 10, 4) and bank.draws.dtype == torch.float32
    torch.testing.assert_close(bank.mean, expected)
    torch.testing.assert_close(bank.draws[0], expected)
    assert torch.equal(bank.uncertainty, torch.zeros(10))
    assert torch.equal(bank.labels, labels)


def test_extract_sampled_embedding() -> None:
    images, labels = _images(8)

    def embed(x: torch.Tensor) -> Embedding:
        mean = x.flatten(1).double()  # float64 in, float32 out
        samples = torch.stack([mean + s for s in range(3)])
        return Embedding(mean=mean, samples=samples, uncertainty=mean.sum(dim=1))

    bank = extract_features(embed, images, labels, _preprocess, batch_size=5)
    assert (bank.num_samples, bank.num_items, bank.dim) == (3, 8, 4)
    assert bank.draws.dtype == bank.mean.dtype == bank.uncertainty.dtype == torch.float32
    expected = images.flatten(1).float() / 255.0
    for s in range(3):
        torch.testing.assert_close(bank.draws[s], expected + s)
    torch.testing.assert_close(bank.uncertainty, expected.sum(dim=1))


def test_a_varying_number_of_draws_is_refused():
    calls = iter([3, 2])

    def embed(x):
        s = next(calls)
        return Embedding(torch.zeros(x.shape[0], 4), torch.zeros(s, x.shape[0], 4), torch.zeros(x.shape[0]))

    images = torch.zeros(8, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match="varying number of samples"):
        extract_features(embed, images, torch.zeros(8), lambda x: x.float(), batch_size=4)
