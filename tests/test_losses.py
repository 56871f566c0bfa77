"""Single-process checks of the SSL losses against independent hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from probssl.losses.contrastive import NTXentLoss, byol_loss, negative_cosine_similarity, nt_xent_loss


def _nt_xent_by_hand(z1: np.ndarray, z2: np.ndarray, tau: float) -> float:
    """Textbook NT-Xent: explicit loops over the 2B anchors and their 2B-1 candidates, in float64."""
    views = np.concatenate([z1, z2], axis=0)
    views = views / np.linalg.norm(views, axis=1, keepdims=True)
    n, b = views.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        pos = (i + b) % n
        denom = 0.0
        for k in range(n):
            if k != i:
                denom += math.exp(float(views[i] @ views[k]) / tau)
        total += -math.log(math.exp(float(views[i] @ views[pos]) / tau) / denom)
    return total / n


@pytest.mark.parametrize("tau", [0.1, 0.2, 1.0])
def test_nt_xent_matches_hand_loop(tau: float) -> None:
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    got = nt_xent_loss(torch.from_numpy(z1).float(), torch.from_numpy(z2).float(), temperature=tau)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(_nt_xent_by_hand(z1, z2, tau), rel=1e-5, abs=1e-6)


def test_nt_xent_invariant_to_input_scale() -> None:
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    scales = torch.rand(5, 1, generator=g) * 10 + 0.1  # per-row scales, not just a global one
    base = nt_xent_loss(z1, z2)
    torch.testing.assert_close(nt_xent_loss(z1 * scales, z2 * 3.7), base, rtol=1e-5, atol=1e-6)


def test_nt_xent_known_values() -> None:
    b, tau = 3, 0.5
    eye = torch.eye(2 * b)
    # All 2B views mutually orthogonal: every logit is 0, so each anchor's loss is log(2B - 1).
    assert nt_xent_loss(eye[:b], eye[b:], tau).item() == pytest.approx(math.log(2 * b - 1), rel=1e-6)
    # Identical positives, orthogonal negatives: -log(e^{1/τ} / (e^{1/τ} + 2B - 2)).
    expected = math.log1p((2 * b - 2) * math.exp(-1 / tau))
    assert nt_xent_loss(eye[:b], eye[:b], tau).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_half_precision_inputs_and_module() -> None:
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    expected = _nt_xent_by_hand(z1.double().numpy(), z2.double().numpy(), 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = NTXentLoss(temperature=0.1)(z1, z2)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Gradient is finite despite the masked self-similarities.
    z1.requires_grad_(True)
    nt_xent_loss(z1, z2, 0.05).backward()
    assert torch.isfinite(z1.grad).all()


def _cos_by_hand(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return (p * z).sum(-1) / (p.norm(dim=-1) * z.norm(dim=-1))


def test_negative_cosine_and_byol_values() -> None:
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    z = torch.tensor([[2.0, 0.0], [-1.0, -1.0], [3.0, 0.0]])
    cos = [1.0, -1.0, 0.0]
    assert negative_cosine_similarity(p, z).item() == pytest.approx(-sum(cos) / 3, abs=1e-7)
    assert byol_loss(p, z).item() == pytest.approx(sum(2 - 2 * c for c in cos) / 3, abs=1e-6)


@pytest.mark.parametrize(
    ("loss_fn", "reference"),
    [
        (negative_cosine_similarity, lambda p, z: -_cos_by_hand(p, z).mean()),
        (byol_loss, lambda p, z: (2 - 2 * _cos_by_hand(p, z)).mean()),
    ],
)
def test_stop_gradient_on_target(loss_fn, reference) -> None:
    g = torch.Generator().manual_seed(3)
    p0, z0 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)

    p, z = p0.clone().requires_grad_(True), z0.clone().requires_grad_(True)
    loss = loss_fn(p, z)
    loss.backward()
    assert z.grad is None, "the target must be behind a stop-gradient"

    p_ref = p0.clone().requires_grad_(True)
    ref = reference(p_ref, z0)  # z0 is a constant here: the stop-gradient by construction
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6)


def test_the_package_exposes_every_family() -> None:
    import probssl.losses as losses
    from probssl.losses import contrastive, metric_learning, scoring_rules

    families = (contrastive, metric_learning, scoring_rules)
    public = {name for family in families for name in family.__all__}
    assert set(losses.__all__) == public
    for family in families:
        for name in family.__all__:
            assert getattr(losses, name) is getattr(family, name)
