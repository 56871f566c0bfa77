"""Pair mining and the contrastive pair loss of LAM, against hand computations and brute-force loops."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from probssl.losses.metric_learning import contrastive_pair_loss, mine_pairs

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _as_set(pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> set[tuple[int, int, bool]]:
    a, o, p = pairs
    return {(int(i), int(j), bool(s)) for i, j, s in zip(a, o, p, strict=True)}


def _circle(angles: list[float]) -> torch.Tensor:
    t = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([t.cos(), t.sin()], dim=1)


def test_all_pairs_counts_and_labels() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    anchor, other, is_pos = mine_pairs(labels, "all")
    assert int(is_pos.sum()) == 1 + 3  # C(2,2) + C(3,2)
    assert int((~is_pos).sum()) == 15 - 4  # the other pairs of C(6,2)
    assert bool((anchor < other).all())
    expected = {(i, j, bool(labels[i] == labels[j])) for i, j in itertools.combinations(range(6), 2)}
    assert _as_set((anchor, other, is_pos)) == expected
    assert len(expected) == anchor.numel()  # no duplicates


def test_semihard_hand_example() -> None:
    # Points on the unit circle; chordal distance between angles u, v is 2 sin(|u - v| / 2).
    # Only label 0 (points 0, 1) has positives: d(0,1) = 2 sin(0.15) = 0.299, interval (0.299, 0.999).
    # Anchor 0: d(0,2) = 0.200 (too hard), d(0,3) = 2 sin(0.325) = 0.639 (kept), d(0,4) = 1.363 (too easy).
    # Anchor 1: d(1,2) = 0.100 (too hard), d(1,3) = 2 sin(0.175) = 0.348 (kept), d(1,4) = 1.129 (too easy).
    z = _circle([0.0, 0.3, 0.2, 0.65, 1.5])
    labels = torch.tensor([0, 0, 1, 2, 3])
    got = _as_set(mine_pairs(labels, "semihard", embeddings=z, margin=0.7))
    assert got == {(0, 1, True), (0, 3, False), (1, 3, False)}


def test_semihard_falls_back_to_all_negatives() -> None:
    # Every negative is farther than d_ap + margin: no semihard negative, so all negatives are used.
    z = _circle([0.0, 0.1, 2.5, 3.0])
    labels = torch.tensor([0, 0, 1, 2])
    got = mine_pairs(labels, "semihard", embeddings=z, margin=0.7)
    assert _as_set(got) == _as_set(mine_pairs(labels, "all"))


def test_semihard_matches_triplet_loop() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(12, 3, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 3, (12,), generator=g)
    m = 0.7
    d = torch.cdist(z, z)
    expected = set()
    for a, n in itertools.permutations(range(12), 2):
        if labels[a] == labels[n]:
            continue
        for p in range(12):
            if p != a and labels[p] == labels[a] and d[a, p] < d[a, n] < d[a, p] + m:
                expected.add((min(a, n), max(a, n), False))
    expected |= {(i, j, True) for i, j in itertools.combinations(range(12), 2) if labels[i] == labels[j]}
    assert expected != _as_set(mine_pairs(labels, "all"))  # the rule must drop some negatives here
    assert _as_set(mine_pairs(labels, "semihard", embeddings=z, margin=m)) == expected


def test_semihard_needs_embeddings_and_strategy_is_checked() -> None:
    with pytest.raises(ValueError):
        mine_pairs(torch.tensor([0, 1]), "semihard")
    with pytest.raises(ValueError):
        mine_pairs(torch.tensor([0, 1]), "hardest")


def test_loss_by_hand_three_points() -> None:
    z = _circle([0.0, math.pi / 2, 0.5])
    labels = torch.tensor([0, 0, 1])
    m = 0.7
    # (0,1) positive: d^2 = 2 -> 1.0; (0,2) negative: d = 2 sin(0.25) < m -> ½(m - d)^2;
    # (1,2) negative: d = 2 sin((π/2 - 0.5)/2) = 1.02 > m -> 0.
    d02 = 2 * math.sin(0.25)
    expected = (1.0 + 0.5 * (m - d02) ** 2 + 0.0) / 3
    got = contrastive_pair_loss(z, mine_pairs(labels, "all"), margin=m)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_zero_loss_cases_and_finite_gradients() -> None:
    z = _circle([0.4, 0.4]).requires_grad_(True)
    loss = contrastive_pair_loss(z, mine_pairs(torch.tensor([0, 0]), "all"))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z.grad, torch.zeros_like(z))

    far = _circle([0.0, 2.0])  # d = 2 sin(1) = 1.68 > 0.7
    assert contrastive_pair_loss(far, mine_pairs(torch.tensor([0, 1]), "all")).item() == 0.0

    same = _circle([1.0, 1.0]).requires_grad_(True)  # identical negatives: ½ m², finite gradient
    loss = contrastive_pair_loss(same, mine_pairs(torch.tensor([0, 1]), "all"), margin=0.7)
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * 0.7**2, rel=1e-5)  # d is floored at 1e-6
    assert bool(torch.isfinite(same.grad).all())


def test_empty_pairs_give_zero_attached_loss() -> None:
    z = torch.randn(1, 4, requires_grad=True)
    loss = contrastive_pair_loss(z, mine_pairs(torch.tensor([3]), "all"))
    loss.backward()
    assert loss.item() == 0.0 and z.grad is not None
