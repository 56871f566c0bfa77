"""The scores every OOD and selective block ranks, each "higher = more uncertain": the probe's MSP,
entropy and mutual information, the embedding's own uncertainty (``emb``), and the deterministic
feature-space detectors fitted on the training bank (``FeatureDetectors``) with the pre-declared
reference among them (``REFERENCE_DETECTOR``)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

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
from probssl.eval.ood import entropy_score, msp_score, mutual_information_score
from probssl.eval.suite.probe import MarginalProbe

FEATURE_KS = (1, 50)
"""k of the kNN detectors (``knn1``, ``knn50``): 1 has no hyper-parameter, 50 is Sun et al.'s CIFAR k."""

REFERENCE_DETECTOR = "knn1"
"""The deterministic feature-space detector reported as ``ood/<set>/best_feature/``, declared in
advance. No in-distribution-only criterion can rank OOD detectors (that needs OOD data), and picking
the best on the OOD test set would overstate the baseline, so the reference is fixed: the distance
to the nearest normalised training feature (Sun et al. 2022), which has no hyper-parameter."""


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
