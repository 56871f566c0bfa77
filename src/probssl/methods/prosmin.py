"""ProSMIN (Vahidi et al., ICLR 2024): probabilistic SSL by scoring-rule minimisation (design.md §3.2).

online:  z = g(f(v)),  g = MLP → b/‖b‖ → weight-normalised Linear to D
         p = q(z)/‖q(z)‖,  μ = W_μ·relu(p),  log σ² = clamp(W_σ·relu(p), min, max)
         s_i = μ + σ ⊙ ε_i,  ε_i ~ N(0, I),  i = 1..m                  (reparameterised draws)
target:  z' = g'(f'(v)),  (f', g') ← τ (f', g') + (1 − τ)(f, g)         (EMA, cosine τ_base → 1)
         t = sg(z' − c),  then c ← 0.9·c + 0.1·mean_batch z'              (centring, as in DINO)
loss:    mean over (online view a, global view b ≠ a) of ES_λ({s_i(a)}, t(b))
         ES_λ = E‖S − t‖₁ − (λ/4)·E‖S − S′‖₁, m-sample U-statistic (probssl.losses.scoring_rules)

Choices and departures from the paper / released code:
- λ defaults to 2, the strictly proper energy score (per dimension the CRPS). The released code
  uses λ = 2.4, which rewards over-dispersion (the optimal σ is ≈ 1.6× the target spread); set
  ``energy_lambda=2.4`` to reproduce it.
- The target is a separate deep copy of f and g. The released code's target shares the online
  backbone (only the projector is averaged), so its "EMA target" moves with every online step.
- The loss uses the centre from before this batch, then updates it (DINO's order), so a batch never
  centres itself. Under DDP the batch mean is averaged over ranks before the update.
- The two symmetric terms (and any local-crop terms) are averaged, not summed.
- Multi-crop: views[2:] are local crops, seen by the online network only and scored against both
  global targets. The training loop currently supplies 2 views, hence ``num_local = 0``.
- ``norm_last_layer`` (DINO's default, kept by ProSMIN) fixes the weight-norm gain at 1, so each
  target coordinate is a cosine in [−1, 1]; the head widths are sized for CIFAR, not ImageNet's
  65,536-d output.
- ``embed``: the probes use the *target* backbone's features (design.md §3.2). The Gaussian lives in
  the head's D-dimensional output space, not in the backbone's feature space, so its draws are not
  samples of ``mean``: ``samples`` is None, ``uncertainty`` = mean σ over the D dimensions of the
  online head, and ``head_samples(x, S)`` returns the [S, N, D] draws for whoever wants them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from probssl.distributed import all_reduce_mean
from probssl.embedding import Embedding
from probssl.losses.scoring_rules import energy_score_l1
from probssl.methods.base import MethodConfig, SSLMethod, check_at_least, check_interval, check_positive
from probssl.methods.byol import cosine_momentum, ema_update
from probssl.methods.registry import METHODS
from probssl.nn.heads import mlp


@dataclass
class ProSMINConfig(MethodConfig):
    proj_hidden_dim: int = 512  # hidden width of the projector MLP
    bottleneck_dim: int = 128  # the L2-normalised bottleneck before the weight-normalised layer
    out_dim: int = 1024  # D: target space, and the Gaussian's dimension
    norm_last_layer: bool = True  # freeze the weight-norm gain at 1 (DINO's default)
    pred_hidden_dim: int = 512  # hidden width of the predictor MLP
    pred_dim: int = 256  # width of the L2-normalised predictor output p
    head_batch_norm: bool = True  # BatchNorm in the projector / predictor hidden layers
    num_samples: int = 4  # m: reparameterised draws per image for the energy score (≥ 2)
    energy_lambda: float = 2.0  # λ: 2 = strictly proper; 2.4 = the released code (over-dispersed)
    logvar_min: float = -10.0  # clamp of log σ² (σ ≥ 0.007): keeps σ from collapsing to 0 ...
    logvar_max: float = 2.0  # ... or exploding (σ ≤ 2.7; centred targets lie in [−2, 2])
    center_momentum: float = 0.9  # c ← m·c + (1 − m)·batch mean of the target output
    base_momentum: float = 0.996  # EMA momentum at the start (cosine to 1)
    num_local: int = 0  # local crops expected after the 2 global views (online network only)

    def validate(self) -> None:
        check_at_least(self, 1, "proj_hidden_dim", "bottleneck_dim", "out_dim", "pred_hidden_dim", "pred_dim")
        check_at_least(self, 2, "num_samples", why=" (the spread term needs pairs)")
        check_positive(self, "energy_lambda")
        if not self.logvar_min < self.logvar_max:
            raise ValueError(
                f"need method.logvar_min < method.logvar_max, got {self.logvar_min}, {self.logvar_max}"
            )
        check_interval(self, "center_momentum", "[0, 1]")
        check_interval(self, "base_momentum", "[0, 1]")
        check_at_least(self, 0, "num_local")


class NormalisedBottleneckProjector(nn.Module):
    """g: MLP to a bottleneck, L2-normalise, weight-normalised Linear to D (DINO's head)."""

    def __init__(self, in_dim: int, cfg: ProSMINConfig) -> None:
        super().__init__()
        self.mlp = mlp(
            [in_dim, cfg.proj_hidden_dim, cfg.proj_hidden_dim, cfg.bottleneck_dim],
            batch_norm=cfg.head_batch_norm,
        )
        self.last = weight_norm(nn.Linear(cfg.bottleneck_dim, cfg.out_dim, bias=False))
        if cfg.norm_last_layer:
            # Unit-norm rows: each output is a cosine, so the target's scale cannot drift with training.
            gain = self.last.parametrizations.weight.original0
            gain.data.fill_(1.0)
            gain.requires_grad_(False)

    def forward(self, y: Tensor) -> Tensor:
        return self.last(F.normalize(self.mlp(y), dim=-1))


@METHODS.register("prosmin")
class ProSMIN(SSLMethod):
    probabilistic = True
    exports_uncertainty = True  # a deterministic function of the image (probssl export)
    uncertainty_doc = (
        "aleatoric σ of the online Gaussian head: mean over dimensions of exp(½ log σ²) for the image; > "
        "0, on the head's output scale"
    )
    config_class = ProSMINConfig
    deterministic_base = "byol"  # an EMA target network, as BYOL
    step_time_goal = 1.5

    def __init__(self, backbone: nn.Module, cfg: ProSMINConfig) -> None:
        super().__init__(backbone, cfg)
        self.projector = NormalisedBottleneckProjector(backbone.out_dim, cfg)
        self.predictor = mlp([cfg.out_dim, cfg.pred_hidden_dim, cfg.pred_dim], batch_norm=cfg.head_batch_norm)
        self.mu_head = nn.Linear(cfg.pred_dim, cfg.out_dim, bias=False)
        self.logvar_head = nn.Linear(cfg.pred_dim, cfg.out_dim, bias=False)
        # A separate copy: the released code's target shares the online backbone, which this avoids.
        self.target = nn.ModuleDict(
            {"backbone": copy.deepcopy(backbone), "projector": copy.deepcopy(self.projector)}
        )
        self.target.requires_grad_(False)
        self.register_buffer("center", torch.zeros(cfg.out_dim))
        self.momentum = cfg.base_momentum
        self._mean_sigma: Tensor | None = None

    def predictive(self, v: Tensor) -> tuple[Tensor, Tensor]:
        """The online Gaussian N(μ, diag σ²) for views ``v``: (μ, log σ²), each [B, D] float32."""
        p = F.normalize(self.predictor(self.projector(self.backbone(v))), dim=-1)
        h = F.relu(p)
        mu = self.mu_head(h).float()
        logvar = self.logvar_head(h).float().clamp(self.cfg.logvar_min, self.cfg.logvar_max)
        return mu, logvar

    @staticmethod
    def rsample(mu: Tensor, logvar: Tensor, num_samples: int) -> Tensor:
        """[S, B, D] reparameterised draws μ + σ ⊙ ε, differentiable in μ and σ."""
        eps = torch.randn((num_samples, *mu.shape), device=mu.device, dtype=mu.dtype)
        return mu + (0.5 * logvar).exp() * eps

    @torch.no_grad()
    def _target_projection(self, v: Tensor) -> Tensor:
        return self.target["projector"](self.target["backbone"](v)).float()

    @torch.no_grad()
    def _update_center(self, z: Tensor) -> None:
        batch_mean = all_reduce_mean(z.mean(dim=0))  # every rank must keep the same centre
        self.center.mul_(self.cfg.center_momentum).add_((1.0 - self.cfg.center_momentum) * batch_mean)

    def loss(self, views: list[Tensor]) -> Tensor:
        if len(views) != 2 + self.cfg.num_local:
            raise ValueError(f"expected 2 global + {self.cfg.num_local} local views, got {len(views)} views")
        with torch.no_grad():
            raw = [self._target_projection(v) for v in views[:2]]
            targets = [z - self.center for z in raw]
            self._update_center(torch.cat(raw))
        scores, sigmas = [], []
        for a, v in enumerate(views):
            mu, logvar = self.predictive(v)
            samples = self.rsample(mu, logvar, self.cfg.num_samples)
            sigmas.append((0.5 * logvar.detach()).exp().mean())
            scores += [
                energy_score_l1(samples, t, self.cfg.energy_lambda) for b, t in enumerate(targets) if b != a
            ]
        self._mean_sigma = torch.stack(sigmas).mean()
        return torch.stack(scores).mean()

    @torch.no_grad()
    def update_targets(self, progress: float) -> None:
        # The momentum is a pure function of progress, so a resumed run follows the same schedule.
        self.momentum = cosine_momentum(self.cfg.base_momentum, progress)
        ema_update(self.target["backbone"], self.backbone, self.momentum)
        ema_update(self.target["projector"], self.projector, self.momentum)

    @torch.no_grad()
    def embed(self, x: Tensor, samples: int | None = None) -> Embedding:
        """Target-backbone features; uncertainty = mean σ of the online head (module docstring)."""
        _, logvar = self.predictive(x)
        return Embedding(
            mean=self.target["backbone"](x).float(),
            samples=None,
            uncertainty=(0.5 * logvar).exp().mean(dim=-1),
        )

    @torch.no_grad()
    def head_samples(self, x: Tensor, num_samples: int) -> Tensor:
        """[S, N, D] draws from the online head's Gaussian for images ``x`` (D = ``out_dim``)."""
        mu, logvar = self.predictive(x)
        return self.rsample(mu, logvar, num_samples)

    def extra_state_for_logging(self) -> dict[str, Any]:
        state: dict[str, Any] = {"ema_momentum": self.momentum}
        if self._mean_sigma is not None:
            state["mean_sigma"] = float(self._mean_sigma)
        return state
