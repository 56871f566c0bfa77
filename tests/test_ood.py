"""OOD scores and detection metrics against scikit-learn, with ties and degenerate detectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from probssl.eval.ood import (
    OOD_POSITIVE_CLASS,
    average_ranks,
    entropy_score,
    msp_score,
    mutual_information_score,
    ood_metrics,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _reference(score_in: np.ndarray, score_out: np.ndarray) -> dict[str, float]:
    """scikit-learn with OOD = 1; FPR95 read off the full (undropped) ROC curve."""
    y = np.r_[np.zeros(score_in.size), np.ones(score_out.size)]
    s = np.r_[score_in, score_out]
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, s),
        "aupr_in": average_precision_score(1 - y, -s),
        "aupr_out": average_precision_score(y, s),
        "fpr95": fpr[np.searchsorted(tpr, 0.95, side="left")],
    }


def _assert_matches(score_in: np.ndarray, score_out: np.ndarray) -> None:
    got = ood_metrics(torch.from_numpy(score_in), torch.from_numpy(score_out))
    expected = _reference(score_in, score_out)
    assert set(got) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    assert all(isinstance(v, float) for v in got.values())
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_continuous_scores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    _assert_matches(rng.normal(0.0, 1.0, 150), rng.normal(0.8, 1.2, 90))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_with_heavy_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    _assert_matches(rng.integers(0, 5, 70).astype(float), rng.integers(1, 6, 40).astype(float))


def test_fpr95_with_tie_group_at_the_threshold() -> None:
    # 20 OOD: 18 at 2.0 and 2 at 1.0; reaching 95% needs the tie group at 1.0, which holds 3 of 4 ID.
    score_out = np.r_[np.full(18, 2.0), np.full(2, 1.0)]
    score_in = np.array([1.0, 1.0, 1.0, 0.0])
    assert ood_metrics(torch.from_numpy(score_in), torch.from_numpy(score_out))["fpr95"] == 0.75
    _assert_matches(score_in, score_out)


def test_perfect_detector() -> None:
    metrics = ood_metrics(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.9]))
    assert metrics == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0}


def test_inverted_detector() -> None:
    metrics = ood_metrics(torch.tensor([0.5, 0.9]), torch.tensor([0.1, 0.2, 0.3]))
    assert metrics["auroc"] == 0.0 and metrics["fpr95"] == 1.0


def test_constant_score_is_chance() -> None:
    metrics = ood_metrics(torch.zeros(6), torch.zeros(4))
    assert metrics["auroc"] == 0.5
    assert metrics["aupr_out"] == pytest.approx(0.4) and metrics["aupr_in"] == pytest.approx(0.6)
    assert metrics["fpr95"] == 1.0  # the only threshold flags everything
    _assert_matches(np.zeros(6), np.zeros(4))


def test_positive_class_constant() -> None:
    assert OOD_POSITIVE_CLASS == "ood"


def test_average_ranks_match_scipy() -> None:
    values = np.array([3.0, 1.0, 3.0, 2.0, 1.0, 3.0, 0.5])
    np.testing.assert_array_equal(average_ranks(values), rankdata(values, method="average"))


def test_msp_and_entropy_hand_worked() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    torch.testing.assert_close(msp_score(probs), torch.tensor([-1.0, -0.5, -1 / 3], dtype=torch.float64))
    torch.testing.assert_close(
        entropy_score(probs), torch.tensor([0.0, math.log(2), math.log(3)], dtype=torch.float64)
    )
    # Higher = more OOD: the uniform prediction gets the highest score under both criteria.
    assert msp_score(probs).argmax() == 2 and entropy_score(probs).argmax() == 2


def test_mutual_information() -> None:
    g = torch.Generator().manual_seed(0)
    one_sample = torch.softmax(torch.randn(1, 8, 4, generator=g), dim=-1)
    assert torch.equal(mutual_information_score(one_sample), torch.zeros(8, dtype=torch.float64))
    agreeing = one_sample.expand(5, 8, 4)
    torch.testing.assert_close(mutual_information_score(agreeing), torch.zeros(8, dtype=torch.float64))
    # Two confident samples that disagree: total entropy log 2, expected entropy 0 -> MI = log 2.
    disagreeing = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    torch.testing.assert_close(
        mutual_information_score(disagreeing), torch.tensor([math.log(2)], dtype=torch.float64)
    )
    # General case against an explicit formula.
    samples = torch.softmax(torch.randn(6, 8, 4, generator=g, dtype=torch.float64), dim=-1)
    mean = samples.mean(0)
    expected = -(mean * mean.log()).sum(-1) + (samples * samples.log()).sum(-1).mean(0)
    torch.testing.assert_close(mutual_information_score(samples), expected)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        ood_metrics(torch.tensor([]), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        ood_metrics(torch.tensor([float("nan")]), torch.tensor([1.0]))
    with pytest.raises(ValueError):
        mutual_information_score(torch.ones(3, 2))
