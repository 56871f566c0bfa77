"""Weighted k-nearest-neighbour classifier on frozen features (InstDisc / DINO style, design.md §4).

For a query q the k training points with the highest cosine similarity s_i vote for their labels
with weight exp(s_i / T); the per-class sums are normalised into a probability vector. This needs
no training and no hyper-parameter search, which is why it is the cheapest honest read-out of an
embedding. The probabilistic variant averages those vote distributions over embedding samples,
the kNN analogue of Bayesian model averaging.
"""

from __future__ import annotations

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
    """Class probabilities [M, C] for each query from its k most cosine-similar training points.

    Both sides are L2-normalised, so the dot product is the cosine similarity. Queries are processed
    ``chunk_size`` at a time against the training set in blocks of 16 × ``chunk_size``, merging
    top-k lists: the similarity matrix of a full test set against a full training set (10k × 50k
    floats) is what would otherwise dominate memory. ``k`` larger than the number of
    candidates is clipped. ``exclude_self=True`` is leave-one-out for the case where the queries
    *are* the training set (row i is not allowed to vote for itself), as in retrieval evaluation.
    """
    _check_features(train_features, train_labels, "train_features")
    _check_features(query_features, None, "query_features")
    if train_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"feature dims differ: train {train_features.shape[1]} vs query {query_features.shape[1]}"
        )
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"need k >= 1, temperature > 0, chunk_size >= 1 (got {k}, {temperature}, {chunk_size})"
        )
    n, m = train_features.shape[0], query_features.shape[0]
    if exclude_self and m != n:
        raise ValueError(
            f"exclude_self needs the queries to be the training set, got {m} queries for {n} points"
        )
    candidates = n - 1 if exclude_self else n
    if candidates < 1:
        raise ValueError("kNN needs at least one candidate neighbour")
    k = min(k, candidates)

    dtype = torch.promote_types(train_features.dtype, torch.float32)
    train = F.normalize(train_features.to(dtype), dim=1)
    labels = train_labels.to(train.device).long()
    out = torch.empty(m, num_classes, dtype=dtype, device=train.device)
    for start in range(0, m, chunk_size):
        query = F.normalize(query_features[start : start + chunk_size].to(train.device, dtype), dim=1)
        top_sim, top_idx = _running_topk(query, train, k, chunk_size * 16, start if exclude_self else None)
        out[start : start + query.shape[0]] = _votes(top_sim, labels[top_idx], num_classes, temperature)
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
    total = None
    for s in range(max(s_train, s_query)):
        probs = knn_predict(
            train_draws[min(s, s_train - 1)],
            train_labels,
            query_draws[min(s, s_query - 1)],
            num_classes,
            k=k,
            temperature=temperature,
            chunk_size=chunk_size,
        )
        total = probs if total is None else total + probs
    return total / max(s_train, s_query)
