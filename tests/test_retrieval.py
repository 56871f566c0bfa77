"""Retrieval metrics vs brute-force loops; ties against the query; sparsification; retrieval ECE."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from probssl.eval.calibration import binned_ece
from probssl.eval.retrieval import (
    first_relevant_rank,
    map_at_r,
    nearest_neighbour_labels,
    recall_at_k,
    retrieval_confidence,
    retrieval_ece,
    retrieval_metrics,
    sparsification,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _toy(n: int = 40, d: int = 5, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=g, dtype=torch.float64)
    embeddings = centres[labels] + 0.9 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return embeddings, labels


def _ranked_lists(embeddings: torch.Tensor) -> list[list[int]]:
    """For each query, the other items sorted by cosine similarity, most similar first (plain loops)."""
    x = embeddings.tolist()
    norms = [sum(v * v for v in row) ** 0.5 for row in x]
    ranked = []
    for i in range(len(x)):
        sims = [
            (sum(a * b for a, b in zip(x[i], x[j], strict=True)) / (norms[i] * norms[j]), j)
            for j in range(len(x))
            if j != i
        ]
        ranked.append([j for _, j in sorted(sims, key=lambda t: -t[0])])
    return ranked


def _brute_force(embeddings: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]):
    labels = labels.tolist()
    ranked = _ranked_lists(embeddings)
    recall = {k: 0 for k in ks}
    aps = []
    for i, order in enumerate(ranked):
        rel = [labels[j] == labels[i] for j in order]
        for k in ks:
            recall[k] += any(rel[:k])
        r = sum(rel)
        if r:
            hits, ap = 0, 0.0
            for pos in range(1, r + 1):
                if rel[pos - 1]:
                    hits += 1
                    ap += hits / pos
            aps.append(ap / r)
    n = len(labels)
    return {f"recall@{k}": recall[k] / n for k in ks}, sum(aps) / len(aps)


@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_matches_brute_force(chunk_size: int) -> None:
    embeddings, labels = _toy()
    ks = (1, 2, 5, 10, 100)
    expected_recall, expected_map = _brute_force(embeddings, labels, ks)
    assert recall_at_k(embeddings, labels, ks, chunk_size=chunk_size) == pytest.approx(
        expected_recall, abs=1e-12
    )
    assert map_at_r(embeddings, labels, chunk_size=chunk_size) == pytest.approx(expected_map, abs=1e-12)
    metrics = retrieval_metrics(embeddings, labels, chunk_size=chunk_size)
    assert set(metrics) == {"recall@1", "recall@5", "recall@10", "map@r"}
    assert 0 < metrics["map@r"] <= metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"] <= 1


def test_hand_worked_with_exact_ties() -> None:
    # A=(1,0) B=(1,1) C=(0,1) D=(-1,0) E=(0,-1), labels 0 0 1 1 0; the norms differ on purpose.
    embeddings = torch.tensor([[1.0, 0.0], [2.0, 2.0], [0.0, 3.0], [-5.0, 0.0], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1, 0])
    # Rankings with ties resolved against the query (other-label items first):
    # A: B C E D   B: C A D E   C: B A D E   D: E C B A   E: D A B C
    recall = recall_at_k(embeddings, labels, ks=(1, 2, 3))
    assert recall == pytest.approx({"recall@1": 1 / 5, "recall@2": 4 / 5, "recall@3": 1.0})
    # AP@R: A (R=2) [B,C] -> 1/2; B (R=2) [C,A] -> (1/2)/2; C, D (R=1) miss; E (R=2) [D,A] -> (1/2)/2.
    assert map_at_r(embeddings, labels, chunk_size=2) == pytest.approx((0.5 + 0.25 + 0.25) / 5)


def test_collapsed_embedding_ranks_ties_against_the_query() -> None:
    embeddings = torch.ones(4, 3)
    labels = torch.tensor([0, 0, 1, 1])
    assert recall_at_k(embeddings, labels, ks=(1, 2, 3)) == {
        "recall@1": 0.0,
        "recall@2": 0.0,
        "recall@3": 1.0,
    }
    assert map_at_r(embeddings, labels) == 0.0


def test_singleton_labels() -> None:
    embeddings, _ = _toy(n=6)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])  # four queries can never hit
    recall = recall_at_k(embeddings, labels, ks=(1, 5))
    expected_recall, expected_map = _brute_force(embeddings, labels, (1, 5))
    assert recall == pytest.approx(expected_recall, abs=1e-12)
    assert recall["recall@5"] == pytest.approx(2 / 6)  # k = N - 1: exactly the two paired queries hit
    assert map_at_r(embeddings, labels) == pytest.approx(expected_map, abs=1e-12)  # singletons skipped
    with pytest.raises(ValueError):
        map_at_r(embeddings, torch.arange(6))


def test_single_class() -> None:
    embeddings, _ = _toy(n=9)
    labels = torch.zeros(9, dtype=torch.long)
    assert recall_at_k(embeddings, labels) == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0}
    assert map_at_r(embeddings, labels) == 1.0


def test_nearest_neighbour_labels_leave_one_out() -> None:
    embeddings = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([5, 6, 7, 8])
    assert nearest_neighbour_labels(embeddings, labels, chunk_size=3).tolist() == [6, 5, 8, 7]


def test_retrieval_confidence_and_ece_hand_worked() -> None:
    base = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    swapped = base[[0, 2, 1, 3]]  # item 1 and 2 exchange places: every 1-NN label is now wrong
    samples = torch.stack([base, base, swapped])
    confidence, correct = retrieval_confidence(samples, labels)
    torch.testing.assert_close(confidence, torch.full((4,), 2 / 3, dtype=torch.float64))
    assert correct.tolist() == [True, True, True, True]
    assert retrieval_ece(samples, labels) == pytest.approx(1 / 3)
    # Disagreement ties: the modal label is the smallest one; confidence 1/2.
    confidence, correct = retrieval_confidence(torch.stack([base, swapped]), labels)
    assert confidence.tolist() == [0.5] * 4 and correct.tolist() == [True, True, False, False]


def test_retrieval_ece_single_sample_is_the_error_rate_and_matches_binned_ece() -> None:
    embeddings, labels = _toy(seed=1)
    nn_labels = nearest_neighbour_labels(embeddings, labels)
    error_rate = (nn_labels != labels).double().mean().item()
    assert retrieval_ece(embeddings[None], labels) == pytest.approx(error_rate, abs=1e-12)
    g = torch.Generator().manual_seed(0)
    samples = embeddings[None] + 0.5 * torch.randn(6, *embeddings.shape, generator=g, dtype=torch.float64)
    confidence, correct = retrieval_confidence(samples, labels)
    assert retrieval_ece(samples, labels, num_bins=10) == binned_ece(confidence, correct, 10)


def test_sparsification_hand_worked() -> None:
    u = torch.tensor([0.0, 1.0, 2.0, 3.0])
    c = torch.tensor([True, True, False, True])
    curve = sparsification(u, c, num_steps=4)
    assert curve["fractions_removed"] == [0.0, 0.25, 0.5, 0.75]
    assert curve["accuracy"] == pytest.approx([3 / 4, 2 / 3, 1.0, 1.0])
    assert curve["accuracy_oracle"] == pytest.approx([3 / 4, 1.0, 1.0, 1.0])
    trapezoid = 0.25 * ((3 / 4 + 2 / 3) / 2 + (2 / 3 + 1) / 2 + 1.0)
    assert curve["ausc"] == pytest.approx(trapezoid / 0.75)
    assert curve["ausc_oracle"] == pytest.approx(0.25 * ((3 / 4 + 1) / 2 + 2) / 0.75)


def test_sparsification_limits() -> None:
    perfect = sparsification(torch.rand(30), torch.ones(30, dtype=torch.bool))
    assert perfect["ausc"] == 1.0 and perfect["accuracy"] == [1.0] * 20
    assert len(perfect["fractions_removed"]) == 20 and perfect["fractions_removed"][-1] == 0.95
    # A constant uncertainty removes in expectation at random: flat at the overall accuracy.
    c = torch.tensor([True, False] * 10)
    flat = sparsification(torch.zeros(20), c, num_steps=5)
    assert flat["accuracy"] == pytest.approx([0.5] * 5) and flat["ausc"] == pytest.approx(0.5)
    assert flat["ausc_oracle"] > flat["ausc"]
    assert sparsification(torch.zeros(3), torch.tensor([True, False, True]), num_steps=1)[
        "ausc"
    ] == pytest.approx(2 / 3)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        recall_at_k(torch.ones(1, 3), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError):
        recall_at_k(torch.ones(3, 3), torch.zeros(3, dtype=torch.long), ks=(0,))
    with pytest.raises(ValueError):
        retrieval_ece(torch.ones(4, 3), torch.zeros(4, dtype=torch.long))
    assert np.isfinite(map_at_r(torch.randn(5, 2), torch.tensor([0, 0, 1, 1, 1])))


def _grouped_brute_force(prototypes: torch.Tensor, groups: list[int], labels: list[int], ks: tuple[int, ...]):
    """Recall@k and mAP@R by plain loops for items that are exact copies of ``prototypes[groups[i]]``.

    Ties are defined on the embeddings themselves (same prototype = same similarity, no float noise):
    each query's other items are sorted by (prototype cosine descending, other-label first).
    """
    p = prototypes.double().tolist()
    norms = [sum(v * v for v in row) ** 0.5 for row in p]
    cos = [
        [sum(a * b for a, b in zip(p[g], p[h], strict=True)) / (norms[g] * norms[h]) for h in range(len(p))]
        for g in range(len(p))
    ]
    n = len(labels)
    recall = dict.fromkeys(ks, 0)
    aps = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        order = sorted(others, key=lambda j: (-cos[groups[i]][groups[j]], labels[j] == labels[i]))
        rel = [labels[j] == labels[i] for j in order]
        for k in ks:
            recall[k] += any(rel[:k])
        r = sum(rel)
        if r:
            hits, ap = 0, 0.0
            for pos in range(1, r + 1):
                if rel[pos - 1]:
                    hits += 1
                    ap += hits / pos
            aps.append(ap / r)
    return {f"recall@{k}": recall[k] / n for k in ks}, sum(aps) / len(aps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize("scaled", [False, True])
def test_exactly_duplicated_rows_are_ties(dtype: torch.dtype, chunk_size: int, scaled: bool) -> None:
    # 6 distinct directions, each copied ~10 times under mixed labels (optionally rescaled: same
    # direction, different norm). Float noise must not decide the order among copies.
    g = torch.Generator().manual_seed(3)
    prototypes = torch.randn(6, 69, generator=g, dtype=dtype)
    groups = torch.randint(0, 6, (61,), generator=g)
    labels = torch.randint(0, 4, (61,), generator=g)
    embeddings = prototypes[groups]
    if scaled:
        embeddings = embeddings * (0.1 + 10 * torch.rand(61, 1, generator=g, dtype=dtype))
    ks = (1, 2, 5, 10, 30)
    expected_recall, expected_map = _grouped_brute_force(prototypes, groups.tolist(), labels.tolist(), ks)
    assert recall_at_k(embeddings, labels, ks, chunk_size=chunk_size) == pytest.approx(
        expected_recall, abs=1e-12
    )
    assert map_at_r(embeddings, labels, chunk_size=chunk_size) == pytest.approx(expected_map, abs=1e-12)
    # 1-NN ties against the query, like recall@1: its own label only if no other-label item is as
    # similar as its best same-label one; else the most similar other-label item's (lowest index).
    nn = nearest_neighbour_labels(embeddings, labels, chunk_size=chunk_size)
    assert (nn == labels).double().mean().item() == pytest.approx(expected_recall["recall@1"], abs=1e-12)
    cos = (
        torch.nn.functional.normalize(prototypes.double(), dim=1)
        @ torch.nn.functional.normalize(prototypes.double(), dim=1).T
    )
    for i in range(61):
        others = [j for j in range(61) if j != i]
        best_same = max((cos[groups[i], groups[j]] for j in others if labels[j] == labels[i]), default=-2.0)
        best_other = max(cos[groups[i], groups[j]] for j in others if labels[j] != labels[i])
        if best_same > best_other:
            assert nn[i] == labels[i]
        else:
            first = next(
                j for j in others if labels[j] != labels[i] and cos[groups[i], groups[j]] == best_other
            )
            assert nn[i] == labels[first], i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
@pytest.mark.parametrize("scaled", [False, True])
def test_fully_collapsed_embedding_scores_zero(dtype: torch.dtype, chunk_size: int, scaled: bool) -> None:
    # The case that used to give recall@10 ≈ 0.98 in float64: N = 191, D = 69, 4 balanced classes.
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        embeddings = torch.randn(1, 69, generator=g, dtype=dtype).expand(191, 69).contiguous()
        if scaled:
            embeddings = embeddings * (0.1 + 10 * torch.rand(191, 1, generator=g, dtype=dtype))
        labels = torch.arange(191) % 4
        # Classes of 48, 48, 48, 47: a query has 143 or 144 other-label items, all tied with its own.
        recall = recall_at_k(embeddings, labels, ks=(1, 10, 143, 145), chunk_size=chunk_size)
        assert recall["recall@1"] == recall["recall@10"] == recall["recall@143"] == 0.0
        assert recall["recall@145"] == 1.0
        assert map_at_r(embeddings, labels, chunk_size=chunk_size) == 0.0
        assert first_relevant_rank(embeddings, labels, chunk_size).tolist() == [
            1 + int((labels != labels[i]).sum()) for i in range(191)
        ]
        # The 1-NN label follows the same rule: always another label (the lowest-index one), so the
        # retrieval ECE of the collapsed embedding is 1, never the storage order's accident.
        nn = nearest_neighbour_labels(embeddings, labels, chunk_size)
        assert nn.tolist() == [1 if label == 0 else 0 for label in labels.tolist()]
        assert retrieval_ece(embeddings.expand(3, -1, -1), labels, chunk_size=chunk_size) == 1.0


@pytest.mark.parametrize("classes", [12, 30])
def test_map_at_r_matches_brute_force_with_few_items_per_label(classes: int) -> None:
    # R ≪ N: mAP@R reads only each query's R most similar other-label items (a partial sort), so
    # most rows are cut far before their end; the brute-force loop ranks every item.
    embeddings, labels = _toy(n=90, d=6, c=classes, seed=5)
    _, expected_map = _brute_force(embeddings, labels, (1,))
    for chunk_size in (1, 13, 1024):
        assert map_at_r(embeddings, labels, chunk_size=chunk_size) == pytest.approx(expected_map, abs=1e-12)
