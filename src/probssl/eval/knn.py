"""Weighted k-nearest-neighbour classifier on frozen features (InstDisc / DINO style, design.md §4).

For a query q the k training points with the highest cosine similarity s_i vote for their labels
with weight exp(s_i / T); the per-class sums are normalised into a probability vector. This needs
no training and no hyper-parameter search, which is why it is the cheapest honest read-out of an
embedding. The probabilistic variant averages those vote distributions over embedding samples,
the kNN analogue of Bayesian model averaging.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from probssl.eval.features import content_key

SIMILARITY_BLOCK = 1 << 24
"""Similarities per block (64 MB of float32): a chunk of q queries meets the training features
SIMILARITY_BLOCK // q rows at a time. At the default 256 queries that is 65,536 rows, so a 60k
training set is one product and one ``topk`` per chunk; blocks merged by running top-k lists
(larger training sets) cost ~40% more at 60k, hence the large block."""


def _check_features(features: Tensor, labels: Tensor | None, name: str) -> None:
    if features.dim() != 2:
        raise ValueError(f"{name} must be [N, D], got shape {tuple(features.shape)}")
    if labels is not None and labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be [{features.shape[0]}], got shape {tuple(labels.shape)}")


def _votes(sim: Tensor, neighbour_labels: Tensor, num_classes: int, temperature: float) -> Tensor:
    """Normalised class votes from top-k similarities [m, k] and their labels [m, k].

    The row maximum is subtracted before exponentiating: it cancels in the normalisation but keeps
    exp(s/T) finite for small temperatures.
    """
    weights = torch.exp((sim - sim.amax(dim=1, keepdim=True)) / temperature)
    votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
    votes.scatter_add_(1, neighbour_labels, weights)
    return votes / votes.sum(dim=1, keepdim=True)


def knn_predict(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
    exclude_self: bool = False,
) -> Tensor:
    """Class probabilities [M, C] for each query from its k most cosine-similar training points
    (see :func:`knn_predict_many`, which does this for several k in one pass)."""
    return knn_predict_many(
        train_features, train_labels, query_features, num_classes, (k,), temperature, chunk_size, exclude_self
    )[k]


def knn_predict_many(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    num_classes: int,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    chunk_size: int = 256,
    exclude_self: bool = False,
    cache: NeighbourCache | None = None,
) -> dict[int, Tensor]:
    """Class probabilities [M, C] for each query from its k most cosine-similar training points.

    Both sides are L2-normalised, so the dot product is the cosine similarity. Queries are processed
    ``chunk_size`` at a time against the training set in blocks of ``SIMILARITY_BLOCK`` similarities,
    merging top-k lists: the similarity matrix of a full test set against a full training set (10k × 50k
    floats) is what would otherwise dominate memory. ``k`` larger than the number of
    candidates is clipped. ``exclude_self=True`` is leave-one-out for the case where the queries
    *are* the training set (row i is not allowed to vote for itself), as in retrieval evaluation.

    One pass serves every k in ``ks``: the top-max(k) list is sorted by similarity, so its first k
    entries are the top-k list (ties aside), and the similarity matrix — the whole cost — is computed
    once instead of once per k. Returns {k: probabilities [M, C]}. With a ``cache``, the pass's top
    similarities are remembered for the kNN OOD detector (:class:`NeighbourCache`).
    """
    _check_features(train_features, train_labels, "train_features")
    _check_features(query_features, None, "query_features")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"feature dims differ: train {train_features.shape[1]} vs query {query_features.shape[1]}"
        )
    if not ks or min(ks) < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"need k >= 1, temperature > 0, chunk_size >= 1 (got {list(ks)}, {temperature}, {chunk_size})"
        )
    n, m = train_features.shape[0], query_features.shape[0]
    if exclude_self and m != n:
        raise ValueError(
            f"exclude_self needs the queries to be the training set, got {m} queries for {n} points"
        )
    candidates = n - 1 if exclude_self else n
    if candidates < 1:
        raise ValueError("kNN needs at least one candidate neighbour")
    clipped = {k: min(k, candidates) for k in ks}
    k_max = max(clipped.values())

    labels = train_labels.to(train_features.device).long()
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    out = {k: torch.empty(m, num_classes, dtype=dtype, device=train_features.device) for k in ks}
    kept = []  # the top ``cache.keep`` similarities of every query, for the cache
    for start, top_sim, top_idx in _top_chunks(
        train_features, query_features, k_max, chunk_size, exclude_self
    ):
        for k, used in clipped.items():
            out[k][start : start + top_sim.shape[0]] = _votes(
                top_sim[:, :used], labels[top_idx[:, :used]], num_classes, temperature
            )
        if cache is not None:
            kept.append(top_sim[:, : cache.keep])
    if cache is not None and not exclude_self:
        cache.remember(train_features, query_features, chunk_size, torch.cat(kept))
    return out


def _top_chunks(
    train_features: Tensor, query_features: Tensor, k: int, chunk_size: int, exclude_self: bool = False
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(start, top-k cosine similarities [m, k] in descending order, their training indices [m, k])
    for each ``chunk_size`` block of queries against the whole training set.

    The one place similarities between two feature sets are computed: the kNN classifier and the kNN
    OOD detector (:func:`probssl.eval.feature_ood.knn_scores`) both read them from here, so a shared
    pass (:class:`NeighbourCache`) gives them bit-identical values to separate passes.
    """
    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)
    for start in range(0, query_features.shape[0], chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].to(train.device, dtype), dim=1)
        block = max(1, SIMILARITY_BLOCK // chunk_size)
        top_sim, top_idx = _running_topk(query, train, k, block, start if exclude_self else None)
        yield start, top_sim, top_idx


def top_similarities(train_features: Tensor, query_features: Tensor, k: int, chunk_size: int = 256) -> Tensor:
    """[M, k] the k largest cosine similarities of each query to the training features, descending.

    Order statistics only (no indices), so ties among training features cannot change them.
    """
    _check_features(train_features, None, "train_features")
    _check_features(query_features, None, "query_features")
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k must lie in [1, {train_features.shape[0]}], got {k}")
    chunks = [sim for _, sim, _ in _top_chunks(train_features, query_features, k, chunk_size)]
    if not chunks:  # no queries
        dtype = torch.promote_types(train_features.dtype, torch.float32)
        return torch.empty(0, k, dtype=dtype, device=train_features.device)
    return torch.cat(chunks)


class NeighbourCache:
    """The top ``keep`` cosine similarities of query sets against training sets, remembered by content.

    Evaluation asks twice for the neighbours of the same test features among the same training
    features: the kNN classifier (k up to 200) and the kNN OOD detector (k = 1, 50), once per
    posterior draw. The classifier's pass stores its first ``keep`` similarities per query (values
    only, [M, keep] float32: 2 MB per 10k queries), and the detector reads them instead of a second
    [M, N] product, the cost of both. Keys are content digests, so a hit is the same features (a
    deterministic method's mean is its only draw) and never a stale tensor at a reused address;
    ``chunk_size`` is part of the key, since it decides how the similarity products are blocked.
    """

    def __init__(self, keep: int = 50) -> None:
        self.keep = keep
        self._store: dict[tuple[str, str, int], Tensor] = {}
        self.hits = 0

    @staticmethod
    def _key(train: Tensor, query: Tensor, chunk_size: int) -> tuple[str, str, int]:
        return content_key(train), content_key(query), chunk_size

    def remember(self, train: Tensor, query: Tensor, chunk_size: int, similarities: Tensor) -> None:
        self._put(self._key(train, query, chunk_size), train.shape[0], similarities)

    def _put(self, key: tuple[str, str, int], candidates: int, similarities: Tensor) -> None:
        if similarities.shape[1] >= min(self.keep, candidates):
            self._store[key] = similarities[:, : self.keep].clone()

    def top(self, train: Tensor, query: Tensor, k: int, chunk_size: int) -> Tensor:
        """[M, k] as :func:`top_similarities`, from a remembered pass when one holds k values."""
        key = self._key(train, query, chunk_size)  # hashing 60k × 128 floats costs ~50 ms: once
        hit = self._store.get(key)
        if hit is not None and hit.shape[1] >= k:
            self.hits += 1
            return hit[:, :k]
        values = top_similarities(train, query, k, chunk_size)
        self._put(key, train.shape[0], values)
        return values


def _running_topk(
    query: Tensor, train: Tensor, k: int, train_chunk: int, self_offset: int | None
) -> tuple[Tensor, Tensor]:
    """Top-k cosine similarities of ``query`` rows against ``train``, ``train_chunk`` columns at a time.

    Memory is O(rows × (train_chunk + k)) whatever the size of the training set (a 1,024-query chunk
    against 100k training points would otherwise be a 400 MB similarity block). The merged result is
    the same top-k as one ``topk`` over the full row (ties aside). ``self_offset`` masks the query's
    own column (leave-one-out): query row r is training row ``self_offset + r``.
    """
    best_sim = best_idx = None
    rows = torch.arange(query.shape[0], device=query.device)
    for lo in range(0, train.shape[0], train_chunk):
        sim = query @ train[lo : lo + train_chunk].T
        if self_offset is not None:
            cols = rows + self_offset - lo
            inside = (cols >= 0) & (cols < sim.shape[1])
            sim[rows[inside], cols[inside]] = float("-inf")
        sim_k, idx_k = sim.topk(min(k, sim.shape[1]), dim=1)
        idx_k = idx_k + lo
        if best_sim is None:
            best_sim, best_idx = sim_k, idx_k
        else:
            both = torch.cat([best_sim, sim_k], dim=1)
            merged_sim, order = both.topk(min(k, both.shape[1]), dim=1)
            best_idx = torch.cat([best_idx, idx_k], dim=1).gather(1, order)
            best_sim = merged_sim
    return best_sim, best_idx


def knn_predict_marginal(
    train_draws: Tensor,
    train_labels: Tensor,
    query_draws: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> Tensor:
    """Probabilistic kNN for one k (see :func:`knn_predict_marginal_many`)."""
    return knn_predict_marginal_many(
        train_draws, train_labels, query_draws, num_classes, (k,), temperature, chunk_size
    )[k]


def knn_predict_marginal_many(
    train_draws: Tensor,
    train_labels: Tensor,
    query_draws: Tensor,
    num_classes: int,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    chunk_size: int = 256,
    cache: NeighbourCache | None = None,
) -> dict[int, Tensor]:
    """Probabilistic kNN: the vote distribution averaged over embedding samples, [M, C].

    ``train_draws`` [S, N, D] and ``query_draws`` [S, M, D] are paired by sample index s (draw s of
    the training set is the feature space in which draw s of the queries is classified). A side
    with a single draw (a deterministic method) is broadcast against the other. Probabilities, not
    similarities, are averaged, so the result is a mixture of kNN predictors. ``cache``: see
    :class:`NeighbourCache`.
    """
    if train_draws.dim() != 3 or query_draws.dim() != 3:
        raise ValueError(
            f"draws must be [S, N, D], got {tuple(train_draws.shape)} and {tuple(query_draws.shape)}"
        )
    s_train, s_query = train_draws.shape[0], query_draws.shape[0]
    if s_train != s_query and 1 not in (s_train, s_query):
        raise ValueError(f"cannot pair {s_train} train draws with {s_query} query draws")
    total: dict[int, Tensor] = {}
    for s in range(max(s_train, s_query)):
        probs = knn_predict_many(
            train_draws[min(s, s_train - 1)],
            train_labels,
            query_draws[min(s, s_query - 1)],
            num_classes,
            ks=ks,
            temperature=temperature,
            chunk_size=chunk_size,
            cache=cache,
        )
        for k, p in probs.items():
            total[k] = p if k not in total else total[k] + p
    return {k: p / max(s_train, s_query) for k, p in total.items()}
