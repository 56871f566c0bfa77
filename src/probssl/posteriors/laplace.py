"""Diagonal Laplace posterior over the embedding layer, with the contrastive GGN of LAM (design.md §3.5).

LAM (Warburg, Miani, Brack, Hauberg, NeurIPS 2023) places a diagonal Gaussian N(θ*, (H + λ)⁻¹) over
the last linear layer x = W h + b of the embedding network, whose output is L2-normalised,
y = x / ‖x‖. H is the diagonal of the generalised Gauss-Newton (GGN) matrix of the contrastive pair
loss of :mod:`probssl.losses.metric_learning`.

**Output-space Hessians of one pair.** With r = y₁ − y₂, d = ‖r‖, r̂ = r / d, every pair term has
Hessian blocks w.r.t. (y₁, y₂) of the form H₁₁ = H₂₂ = A, H₁₂ = H₂₁ = −A, A = α I + β r̂ r̂ᵀ, and
gradient g₁ = −g₂ = α r:

- positive, ℓ = ½ d²: α = 1, β = 0 (A = I);
- negative inside the margin (d < m), ℓ = ½ (m − d)²: ∇_r ℓ = −(m − d) r / d and
  ∇²_r ℓ = r rᵀ/d² − (m − d)(I/d − r rᵀ/d³) = (1 − m/d) I + (m/d) r̂ r̂ᵀ, so α = 1 − m/d < 0,
  β = m/d (eigenvalue 1 along r̂, 1 − m/d < 0 across it: the term is indefinite);
- negative beyond the margin: α = β = 0.

``negative_hessian="released"`` instead gives negatives inside the margin the blocks of −½d²
(α = −1, β = 0), the curvature the released code subtracts ("Σ_pos − Σ_neg" with identity blocks,
exact for its hinge ½[m − d²]₊, which is linear in d²).

**Two output spaces** give the blocks w.r.t. the layer output x that the GGN of the linear layer
needs (J_a = ∂y_a/∂x_a = (I − y_a y_aᵀ)/‖x_a‖ is the Jacobian of the normalisation):

- ``"euclidean"``: the normalisation is part of the network and is linearised (Gauss-Newton):
  B_ab = J_aᵀ H_ab J_b. Its diagonal, with c_ab = ±1 the block sign and u_a = r̂ − (y_a·r̂) y_a, is
  B_ab,kk = c_ab [α (1 − y²_a,k − y²_b,k + (y_a·y_b) y_a,k y_b,k) + β u_a,k u_b,k] / (‖x_a‖‖x_b‖).
- ``"arccos"``: the normalisation is folded into the loss, whose exact Hessian w.r.t. x adds the
  curvature of the normalisation to the diagonal blocks,
  C_a = Σ_k g_a,k ∇²y_a,k = −[g_a y_aᵀ + y_a g_aᵀ + (y_a·g_a)(I − 3 y_a y_aᵀ)] / ‖x_a‖²,
  diagonal −[2 g_a,k y_a,k + (y_a·g_a)(1 − 3 y²_a,k)] / ‖x_a‖².

Both diagonals cost O(P·O) and form no [P, O, O] tensor.

**GGN diagonal of a linear layer.** For x = W h + b the diagonal of G = Σ_ab J_aᵀ B_ab J_b over W
only involves the diagonals of the output blocks: diag_kj = B₁₁,kk h₁ⱼ² + 2 B₁₂,kk h₁ⱼ h₂ⱼ +
B₂₂,kk h₂ⱼ² (bias: h = 1). It is therefore exact, not an approximation, given the diagonals of the
(full) output blocks. Variants, all clamped at 0 because negatives make G indefinite:

- ``"pos"``: Σ over positive pairs of the full pair GGN;
- ``"fix"``: Σ over all pairs without the cross terms B₁₂ (each member as if alone); the negatives'
  blocks carry their own (mostly negative) sign, which is the "Σ_pos − Σ_neg" of the paper;
- ``"full"``: Σ over all pairs with cross terms (the exact GGN of the summed loss).

**Posterior.** ``fit`` sums H over one pass (post-hoc LAM); ``update`` keeps the running sum of
online LAM, H ← m_H·H + (N²/P)·h_batch, where h_batch sums P pairs, so (N²/P)·h_batch is the mean
per-pair curvature times the N² pairs of a data set of N points. The prior precision λ is a
scalar, fixed or set by maximising the Laplace log evidence (see :meth:`DiagonalLaplace.log_evidence`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probssl.losses.metric_learning import mine_pairs

__all__ = [
    "DiagonalLaplace",
    "arccos_pair_hessian",
    "contrastive_ggn_diagonal",
    "euclidean_pair_hessian",
    "online_hessian_scale",
    "pair_hessian_diagonals",
]

VARIANTS = ("pos", "fix", "full")
OUTPUT_SPACES = ("euclidean", "arccos")
NEGATIVE_HESSIANS = ("exact", "released")

#: Smallest distance d in m/d: ½(m − d)² has a cone at d = 0 (its Hessian blows up as 1/d), which
#: two identical negative embeddings would hit.
_MIN_DIST = 1e-6


def _pair_coefficients(
    y1: Tensor, y2: Tensor, is_positive: Tensor, margin: float, negative_hessian: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(α [P], β [P], r [P, O], r̂ [P, O]) with A = α I + β r̂ r̂ᵀ and g₁ = α r (module docstring)."""
    if negative_hessian not in NEGATIVE_HESSIANS:
        raise ValueError(f"negative_hessian must be one of {NEGATIVE_HESSIANS}, got {negative_hessian!r}")
    r = y1 - y2
    d = r.norm(dim=-1)
    r_hat = r / d.clamp_min(_MIN_DIST)[:, None]
    inside = ~is_positive & (d < margin)
    if negative_hessian == "exact":
        ratio = margin / d.clamp_min(_MIN_DIST)
        alpha_neg, beta_neg = 1.0 - ratio, ratio
    else:
        alpha_neg, beta_neg = -torch.ones_like(d), torch.zeros_like(d)
    zero = torch.zeros_like(d)
    alpha = torch.where(is_positive, torch.ones_like(d), torch.where(inside, alpha_neg, zero))
    beta = torch.where(inside, beta_neg, zero)
    return alpha, beta, r, r_hat


def euclidean_pair_hessian(
    y1: Tensor,
    y2: Tensor,
    is_positive: Tensor,
    margin: float = 0.7,
    negative_hessian: str = "exact",
) -> tuple[Tensor, Tensor, Tensor]:
    """Full Hessian blocks (H₁₁, H₁₂, H₂₂), each [P, O, O], of the pair loss w.r.t. its outputs y₁, y₂.

    Dense on purpose: a reference for tests and small O. H₂₁ = H₁₂ᵀ = H₁₂ (symmetric here).
    """
    alpha, beta, _, r_hat = _pair_coefficients(y1, y2, is_positive, margin, negative_hessian)
    eye = torch.eye(y1.shape[-1], dtype=y1.dtype, device=y1.device)
    a = alpha[:, None, None] * eye + beta[:, None, None] * r_hat[:, :, None] * r_hat[:, None, :]
    return a, -a, a


def arccos_pair_hessian(
    x1: Tensor,
    x2: Tensor,
    is_positive: Tensor,
    margin: float = 0.7,
    negative_hessian: str = "exact",
) -> tuple[Tensor, Tensor, Tensor]:
    """Full Hessian blocks [P, O, O] w.r.t. un-normalised x₁, x₂ of the pair loss on x / ‖x‖.

    Dense reference for tests: B_ab = J_aᵀ H_ab J_b + δ_ab C_a (module docstring).
    """
    s1, s2 = x1.norm(dim=-1), x2.norm(dim=-1)
    y1, y2 = x1 / s1[:, None], x2 / s2[:, None]
    h11, h12, h22 = euclidean_pair_hessian(y1, y2, is_positive, margin, negative_hessian)
    alpha, _, r, _ = _pair_coefficients(y1, y2, is_positive, margin, negative_hessian)
    eye = torch.eye(x1.shape[-1], dtype=x1.dtype, device=x1.device)

    def jac(y: Tensor, s: Tensor) -> Tensor:
        return (eye - y[:, :, None] * y[:, None, :]) / s[:, None, None]

    def curvature(y: Tensor, g: Tensor, s: Tensor) -> Tensor:
        yg = (y * g).sum(-1)[:, None, None]
        outer = g[:, :, None] * y[:, None, :]
        yy = y[:, :, None] * y[:, None, :]
        return -(outer + outer.transpose(1, 2) + yg * (eye - 3.0 * yy)) / (s * s)[:, None, None]

    j1, j2 = jac(y1, s1), jac(y2, s2)
    g1 = alpha[:, None] * r
    b11 = j1 @ h11 @ j1 + curvature(y1, g1, s1)  # J is symmetric, so Jᵀ = J
    b22 = j2 @ h22 @ j2 + curvature(y2, -g1, s2)
    b12 = j1 @ h12 @ j2
    return b11, b12, b22


def pair_hessian_diagonals(
    x1: Tensor,
    x2: Tensor,
    is_positive: Tensor,
    margin: float = 0.7,
    output_space: str = "euclidean",
    negative_hessian: str = "exact",
) -> tuple[Tensor, Tensor, Tensor]:
    """Diagonals [P, O] of the output blocks (B₁₁, B₁₂, B₂₂) w.r.t. the layer outputs x₁, x₂ (pre-norm).

    ``"euclidean"``: diag(J_aᵀ H_ab J_b) (normalisation linearised); ``"arccos"``: diagonal of the
    exact Hessian of the loss on x / ‖x‖. Closed forms of the module docstring, O(P·O).
    """
    if output_space not in OUTPUT_SPACES:
        raise ValueError(f"output_space must be one of {OUTPUT_SPACES}, got {output_space!r}")
    s1, s2 = x1.norm(dim=-1, keepdim=True), x2.norm(dim=-1, keepdim=True)
    y1, y2 = x1 / s1, x2 / s2
    alpha, beta, r, r_hat = _pair_coefficients(y1, y2, is_positive, margin, negative_hessian)
    alpha, beta = alpha[:, None], beta[:, None]
    u1 = r_hat - (y1 * r_hat).sum(-1, keepdim=True) * y1
    u2 = r_hat - (y2 * r_hat).sum(-1, keepdim=True) * y2
    cos = (y1 * y2).sum(-1, keepdim=True)
    b11 = (alpha * (1.0 - y1 * y1) + beta * u1 * u1) / (s1 * s1)
    b22 = (alpha * (1.0 - y2 * y2) + beta * u2 * u2) / (s2 * s2)
    b12 = -(alpha * (1.0 - y1 * y1 - y2 * y2 + cos * y1 * y2) + beta * u1 * u2) / (s1 * s2)
    if output_space == "arccos":
        g1 = alpha * r

        def curvature_diag(y: Tensor, g: Tensor, s: Tensor) -> Tensor:
            yg = (y * g).sum(-1, keepdim=True)
            return -(2.0 * g * y + yg * (1.0 - 3.0 * y * y)) / (s * s)

        b11 = b11 + curvature_diag(y1, g1, s1)
        b22 = b22 + curvature_diag(y2, -g1, s2)
    return b11, b12, b22


def contrastive_ggn_diagonal(
    x1: Tensor,
    x2: Tensor,
    h11_diag: Tensor,
    h12_diag: Tensor,
    h22_diag: Tensor,
    variant: str,
    is_positive: Tensor,
    bias: bool = True,
    clamp: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Diagonal GGN of a linear layer y = W x + b for a set of pairs, summed over pairs.

    ``x1``, ``x2`` [P, I] are the layer inputs of the two members of each pair; the h's [P, O] the
    diagonals of the output Hessian blocks w.r.t. the layer outputs (e.g. from
    :func:`pair_hessian_diagonals`). Per pair, diag_kj = H₁₁,kk x₁ⱼ² + 2 H₁₂,kk x₁ⱼ x₂ⱼ + H₂₂,kk x₂ⱼ²;
    the variant picks pairs and terms (module docstring) and the sum is clamped at 0 unless
    ``clamp=False`` (for callers that clamp after accumulating). One einsum over pairs, no Jacobians.

    Returns ``(weight_diag [O, I], bias_diag [O] or None)``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    keep = is_positive.to(h11_diag.dtype)[:, None] if variant == "pos" else 1.0
    cross = 0.0 if variant == "fix" else 2.0
    h11, h12, h22 = h11_diag * keep, h12_diag * keep * cross, h22_diag * keep
    weight = (
        torch.einsum("pk,pj->kj", h11, x1 * x1)
        + torch.einsum("pk,pj->kj", h12, x1 * x2)
        + torch.einsum("pk,pj->kj", h22, x2 * x2)
    )
    bias_diag = (h11 + h12 + h22).sum(0) if bias else None
    if clamp:
        weight = weight.clamp_min(0.0)
        bias_diag = bias_diag.clamp_min(0.0) if bias_diag is not None else None
    return weight, bias_diag


def online_hessian_scale(dataset_size: int, num_pairs: int) -> float:
    """N² / P: turns a Hessian summed over P mined pairs into one for the ~N² pairs of the data set."""
    return float(dataset_size) ** 2 / max(int(num_pairs), 1)


class DiagonalLaplace(nn.Module):
    """Diagonal Laplace posterior N(θ*, (H + λ)⁻¹) over an ``nn.Linear`` embedding layer.

    θ is laid out as [O, I(+1)]: the weight with the bias as last column. θ* is read from the layer
    at call time (the layer is referenced, not registered: its parameters belong to the owning
    method, and registering them twice would duplicate them in the state dict). The buffers
    ``hessian`` and ``prior_precision`` are saved with the owner's checkpoint.

    The hyper-parameters fix how H is built from a labelled batch of layer inputs: pair ``miner``
    ("all" / "semihard"), ``margin``, GGN ``variant``, ``output_space`` and ``negative_hessian``
    (see the module docstring), and ``max_pairs`` (a random subset bounds the cost, as in the
    released code's 5000 pairs).
    """

    def __init__(
        self,
        layer: nn.Linear,
        margin: float = 0.7,
        variant: str = "full",
        output_space: str = "euclidean",
        negative_hessian: str = "exact",
        miner: str = "all",
        max_pairs: int | None = None,
        prior_precision: float = 1.0,
    ) -> None:
        super().__init__()
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"DiagonalLaplace needs an nn.Linear, got {type(layer).__name__}")
        if variant not in VARIANTS or output_space not in OUTPUT_SPACES:
            raise ValueError(f"variant in {VARIANTS}, output_space in {OUTPUT_SPACES}")
        if negative_hessian not in NEGATIVE_HESSIANS:
            raise ValueError(f"negative_hessian must be one of {NEGATIVE_HESSIANS}")
        if prior_precision <= 0:
            raise ValueError("prior_precision must be positive")
        object.__setattr__(self, "layer", layer)  # a reference, not a submodule (see class docstring)
        self.margin, self.variant, self.output_space = margin, variant, output_space
        self.negative_hessian, self.miner, self.max_pairs = negative_hessian, miner, max_pairs
        self.has_bias = layer.bias is not None
        w = layer.weight
        shape = (layer.out_features, layer.in_features + int(self.has_bias))
        self.register_buffer("hessian", torch.zeros(shape, dtype=w.dtype, device=w.device))
        self.register_buffer("prior_precision", torch.tensor(float(prior_precision), dtype=w.dtype))

    # ----------------------------------------------------------------------------- parameters
    @property
    def mean(self) -> Tensor:
        """θ* as [O, I(+1)], attached to the layer's parameters (gradients flow into them)."""
        if self.has_bias:
            return torch.cat([self.layer.weight, self.layer.bias[:, None]], dim=1)
        return self.layer.weight

    @property
    def posterior_precision(self) -> Tensor:
        """H₊ + λ, [O, I(+1)]. H is clamped at 0 again so that the precision stays positive whatever
        H holds (batch GGNs are clamped, but an unclamped or user-set H need not be)."""
        return self.hessian.clamp_min(0.0) + self.prior_precision

    @property
    def posterior_std(self) -> Tensor:
        return self.posterior_precision.rsqrt()

    # ----------------------------------------------------------------------------- curvature
    @torch.no_grad()
    def batch_hessian(
        self,
        features: Tensor,
        labels: Tensor,
        params: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, int]:
        """Clamped GGN diagonal [O, I(+1)] of the pair loss on one batch, and the number of pairs P.

        ``features`` [B, I] are the layer inputs; ``params`` [O, I(+1)] evaluates the curvature at a
        weight sample (online LAM) instead of θ*. Pairs are mined on the normalised outputs. Always
        in the layer's dtype: under bf16 autocast the curvature sums would lose most of their digits.
        """
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self._batch_hessian(features, labels, params, generator)

    def _batch_hessian(
        self, features: Tensor, labels: Tensor, params: Tensor | None, generator: torch.Generator | None
    ) -> tuple[Tensor, int]:
        theta = (self.mean if params is None else params).detach()
        feats = features.detach().to(theta.dtype)
        w, b = (theta[:, :-1], theta[:, -1]) if self.has_bias else (theta, None)
        x = F.linear(feats, w, b)
        anchor, other, is_pos = mine_pairs(labels, self.miner, F.normalize(x, dim=-1), self.margin)
        if self.max_pairs is not None and anchor.numel() > self.max_pairs:
            where = generator.device if generator is not None else anchor.device
            keep = torch.randperm(anchor.numel(), generator=generator, device=where)[: self.max_pairs]
            keep = keep.to(anchor.device)
            anchor, other, is_pos = anchor[keep], other[keep], is_pos[keep]
        h = pair_hessian_diagonals(
            x[anchor], x[other], is_pos, self.margin, self.output_space, self.negative_hessian
        )
        wd, bd = contrastive_ggn_diagonal(
            feats[anchor], feats[other], *h, self.variant, is_pos, self.has_bias
        )
        out = torch.cat([wd, bd[:, None]], dim=1) if bd is not None else wd
        return out, int(anchor.numel())

    @torch.no_grad()
    def fit(self, batches: Iterable[tuple[Tensor, Tensor]]) -> DiagonalLaplace:
        """Post-hoc LAM: H = Σ over one pass of the per-batch GGN sums, from (features, labels) batches.

        As in the released code the sum is not rescaled: it covers the pairs mined within batches.
        """
        self.hessian.zero_()
        for features, labels in batches:
            h, _ = self.batch_hessian(features, labels)
            self.hessian += h
        return self

    @torch.no_grad()
    def update(self, h_batch: Tensor, memory_factor: float, scale: float) -> None:
        """Online LAM: H ← memory_factor · H + scale · h_batch (scale = :func:`online_hessian_scale`)."""
        self.hessian.mul_(memory_factor).add_(h_batch.to(self.hessian), alpha=scale)

    # ----------------------------------------------------------------------------- prior precision
    def log_evidence(self, prior_precision: float | Tensor, loss: float = 0.0) -> Tensor:
        """Laplace log evidence for a scalar prior precision λ (additive constants dropped):

        log p(D | λ) ≈ −L(θ*) − ½ λ ‖θ*‖² + ½ P log λ − ½ Σᵢ log(Hᵢ + λ),

        with P = #parameters and H clamped at 0; ``loss`` = L(θ*) does not depend on λ.
        """
        h = self.hessian.detach().double().clamp_min(0.0)
        theta = self.mean.detach().to(h)
        if isinstance(prior_precision, Tensor):
            lam = prior_precision.detach().to(h)
        else:  # straight to float64: as_tensor(0.1) would round through float32
            lam = torch.tensor(float(prior_precision), dtype=h.dtype, device=h.device)
        p = theta.numel()
        return -loss - 0.5 * lam * theta.pow(2).sum() + 0.5 * p * lam.log() - 0.5 * (h + lam).log().sum()

    @torch.no_grad()
    def optimize_prior_precision(self, bounds: tuple[float, float] = (1e-6, 1e6), iters: int = 100) -> float:
        """Set λ to the maximiser of :meth:`log_evidence` within ``bounds`` and return it.

        In t = log λ the evidence is strictly concave, with derivative ½(γ(λ) − λ‖θ*‖²) where
        γ = Σᵢ Hᵢ/(Hᵢ + λ) is the effective number of parameters (MacKay's fixed point λ = γ/‖θ*‖²).
        The derivative decreases monotonically, so bisection in t finds the unique root; a bound is
        returned when the root lies outside (e.g. H = 0 pushes λ → 0, θ* = 0 pushes λ → ∞).
        """
        theta_sq = float(self.mean.detach().double().pow(2).sum())
        h = self.hessian.detach().double().clamp_min(0.0)

        def slope(t: float) -> float:
            lam = math.exp(t)
            return float((h / (h + lam)).sum()) - lam * theta_sq

        lo, hi = math.log(bounds[0]), math.log(bounds[1])
        if slope(lo) <= 0:
            t = lo
        elif slope(hi) >= 0:
            t = hi
        else:
            for _ in range(iters):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if slope(mid) > 0 else (lo, mid)
            t = 0.5 * (lo + hi)
        self.prior_precision.fill_(math.exp(t))
        return math.exp(t)

    # ----------------------------------------------------------------------------- sampling
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n weight draws [n, O, I(+1)] from N(θ*, (H + λ)⁻¹).

        Reparameterised, θ = θ* + σ ε with σ detached: under grad mode the draws are differentiable
        w.r.t. the layer's parameters, which is how online LAM trains θ* at a sample.
        """
        mu = self.mean
        eps = torch.randn((n, *mu.shape), generator=generator, dtype=mu.dtype, device=mu.device)
        return mu + eps * self.posterior_std.detach()

    def layer_outputs(self, x: Tensor, samples: Tensor) -> Tensor:
        """Outputs [n, B, O] of the layer under weight draws ``samples`` [n, O, I(+1)], batched."""
        if self.has_bias:
            return torch.einsum("bi,noi->nbo", x, samples[..., :-1]) + samples[:, None, :, -1]
        return torch.einsum("bi,noi->nbo", x, samples)

    def sample_layer_outputs(self, x: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Layer outputs [n, B, O] under n fresh weight draws (no weight copies into modules)."""
        return self.layer_outputs(x, self.sample(n, generator))

    def extra_repr(self) -> str:
        return (
            f"variant={self.variant}, output_space={self.output_space}, margin={self.margin}, "
            f"negative_hessian={self.negative_hessian}, miner={self.miner}, max_pairs={self.max_pairs}"
        )
