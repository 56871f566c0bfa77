"""Selective prediction: AUROC of errors, AURC, Spearman and quantile accuracies vs independent code."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from probssl.eval.selective import (
    accuracy_by_quantile,
    aurc,
    expected_counts_at,
    expected_cumulative,
    risk_coverage_curve,
    selective_metrics,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _toy(n: int = 120, seed: int = 0, ties: bool = False):
    rng = np.random.default_rng(seed)
    uncertainty = rng.integers(0, 6, n).astype(float) if ties else rng.normal(size=n)
    # Errors more likely when uncertain, so the metrics are away from their chance values.
    correct = rng.random(n) > 1 / (1 + np.exp(-(uncertainty - uncertainty.mean())))
    return uncertainty, correct


def _brute_force_aurc(uncertainty: list[float], correct: list[bool]) -> float:
    order = sorted(range(len(uncertainty)), key=lambda i: uncertainty[i])
    risks, errors = [], 0
    for k, i in enumerate(order, start=1):
        errors += not correct[i]
        risks.append(errors / k)
    return sum(risks) / len(risks)


@pytest.mark.parametrize("ties", [False, True])
def test_matches_sklearn_and_scipy(ties: bool) -> None:
    u, c = _toy(ties=ties)
    metrics = selective_metrics(torch.from_numpy(u), torch.from_numpy(c))
    assert metrics["err_auroc"] == pytest.approx(roc_auc_score(~c, u), abs=1e-12)
    assert metrics["spearman"] == pytest.approx(spearmanr(u, ~c).statistic, abs=1e-12)
    assert metrics["err_auroc"] > 0.5 and metrics["spearman"] > 0
    assert len(metrics["acc_by_quantile"]) == 5


def test_aurc_matches_brute_force_without_ties() -> None:
    u, c = _toy(n=57, seed=3)
    assert aurc(torch.from_numpy(u), torch.from_numpy(c)) == pytest.approx(
        _brute_force_aurc(u.tolist(), c.tolist()), abs=1e-12
    )


def test_aurc_with_ties_is_the_average_over_tie_orders() -> None:
    # One tie group of four in the middle: average the brute force over all 24 orders of the group.
    u = np.array([0.1, 0.5, 0.5, 0.5, 0.5, 0.9, 0.2])
    c = np.array([True, False, True, True, False, False, True])
    tied = [1, 2, 3, 4]
    values = []
    for perm in itertools.permutations(tied):
        u_perm = u.copy()
        for rank, i in enumerate(perm):
            u_perm[i] = 0.5 + rank * 1e-3  # a strict order inside the group, still between 0.2 and 0.9
        values.append(_brute_force_aurc(u_perm.tolist(), c.tolist()))
    assert aurc(torch.from_numpy(u), torch.from_numpy(c)) == pytest.approx(np.mean(values), abs=1e-12)
    # Invariant to the input order.
    perm = np.random.default_rng(0).permutation(u.size)
    assert aurc(torch.from_numpy(u[perm]), torch.from_numpy(c[perm])) == pytest.approx(
        aurc(torch.from_numpy(u), torch.from_numpy(c)), abs=1e-12
    )


def test_hand_worked_aurc_and_curve() -> None:
    # Sorted by uncertainty: right, wrong, right, wrong -> risks 0, 1/2, 1/3, 2/4.
    u = torch.tensor([0.4, 0.1, 0.3, 0.2])
    c = torch.tensor([False, True, True, False])
    coverage, risk = risk_coverage_curve(u, c)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.5, 1 / 3, 0.5])
    assert aurc(u, c) == pytest.approx((0 + 0.5 + 1 / 3 + 0.5) / 4)


def test_constant_uncertainty_is_uninformative() -> None:
    c = torch.tensor([True, True, False, True, False, True, True, True, False, True])
    u = torch.zeros(10)
    metrics = selective_metrics(u, c)
    assert metrics["err_auroc"] == 0.5
    assert metrics["spearman"] == 0.0
    assert metrics["aurc"] == pytest.approx(0.3)  # the error rate at every coverage
    assert metrics["acc_by_quantile"] == pytest.approx([0.7] * 5)


@pytest.mark.parametrize("all_correct", [True, False])
def test_all_correct_or_all_wrong(all_correct: bool) -> None:
    u = torch.arange(6.0)
    c = torch.full((6,), all_correct)
    metrics = selective_metrics(u, c, num_quantiles=3)
    # nothing to rank: undefined (NaN), never a measured-looking 0.5 / 0.0; scikit-learn agrees
    assert math.isnan(metrics["err_auroc"]) and math.isnan(metrics["spearman"])
    with pytest.warns(UserWarning, match="Only one class"):
        assert math.isnan(roc_auc_score((~c).numpy(), u.numpy()))
    assert metrics["aurc"] == (0.0 if all_correct else 1.0)
    assert metrics["acc_by_quantile"] == [1.0 if all_correct else 0.0] * 3


def test_perfect_ranking() -> None:
    u = torch.arange(10.0)
    c = torch.arange(10) < 7  # the three most uncertain are the errors
    metrics = selective_metrics(u, c, num_quantiles=2)
    assert metrics["err_auroc"] == 1.0
    assert metrics["acc_by_quantile"] == [1.0, 0.4]
    assert metrics["aurc"] == pytest.approx(sum((k - 7) / k for k in range(8, 11)) / 10)


def test_quantile_bins_like_array_split_and_empty_bins() -> None:
    u = np.arange(7.0)
    c = np.array([True, True, False, True, False, False, True])
    expected = [float(np.mean(group)) for group in np.array_split(c, 3)]
    assert accuracy_by_quantile(torch.from_numpy(u), torch.from_numpy(c), 3) == pytest.approx(expected)
    assert accuracy_by_quantile(torch.tensor([0.0, 1.0]), torch.tensor([True, False]), 4) == [
        1.0,
        0.0,
        None,
        None,
    ]


def test_expected_cumulative_interpolates_ties() -> None:
    cumulative = expected_cumulative(np.array([1.0, 0.0, 1.0, 1.0]), np.array([1.0, 5.0, 0.0, 2.0]))
    np.testing.assert_allclose(cumulative, [0.0, 5.0, 6.0, 7.0, 8.0])


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        selective_metrics(torch.zeros(3), torch.tensor([True, False]))
    with pytest.raises(ValueError):
        selective_metrics(torch.zeros(2), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError):
        selective_metrics(torch.zeros(0), torch.zeros(0, dtype=torch.bool))


def test_counts_at_cut_points_are_exact_fractions() -> None:
    # A tie group of 7 with 3 hits straddles the cut at 5: 2 certain hits + 3 of 7 of the group's 3 hits.
    u = np.array([0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0])
    hits = np.array([True, True, True, False, True, False, False, True, False, True])
    assert expected_counts_at(u, hits, [0, 2, 5, 9, 10]) == [
        Fraction(0),
        Fraction(2),
        Fraction(2) + Fraction(3 * 3, 7),
        Fraction(5),
        Fraction(6),
    ]
    cumulative = expected_cumulative(u, hits)  # the float path agrees up to rounding
    assert [float(v) for v in expected_counts_at(u, hits, range(11))] == pytest.approx(cumulative, abs=1e-12)


@pytest.mark.parametrize("n", [10_000, 9_999, 12_345])
def test_constant_uncertainty_gives_bins_equal_to_the_last_bit(n: int) -> None:
    # Issue 28's reproducer: the interpolated float bins differed in the 16th digit.
    correct = torch.arange(n) < round(0.9123 * n)
    bins = accuracy_by_quantile(torch.full((n,), 0.3), correct)
    assert len(set(bins)) == 1
    assert bins[0] == float(Fraction(int(correct.sum()), n))


def test_two_valued_uncertainty_bins_are_exact() -> None:
    # 5,000 samples at 0 (all correct) and 5,000 at 1 (4,123 correct): the middle bin holds 1,000 of each.
    u = torch.cat([torch.zeros(5000), torch.ones(5000)])
    correct = torch.arange(10_000) < 9123
    expected = [1, 1, (1000 + Fraction(1000 * 4123, 5000)) / 2000, Fraction(4123, 5000), Fraction(4123, 5000)]
    assert accuracy_by_quantile(u, correct) == [float(f) for f in expected]
    perm = torch.randperm(10_000, generator=torch.Generator().manual_seed(0))  # the input order is irrelevant
    assert accuracy_by_quantile(u[perm], correct[perm]) == [float(f) for f in expected]
