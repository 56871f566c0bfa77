"""Conformal p-values, Tippett's combination and reliability vs brute force, scipy and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.isotonic import IsotonicRegression

from probssl.eval.calibration import binned_ece
from probssl.eval.conformal import (
    COMBINED,
    COMBINED_FEATURES,
    FEATURE_MEMBERS,
    CalibrationSplit,
    ConformalDetector,
    check_alpha,
    combined_members,
    conformal_pvalues,
    exponential_tail_scale,
    fit_combined,
    flagged_fraction,
    smallest_pvalue,
    tail_pvalues,
    unreachable_alpha_message,
)
from probssl.eval.reliability import Reliability, top_vote

pytestmark = pytest.mark.usefixtures("single_thread")


def _brute_pvalues(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return np.array([(1 + sum(c >= s for c in calibration)) / (len(calibration) + 1) for s in scores])


def test_pvalues_match_brute_force_with_ties() -> None:
    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 6, 40).astype(float)  # many ties, and queries equal to them
    scores = np.r_[rng.integers(-1, 8, 30).astype(float), calibration[:5]]
    got = conformal_pvalues(torch.from_numpy(calibration), torch.from_numpy(scores))
    np.testing.assert_array_equal(got.numpy(), _brute_pvalues(calibration, scores))
    assert got.dtype == torch.float64
    # The extremes: above every calibration score 1/(n + 1), at or below the smallest 1.
    assert float(conformal_pvalues(torch.tensor([1.0, 2.0]), torch.tensor([3.0]))) == smallest_pvalue(2)
    assert float(conformal_pvalues(torch.tensor([1.0, 2.0]), torch.tensor([1.0]))) == 1.0


def _brute_tail_scale(calibration: np.ndarray) -> float:
    """The mean excess over the ⌈0.9 n⌉-th smallest score (an exponential fitted to the top decile)."""
    ordered = np.sort(calibration)
    threshold = ordered[int(np.ceil(0.9 * len(ordered))) - 1]
    excess = ordered[ordered > threshold] - threshold
    return float(excess.mean()) if excess.size and excess.mean() > 0 else np.inf


def _brute_tail_pvalues(calibration: np.ndarray, scores: np.ndarray) -> np.ndarray:
    p = _brute_pvalues(calibration, scores)
    scale, top = _brute_tail_scale(calibration), calibration.max()
    return np.array(
        [q * np.exp(-(s - top) / scale) if s > top else q for q, s in zip(p, scores, strict=True)]
    )


def test_tail_pvalues_continue_the_floor_by_an_exponential_tail() -> None:
    rng = np.random.default_rng(7)
    calibration = rng.standard_normal(60)
    scores = np.r_[rng.standard_normal(30), calibration.max() + np.array([1e-9, 0.5, 1.0, 4.0, 40.0])]
    scale = exponential_tail_scale(torch.from_numpy(calibration))
    assert scale == pytest.approx(_brute_tail_scale(calibration), rel=1e-12)
    got = tail_pvalues(torch.from_numpy(calibration), torch.from_numpy(scores), scale).numpy()
    np.testing.assert_allclose(got, _brute_tail_pvalues(calibration, scores), rtol=1e-12, atol=0)
    inside = scores <= calibration.max()
    np.testing.assert_array_equal(got[inside], _brute_pvalues(calibration, scores[inside]))  # unchanged
    beyond = got[~inside]
    assert (beyond <= smallest_pvalue(60)).all() and (np.diff(beyond) < 0).all()  # the floor, ordered
    # The scale is the exponential's: on Exp(β) samples the peaks-over-threshold mean excess is β.
    exponential = torch.from_numpy(rng.exponential(2.5, 40_000))
    assert exponential_tail_scale(exponential) == pytest.approx(2.5, rel=0.05)
    # A flat top decile has no tail: the floor's ties stay ties rather than being ordered by nothing.
    flat = torch.tensor([0.0] * 5 + [1.0] * 20)
    assert exponential_tail_scale(flat) == float("inf")
    assert (tail_pvalues(flat, torch.tensor([2.0, 3.0]), float("inf")) == smallest_pvalue(25)).all()


def test_the_tail_orders_images_past_every_calibration_score() -> None:
    """The resolution defect of the plain minimum (docs/methods.md §5, amendment): with small folds, in-
    distribution images land on the floor 1/(|A| + 1) of *some* member as often as the OOD images that
    are far past every calibration score on one member, so the combined p-value cannot rank them.
    Synthetic members: five independent scores, the OOD set far out on one and inverted on the others."""
    from probssl.eval.ood import binary_auroc

    rng = np.random.default_rng(11)
    names = [f"d{j}" for j in range(5)]

    def members(size: int, ood: bool = False) -> dict[str, torch.Tensor]:
        out = {name: rng.standard_normal(size) - (2.0 if ood else 0.0) for name in names}
        if ood:
            out[names[0]] = rng.standard_normal(size) + 8.0
        return {name: torch.from_numpy(values) for name, values in out.items()}

    a, b, scored, outliers = members(60), members(60), members(270), members(270, ood=True)
    detector = ConformalDetector.fit(a, b, names)
    both = np.r_[detector.pvalue(scored).numpy(), detector.pvalue(outliers).numpy()]
    is_ood = np.r_[np.zeros(270, bool), np.ones(270, bool)]
    with_tail = binary_auroc(1.0 - both, is_ood)

    def plain(scores: dict[str, torch.Tensor]) -> np.ndarray:  # the rule without the tail, by brute force
        return np.min([_brute_pvalues(a[m].numpy(), scores[m].numpy()) for m in names], axis=0)

    m_b = plain(b)
    plain_p = [np.array([(1 + np.sum(m_b <= m)) / 61 for m in plain(s)]) for s in (scored, outliers)]
    without_tail = binary_auroc(1.0 - np.r_[plain_p[0], plain_p[1]], is_ood)
    best_single = binary_auroc(np.r_[scored[names[0]].numpy(), outliers[names[0]].numpy()], is_ood)
    assert best_single > 0.999
    assert without_tail < 0.98  # the defect: every OOD image tied with ~8% of the in-distribution ones
    assert with_tail > best_single - 0.005


def test_pvalues_refuse_nan_and_empty_calibration() -> None:
    with pytest.raises(ValueError, match="NaN"):
        conformal_pvalues(torch.tensor([1.0, float("nan")]), torch.tensor([0.0]))
    with pytest.raises(ValueError, match="at least one"):
        conformal_pvalues(torch.tensor([]), torch.tensor([0.0]))


def _randomised(pvalues: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """p − U/(n + 1): for continuous scores (no ties) exactly Uniform(0, 1) under exchangeability."""
    return pvalues - rng.random(pvalues.shape) / (n + 1)


def test_pvalues_are_uniform_for_exchangeable_scores_and_not_for_shifted_ones() -> None:
    rng = np.random.default_rng(1)
    trials, n = 3000, 49
    calibration = rng.standard_normal((trials, n))
    same, shifted = rng.standard_normal(trials), rng.standard_normal(trials) + 0.3

    def pvalues(queries: np.ndarray) -> np.ndarray:  # a fresh calibration set per query
        pairs = zip(calibration, queries, strict=True)
        return np.array([float(conformal_pvalues(torch.from_numpy(c), torch.tensor([x]))) for c, x in pairs])

    p_same, p_shift = pvalues(same), pvalues(shifted)
    assert stats.kstest(_randomised(p_same, n, rng), "uniform").pvalue > 0.01
    assert stats.kstest(_randomised(p_shift, n, rng), "uniform").pvalue < 1e-6  # the test can fail
    for alpha in (0.02, 0.05, 0.1):  # P(p ≤ α) ≤ α, within binomial error
        assert (p_same <= alpha).mean() <= alpha + 3 * np.sqrt(alpha / trials)


def _correlated_members(rng: np.random.Generator, size: int, shift: float = 0.0) -> dict[str, torch.Tensor]:
    """Four member scores sharing one latent factor (as detectors of the same features do), one of
    them a discrete score with many ties; ``shift`` moves one member only (an OOD set one detects)."""
    shared = rng.standard_normal(size)
    members = {name: shared + 0.6 * rng.standard_normal(size) for name in FEATURE_MEMBERS[:3]}
    members[FEATURE_MEMBERS[0]] += shift
    members[FEATURE_MEMBERS[3]] = np.round(shared + rng.standard_normal(size))
    return {name: torch.from_numpy(values) for name, values in members.items()}


def test_combined_pvalue_matches_brute_force() -> None:
    rng = np.random.default_rng(2)
    a, b, query = (_correlated_members(rng, n) for n in (30, 25, 40))
    detector = ConformalDetector.fit(a, b, FEATURE_MEMBERS)

    def minimum(scores: dict[str, torch.Tensor]) -> np.ndarray:
        return np.min([_brute_tail_pvalues(a[m].numpy(), scores[m].numpy()) for m in FEATURE_MEMBERS], axis=0)

    m_b, m_q = minimum(b), minimum(query)
    expected = np.array([(1 + np.sum(m_b <= m)) / (len(m_b) + 1) for m in m_q])
    np.testing.assert_array_equal(detector.pvalue(query).numpy(), expected)
    pooled = {m: torch.cat([a[m], b[m]]) for m in FEATURE_MEMBERS}
    for name, p in detector.member_pvalues(query).items():
        np.testing.assert_array_equal(p.numpy(), _brute_pvalues(pooled[name].numpy(), query[name].numpy()))
    assert detector.calibration_items == 25
    restored = ConformalDetector.from_state(detector.state("x"), "x", FEATURE_MEMBERS)
    torch.testing.assert_close(restored.pvalue(query), detector.pvalue(query))


def test_combined_pvalue_is_valid_with_correlated_members_and_the_raw_minimum_is_not() -> None:
    rng = np.random.default_rng(3)
    trials, size_a, size_b = 1000, 150, 149
    combined, raw_minimum, shifted = [], [], []
    for _ in range(trials):
        a, b = _correlated_members(rng, size_a), _correlated_members(rng, size_b)
        query = _correlated_members(rng, 1)
        detector = ConformalDetector.fit(a, b, FEATURE_MEMBERS)
        combined.append(float(detector.pvalue(query)))
        raw_minimum.append(min(float(p) for p in detector.member_pvalues(query).values()))
        shifted.append(float(detector.pvalue(_correlated_members(rng, 1, shift=3.0))))
    combined, raw_minimum = np.array(combined), np.array(raw_minimum)
    # Valid: the empirical CDF never rises above the uniform's (one-sided KS, the anti-conservative
    # side); discrete p-values on the grid k/(|B| + 1) make it super-uniform, not uniform.
    assert stats.kstest(combined, "uniform", alternative="greater").pvalue > 0.01
    assert (combined <= 0.1).mean() > 0.06  # and not uselessly conservative
    # Tippett's minimum of four p-values is not itself a p-value: the same test rejects it.
    assert stats.kstest(raw_minimum, "uniform", alternative="greater").pvalue < 1e-6
    # One member that detects a shift carries the combination.
    assert (np.array(shifted) < 0.05).mean() > 0.45


def test_calibration_split_is_stratified_disjoint_and_seeded() -> None:
    labels = torch.arange(203) % 7
    split = CalibrationSplit.of(labels, seed=5)
    parts = [split.fold_a, split.fold_b, split.rest]
    together = torch.cat(parts)
    assert together.numel() == 203 and torch.unique(together).numel() == 203
    for c in range(7):
        in_class = int((labels == c).sum())
        calibration = int((labels[split.calibration] == c).sum())
        assert calibration == round(in_class / 2) or calibration == in_class - 1
        assert abs(int((labels[split.fold_a] == c).sum()) - int((labels[split.fold_b] == c).sum())) <= 1
    again = CalibrationSplit.of(labels, seed=5)
    assert all(
        torch.equal(x, y) for x, y in zip(parts, [again.fold_a, again.fold_b, again.rest], strict=True)
    )
    assert not torch.equal(CalibrationSplit.of(labels, seed=6).rest, split.rest)
    slice_ = CalibrationSplit.of(torch.full((1000,), -1), seed=0, fraction=0.1)  # unlabelled: one stratum
    assert slice_.fold_a.numel() + slice_.fold_b.numel() == 100 and slice_.rest.numel() == 900


def test_fit_combined_members_and_own_uncertainty() -> None:
    rng = np.random.default_rng(4)
    scores = _correlated_members(rng, 60)
    scores["emb"] = torch.from_numpy(rng.standard_normal(60))
    scores["entropy"] = torch.from_numpy(rng.standard_normal(60))  # reported, never a member
    split = CalibrationSplit.of(torch.arange(60) % 3, seed=0)
    detectors = fit_combined(scores, split)
    assert detectors[COMBINED].members == (*FEATURE_MEMBERS, "emb")
    assert detectors[COMBINED_FEATURES].members == FEATURE_MEMBERS
    assert combined_members(["knn1", "ssd", "entropy"]) == ("knn1", "ssd")
    # The scored rows' scores are never read: changing them changes no calibration.
    changed = {name: value.clone() for name, value in scores.items()}
    for value in changed.values():
        value[split.rest] = 1e9
    refit = fit_combined(changed, split)
    torch.testing.assert_close(refit[COMBINED].pvalue(scores), detectors[COMBINED].pvalue(scores))


def test_flagged_fraction_alpha_checks_and_the_unreachable_warning() -> None:
    p = torch.tensor([0.01, 0.05, 0.2, 0.04])
    assert flagged_fraction(p, 0.05) == 0.5  # strictly below α
    for bad in (0.0, 1.0, -0.1, 2):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            check_alpha(bad)
    assert unreachable_alpha_message(0.05, 100) is None
    message = unreachable_alpha_message(0.01, 60)
    assert (
        message is not None
        and "1/61 = 0.01639 >= alpha = 0.01" in message
        and "at least 100 images" in message
    )
    assert "at least 33 images" in unreachable_alpha_message(0.03, 20)  # 1/34 < 0.03 <= 1/33
    assert unreachable_alpha_message(0.03, 33) is None and unreachable_alpha_message(0.01, 99) is not None


def test_reliability_is_scikit_learns_isotonic_fit_and_calibrates() -> None:
    rng = np.random.default_rng(5)
    share = rng.uniform(0.1, 1.0, 4000)
    correct = rng.random(4000) < share**3  # a vote share that overstates how often it is right
    model = Reliability.fit(torch.from_numpy(share[:2000]), torch.from_numpy(correct[:2000]))
    reference = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(share[:2000], correct[:2000])
    queries = np.r_[share[2000:], 0.0, 1.5]  # and beyond the fitted range: clipped
    np.testing.assert_allclose(
        model.predict(torch.from_numpy(queries)).numpy(), reference.predict(queries), atol=1e-12
    )
    held_share, held_correct = torch.from_numpy(share[2000:]), torch.from_numpy(correct[2000:])
    assert binned_ece(model.predict(held_share), held_correct) < 0.03
    assert binned_ece(held_share, held_correct) > 0.15  # the raw share is far from calibrated
    probs = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])
    share_, prediction = top_vote(probs)
    assert prediction.tolist() == [1, 0] and share_.tolist() == pytest.approx([0.7, 0.5])
