"""The OOD p-values and ``reliability`` of ``probssl embed``: fitted once per run, cached with its features.

docs/methods.md §5, deployment. A fixed, seeded, class-stratified slice of the *training* split
(``CALIBRATION_FRACTION`` of it, at most ``CALIBRATION_MAX_ITEMS`` images) is left out of every
detector's reference — the kNN feature bank, the class means and covariances — and calibrates the
conformal p-values, cut into folds A and B like ``probssl eval``'s calibration half. The reference is
the rest of the training split's cached features (``features/train_S<S>.safetensors``), the
detectors are those of eval's combined rule (:mod:`probssl.eval.conformal`): ``knn1``,
``mahalanobis_raw`` and ``mahalanobis`` (class Gaussians, or one Gaussian for unlabelled training
data), ``ssd``, and the method's own uncertainty where it has one.

Fitting costs a kNN pass of the slice against the reference, three covariances and their
eigendecompositions; :func:`fitted_reference` stores the result in
``features/ood_reference_S<S>.safetensors`` under a key of the feature bank's key and every constant
of the rule, so a second ``embed`` of the same run only reads it.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor

from probssl.data import DatasetError
from probssl.eval.conformal import COMBINED, CalibrationSplit, ConformalDetector, combined_members
from probssl.eval.feature_ood import RANK_TOLERANCE, SSD_CLUSTERS, GaussianDetector, knn_scores, ssd_detector
from probssl.eval.features import FeatureBank
from probssl.eval.knn import NeighbourCache, knn_predict_many
from probssl.eval.reliability import RELIABILITY_K, Reliability, top_vote

CALIBRATION_FRACTION = 0.1
"""Share of the training split left out of the reference to calibrate ``embed``'s p-values: a tenth
keeps 90% of the feature bank for the detectors, and on a 50–60k training split hits the cap."""

CALIBRATION_MAX_ITEMS = 5000
"""At most this many calibration images (folds A and B of ~2,500): the combined p-value then
resolves 1/2,501 ≈ 0.0004, far below any α in use, and the slice costs a tenth of a 50k reference."""

GAUSSIANS = ("mahalanobis_raw", "mahalanobis", "ssd")
"""The Gaussian members of the combined rule, in the order they are stored."""

_VERSION = "2"  # of the stored layout and the rule; part of the cache key (2: tail-extended fold-A p-values)


MIN_CALIBRATION_ITEMS = 40
"""On small training splits the slice grows to this many images (at most half the split): folds of
20, whose smallest combined p-value 1/21 still reaches α = 0.05."""


def calibration_slice(labels: Tensor, seed: int) -> CalibrationSplit:
    """The seeded, stratified slice of a training split that calibrates (folds A, B) and the rest."""
    n = max(labels.numel(), 1)
    fraction = min(CALIBRATION_FRACTION, CALIBRATION_MAX_ITEMS / n)
    fraction = max(fraction, min(0.5, MIN_CALIBRATION_ITEMS / n))
    try:
        return CalibrationSplit.of(labels, seed, fraction)
    except ValueError:
        raise DatasetError(
            f"the run's training split has {labels.numel()} images: too few to set a calibration slice "
            "aside for the OOD p-values (two folds and a reference need a few images each); train on more "
            "images to embed with this run"
        ) from None


def is_labelled(labels: Tensor) -> bool:
    """Whether a split carries class labels (unlabelled images have label −1)."""
    return bool(labels.numel()) and bool((labels >= 0).all())


@dataclass
class OODReference:
    """The fitted detectors of ``embed``: reference features, Gaussians, the combined detector and,
    for labelled training data, the ``reliability`` map of the kNN vote."""

    reference: Tensor  # [R, D] float32: the training features the detectors are fitted on
    labels: Tensor  # [R] int64 (−1: unlabelled)
    gaussians: dict[str, GaussianDetector]
    combined: ConformalDetector
    reliability: Reliability | None
    num_classes: int
    temperature: float

    @classmethod
    def fit(cls, bank: FeatureBank, seed: int, temperature: float) -> OODReference:
        """Fit on ``bank`` (the training split's cached features) less its calibration slice."""
        split = calibration_slice(bank.labels, seed)
        reference, labels = bank.mean[split.rest], bank.labels[split.rest]
        labelled = is_labelled(bank.labels)
        groups = labels if labelled else torch.zeros_like(labels)
        gaussians = {
            "mahalanobis_raw": GaussianDetector.fit(reference, groups),
            "mahalanobis": GaussianDetector.fit(reference, groups, normalise=True),
            "ssd": ssd_detector(reference, min(SSD_CLUSTERS, reference.shape[0]), seed),
        }
        own = bool(bank.uncertainty.abs().sum() > 0)
        num_classes = int(bank.labels.max()) + 1 if labelled else 0
        # One neighbour pass over the calibration slice serves the kNN distances and the kNN vote.
        calibration = split.calibration
        features = bank.mean[calibration]
        cache = NeighbourCache(keep=RELIABILITY_K) if labelled else None
        reliability = None
        if labelled:
            share, prediction = _knn_vote(reference, labels, num_classes, temperature, features, cache)
            reliability = Reliability.fit(share, prediction == bank.labels[calibration])
        knn1 = knn_scores(reference, features, (1,), cache=cache)[1]
        scores = _member_scores(knn1, gaussians, features, bank.uncertainty[calibration] if own else None)
        fold_a, fold_b = (torch.searchsorted(calibration, fold) for fold in (split.fold_a, split.fold_b))
        combined = ConformalDetector.fit(
            {name: value[fold_a] for name, value in scores.items()},
            {name: value[fold_b] for name, value in scores.items()},
            combined_members(list(scores)),
        )
        return cls(reference, labels, gaussians, combined, reliability, num_classes, temperature)

    @property
    def members(self) -> tuple[str, ...]:
        return self.combined.members

    @property
    def calibration_items(self) -> int:
        """|B|: the size the combined p-value is calibrated on (smallest p-value 1/(|B| + 1))."""
        return self.combined.calibration_items

    def knn_vote(self, features: Tensor, cache: NeighbourCache | None = None) -> tuple[Tensor, Tensor]:
        """(top vote share, predicted class) of the k = ``RELIABILITY_K`` weighted kNN vote."""
        return _knn_vote(self.reference, self.labels, self.num_classes, self.temperature, features, cache)

    def apply(self, features: Tensor, uncertainty: Tensor, k: int = 1) -> dict[str, Tensor]:
        """Everything ``embed`` reports for query features [M, D] and their own uncertainty [M]:
        ``ood_score`` (1 − cos to the k-th nearest reference feature), ``ood_pvalue`` (combined),
        ``pvalue/<member>`` and, with labels, ``knn_prediction`` and ``reliability``. One
        neighbour pass serves the kNN vote and the kNN distances."""
        if not 1 <= k <= self.reference.shape[0]:
            raise ValueError(f"k={k} must be between 1 and the {self.reference.shape[0]} reference features")
        cache = NeighbourCache(keep=max(k, RELIABILITY_K if self.reliability is not None else 1))
        out: dict[str, Tensor] = {}
        if self.reliability is not None:
            share, prediction = self.knn_vote(features, cache)
            out["knn_prediction"] = prediction
            out["reliability"] = self.reliability.predict(share)
        distances = knn_scores(self.reference, features, tuple(sorted({1, k})), cache=cache)
        own = uncertainty if "emb" in self.members else None
        scores = _member_scores(distances[1], self.gaussians, features, own)
        out["ood_score"] = distances[k]
        out["ood_pvalue"] = self.combined.pvalue(scores)
        out.update({f"pvalue/{name}": p for name, p in self.combined.member_pvalues(scores).items()})
        return out

    def state(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        tensors = {"labels": self.labels.contiguous()}
        for name, detector in self.gaussians.items():
            tensors[f"{name}/means"] = detector.means.contiguous()
            tensors[f"{name}/whiten"] = detector.whiten.contiguous()
        tensors.update({k: v.contiguous() for k, v in self.combined.state(COMBINED).items()})
        if self.reliability is not None:
            tensors["reliability/share"] = torch.from_numpy(self.reliability.share.copy())
            tensors["reliability/probability"] = torch.from_numpy(self.reliability.probability.copy())
        meta = {
            "members": json.dumps(list(self.members)),
            "normalise": json.dumps({name: d.normalise for name, d in self.gaussians.items()}),
            "num_classes": str(self.num_classes),
            "temperature": repr(self.temperature),
        }
        return tensors, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict[str, str], reference: Tensor) -> OODReference:
        normalise = json.loads(meta["normalise"])
        gaussians = {
            name: GaussianDetector(tensors[f"{name}/means"], tensors[f"{name}/whiten"], normalise[name])
            for name in GAUSSIANS
        }
        reliability = None
        if "reliability/share" in tensors:
            reliability = Reliability(
                tensors["reliability/share"].numpy(), tensors["reliability/probability"].numpy()
            )
        return cls(
            reference,
            tensors["labels"],
            gaussians,
            ConformalDetector.from_state(tensors, COMBINED, json.loads(meta["members"])),
            reliability,
            int(meta["num_classes"]),
            float(meta["temperature"]),
        )


def _knn_vote(
    reference: Tensor,
    labels: Tensor,
    num_classes: int,
    temperature: float,
    features: Tensor,
    cache: NeighbourCache | None,
) -> tuple[Tensor, Tensor]:
    probs = knn_predict_many(
        reference, labels, features, num_classes, (RELIABILITY_K,), temperature, cache=cache
    )[RELIABILITY_K]
    return top_vote(probs)


def _member_scores(
    knn1: Tensor, gaussians: dict[str, GaussianDetector], features: Tensor, uncertainty: Tensor | None
) -> dict[str, Tensor]:
    """The combined rule's member scores (float64, higher = more OOD); ``emb`` when ``uncertainty``."""
    out = {"knn1": knn1.double()}
    out.update({name: detector.score(features) for name, detector in gaussians.items()})
    if uncertainty is not None:
        out["emb"] = uncertainty.double()
    return out


def reference_key(bank_key: str, seed: int, temperature: float) -> str:
    """The cache key: the feature bank's and every constant the fitted detectors depend on."""
    constants = (
        f"calibration={CALIBRATION_FRACTION},{CALIBRATION_MAX_ITEMS},{MIN_CALIBRATION_ITEMS},seed={seed}|rank={RANK_TOLERANCE}"
        f"|ssd={SSD_CLUSTERS}|k={RELIABILITY_K},T={temperature!r}|v{_VERSION}"
    )
    return f"{bank_key}|{constants}"


def fitted_reference(
    path: str | os.PathLike[str], key: str, bank: FeatureBank, seed: int, temperature: float
) -> OODReference:
    """The detectors stored at ``path`` under ``key``, else fitted on ``bank`` and stored there.

    As :func:`probssl.eval.features.cached_features`: a stale or unreadable file is a cache miss
    (refitted and overwritten), never the reason ``embed`` fails; the write is atomic.
    """
    path = Path(path)
    reference = bank.mean[calibration_slice(bank.labels, seed).rest]
    if path.exists():
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                if meta.get("key") == key:
                    tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
                    return OODReference.from_state(tensors, meta, reference)
        except Exception as error:  # a cache must never be the reason a command fails
            warnings.warn(f"ignoring unreadable OOD reference {path}: {error}", stacklevel=2)
    fitted = OODReference.fit(bank, seed, temperature)
    tensors, meta = fitted.state()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        safetensors.torch.save_file(tensors, tmp, metadata={**meta, "key": key})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return fitted
