"""cSGHMC: the schedule against its formula, the update against torch's SGD, and the stationary
distribution against the closed form (and the exact discrete-time Lyapunov solution) on Gaussian
potentials, many independent chains run in parallel as one [chains, 2] parameter."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from probssl.checkpoint import finalize_checkpoint, load_checkpoint
from probssl.posteriors import (
    CyclicalSGHMC,
    cycle_phase,
    cyclical_step_size,
    is_sampling_stage,
    should_store_sample,
)

# A correlated 2-D Gaussian: correlation 0.85, precision eigenvalues 10 and 0.71.
SIGMA = np.array([[1.0, 0.6], [0.6, 0.5]])
PRECISION = np.linalg.inv(SIGMA)


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


# ---- schedule --------------------------------------------------------------------------------------


def test_cyclical_step_size_matches_formula():
    eta0, K = 0.3, 40
    for k in [0, 1, 7, 20, 39, 40, 41, 95, 1234]:
        expected = eta0 / 2 * (math.cos(math.pi * (k % K) / K) + 1)
        assert cyclical_step_size(k, eta0, K) == pytest.approx(expected, rel=1e-12)
        assert cycle_phase(k, K) == pytest.approx((k % K) / K)
    assert cyclical_step_size(0, eta0, K) == eta0
    assert cyclical_step_size(20, eta0, K) == pytest.approx(eta0 / 2)
    assert cyclical_step_size(80, eta0, K) == eta0  # restarts
    assert 0 < cyclical_step_size(39, eta0, K) < 0.01 * eta0
    with pytest.raises(ValueError):
        cyclical_step_size(3, eta0, 0)


def test_stage_and_sample_rules():
    K = 10
    stages = [is_sampling_stage(k, K, 0.3) for k in range(2 * K)]
    assert stages == ([False] * 3 + [True] * 7) * 2
    assert all(is_sampling_stage(k, K, 0.0) for k in range(K))
    assert not any(is_sampling_stage(k, K, 1.0) for k in range(K))
    stores = [k for k in range(3 * K) if should_store_sample(k, K, 2)]
    assert stores == [8, 9, 18, 19, 28, 29]
    # The released code's epoch rule, (epoch % cycle) + 1 > cycle − n, is the same function of epochs.
    assert [e for e in range(150) if should_store_sample(e, 50, 3)] == [
        e for e in range(150) if (e % 50) + 1 > 50 - 3
    ]
    with pytest.raises(ValueError):
        should_store_sample(0, K, K + 1)


def test_optimizer_applies_the_schedule():
    # paper_code with T = 0 and a unit gradient moves θ by exactly −η_k: read η_k off the parameter.
    K, eta0 = 8, 0.5
    theta = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = CyclicalSGHMC(
        [theta],
        lr=eta0,
        num_data=1,
        prior_precision=0.0,
        temperature=0.0,
        steps_per_cycle=K,
        variant="paper_code",
    )
    for k in range(2 * K + 3):
        before = theta.item()
        theta.grad = torch.ones_like(theta)
        opt.step()
        assert before - theta.item() == pytest.approx(cyclical_step_size(k, eta0, K), rel=1e-12)
        assert opt.current_step_size == pytest.approx(cyclical_step_size(k, eta0, K))
    assert opt.step_count == 2 * K + 3


def test_noise_off_in_exploration_on_in_sampling():
    # Zero gradient, zero prior, zero velocity: only the noise can move θ.
    K = 10
    theta = torch.zeros(50, requires_grad=True)
    opt = CyclicalSGHMC(
        [theta],
        lr=0.1,
        num_data=1,
        prior_precision=0.0,
        temperature=1.0,
        steps_per_cycle=K,
        exploration_fraction=0.3,
    )
    for k in range(4):
        theta.grad = torch.zeros_like(theta)
        opt.step()
        assert opt.noise_on == (k >= 3)
        if k < 3:
            assert torch.count_nonzero(theta) == 0, f"θ moved at exploration step {k}"
    assert torch.count_nonzero(theta) == 50  # moved at the first sampling step
    # The first noisy velocity is pure noise of std √(2αη₃T/N) (50 draws: ±10% standard error).
    expected_std = math.sqrt(2 * 0.1 * cyclical_step_size(3, 0.1, K))
    assert float(opt.state[theta]["velocity"].std()) == pytest.approx(expected_std, rel=0.35)


def test_temperature_zero_is_the_noise_free_ablation():
    theta = torch.zeros(20, requires_grad=True)
    opt = CyclicalSGHMC([theta], lr=0.1, num_data=1, prior_precision=0.0, temperature=0.0)
    for _ in range(5):
        theta.grad = torch.zeros_like(theta)
        opt.step()
    assert not opt.noise_on and torch.count_nonzero(theta) == 0


@pytest.mark.parametrize("variant", ["textbook", "paper_code"])
def test_noise_free_update_is_sgd(variant):
    # Exploration = SGD (momentum 1 − α for textbook, none for paper_code) with weight decay λ/N.
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randn(32, 3)
    net_a, net_b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    net_b.load_state_dict(net_a.state_dict())
    lam, n, eta = 2.0, 100, 0.05
    opt_a = CyclicalSGHMC(
        net_a.parameters(),
        lr=eta,
        num_data=n,
        prior_precision=lam,
        temperature=0.0,
        friction=0.1,
        variant=variant,
    )
    momentum = 0.9 if variant == "textbook" else 0.0
    opt_b = torch.optim.SGD(net_b.parameters(), lr=eta, momentum=momentum, weight_decay=lam / n)
    for _ in range(10):
        for net, opt in [(net_a, opt_a), (net_b, opt_b)]:
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    for pa, pb in zip(net_a.parameters(), net_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


# ---- stationary distribution -------------------------------------------------------------------------


def _run_chains(
    precision: np.ndarray, chains: int, burn_in: int, steps: int, thin: int, **sampler
) -> np.ndarray:
    """Thinned draws of `chains` parallel chains on L̂(θ) = ½θᵀAθ (so U = N·L̂, ∇L̂ = Aθ)."""
    a = torch.tensor(precision)
    theta = torch.zeros(chains, 2, dtype=torch.float64)
    theta[:, 0], theta[:, 1] = 2.0, -1.0  # start away from the mode: burn-in must forget it
    theta.requires_grad_(True)
    opt = CyclicalSGHMC([theta], **sampler)
    kept = []
    for k in range(burn_in + steps):
        theta.grad = theta.detach() @ a  # ∇L̂ = Aθ (A symmetric)
        opt.step()
        if k >= burn_in and (k - burn_in) % thin == 0:
            kept.append(theta.detach().clone())
    return torch.cat(kept).numpy()


def _sghmc_exact_cov(a: np.ndarray, eta: float, alpha: float, temp: float) -> np.ndarray:
    """Stationary covariance of the textbook recursion itself (finite η): discrete Lyapunov equation."""
    d, eye = a.shape[0], np.eye(a.shape[0])
    m = np.block([[eye - eta * a, (1 - alpha) * eye], [-eta * a, (1 - alpha) * eye]])  # (θ, v) → (θ', v')
    q = 2 * alpha * eta * temp * np.block([[eye, eye], [eye, eye]])  # ξ enters v' and θ' = θ + v'
    return scipy.linalg.solve_discrete_lyapunov(m, q)[:d, :d]


def _rel_err(est: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(est - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_textbook_stationary_covariance_is_t_sigma(temperature):
    eta, alpha = 0.01, 0.1
    samples = _run_chains(
        PRECISION,
        chains=2000,
        burn_in=200,
        steps=800,
        thin=20,
        lr=eta,
        num_data=1,
        prior_precision=0.0,
        temperature=temperature,
        friction=alpha,
        seed=1,
    )
    target = temperature * SIGMA
    cov, mean = np.cov(samples.T), samples.mean(0)
    # Discretisation bias of η = 0.01 is 0.3% (Lyapunov); Monte Carlo error ≈ 1%.
    assert _rel_err(_sghmc_exact_cov(PRECISION, eta, alpha, temperature), target) < 0.005
    assert _rel_err(cov, target) < 0.04, (cov, target)
    assert np.abs(mean).max() < 0.03 * math.sqrt(temperature)


def test_paper_code_samples_at_temperature_t_times_one_minus_beta():
    eta, temp, beta = 0.02, 1.0, 0.5
    samples = _run_chains(
        PRECISION,
        chains=2000,
        burn_in=500,
        steps=800,
        thin=40,
        lr=eta,
        num_data=1,
        prior_precision=0.0,
        temperature=temp,
        variant="paper_code",
        beta=beta,
        seed=2,
    )
    target = temp * (1 - beta) * SIGMA
    exact = scipy.linalg.solve_discrete_lyapunov(
        np.eye(2) - eta * PRECISION, 2 * eta * temp * (1 - beta) * np.eye(2)
    )
    assert _rel_err(exact, target) < 0.015  # SGLD's O(η) bias: 1.1% here
    assert _rel_err(np.cov(samples.T), target) < 0.04
    assert np.abs(samples.mean(0)).max() < 0.03


def test_data_term_is_scaled_by_num_data():
    # U = N·L̂ with L̂ = ½θᵀAθ: the posterior covariance is T·Σ/N. The effective step on U is η/N and
    # U's curvature is N·A, so η = 0.01 is, in θ·√N, the same dimensionless chain as the N = 1 test.
    n = 10
    samples = _run_chains(
        PRECISION,
        chains=2000,
        burn_in=200,
        steps=800,
        thin=20,
        lr=0.01,
        num_data=n,
        prior_precision=0.0,
        temperature=1.0,
        seed=3,
    )
    assert _rel_err(np.cov(samples.T), SIGMA / n) < 0.04
    assert np.abs(samples.mean(0)).max() < 0.03 / math.sqrt(n)


@pytest.mark.parametrize("num_data", [1, 50])
def test_prior_alone_gives_variance_t_over_precision(num_data):
    # Zero data gradient: the target is the tempered prior N(0, T/λ · I), whatever N is.
    lam, temp, chains = 4.0, 0.5, 2000
    theta = torch.full((chains, 2), 1.0, dtype=torch.float64, requires_grad=True)
    opt = CyclicalSGHMC(
        [theta],
        lr=0.01 * num_data,
        num_data=num_data,
        prior_precision=lam,
        temperature=temp,
        friction=0.1,
        seed=4,
    )
    kept = []
    for k in range(1000):
        theta.grad = torch.zeros_like(theta)
        opt.step()
        if k >= 200 and k % 20 == 0:
            kept.append(theta.detach().clone())
    var = torch.cat(kept).var(dim=0)
    # Discretisation bias at ηλ/N = 0.04 is +1.1% (Lyapunov); Monte Carlo error ≈ 1%.
    torch.testing.assert_close(var, torch.full_like(var, temp / lam), rtol=0.04, atol=0)
    assert abs(float(torch.cat(kept).mean())) < 0.02


# ---- resume ------------------------------------------------------------------------------------------


def _train(net, opt, steps, x, y):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize("variant", ["textbook", "paper_code"])
def test_exact_resume_through_a_checkpoint(tmp_path, variant):
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    kwargs = dict(
        lr=0.05,
        num_data=100,
        prior_precision=1.0,
        temperature=1.0,
        steps_per_cycle=10,
        exploration_fraction=0.5,
        variant=variant,
    )
    torch.manual_seed(1)
    reference = torch.nn.Linear(4, 2)
    start = {k: v.clone() for k, v in reference.state_dict().items()}
    opt = CyclicalSGHMC(reference.parameters(), seed=7, **kwargs)
    _train(reference, opt, 25, x, y)

    first = torch.nn.Linear(4, 2)
    first.load_state_dict(start)
    opt = CyclicalSGHMC(first.parameters(), seed=7, **kwargs)
    _train(first, opt, 12, x, y)  # stops inside a sampling stage (steps 5–9 of the second cycle)
    # Through the training loop's own checkpoint format (optimizer state split into safetensors + JSON).
    path = finalize_checkpoint(tmp_path, 12, first.state_dict(), opt.state_dict(), {}, keep=1)
    ckpt = load_checkpoint(path)
    json.dumps(ckpt["optimizer"]["param_groups"])  # the sampler state is plain JSON

    resumed = torch.nn.Linear(4, 2)
    resumed.load_state_dict(ckpt["model"])
    opt = CyclicalSGHMC(resumed.parameters(), seed=999, **kwargs)  # the seed is restored from the state
    opt.load_state_dict(ckpt["optimizer"])
    assert opt.step_count == 12
    _train(resumed, opt, 13, x, y)
    for a, b in zip(reference.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)

    # Without the sampler state the continuation differs (the test can fail).
    fresh = torch.nn.Linear(4, 2)
    fresh.load_state_dict(ckpt["model"])
    _train(fresh, CyclicalSGHMC(fresh.parameters(), seed=7, **kwargs), 13, x, y)
    assert not torch.equal(fresh.weight, reference.weight)


def test_state_dict_round_trip_before_the_first_step():
    theta = torch.zeros(3, requires_grad=True)
    opt = CyclicalSGHMC([theta], lr=0.1, num_data=1, seed=5)
    state = opt.state_dict()
    other = CyclicalSGHMC([torch.zeros(3, requires_grad=True)], lr=0.1, num_data=1, seed=6)
    other.load_state_dict(state)
    assert other.state_dict()["param_groups"][0]["sampler_state"]["seed"] == 5
    with pytest.raises(ValueError, match="no cSGHMC sampler state"):
        other.load_state_dict(torch.optim.SGD([theta], lr=0.1).state_dict())


def test_rejects_bad_config():
    p = [torch.zeros(1, requires_grad=True)]
    for bad in [
        dict(variant="sgld"),
        dict(friction=0.0),
        dict(exploration_fraction=1.5),
        dict(steps_per_cycle=0),
        dict(num_data=0),
        dict(temperature=-1.0),
        dict(beta=1.0),
    ]:
        with pytest.raises(ValueError):
            CyclicalSGHMC(p, lr=0.1, **{"num_data": 1, **bad})
