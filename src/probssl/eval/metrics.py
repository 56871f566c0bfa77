"""Basic predictive metrics on probability vectors.

All take ``probs`` [N, C] (rows sum to 1, e.g. a BMA average over samples) and integer ``labels``
[N], and return a Python float so results can go straight into ``eval.json``. They are computed in
float64 so that averaging many small numbers does not lose precision.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

Metrics = dict[str, Any]
"""A flat block of eval.json: ``prefix/name`` keys to numbers (or a short descriptive string)."""


def _prepare(probs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    if probs.dim() != 2:
        raise ValueError(f"probs must be [N, C], got shape {tuple(probs.shape)}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be [{probs.shape[0]}], got shape {tuple(labels.shape)}")
    if probs.shape[0] == 0:
        raise ValueError("metrics need at least one prediction")
    return probs.detach().double(), labels.detach().to(probs.device).long()


def top1(probs: Tensor, labels: Tensor) -> float:
    """Fraction of rows whose arg-max class is the true class."""
    probs, labels = _prepare(probs, labels)
    return (probs.argmax(dim=1) == labels).double().mean().item()


def nll(probs: Tensor, labels: Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-probability of the true class.

    Takes probabilities, not logits, on purpose: for a sampled model the NLL must be −log of the
    *averaged* probability (design.md §1), never the cross-entropy of averaged logits. ``eps`` keeps
    a confidently wrong prediction finite.
    """
    probs, labels = _prepare(probs, labels)
    p_true = probs.gather(1, labels[:, None]).squeeze(1)
    return (-torch.log(p_true.clamp_min(eps))).mean().item()


def brier(probs: Tensor, labels: Tensor) -> float:
    """Brier score: squared error to the one-hot label, summed over classes, averaged over samples."""
    probs, labels = _prepare(probs, labels)
    one_hot = torch.nn.functional.one_hot(labels, probs.shape[1]).double()
    return ((probs - one_hot) ** 2).sum(dim=1).mean().item()
