"""Deep ensemble of any registered method (Lakshminarayanan et al. 2017): the baseline of LAM's table.

members:  M copies of a method, each with its own freshly initialised backbone and heads (a backbone
          started from given weights, ``backbone.weights``, keeps them in every member; a frozen one,
          ``train.freeze_backbone``, makes it an ensemble of heads)
loss:     Σ_m L_m(views)      (each member's gradient is exactly what training it alone would give)
embed:    draws = the M members' embeddings [M, N, D]; mean = their average (renormalised when the
          members embed on the unit sphere); uncertainty = Σ_d std_d over members (LAM's summary)

Simplifications, said here and in BENCHMARKS.md:
- The members are trained in one process on the same batches and the same augmented views, so
  they differ by initialisation only (the original also varies data order).
- Members' embedding spaces are not aligned (any rotation is as good as another), so the spread
  across members measures disagreement *including* that arbitrary rotation, as the deep-ensemble
  baselines of metric learning do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probssl.embedding import Embedding
from probssl.methods.base import MethodConfig, SSLMethod, check_at_least
from probssl.methods.registry import METHODS
from probssl.methods.wrapper import WrappingMethod


@dataclass
class EnsembleConfig(MethodConfig):
    member: str = "lam"  # any registered trainable method
    member_args: dict[str, Any] = field(default_factory=dict)  # over the member's defaults (see below)
    size: int = 5  # M

    def validate(self) -> None:
        check_at_least(self, 2, "size", why=" for an ensemble")


def _reinitialise(module: nn.Module) -> None:
    """Fresh random weights (from the current RNG stream) for every layer that can reset itself."""
    for layer in module.modules():
        if layer is not module and hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


def _member_mean(draws: Tensor) -> Tensor:
    """The mean of the members' embeddings [M, N, D], L2-normalised when they are unit vectors."""
    mean = draws.mean(dim=0)
    on_sphere = torch.allclose(draws.norm(dim=-1), torch.ones_like(draws[..., 0]), atol=1e-3)
    return F.normalize(mean, dim=-1) if on_sphere else mean


@METHODS.register("ensemble")
class DeepEnsemble(WrappingMethod):
    config_class = EnsembleConfig
    wrapped_field, wrapped_args_field = "member", "member_args"
    #: LAM's table ensembles deterministic LAMs (each member a point; the spread is between members), so
    #: a LAM member starts from ``posterior: none``; any other member starts from its own defaults.
    wrapped_defaults = {"lam": {"posterior": "none"}}
    probabilistic = True
    uncertainty_doc = (
        "disagreement between members: Σ_d std over members of the embedding; 0 when they agree, in the "
        "units of the features (≈ 0–2 for unit-norm members)"
    )
    draws_fixed_by_model = True  # M members = M draws, whatever ``samples`` asks for
    export_note = "the mean of the members' point embeddings (L2-normalised when they are unit vectors)"

    def __init__(self, backbone: nn.Module, cfg: EnsembleConfig) -> None:
        super().__init__(cfg)
        member_cls = self.wrapped_class()
        members = []
        for m in range(cfg.size):
            own = backbone if m == 0 else copy.deepcopy(backbone)
            if m > 0 and not getattr(backbone, "pretrained", False):  # given weights (backbone.weights)
                _reinitialise(own)  # stay in every member: then the heads' initialisations differ
            members.append(self.build_wrapped(member_cls, own))
        self.members = nn.ModuleList(members)

    def wrapped_methods(self) -> list[SSLMethod]:
        return list(self.members)

    # ---- training and the evaluation hooks: every member's, in turn (WrappingMethod) -------------

    def available_draws(self) -> int | None:
        return len(self.members)

    @torch.no_grad()
    def embed(self, x: Tensor, samples: int | None = None) -> Embedding:
        """One draw per member (``samples`` is fixed by the ensemble's size and ignored)."""
        draws = torch.stack([member.embed(x).mean for member in self.members])  # [M, N, D]
        return Embedding(
            mean=_member_mean(draws),
            samples=draws,
            uncertainty=draws.std(dim=0).sum(dim=-1),
        )

    def point_embedding(self, x: Tensor) -> Tensor:
        return _member_mean(torch.stack([member.point_embedding(x) for member in self.members]))
