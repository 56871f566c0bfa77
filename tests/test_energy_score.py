"""The L1 energy score estimator: hand computation, unbiasedness against a closed form, propriety."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

from probssl.losses.scoring_rules import energy_score_l1

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _expected_abs_to_point(mu, sigma, z):
    """E|S − z| for S ~ N(μ, σ²): σ[2φ(u) + u(2Φ(u) − 1)], u = (z − μ)/σ (folded normal mean)."""
    u = (z - mu) / sigma
    return sigma * (2 * stats.norm.pdf(u) + u * (2 * stats.norm.cdf(u) - 1))


def _expected_abs_pair(sigma):
    """E|S − S′| for S, S′ ~ N(μ, σ²) independent: S − S′ ~ N(0, 2σ²), so 2σ/√π."""
    return 2 * sigma / math.sqrt(math.pi)


def test_matches_explicit_loops():
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64)
    target = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    lam, (m, b, d) = 2.4, samples.shape
    per_example = []
    for n in range(b):
        acc = sum(abs(float(samples[i, n, k] - target[n, k])) for i in range(m) for k in range(d)) / m
        pair_sum = sum(
            abs(float(samples[i, n, k] - samples[j, n, k]))
            for i in range(m)
            for j in range(i + 1, m)
            for k in range(d)
        )
        per_example.append(acc - lam / 4 * pair_sum * 2 / (m * (m - 1)))
    out = energy_score_l1(samples, target, lam=lam, reduction="none")
    assert torch.allclose(out, torch.tensor(per_example, dtype=torch.float64), atol=1e-12)
    assert energy_score_l1(samples, target, lam=lam).item() == pytest.approx(sum(per_example) / b, abs=1e-12)


def test_gradient_flows_to_samples_not_only_through_accuracy_term():
    samples = torch.tensor([[[0.0]], [[1.0]]], requires_grad=True)  # m=2, B=1, D=1
    energy_score_l1(samples, torch.tensor([[5.0]]), lam=2.0).backward()
    # accuracy: d/ds_i (1/2)|s_i − 5| = −1/2; spread: −(1/2)|s_0 − s_1| gives +1/2 for s_0, −1/2 for s_1
    assert samples.grad.flatten().tolist() == pytest.approx([0.0, -1.0])


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="at least 2"):
        energy_score_l1(torch.zeros(1, 3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="target"):
        energy_score_l1(torch.zeros(4, 3, 2), torch.zeros(3, 3))


@pytest.mark.parametrize("lam", [2.0, 2.4])
def test_four_sample_estimator_is_unbiased_against_closed_form(lam):
    mu = np.array([0.3, -1.0, 2.0])
    sigma = np.array([0.5, 1.5, 1.0])
    z = np.array([0.0, 0.2, 3.0])
    reference = float(np.sum(_expected_abs_to_point(mu, sigma, z) - lam / 4 * _expected_abs_pair(sigma)))

    m, n = 4, 200_000  # n independent m-sample estimates of the same (F, z)
    gen = torch.Generator().manual_seed(1)
    eps = torch.randn(m, n, 3, generator=gen, dtype=torch.float64)
    samples = torch.as_tensor(mu) + torch.as_tensor(sigma) * eps
    scores = energy_score_l1(samples, torch.as_tensor(z).expand(n, 3), lam=lam, reduction="none")
    mean, stderr = scores.mean().item(), scores.std().item() / math.sqrt(n)
    assert abs(mean - reference) < 4 * stderr
    # The test has the power to see the V-statistic's bias (spread shrunk by (m−1)/m).
    biased = reference + lam / 4 * float(np.sum(_expected_abs_pair(sigma))) / m
    assert abs(mean - biased) > 20 * stderr


def _expected_score_closed_form(sigma: float, tau: float, lam: float) -> float:
    """E_z[ES_λ(N(0, σ²), z)] for z ~ N(0, τ²), by integrating the 1-D closed form over z."""

    def integrand(z: float) -> float:
        return float(_expected_abs_to_point(0.0, sigma, z)) * stats.norm.pdf(z, scale=tau)

    accuracy, _ = integrate.quad(integrand, -12 * tau, 12 * tau, epsabs=1e-11)
    return accuracy - lam / 4 * _expected_abs_pair(sigma)


def _minimiser(fun, tau: float) -> float:
    res = optimize.minimize_scalar(
        fun, bounds=(0.05 * tau, 6 * tau), method="bounded", options={"xatol": 1e-6}
    )
    return float(res.x)


@pytest.mark.parametrize(("lam", "expected_ratio"), [(2.0, 1.0), (2.4, 1.6036)])
def test_propriety_minimiser_of_expected_score(lam, expected_ratio):
    """λ = 2 is minimised at σ = τ; λ = 2.4 at σ ≈ 1.60 τ, i.e. 60% over-dispersed.

    The expected ratio is the stationary point of √(σ² + τ²) − cσ, c = λ/(2√2): σ*/τ = c/√(1 − c²),
    which the numerical integration must reproduce independently.
    """
    tau = 0.7
    c = lam / (2 * math.sqrt(2))
    assert c / math.sqrt(1 - c**2) == pytest.approx(expected_ratio, abs=1e-4)
    sigma_star = _minimiser(lambda s: _expected_score_closed_form(s, tau, lam), tau)
    assert sigma_star / tau == pytest.approx(expected_ratio, rel=1e-3)


@pytest.mark.parametrize(("lam", "expected_ratio"), [(2.0, 1.0), (2.4, 1.6036)])
def test_propriety_of_the_estimator_itself_with_common_random_numbers(lam, expected_ratio):
    """Same question asked of ``energy_score_l1``: fixed ε and z, so the curve in σ is smooth (convex)."""
    tau, m, n = 0.7, 4, 100_000
    gen = torch.Generator().manual_seed(2)
    eps = torch.randn(m, n, 1, generator=gen, dtype=torch.float64)
    z = tau * torch.randn(n, 1, generator=gen, dtype=torch.float64)
    sigma_star = _minimiser(lambda s: energy_score_l1(s * eps, z, lam=lam).item(), tau)
    assert sigma_star / tau == pytest.approx(expected_ratio, rel=0.03)
    if lam != 2.0:
        assert abs(sigma_star / tau - 1.0) > 0.3  # not proper: the optimum is far from τ


def test_no_finite_minimiser_beyond_two_root_two():
    tau, lam = 1.0, 2.9
    values = [_expected_score_closed_form(s, tau, lam) for s in (1.0, 4.0, 16.0)]
    assert values[0] > values[1] > values[2]
