"""VI-SimSiam (Nakamura, Okada & Taniguchi, ICCV 2023, arXiv 2203.11437): SimSiam as variational inference.

Each view's representation is a power spherical distribution q(z|v) = PS(μ, κ) on S^{d−1}
(design.md §3.3): the mean direction is SimSiam's prediction and a separate head gives a per-image
concentration,

    μ = normalise(h(g(f(v)))),   κ = clamp(κ_min + act(MLP_κ(f(v))), max=κ_max),   ẑ = sg normalise(g(f(v)))
    L = −½ [log PS(ẑ₂; μ₁, κ₁) + log PS(ẑ₁; μ₂, κ₂)]  (+ β_KL · ½ [KL(q₁‖U) + KL(q₂‖U)])

With κ fixed the loss is −κ log(1 + μᵀẑ) + const, whose gradient in μ, −κ ẑ/(1 + μᵀẑ), points
along SimSiam's −ẑ (per image, reweighted by κ/(1 + cos)): SimSiam is the fixed-κ special case.

Our choices where the paper is not explicit (or where we depart from it):
- ``normalise_by_dim``: log C(κ, d) grows like (d/2) log κ, so the raw loss is O(d·log κ) and its μ
  gradient O(κ). We divide the loss (and the KL term) by d (default) so it is a per-dimension
  log-likelihood with O(1) gradients at κ ≈ d; the optimum is unchanged.
- κ head: Linear-BN-ReLU-Linear on backbone features, output layer initialised (bias set, weights
  scaled down) so every image starts at κ ≈ ``kappa_init`` (default d). ``kappa_activation``:
  ``softplus`` (the paper) or ``exp``. With softplus, ∂κ/∂(head output) = 1 at large κ, and with the
  per-dimension loss the output bias gets a gradient of only ~10⁻³ at κ = d = 512 (measured on the
  small ConvNet), so κ hardly leaves its initial value at usual learning rates. ``exp`` regresses
  log κ; its gradient κ·∂L/∂κ is O(1) (~0.4 there) and scale-free over κ ∈ 10²–10⁵. Above κ_max the
  clamp passes no gradient to the head.
- ``kl_weight`` adds β_KL · KL(q‖Uniform(S^{d−1})), a uniform prior on the sphere (off by default: the
  exact weighting in the paper is unconfirmed).
- ``sampled``: the expected SimSiam loss under q, E_{z~q}[−cos(z, ẑ)], estimated with
  ``num_samples`` reparameterised draws, i.e. an ELBO whose likelihood is exp(cos(z, ẑ)). Without a KL
  term this pulls κ to κ_max (a sample agrees best with the target when q is a point mass), so use
  it with ``kl_weight`` > 0. This is our reading; the paper's exact sampled form is unconfirmed.
- ``embed`` returns the backbone features as the mean, no samples and uncertainty 1/κ: draws from q
  live in the d-dimensional projection space, not the backbone space the probes see, and
  ``Embedding`` needs both in one space. ``sample_directions`` gives those sphere draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probssl.embedding import Embedding
from probssl.methods.base import MethodConfig, SSLMethod, check_at_least, check_choice
from probssl.methods.registry import METHODS
from probssl.methods.simsiam import simsiam_heads
from probssl.nn.distributions import PowerSpherical
from probssl.nn.heads import mlp


@dataclass
class VISimSiamConfig(MethodConfig):
    proj_dim: int = 512  # d: the sphere is S^{d−1}
    pred_hidden_dim: int = 128  # SimSiam's bottleneck predictor (d / 4)
    kappa_hidden_dim: int = 512  # hidden width of the κ head
    kappa_activation: str = "softplus"  # "softplus" (paper) | "exp" (log-κ regression; see docstring)
    kappa_init: float = 0.0  # κ of every image at initialisation; 0 means d (= proj_dim)
    kappa_min: float = 1.0  # floor added to the activation: κ > 0 always
    kappa_max: float = (
        1e5  # clamp: the paper's κ stay within 10²–10⁵ at d = 2048; bounds log C and its gradients
    )
    normalise_by_dim: bool = True  # divide the loss by d (per-dimension log-likelihood)
    kl_weight: float = 0.0  # β_KL on KL(q ‖ Uniform(S^{d−1})); 0 = the plain VI-SimSiam loss
    sampled: bool = False  # E_q[−cos(z, ẑ)] with reparameterised draws instead of −log q(ẑ)
    num_samples: int = 1  # draws per image for the sampled variant

    def validate(self) -> None:
        check_at_least(self, 2, "proj_dim", why=" (a sphere S^(d-1) with d >= 2)")
        check_at_least(self, 1, "pred_hidden_dim", "kappa_hidden_dim", "num_samples")
        check_choice(self, "kappa_activation", ("softplus", "exp"))
        if not 0.0 < self.kappa_min < self.kappa_max:
            raise ValueError(
                f"need 0 < method.kappa_min < method.kappa_max, got {self.kappa_min}, {self.kappa_max}"
            )
        if self.kappa_init != 0.0 and not self.kappa_min < self.kappa_init < self.kappa_max:
            raise ValueError(
                f"method.kappa_init must lie in (kappa_min, kappa_max) or be 0, got {self.kappa_init}"
            )
        check_at_least(self, 0, "kl_weight")


def power_spherical_alignment_loss(
    p: Tensor,
    z: Tensor,
    kappa: Tensor,
    normalise_by_dim: bool = True,
    kl_weight: float = 0.0,
    sampled: bool = False,
    num_samples: int = 1,
) -> Tensor:
    """One direction of the VI-SimSiam loss, mean over the batch: q = PS(normalise(p), κ), target sg ẑ.

    p: [B, d] predictor output; z: [B, d] projection of the other view (detached here); kappa: [B].
    Computed in float32 with autocast off (log C involves log Γ of numbers up to ~10⁵).
    """
    with torch.autocast(device_type=p.device.type, enabled=False):
        q = PowerSpherical(F.normalize(p.float(), dim=-1), kappa.float())
        target = F.normalize(z.detach().float(), dim=-1)
        # Log-densities on S^{d−1} scale with d; the sampled likelihood is a cosine, already O(1).
        per_dim = 1.0 / p.shape[-1] if normalise_by_dim else 1.0
        if sampled:
            draws = q.rsample((num_samples,))  # [S, B, d]
            per_image = -(draws * target).sum(dim=-1).mean(dim=0)
        else:
            per_image = -q.log_prob(target) * per_dim
        if kl_weight > 0.0:
            per_image = per_image + kl_weight * per_dim * q.kl_to_uniform()
        return per_image.mean()


@METHODS.register("vi_simsiam")
class VISimSiam(SSLMethod):
    probabilistic = True
    exports_uncertainty = True  # a deterministic function of the image (probssl export)
    uncertainty_doc = (
        "1/κ of the image's power-spherical posterior over directions: κ is the concentration, so 1/κ is "
        "small (≈ 1/d at initialisation) for confident images and grows for ambiguous ones"
    )
    config_class = VISimSiamConfig
    deterministic_base = "simsiam"  # the fixed-κ case is SimSiam
    step_time_goal = 1.10

    def __init__(self, backbone: nn.Module, cfg: VISimSiamConfig) -> None:
        super().__init__(backbone, cfg)
        # SimSiam's projector and predictor, so the fixed-κ case is SimSiam.
        self.projector, self.predictor = simsiam_heads(backbone.out_dim, cfg.proj_dim, cfg.pred_hidden_dim)
        self.kappa_head = mlp([backbone.out_dim, cfg.kappa_hidden_dim, 1])
        # The default κ_init = d may fall outside (κ_min, κ_max) for unusual bounds: keep it inside.
        self.kappa_init = cfg.kappa_init if cfg.kappa_init != 0.0 else float(cfg.proj_dim)
        self.kappa_init = min(max(self.kappa_init, cfg.kappa_min * 1.01), cfg.kappa_max * 0.99)
        self._init_kappa_head()
        self._last_kappa: Tensor | None = None

    @torch.no_grad()
    def _init_kappa_head(self) -> None:
        """Start every image at κ ≈ kappa_init: bias = act⁻¹(κ_init − κ_min), small output weights."""
        last = self.kappa_head[-1]
        excess = self.kappa_init - self.cfg.kappa_min
        if self.cfg.kappa_activation == "softplus":
            bias = excess + math.log(-math.expm1(-excess))  # softplus⁻¹(x) = x + log(1 − e^{−x})
        else:
            bias = math.log(excess)
        last.bias.fill_(bias)
        last.weight.mul_(0.01)

    def kappa(self, features: Tensor) -> Tensor:
        """Per-image concentration [B] from backbone features.

        The head runs in float32 even under autocast: with softplus its output is ≈ κ (hundreds), and
        bfloat16 would quantise that to steps of 2–4.
        """
        with torch.autocast(device_type=features.device.type, enabled=False):
            raw = self.kappa_head(features.float()).squeeze(-1)
        excess = (
            F.softplus(raw) if self.cfg.kappa_activation == "softplus" else torch.exp(raw.clamp(max=30.0))
        )
        return (self.cfg.kappa_min + excess).clamp(max=self.cfg.kappa_max)

    def loss(self, views: list[Tensor]) -> Tensor:
        v1, v2 = views[:2]
        f1, f2 = self.backbone(v1), self.backbone(v2)
        z1, z2 = self.projector(f1), self.projector(f2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        k1, k2 = self.kappa(f1), self.kappa(f2)
        self._last_kappa = torch.cat([k1, k2]).detach()
        c = self.cfg
        opts = dict(
            normalise_by_dim=c.normalise_by_dim,
            kl_weight=c.kl_weight,
            sampled=c.sampled,
            num_samples=c.num_samples,
        )
        return 0.5 * (
            power_spherical_alignment_loss(p1, z2, k1, **opts)
            + power_spherical_alignment_loss(p2, z1, k2, **opts)
        )

    @torch.no_grad()
    def posterior(self, x: Tensor) -> PowerSpherical:
        """q(z|x) = PS(normalise(h(g(f(x)))), κ(f(x))) in projection space."""
        features = self.backbone(x)
        mu = F.normalize(self.predictor(self.projector(features)).float(), dim=-1)
        return PowerSpherical(mu, self.kappa(features))

    @torch.no_grad()
    def embed(self, x: Tensor, samples: int | None = None) -> Embedding:
        """Backbone features as the mean, uncertainty 1/κ; no samples (see the module docstring)."""
        features = self.backbone(x)
        kappa = self.kappa(features)
        return Embedding(mean=features.float(), samples=None, uncertainty=1.0 / kappa)

    @torch.no_grad()
    def sample_directions(self, x: Tensor, num_samples: int) -> Tensor:
        """[S, N, d] draws on the sphere from q(z|x) — the posterior the loss trains, in projection space."""
        return self.posterior(x).sample((num_samples,))

    def extra_state_for_logging(self) -> dict[str, Any]:
        if self._last_kappa is None:
            return {}
        k = self._last_kappa
        return {"kappa_mean": float(k.mean()), "kappa_min": float(k.min()), "kappa_max": float(k.max())}
