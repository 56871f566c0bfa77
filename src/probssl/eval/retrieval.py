"""Retrieval metrics and their uncertainty counterparts (LAM's protocol, design.md §3.5).

Leave-one-out over one set of embeddings: every item is a query against all the *other* items
(a query never retrieves itself), similarity is cosine. Queries are processed ``chunk_size`` at a
time, so memory is O(chunk_size · N), never O(N²).

Ties in similarity (duplicates, e.g. a collapsed encoder) are resolved against the query: among
equally similar items, items of another label are ranked first. One rule for every metric: recall@k,
mAP@R, the 1-NN hit that R-AUROC and the sparsification curve rank (``LeaveOneOut.hit``) and the 1-NN
label that ``retrieval_ece`` votes with (another label whenever one ties with the best same-label
item; among tied other-label items, the lowest index). No metric is inflated by ties, and a fully
collapsed embedding scores zero everywhere (recall@1 = AUSC = 0, retrieval ECE = 1) instead of
whatever the storage order happens to give. Every metric of one embedding comes from one pass over
the similarities (:func:`leave_one_out`).

"Equally similar" means within ``tie_tolerance`` (a few ulps), not bit-equal: the cosine of a query
with two identical (or identically directed) items is computed by different BLAS lanes and can
differ in the last bit, so an exact comparison would let the storage order decide after all — a
fully collapsed float64 embedding then got recall@10 ≈ 0.98 instead of 0. The tolerance,
4 · √D · ε of the similarity dtype, is above that rounding error (≈ √D · ε for a dot product of
unit vectors) and far below any similarity gap that carries information.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from probssl.eval.calibration import binned_ece
from probssl.eval.selective import _check_inputs, expected_counts_at


def _check_embeddings(embeddings: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    if labels.shape != (embeddings.shape[0],):
        raise ValueError(f"labels must be [{embeddings.shape[0]}], got shape {tuple(labels.shape)}")
    if embeddings.shape[0] < 2:
        raise ValueError("leave-one-out retrieval needs at least two items")
    dtype = torch.promote_types(embeddings.dtype, torch.float32)
    normalised = F.normalize(embeddings.detach().to(dtype), dim=1)
    return normalised, labels.detach().to(normalised.device).long()


def tie_tolerance(dtype: torch.dtype, dim: int) -> float:
    """Similarities closer than this are ties: 4 · √D · machine ε of ``dtype`` (module docstring)."""
    return 4.0 * math.sqrt(max(dim, 1)) * torch.finfo(dtype).eps


def _similarity_chunks(normalised: Tensor, chunk_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (query indices [m], cosine similarities [m, N]) with each query's own column at −inf."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = normalised.shape[0]
    for start in range(0, n, chunk_size):
        index = torch.arange(start, min(start + chunk_size, n), device=normalised.device)
        sim = normalised[index] @ normalised.T
        sim[torch.arange(index.numel(), device=sim.device), index] = float("-inf")
        yield index, sim


def _relevance(labels: Tensor, index: Tensor) -> Tensor:
    """[m, N] bool: item j has query i's label and is not the query itself."""
    relevant = labels[index, None] == labels[None, :]
    relevant[torch.arange(index.numel(), device=labels.device), index] = False
    return relevant


def _relevant_positions(sim: Tensor, relevant: Tensor, count: int, tolerance: float) -> Tensor:
    """[m, count] rank positions (1-based) of each query's ``count`` most similar relevant items.

    The m-th most similar relevant item (similarity s_m) sits at position m + #{other-label items
    with similarity ≥ s_m − tolerance}: every other-label item tied with it ranks first. Positions
    increase strictly with m, so this is a ranking even though "within tolerance" is not transitive.
    Exact for positions ≤ ``count`` (all mAP@R needs); a position beyond ``count`` is only known to be
    > ``count``. Entries beyond a query's number of relevant items are meaningless (callers mask them).
    """
    irrelevant = ~relevant & torch.isfinite(sim)  # the query's own column (−inf) is neither
    relevant_sims = sim.masked_fill(~relevant, float("-inf")).topk(count, dim=1).values
    # Only the ``count`` most similar other-label items can precede a position ≤ count, so a
    # partial sort of those replaces a sort of the whole row (5–7× faster at N = 10k): positions
    # ≤ count come out exactly as with the full sort, larger ones are capped at m + count.
    top_irrelevant = sim.masked_fill(~irrelevant, float("-inf")).topk(min(count, sim.shape[1]), dim=1)
    ascending = top_irrelevant.values.flip(1).contiguous()
    # Items ≥ threshold = K − (items < threshold); the −inf fill never reaches a finite threshold.
    at_least = ascending.shape[1] - torch.searchsorted(ascending, (relevant_sims - tolerance).contiguous())
    order = torch.arange(1, count + 1, device=sim.device)
    return order[None, :] + at_least


@dataclass(frozen=True)
class LeaveOneOut:
    """What one leave-one-out pass over an embedding yields, per query [N] (ties against the query).

    ``hit``: the 1-NN has the query's label (a recall@1 hit): what R-AUROC and AUSC rank.
    ``neighbour_label``: the label of its 1-NN — its own label on a hit, else that of the most similar
    other-label item. ``first_relevant_rank``: rank (1-based) of the most similar same-label item; a
    query whose label occurs only once gets N (only N − 1 items can be retrieved). ``average_precision``:
    AP@R (:func:`map_at_r`), NaN where R = 0. The last two are None when not asked for.
    """

    hit: Tensor
    neighbour_label: Tensor
    first_relevant_rank: Tensor | None = None
    average_precision: Tensor | None = None


def leave_one_out(
    embeddings: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    average_precision: bool = True,
    ranks: bool = True,
) -> LeaveOneOut:
    """Leave-one-out cosine retrieval of every item among the others, in one pass (module docstring).

    Per chunk of queries, with s⁺ the similarity of the most similar same-label item and s⁻ that of the
    most similar other-label item: a hit is s⁻ < s⁺ − ``tie_tolerance`` (no other-label item ties with
    the best same-label one); the 1-NN label is the query's own on a hit, else the label of the most
    similar other-label item (ties within the tolerance: the lowest index); with ``ranks`` the most
    similar same-label item's rank, 1 + the number of other-label items ≥ s⁺ − tolerance; with
    ``average_precision`` AP@R from the positions of the R most similar same-label items
    (:func:`_relevant_positions`, a partial sort).
    """
    normalised, labels = _check_embeddings(embeddings, labels)
    tolerance = tie_tolerance(normalised.dtype, normalised.shape[1])
    n = normalised.shape[0]
    device = normalised.device
    _, compact, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    r_all = counts[compact] - 1
    hits = torch.empty(n, dtype=torch.bool, device=device)
    neighbour = labels.clone()
    first_rank = torch.empty(n, dtype=torch.long, device=device) if ranks else None
    ap = torch.full((n,), math.nan, dtype=torch.float64, device=device) if average_precision else None
    for index, sim in _similarity_chunks(normalised, chunk_size):
        # s⁺ and s⁻ from each class's largest similarity (one scatter pass, ~9× cheaper than masking
        # the [m, N] block twice); the query's own column is −inf, so it never counts.
        own = compact[index, None]
        class_max = sim.new_full((len(index), counts.numel()), float("-inf"))
        class_max.scatter_reduce_(1, compact.expand(len(index), -1), sim, reduce="amax")
        best_relevant = class_max.gather(1, own)  # −inf: no other item has the query's label
        best_other = class_max.scatter(1, own, float("-inf")).amax(dim=1, keepdim=True)
        hit = (best_other < best_relevant - tolerance).squeeze(1)
        hits[index] = hit
        missed = (~hit).nonzero().squeeze(1)
        if missed.numel():  # the label of the first other-label item that ties with s⁻
            other = sim[missed].masked_fill(compact[None, :] == own[missed], float("-inf"))
            tied_best_other = other >= best_other[missed] - tolerance
            neighbour[index[missed]] = labels[tied_best_other.to(torch.uint8).argmax(dim=1)]
        r = r_all[index]
        if first_rank is None and ap is None:
            continue
        relevant = _relevance(labels, index)
        if first_rank is not None:
            # _relevant_positions(sim, relevant, 1, tolerance) without its sort (the costly part)
            other_label = sim.masked_fill(relevant, float("-inf"))  # the query's own column is −inf already
            rank = 1 + (other_label >= best_relevant - tolerance).sum(dim=1)
            first_rank[index] = torch.where(r > 0, rank, torch.full_like(rank, n))
        r_max = int(r.max())
        if ap is not None and r_max > 0:
            positions = _relevant_positions(sim, relevant, r_max, tolerance)
            m = torch.arange(1, r_max + 1, dtype=torch.float64, device=sim.device)
            counted = (m[None, :] <= r[:, None]) & (positions <= r[:, None])
            chunk_ap = (m[None, :] / positions.double() * counted).sum(dim=1) / r.clamp_min(1)
            ap[index] = torch.where(r > 0, chunk_ap, math.nan)
    return LeaveOneOut(hits, neighbour, first_rank, ap)


def first_relevant_rank(embeddings: Tensor, labels: Tensor, chunk_size: int = 1024) -> Tensor:
    """[N] rank (1-based) of each query's most similar same-label item, ties against the query.

    Leave-one-out, cosine similarity; a query whose label occurs only once gets N (never a hit, since
    only N − 1 items can be retrieved). ``rank == 1`` is a recall@1 hit, i.e. a correct leave-one-out
    1-NN retrieval.
    """
    ranks = leave_one_out(embeddings, labels, chunk_size, average_precision=False).first_relevant_rank
    if ranks is None:  # asked for above; for the type checker
        raise RuntimeError("leave_one_out returned no ranks")
    return ranks


def _check_ks(ks: Sequence[int]) -> None:
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")


def _recall(ranks: Tensor, ks: Sequence[int]) -> dict[str, float]:
    n = ranks.numel()
    return {f"recall@{k}": int((ranks <= min(k, n - 1)).sum()) / n for k in ks}


def recall_at_k(
    embeddings: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024
) -> dict[str, float]:
    """Recall@k: the fraction of queries with at least one same-label item among their top k.

    Leave-one-out, cosine similarity. The denominator is all N queries: a query whose label occurs
    only once can never hit and counts as a miss. Ties are resolved against the query (module
    docstring): the first relevant item's rank is 1 + the number of other-label items at least as
    similar (within ``tie_tolerance``) as the most similar relevant item. A k ≥ N − 1 covers every
    other item. Keys ``recall@{k}``.
    """
    _check_ks(ks)
    return _recall(first_relevant_rank(embeddings, labels, chunk_size), ks)


def _mean_ap(retrieval: LeaveOneOut) -> float:
    if retrieval.average_precision is None:
        raise ValueError("this leave-one-out pass was made without average_precision")
    defined = retrieval.average_precision[~retrieval.average_precision.isnan()]
    if defined.numel() == 0:
        raise ValueError("mAP@R is undefined: no label occurs more than once")
    return float(defined.sum()) / defined.numel()


def map_at_r(embeddings: Tensor, labels: Tensor, chunk_size: int = 1024) -> float:
    """Mean average precision at R (Musgrave, Belongie & Lim 2020).

    For a query with R other items of its label, rank the other N − 1 items by cosine similarity
    (ties, within ``tie_tolerance``: other-label items first) and let rel(i) = 1 if the i-th is
    relevant; AP@R = (1/R) Σ_{i=1..R} rel(i) · P@i with P@i = (1/i) Σ_{j ≤ i} rel(j). mAP@R is the
    mean over queries with R ≥ 1 (queries whose label occurs once are skipped). Unlike recall@k it
    rewards ranking *all* same-label items first, not just one. At the m-th relevant item's
    position p_m, P@p_m = m / p_m, so AP@R = (1/R) Σ_{m: p_m ≤ R} m / p_m.
    """
    return _mean_ap(leave_one_out(embeddings, labels, chunk_size))


def retrieval_metrics(
    embeddings: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
    retrieval: LeaveOneOut | None = None,
) -> dict[str, float]:
    """The retrieval block of ``eval.json`` (``ret/...``): ``recall@{k}`` for each k and ``map@r``,
    from one :func:`leave_one_out` pass (``retrieval``: one already made, with ``average_precision``)."""
    _check_ks(ks)
    if retrieval is None or retrieval.average_precision is None or retrieval.first_relevant_rank is None:
        retrieval = leave_one_out(embeddings, labels, chunk_size)
    metrics = _recall(retrieval.first_relevant_rank, ks)
    metrics["map@r"] = _mean_ap(retrieval)
    return metrics


def nearest_neighbour_labels(embeddings: Tensor, labels: Tensor, chunk_size: int = 1024) -> Tensor:
    """Label [N] of each item's leave-one-out cosine nearest neighbour, ties against the query: its own
    label only when no other-label item is as similar (within ``tie_tolerance``) as its most similar
    same-label item; otherwise the most similar other-label item's (ties: lowest index)."""
    return leave_one_out(embeddings, labels, chunk_size, average_precision=False, ranks=False).neighbour_label


def retrieval_confidence(
    sample_embeddings: Tensor, labels: Tensor, chunk_size: int = 1024
) -> tuple[Tensor, Tensor]:
    """Per-query (confidence, correct) from the agreement of the 1-NN label across samples.

    For each embedding sample s of ``sample_embeddings`` [S, N, D], take every query's leave-one-out
    1-NN label (ties against the query, :func:`nearest_neighbour_labels`). The prediction is the modal
    label over the S samples (ties: the smallest label); confidence = fraction of samples whose 1-NN
    label equals it (in [1/S, 1]); correct = prediction equals the query's label. Returns float64
    confidence [N] and bool correct [N].
    """
    if sample_embeddings.dim() != 3:
        raise ValueError(f"sample_embeddings must be [S, N, D], got shape {tuple(sample_embeddings.shape)}")
    num_samples, n, _ = sample_embeddings.shape
    if num_samples < 1:
        raise ValueError("need at least one embedding sample")
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got shape {tuple(labels.shape)}")
    classes, compact = torch.unique(labels.detach().cpu(), return_inverse=True)
    votes = torch.zeros(n, classes.numel(), dtype=torch.float64)
    for s in range(num_samples):
        predicted = nearest_neighbour_labels(sample_embeddings[s], compact, chunk_size).cpu()
        votes[torch.arange(n), predicted] += 1.0
    top_votes, prediction = votes.max(dim=1)  # first maximum = smallest label on ties
    return top_votes / num_samples, prediction == compact


def retrieval_ece(
    sample_embeddings: Tensor, labels: Tensor, num_bins: int = 15, chunk_size: int = 1024
) -> float:
    """ECE of 1-NN retrieval: ``binned_ece`` of ``retrieval_confidence`` (same bins as ``calibration.ece``).

    With S = 1 every confidence is 1.0, so the value is the 1-NN error rate: a deterministic
    embedding is as over-confident as it is wrong.
    """
    confidence, correct = retrieval_confidence(sample_embeddings, labels, chunk_size)
    return binned_ece(confidence, correct, num_bins)


def sparsification(uncertainty: Tensor, correct: Tensor, num_steps: int = 20) -> dict:
    """Sparsification curve: accuracy of the queries left after removing the most uncertain ones.

    At step j = 0..num_steps−1 the fraction f_j = j/num_steps is removed: the ⌊j·N/num_steps⌋ most
    uncertain queries are dropped (ties in uncertainty shared in expectation, as in
    ``probssl.eval.selective``, and counted exactly) and ``accuracy[j]`` is the accuracy of the rest.
    The oracle removes errors first, ``accuracy_oracle[j]`` = min(#correct, kept) / kept, the best any
    uncertainty can do.

    ``ausc`` (area under the sparsification curve) is the trapezoidal area over f ∈
    [0, (num_steps−1)/num_steps] divided by that x-range, i.e. the curve's mean height: a curve at
    constant accuracy 1 gives exactly 1.0 and an uninformative uncertainty gives about the overall
    accuracy. ``ausc_oracle`` is the same for the oracle curve. With num_steps = 1 the single point is
    returned as the area.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    u, c = _check_inputs(uncertainty, correct)
    n = u.size
    steps = np.arange(num_steps)
    fractions = steps / num_steps
    kept = n - (steps * n) // num_steps
    accuracy = np.array(
        [float(count / k) for count, k in zip(expected_counts_at(u, c, kept), kept, strict=True)]
    )
    oracle = np.minimum(int(c.sum()), kept) / kept
    return {
        "fractions_removed": fractions.tolist(),
        "accuracy": accuracy.tolist(),
        "accuracy_oracle": oracle.tolist(),
        "ausc": _normalised_area(fractions, accuracy),
        "ausc_oracle": _normalised_area(fractions, oracle),
    }


def _normalised_area(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under y(x) divided by the x-range (a single point: its height)."""
    if x.size == 1:
        return float(y[0])
    area = np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0)
    return float(area / (x[-1] - x[0]))
