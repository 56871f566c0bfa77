"""Stochastic contrastive learning, SCL (Ramapuram et al., arXiv 2110.00552): SimCLR with a latent variable.

h = f(v);  z ~ q(z | h) (Gaussian N(μ, σ²) or K Bernoulli bits);  p = g(z)
L = NT-Xent(p₁, p₂; τ) + β · mean_{2B views} KL(q(z | h) ‖ prior),
prior N(0, I) (Gaussian) or Bern(½)^K (Bernoulli). Samples are reparameterised (Gaussian) or drawn with a
binary Concrete relaxation, optionally straight-through (Bernoulli), see :mod:`probssl.nn.stochastic`.

The representation the probes see is the latent, not the projection: ``embed`` returns the latent mean
(μ, or the bit probabilities σ(ℓ)), latent draws as samples, and the latent spread as uncertainty (mean σ,
or the mean per-bit entropy in bits). ``encode_bits`` gives the hard K-bit code that replaces the image in
the compression experiment.

Our reading where the paper is not explicit (design.md §3.4):
- The latent layer is one linear map per parameter on the backbone output (no hidden layer), and the
  projector is SimCLR's 2-layer MLP on the latent.
- The KL is summed over latent dimensions and averaged over the 2B views; β defaults to 1e-4.
- The Concrete temperature decays exponentially from ``temperature_start`` to ``temperature_end`` over
  training; its values are ours, not the paper's.
- Compression ratio = raw image bits / code bits with 8 bits per pixel and channel; the paper's 588× is
  224·224·3·8 / 2048 on ImageNet. Probes run on our small images, so the ratios are not comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from probssl.embedding import Embedding
from probssl.losses.contrastive import nt_xent_loss
from probssl.methods.base import MethodConfig, SSLMethod, check_at_least, check_choice, check_positive
from probssl.methods.registry import METHODS
from probssl.nn.heads import mlp
from probssl.nn.stochastic import (
    ESTIMATORS,
    BernoulliLatent,
    GaussianLatent,
    bernoulli_entropy,
    temperature_at,
)

LATENTS = ("gaussian", "bernoulli")


@dataclass
class SCLConfig(MethodConfig):
    temperature: float = 0.2  # NT-Xent temperature τ
    proj_hidden_dim: int = 512
    proj_dim: int = 128
    latent: str = "gaussian"  # gaussian | bernoulli
    latent_dim: int | None = None  # latent width (number of bits for bernoulli); None: backbone.out_dim
    kl_weight: float = 1e-4  # β; the benchmark sweeps 0, 1e-4, 1e-3, 1e-2
    estimator: str = "straight_through"  # bernoulli gradient estimator: straight_through | relaxed
    temperature_start: float = 1.0  # Concrete temperature at the start of training (bernoulli)
    temperature_end: float = 0.5  # ... and at the end, exponential decay in between
    logvar_min: float = -10.0  # clamp of log σ² (gaussian), keeps exp() finite
    logvar_max: float = 10.0

    def validate(self) -> None:
        check_choice(self, "latent", LATENTS)
        check_choice(self, "estimator", ESTIMATORS)
        check_positive(self, "temperature", "temperature_start", "temperature_end")
        check_at_least(self, 1, "proj_hidden_dim", "proj_dim")
        if self.latent_dim is not None:
            check_at_least(self, 1, "latent_dim")
        check_at_least(self, 0, "kl_weight")
        if not self.logvar_min < self.logvar_max:
            raise ValueError(
                f"need method.logvar_min < method.logvar_max, got {self.logvar_min}, {self.logvar_max}"
            )


def compression_ratio_stats(
    image_shape: tuple[int, int, int], code_bits: int, bits_per_pixel: int = 8
) -> dict:
    """``compress/bits`` = K and ``compress/ratio`` = C·H·W·bits_per_pixel / K (our reading of the paper)."""
    raw_bits = math.prod(image_shape) * bits_per_pixel
    return {"compress/bits": code_bits, "compress/raw_bits": raw_bits, "compress/ratio": raw_bits / code_bits}


@METHODS.register("scl")
class SCL(SSLMethod):
    probabilistic = True
    exports_uncertainty = True  # a deterministic function of the image (probssl export)
    uncertainty_doc = (
        "spread of the stochastic latent: mean σ of the Gaussian code, or mean per-bit entropy in bits "
        "(0–1) of the Bernoulli code"
    )
    config_class = SCLConfig
    deterministic_base = "simclr"  # SimCLR's NT-Xent on a stochastic latent
    step_time_goal = 1.10

    def __init__(self, backbone: nn.Module, cfg: SCLConfig) -> None:
        super().__init__(backbone, cfg)
        dim = cfg.latent_dim if cfg.latent_dim is not None else backbone.out_dim
        self.latent: GaussianLatent | BernoulliLatent
        if cfg.latent == "gaussian":
            self.latent = GaussianLatent(backbone.out_dim, dim, cfg.logvar_min, cfg.logvar_max)
        else:
            self.latent = BernoulliLatent(backbone.out_dim, dim, cfg.temperature_start, cfg.estimator)
        self.projector = mlp([dim, cfg.proj_hidden_dim, cfg.proj_dim])
        self._last_kl = torch.zeros(())
        self._last_spread = torch.zeros(())

    def _spread(self, stats: Any) -> Tensor:
        """Per-input latent uncertainty [B]: mean σ (gaussian) or mean per-bit entropy in bits (bernoulli)."""
        if isinstance(self.latent, GaussianLatent):
            return GaussianLatent.std(stats).mean(dim=-1)
        return bernoulli_entropy(stats.logits).mean(dim=-1)

    def loss(self, views: list[Tensor]) -> Tensor:
        v1, v2 = views[:2]
        z1, stats1 = self.latent(self.backbone(v1))
        z2, stats2 = self.latent(self.backbone(v2))
        contrastive = nt_xent_loss(self.projector(z1), self.projector(z2), temperature=self.cfg.temperature)
        kl = 0.5 * (self.latent.kl(stats1).mean() + self.latent.kl(stats2).mean())
        self._last_kl = kl.detach()
        self._last_spread = self._spread(stats1).mean().detach()
        return contrastive + self.cfg.kl_weight * kl

    @torch.no_grad()
    def update_targets(self, progress: float) -> None:
        # A pure function of progress (and a buffer, so checkpoints carry it): resume is exact.
        if isinstance(self.latent, BernoulliLatent):
            cfg = self.cfg
            self.latent.set_temperature(temperature_at(progress, cfg.temperature_start, cfg.temperature_end))

    @torch.no_grad()
    def embed(self, x: Tensor, samples: int | None = None) -> Embedding:
        stats = self.latent.stats(self.backbone(x))
        draws = None
        if isinstance(self.latent, GaussianLatent):
            mean = stats.mu
            if samples is not None and samples > 1:
                draws = GaussianLatent.sample(stats, samples)
        else:
            mean = torch.sigmoid(stats.logits)
            if samples is not None and samples > 1:
                draws = BernoulliLatent.sample_bits(stats, samples)
        return Embedding(mean=mean, samples=draws, uncertainty=self._spread(stats))

    @torch.no_grad()
    def encode_bits(self, x: Tensor) -> Tensor:
        """The hard K-bit code [N, K] (uint8 0/1): bit k is 1 where p_k = σ(ℓ_k) > ½."""
        if not isinstance(self.latent, BernoulliLatent):
            raise ValueError("encode_bits needs method.latent='bernoulli'")
        return (self.latent.stats(self.backbone(x)).logits > 0).to(torch.uint8)

    def compression_stats(self, image_shape: tuple[int, int, int], bits_per_pixel: int = 8) -> dict:
        if not isinstance(self.latent, BernoulliLatent):
            raise ValueError("compression_stats needs method.latent='bernoulli' (a binary code)")
        return compression_ratio_stats(image_shape, self.latent.num_bits, bits_per_pixel)

    def extra_representations(self) -> dict[str, Callable[[Tensor], Embedding]]:
        """The hard code gets its own probe (the compression experiment): ``code/linear/top1``."""
        if not isinstance(self.latent, BernoulliLatent):
            return {}
        return {"code": lambda x: Embedding.deterministic(self.encode_bits(x).float())}

    def model_metrics(self, image_shape: tuple[int, int, int]) -> dict[str, float]:
        if not isinstance(self.latent, BernoulliLatent):
            return {}
        return self.compression_stats(image_shape)

    def extra_state_for_logging(self) -> dict[str, Any]:
        out = {"kl": float(self._last_kl), "latent_spread": float(self._last_spread)}
        if isinstance(self.latent, BernoulliLatent):
            out["concrete_temperature"] = float(self.latent.temperature)
        return out
