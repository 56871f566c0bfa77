"""OOD detection blocks: ``ood/<set>/`` (every criterion's AUROC, AUPR and FPR95, OOD positive),
``ood/id/`` (the conformal p-values' realized false-positive rates on the scored in-distribution
half), ``ood/<set>/<detector>/tpr@0.05`` and the ``ood/near/``, ``ood/far/`` group means."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from probssl.eval.conformal import (
    ALPHAS,
    DEFAULT_ALPHA,
    CalibrationSplit,
    combined_members,
    conformal_pvalues,
    flagged_fraction,
)
from probssl.eval.metrics import Metrics
from probssl.eval.ood import ood_metrics
from probssl.eval.ood_groups import GROUPS, ood_group
from probssl.eval.suite.detectors import REFERENCE_DETECTOR


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
