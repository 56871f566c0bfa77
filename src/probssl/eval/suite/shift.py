"""The corruption block ``shift/``: accuracy, ECE and mean uncertainty of the clean-trained probe on
corrupted test images, per corruption and severity, and per severity averaged over corruptions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from probssl.eval.features import FeatureBank
from probssl.eval.metrics import Metrics, top1
from probssl.eval.ood import entropy_score
from probssl.eval.suite.probe import MarginalProbe

SEVERITIES = (1, 2, 3, 4, 5)
"""Corruption severities of the shift suite (``shift/<corruption>/<s>/``, ``shift/severity<s>/``): the five
levels of ``data.corruptions.SEVERITY_PARAMS``."""


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
