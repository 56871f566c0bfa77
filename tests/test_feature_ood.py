"""Feature-space OOD detectors vs independent computations (scikit-learn, scipy, numpy loops)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.cluster import KMeans
from sklearn.covariance import EmpiricalCovariance
from sklearn.metrics import adjusted_rand_score
from sklearn.neighbors import NearestNeighbors

from probssl.eval import suite
from probssl.eval.feature_ood import (
    COVARIANCE_EPS,
    GaussianDetector,
    energy_score,
    kmeans_clusters,
    knn_scores,
    max_logit_score,
)
from probssl.eval.features import FeatureBank

pytestmark = pytest.mark.usefixtures("single_thread")


def _blobs(n: int, d: int = 6, c: int = 3, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % c
    centres = 3 * torch.randn(c, d, generator=g, dtype=dtype)
    return centres[labels] + torch.randn(n, d, generator=g, dtype=dtype), labels


def _sklearn_kth_cosine(train: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    nn = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute").fit(train)
    distances, _ = nn.kneighbors(query)
    return distances[:, k - 1] - 1.0  # cosine distance 1 − cos, so −cos = distance − 1


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_knn_scores_match_sklearn_nearest_neighbors(chunk_size: int) -> None:
    train, _ = _blobs(80)
    query, _ = _blobs(23, seed=1)
    scores = knn_scores(train, query, ks=(1, 5, 80), chunk_size=chunk_size)
    for k in (1, 5, 80):
        expected = _sklearn_kth_cosine(train.numpy(), query.numpy(), k)
        np.testing.assert_allclose(scores[k].numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_scores_with_duplicated_training_rows(dtype: torch.dtype) -> None:
    # Exact duplicates (and rescaled copies) in the training bank: the k-th order statistic counts
    # every copy, so the 3rd neighbour of a query is still its duplicate's direction.
    base, _ = _blobs(10, dtype=dtype)
    train = torch.cat([base, base, 2.5 * base])  # every direction three times
    query = base[:4] + 0.01 * _blobs(4, seed=5, dtype=dtype)[0]
    scores = knn_scores(train, query, ks=(1, 3, 4))
    for k in (1, 3, 4):
        expected = _sklearn_kth_cosine(train.double().numpy(), query.double().numpy(), k)
        np.testing.assert_allclose(
            scores[k].double().numpy(), expected, atol=1e-5 if dtype == torch.float32 else 1e-12
        )
    torch.testing.assert_close(scores[1], scores[3])  # the three copies tie
    assert (scores[4] > scores[3]).all()


def test_knn_scores_invalid_k() -> None:
    train, _ = _blobs(5)
    with pytest.raises(ValueError, match="training set size"):
        knn_scores(train, train, ks=(6,))
    with pytest.raises(ValueError):
        knn_scores(train, train[:, :3])


def _brute_force_mahalanobis(x: np.ndarray, groups: np.ndarray, query: np.ndarray) -> np.ndarray:
    """min over groups of (q − μ_g)ᵀ Σ⁻¹ (q − μ_g) with Σ the tied (within-group) ML covariance."""
    ids = np.unique(groups)
    means = {g: x[groups == g].mean(0) for g in ids}
    centred = np.stack([x[i] - means[groups[i]] for i in range(len(x))])
    covariance = EmpiricalCovariance(assume_centered=True).fit(centred).covariance_
    precision = np.linalg.inv(covariance)
    out = []
    for q in query:
        out.append(min(float((q - means[g]) @ precision @ (q - means[g])) for g in ids))
    return np.array(out)


def test_class_conditional_mahalanobis_matches_empirical_covariance() -> None:
    x, labels = _blobs(90, d=5, c=3)
    query, _ = _blobs(17, d=5, seed=2)
    query = torch.cat([query, 10 * torch.randn(3, 5, dtype=torch.float64)])
    detector = GaussianDetector.fit(x, labels)
    expected = _brute_force_mahalanobis(x.numpy(), labels.numpy(), query.numpy())
    np.testing.assert_allclose(detector.score(query, chunk_size=4).numpy(), expected, rtol=1e-9)
    # sklearn's own Mahalanobis for the class of each query's minimum, as a second reference.
    centred = x - torch.stack([x[labels == c].mean(0) for c in range(3)])[labels]
    reference = EmpiricalCovariance(assume_centered=True).fit(centred.numpy())
    per_class = np.stack(
        [
            EmpiricalCovariance(assume_centered=True)
            .fit(centred.numpy())
            .mahalanobis(query.numpy() - x[labels == c].mean(0).numpy())
            for c in range(3)
        ]
    )
    assert reference.covariance_.shape == (5, 5)
    np.testing.assert_allclose(detector.score(query).numpy(), per_class.min(0), rtol=1e-9)


def test_mahalanobis_normalised_and_rank_deficient() -> None:
    x, labels = _blobs(60, d=4)
    x = torch.cat([x, torch.zeros(60, 2, dtype=torch.float64)], dim=1)  # two dead dimensions
    query = torch.randn(9, 6, dtype=torch.float64)
    detector = GaussianDetector.fit(x, labels, normalise=True)
    scores = detector.score(query)
    assert torch.isfinite(scores).all()
    # Brute force: the eigenvalue-floored inverse of the tied covariance of the normalised features.
    xn = (x / x.norm(dim=1, keepdim=True)).numpy()
    qn = (query / query.norm(dim=1, keepdim=True)).numpy()
    g = labels.numpy()
    means = np.stack([xn[g == c].mean(0) for c in range(3)])
    centred = xn - means[g]
    covariance = centred.T @ centred / len(xn)
    values, vectors = np.linalg.eigh(covariance)
    floored = np.maximum(values, COVARIANCE_EPS * values.max())
    precision = vectors @ np.diag(1 / floored) @ vectors.T
    expected = [min((q - m) @ precision @ (q - m) for m in means) for q in qn]
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-6)


def test_mahalanobis_fully_collapsed_features_is_euclidean() -> None:
    x = torch.ones(10, 3, dtype=torch.float64)
    detector = GaussianDetector.fit(x, torch.zeros(10, dtype=torch.long))
    query = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(detector.score(query), torch.tensor([0.0, 5.0], dtype=torch.float64))


def test_kmeans_clusters_recover_separated_blobs_and_match_sklearn() -> None:
    x, labels = _blobs(120, d=5, c=4, seed=3)
    x = x * 5
    clusters = kmeans_clusters(x, 4, seed=0)
    xn = torch.nn.functional.normalize(x, dim=1).numpy()
    reference = KMeans(n_clusters=4, n_init=3, random_state=0).fit_predict(xn)
    assert adjusted_rand_score(clusters.numpy(), reference) == 1.0
    torch.testing.assert_close(kmeans_clusters(x, 4, seed=0), clusters)  # seeded
    # Fit on a subset, assign all: every row still gets a cluster, and separated blobs still agree.
    subset = kmeans_clusters(x, 4, seed=0, max_fit_items=40)
    assert subset.shape == (120,) and adjusted_rand_score(subset.numpy(), reference) > 0.9


def test_energy_and_max_logit_match_scipy() -> None:
    logits = 20 * torch.randn(30, 7, dtype=torch.float64)
    np.testing.assert_allclose(energy_score(logits).numpy(), -logsumexp(logits.numpy(), axis=1), rtol=1e-12)
    np.testing.assert_allclose(max_logit_score(logits).numpy(), -logits.numpy().max(axis=1))
    # Confident in-distribution-like logits (one large) get a lower energy than flat ones.
    confident = torch.tensor([[10.0, 0.0, 0.0]])
    flat = torch.tensor([[1.0, 1.0, 1.0]])
    assert energy_score(confident) < energy_score(flat)


# ------------------------------------------------------------------------------------------------
# The suite's detectors: deterministic and posterior-averaged
# ------------------------------------------------------------------------------------------------


def _bank(x: torch.Tensor, labels: torch.Tensor, draws: torch.Tensor | None = None, unc=None) -> FeatureBank:
    draws = x[None].float() if draws is None else draws.float()
    unc = torch.zeros(len(x)) if unc is None else unc
    return FeatureBank(draws=draws, mean=x.float(), uncertainty=unc, labels=labels)


def _probe(bank: FeatureBank, num_classes: int) -> suite.MarginalProbe:
    return suite.MarginalProbe.fit(bank, num_classes, l2_grid=(1e-3,), max_iter=30)


def test_feature_detectors_deterministic_bank() -> None:
    x, labels = _blobs(70, c=3)
    train = _bank(x, labels)
    query_x, _ = _blobs(15, seed=4)
    query = _bank(query_x, torch.full((15,), -1))
    probe = _probe(train, 3)
    detectors = suite.FeatureDetectors.fit(train, probe, 3, seed=0)
    scores = detectors.scores(query)
    names = {"knn1", "knn50", "mahalanobis", "mahalanobis_unsup", "mahalanobis_raw", "energy", "maxlogit"}
    assert set(scores) == names
    np.testing.assert_allclose(
        scores["knn50"].numpy(),
        _sklearn_kth_cosine(x.float().numpy(), query_x.float().numpy(), 50),
        atol=1e-6,
    )
    expected = _brute_force_mahalanobis(
        x.float().double().numpy(), labels.numpy(), query_x.float().double().numpy()
    )
    np.testing.assert_allclose(scores["mahalanobis_raw"].numpy(), expected, rtol=1e-6)
    xn = torch.nn.functional.normalize(x.float().double(), dim=1).numpy()
    qn = torch.nn.functional.normalize(query_x.float().double(), dim=1).numpy()
    np.testing.assert_allclose(
        scores["mahalanobis"].numpy(), _brute_force_mahalanobis(xn, labels.numpy(), qn), rtol=1e-5
    )
    clusters = KMeans(n_clusters=3, n_init=3, random_state=0).fit_predict(xn)
    np.testing.assert_allclose(
        scores["mahalanobis_unsup"].numpy(), _brute_force_mahalanobis(xn, clusters, qn), rtol=1e-5
    )
    logits = probe.probes[0].predict_logits(query_x.float()).numpy()
    np.testing.assert_allclose(scores["energy"].numpy(), -logsumexp(logits, axis=1), rtol=1e-6)
    np.testing.assert_allclose(scores["maxlogit"].numpy(), -logits.max(axis=1), rtol=1e-6)
    # A deterministic method has no own uncertainty and one sample: no `emb`, no `mi`.
    sample_probs = probe.sample_probs(query.draws)
    all_scores = suite.uncertainty_scores(sample_probs, query, detectors)
    assert "emb" not in all_scores and "mi" not in all_scores and "knn1" in all_scores


def test_feature_detectors_average_over_posterior_draws() -> None:
    x, labels = _blobs(60, c=3)
    g = torch.Generator().manual_seed(0)
    draws = x[None] + 0.3 * torch.randn(3, *x.shape, generator=g, dtype=torch.float64)
    train = _bank(x, labels, draws, unc=torch.rand(60, generator=g) + 0.1)
    qx, _ = _blobs(12, seed=6)
    q_draws = qx[None] + 0.3 * torch.randn(3, *qx.shape, generator=g, dtype=torch.float64)
    query = _bank(qx, torch.full((12,), -1), q_draws, unc=torch.rand(12, generator=g) + 0.1)
    probe = _probe(train, 3)
    detectors = suite.FeatureDetectors.fit(train, probe, 3, seed=0, max_draws=2)
    scores = detectors.scores(query)
    for name in (
        "knn1",
        "knn50",
        "mahalanobis",
        "mahalanobis_unsup",
        "mahalanobis_raw",
        "energy",
        "maxlogit",
    ):
        assert f"{name}_bma" in scores
    knn1 = np.mean(
        [_sklearn_kth_cosine(draws[s].float().numpy(), q_draws[s].float().numpy(), 1) for s in range(2)],
        axis=0,
    )
    np.testing.assert_allclose(scores["knn1_bma"].numpy(), knn1, atol=1e-6)
    maha = np.mean(
        [
            _brute_force_mahalanobis(
                draws[s].float().double().numpy(), labels.numpy(), q_draws[s].float().double().numpy()
            )
            for s in range(2)
        ],
        axis=0,
    )
    np.testing.assert_allclose(scores["mahalanobis_raw_bma"].numpy(), maha, rtol=1e-6)
    energy = np.mean(
        [-logsumexp(probe.probes[s].predict_logits(q_draws[s].float()).numpy(), axis=1) for s in range(2)],
        axis=0,
    )
    np.testing.assert_allclose(scores["energy_bma"].numpy(), energy, rtol=1e-6)
    # Point scores: feature detectors on the means, logit scores on draw 0 through the probe fitted on it.
    point_energy = -logsumexp(probe.probes[0].predict_logits(q_draws[0].float()).numpy(), axis=1)
    np.testing.assert_allclose(scores["energy"].numpy(), point_energy, rtol=1e-6)
    knn1 = _sklearn_kth_cosine(x.float().numpy(), qx.float().numpy(), 1)
    np.testing.assert_allclose(scores["knn1"].numpy(), knn1, atol=1e-6)
    all_scores = suite.uncertainty_scores(probe.sample_probs(query.draws), query, detectors)
    assert "emb" in all_scores and "mi" in all_scores
    # `own` from the test bank decides for an OOD bank, even one whose uncertainty is all zeros.
    zero = _bank(qx, torch.full((12,), -1), q_draws)
    assert "emb" in suite.uncertainty_scores(probe.sample_probs(zero.draws), zero, own=True)


def test_knn_scores_from_the_classifiers_pass_are_bit_identical() -> None:
    """The kNN classifier's top similarities, remembered in a NeighbourCache, serve the kNN detector:
    the same values as a detector pass of its own, no second product, and other features miss."""
    from probssl.eval.knn import NeighbourCache, knn_predict_many

    train, labels = _blobs(3000, d=16, c=5, seed=1, dtype=torch.float32)
    query, _ = _blobs(700, d=16, c=5, seed=2, dtype=torch.float32)
    cache = NeighbourCache(keep=50)
    knn_predict_many(train, labels, query, 5, ks=(20, 200), chunk_size=64, cache=cache)
    shared = knn_scores(train, query, ks=(1, 50), chunk_size=64, cache=cache)
    assert cache.hits == 1
    alone = knn_scores(train, query, ks=(1, 50), chunk_size=64)
    for k in (1, 50):
        assert torch.equal(shared[k], alone[k])
    knn_scores(train, query + 1.0, ks=(1, 50), chunk_size=64, cache=cache)  # other queries: a miss
    knn_scores(train, query, ks=(1, 51), chunk_size=64, cache=cache)  # more than remembered: a miss
    assert cache.hits == 1
