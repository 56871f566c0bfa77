"""Calibration metrics: brute-force loops, hand-worked cases, bin edges, confidence exactly 1."""

from __future__ import annotations

import json
import math

import pytest
import torch

from probssl.eval.calibration import (
    adaptive_ece,
    bin_index,
    binned_ece,
    calibration_metrics,
    ece,
    reliability_diagram,
)
from probssl.eval.metrics import brier, nll, top1

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _random_probs(n: int = 200, c: int = 5, seed: int = 0, sharpness: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(sharpness * torch.randn(n, c, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    return probs, labels


def _brute_force_ece(confidences: list[float], correct: list[bool], num_bins: int) -> float:
    """Plain loop over bins (lo, hi], the first bin also taking 0 and the last closed at 1."""
    total = 0.0
    n = len(confidences)
    for b in range(num_bins):
        lo, hi = b / num_bins, (b + 1) / num_bins
        members = [i for i, c in enumerate(confidences) if (lo < c <= hi) or (b == 0 and c == 0.0)]
        if not members:
            continue
        conf = sum(confidences[i] for i in members) / len(members)
        acc = sum(correct[i] for i in members) / len(members)
        total += len(members) / n * abs(acc - conf)
    return total


def _brute_force_adaptive(confidences: list[float], correct: list[bool], num_bins: int) -> float:
    order = sorted(range(len(confidences)), key=lambda i: confidences[i])  # Python's sort is stable
    n = len(order)
    base, extra = divmod(n, num_bins)
    total, start = 0.0, 0
    for b in range(num_bins):
        size = base + (1 if b < extra else 0)
        group = order[start : start + size]
        start += size
        if group:
            total += abs(sum(correct[i] for i in group) - sum(confidences[i] for i in group)) / n
    return total


@pytest.mark.parametrize("num_bins", [1, 10, 15])
def test_ece_matches_brute_force(num_bins: int) -> None:
    probs, labels = _random_probs()
    conf, pred = probs.max(dim=1)
    expected = _brute_force_ece(conf.tolist(), (pred == labels).tolist(), num_bins)
    assert ece(probs, labels, num_bins) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("num_bins", [3, 15, 300])
def test_adaptive_ece_matches_brute_force(num_bins: int) -> None:
    probs, labels = _random_probs(n=97, seed=1)
    conf, pred = probs.max(dim=1)
    expected = _brute_force_adaptive(conf.tolist(), (pred == labels).tolist(), num_bins)
    assert adaptive_ece(probs, labels, num_bins) == pytest.approx(expected, abs=1e-12)


def test_hand_worked_ece() -> None:
    # Two bins: (0, .5] holds confidences .3 (wrong) -> |0 - .3|; (.5, 1] holds .6 (right), .8 (wrong).
    confidence = torch.tensor([0.3, 0.6, 0.8], dtype=torch.float64)
    correct = torch.tensor([False, True, False])
    expected = 1 / 3 * 0.3 + 2 / 3 * abs(0.5 - 0.7)
    assert binned_ece(confidence, correct, num_bins=2) == pytest.approx(expected, abs=1e-12)


def test_bin_edges_are_right_closed() -> None:
    # Exactly on an edge b/n goes to the bin below; 0 goes to the first bin, 1.0 to the last.
    confidence = torch.tensor([0.0, 0.2, 0.2 + 1e-12, 0.5, 1.0], dtype=torch.float64)
    assert bin_index(confidence, 5).tolist() == [0, 0, 1, 2, 4]
    assert bin_index(torch.tensor([1 / 15, 14 / 15], dtype=torch.float64), 15).tolist() == [0, 13]


@pytest.mark.parametrize(("all_correct", "expected"), [(True, 0.0), (False, 1.0)])
def test_confidence_exactly_one_counts_in_last_bin(all_correct: bool, expected: float) -> None:
    probs = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1]), 3).double()
    labels = probs.argmax(dim=1) if all_correct else (probs.argmax(dim=1) + 1) % 3
    assert ece(probs, labels) == expected
    assert adaptive_ece(probs, labels) == expected
    diagram = reliability_diagram(probs, labels)
    assert diagram["count"][-1] == 4 and sum(diagram["count"]) == 4
    assert diagram["accuracy"][-1] == (1.0 if all_correct else 0.0)


def test_single_class_is_perfectly_calibrated() -> None:
    probs = torch.ones(6, 1, dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.long)
    metrics = calibration_metrics(probs, labels)
    assert metrics == {"ece15": 0.0, "aece15": 0.0, "nll": 0.0, "brier": 0.0, "acc": 1.0}


def test_zero_confidence_goes_to_first_bin() -> None:
    assert binned_ece(torch.tensor([0.0, 0.0]), torch.tensor([True, False]), num_bins=4) == 0.5


def test_reliability_diagram_empty_bins_are_none_and_json_safe() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.55, 0.45]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0])
    diagram = reliability_diagram(probs, labels, num_bins=10)
    json.dumps(diagram, allow_nan=False)
    assert (
        len(diagram["bin_lower"]) == 10 and diagram["bin_lower"][0] == 0.0 and diagram["bin_upper"][-1] == 1.0
    )
    assert diagram["count"] == [0, 0, 0, 0, 0, 1, 0, 0, 1, 1]
    assert diagram["accuracy"][5] == 1.0 and diagram["accuracy"][8] == 0.0 and diagram["accuracy"][9] == 1.0
    assert diagram["confidence"][9] == pytest.approx(0.95)
    assert all(diagram[key][b] is None for key in ("confidence", "accuracy") for b in (0, 1, 2, 3, 4, 6, 7))
    # ECE is the count-weighted gap of the diagram (empty bins contribute nothing).
    gaps = sum(
        n / 3 * abs(a - c)
        for n, a, c in zip(diagram["count"], diagram["accuracy"], diagram["confidence"], strict=True)
        if n
    )
    assert ece(probs, labels, num_bins=10) == pytest.approx(gaps, abs=1e-12)


def test_calibration_metrics_reuses_basic_metrics() -> None:
    probs, labels = _random_probs(n=50, seed=2)
    metrics = calibration_metrics(probs, labels, num_bins=10)
    assert set(metrics) == {"ece10", "aece10", "nll", "brier", "acc"}
    assert metrics["nll"] == nll(probs, labels) and metrics["brier"] == brier(probs, labels)
    assert metrics["acc"] == top1(probs, labels)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert set(calibration_metrics(probs, labels)) == {"ece15", "aece15", "nll", "brier", "acc"}


def test_float_rounding_above_one_is_clamped() -> None:
    confidence = torch.tensor([1.0 + 1e-7, 1.0], dtype=torch.float64)
    assert binned_ece(confidence, torch.tensor([True, True])) == 0.0


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        binned_ece(torch.tensor([1.5]), torch.tensor([True]))
    with pytest.raises(ValueError):
        binned_ece(torch.tensor([0.5, 0.5]), torch.tensor([True]))
    with pytest.raises(ValueError):
        ece(torch.ones(2, 2) / 2, torch.zeros(2, dtype=torch.long), num_bins=0)
