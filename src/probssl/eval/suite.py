"""The uncertainty evaluation suite (design.md §4): one function per protocol, all on cached features.

Every function takes feature banks (``[S, N, D]`` draws, so deterministic and probabilistic methods
go through the same code) and returns flat, prefixed metrics plus plot data for the report:

- ``cal/``    calibration of the marginalised linear probe on the test split
- ``sel/``    uncertainty vs error (predictive entropy for every method; ``sel/emb/`` the embedding's own)
- ``ood/<set>/``   OOD detection, every criterion "higher = more OOD", OOD is the positive class:
  the probe's MSP / entropy / MI, the embedding's own uncertainty (``emb``) and the deterministic
  feature-space detectors (``FeatureDetectors``); ``ood/near/``, ``ood/far/`` group means
- ``shift/<corruption>/<severity>/``   accuracy, ECE and mean uncertainty under corruptions
- ``lowshot/``   1% / 10% labels, class-balanced fixed index files, 3 seeds
- ``transfer/<set>/``   a probe on a frozen encoder, fitted and tested on the two halves of another set
- ``ret/``    leave-one-out retrieval, sparsification (AUSC) and retrieval ECE; R-AUROC
- ``sel/crop_up``   the crop test (share of images whose own uncertainty rises on a small crop)

A metric that does not exist for a run is absent, never a stand-in value: ``emb`` criteria only for
methods with a per-input uncertainty, ``mi`` only with more than one sample.

The suite never sees a method: only features, labels and probabilities.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probssl.eval.calibration import binned_ece, calibration_metrics, reliability_diagram
from probssl.eval.conformal import (
    ALPHAS,
    DEFAULT_ALPHA,
    CalibrationSplit,
    combined_members,
    conformal_pvalues,
    flagged_fraction,
)
from probssl.eval.crop_test import CROP_AREA, crop_up_share, random_crops
from probssl.eval.feature_ood import (
    SSD_CLUSTERS,
    GaussianDetector,
    energy_score,
    kmeans_clusters,
    knn_scores,
    max_logit_score,
    ssd_detector,
)
from probssl.eval.features import FeatureBank
from probssl.eval.knn import NeighbourCache
from probssl.eval.linear import LinearProbe
from probssl.eval.metrics import top1
from probssl.eval.ood import entropy_score, msp_score, mutual_information_score, ood_metrics
from probssl.eval.ood_groups import GROUPS, ood_group
from probssl.eval.reliability import Reliability, top_vote
from probssl.eval.retrieval import (
    LeaveOneOut,
    leave_one_out,
    retrieval_ece,
    retrieval_metrics,
    sparsification,
)
from probssl.eval.selective import aurc, error_auroc, selective_metrics
from probssl.eval.splits import class_balanced_subset, stratified_split
from probssl.io import atomic_write_text

Metrics = dict[str, Any]


WARM_START_DRAWS = True
"""Whether the probe of posterior draw s starts from draw s − 1's probe (as a function of the raw
features) instead of from zero. Every fit converges to the same tolerance either way, so this moves
the cost, not the optimum: on digits and Fashion-MNIST runs top-1, NLL and ECE stayed within 0.002
of cold starts (≤ 0.0002 measured; tests/test_linear_probe.py; BENCHMARKS.md, "Evaluation you can defend")."""


@dataclass
class MarginalProbe:
    """One linear probe per embedding sample; predictions are averaged as probabilities (BMA)."""

    probes: list[LinearProbe]

    @classmethod
    def fit(
        cls, bank: FeatureBank, num_classes: int, warm_start: bool = WARM_START_DRAWS, **probe_kwargs: Any
    ) -> MarginalProbe:
        """The penalty is chosen on draw 0 (train split only) and reused for every other draw: the draws
        describe one posterior, so they share a regulariser. ``warm_start``: see ``WARM_START_DRAWS``.
        Warns when a probe did not converge (its numbers then depend on where it stopped)."""
        probes = [LinearProbe(**probe_kwargs).fit(bank.draws[0], bank.labels, num_classes)]
        for s in range(1, bank.num_samples):
            start = probes[-1] if warm_start else None
            probes.append(
                LinearProbe(**probe_kwargs).fit_fixed(
                    bank.draws[s], bank.labels, probes[0].selected_l2, num_classes, init=start
                )
            )
        marginal = cls(probes)
        if not marginal.converged:
            first = probes[0]
            warnings.warn(
                f"a linear probe did not converge within {first.max_iter} L-BFGS iterations (largest "
                f"final max|gradient|/loss {marginal.relative_gradient:.1e}, tolerance {first.tolerance:g}): "
                "its numbers depend on where it stopped",
                stacklevel=2,
            )
        return marginal

    @property
    def converged(self) -> bool:
        """Every fit of every draw's probe (selection candidates included) met the tolerance."""
        return all(probe.converged for probe in self.probes)

    @property
    def iterations(self) -> int:
        """The most L-BFGS iterations a draw's final fit took."""
        return max(probe.fitted.iterations for probe in self.probes if probe.fitted is not None)

    @property
    def gradient_norm(self) -> float:
        """The largest final max |∂L/∂(V, b)| over the draws' probes (preconditioned coordinates)."""
        return max(probe.fitted.gradient_norm for probe in self.probes if probe.fitted is not None)

    @property
    def relative_gradient(self) -> float:
        """The largest final max |∇L| / L over the draws' probes (converged: ≤ the tolerance)."""
        return max(probe.fitted.relative_gradient for probe in self.probes if probe.fitted is not None)

    @property
    def selected_l2(self) -> float:
        return self.probes[0].selected_l2

    def sample_probs(self, draws: Tensor) -> Tensor:
        """[S, M, C] probabilities, draw s through probe s (a single draw goes through every probe)."""
        count = max(len(self.probes), draws.shape[0])
        return torch.stack(
            [
                self.probes[min(s, len(self.probes) - 1)]
                .predict_proba(draws[min(s, draws.shape[0] - 1)])
                .float()
                for s in range(count)
            ]
        )


FEATURE_KS = (1, 50)
"""k of the kNN detectors (``knn1``, ``knn50``): 1 has no hyper-parameter, 50 is Sun et al.'s CIFAR k."""

REFERENCE_DETECTOR = "knn1"
"""The deterministic feature-space detector reported as ``ood/<set>/best_feature/``, declared in
advance. No in-distribution-only criterion can rank OOD detectors (that needs OOD data), and picking
the best on the OOD test set would overstate the baseline, so the reference is fixed: the distance
to the nearest normalised training feature (Sun et al. 2022), which has no hyper-parameter."""

SEVERITIES = (1, 2, 3, 4, 5)
"""Corruption severities of the shift suite (``shift/<corruption>/<s>/``, ``shift/severity<s>/``): the five
levels of ``data.corruptions.SEVERITY_PARAMS``."""

BMA_MAX_DRAWS = 4
"""The ``*_bma`` detectors average over the first min(S, 4) posterior draws. Each draw is one full
detector pass — kNN of every evaluated set against the whole training bank (≈ 15 s per 10k queries
against 60k × 128 features on one loaded core), three Gaussian fits and a k-means — so this caps a
12- or 30-sample posterior at 4 passes. The average is a Monte-Carlo estimate of the posterior-mean
score either way; 4 draws already remove three quarters of the single-draw variance."""


def has_own_uncertainty(bank: FeatureBank) -> bool:
    """Whether the method reports a per-input uncertainty (deterministic methods report zeros)."""
    return bool(bank.uncertainty.abs().sum() > 0)


@dataclass
class FeatureDetectors:
    """Feature-space OOD detectors fitted on the training bank (``probssl.eval.feature_ood``).

    On the point estimate (``bank.mean``; for the logit scores draw 0 through its probe, since the
    probe is fitted per draw and an ensemble's mean, say, lies in no member's feature space):
    ``knn1``, ``knn50`` (1 − cos to the k-th nearest training feature), ``mahalanobis`` (class
    Gaussians with a tied covariance, Lee et al. 2018, on L2-normalised features),
    ``mahalanobis_kmeans`` (the same tied covariance with k-means clusters, as many as classes,
    instead of labels), ``ssd`` (SSD as published, Sehwag et al. 2021: ``SSD_CLUSTERS`` k-means
    clusters of normalised features, one covariance per cluster), ``mahalanobis_raw`` (Lee et al.'s
    original, on raw features), ``energy`` (−logsumexp of the probe's logits) and ``maxlogit`` (−max
    logit). The normalised features are the geometry the SSL losses and the kNN detector use.
    With posterior draws (S > 1) also ``<name>_bma``: the same detector run on each draw (training
    draw s against query draw s, Gaussians and probe of draw s), its score averaged over draws
    (``BMA_MAX_DRAWS``) — does the posterior help a strong detector?
    """

    train: FeatureBank
    probe: MarginalProbe
    gaussians: list[dict[str, GaussianDetector]]  # [0]: the point estimate; [1 + s]: draw s
    ks: tuple[int, ...]
    cache: NeighbourCache | None = None  # the kNN classifier's passes, reused by the kNN scores

    @classmethod
    def fit(
        cls,
        train: FeatureBank,
        probe: MarginalProbe,
        num_classes: int,
        seed: int,
        max_draws: int = BMA_MAX_DRAWS,
        cache: NeighbourCache | None = None,
    ) -> FeatureDetectors:
        ks = tuple(k for k in FEATURE_KS if k <= train.num_items)
        sources = [train.mean]
        if train.num_samples > 1:
            sources += [train.draws[s] for s in range(min(train.num_samples, max_draws))]
        gaussians = [
            {
                "mahalanobis": GaussianDetector.fit(x, train.labels, normalise=True),
                "mahalanobis_raw": GaussianDetector.fit(x, train.labels),
                "mahalanobis_kmeans": GaussianDetector.fit(
                    x, kmeans_clusters(x, min(num_classes, train.num_items), seed), normalise=True
                ),
                "ssd": ssd_detector(x, min(SSD_CLUSTERS, train.num_items), seed),
            }
            for x in sources
        ]
        return cls(train, probe, gaussians, ks, cache)

    def _scores(
        self, train: Tensor, query: Tensor, gaussians: dict[str, GaussianDetector], logits: Tensor
    ) -> dict[str, Tensor]:
        knn = knn_scores(train, query, self.ks, cache=self.cache)
        scores = {f"knn{k}": knn[k].double() for k in self.ks}
        scores.update({name: detector.score(query) for name, detector in gaussians.items()})
        scores["energy"] = energy_score(logits)
        scores["maxlogit"] = max_logit_score(logits)
        return scores

    def _logits(self, bank: FeatureBank, s: int) -> Tensor:
        """Logits of draw s through the probe fitted on training draw s (paired as ``sample_probs``)."""
        probe = self.probe.probes[min(s, len(self.probe.probes) - 1)]
        return probe.predict_logits(bank.draws[min(s, bank.num_samples - 1)])

    def scores(self, bank: FeatureBank) -> dict[str, Tensor]:
        """Every detector's [N] score on ``bank`` (float64), higher = more OOD."""
        out = self._scores(self.train.mean, bank.mean, self.gaussians[0], self._logits(bank, 0))
        draws = len(self.gaussians) - 1
        if draws:
            totals: dict[str, Tensor] = {}
            for s in range(draws):
                query = bank.draws[min(s, bank.num_samples - 1)]
                scores = self._scores(
                    self.train.draws[s], query, self.gaussians[1 + s], self._logits(bank, s)
                )
                for name, value in scores.items():
                    totals[name] = totals[name] + value if name in totals else value
            out.update({f"{name}_bma": total / draws for name, total in totals.items()})
        return out


def uncertainty_scores(
    sample_probs: Tensor,
    bank: FeatureBank,
    detectors: FeatureDetectors | None = None,
    own: bool | None = None,
    like: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """All OOD / selective criteria, each "higher = more uncertain".

    ``mi`` only with more than one sample (it is 0 by definition otherwise); ``emb`` only when the
    method has its own uncertainty — ``own``, by default read off ``bank``; pass the test bank's
    answer when scoring an OOD bank so that both sides carry the same criteria. ``like``: the
    in-distribution scores, whose criteria (``mi``, ``emb``) an OOD set must have too.
    """
    probs = sample_probs.mean(0)
    scores = {"msp": msp_score(probs), "entropy": entropy_score(probs)}
    if ("mi" in like) if like is not None else sample_probs.shape[0] > 1:
        scores["mi"] = mutual_information_score(sample_probs)
    if like is not None:
        own = "emb" in like
    if has_own_uncertainty(bank) if own is None else own:
        scores["emb"] = bank.uncertainty.float()
    if detectors is not None:
        scores.update(detectors.scores(bank))
    return scores


def calibration_suite(probs: Tensor, labels: Tensor) -> tuple[Metrics, dict]:
    metrics = {f"cal/{k}": v for k, v in calibration_metrics(probs, labels).items()}
    return metrics, {"reliability": reliability_diagram(probs, labels)}


def selective_suite(scores: dict[str, Tensor], correct: Tensor) -> Metrics:
    """``sel/`` (predictive entropy) and ``sel/emb/`` (the embedding's own) in full; for every other
    criterion (MSP, MI, the feature-space detectors) ``sel/<criterion>/err_auroc`` and ``aurc``.

    When every prediction is right (or every one wrong) there are no errors to rank: ``err_auroc`` and
    ``spearman`` do not exist then and are left out, never written as a measured-looking 0.5 / 0.0.
    """
    ranked = bool(correct.any()) and not bool(correct.all())
    undefined = () if ranked else ("err_auroc", "spearman")
    out: Metrics = {}
    for prefix, criterion in (("sel/", "entropy"), ("sel/emb/", "emb")):
        if criterion in scores:
            for key, value in selective_metrics(scores[criterion], correct).items():
                if key not in undefined:
                    out[f"{prefix}{key}"] = value
    for criterion, score in scores.items():
        if criterion not in ("entropy", "emb"):
            if ranked:
                out[f"sel/{criterion}/err_auroc"] = error_auroc(score, correct)
            out[f"sel/{criterion}/aurc"] = aurc(score, correct)
    return out


def ood_suite(name: str, scores_in: dict[str, Tensor], scores_out: dict[str, Tensor]) -> tuple[Metrics, dict]:
    """``ood/<set>/<metric>`` uses MSP (defined for every method, so rows compare); each criterion too.

    ``ood/<set>/best_feature/<metric>`` repeats the pre-declared reference feature-space detector
    (``REFERENCE_DETECTOR``, never chosen on the OOD set), to stand next to ``ood/<set>/emb/``.
    """
    out: Metrics = {f"ood/{name}/positive": "ood"}
    for criterion in scores_in:
        for key, value in ood_metrics(scores_in[criterion], scores_out[criterion]).items():
            out[f"ood/{name}/{criterion}/{key}"] = value
    for key in ("auroc", "aupr_in", "aupr_out", "fpr95"):
        out[f"ood/{name}/{key}"] = out[f"ood/{name}/msp/{key}"]
        if REFERENCE_DETECTOR in scores_in:
            out[f"ood/{name}/best_feature/{key}"] = out[f"ood/{name}/{REFERENCE_DETECTOR}/{key}"]
    if REFERENCE_DETECTOR in scores_in:
        out[f"ood/{name}/best_feature/detector"] = REFERENCE_DETECTOR
    details = {
        "criterion": "entropy",
        "score_in": scores_in["entropy"].tolist(),
        "score_out": scores_out["entropy"].tolist(),
        # Histograms for the report's other headline columns: the method's own uncertainty and the
        # reference detector, so a figure can always show the score behind the AUROC it sits next to.
        "by_criterion": {
            criterion: {
                "score_in": scores_in[criterion].tolist(),
                "score_out": scores_out[criterion].tolist(),
            }
            for criterion in ("emb", REFERENCE_DETECTOR)
            if criterion in scores_in
        },
    }
    return out, details


OOD_PROTOCOL = (
    "ood/<set>/... and ood/id/... use the scored half of the test split (ood/id/scored_items images) "
    "against the whole OOD set; the other, class-stratified half (seeded by the run's seed) calibrates "
    "the conformal p-values, cut into folds A and B (docs/methods.md section 5)"
)
"""``meta/ood_protocol`` in eval.json: which images the OOD metrics are computed on."""


def pvalue_scores(pvalues: dict[str, Tensor]) -> dict[str, Tensor]:
    """Conformal p-values as detector scores, 1 − p (higher = more OOD), for the ranking metrics."""
    return {name: 1.0 - p for name, p in pvalues.items()}


def conformal_id_suite(pvalues: dict[str, Tensor], split: CalibrationSplit) -> Metrics:
    """``ood/id/<detector>/fpr@<α>``: the realized false-positive rate of flagging p < α on the
    scored in-distribution half (valid p-values keep it ≤ α up to sampling error), and the sizes."""
    out: Metrics = {
        "ood/id/scored_items": int(split.rest.numel()),
        "ood/id/calibration_items": int(split.fold_a.numel() + split.fold_b.numel()),
        "ood/id/fold_b_items": int(split.fold_b.numel()),
    }
    for name, p in pvalues.items():
        for alpha in ALPHAS:
            out[f"ood/id/{name}/fpr@{alpha:g}"] = flagged_fraction(p, alpha)
    return out


def member_fpr_suite(scores: dict[str, Tensor], split: CalibrationSplit) -> Metrics:
    """``ood/id/<detector>/fpr@0.05`` for each single detector of docs/methods.md §5 (the combined
    rule's members and the probe's ``entropy`` / ``mi``): its own conformal p-value against the whole
    calibration half (folds A ∪ B), and the share of the scored half it flags."""
    calibration = split.calibration
    out: Metrics = {}
    for name in (*combined_members(list(scores)), "entropy", "mi"):
        if name in scores:
            p = conformal_pvalues(scores[name][calibration], scores[name][split.rest])
            out[f"ood/id/{name}/fpr@{DEFAULT_ALPHA:g}"] = flagged_fraction(p, DEFAULT_ALPHA)
    return out


def conformal_ood_suite(name: str, pvalues: dict[str, Tensor]) -> Metrics:
    """``ood/<set>/<detector>/tpr@0.05``: the share of OOD images flagged at α = 0.05."""
    return {
        f"ood/{name}/{key}/tpr@{DEFAULT_ALPHA:g}": flagged_fraction(p, DEFAULT_ALPHA)
        for key, p in pvalues.items()
    }


def reliability_suite(knn_probs: Tensor, labels: Tensor, split: CalibrationSplit) -> Metrics:
    """``sel/reliability/``: the isotonic map of the kNN top vote share to P(correct), fitted on
    the calibration half and judged on the scored half — ``ece`` (15 equal-width bins, the
    probability of being right against being right) and ``err_auroc`` (1 − reliability ranking
    the kNN's errors)."""
    share, prediction = top_vote(knn_probs)
    correct = prediction.cpu() == labels.cpu()
    calibration, scored = split.calibration, split.rest
    model = Reliability.fit(share[calibration], correct[calibration])
    reliability = model.predict(share[scored])
    out: Metrics = {
        "sel/reliability/ece": binned_ece(reliability, correct[scored]),
        "sel/reliability/items": int(scored.numel()),
    }
    right = correct[scored]
    if bool(right.any()) and not bool(right.all()):
        out["sel/reliability/err_auroc"] = error_auroc(1.0 - reliability, right)
    return out


def ood_group_means(results: Metrics, dataset: str, ood_sets: Sequence[str]) -> Metrics:
    """``ood/near/<criterion>/auroc`` and ``ood/far/...``: AUROC means over each group's OOD sets.

    Groups from :func:`probssl.eval.ood_groups.ood_group`; a criterion enters a group's mean only if
    every set of the group has it, and ``ood/<group>/sets`` names the sets averaged. Unclassified
    sets are in no group; an empty group writes nothing.
    """
    out: Metrics = {}
    for group in GROUPS:
        members = [name for name in ood_sets if ood_group(dataset, name) == group]
        per_set = [
            {
                key[len(f"ood/{name}/") :]: value
                for key, value in results.items()
                if key.startswith(f"ood/{name}/") and key.endswith("auroc") and isinstance(value, float)
            }
            for name in members
            if any(key.startswith(f"ood/{name}/") for key in results)
        ]
        if not per_set:
            continue
        out[f"ood/{group}/sets"] = ", ".join(members)
        for criterion in sorted(set.intersection(*(set(values) for values in per_set))):
            out[f"ood/{group}/{criterion}"] = sum(values[criterion] for values in per_set) / len(per_set)
    return out


RETRIEVAL_MAX_ITEMS = 10_000
"""Leave-one-out retrieval (``ret/``) runs on the first 10k test items: its cost is quadratic in N."""


def leave_one_out_retrieval(
    test: FeatureBank, average_precision: bool = True, max_items: int = RETRIEVAL_MAX_ITEMS
) -> LeaveOneOut:
    """The leave-one-out retrieval pass over the test split's point estimate (its first ``max_items``)
    that every ``ret/`` metric of the point estimate reads: R-AUROC's and AUSC's hits, and with
    ``average_precision`` the ranks and AP@R of recall@k and mAP@R — one pass, one tie rule."""
    n = min(test.num_items, max_items)
    return leave_one_out(
        test.mean[:n], test.labels[:n], average_precision=average_precision, ranks=average_precision
    )


def r_auroc_suite(
    test: FeatureBank,
    scores: dict[str, Tensor],
    max_items: int = RETRIEVAL_MAX_ITEMS,
    retrieval: LeaveOneOut | None = None,
) -> Metrics:
    """R-AUROC (Kirchhof et al., URL benchmark): does an uncertainty predict its own retrieval errors?

    Item i's leave-one-out retrieval on the test split (cosine, the point estimate) is an error when
    its nearest other item has another label — a recall@1 miss, ties resolved against the query as in
    :mod:`probssl.eval.retrieval`. ``ret/<criterion>/r_auroc`` is the AUROC of each criterion for
    those errors (errors positive); ``ret/r_auroc`` uses the embedding's own uncertainty, or the
    probe's entropy for a method without one (the same choice as ``ret/ausc``). Absent when every
    retrieval is right (or every one wrong). ``retrieval``: the pass of
    :func:`leave_one_out_retrieval`, when already made.
    """
    if retrieval is None:
        retrieval = leave_one_out_retrieval(test, average_precision=False, max_items=max_items)
    correct = retrieval.hit
    n = correct.numel()
    if bool(correct.all()) or not bool(correct.any()):
        return {"ret/r_auroc_items": n}  # no errors (or no hits) to rank: R-AUROC is undefined, not 0.5
    out: Metrics = {f"ret/{c}/r_auroc": error_auroc(score[:n], correct) for c, score in scores.items()}
    out["ret/r_auroc"] = out["ret/emb/r_auroc" if "emb" in scores else "ret/entropy/r_auroc"]
    out["ret/r_auroc_items"] = n
    return out


def crop_suite(
    embed_images: Callable[[Tensor], FeatureBank], images: Tensor, uncertainty: Tensor, seed: int
) -> Metrics:
    """``sel/crop_up``: share of images whose own uncertainty rises on a random crop of ``CROP_AREA``
    resized back (:mod:`probssl.eval.crop_test`). Empty for a method without its own uncertainty."""
    if not bool(uncertainty.abs().sum() > 0):
        return {}
    cropped = embed_images(random_crops(images, CROP_AREA, seed))
    return {
        "sel/crop_up": crop_up_share(uncertainty[: len(images)], cropped.uncertainty),
        "sel/crop_items": len(images),
    }


def shift_suite(
    probe: MarginalProbe,
    embed_images: Callable[[Sequence[Tensor]], list[FeatureBank]],
    images: Tensor,
    labels: Tensor,
    corruptions: Sequence[str],
    corrupt: Callable[[Tensor, str, int], Tensor],
    severities: Sequence[int] = SEVERITIES,
    own_uncertainty: bool = True,
) -> tuple[Metrics, dict]:
    """Accuracy, ECE and mean uncertainty of the (clean-trained) probe on corrupted test images.

    ``embed_images`` gets every severity of one corruption at once (one pass of the encoder per
    corruption) and returns one bank per image set. ``own_uncertainty=False`` (a method whose
    embedding carries none) leaves out the ``emb_uncertainty`` keys rather than report zeros.
    """
    from probssl.eval.calibration import ece

    metrics = ("acc", "uncertainty") + (("emb_uncertainty",) if own_uncertainty else ())
    out: Metrics = {}
    details: dict[str, dict[str, list]] = {}
    for name in corruptions:
        curve: dict[str, list] = {"severity": list(severities), **{m: [] for m in metrics}}
        banks = embed_images([corrupt(images, name, severity) for severity in severities])
        for severity, bank in zip(severities, banks, strict=True):
            probs = probe.sample_probs(bank.draws).mean(0)
            values = {"acc": top1(probs, labels), "uncertainty": entropy_score(probs).mean().item()}
            if own_uncertainty:
                values["emb_uncertainty"] = bank.uncertainty.float().mean().item()
            values["ece"] = ece(probs, labels)
            for metric in ("acc", "ece", *metrics[1:]):
                out[f"shift/{name}/{severity}/{metric}"] = values[metric]
            for metric in metrics:
                curve[metric].append(values[metric])
        details[name] = curve
    if corruptions:
        out["shift/mean/acc"] = sum(out[f"shift/{n}/{s}/acc"] for n in corruptions for s in severities) / (
            len(corruptions) * len(severities)
        )
        # Per severity, averaged over corruptions: does the embedding's own uncertainty (1/κ, σ, Σ std)
        # rise as accuracy falls?
        for s in severities:
            for metric in ("acc", "emb_uncertainty")[: 2 if own_uncertainty else 1]:
                values = [out[f"shift/{n}/{s}/{metric}"] for n in corruptions]
                out[f"shift/severity{s}/{metric}"] = sum(values) / len(values)
    return out, details


def write_index_file(path: Path, indices: Tensor) -> None:
    atomic_write_text(path, "\n".join(str(int(i)) for i in indices.tolist()) + "\n")


def lowshot_suite(
    train: FeatureBank,
    test: FeatureBank,
    num_classes: int,
    index_dir: Path,
    fractions: Sequence[float] = (0.01, 0.1),
    seeds: Sequence[int] = (0, 1, 2),
    **probe_kwargs: Any,
) -> Metrics:
    """Probe on a class-balanced fraction of the training labels; mean ± std over seeds.

    The index files (one per fraction and seed) are written beside the results so the exact label
    subsets are on record and can be reused by any other run.
    """
    out: Metrics = {}
    for fraction in fractions:
        name = f"{round(fraction * 100):g}pct"
        accs = []
        for seed in seeds:
            idx = class_balanced_subset(train.labels, fraction, seed)
            write_index_file(index_dir / f"lowshot_{name}_seed{seed}.txt", idx)
            subset = FeatureBank(
                train.draws[:, idx], train.mean[idx], train.uncertainty[idx], train.labels[idx]
            )
            kwargs = dict(probe_kwargs)
            if len(idx) < 20 * num_classes:  # too few labels to carve a validation split from
                kwargs["l2_grid"] = (1e-3,)
            probe = MarginalProbe.fit(subset, num_classes, **kwargs)
            accs.append(top1(probe.sample_probs(test.draws).mean(0), test.labels))
        mean = sum(accs) / len(accs)
        out[f"lowshot/{name}/top1"] = mean
        out[f"lowshot/{name}/top1_std"] = (sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1)) ** 0.5
    return out


def transfer_suite(name: str, bank: FeatureBank, num_classes: int, **probe_kwargs: Any) -> Metrics:
    """Frozen encoder on another dataset: fit the probe on one stratified half, test on the other."""
    keep, held = stratified_split(bank.labels, 0.5, probe_kwargs.get("seed", 0))
    fit = FeatureBank(bank.draws[:, keep], bank.mean[keep], bank.uncertainty[keep], bank.labels[keep])
    probe = MarginalProbe.fit(fit, num_classes, **probe_kwargs)
    probs = probe.sample_probs(bank.draws[:, held]).mean(0)
    return {f"transfer/{name}/top1": top1(probs, bank.labels[held]), f"transfer/{name}/items": len(held)}


def retrieval_suite(
    test: FeatureBank,
    uncertainty: Tensor,
    max_items: int = RETRIEVAL_MAX_ITEMS,
    retrieval: LeaveOneOut | None = None,
) -> tuple[Metrics, dict]:
    """Leave-one-out retrieval on the test split; AUSC with ``uncertainty`` (higher = less certain).

    One tie rule (against the query, :mod:`probssl.eval.retrieval`) for every key: recall@k, mAP@R
    and the hits AUSC ranks come from one pass over the point estimate (``retrieval``, as from
    :func:`leave_one_out_retrieval`, or made here), the retrieval ECE from one pass per draw.
    """
    if retrieval is None or retrieval.average_precision is None:
        retrieval = leave_one_out_retrieval(test, max_items=max_items)
    n = retrieval.hit.numel()
    mean, labels, draws = test.mean[:n], test.labels[:n], test.draws[:, :n]
    out: Metrics = {f"ret/{k}": v for k, v in retrieval_metrics(mean, labels, retrieval=retrieval).items()}
    curve = sparsification(uncertainty[:n], retrieval.hit)
    out["ret/ausc"] = curve["ausc"]
    out["ret/ausc_oracle"] = curve["ausc_oracle"]
    out["ret/ece"] = retrieval_ece(draws, labels)
    out["ret/items"] = n
    details = {
        "fractions_removed": curve["fractions_removed"],
        "accuracy": curve["accuracy"],
        "oracle": curve["accuracy_oracle"],
    }
    return out, details


def ranked_images(
    images: Tensor,
    uncertainty: Tensor,
    count: int = 8,
    labels: Tensor | None = None,
    predictions: Tensor | None = None,
) -> dict:
    """The most and least certain test images, for the report's grid (with label and prediction,
    so a reader can see whether the uncertain ones are the misclassified ones)."""
    order = torch.argsort(uncertainty, stable=True)
    most, least = order[:count], order.flip(0)[:count]
    out = {
        "shape": list(images.shape[1:]),
        "most_certain": [images[i].flatten().tolist() for i in most],
        "least_certain": [images[i].flatten().tolist() for i in least],
        "uncertainty_most": uncertainty[most].tolist(),
        "uncertainty_least": uncertainty[least].tolist(),
    }
    for name, values in (("label", labels), ("prediction", predictions)):
        if values is not None:
            out[f"{name}_most"] = values[most].tolist()
            out[f"{name}_least"] = values[least].tolist()
    return out
