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
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probssl.config import ConfigError, method_config
from probssl.embedding import Embedding
from probssl.methods.base import MethodConfig, SSLMethod, TrainContext, TrainingViews
from probssl.methods.registry import METHODS


@dataclass
class EnsembleConfig(MethodConfig):
    member: str = "lam"  # any registered trainable method
    member_args: dict[str, Any] = field(default_factory=lambda: {"posterior": "none"})
    size: int = 5  # M


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
class DeepEnsemble(SSLMethod):
    config_class = EnsembleConfig
    probabilistic = True
    uncertainty_doc = (
        "disagreement between members: Σ_d std over members of the embedding; 0 when they agree, in the "
        "units of the features (≈ 0–2 for unit-norm members)"
    )
    draws_fixed_by_model = True  # M members = M draws, whatever ``samples`` asks for
    export_note = "the mean of the members' point embeddings (L2-normalised when they are unit vectors)"

    @classmethod
    def resolved_args(cls, args: dict[str, Any], name: str) -> dict[str, Any]:
        """The ensemble's own arguments and, filled in the same way, those of its member method."""
        resolved = super().resolved_args(args, name)
        member = METHODS.get(resolved["member"])
        if member is not cls:  # wrapping itself is refused by the constructor, with its own message
            resolved["member_args"] = member.resolved_args(resolved["member_args"], resolved["member"])
        return resolved

    def __init__(self, backbone: nn.Module, cfg: EnsembleConfig) -> None:
        nn.Module.__init__(self)  # the backbones live inside the members, registered once
        self.cfg = cfg
        if cfg.size < 2:
            raise ConfigError(f"method.size must be >= 2 for an ensemble, got {cfg.size}")
        if cfg.member == "ensemble":
            raise ConfigError("method.member cannot be ensemble itself")
        member_cls = METHODS.get(cfg.member)
        if not member_cls.trainable:
            raise ConfigError(f"method.member '{cfg.member}' has nothing to train")
        members = []
        for m in range(cfg.size):
            own = backbone if m == 0 else copy.deepcopy(backbone)
            if m > 0 and not getattr(backbone, "pretrained", False):  # given weights (backbone.weights)
                _reinitialise(own)  # stay in every member: then the heads' initialisations differ
            members.append(
                member_cls(own, method_config(member_cls.config_class, cfg.member_args, cfg.member))
            )
        self.members = nn.ModuleList(members)
        self.num_views = self.members[0].num_views

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.members[0].backbone

    def set_input_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        for member in self.members:
            member.set_input_normalisation(mean, std)

    def images_per_class(self) -> int | None:
        return self.members[0].images_per_class()  # the members share one config

    def loss(self, views: list[Tensor], labels: Tensor | None = None) -> Tensor:
        return torch.stack([member(views, labels) for member in self.members]).sum()

    @torch.no_grad()
    def update_targets(self, progress: float) -> None:
        for member in self.members:
            member.update_targets(progress)

    def configure_optimizer(self, ctx: TrainContext) -> torch.optim.Optimizer | None:
        for member in self.members:
            if member.configure_optimizer(ctx) is not None:
                raise ConfigError(
                    f"method.member '{self.cfg.member}' brings its own optimizer; not ensembled"
                )
        return None

    def after_step(self, step: int, ctx: TrainContext) -> None:
        for member in self.members:
            member.after_step(step, ctx)

    def after_training(self, view_batches: Callable[[], Iterable[TrainingViews]], ctx: TrainContext) -> None:
        for member in self.members:
            member.after_training(view_batches, ctx)

    def attach_run(self, run_dir: Path, up_to_step: int | None = None) -> None:
        for member in self.members:
            member.attach_run(run_dir, up_to_step)

    def prepare_for_evaluation(self, train_batches: Callable[[], Iterable[Tensor]]) -> None:
        for member in self.members:
            member.prepare_for_evaluation(train_batches)

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

    def extra_state_for_logging(self) -> dict[str, Any]:
        return {}
