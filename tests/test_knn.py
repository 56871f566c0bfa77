"""Weighted kNN: agreement with scikit-learn, a hand-worked case, chunking, leave-one-out, marginal."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import KNeighborsClassifier

from probssl.eval.knn import knn_predict, knn_predict_many, knn_predict_marginal, knn_predict_marginal_many

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _toy(n: int = 60, m: int = 25, d: int = 6, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    query = torch.randn(m, d, generator=g, dtype=torch.float64)
    return train, labels, query


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (7, 0.07), (20, 0.5)])
def test_matches_sklearn_cosine_knn(k: int, temperature: float) -> None:
    train, labels, query = _toy()
    # sklearn hands the weight function the cosine *distance* 1 - s, hence exp((1 - d) / T).
    reference = KNeighborsClassifier(
        n_neighbors=k,
        metric="cosine",
        weights=lambda dist: np.exp((1 - dist) / temperature),
        algorithm="brute",
    ).fit(train.numpy(), labels.numpy())
    expected = reference.predict_proba(query.numpy())
    probs = knn_predict(train, labels, query, num_classes=4, k=k, temperature=temperature)
    assert probs.shape == (25, 4)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-10)


def test_hand_worked_four_points() -> None:
    train = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])  # norms differ on purpose
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0]])
    # cosine similarities to the query: 1, 0, -1, 1/sqrt(2); k = 3 keeps points 0, 3, 1.
    t = 0.5
    w0, w3, w1 = math.exp(1 / t), math.exp(1 / math.sqrt(2) / t), math.exp(0 / t)
    expected = torch.tensor([[w0, w1, w3]]) / (w0 + w1 + w3)
    probs = knn_predict(train, labels, query, num_classes=3, k=3, temperature=t)
    torch.testing.assert_close(probs, expected)
    # k = 1: all mass on the nearest neighbour's class.
    torch.testing.assert_close(
        knn_predict(train, labels, query, num_classes=3, k=1, temperature=t), torch.tensor([[1.0, 0.0, 0.0]])
    )


def test_rows_are_distributions_and_small_temperature_is_finite() -> None:
    train, labels, query = _toy()
    probs = knn_predict(train.float(), labels, query.float(), num_classes=4, k=20, temperature=1e-3)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(25))


def test_chunking_does_not_change_the_result() -> None:
    train, labels, query = _toy(m=37)
    full = knn_predict(train, labels, query, num_classes=4, k=5, chunk_size=1024)
    for chunk in (1, 5, 36):
        torch.testing.assert_close(
            knn_predict(train, labels, query, num_classes=4, k=5, chunk_size=chunk), full
        )


def test_exclude_self_is_leave_one_out() -> None:
    train, labels, _ = _toy(n=30)
    probs = knn_predict(train, labels, train, num_classes=4, k=5, chunk_size=7, exclude_self=True)
    for i in range(30):
        rest = torch.cat([torch.arange(i), torch.arange(i + 1, 30)])
        expected = knn_predict(train[rest], labels[rest], train[i : i + 1], num_classes=4, k=5)
        torch.testing.assert_close(probs[i : i + 1], expected)
    # Without exclusion, k = 1 returns each point's own label.
    own = knn_predict(train, labels, train, num_classes=4, k=1)
    assert torch.equal(own.argmax(dim=1), labels)
    with pytest.raises(ValueError):
        knn_predict(train, labels, train[:5], num_classes=4, exclude_self=True)


def test_training_blocks_merge_to_the_same_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 16 similarities per query split the training side: top-k lists are merged across
    them, with and without leave-one-out, and k larger than a block still works."""
    import probssl.eval.knn as knn_module

    monkeypatch.setattr(knn_module, "SIMILARITY_BLOCK", 16)
    train, labels, _ = _toy(n=70)
    for k in (5, 20):
        blocked = knn_predict(train, labels, train, num_classes=4, k=k, chunk_size=1, exclude_self=True)
        whole = knn_predict(train, labels, train, num_classes=4, k=k, chunk_size=100, exclude_self=True)
        torch.testing.assert_close(blocked, whole)


def test_k_larger_than_n_is_clipped() -> None:
    train, labels, query = _toy(n=6)
    torch.testing.assert_close(
        knn_predict(train, labels, query, num_classes=4, k=500),
        knn_predict(train, labels, query, num_classes=4, k=6),
    )
    torch.testing.assert_close(
        knn_predict(train, labels, train, num_classes=4, k=500, exclude_self=True),
        knn_predict(train, labels, train, num_classes=4, k=5, exclude_self=True),
    )


def test_marginal_with_one_draw_equals_plain() -> None:
    train, labels, query = _toy()
    plain = knn_predict(train, labels, query, num_classes=4, k=10)
    marginal = knn_predict_marginal(train[None], labels, query[None], num_classes=4, k=10)
    torch.testing.assert_close(marginal, plain)


def test_marginal_averages_vote_distributions_over_paired_draws() -> None:
    train_a, labels, query_a = _toy(seed=1)
    train_b, _, query_b = _toy(seed=2)
    train_draws = torch.stack([train_a, train_b])
    query_draws = torch.stack([query_a, query_b])
    expected = 0.5 * (
        knn_predict(train_a, labels, query_a, num_classes=4, k=5)
        + knn_predict(train_b, labels, query_b, num_classes=4, k=5)
    )
    torch.testing.assert_close(knn_predict_marginal(train_draws, labels, query_draws, 4, k=5), expected)


def test_marginal_broadcasts_a_single_train_draw() -> None:
    train, labels, query_a = _toy(seed=3)
    _, _, query_b = _toy(seed=4)
    expected = 0.5 * (
        knn_predict(train, labels, query_a, num_classes=4, k=5)
        + knn_predict(train, labels, query_b, num_classes=4, k=5)
    )
    got = knn_predict_marginal(train[None], labels, torch.stack([query_a, query_b]), 4, k=5)
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError):
        knn_predict_marginal(torch.stack([train, train]), labels, torch.stack([query_a] * 3), 4)


def test_one_pass_for_several_k_equals_one_call_per_k() -> None:
    """The top-200 list's first 20 entries are the top-20 list: sharing the pass changes no number."""
    g = torch.Generator().manual_seed(3)
    train, query = torch.randn(700, 16, generator=g), torch.randn(90, 16, generator=g)
    labels = torch.randint(0, 5, (700,), generator=g)
    many = knn_predict_many(train, labels, query, 5, ks=(3, 20, 200), chunk_size=32)
    for k in (3, 20, 200):
        assert torch.equal(many[k], knn_predict(train, labels, query, 5, k=k, chunk_size=32))
    draws_train, draws_query = torch.randn(3, 700, 16, generator=g), torch.randn(3, 90, 16, generator=g)
    marginal = knn_predict_marginal_many(draws_train, labels, draws_query, 5, ks=(20, 200))
    for k in (20, 200):
        assert torch.equal(marginal[k], knn_predict_marginal(draws_train, labels, draws_query, 5, k=k))
