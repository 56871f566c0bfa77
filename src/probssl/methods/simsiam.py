"""SimSiam (Chen & He 2021): BYOL without the EMA — stop-gradient alone prevents collapse.

z = g(f(v)), p = h(z);  L = −½ [cos(p₁, sg z₂) + cos(p₂, sg z₁)]
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from probssl.losses.contrastive import negative_cosine_similarity
from probssl.methods.base import MethodConfig, SSLMethod, check_at_least
from probssl.methods.registry import METHODS
from probssl.nn.heads import mlp


@dataclass
class SimSiamConfig(MethodConfig):
    proj_dim: int = 512
    pred_hidden_dim: int = 128  # the bottleneck predictor of the paper (dim / 4)

    def validate(self) -> None:
        check_at_least(self, 1, "proj_dim", "pred_hidden_dim")


def simsiam_heads(in_dim: int, proj_dim: int, pred_hidden_dim: int) -> tuple[nn.Module, nn.Module]:
    """SimSiam's projector g and predictor h: a 3-layer projector ending in a non-affine BN, as in the
    paper's CIFAR/ImageNet code, and the bottleneck predictor. VI-SimSiam builds the same two."""
    projector = mlp(
        [in_dim, proj_dim, proj_dim, proj_dim],
        last_batch_norm=True,
        last_affine=False,
        last_bias=False,
    )
    return projector, mlp([proj_dim, pred_hidden_dim, proj_dim])


@METHODS.register("simsiam")
class SimSiam(SSLMethod):
    config_class = SimSiamConfig

    def __init__(self, backbone: nn.Module, cfg: SimSiamConfig) -> None:
        super().__init__(backbone, cfg)
        self.projector, self.predictor = simsiam_heads(backbone.out_dim, cfg.proj_dim, cfg.pred_hidden_dim)

    def loss(self, views: list[Tensor]) -> Tensor:
        v1, v2 = views[:2]
        z1 = self.projector(self.backbone(v1))
        z2 = self.projector(self.backbone(v2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return 0.5 * (negative_cosine_similarity(p1, z2) + negative_cosine_similarity(p2, z1))
