"""Weighted k-nearest-neighbour classifier on frozen features (InstDisc / DINO style, design.md §4).

For a query q the k training points with the highest cosine similarity s_i vote for their labels
with weight exp(s_i / T); the per-class sums are normalised into a probability vector. This needs
no training and no hyper-parameter search, which is why it is the cheapest honest read-out of an
embedding. The probabilistic variant averages those vote distributions over embedding samples,
the kNN analogue of Bayesian model averaging.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


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
    chunk_size: int = 1024,
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
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> dict[int, Tensor]:
    """Class probabilities [M, C] for each query from its k most cosine-similar training points.

    Both sides are L2-normalised, so the dot product is the cosine similarity. Queries are processed
    ``chunk_size`` at a time against the training set in blocks of 16 × ``chunk_size``, merging
    top-k lists: the similarity matrix of a full test set against a full training set (10k × 50k
    floats) is what would otherwise dominate memory. ``k`` larger than the number of
    candidates is clipped. ``exclude_self=True`` is leave-one-out for the case where the queries
    *are* the training set (row i is not allowed to vote for itself), as in retrieval evaluation.

    One pass serves every k in ``ks``: the top-max(k) list is sorted by similarity, so its first k
    entries are the top-k list (ties aside), and the similarity matrix — the whole cost — is computed
    once instead of once per k. Returns {k: probabilities [M, C]}.
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

    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)
    labels = train_labels.to(train.device).long()
    out = {k: torch.empty(m, num_classes, dtype=dtype, device=train.device) for k in ks}
    for start in range(0, m, chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].to(train.device, dtype), dim=1)
        top_sim, top_idx = _running_topk(
            query, train, k_max, chunk_size * 16, start if exclude_self else None
        )
        for k, used in clipped.items():
            out[k][start : start + query.shape[0]] = _votes(
                top_sim[:, :used], labels[top_idx[:, :used]], num_classes, temperature
            )
    return out


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
    chunk_size: int = 1024,
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
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """Probabilistic kNN: the vote distribution averaged over embedding samples, [M, C].

    ``train_draws`` [S, N, D] and ``query_draws`` [S, M, D] are paired by sample index s (draw s of
    the training set is the feature space in which draw s of the queries is classified). A side
    with a single draw (a deterministic method) is broadcast against the other. Probabilities, not
    similarities, are averaged, so the result is a mixture of kNN predictors.
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
        )
        for k, p in probs.items():
            total[k] = p if k not in total else total[k] + p
    return {k: p / max(s_train, s_query) for k, p in total.items()}
