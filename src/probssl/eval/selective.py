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

Counts over a few cut points (the accuracy of each uncertainty quantile, a sparsification curve's
points) are computed exactly, as fractions (``expected_counts_at``): in floating point the linear
interpolation leaves bins that are equal in exact arithmetic 1–3 ulp apart, and a rank correlation
over the bins (``bench.tables.uncertainty_trends``) then reads the rounding as a trend. Exactly, a
constant uncertainty gives bins that are equal to the last bit, and a rank correlation sees true ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

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


def _tie_groups(uncertainty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, bounds): the stable ascending order of ``uncertainty`` and the sorted positions where its
    tie groups start, followed by N. Ties are exact equality: nothing else orders two samples."""
    order = np.argsort(uncertainty, kind="mergesort")
    ordered = uncertainty[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    return order, np.r_[starts, uncertainty.size]


def expected_cumulative(uncertainty: np.ndarray, values: np.ndarray) -> np.ndarray:
    """E[Σ of ``values`` over the k least uncertain samples], for k = 0..N (length N + 1).

    Samples are sorted by uncertainty ascending; within a tie group occupying sorted positions
    [s, e) the expectation over a random order of the group is linear in k:
    C(k) = C(s) + (k − s)/(e − s) · (C(e) − C(s)). Without ties this is the plain cumulative sum.
    Float64, so exact only up to rounding: where equal values matter, use :func:`expected_counts_at`.
    """
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    n = uncertainty.size
    order, bounds = _tie_groups(uncertainty)
    starts, ends = bounds[:-1], bounds[1:]
    cumulative = np.r_[0.0, np.cumsum(values[order])]
    group = np.searchsorted(bounds, np.arange(n), side="right") - 1  # group of the k-th sorted sample
    start, end = starts[group], ends[group]
    k = np.arange(1, n + 1)
    expected = cumulative[start] + (k - start) / (end - start) * (cumulative[end] - cumulative[start])
    return np.r_[0.0, expected]


def expected_counts_at(uncertainty: np.ndarray, hits: np.ndarray, ks: Sequence[int]) -> list[Fraction]:
    """:func:`expected_cumulative` of the boolean ``hits`` at the positions ``ks``, as exact fractions.

    Each tie group counts as a unit: its h hits are spread evenly over its e − s positions, so the
    expected count at k inside the group is C(s) + (k − s)·h/(e − s) — an integer plus a fraction of
    integers, computed with ``fractions.Fraction``. Only the len(ks) cut points are exact (Python
    arithmetic), so this is for a handful of points (quantile bounds), not for all N + 1.
    """
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    order, bounds = _tie_groups(uncertainty)
    cumulative = np.r_[0, np.cumsum(np.asarray(hits, dtype=bool)[order], dtype=np.int64)]
    out = []
    for k in ks:
        if not 0 <= k <= uncertainty.size:
            raise ValueError(f"position {k} outside 0..{uncertainty.size}")
        group = int(np.searchsorted(bounds, k, side="right")) - 1
        start = int(bounds[group])
        count = Fraction(int(cumulative[start]))
        if k > start:  # inside a tie group: its share of the group's hits
            end = int(bounds[group + 1])
            count += Fraction((k - start) * int(cumulative[end] - cumulative[start]), end - start)
        out.append(count)
    return out


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
    invariant to the input order. Each bin is the exact fraction rounded once to float
    (:func:`expected_counts_at`): bins that are equal — every bin of a constant uncertainty, the bins
    inside one tie group — are equal floats.
    """
    if num_quantiles < 1:
        raise ValueError(f"num_quantiles must be >= 1, got {num_quantiles}")
    u, c = _check_inputs(uncertainty, correct)
    base, extra = divmod(u.size, num_quantiles)
    bounds = [i * base + min(i, extra) for i in range(num_quantiles + 1)]
    counts = expected_counts_at(u, c, bounds)
    return [
        float((counts[i + 1] - counts[i]) / (hi - lo)) if hi > lo else None
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
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
