"""VI-SimSiam: smoke test, the fixed-κ ↔ SimSiam correspondence, the loss against its formula, variants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.special import digamma, gammaln

from probssl.embedding import Embedding
from probssl.losses.contrastive import negative_cosine_similarity
from probssl.methods.registry import METHODS
from probssl.methods.vi_simsiam import VISimSiam, VISimSiamConfig, power_spherical_alignment_loss
from probssl.nn import build_backbone


def _log_c(kappa: torch.Tensor | float, d: int) -> torch.Tensor:
    """log C(κ, d) of the power spherical density, in float64 with scipy's gammaln."""
    a = (d - 1) / 2 + torch.as_tensor(kappa, dtype=torch.float64).numpy()
    b = (d - 1) / 2
    return torch.as_tensor(-((a + b) * math.log(2) + gammaln(a) - gammaln(a + b) + b * math.log(math.pi)))


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _method(**kwargs: object) -> VISimSiam:
    torch.manual_seed(0)
    cfg = VISimSiamConfig(proj_dim=16, pred_hidden_dim=8, kappa_hidden_dim=8, **kwargs)
    return METHODS.get("vi_simsiam")(build_backbone("convnet", 1, 8, width=8), cfg)


def _views(batch: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    return [x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)]


def _assert_trains(method: VISimSiam) -> None:
    loss = method.loss(_views())
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    for module in (method.backbone, method.predictor, method.kappa_head):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("activation", ["softplus", "exp"])
def test_smoke_loss_backward_and_embed_shapes(activation: str) -> None:
    method = _method(kappa_activation=activation)
    _assert_trains(method)
    logged = method.extra_state_for_logging()
    # Initialised so every image starts near κ = d (the output weights are scaled down, not zeroed).
    assert logged["kappa_mean"] == pytest.approx(16.0, rel=0.05)
    method.update_targets(0.5)
    method.eval()
    x = _views()[0]
    for samples in (None, 4):
        emb = method.embed(x, samples=samples)
        assert isinstance(emb, Embedding)
        assert emb.mean.shape == (6, method.backbone.out_dim) and emb.samples is None
        assert emb.uncertainty.shape == (6,) and (emb.uncertainty > 0).all()
        kappa = method.kappa(method.backbone(x))
        assert torch.allclose(emb.uncertainty, 1.0 / kappa)
    draws = method.sample_directions(x, 5)
    assert draws.shape == (5, 6, 16)
    assert torch.allclose(draws.norm(dim=-1), torch.ones(5, 6), atol=1e-5)


def test_loss_matches_power_spherical_formula_written_out() -> None:
    g = torch.Generator().manual_seed(2)
    b, d = 5, 7
    p, z = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    kappa = torch.rand(b, generator=g) * 30 + 1
    cos = F.cosine_similarity(p, z, dim=-1).double()
    log_c = _log_c(kappa, d)
    expected = -(log_c + kappa.double() * torch.log1p(cos)).mean()
    raw = power_spherical_alignment_loss(p, z, kappa, normalise_by_dim=False)
    per_dim = power_spherical_alignment_loss(p, z, kappa, normalise_by_dim=True)
    assert raw.item() == pytest.approx(expected.item(), rel=1e-5)
    assert per_dim.item() == pytest.approx(expected.item() / d, rel=1e-5)


def test_fixed_kappa_gradient_in_mu_is_simsiams_negative_cosine_direction() -> None:
    # −κ log(1 + μᵀẑ) has ∂/∂μ = −κ ẑ/(1 + μᵀẑ) and SimSiam's −μᵀẑ has −ẑ: the same direction per image,
    # rescaled by κ/(1 + cos). Both pass through the same normalisation, so this holds for ∂/∂p too.
    g = torch.Generator().manual_seed(3)
    b, d, k = 6, 16, 40.0
    p = torch.randn(b, d, generator=g, requires_grad=True)
    z = torch.randn(b, d, generator=g)
    (g_vi,) = torch.autograd.grad(power_spherical_alignment_loss(p, z, torch.full((b,), k)), p)
    (g_ss,) = torch.autograd.grad(negative_cosine_similarity(p, z), p)
    cos = F.cosine_similarity(p, z, dim=-1).detach()
    assert torch.allclose(g_vi, (k / d / (1 + cos)).unsqueeze(-1) * g_ss, rtol=1e-4, atol=1e-7)
    assert torch.allclose(F.cosine_similarity(g_vi, g_ss, dim=-1), torch.ones(b), atol=1e-5)


def test_fixed_kappa_method_loss_is_affine_in_simsiams_log_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    # With κ monkeypatched to a constant the whole method's loss is −[log C(κ) + κ · mean log(1 + cos)]/d,
    # computed here from the same forward pass by hand, and the κ head gets no gradient.
    method = _method()
    k = 25.0
    monkeypatch.setattr(method, "kappa", lambda f: torch.full((f.shape[0],), k))
    v1, v2 = _views()
    loss = method.loss([v1, v2])
    loss.backward()
    assert all(p.grad is None for p in method.kappa_head.parameters())
    with torch.no_grad():
        z1, z2 = method.projector(method.backbone(v1)), method.projector(method.backbone(v2))
        p1, p2 = method.predictor(z1), method.predictor(z2)
    d = 16
    log_c = _log_c(k, d)
    mean_log1p = 0.5 * (
        torch.log1p(F.cosine_similarity(p1, z2)).mean() + torch.log1p(F.cosine_similarity(p2, z1)).mean()
    )
    assert loss.item() == pytest.approx(-(log_c.item() + k * mean_log1p.item()) / d, rel=1e-5)


@pytest.mark.parametrize("sampled", [False, True])
def test_target_is_stop_gradient(sampled: bool) -> None:
    p = torch.randn(3, 5, requires_grad=True)
    z = torch.randn(3, 5, requires_grad=True)
    loss = power_spherical_alignment_loss(p, z, torch.full((3,), 4.0), kl_weight=0.1, sampled=sampled)
    assert torch.autograd.grad(loss, (p, z), allow_unused=True)[1] is None


def test_kappa_gradient_sign_follows_alignment() -> None:
    # ∂L/∂κ = E_q[log(1 + w)] − log(1 + cos): a target more aligned than q expects pushes κ up.
    d = 16
    kappa = torch.tensor([20.0, 20.0], requires_grad=True)
    p = torch.zeros(2, d)
    p[:, 0] = 1.0
    z = torch.zeros(2, d)
    z[0, 0], z[0, 1] = 1.0, 0.05  # nearly aligned
    z[1, 0], z[1, 1] = 0.0, 1.0  # orthogonal
    (grad,) = torch.autograd.grad(power_spherical_alignment_loss(p, z, kappa), kappa)
    assert grad[0] < 0 < grad[1]


@pytest.mark.parametrize(("kl_weight", "sampled"), [(0.1, False), (0.0, True), (0.1, True)])
def test_kl_and_sampled_variants_train(kl_weight: float, sampled: bool) -> None:
    method = _method(kl_weight=kl_weight, sampled=sampled, num_samples=3, kappa_activation="exp")
    _assert_trains(method)


def test_kl_term_adds_weighted_kl_to_uniform_and_sampled_term_is_expected_cosine() -> None:
    g = torch.Generator().manual_seed(5)
    b, d = 4, 8
    p, z = torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)
    kappa = torch.tensor([2.0, 5.0, 50.0, 500.0])
    base = power_spherical_alignment_loss(p, z, kappa, normalise_by_dim=False)
    with_kl = power_spherical_alignment_loss(p, z, kappa, normalise_by_dim=False, kl_weight=0.3)
    a, beta = (d - 1) / 2 + kappa.double().numpy(), (d - 1) / 2
    # KL = −H + log|S^{d−1}|, H = −log C − κ E[log(1 + w)] from the Beta representation 1 + w = 2t.
    log_c = _log_c(kappa, d)
    e_log1p = torch.from_numpy(math.log(2) + digamma(a) - digamma(a + beta))
    log_area = math.log(2) + d / 2 * math.log(math.pi) - math.lgamma(d / 2)
    kl = log_c + kappa.double() * e_log1p + log_area
    assert (with_kl - base).item() == pytest.approx(0.3 * kl.mean().item(), rel=1e-5)
    # Per-dimension loss: the KL is divided by d like the log-density, so the weight means the same.
    base_d = power_spherical_alignment_loss(p, z, kappa, normalise_by_dim=True)
    with_kl_d = power_spherical_alignment_loss(p, z, kappa, normalise_by_dim=True, kl_weight=0.3)
    assert (with_kl_d - base_d).item() == pytest.approx(0.3 * kl.mean().item() / d, rel=1e-4)
    # Sampled variant: many draws → −ρ(κ) cos(p, z), since E_q[z] = ρ μ with ρ = κ/(κ + d − 1).
    torch.manual_seed(6)
    sampled = power_spherical_alignment_loss(p, z, kappa, sampled=True, num_samples=20000)
    expected = -(kappa / (kappa + d - 1) * F.cosine_similarity(p, z, dim=-1)).mean()
    assert sampled.item() == pytest.approx(expected.item(), abs=5e-3)


def test_config_validation_and_scale_shape() -> None:
    with pytest.raises(ValueError, match="kappa_activation"):
        _method(kappa_activation="relu")
    with pytest.raises(ValueError, match="kappa_min"):
        _method(kappa_min=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        _method(num_samples=0)
    method = _method(kappa_init=100.0, kappa_max=1e3)
    method.eval()
    kappa = method.kappa(method.backbone(_views()[0]))
    assert kappa.shape == (6,)  # [B], never [B, 1]
    assert torch.allclose(kappa, torch.full((6,), 100.0), rtol=0.05)


def test_kappa_head_runs_in_float32_under_bf16_autocast() -> None:
    # With softplus the head's output is ≈ κ = d; in bfloat16 it would be rounded to a coarse grid.
    method = _method(kappa_init=300.7)
    method.eval()
    features = method.backbone(_views()[0])
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = method.kappa(features.bfloat16())
    assert mixed.dtype == torch.float32
    assert torch.allclose(mixed, method.kappa(features), rtol=1e-4)
    assert (mixed - 300.7).abs().max() < 0.5  # bfloat16 has a step of 2 at 300
