"""PowerSpherical against independent computations: quadrature, scipy, Monte Carlo, autograd."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate, stats
from scipy.special import betaln, gammaln, polygamma

from probssl.nn.distributions import PowerSpherical, householder_rotate, log_sphere_area

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _unit(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def _log_prob_by_marginal(z: np.ndarray, mu: np.ndarray, kappa: float) -> np.ndarray:
    """Independent density: w = μᵀz has (1 + w)/2 ~ Beta(α, β); the sphere density is that marginal
    divided by the Jacobian dw/dt = 2 and by the area of the (d−2)-sphere of radius √(1 − w²) at w."""
    d = mu.shape[-1]
    a, b = (d - 1) / 2 + kappa, (d - 1) / 2
    w = z @ mu
    log_beta_pdf = (a - 1) * np.log((1 + w) / 2) + (b - 1) * np.log((1 - w) / 2) - betaln(a, b)
    log_area_sub = math.log(2.0) + ((d - 1) / 2) * math.log(math.pi) - gammaln((d - 1) / 2)  # |S^{d−2}|
    return log_beta_pdf - math.log(2.0) - log_area_sub - ((d - 3) / 2) * np.log1p(-(w**2))


@pytest.mark.parametrize("kappa", [0.5, 5.0, 50.0])
def test_density_integrates_to_one_on_the_circle(kappa: float) -> None:
    phi0 = 0.7
    loc = torch.tensor([math.cos(phi0), math.sin(phi0)], dtype=torch.float64)
    dist = PowerSpherical(loc, torch.tensor(kappa, dtype=torch.float64))

    def density(theta: float) -> float:
        z = torch.tensor([math.cos(theta), math.sin(theta)], dtype=torch.float64)
        return dist.log_prob(z).exp().item()

    total, err = integrate.quad(density, phi0 - math.pi, phi0 + math.pi, points=[phi0], limit=200)
    assert total == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("kappa", [0.5, 5.0, 50.0])
def test_density_integrates_to_one_on_the_two_sphere(kappa: float) -> None:
    # Coordinates u = cos θ ∈ [−1, 1] (Gauss–Legendre) and φ (periodic trapezoid); dA = du dφ.
    u, wu = np.polynomial.legendre.leggauss(200)
    phi = np.linspace(0.0, 2 * math.pi, 400, endpoint=False)
    uu, pp = np.meshgrid(u, phi, indexing="ij")
    r = np.sqrt(1 - uu**2)
    z = torch.from_numpy(np.stack([r * np.cos(pp), r * np.sin(pp), uu], axis=-1))
    loc = _unit(3, seed=1)  # off-axis, so the peak is not aligned with the grid
    dens = PowerSpherical(loc, torch.tensor(kappa, dtype=torch.float64)).log_prob(z).exp().numpy()
    total = (wu[:, None] * dens).sum() * (2 * math.pi / len(phi))
    assert total == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    ("d", "kappa"), [(2, 0.5), (3, 5.0), (10, 50.0), (128, 300.0), (2048, 1e5), (2048, 1.0)]
)
def test_log_prob_matches_beta_marginal_formula(d: int, kappa: float) -> None:
    loc = _unit(d, seed=2)
    dist = PowerSpherical(loc, torch.tensor(kappa, dtype=torch.float64))
    # Points both from the distribution (near loc) and uniform on the sphere (far from it).
    z = torch.cat([dist.sample((8,)), _unit(8, d, seed=3)])
    expected = _log_prob_by_marginal(z.numpy(), loc.numpy(), kappa)
    np.testing.assert_allclose(dist.log_prob(z).numpy(), expected, rtol=1e-9, atol=1e-7)
    # The same in float32: the normaliser is formed in float64, so only the cosine's rounding remains.
    got32 = PowerSpherical(loc.float(), torch.tensor(kappa)).log_prob(z.float()).double().numpy()
    np.testing.assert_allclose(got32, expected, rtol=1e-5, atol=kappa * 1e-6 + 1e-3)


def test_log_normalizer_matches_gammaln_closed_form() -> None:
    d, kappa = np.array([2, 3, 64, 2048]), np.array([0.5, 7.0, 300.0, 1e5])
    a, b = (d - 1) / 2 + kappa, (d - 1) / 2
    expected = -((a + b) * np.log(2) + gammaln(a) - gammaln(a + b) + b * np.log(np.pi))
    for di, ki, ei in zip(d, kappa, expected, strict=True):
        got = PowerSpherical(_unit(int(di)), torch.tensor(ki, dtype=torch.float64)).log_normalizer()
        assert got.item() == pytest.approx(ei, rel=1e-12)


@pytest.mark.parametrize(("d", "kappa"), [(3, 2.0), (10, 20.0), (128, 50.0)])
def test_sample_mean_is_mean_resultant_times_loc(d: int, kappa: float) -> None:
    torch.manual_seed(0)
    loc = _unit(d, seed=4)
    dist = PowerSpherical(loc, torch.tensor(kappa, dtype=torch.float64))
    n = 20000
    x = dist.rsample((n,))
    assert x.shape == (n, d)
    assert torch.allclose(x.norm(dim=-1), torch.ones(n, dtype=torch.float64), atol=1e-12)
    expected = kappa / (kappa + d - 1) * loc
    assert torch.allclose(dist.mean, expected)
    tol = 5 * x.std(dim=0) / math.sqrt(n)
    assert ((x.mean(dim=0) - expected).abs() <= tol).all()


@pytest.mark.parametrize(("d", "kappa"), [(2, 1.0), (3, 5.0), (128, 300.0)])
def test_sampled_cosine_to_loc_follows_beta_and_tangent_is_isotropic(d: int, kappa: float) -> None:
    torch.manual_seed(1)
    loc = _unit(d, seed=5)
    x = PowerSpherical(loc, torch.tensor(kappa, dtype=torch.float64)).sample((20000,))
    w = (x @ loc).numpy()
    a, b = (d - 1) / 2 + kappa, (d - 1) / 2
    assert stats.kstest((1 + w) / 2, stats.beta(a, b).cdf).pvalue > 1e-3
    # Tangent part: E[(I − μμᵀ) x xᵀ (I − μμᵀ)] = E[1 − w²]/(d − 1) · (I − μμᵀ).
    if d <= 3:
        proj = torch.eye(d, dtype=torch.float64) - torch.outer(loc, loc)
        t = x @ proj
        cov = t.T @ t / len(t)
        e_tan = 1 - (a * (a + 1) / ((a + b) * (a + b + 1)) * 4 - 4 * a / (a + b) + 1)  # 1 − E[w²]
        assert torch.allclose(cov, e_tan / (d - 1) * proj, atol=0.02)


@pytest.mark.parametrize(("d", "kappa"), [(3, 1.0), (10, 20.0), (64, 500.0)])
def test_entropy_and_kl_match_monte_carlo(d: int, kappa: float) -> None:
    torch.manual_seed(2)
    dist = PowerSpherical(_unit(d, seed=6), torch.tensor(kappa, dtype=torch.float64))
    log_p = dist.log_prob(dist.sample((40000,)))
    tol = 5 * log_p.std().item() / math.sqrt(len(log_p))
    assert dist.entropy().item() == pytest.approx(-log_p.mean().item(), abs=tol)
    assert dist.kl_to_uniform().item() == pytest.approx(log_p.mean().item() + log_sphere_area(d), abs=tol)


def test_kl_to_uniform_nonnegative_increasing_and_quadratic_as_kappa_to_zero() -> None:
    for d in (2, 3, 64, 2048):
        kappas = torch.tensor([1e-6, 1e-3, 0.1, 1.0, 10.0, 1e3, 1e5], dtype=torch.float64)
        kl = PowerSpherical(_unit(d).expand(len(kappas), d), kappas).kl_to_uniform()
        assert (kl >= -1e-12).all() and (kl.diff() > 0).all()
        # Small κ: KL ≈ κ²/2 · Var_uniform[log(1 + w)], and under the uniform (1 + w)/2 ~ Beta(β, β),
        # so Var[log(1 + w)] = ψ′(β) − ψ′(2β).
        beta = (d - 1) / 2
        var = (polygamma(1, beta) - polygamma(1, 2 * beta)).item()
        assert kl[1].item() == pytest.approx(0.5 * 1e-6 * var, rel=1e-2)


def test_log_sphere_area_closed_forms() -> None:
    assert math.exp(log_sphere_area(2)) == pytest.approx(2 * math.pi)
    assert math.exp(log_sphere_area(3)) == pytest.approx(4 * math.pi)
    assert math.exp(log_sphere_area(4)) == pytest.approx(2 * math.pi**2)


@pytest.mark.parametrize("kappa", [1.0, 1e5])
def test_gradients_finite_in_high_dimension_float32(kappa: float) -> None:
    torch.manual_seed(3)
    d, b = 2048, 4
    raw = torch.randn(b, d, requires_grad=True)
    scale = torch.full((b,), kappa, requires_grad=True)
    dist = PowerSpherical(F.normalize(raw, dim=-1), scale)
    draws = dist.rsample((2,))
    loc = dist.loc.detach()
    # Targets: near loc (the training regime), random (cos ≈ 0) and antipodal (1 + μᵀz = 0, clamped).
    targets = torch.stack(
        [F.normalize(loc + 0.05 * torch.randn(b, d), dim=-1), F.normalize(torch.randn(b, d), dim=-1), -loc]
    )
    checks = {
        "log_prob(draws)": (dist.log_prob(draws.detach()).sum(), (raw, scale)),
        "log_prob(targets)": (dist.log_prob(targets).sum(), (raw, scale)),
        "entropy": (dist.entropy().sum(), (scale,)),
        "kl_to_uniform": (dist.kl_to_uniform().sum(), (scale,)),
        "rsample": ((draws * targets[1]).sum(), (raw, scale)),
    }
    for name, (value, inputs) in checks.items():
        assert torch.isfinite(value), name
        grads = torch.autograd.grad(value, inputs, retain_graph=True)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads), name
    assert torch.isfinite(draws).all() and torch.allclose(draws.norm(dim=-1), torch.ones(2, b), atol=1e-4)
    assert ((draws * loc).sum(-1) - kappa / (kappa + d - 1)).abs().max() < 0.15  # sd of μᵀz ≤ 1/√d


def test_rsample_is_differentiable_in_loc() -> None:
    raw = torch.tensor([[0.3, -1.2, 0.5], [-0.9, 0.2, -0.4]], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor([2.0, 15.0], dtype=torch.float64)

    def draw(raw: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(7)  # the same noise for every evaluation: a deterministic function of loc
        return PowerSpherical(F.normalize(raw, dim=-1), scale).rsample((3,))

    # Both branches of the Householder map (loc₁ > 0 and loc₁ < 0) are covered by the two rows.
    assert torch.autograd.gradcheck(draw, (raw,))


def _pathwise_and_exact_gradients(seed: int, n: int = 50000) -> tuple[torch.Tensor, torch.Tensor]:
    d = 5
    torch.manual_seed(seed)
    raw = torch.tensor([0.4, -1.0, 0.3, 0.8, -0.2], dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    a = torch.tensor([1.0, 2.0, -0.5, 0.3, 0.7], dtype=torch.float64)
    loc = F.normalize(raw, dim=-1)
    draws = PowerSpherical(loc, scale).rsample((n,))
    w = draws @ loc.detach()  # μ₀ᵀz with μ₀ held fixed: depends on κ only
    mc = torch.autograd.grad((draws @ a).mean() - (w**2).mean(), (raw, scale))
    # E[aᵀz] = ρ aᵀμ with ρ = κ/(κ + d − 1);  E[w²] = 4E[t²] − 4E[t] + 1 with t ~ Beta(α, β).
    alpha, beta = scale + (d - 1) / 2, (d - 1) / 2
    e_t, e_t2 = alpha / (alpha + beta), alpha * (alpha + 1) / ((alpha + beta) * (alpha + beta + 1))
    # E[(μ₀ᵀz)²] is stationary in μ at μ = μ₀ (by symmetry), so only its κ gradient is non-zero.
    exact_fn = scale / (scale + d - 1) * (a @ F.normalize(raw, dim=-1)) - (4 * e_t2 - 4 * e_t + 1)
    exact = torch.autograd.grad(exact_fn, (raw, scale))
    return torch.cat([mc[0], mc[1].reshape(1)]), torch.cat([exact[0], exact[1].reshape(1)])


def test_pathwise_gradients_match_closed_form_expectations() -> None:
    # κ enters through torch's implicit Beta reparameterisation, a different coupling from re-running
    # the sampler with a fixed seed, so finite differences of single draws do not apply; instead the
    # mean of pathwise gradients must match the gradient of the closed-form expectation.
    mc, exact = _pathwise_and_exact_gradients(seed=9)
    # Tolerances ≈ 5 MC standard deviations (measured over seeds: ≤ 0.0033 for loc, 0.0002 for κ).
    assert torch.allclose(mc[:-1], exact[:-1], atol=1.5e-2)
    assert mc[-1].item() == pytest.approx(exact[-1].item(), abs=1.5e-3)  # exact ≈ −0.086


@pytest.mark.parametrize("d", [2, 3, 16])
def test_householder_maps_e1_to_loc_and_is_orthogonal(d: int) -> None:
    e1 = torch.zeros(d, dtype=torch.float64)
    e1[0] = 1.0
    near = F.normalize(e1 + 1e-9 * _unit(d, seed=8), dim=-1)
    locs = torch.stack([e1, -e1, near, -near, _unit(d, seed=9), -_unit(d, seed=9)])
    assert torch.allclose(householder_rotate(e1.expand_as(locs), locs), locs, atol=1e-15)
    y = _unit(5, 1, d, seed=10)  # [5, 1, d] broadcast against [6, d]
    out = householder_rotate(y, locs)
    gram_in = y.squeeze(1) @ y.squeeze(1).T
    for k in range(len(locs)):
        assert torch.allclose(out[:, k] @ out[:, k].T, gram_in, atol=1e-12)
    # The gradient in loc stays finite at loc = ±e₁ (the plain reflection divides by ‖e₁ − loc‖ = 0).
    loc = torch.stack([e1, -e1]).requires_grad_(True)
    (householder_rotate(y, loc) * _unit(2, d, seed=11)).sum().backward()
    assert torch.isfinite(loc.grad).all()


def test_shapes_and_scale_shape_guard() -> None:
    loc = _unit(4, 5, dtype=torch.float32)
    dist = PowerSpherical(loc, torch.full((4,), 3.0))
    assert dist.batch_shape == (4,) and dist.event_shape == (5,)
    assert dist.rsample((2, 3)).shape == (2, 3, 4, 5)
    assert dist.log_prob(dist.sample()).shape == (4,)
    assert dist.entropy().shape == (4,) and dist.mean.shape == (4, 5)
    assert PowerSpherical(loc, 3.0).batch_shape == (4,)
    with pytest.raises(ValueError, match=r"\[B\], not \[B, 1\]"):
        PowerSpherical(loc, torch.full((4, 1), 3.0))
    with pytest.raises(ValueError):
        PowerSpherical(loc, torch.full((4,), -1.0), validate_args=True)
