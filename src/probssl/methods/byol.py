"""BYOL (Grill et al. 2020): predict an EMA target's projection of the other view.

online: p = h(g(f(v)));  target: z' = g'(f'(v)),  (f', g') ← τ (f', g') + (1 − τ)(f, g)
L = [2 − 2 cos(p₁, sg z'₂)] + [2 − 2 cos(p₂, sg z'₁)]
τ_k = 1 − (1 − τ_base) · (cos(π k / K) + 1) / 2   (cosine from τ_base to 1)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from probssl.losses.contrastive import byol_loss
from probssl.methods.base import MethodConfig, SSLMethod, check_at_least, check_interval
from probssl.methods.registry import METHODS
from probssl.nn.heads import mlp


@dataclass
class BYOLConfig(MethodConfig):
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    pred_hidden_dim: int = 512
    base_momentum: float = 0.99

    def validate(self) -> None:
        check_at_least(self, 1, "proj_hidden_dim", "proj_dim", "pred_hidden_dim")
        check_interval(self, "base_momentum", "[0, 1]")


def cosine_momentum(base: float, progress: float) -> float:
    """EMA momentum at ``progress`` ∈ [0, 1]: base at the start, 1 at the end (BYOL §3.2)."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target ← m·target + (1−m)·online for parameters; buffers (BN statistics) are copied."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers(), strict=True):
        t.copy_(o)


@METHODS.register("byol")
class BYOL(SSLMethod):
    config_class = BYOLConfig

    def __init__(self, backbone: nn.Module, cfg: BYOLConfig) -> None:
        super().__init__(backbone, cfg)
        self.projector = mlp([backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim])
        self.predictor = mlp([cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim])
        # The target is a separate copy, never a view of the online weights.
        self.target = nn.ModuleDict(
            {"backbone": copy.deepcopy(backbone), "projector": copy.deepcopy(self.projector)}
        )
        self.target.requires_grad_(False)
        self.momentum = cfg.base_momentum

    def _target_projection(self, v: Tensor) -> Tensor:
        with torch.no_grad():
            return self.target["projector"](self.target["backbone"](v))

    def loss(self, views: list[Tensor]) -> Tensor:
        v1, v2 = views[:2]
        p1 = self.predictor(self.projector(self.backbone(v1)))
        p2 = self.predictor(self.projector(self.backbone(v2)))
        z1, z2 = self._target_projection(v1), self._target_projection(v2)
        return byol_loss(p1, z2) + byol_loss(p2, z1)

    @torch.no_grad()
    def update_targets(self, progress: float) -> None:
        # The momentum is a pure function of progress, so a resumed run follows the same schedule.
        self.momentum = cosine_momentum(self.cfg.base_momentum, progress)
        ema_update(self.target["backbone"], self.backbone, self.momentum)
        ema_update(self.target["projector"], self.projector, self.momentum)

    def extra_state_for_logging(self) -> dict[str, Any]:
        return {"ema_momentum": self.momentum}
