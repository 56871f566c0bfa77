"""SimCLR (Chen et al. 2020): pull two views of an image together against all other views.

z = g(f(v));  L = NT-Xent(z₁, z₂; τ) over the 2B views of the (global) batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from probssl.losses.contrastive import nt_xent_loss
from probssl.methods.base import MethodConfig, SSLMethod, check_at_least, check_positive
from probssl.methods.registry import METHODS
from probssl.nn.heads import mlp


@dataclass
class SimCLRConfig(MethodConfig):
    temperature: float = 0.2
    proj_hidden_dim: int = 512
    proj_dim: int = 128

    def validate(self) -> None:
        check_positive(self, "temperature", why=" (the logits are similarities / τ)")
        check_at_least(self, 1, "proj_hidden_dim", "proj_dim")


@METHODS.register("simclr")
class SimCLR(SSLMethod):
    config_class = SimCLRConfig

    def __init__(self, backbone: nn.Module, cfg: SimCLRConfig) -> None:
        super().__init__(backbone, cfg)
        self.projector = mlp([backbone.out_dim, cfg.proj_hidden_dim, cfg.proj_dim])

    def loss(self, views: list[Tensor]) -> Tensor:
        v1, v2 = views[:2]
        z1 = self.projector(self.backbone(v1))
        z2 = self.projector(self.backbone(v2))
        return nt_xent_loss(z1, z2, temperature=self.cfg.temperature)
