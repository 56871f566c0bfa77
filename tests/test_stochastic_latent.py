from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from probssl.nn.stochastic import (
    BernoulliLatent,
    GaussianLatent,
    bernoulli_entropy,
    kl_to_standard_normal,
    kl_to_uniform_bernoulli,
    logistic_noise,
    relaxed_bernoulli_sample,
    straight_through_bernoulli_sample,
    temperature_at,
)

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


# --------------------------------------------------------------------------------------------- Gaussian


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = kl_divergence(q, p).sum(-1)
    assert torch.allclose(kl_to_standard_normal(mu, logvar).double(), expected, rtol=1e-5)


def test_gaussian_kl_matches_monte_carlo():
    torch.manual_seed(0)
    mu = torch.tensor([[0.5, -1.0, 0.2]], dtype=torch.float64)
    logvar = torch.tensor([[-0.5, 0.3, 0.0]], dtype=torch.float64)
    q = Normal(mu, torch.exp(0.5 * logvar))
    z = q.sample((200_000,))  # [S, 1, 3]
    log_ratio = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1)
    mc = log_ratio.mean()
    stderr = log_ratio.std() / math.sqrt(z.shape[0])
    assert abs(kl_to_standard_normal(mu, logvar).item() - mc.item()) < 4 * stderr.item()


def test_gaussian_latent_samples_in_training_mean_in_eval_and_clamps_logvar():
    torch.manual_seed(0)
    layer = GaussianLatent(4, 3, logvar_min=-2.0, logvar_max=2.0)
    with torch.no_grad():
        layer.logvar_head.bias.fill_(100.0)
    h = torch.randn(6, 4)
    layer.train()
    noise = torch.randn(6, 3)
    z, stats = layer(h, noise=noise)
    assert torch.all(stats.logvar == 2.0)
    assert torch.allclose(z, stats.mu + math.exp(1.0) * noise)
    layer.eval()
    z_eval, stats_eval = layer(h)
    assert torch.equal(z_eval, stats_eval.mu)
    draws = GaussianLatent.sample(stats_eval, 4)
    assert draws.shape == (4, 6, 3) and not torch.allclose(draws[0], draws[1])


# -------------------------------------------------------------------------------------------- Bernoulli


def test_bernoulli_kl_matches_direct_formula_and_torch():
    torch.manual_seed(0)
    logits = 3 * torch.randn(4, 9, dtype=torch.float64)
    p = torch.sigmoid(logits)
    direct = (p * torch.log(2 * p) + (1 - p) * torch.log(2 * (1 - p))).sum(-1)
    ours = kl_to_uniform_bernoulli(logits.float()).double()
    assert torch.allclose(ours, direct, rtol=1e-5, atol=1e-6)
    reference = kl_divergence(Bernoulli(logits=logits), Bernoulli(probs=torch.full_like(p, 0.5))).sum(-1)
    assert torch.allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_bernoulli_kl_and_entropy_stable_at_saturated_logits():
    logits = torch.tensor([[50.0, -50.0, 0.0]], requires_grad=True)
    kl = kl_to_uniform_bernoulli(logits)
    # A saturated bit carries log 2 nats of information, p = ½ carries none.
    assert torch.allclose(kl, torch.tensor([2 * math.log(2.0)]), atol=1e-6)
    kl.sum().backward()
    assert torch.isfinite(logits.grad).all()
    ent = bernoulli_entropy(logits.detach())
    assert torch.allclose(ent, torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-6)


def test_bernoulli_entropy_in_bits_matches_torch():
    logits = torch.linspace(-6, 6, 13, dtype=torch.float64)
    expected = Bernoulli(logits=logits).entropy() / math.log(2.0)
    assert torch.allclose(bernoulli_entropy(logits).double(), expected, atol=1e-6)


def test_straight_through_forward_is_hard_and_gradient_is_relaxed():
    torch.manual_seed(0)
    base = torch.randn(8, 16)
    u = torch.rand(8, 16)
    weights = torch.randn(8, 16)  # a generic downstream function so every bit gets a distinct gradient

    logits_st = base.clone().requires_grad_(True)
    st = straight_through_bernoulli_sample(logits_st, 0.7, noise=u)
    assert set(st.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(st.detach(), (base + torch.log(u) - torch.log1p(-u) > 0).float())
    (weights * st).sum().backward()

    logits_rel = base.clone().requires_grad_(True)
    relaxed = relaxed_bernoulli_sample(logits_rel, 0.7, noise=u)
    (weights * relaxed).sum().backward()
    assert torch.allclose(logits_st.grad, logits_rel.grad, rtol=0, atol=0)
    # and that gradient is the analytic derivative of σ((ℓ + L)/τ)
    y = relaxed.detach()
    assert torch.allclose(logits_rel.grad, weights * y * (1 - y) / 0.7, atol=1e-6)


def test_hard_bits_are_bernoulli_distributed():
    torch.manual_seed(0)
    logits = torch.tensor([-1.5, 0.0, 0.8]).expand(100_000, 3)
    bits = straight_through_bernoulli_sample(logits, 1.0)
    freq = bits.mean(0)
    p = torch.sigmoid(logits[0])
    assert torch.allclose(freq, p, atol=4 * math.sqrt(0.25 / 100_000))


def test_relaxed_sample_in_open_interval_and_hardens_as_temperature_drops():
    torch.manual_seed(0)
    logits = torch.randn(1000)
    u = torch.rand(1000)
    y = relaxed_bernoulli_sample(logits, 1.0, noise=u)
    assert torch.all((y > 0) & (y < 1))
    hard = (logits + logistic_noise(u) > 0).float()
    gaps = [
        (relaxed_bernoulli_sample(logits, t, noise=u) - hard).abs().mean().item() for t in (1.0, 0.1, 1e-3)
    ]
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-2


def test_temperature_schedule_endpoints_and_geometric_midpoint():
    assert temperature_at(0.0, 1.0, 0.5) == pytest.approx(1.0)
    assert temperature_at(1.0, 1.0, 0.5) == pytest.approx(0.5)
    assert temperature_at(0.5, 1.0, 0.25) == pytest.approx(0.5)
    assert temperature_at(1.7, 1.0, 0.5) == pytest.approx(0.5)  # progress is clamped
    with pytest.raises(ValueError):
        temperature_at(0.5, 0.0, 0.5)


def test_bernoulli_latent_modes_and_temperature_buffer():
    torch.manual_seed(0)
    layer = BernoulliLatent(4, 5, temperature=0.9, estimator="relaxed")
    h = torch.randn(3, 4)
    layer.train()
    z, stats = layer(h)
    assert torch.all((z > 0) & (z < 1)) and stats.logits.shape == (3, 5)
    layer.eval()
    probs, stats = layer(h)
    assert torch.allclose(probs, torch.sigmoid(stats.logits))
    layer.set_temperature(0.3)
    assert "temperature" in layer.state_dict() and layer.state_dict()["temperature"].item() == pytest.approx(
        0.3
    )
    bits = BernoulliLatent.sample_bits(stats, 4)
    assert bits.shape == (4, 3, 5) and set(bits.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError):
        BernoulliLatent(4, 5, estimator="reinforce")
