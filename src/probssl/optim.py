"""Optimisers and per-step schedules.

Schedules are precomputed arrays indexed by the global step (DINO's habit): the value at any step
is a pure function of the config, so a resumed run continues on exactly the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from probssl.config import OptimConfig


def warmup_cosine(base: float, total_steps: int, warmup_steps: int, final: float = 0.0) -> np.ndarray:
    """Linear warm-up from 0 to ``base`` over ``warmup_steps``, then cosine from ``base`` to ``final``."""
    warmup_steps = min(warmup_steps, total_steps)
    warm = np.linspace(0.0, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    rest = total_steps - warmup_steps
    k = np.arange(rest)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(math.pi * k / max(rest, 1)))
    return np.concatenate([warm, cosine])


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), as used by SimCLR/BYOL.

    Biases and normalisation parameters (1-D tensors) are excluded from both the trust ratio and
    weight decay, which is the convention of the SSL papers.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, eps=eps
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if p.ndim > 1:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.norm(p), torch.norm(grad)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / (g_norm + group["eps"]),
                        torch.ones_like(w_norm),
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(grad).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and normalisation parameters (1-D tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "decay": True},
        {"params": no_decay, "weight_decay": 0.0, "decay": False},
    ]


def set_weight_decay(optimizer: torch.optim.Optimizer, value: float) -> None:
    """Set the weight decay of every group that decays (biases and norms stay at 0): the per-step value
    of DINO's cosine schedule (``optim.weight_decay`` → ``optim.weight_decay_end``)."""
    for group in optimizer.param_groups:
        if group.get("decay", True):
            group["weight_decay"] = value


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.name == "lars":
        # LARS excludes 1-D parameters itself; one group keeps the trust ratio logic simple.
        params = [p for p in model.parameters() if p.requires_grad]
        return LARS(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer '{cfg.name}'; valid: sgd, lars, adamw")
