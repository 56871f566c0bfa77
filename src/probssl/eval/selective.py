"""Selective prediction: does the uncertainty know when the prediction is wrong? (design.md §4)

A useful uncertainty ranks a model's errors above its correct predictions, so abstaining on the
most uncertain inputs raises the accuracy of the rest. The metrics below measure that ranking from
per-sample ``uncertainty`` [N] (higher = less certain) and ``correct`` [N] (bool) alone.

Ties in uncertainty: when several samples share one uncertainty value, nothing in the score orders
them, so any quantity that depends on "the k most certain samples" is defined as its expectation
over a uniformly random order within each tie group. For cumulative counts this is exact linear
interpolation inside the tie group (``expected_cumulative``). It makes every metric invariant to the
input order and gives an uninformative constant score the value of a random ordering (AURC = error
rate, flat accuracy over quantiles) rather than whatever order the samples happened to arrive in.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from probssl.eval.ood import _as_numpy, average_ranks, binary_auroc


def _check_inputs(uncertainty: Tensor, correct: Tensor) -> tuple[np.ndarray, np.ndarray]:
    u = _as_numpy(uncertainty, "uncertainty")
    c = _as_numpy(correct, "correct")
    if u.shape != c.shape:
        raise ValueError(f"uncertainty and correct differ in shape: {u.shape} vs {c.shape}")
    if u.size == 0:
        raise ValueError("selective metrics need at least one prediction")
    if not np.isin(c, (0.0, 1.0)).all():
        raise ValueError("correct must be boolean (or 0/1)")
    return u, c.astype(bool)


def expected_cumulative(uncertainty: np.ndarray, values: np.ndarray) -> np.ndarray:
    """E[Σ of ``values`` over the k least uncertain samples], for k = 0..N (length N + 1).

    Samples are sorted by uncertainty ascending; within a tie group occupying sorted positions
    [s, e) the expectation over a random order of the group is linear in k:
    C(k) = C(s) + (k − s)/(e − s) · (C(e) − C(s)). Without ties this is the plain cumulative sum.
    """
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    n = uncertainty.size
    order = np.argsort(uncertainty, kind="mergesort")
    ordered = uncertainty[order]
    cumulative = np.r_[0.0, np.cumsum(values[order])]
    new_group = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], n]
    group = np.cumsum(new_group) - 1  # group of the k-th sorted sample, k = 1..N
    start, end = starts[group], ends[group]
    k = np.arange(1, n + 1)
    expected = cumulative[start] + (k - start) / (end - start) * (cumulative[end] - cumulative[start])
    return np.r_[0.0, expected]


def risk_coverage_curve(uncertainty: Tensor, correct: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Coverage k/N and selective risk (error rate of the k least uncertain samples), k = 1..N."""
    u, c = _check_inputs(uncertainty, correct)
    k = np.arange(1, u.size + 1)
    errors = expected_cumulative(u, ~c)[1:]
    return k / u.size, errors / k


def aurc(uncertainty: Tensor, correct: Tensor) -> float:
    """Area under the risk–coverage curve (Geifman & El-Yaniv 2017); lower is better.

    Discrete definition: AURC = (1/N) Σ_{k=1..N} risk(k), risk(k) = (number of errors among the k
    least uncertain samples) / k, with ties in uncertainty resolved in expectation (module docstring).
    A perfect ranking of an error rate e gives ≈ e + (1−e)·log(1−e); a random one gives e.
    """
    _, risk = risk_coverage_curve(uncertainty, correct)
    return float(risk.mean())


def error_auroc(uncertainty: Tensor, correct: Tensor) -> float:
    """AUROC of the uncertainty as a detector of errors (errors are the positive class).

    NaN when every prediction is correct or every one is wrong: with one class there is nothing to
    rank, and a 0.5 would read as a measured "no information" (scikit-learn's ``roc_auc_score``
    refuses the case). A constant uncertainty with both classes present *is* measured: 0.5, ties
    count ½ (average ranks).
    """
    u, c = _check_inputs(uncertainty, correct)
    if c.all() or not c.any():
        return math.nan
    return binary_auroc(u, ~c)


def spearman(uncertainty: Tensor, correct: Tensor) -> float:
    """Spearman rank correlation between uncertainty and the error indicator (1 = wrong).

    Pearson correlation of average ranks (scipy's ``spearmanr``); positive means more uncertain
    samples are more often wrong. NaN when every prediction is right (or every one wrong), as for
    :func:`error_auroc`; 0.0 for a constant uncertainty with both outcomes present (no association).
    """
    u, c = _check_inputs(uncertainty, correct)
    if c.all() or not c.any():
        return math.nan
    ranks_u = average_ranks(u)
    ranks_e = average_ranks((~c).astype(np.float64))
    ranks_u -= ranks_u.mean()
    ranks_e -= ranks_e.mean()
    denominator = np.sqrt((ranks_u**2).sum() * (ranks_e**2).sum())
    if denominator == 0.0:
        return 0.0
    return float((ranks_u * ranks_e).sum() / denominator)


def accuracy_by_quantile(uncertainty: Tensor, correct: Tensor, num_quantiles: int = 5) -> list[float | None]:
    """Accuracy in ``num_quantiles`` equal-count uncertainty bins, from most to least certain.

    Samples sorted by uncertainty ascending are split like ``numpy.array_split`` (the first
    N mod q bins hold one extra sample); a bin is ``None`` when N < q leaves it empty. Ties that
    straddle a bin boundary are shared in expectation (module docstring), so bin accuracies are
    invariant to the input order.
    """
    if num_quantiles < 1:
        raise ValueError(f"num_quantiles must be >= 1, got {num_quantiles}")
    u, c = _check_inputs(uncertainty, correct)
    cumulative = expected_cumulative(u, c)
    base, extra = divmod(u.size, num_quantiles)
    bounds = [i * base + min(i, extra) for i in range(num_quantiles + 1)]
    return [
        float((cumulative[hi] - cumulative[lo]) / (hi - lo)) if hi > lo else None
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def selective_metrics(uncertainty: Tensor, correct: Tensor, num_quantiles: int = 5) -> dict:
    """The selective-prediction block of ``eval.json`` (``sel/...``).

    Keys: ``err_auroc`` (``error_auroc``), ``aurc`` (``aurc``), ``spearman`` (``spearman``) — floats —
    and ``acc_by_quantile`` (``accuracy_by_quantile``, a list of length ``num_quantiles``).
    """
    return {
        "err_auroc": error_auroc(uncertainty, correct),
        "aurc": aurc(uncertainty, correct),
        "spearman": spearman(uncertainty, correct),
        "acc_by_quantile": accuracy_by_quantile(uncertainty, correct, num_quantiles),
    }
