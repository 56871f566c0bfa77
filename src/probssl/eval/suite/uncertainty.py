"""Blocks about the uncertainty of in-distribution predictions: ``cal/`` (calibration of the
marginalised probe), ``sel/`` (uncertainty against error, the probe's entropy and the embedding's
own), ``sel/reliability/`` (the kNN vote's isotonic reliability), ``sel/crop_up`` (the crop test),
and the report's grid of the most and least certain test images."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from probssl.eval.calibration import binned_ece, calibration_metrics, reliability_diagram
from probssl.eval.conformal import (
    CalibrationSplit,
)
from probssl.eval.crop_test import CROP_AREA, crop_up_share, random_crops
from probssl.eval.features import FeatureBank
from probssl.eval.metrics import Metrics
from probssl.eval.reliability import Reliability, top_vote
from probssl.eval.selective import aurc, error_auroc, selective_metrics


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
