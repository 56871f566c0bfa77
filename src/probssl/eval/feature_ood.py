"""Feature-space OOD detectors: the deterministic baselines a method's own uncertainty must beat.

On self-supervised features the field's standard OOD detectors do not use a classifier's softmax
but the geometry of the training features (design.md §4, issue 19). Every score here is "higher =
more OOD", like :mod:`probssl.eval.ood`, so the same detection metrics apply:

- ``knn_scores``: 1 − cos(x, k-th nearest L2-normalised training feature) (Sun et al. 2022, "Out-of-
  distribution detection with deep nearest neighbors", who use −cos; the shift by one changes no
  ranking and makes the score the cosine distance ``probssl embed`` reports, ≥ 0). Queries are
  processed in chunks against blocks of the training features, so memory is one block of
  similarities, never O(N_query · N_train).
- ``GaussianDetector``: squared Mahalanobis distance to the closest of a set of Gaussians,
  min_c (x − μ_c)ᵀ Σ_c⁻¹ (x − μ_c), with one shared (tied) covariance — Lee et al. (2018) on class
  labels — or one covariance per group.
- ``ssd_detector``: SSD as published (Sehwag et al. 2021): k-means clusters of normalised,
  standardised features, one covariance per cluster (``SSD_CLUSTERS`` = 1 by default, the paper's).
- ``energy_score`` / ``max_logit_score``: the free energy −logsumexp_c f_c(x) (Liu et al. 2020) and
  −max_c f_c(x) (Hendrycks et al. 2022) of a linear probe's logits.

All functions take plain [N, D] feature tensors: which features (the mean, or one posterior draw)
is the caller's choice (:mod:`probssl.eval.suite`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from probssl.eval.knn import NeighbourCache, top_similarities

RANK_TOLERANCE = 1e-10
"""Relative rank cut of a covariance before inversion. An eigen-direction of Σ counts as carrying
variance when its eigenvalue exceeds ``RANK_TOLERANCE`` × e, where e = mean ‖x_i‖² is the fitted
features' own energy (their mean squared norm, a scale that vanishes only for all-zero features).
Directions below the cut are not inverted: they are measured Euclidean at the scale
σ²_⊥ = tr(Σ) / D, the average variance per dimension (the target Ledoit–Wolf shrinks towards), or
e / D when no direction carries variance at all (a collapsed fit). So

    d²(x) = Σ_{kept i} (vᵢᵀ r)² / λᵢ + ‖r − Σ_{kept i} vᵢ vᵢᵀ r‖² / σ²_⊥,   r = x − μ.

Why this rule: with D > N (or features that collapsed onto a subspace) the sample covariance is
singular, and its null-space eigenvalues are float rounding (~1e-16 λ_max). The previous floor
(1e-6 λ_max) weighted those directions 10⁶× more than the data's own, so a held-out
in-distribution point — which, unlike the training points, has a component there — scored ~10⁵×
the training points' distances; and a fully collapsed draw (every eigenvalue ~1e-33) kept all its
"directions" and scored 10³⁵. Float32 features carry ≤ 1e-14 relative rounding variance, real
variance lies far above 1e-10, so the cut separates the two; the complement keeps a finite,
data-scaled penalty for leaving the training span (pure pseudo-inversion would ignore it, and an
image that differs from every training image only there would look in-distribution). Where Σ has
full numerical rank the rule is the exact inverse (Lee et al.); on SSD's one-cluster fits it is
``np.linalg.pinv`` on the kept directions (SSD's own code) plus the complement term."""

SSD_CLUSTERS = 1
"""SSD's k-means cluster count: the paper's and its code's default (``--clusters 1``), a single
Gaussian of the normalised, standardised training features."""


def _check_features(x: Tensor, name: str) -> Tensor:
    if x.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x.detach()


def knn_scores(
    train: Tensor,
    query: Tensor,
    ks: Sequence[int] = (1, 50),
    chunk_size: int = 256,
    cache: NeighbourCache | None = None,
) -> dict[int, Tensor]:
    """{k: [M] 1 − cos(query, its k-th nearest training feature)} for each k, higher = more OOD.

    Both sides are L2-normalised (cosine similarity, as Sun et al.); the k-th largest similarity is
    an order statistic, so ties among training features do not change it. The similarities come
    from the kNN classifier's routine (:func:`probssl.eval.knn.top_similarities`, ``chunk_size``
    queries at a time, blocked as the classifier blocks them), so with a ``cache`` the
    classifier's pass over the same features is reused bit for bit instead of recomputed.
    """
    train = _check_features(train, "train features")
    query = _check_features(query, "query features")
    if train.shape[1] != query.shape[1]:
        raise ValueError(f"feature dims differ: train {train.shape[1]}, query {query.shape[1]}")
    if not ks or any(k < 1 or k > train.shape[0] for k in ks):
        raise ValueError(
            f"every k must lie in [1, {train.shape[0]}] (the training set size), got {tuple(ks)}"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    k_max = max(ks)
    if cache is not None:
        top = cache.top(train, query, k_max, chunk_size)
    else:
        top = top_similarities(train, query, k_max, chunk_size)
    return {k: 1.0 - top[:, k - 1].cpu() for k in ks}


def whitening(covariance: Tensor, energy: float) -> Tensor:
    """[D, D] W with (x − μ)ᵀ W Wᵀ (x − μ) the rank-cut Mahalanobis distance of ``RANK_TOLERANCE``.

    W = V diag(λ_eff)^{-1/2} from the eigendecomposition Σ = V diag(λ) Vᵀ, with λ_eff = λ on the
    kept directions (λ > ``RANK_TOLERANCE`` · ``energy``) and σ²_⊥ on the rest.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    dim = covariance.shape[0]
    kept = eigenvalues > RANK_TOLERANCE * energy
    if bool(kept.any()):
        complement = float(eigenvalues[kept].sum()) / dim  # tr(Σ)/D, the cut directions' share is ~0
    else:  # collapsed: no direction carries variance, so Euclidean at the features' own scale
        complement = energy / dim if energy > 0 else 1.0
    effective = torch.where(kept, eigenvalues, torch.full_like(eigenvalues, complement))
    return eigenvectors / effective.sqrt()[None, :]


def _group_means(x: Tensor, groups: Tensor) -> tuple[Tensor, Tensor]:
    """([C, D] means of the non-empty groups, [N] each row's compact group index 0..C−1)."""
    if groups.shape != (x.shape[0],):
        raise ValueError(f"groups must be [{x.shape[0]}], got shape {tuple(groups.shape)}")
    _, compact = torch.unique(groups.to(x.device), return_inverse=True)
    count = int(compact.max()) + 1
    sums = torch.zeros(count, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, compact, x)
    sizes = torch.bincount(compact, minlength=count).to(x.dtype)
    return sums / sizes[:, None], compact


@dataclass
class GaussianDetector:
    """Gaussians N(μ_c, Σ_c); score = min_c squared Mahalanobis distance (float64).

    ``tied`` (Lee et al. 2018): one shared covariance, the maximum-likelihood within-group
    Σ = (1/N) Σ_i (x_i − μ_{c(i)})(x_i − μ_{c(i)})ᵀ. Otherwise one covariance per group,
    Σ_c = (1/N_c) Σ_{i ∈ c} (x_i − μ_c)(x_i − μ_c)ᵀ (biased, as ``np.cov(bias=True)`` in SSD's code).
    Each is inverted with the relative rank cut of ``RANK_TOLERANCE`` (:func:`whitening`). Scoring
    whitens, z = (x − μ_c) W_c, so d_c(x) = ‖z‖²; tied, it whitens once against all means: one
    [M, D] × [D, D] product and an [M, C] distance matrix.
    """

    means: Tensor  # [C, D] float64
    whiten: Tensor  # tied: [D, D]; per group: [C, D, D] (float64)
    normalise: bool

    @classmethod
    def fit(
        cls, features: Tensor, groups: Tensor, normalise: bool = False, tied: bool = True
    ) -> GaussianDetector:
        """Group means and covariance(s) of ``features`` [N, D] under ``groups`` [N].

        ``normalise`` L2-normalises features first (Lee et al. use raw features). Groups may be any
        integers; empty ids are simply absent.
        """
        x = _check_features(features, "features").double()
        if normalise:
            x = F.normalize(x, dim=1)
        means, compact = _group_means(x, groups)
        centred = x - means[compact]
        if tied:
            covariance = centred.T @ centred / x.shape[0]
            whiten = whitening(covariance, float((x * x).sum(1).mean()))
        else:
            blocks = []
            for c in range(means.shape[0]):
                rows = compact == c
                members, spread = x[rows], centred[rows]
                covariance = spread.T @ spread / members.shape[0]
                blocks.append(whitening(covariance, float((members * members).sum(1).mean())))
            whiten = torch.stack(blocks)
        return cls(means=means, whiten=whiten, normalise=normalise)

    @property
    def tied(self) -> bool:
        return self.whiten.dim() == 2

    def score(self, features: Tensor, chunk_size: int = 4096) -> Tensor:
        """[M] min over Gaussians of the squared Mahalanobis distance (float64), higher = more OOD."""
        x = _check_features(features, "features")
        if x.shape[1] != self.means.shape[1]:
            raise ValueError(f"feature dim {x.shape[1]} differs from the fitted {self.means.shape[1]}")
        centre = self.means.mean(dim=0)
        means_w = (self.means - centre) @ self.whiten if self.tied else None
        out = torch.empty(x.shape[0], dtype=torch.float64)
        for start in range(0, x.shape[0], chunk_size):
            chunk = x[start : start + chunk_size].to(self.means.device, torch.float64)
            if self.normalise:
                chunk = F.normalize(chunk, dim=1)
            if means_w is not None:
                z = (chunk - centre) @ self.whiten
                squared = (
                    (z * z).sum(1, keepdim=True) - 2 * z @ means_w.T + (means_w * means_w).sum(1)[None, :]
                )
            else:
                pairs = zip(self.means, self.whiten, strict=True)
                squared = torch.stack([((chunk - m) @ w).square().sum(1) for m, w in pairs], dim=1)
            out[start : start + chunk.shape[0]] = squared.amin(dim=1).clamp_min(0.0).cpu()
        return out


def ssd_detector(features: Tensor, num_clusters: int = SSD_CLUSTERS, seed: int = 0) -> GaussianDetector:
    """SSD (Sehwag et al. 2021, "SSD: a unified framework for self-supervised outlier detection").

    As their released code (``eval_ssd.py``, ``utils.get_scores_one_cluster``): features are
    L2-normalised, standardised per coordinate with the reference's mean and standard deviation,
    clustered by k-means (``num_clusters``; the default ``SSD_CLUSTERS`` = 1 is the paper's), and
    each cluster gets its own Gaussian with the biased covariance (``np.cov(bias=True)``); the score
    is the minimum over clusters of the squared Mahalanobis distance. Stated differences:

    - the Gaussians are fitted on the normalised features, not the standardised ones: the
      standardisation is an invertible per-coordinate affine map, under which a Mahalanobis
      distance with a full-rank covariance does not change, so only k-means (``num_clusters`` > 1)
      sees standardised features, as in SSD. (Standardising the Gaussians too would divide a
      coordinate without spread by 1e-10, SSD's epsilon, and amplify a query's deviation there
      10¹⁰× once it is not discarded by a pseudo-inverse.)
    - covariances are inverted with the rank cut of ``RANK_TOLERANCE`` instead of
      ``np.linalg.pinv``: identical where a cluster's covariance has full numerical rank, and a
      finite Euclidean penalty instead of none outside its span.
    - k-means is scikit-learn's (k-means++, 3 restarts, seeded; :func:`kmeans_clusters`) instead of
      faiss's.
    """
    x = F.normalize(_check_features(features, "features").double(), dim=1)
    if num_clusters == 1:
        clusters = torch.zeros(x.shape[0], dtype=torch.long)
    else:
        spread = x.std(dim=0, unbiased=False)
        standardised = (x - x.mean(dim=0)) / (spread + 1e-10)  # SSD's epsilon
        clusters = kmeans_clusters(standardised, num_clusters, seed, normalise=False)
    return GaussianDetector.fit(x, clusters, normalise=True, tied=False)


def kmeans_clusters(
    features: Tensor, num_clusters: int, seed: int, max_fit_items: int = 10_000, normalise: bool = True
) -> Tensor:
    """[N] k-means cluster ids of ``features``, L2-normalised first with ``normalise``.

    scikit-learn ``KMeans`` (k-means++, 3 restarts, ``random_state=seed``) is fitted on at most
    ``max_fit_items`` rows (a seeded random subset: the centroids of 10k points are as good as those
    of 60k for ~10 clusters, at a sixth of the cost), then every row is assigned to its nearest centroid.
    """
    from sklearn.cluster import KMeans

    x = _check_features(features, "features").double()
    x = (F.normalize(x, dim=1) if normalise else x).cpu().numpy()
    if not 1 <= num_clusters <= x.shape[0]:
        raise ValueError(f"num_clusters must lie in [1, {x.shape[0]}], got {num_clusters}")
    fit_rows = x
    if x.shape[0] > max_fit_items:
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:max_fit_items]
        fit_rows = x[order.sort().values.numpy()]
    kmeans = KMeans(n_clusters=num_clusters, n_init=3, random_state=seed).fit(fit_rows)
    return torch.as_tensor(kmeans.predict(x), dtype=torch.long)


def energy_score(logits: Tensor) -> Tensor:
    """Free energy E(x) = −logsumexp_c f_c(x) of logits [..., C]: low for confident inputs, so
    higher = more OOD (Liu et al. 2020, temperature 1)."""
    return -torch.logsumexp(logits.detach().double(), dim=-1)


def max_logit_score(logits: Tensor) -> Tensor:
    """−max_c f_c(x) of logits [..., C], higher = more OOD (MaxLogit, Hendrycks et al. 2022)."""
    return -logits.detach().double().amax(dim=-1)
