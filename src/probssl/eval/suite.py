"""The uncertainty evaluation suite (design.md §4): one function per protocol, all on cached features.

Every function takes feature banks (``[S, N, D]`` draws, so deterministic and probabilistic methods
go through the same code) and returns flat, prefixed metrics plus plot data for the report:

- ``cal/``    calibration of the marginalised linear probe on the test split
- ``sel/``    uncertainty vs error (predictive entropy for every method; ``sel/emb/`` the embedding's own)
- ``ood/<set>/``   OOD detection, every criterion "higher = more OOD", OOD is the positive class
- ``shift/<corruption>/<severity>/``   accuracy, ECE and mean uncertainty under corruptions
- ``lowshot/``   1% / 10% labels, class-balanced fixed index files, 3 seeds
- ``transfer/<set>/``   a probe on a frozen encoder, fitted and tested on the two halves of another set
- ``ret/``    leave-one-out retrieval, sparsification (AUSC) and retrieval ECE

The suite never sees a method: only features, labels and probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probssl.eval.calibration import calibration_metrics, reliability_diagram
from probssl.eval.features import FeatureBank
from probssl.eval.linear import LinearProbe
from probssl.eval.metrics import top1
from probssl.eval.ood import entropy_score, msp_score, mutual_information_score, ood_metrics
from probssl.eval.retrieval import retrieval_ece, retrieval_metrics, sparsification
from probssl.eval.selective import selective_metrics
from probssl.eval.splits import class_balanced_subset, stratified_split
from probssl.io import atomic_write_text

Metrics = dict[str, Any]


@dataclass
class MarginalProbe:
    """One linear probe per embedding sample; predictions are averaged as probabilities (BMA)."""

    probes: list[LinearProbe]

    @classmethod
    def fit(cls, bank: FeatureBank, num_classes: int, **probe_kwargs: Any) -> MarginalProbe:
        first = LinearProbe(**probe_kwargs).fit(bank.draws[0], bank.labels, num_classes)
        rest = [
            LinearProbe(**probe_kwargs).fit_fixed(bank.draws[s], bank.labels, first.selected_l2, num_classes)
            for s in range(1, bank.num_samples)
        ]
        return cls([first, *rest])

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


def uncertainty_scores(
    sample_probs: Tensor, bank: FeatureBank, like: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """All OOD / selective criteria, each "higher = more uncertain".

    Only criteria that are defined for the run: mutual information needs more than one draw (with one
    it is 0 by construction) and ``emb`` needs an embedding that carries uncertainty (a deterministic
    method's is all zeros); an undefined criterion would otherwise be reported as a measured AUROC of
    0.5. ``like``: the in-distribution scores, whose criteria an OOD set must have too.
    """
    probs = sample_probs.mean(0)
    scores = {"msp": msp_score(probs), "entropy": entropy_score(probs)}
    if (like is not None and "mi" in like) or (like is None and sample_probs.shape[0] > 1):
        scores["mi"] = mutual_information_score(sample_probs)
    if (like is not None and "emb" in like) or (like is None and bool(bank.uncertainty.any())):
        scores["emb"] = bank.uncertainty.float()
    return scores


def calibration_suite(probs: Tensor, labels: Tensor) -> tuple[Metrics, dict]:
    metrics = {f"cal/{k}": v for k, v in calibration_metrics(probs, labels).items()}
    return metrics, {"reliability": reliability_diagram(probs, labels)}


def selective_suite(scores: dict[str, Tensor], correct: Tensor) -> Metrics:
    out: Metrics = {}
    for prefix, criterion in (("sel/", "entropy"), ("sel/emb/", "emb")):
        if criterion not in scores:
            continue
        for key, value in selective_metrics(scores[criterion], correct).items():
            out[f"{prefix}{key}"] = value
    return out


def ood_suite(name: str, scores_in: dict[str, Tensor], scores_out: dict[str, Tensor]) -> tuple[Metrics, dict]:
    """``ood/<set>/<metric>`` uses MSP (defined for every method, so rows compare); each criterion too."""
    out: Metrics = {f"ood/{name}/positive": "ood"}
    for criterion in scores_in:
        for key, value in ood_metrics(scores_in[criterion], scores_out[criterion]).items():
            out[f"ood/{name}/{criterion}/{key}"] = value
    for key in ("auroc", "aupr_in", "aupr_out", "fpr95"):
        out[f"ood/{name}/{key}"] = out[f"ood/{name}/msp/{key}"]
    details = {
        "criterion": "entropy",
        "score_in": scores_in["entropy"].tolist(),
        "score_out": scores_out["entropy"].tolist(),
    }
    return out, details


def shift_suite(
    probe: MarginalProbe,
    embed_images: Callable[[Sequence[Tensor]], list[FeatureBank]],
    images: Tensor,
    labels: Tensor,
    corruptions: Sequence[str],
    corrupt: Callable[[Tensor, str, int], Tensor],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
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


def retrieval_suite(test: FeatureBank, uncertainty: Tensor, max_items: int = 10_000) -> tuple[Metrics, dict]:
    """Leave-one-out retrieval on the test split; AUSC with ``uncertainty`` (higher = less certain)."""
    n = min(test.num_items, max_items)
    mean, labels, draws = test.mean[:n], test.labels[:n], test.draws[:, :n]
    out: Metrics = {f"ret/{k}": v for k, v in retrieval_metrics(mean, labels).items()}
    from probssl.eval.retrieval import nearest_neighbour_labels

    correct = nearest_neighbour_labels(mean, labels) == labels
    curve = sparsification(uncertainty[:n], correct)
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
