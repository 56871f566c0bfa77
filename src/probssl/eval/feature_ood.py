"""Feature-space OOD detectors: the deterministic baselines a method's own uncertainty must beat.

On self-supervised features the field's standard OOD detectors do not use a classifier's softmax
but the geometry of the training features (design.md §4, issue 19). Every score here is "higher =
more OOD", like :mod:`probssl.eval.ood`, so the same detection metrics apply:

- ``knn_scores``: −cos(x, k-th nearest L2-normalised training feature) (Sun et al. 2022, "Out-of-
  distribution detection with deep nearest neighbors"). Queries are processed in chunks against blocks of the
  training features, so memory is one block of similarities, never O(N_query · N_train).
- ``GaussianDetector``: squared Mahalanobis distance to the closest of a set of Gaussians with one
  shared (tied) covariance, min_c (x − μ_c)ᵀ Σ⁻¹ (x − μ_c). Fitted on class labels it is Lee et al.
  (2018); fitted on k-means clusters of normalised features it is SSD (Sehwag et al. 2021).
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

COVARIANCE_EPS = 1e-6
"""Eigenvalues of the tied covariance are floored at ``COVARIANCE_EPS`` × the largest one before
inversion: a regularised pseudo-inverse. SSL features are often rank-deficient (dimensional collapse),
where a plain inverse blows directions of ~zero variance up to ~1/ε_machine; flooring keeps those
directions at a large but finite weight, so the distance stays finite and mostly decided by the
directions that carry variance."""


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
    """{k: [M] −cos(query, its k-th nearest training feature)} for each k, higher = more OOD.

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
    return {k: -top[:, k - 1].cpu() for k in ks}


@dataclass
class GaussianDetector:
    """Gaussians N(μ_c, Σ) with one shared covariance; score = min_c squared Mahalanobis distance.

    Σ = (1/N) Σ_i (x_i − μ_{c(i)})(x_i − μ_{c(i)})ᵀ (the maximum-likelihood tied covariance, as Lee
    et al.), inverted through its eigendecomposition with eigenvalues floored at
    ``COVARIANCE_EPS`` · λ_max (a regularised pseudo-inverse). Scoring whitens once,
    z = (x − m) V diag(λ)^{-1/2}, so d_c(x) = ‖z − ẑ_c‖² with ẑ_c the whitened means: one [M, D] × [D, D]
    product and a [M, C] distance matrix, all in float64.
    """

    means: Tensor  # [C, D] float64
    whiten: Tensor  # [D, D] float64: V diag(λ)^{-1/2}
    normalise: bool

    @classmethod
    def fit(cls, features: Tensor, groups: Tensor, normalise: bool = False) -> GaussianDetector:
        """Class (or cluster) means and the tied covariance of ``features`` [N, D] under ``groups`` [N].

        ``normalise`` L2-normalises features first (SSD does; Lee et al. use raw features). Groups
        may be any integers; empty ids are simply absent.
        """
        x = _check_features(features, "features").double()
        if groups.shape != (x.shape[0],):
            raise ValueError(f"groups must be [{x.shape[0]}], got shape {tuple(groups.shape)}")
        if normalise:
            x = F.normalize(x, dim=1)
        _, compact = torch.unique(groups.to(x.device), return_inverse=True)
        count = int(compact.max()) + 1
        sums = torch.zeros(count, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, compact, x)
        sizes = torch.bincount(compact, minlength=count).to(x.dtype)
        means = sums / sizes[:, None]
        centred = x - means[compact]
        covariance = centred.T @ centred / x.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        largest = float(eigenvalues.max())
        floor = COVARIANCE_EPS * largest if largest > 0 else 1.0  # fully collapsed: plain Euclidean
        whiten = eigenvectors / eigenvalues.clamp_min(floor).sqrt()[None, :]
        return cls(means=means, whiten=whiten, normalise=normalise)

    def score(self, features: Tensor, chunk_size: int = 4096) -> Tensor:
        """[M] min over Gaussians of the squared Mahalanobis distance (float64), higher = more OOD."""
        x = _check_features(features, "features")
        if x.shape[1] != self.means.shape[1]:
            raise ValueError(f"feature dim {x.shape[1]} differs from the fitted {self.means.shape[1]}")
        centre = self.means.mean(dim=0)
        means_w = (self.means - centre) @ self.whiten
        out = torch.empty(x.shape[0], dtype=torch.float64)
        for start in range(0, x.shape[0], chunk_size):
            chunk = x[start : start + chunk_size].to(self.means.device, torch.float64)
            if self.normalise:
                chunk = F.normalize(chunk, dim=1)
            z = (chunk - centre) @ self.whiten
            squared = (z * z).sum(1, keepdim=True) - 2 * z @ means_w.T + (means_w * means_w).sum(1)[None, :]
            out[start : start + chunk.shape[0]] = squared.amin(dim=1).clamp_min(0.0).cpu()
        return out


def kmeans_clusters(features: Tensor, num_clusters: int, seed: int, max_fit_items: int = 10_000) -> Tensor:
    """[N] k-means cluster ids of L2-normalised ``features`` (SSD's unsupervised "classes").

    scikit-learn ``KMeans`` (k-means++, 3 restarts, ``random_state=seed``) is fitted on at most
    ``max_fit_items`` rows (a seeded random subset: the centroids of 10k points are as good as those
    of 60k for ~10 clusters, at a sixth of the cost), then every row is assigned to its nearest centroid.
    """
    from sklearn.cluster import KMeans

    x = F.normalize(_check_features(features, "features").double(), dim=1).cpu().numpy()
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
