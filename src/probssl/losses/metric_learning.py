"""Pair mining and the contrastive pair loss of LAM (design.md §3.5).

LAM (Warburg et al., NeurIPS 2023) trains an L2-normalised embedding with the contrastive loss on
mined pairs, with d = ‖z_a − z_o‖ the Euclidean (chordal) distance on the unit sphere:

    positive pair (same label):       ½ d²
    negative pair (different labels): ½ [m − d]₊²          (margin m ≈ 0.7; d ∈ [0, 2])

The released code trains with hinges that are not squared but builds the Hessian of the squared
form; we use the squared form for both, so that the Laplace posterior in
:mod:`probssl.posteriors.laplace` is the curvature of the loss that is actually minimised. Both terms
are bounded on the sphere, so exp(−loss) is a normalisable likelihood there.

A pair set is a tuple ``(anchor_idx, other_idx, is_positive)`` of three [P] tensors; every unordered
pair appears at most once, with ``anchor_idx < other_idx`` for "all".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["contrastive_pair_loss", "mine_pairs"]

#: Smallest distance used inside ½[m − d]₊²: d = √‖r‖² has an infinite derivative at r = 0, and
#: autograd would turn that into NaN for two identical negatives.
_MIN_SQ_DIST = 1e-12

Pairs = tuple[Tensor, Tensor, Tensor]


def _upper_pairs(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Index pairs (i, j), i < j, where the symmetric [B, B] ``mask`` is True."""
    i, j = torch.nonzero(torch.triu(mask, diagonal=1), as_tuple=True)
    return i, j


def _semihard_negative_mask(dist: Tensor, same: Tensor, margin: float) -> Tensor:
    """[B, B] mask of ordered (a, n) negatives with d(a,p) < d(a,n) < d(a,p) + margin for some positive p.

    The union over positives of the intervals (d_ap, d_ap + m) contains d_an exactly when the largest
    positive distance strictly below d_an exceeds d_an − m; a sorted search finds it per (a, n) in
    O(B² log B) instead of the O(B³) broadcast over triplets.
    """
    b = dist.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=dist.device)
    pos_mask = same & ~eye
    neg_inf = torch.full_like(dist, float("-inf"))
    pos_sorted, _ = torch.sort(torch.where(pos_mask, dist, neg_inf), dim=1)  # -inf (non-positives) first
    # searchsorted(left) gives the first index whose value is >= d_an; the one before is the largest < d_an.
    idx = torch.searchsorted(pos_sorted.contiguous(), dist.contiguous(), right=False) - 1
    below = pos_sorted.gather(1, idx.clamp_min(0))
    below = torch.where(idx >= 0, below, neg_inf)
    return ~same & (below > dist - margin)


def mine_pairs(
    labels: Tensor,
    strategy: str = "all",
    embeddings: Tensor | None = None,
    margin: float = 0.7,
) -> Pairs:
    """Mine positive and negative pairs from a labelled batch.

    ``"all"``: every unordered pair i < j; positive when the labels agree, negative otherwise.

    ``"semihard"``: all positive pairs; a negative pair {i, j} is kept when, taking either of its
    members as the anchor a and the other as n, some positive p of a (p ≠ a, same label) satisfies
    ``d(a, p) < d(a, n) < d(a, p) + margin`` (both inequalities strict), with d the Euclidean
    distance between L2-normalised ``embeddings``. These are the negatives that violate the margin
    without being closer than a positive, the informative ones of FaceNet's rule. When no negative
    qualifies the batch falls back to all negatives, so the loss never loses its repulsive term.

    Returns ``(anchor_idx, other_idx, is_positive)`` ([P] long, long, bool): positives first, then
    negatives, each sorted by (anchor, other).
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be [B], got {tuple(labels.shape)}")
    same = labels[:, None] == labels[None, :]
    pi, pj = _upper_pairs(same)
    if strategy == "all":
        neg = ~same
    elif strategy == "semihard":
        if embeddings is None or embeddings.shape[0] != labels.shape[0]:
            raise ValueError("semihard mining needs embeddings [B, D] aligned with labels")
        with torch.no_grad():
            z = F.normalize(embeddings.detach().float(), dim=-1)
            dist = torch.cdist(z, z)
            semi = _semihard_negative_mask(dist, same, margin)
            neg = semi | semi.T  # either member may be the anchor
            if not bool(neg.any()):
                neg = ~same
    else:
        raise ValueError(f"unknown mining strategy {strategy!r}; use 'all' or 'semihard'")
    ni, nj = _upper_pairs(neg)
    anchor = torch.cat([pi, ni])
    other = torch.cat([pj, nj])
    is_positive = torch.cat([torch.ones_like(pi, dtype=torch.bool), torch.zeros_like(ni, dtype=torch.bool)])
    return anchor, other, is_positive


def contrastive_pair_loss(z: Tensor, pairs: Pairs, margin: float = 0.7) -> Tensor:
    """Mean over the mined pairs of ½d² (positives) and ½[m − d]₊² (negatives).

    ``z`` [B, D] must already be L2-normalised (the loss is defined on the sphere and the Laplace
    machinery differentiates through the normalisation separately). The mean is over all P pairs,
    positives and negatives together, so the loss is (1/P) Σ_pairs ℓ; the Laplace Hessian is the sum
    Σ_pairs ∇²ℓ, rescaled by N²/P for online LAM. Positives use ½‖r‖² directly (no square root, so
    identical positives have zero loss and a zero, finite gradient). Returns 0 (attached to the
    graph) when there are no pairs.
    """
    anchor, other, is_positive = pairs
    if anchor.numel() == 0:
        return z.sum() * 0.0
    # Positives (few: one per image for self-supervised pairs) from explicit differences.
    pa, po = anchor[is_positive], other[is_positive]
    diff = z[pa] - z[po]
    positive = 0.5 * (diff * diff).sum(dim=-1)
    # Negatives (up to ~B²) from the Gram matrix, d² = ‖z_a‖² + ‖z_o‖² − 2 z_a·z_o: one [B, B] matmul
    # instead of gathering a [P, D] difference tensor (and scattering its gradient back), ~4× faster.
    na, no = anchor[~is_positive], other[~is_positive]
    sq_norm = (z * z).sum(dim=-1)
    sq = (sq_norm[na] + sq_norm[no] - 2.0 * (z @ z.T)[na, no]).clamp_min(_MIN_SQ_DIST)
    negative = 0.5 * F.relu(margin - sq.sqrt()) ** 2
    return (positive.sum() + negative.sum()) / anchor.numel()
