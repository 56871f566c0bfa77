"""Contrastive and predictive SSL losses (SimCLR's NT-Xent, SimSiam's D, BYOL's regression loss).

All losses compute in float32 with autocast disabled: similarities divided by a small temperature
and the log-sum-exp over thousands of negatives lose too much precision in half precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probssl.distributed import gather_with_grad, get_rank, is_distributed

__all__ = ["NTXentLoss", "byol_loss", "negative_cosine_similarity", "nt_xent_loss"]

#: Logit given to an anchor's similarity with itself. Finite on purpose: exp() of it underflows to
#: exactly 0 in float32, whereas -inf can produce NaN gradients (-inf * 0) in some reductions.
_SELF_LOGIT = -1e9


def _normalize_fp32(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.2, gather_distributed: bool = True) -> Tensor:
    """SimCLR's normalised-temperature cross-entropy over the 2B views of a batch.

    ``z1[i]`` and ``z2[i]`` ([B_local, D]) are two views of the same image. Embeddings are
    L2-normalised, so the loss is invariant to their scale. Each of the 2·B_local local anchors is
    classified against every other view of the *global* batch: its positive is its other view, its
    negatives are the remaining 2·B_global − 2 views, gathered from all ranks with
    :func:`~probssl.distributed.gather_with_grad` when ``gather_distributed`` and a process group is
    up (more negatives make a harder, better task, and the per-rank losses then average to exactly
    the single-process loss on the global batch). Logits are cosine similarity / ``temperature``;
    the result is the mean cross-entropy over local anchors. In one process this is the textbook
    loss over 2B views.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"z1 and z2 must both be [B, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    with torch.autocast(device_type=z1.device.type, enabled=False):
        z1n, z2n = _normalize_fp32(z1), _normalize_fp32(z2)
        local = torch.cat([z1n, z2n], dim=0)  # [2B, D] anchors on this rank
        b = z1n.shape[0]
        if gather_distributed and is_distributed():
            # One collective for both views: [B, 2, D] -> [B_global, 2, D].
            both = gather_with_grad(torch.stack([z1n, z2n], dim=1))
            g1, g2 = both[:, 0], both[:, 1]
            offset = get_rank() * b
        else:
            g1, g2, offset = z1n, z2n, 0
        b_global = g1.shape[0]
        candidates = torch.cat([g1, g2], dim=0)  # [2B_global, D]: first views, then second views

        logits = local @ candidates.T / temperature  # [2B, 2B_global]
        idx = torch.arange(b, device=z1.device) + offset
        # Column of each local anchor itself, and of its positive, in the gathered candidates.
        self_col = torch.cat([idx, idx + b_global])
        pos_col = torch.cat([idx + b_global, idx])
        rows = torch.arange(2 * b, device=z1.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, self_col] = True
        logits = logits.masked_fill(self_mask, _SELF_LOGIT)
        return F.cross_entropy(logits, pos_col)


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent_loss`, storing the temperature and the gather flag."""

    def __init__(self, temperature: float = 0.2, gather_distributed: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        return nt_xent_loss(z1, z2, self.temperature, self.gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


def _cosine_to_target(p: Tensor, z: Tensor) -> Tensor:
    """Per-sample cos(p, sg(z)) in float32; the target is detached here so callers cannot forget."""
    with torch.autocast(device_type=p.device.type, enabled=False):
        return (_normalize_fp32(p) * _normalize_fp32(z.detach())).sum(dim=-1)


def negative_cosine_similarity(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam's D(p, z) = −mean_i cos(p_i, sg(z_i)).

    The stop-gradient on ``z`` is what prevents collapse in SimSiam, so it is applied here rather
    than left to the caller. No cross-rank gathering is needed: the loss is a per-sample mean, so
    DDP's average of equal-sized local means is the global mean.
    """
    return -_cosine_to_target(p, z).mean()


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss mean_i ‖p̂_i − sg(ẑ_i)‖² = mean_i (2 − 2·cos(p_i, sg(z_i))).

    ``z`` is the target network's projection; it is detached here (it is normally produced under
    ``no_grad`` anyway). Like :func:`negative_cosine_similarity` it needs no gathering.
    """
    return (2.0 - 2.0 * _cosine_to_target(p, z)).mean()
