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
    RANK_TOLERANCE,
    SSD_CLUSTERS,
    GaussianDetector,
    energy_score,
    kmeans_clusters,
    knn_scores,
    max_logit_score,
    ssd_detector,
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
    return distances[:, k - 1]  # scikit-learn's cosine distance is 1 − cos, the detector's score


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


def _rank_cut_mahalanobis(x: np.ndarray, groups: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The rank-cut tied Mahalanobis distance by numpy's pseudo-inverse (an independent route to it):
    d² = rᵀ Σ⁺ r + rᵀ (I − Σ Σ⁺) r / σ²_⊥, with Σ⁺ cut at RANK_TOLERANCE · mean‖x‖² and
    σ²_⊥ = tr(Σ) / D (the projector I − Σ Σ⁺ is the cut directions')."""
    ids = np.unique(groups)
    means = {g: x[groups == g].mean(0) for g in ids}
    centred = np.stack([x[i] - means[groups[i]] for i in range(len(x))])
    covariance = centred.T @ centred / len(x)
    energy = (x * x).sum(1).mean()
    largest = np.linalg.eigvalsh(covariance).max()
    inverse = np.linalg.pinv(covariance, rcond=RANK_TOLERANCE * energy / largest, hermitian=True)
    null = np.eye(x.shape[1]) - covariance @ inverse
    complement = np.trace(covariance) / x.shape[1]
    return np.array(
        [min((q - m) @ inverse @ (q - m) + (q - m) @ null @ (q - m) / complement for m in means.values())
         for q in query]
    )  # fmt: skip


def test_mahalanobis_normalised_and_rank_deficient() -> None:
    x, labels = _blobs(60, d=4)
    x = torch.cat([x, torch.zeros(60, 2, dtype=torch.float64)], dim=1)  # two dead dimensions
    query = torch.randn(9, 6, dtype=torch.float64)
    detector = GaussianDetector.fit(x, labels, normalise=True)
    scores = detector.score(query)
    assert torch.isfinite(scores).all()
    xn = (x / x.norm(dim=1, keepdim=True)).numpy()
    qn = (query / query.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(scores.numpy(), _rank_cut_mahalanobis(xn, labels.numpy(), qn), rtol=1e-6)
    # The dead dimensions are measured Euclidean at tr(Σ)/D: a query that leaves the training span
    # scores higher than its projection onto it, by ‖offset‖² / (tr(Σ)/D), not by 10⁶×.
    inside = torch.from_numpy(xn[:3])
    outside = inside + torch.tensor([0, 0, 0, 0, 0.1, 0], dtype=torch.float64)
    raw = GaussianDetector.fit(inside.new_tensor(xn), labels)
    centred = xn - np.stack([xn[labels.numpy() == c].mean(0) for c in range(3)])[labels.numpy()]
    gain = raw.score(outside) - raw.score(inside)
    np.testing.assert_allclose(gain.numpy(), 0.01 / (np.trace(centred.T @ centred / 60) / 6), rtol=1e-6)


def test_mahalanobis_d_larger_than_n_keeps_held_out_distances_in_scale() -> None:
    """Issue 28 item 3: D = 512, N = 100. Held-out in-distribution points used to score ~4e7 against
    the training points' ~95 (the floored null space carried all of their distance)."""
    g = torch.Generator().manual_seed(0)
    train = torch.randn(100, 512, generator=g, dtype=torch.float64)
    held_out = torch.randn(100, 512, generator=g, dtype=torch.float64)
    labels = torch.arange(100) % 4
    detector = GaussianDetector.fit(train, labels)
    on_train, on_held = detector.score(train).median(), detector.score(held_out).median()
    assert float(on_held / on_train) < 10.0  # of the same order (was ~4e5)
    expected = _rank_cut_mahalanobis(train.numpy(), labels.numpy(), held_out[:10].numpy())
    np.testing.assert_allclose(detector.score(held_out[:10]).numpy(), expected, rtol=1e-6)


def test_mahalanobis_fully_collapsed_features_is_euclidean() -> None:
    x = torch.ones(10, 3, dtype=torch.float64)
    detector = GaussianDetector.fit(x, torch.zeros(10, dtype=torch.long))
    query = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(detector.score(query), torch.tensor([0.0, 5.0], dtype=torch.float64))


@pytest.mark.parametrize("tied", [True, False])
def test_collapsed_normalised_fit_gives_finite_sane_scores(tied: bool) -> None:
    """Issue 28 item 3: ``fit(torch.ones(50, 8), ...)`` on normalised features left eigenvalues of
    ~1e-33 (rounding of the normalised mean) that the old floor kept, and scored 4e34–4e37."""
    g = torch.Generator().manual_seed(0)
    query = torch.ones(6, 8) + torch.randn(6, 8, generator=g)
    for groups in (torch.zeros(50, dtype=torch.long), torch.arange(50) % 3):
        scores = GaussianDetector.fit(torch.ones(50, 8), groups, normalise=True, tied=tied).score(query)
        # Collapsed: Euclidean at the features' own energy per dimension, 1/8 for unit vectors.
        qn = torch.nn.functional.normalize(query.double(), dim=1).numpy()
        expected = 8 * ((qn - 8**-0.5) ** 2).sum(1)
        np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-9)
        assert float(scores.max()) < 100
    ssd = ssd_detector(torch.ones(50, 8)).score(query)
    assert torch.isfinite(ssd).all() and float(ssd.max()) < 100


def _ssd_reference(train: np.ndarray, query: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """SSD's released scoring (eval_ssd.py), by numpy: normalise (‖x‖ + 1e-10), standardise with the
    training mean/std, then per cluster np.linalg.pinv(np.cov(x.T, bias=True)), min over clusters."""
    train = train / (np.linalg.norm(train, axis=-1, keepdims=True) + 1e-10)
    query = query / (np.linalg.norm(query, axis=-1, keepdims=True) + 1e-10)
    m, s = train.mean(0, keepdims=True), train.std(0, keepdims=True)
    train, query = (train - m) / (s + 1e-10), (query - m) / (s + 1e-10)
    per_cluster = []
    for c in np.unique(clusters):
        members = train[clusters == c]
        r = query - members.mean(0, keepdims=True)
        per_cluster.append(np.sum(r * np.linalg.pinv(np.cov(members.T, bias=True)).dot(r.T).T, axis=-1))
    return np.min(per_cluster, axis=0)


def test_ssd_matches_the_released_code_one_cluster() -> None:
    assert SSD_CLUSTERS == 1
    x, _ = _blobs(200, d=5, c=3)
    query = torch.cat([_blobs(20, d=5, seed=7)[0], 4 * torch.randn(5, 5, dtype=torch.float64)])
    scores = ssd_detector(x).score(query)
    expected = _ssd_reference(x.numpy(), query.numpy(), np.zeros(200, dtype=int))
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-7)


def test_ssd_several_clusters_one_covariance_each() -> None:
    x, _ = _blobs(240, d=5, c=4, seed=3)
    x = 5 * x
    query = _blobs(30, d=5, seed=8)[0] * 5
    detector = ssd_detector(x, num_clusters=4, seed=0)
    # The clusters: scikit-learn's k-means of the normalised, standardised features (SSD's input).
    xn = torch.nn.functional.normalize(x, dim=1).numpy()
    standardised = (xn - xn.mean(0)) / (xn.std(0) + 1e-10)
    clusters = KMeans(n_clusters=4, n_init=3, random_state=0).fit_predict(standardised)
    np.testing.assert_allclose(
        detector.score(query).numpy(), _ssd_reference(x.numpy(), query.numpy(), clusters), rtol=1e-6
    )


def test_per_cluster_covariance_sees_what_a_tied_one_averages_away() -> None:
    """Issue 28 item 2: two clusters of very different spread, and outliers near the tight one at a
    spread the wide one has. A tied covariance averages the spreads and is at chance; SSD's rule
    (one covariance per cluster) separates them."""
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(0)
    tight, wide = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    tight[0], wide[0] = 4.0, -4.0

    def blob(n: int, centre: torch.Tensor, spread: float) -> torch.Tensor:
        return centre + spread * torch.randn(n, 8, generator=g, dtype=torch.float64)

    train = torch.cat([blob(500, tight, 0.1), blob(500, wide, 1.0)])
    clusters = (torch.arange(1000) >= 500).long()
    test = torch.cat([blob(500, tight, 0.1), blob(500, wide, 1.0)])
    ood = blob(1000, tight, 0.3)
    truth = np.r_[np.zeros(1000), np.ones(1000)]
    auroc = {}
    for tied in (True, False):
        detector = GaussianDetector.fit(train, clusters, tied=tied)
        auroc[tied] = roc_auc_score(truth, torch.cat([detector.score(test), detector.score(ood)]).numpy())
    assert abs(auroc[True] - 0.5) < 0.05 and auroc[False] > 0.95
    # Per-cluster distances against numpy: biased np.cov and its inverse, cluster by cluster.
    expected = np.min(
        [
            [(q - m) @ np.linalg.inv(np.cov(train[clusters == c].numpy().T, bias=True)) @ (q - m)
             for q in ood[:20].numpy()]
            for c, m in ((c, train[clusters == c].mean(0).numpy()) for c in (0, 1))
        ],
        axis=0,
    )  # fmt: skip
    per_cluster = GaussianDetector.fit(train, clusters, tied=False).score(ood[:20])
    np.testing.assert_allclose(per_cluster.numpy(), expected, rtol=1e-8)


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
    names = {"knn1", "knn50", "mahalanobis", "mahalanobis_kmeans", "mahalanobis_raw", "ssd"}
    names |= {"energy", "maxlogit"}
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
        scores["mahalanobis_kmeans"].numpy(), _brute_force_mahalanobis(xn, clusters, qn), rtol=1e-5
    )
    np.testing.assert_allclose(
        scores["ssd"].numpy(),
        _ssd_reference(x.float().double().numpy(), query_x.float().double().numpy(), np.zeros(70, dtype=int)),
        rtol=1e-5,
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
        "mahalanobis_kmeans",
        "mahalanobis_raw",
        "ssd",
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


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # k-means of one point
def test_one_collapsed_draw_cannot_dominate_the_posterior_average() -> None:
    """Issue 28 item 3: a posterior draw whose training features collapsed onto one vector used to
    score ~1e35 under every Gaussian detector, so ``*_bma`` was that draw alone."""
    x, labels = _blobs(60, c=3)
    g = torch.Generator().manual_seed(0)
    draws = x[None] + 0.3 * torch.randn(3, *x.shape, generator=g, dtype=torch.float64)
    draws[1] = x[0]  # draw 1: every training image has the same feature
    train = _bank(x, labels, draws)
    qx, _ = _blobs(12, seed=6)
    query = _bank(qx, torch.full((12,), -1), qx[None] + 0.3 * torch.randn(3, *qx.shape, generator=g))
    detectors = suite.FeatureDetectors.fit(train, _probe(train, 3), 3, seed=0, max_draws=3)
    scores = detectors.scores(query)
    for name in ("mahalanobis", "mahalanobis_raw", "mahalanobis_kmeans", "ssd"):
        bma, point = scores[f"{name}_bma"], scores[name]
        assert torch.isfinite(bma).all()
        assert float(bma.median()) < 10 * float(point.median()), name
