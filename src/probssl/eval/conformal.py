"""Conformal outlier p-values and the combined detector declared in docs/methods.md §5.

Bates, Candès, Lei, Romano & Sesia, "Testing for outliers with conformal p-values" (Ann. Statist.
2023): a detector score s (higher = more OOD) becomes a p-value against the scores of
in-distribution *calibration* images that the detector's reference did not include,

    p(x) = (1 + #{i : s(cᵢ) ≥ s(x)}) / (n + 1),

valid — P(p(x) ≤ α) ≤ α — whenever x is exchangeable with the calibration images. Ties count against
x (≥), which keeps that true for discrete scores. The combined detector is Tippett's minimum of the
members' p-values against calibration fold A, itself turned into a conformal p-value on a second,
disjoint fold B (smaller minimum = more OOD, so ties again count against x):

    m(x) = min_j p_j(x),    p_combined(x) = (1 + #{c ∈ B : m(c) ≤ m(x)}) / (|B| + 1).

Beyond the largest fold-A score every conformal p-value is the floor 1/(|A| + 1), so the minimum
cannot tell an image just past one member's calibration range from one far past it; there the fold-A
p-value continues as an exponential tail, 1/(|A| + 1) · exp(−(s − max_A) / β), with β the mean
excess of fold A's top decile over its 90% quantile (the maximum-likelihood exponential fit of a
peaks-over-threshold model). That only orders the images the floor would tie (the amendment of
docs/methods.md §5); validity comes from fold B whatever the order.

The members, the rule and the folds are fixed in docs/methods.md §5 and never chosen by an OOD
set's numbers. Nothing here knows a method or a detector by its mechanics: only named score tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from probssl.eval.splits import stratified_split

FEATURE_MEMBERS = ("knn1", "mahalanobis_raw", "mahalanobis", "ssd")
"""The combined detector's feature-space members (docs/methods.md §5)."""

OWN_MEMBER = "emb"
"""The method's own uncertainty: a member where the method has one (``combined``), left out in
``combined_features``, so its contribution is the difference, paired within a run."""

ALPHAS = (0.01, 0.05, 0.1)
"""Levels at which the realized false-positive rate is reported (``ood/id/combined/fpr@<α>``)."""

DEFAULT_ALPHA = 0.05
"""``probssl embed --alpha``: flag an image when its combined p-value is below this level."""


def _scores(values: Tensor, name: str) -> Tensor:
    values = torch.as_tensor(values).detach().cpu().double()
    if values.dim() != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {tuple(values.shape)}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return values


def conformal_pvalues(calibration: Tensor, scores: Tensor) -> Tensor:
    """[M] float64 p = (1 + #{i : calibration_i ≥ score}) / (n + 1), higher score = more OOD.

    Vectorised: with the calibration scores sorted ascending, ``searchsorted(..., side='left')``
    is #{i : c_i < s}, so #{c_i ≥ s} is n minus it — ties counted against the query.
    """
    calibration = _scores(calibration, "calibration scores")
    scores = _scores(scores, "scores")
    if calibration.numel() == 0:
        raise ValueError("conformal p-values need at least one calibration score")
    ordered = torch.sort(calibration).values
    at_least = ordered.numel() - torch.searchsorted(ordered, scores, side="left")
    return (1.0 + at_least.double()) / (ordered.numel() + 1)


TAIL_QUANTILE = 0.9
"""The exponential tail of a fold-A p-value is fitted to the scores above this quantile of fold A."""


def exponential_tail_scale(calibration: Tensor) -> float:
    """β: the mean excess of the calibration scores above their ``TAIL_QUANTILE`` order statistic.

    The maximum-likelihood scale of an exponential fitted to the peaks over that threshold (a
    generalised Pareto tail of shape 0). ``inf`` when no score exceeds the threshold (a constant
    top decile): the tail is then flat and the floor's ties stay ties.
    """
    ordered = torch.sort(_scores(calibration, "calibration scores")).values
    if ordered.numel() == 0:
        raise ValueError("the tail scale needs at least one calibration score")
    threshold = ordered[min(int(math.ceil(TAIL_QUANTILE * ordered.numel())), ordered.numel()) - 1]
    excess = ordered[ordered > threshold] - threshold
    scale = float(excess.mean()) if excess.numel() else 0.0
    return scale if scale > 0.0 else math.inf


def tail_pvalues(calibration: Tensor, scores: Tensor, scale: float) -> Tensor:
    """:func:`conformal_pvalues`, continued beyond the largest calibration score by an exponential tail:
    (1/(n + 1)) · exp(−(s − max) / ``scale``). Equal to the conformal p-value wherever s ≤ max; below
    the floor 1/(n + 1) only for scores past every calibration score, ordered by how far past."""
    p = conformal_pvalues(calibration, scores)
    top = float(torch.max(_scores(calibration, "calibration scores")))
    beyond = _scores(scores, "scores") > top
    if math.isfinite(scale) and bool(beyond.any()):
        excess = _scores(scores, "scores")[beyond] - top
        p[beyond] = p[beyond] * torch.exp(-excess / scale)
    return p


def smallest_pvalue(calibration_items: int) -> float:
    """1 / (n + 1): no conformal p-value against n calibration scores is smaller."""
    return 1.0 / (calibration_items + 1)


def flagged_fraction(pvalues: Tensor, alpha: float) -> float:
    """Share of p-values below ``alpha``: the realized false-positive rate on in-distribution images
    (valid p-values keep it ≤ α in expectation), the true-positive rate on OOD images."""
    check_alpha(alpha)
    pvalues = _scores(pvalues, "p-values")
    if pvalues.numel() == 0:
        raise ValueError("no p-values to count")
    return float((pvalues < alpha).double().mean())


def check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, int | float) and 0.0 < alpha < 1.0):
        raise ValueError(f"alpha must lie strictly between 0 and 1 (e.g. 0.05), got {alpha}")


def unreachable_alpha_message(alpha: float, calibration_items: int) -> str | None:
    """A warning when no p-value against ``calibration_items`` scores can fall below ``alpha``."""
    smallest = smallest_pvalue(calibration_items)
    if smallest < alpha:
        return None
    needed = math.floor(1 / alpha)
    needed += smallest_pvalue(needed) >= alpha  # float rounding of 1/α
    return (
        f"the combined p-value is calibrated on {calibration_items} images: the smallest reachable "
        f"p-value is 1/{calibration_items + 1} = {smallest:.4g} >= alpha = {alpha:g}, so no image can be "
        f"flagged; use an alpha above {smallest:.4g}, or a run whose calibration fold holds at least "
        f"{needed} images (a larger training split)"
    )


@dataclass(frozen=True)
class CalibrationSplit:
    """Index sets of the images that calibrate (fold A ∪ fold B) and of the ``rest``: the scored
    half of the test split in ``probssl eval``, the detectors' reference (the training split less
    the calibration slice) in ``probssl embed``. Sorted index tensors into the split they cut.
    """

    fold_a: Tensor
    fold_b: Tensor
    rest: Tensor

    @property
    def calibration(self) -> Tensor:
        return torch.sort(torch.cat([self.fold_a, self.fold_b])).values

    @classmethod
    def of(cls, labels: Tensor, seed: int, fraction: float = 0.5) -> CalibrationSplit:
        """``fraction`` of each class calibrates, cut once more, stratified, into folds A and B of
        (nearly) equal size (docs/methods.md §5). Seeded, so a run's split is fixed; unlabelled
        images (every label the same) are one stratum."""
        rest, calibration = stratified_split(labels, fraction, seed)
        keep, held = stratified_split(labels[calibration], 0.5, seed + 1)
        fold_a, fold_b = calibration[keep], calibration[held]
        if fold_a.numel() == 0 or fold_b.numel() == 0:
            raise ValueError(
                f"{labels.numel()} images are too few to cut {fraction:g} of them into two calibration folds"
            )
        return cls(fold_a=fold_a, fold_b=fold_b, rest=rest)


def tippett_minimum(pvalues: Mapping[str, Tensor], members: Sequence[str]) -> Tensor:
    """[M] the smallest of the members' p-values (Tippett's combination)."""
    missing = [name for name in members if name not in pvalues]
    if not members or missing:
        raise ValueError(f"need a p-value for every member {tuple(members)}; missing {missing}")
    return torch.stack([pvalues[name] for name in members]).amin(dim=0)


def combined_members(available: Sequence[str], with_own: bool = True) -> tuple[str, ...]:
    """The declared members among the ``available`` scores: ``FEATURE_MEMBERS`` and, with
    ``with_own``, ``OWN_MEMBER`` when the method reports one."""
    members = tuple(name for name in FEATURE_MEMBERS if name in available)
    if with_own and OWN_MEMBER in available:
        members += (OWN_MEMBER,)
    return members


@dataclass
class ConformalDetector:
    """Per-member conformal p-values and their Tippett combination, re-calibrated on fold B.

    ``fold_a``: each member's calibration scores on fold A (sorted); ``pooled``: on A ∪ B, for the
    members' own p-values; ``fold_b_minimum``: m(c) of every fold-B image (sorted). Built from
    calibration scores only; applying it never sees another image's score.
    """

    members: tuple[str, ...]
    fold_a: dict[str, Tensor]
    pooled: dict[str, Tensor]
    fold_b_minimum: Tensor
    tail_scale: dict[str, float]

    @classmethod
    def fit(
        cls, scores_a: Mapping[str, Tensor], scores_b: Mapping[str, Tensor], members: Sequence[str]
    ) -> ConformalDetector:
        """Fold-A and fold-B scores of (at least) every member, higher = more OOD."""
        members = tuple(members)
        if not members:
            raise ValueError("the combined detector needs at least one member")
        fold_a = {name: torch.sort(_scores(scores_a[name], name)).values for name in members}
        fold_b = {name: _scores(scores_b[name], name) for name in members}
        pooled = {name: torch.sort(torch.cat([fold_a[name], fold_b[name]])).values for name in members}
        scale = {name: exponential_tail_scale(fold_a[name]) for name in members}
        detector = cls(members, fold_a, pooled, torch.empty(0, dtype=torch.float64), scale)
        detector.fold_b_minimum = torch.sort(detector.minimum(fold_b)).values
        return detector

    @property
    def calibration_items(self) -> int:
        """|B|: the combined p-value's calibration size (its smallest value is 1/(|B| + 1))."""
        return int(self.fold_b_minimum.numel())

    def member_pvalues(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each member's own p-value against A ∪ B (``pvalue/<member>``)."""
        return {name: conformal_pvalues(self.pooled[name], scores[name]) for name in self.members}

    def minimum(self, scores: Mapping[str, Tensor]) -> Tensor:
        """[M] m(x): the smallest member p-value against fold A, each with its exponential tail
        (:func:`tail_pvalues`) so that images past every fold-A score are not all tied at the floor."""
        return tippett_minimum(
            {n: tail_pvalues(self.fold_a[n], scores[n], self.tail_scale[n]) for n in self.members},
            self.members,
        )

    def pvalue(self, scores: Mapping[str, Tensor]) -> Tensor:
        """[M] the combined p-value: Tippett's minimum against fold A, calibrated on fold B."""
        minimum = self.minimum(scores)
        at_most = torch.searchsorted(self.fold_b_minimum, minimum, side="right")  # #{m(c) ≤ m(x)}
        return (1.0 + at_most.double()) / (self.calibration_items + 1)

    def state(self, prefix: str) -> dict[str, Tensor]:
        """Tensors to store (``from_state`` reads them back)."""
        out = {f"{prefix}/fold_b_minimum": self.fold_b_minimum}
        for name in self.members:
            out[f"{prefix}/fold_a/{name}"] = self.fold_a[name]
            out[f"{prefix}/pooled/{name}"] = self.pooled[name]
            out[f"{prefix}/tail_scale/{name}"] = torch.tensor([self.tail_scale[name]], dtype=torch.float64)
        return out

    @classmethod
    def from_state(
        cls, tensors: Mapping[str, Tensor], prefix: str, members: Sequence[str]
    ) -> ConformalDetector:
        members = tuple(members)
        return cls(
            members,
            {name: tensors[f"{prefix}/fold_a/{name}"] for name in members},
            {name: tensors[f"{prefix}/pooled/{name}"] for name in members},
            tensors[f"{prefix}/fold_b_minimum"],
            {name: float(tensors[f"{prefix}/tail_scale/{name}"][0]) for name in members},
        )


COMBINED = "combined"
"""The reference detector of every table: Tippett's minimum over ``FEATURE_MEMBERS`` and ``emb``."""

COMBINED_FEATURES = "combined_features"
"""The same rule without the method's own uncertainty (equal to ``combined`` for a method without one)."""


def fit_combined(scores: Mapping[str, Tensor], split: CalibrationSplit) -> dict[str, ConformalDetector]:
    """``combined`` and ``combined_features`` from every image's detector scores, calibrated on the
    split's folds (the scores of ``split.rest`` are never read)."""
    detectors = {}
    for name, with_own in ((COMBINED, True), (COMBINED_FEATURES, False)):
        members = combined_members(list(scores), with_own)
        fold_a = {member: scores[member][split.fold_a] for member in members}
        fold_b = {member: scores[member][split.fold_b] for member in members}
        detectors[name] = ConformalDetector.fit(fold_a, fold_b, members)
    return detectors
