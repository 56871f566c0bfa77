"""LAM's contrastive GGN and diagonal Laplace posterior, against torch.func autograd and Monte Carlo.

The reference GGN is built the slow way: per-pair Jacobians of the layer output w.r.t. the flattened
(W, b) with ``torch.func.jacrev``, full output-Hessian blocks with ``torch.func.hessian`` of an
independently written pair loss, G = Σ_ab J_aᵀ H_ab J_b, its diagonal, then the variant's rule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian, jacrev

from probssl.losses.metric_learning import mine_pairs
from probssl.posteriors.laplace import (
    DiagonalLaplace,
    arccos_pair_hessian,
    contrastive_ggn_diagonal,
    euclidean_pair_hessian,
    online_hessian_scale,
    pair_hessian_diagonals,
)

DT = torch.float64
MARGIN = 0.7


pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _pair_loss(
    y1: torch.Tensor, y2: torch.Tensor, positive: bool, margin: float, negative: str
) -> torch.Tensor:
    """The pair loss written independently of the library; ``negative="released"``: −½d² in the margin."""
    d = torch.linalg.vector_norm(y1 - y2)
    if positive:
        return 0.5 * d**2
    if negative == "released":
        return torch.where(d < margin, -0.5 * d**2, torch.zeros_like(d))
    return 0.5 * torch.relu(margin - d) ** 2


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x)


def _blocks(fn, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full Hessian blocks (H11, H12, H22) of fn(u, v) at (a, b) via torch.func.hessian on [u; v]."""
    o = a.shape[0]
    h = hessian(lambda uv: fn(uv[:o], uv[o:]))(torch.cat([a, b]))
    return h[:o, :o], h[:o, o:], h[o:, o:]


def _pairs(seed: int, o: int = 4, scale: float = 2.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Un-normalised pair outputs [P, O]: positives, negatives inside the margin, a negative beyond it."""
    g = torch.Generator().manual_seed(seed)
    x1 = scale * torch.randn(6, o, generator=g, dtype=DT)
    x2 = x1 + 0.25 * scale * torch.randn(6, o, generator=g, dtype=DT)  # close: inside the margin
    x2[5] = -x1[5]  # antipodal: d = 2, beyond the margin
    is_pos = torch.tensor([True, True, False, False, False, False])
    return x1, x2, is_pos


def _check_mix(y1: torch.Tensor, y2: torch.Tensor, is_pos: torch.Tensor) -> None:
    d = (y1 - y2).norm(dim=1)
    assert bool((d[2:5] < MARGIN).all()) and bool(d[5] > MARGIN), d  # the mix the tests rely on


@pytest.mark.parametrize("negative", ["exact", "released"])
def test_euclidean_output_hessian_matches_autograd(negative: str) -> None:
    x1, x2, is_pos = _pairs(0)
    y1, y2 = F.normalize(x1, dim=1), F.normalize(x2, dim=1)
    _check_mix(y1, y2, is_pos)
    got = euclidean_pair_hessian(y1, y2, is_pos, MARGIN, negative)
    for p in range(6):
        ref = _blocks(lambda u, v, p=p: _pair_loss(u, v, bool(is_pos[p]), MARGIN, negative), y1[p], y2[p])
        for g, r in zip(got, ref, strict=True):
            torch.testing.assert_close(g[p], r, rtol=1e-10, atol=1e-10)
    if negative == "exact":  # the derived form: (1 - m/d) I + (m/d) r̂ r̂ᵀ, indefinite inside the margin
        eig = torch.linalg.eigvalsh(got[0][2])
        d = (y1[2] - y2[2]).norm()
        torch.testing.assert_close(eig.max(), torch.tensor(1.0, dtype=DT))
        torch.testing.assert_close(eig.min(), 1 - MARGIN / d)


@pytest.mark.parametrize("negative", ["exact", "released"])
def test_arccos_output_hessian_matches_autograd(negative: str) -> None:
    x1, x2, is_pos = _pairs(1)
    _check_mix(F.normalize(x1, dim=1), F.normalize(x2, dim=1), is_pos)
    got = arccos_pair_hessian(x1, x2, is_pos, MARGIN, negative)
    diag = pair_hessian_diagonals(x1, x2, is_pos, MARGIN, "arccos", negative)
    for p in range(6):

        def fn(u, v, p=p):
            return _pair_loss(_normalize(u), _normalize(v), bool(is_pos[p]), MARGIN, negative)

        ref = _blocks(fn, x1[p], x2[p])
        for g, dg, r in zip(got, diag, ref, strict=True):
            torch.testing.assert_close(g[p], r, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(dg[p], torch.diagonal(r), rtol=1e-9, atol=1e-10)


def test_euclidean_diagonals_are_gauss_newton_through_the_normalisation() -> None:
    x1, x2, is_pos = _pairs(2)
    diag = pair_hessian_diagonals(x1, x2, is_pos, MARGIN, "euclidean")
    for p in range(6):
        j1, j2 = jacrev(_normalize)(x1[p]), jacrev(_normalize)(x2[p])
        h11, h12, h22 = _blocks(
            lambda u, v, p=p: _pair_loss(u, v, bool(is_pos[p]), MARGIN, "exact"),
            _normalize(x1[p]),
            _normalize(x2[p]),
        )
        for dg, r in zip(diag, (j1.T @ h11 @ j1, j1.T @ h12 @ j2, j2.T @ h22 @ j2), strict=True):
            torch.testing.assert_close(dg[p], torch.diagonal(r), rtol=1e-9, atol=1e-10)


def _reference_ggn(
    w: torch.Tensor,
    b: torch.Tensor,
    h1: torch.Tensor,
    h2: torch.Tensor,
    is_pos: torch.Tensor,
    space: str,
    variant: str,
    negative: str,
    loss_of_pair=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unclamped diagonal GGN over flattened (W, b) with torch.func, and the per-pair variant rule."""
    o, i = w.shape
    theta = torch.cat([w.flatten(), b])

    def layer(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        x = t[: o * i].reshape(o, i) @ h + t[o * i :]
        return _normalize(x) if space == "euclidean" else x

    total = torch.zeros_like(theta)
    for p in range(h1.shape[0]):
        pos = bool(is_pos[p])
        if variant == "pos" and not pos:
            continue
        j1, j2 = jacrev(layer)(theta, h1[p]), jacrev(layer)(theta, h2[p])
        out1, out2 = layer(theta, h1[p]), layer(theta, h2[p])

        def fn(u, v, pos=pos):
            if space == "arccos":
                u, v = _normalize(u), _normalize(v)
            return (loss_of_pair or _pair_loss)(u, v, pos, MARGIN, negative)

        h11, h12, h22 = _blocks(fn, out1, out2)
        g = j1.T @ h11 @ j1 + j2.T @ h22 @ j2
        if variant != "fix":
            g = g + j1.T @ h12 @ j2 + j2.T @ h12.T @ j1
        total = total + torch.diagonal(g)
    return total[: o * i].reshape(o, i), total[o * i :]


def _layer_pairs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=g, dtype=DT)
    b = 0.5 * torch.randn(4, generator=g, dtype=DT)
    h1 = torch.randn(7, 3, generator=g, dtype=DT)
    h2 = h1 + 0.15 * torch.randn(7, 3, generator=g, dtype=DT)  # close inputs: negatives inside the margin
    h2[0] = torch.randn(3, generator=g, dtype=DT)  # a positive pair far apart
    is_pos = torch.tensor([True, True, False, False, False, False, False])
    return w, b, h1, h2, is_pos


@pytest.mark.parametrize("negative", ["exact", "released"])
@pytest.mark.parametrize("space", ["euclidean", "arccos"])
@pytest.mark.parametrize("variant", ["pos", "fix", "full"])
def test_closed_form_ggn_diagonal_matches_autograd(variant: str, space: str, negative: str) -> None:
    w, b, h1, h2, is_pos = _layer_pairs(3)
    x1, x2 = h1 @ w.T + b, h2 @ w.T + b
    d = (F.normalize(x1, dim=1) - F.normalize(x2, dim=1)).norm(dim=1)
    assert int((~is_pos & (d < MARGIN)).sum()) >= 3  # the negatives contribute curvature
    hd = pair_hessian_diagonals(x1, x2, is_pos, MARGIN, space, negative)
    got_w, got_b = contrastive_ggn_diagonal(h1, h2, *hd, variant, is_pos, bias=True)
    raw_w, raw_b = contrastive_ggn_diagonal(h1, h2, *hd, variant, is_pos, bias=True, clamp=False)
    ref_w, ref_b = _reference_ggn(w, b, h1, h2, is_pos, space, variant, negative)
    torch.testing.assert_close(raw_w, ref_w, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(raw_b, ref_b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_w, ref_w.clamp_min(0), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_b, ref_b.clamp_min(0), rtol=1e-9, atol=1e-10)
    if variant != "pos" and negative == "released":  # the clamp is exercised, not vacuous
        assert bool((ref_w < 0).any() or (ref_b < 0).any())

    no_bias_w, no_bias_b = contrastive_ggn_diagonal(h1, h2, *hd, variant, is_pos, bias=False)
    assert no_bias_b is None and torch.equal(no_bias_w, got_w)


def test_clamp_is_exercised_with_exact_negatives() -> None:
    w, b, h1, h2, is_pos = _layer_pairs(3)
    x1, x2 = h1 @ w.T + b, h2 @ w.T + b
    raw = contrastive_ggn_diagonal(
        h1, h2, *pair_hessian_diagonals(x1, x2, is_pos, MARGIN), "fix", is_pos, clamp=False
    )
    assert bool((raw[0] < 0).any() or (raw[1] < 0).any())


@pytest.mark.parametrize("space", ["euclidean", "arccos"])
def test_fix_with_released_negatives_is_sum_pos_minus_sum_neg(space: str) -> None:
    """design.md's literal rule: Σ_pos − Σ_neg of the no-cross-term GGNs of ½d², negatives in the margin."""
    w, b, h1, h2, is_pos = _layer_pairs(4)
    x1, x2 = h1 @ w.T + b, h2 @ w.T + b
    hd = pair_hessian_diagonals(x1, x2, is_pos, MARGIN, space, "released")
    got_w, got_b = contrastive_ggn_diagonal(h1, h2, *hd, "fix", is_pos, clamp=False)

    def half_sq(u, v, pos, margin, negative):
        return 0.5 * torch.linalg.vector_norm(u - v) ** 2

    d = (F.normalize(x1, dim=1) - F.normalize(x2, dim=1)).norm(dim=1)
    all_pos = torch.ones_like(is_pos)
    sel_pos, sel_neg = is_pos, ~is_pos & (d < MARGIN)
    pw, pb = _reference_ggn(w, b, h1[sel_pos], h2[sel_pos], all_pos[sel_pos], space, "fix", "", half_sq)
    nw, nb = _reference_ggn(w, b, h1[sel_neg], h2[sel_neg], all_pos[sel_neg], space, "fix", "", half_sq)
    torch.testing.assert_close(got_w, pw - nw, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_b, pb - nb, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("space", ["euclidean", "arccos"])
@pytest.mark.parametrize("variant", ["pos", "full"])
def test_batch_hessian_is_ggn_of_the_summed_batch_loss(space: str, variant: str) -> None:
    """Whole-batch check: diag(J_Yᵀ ∇²_Y L J_Y) of L = Σ_pairs ℓ over all B outputs at once."""
    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(3, 4).to(DT)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(4, 3, generator=g, dtype=DT))
        layer.bias.copy_(0.3 * torch.randn(4, generator=g, dtype=DT))
    feats = torch.randn(6, 3, generator=g, dtype=DT)
    feats[3:] = feats[:3] + 0.2 * torch.randn(3, 3, generator=g, dtype=DT)
    labels = torch.tensor([0, 1, 2, 0, 2, 1])
    margin = 1.2
    lap = DiagonalLaplace(layer, margin=margin, variant=variant, output_space=space)
    got, num_pairs = lap.batch_hessian(feats, labels)
    anchor, other, is_pos = mine_pairs(labels, "all")
    assert num_pairs == 15

    theta = torch.cat([layer.weight.detach().flatten(), layer.bias.detach()])

    def outputs(t: torch.Tensor) -> torch.Tensor:
        x = feats @ t[:12].reshape(4, 3).T + t[12:]
        return F.normalize(x, dim=1) if space == "euclidean" else x

    def total_loss(flat: torch.Tensor) -> torch.Tensor:
        y = flat.reshape(6, 4)
        if space == "arccos":
            y = F.normalize(y, dim=1)
        terms = [
            _pair_loss(y[a], y[o], bool(p), margin, "exact")
            for a, o, p in zip(anchor, other, is_pos, strict=True)
            if variant == "full" or bool(p)
        ]
        return torch.stack(terms).sum()

    jac = jacrev(lambda t: outputs(t).flatten())(theta)  # [B·O, params]
    hess = hessian(total_loss)(outputs(theta).flatten())  # [B·O, B·O]
    ref = torch.diagonal(jac.T @ hess @ jac).clamp_min(0)
    torch.testing.assert_close(
        got.flatten(), torch.cat([ref[:12].reshape(4, 3), ref[12:, None]], 1).flatten()
    )


def _laplace_with(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, prior: float = 1.0) -> DiagonalLaplace:
    layer = torch.nn.Linear(w.shape[1], w.shape[0]).to(DT)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    lap = DiagonalLaplace(layer, prior_precision=prior)
    lap.hessian.copy_(h)
    return lap


def test_samples_match_the_gaussian_posterior() -> None:
    g = torch.Generator().manual_seed(6)
    w, b = torch.randn(2, 3, generator=g, dtype=DT), torch.randn(2, generator=g, dtype=DT)
    h = torch.tensor([[0.0, 1.0, 4.0, 9.0], [24.5, 0.5, 2.0, 99.5]], dtype=DT)
    lap = _laplace_with(h, w, b, prior=0.5)
    n = 40_000
    with torch.no_grad():
        s = lap.sample(n, generator=torch.Generator().manual_seed(7))
    assert s.shape == (n, 2, 4)
    mean = torch.cat([w, b[:, None]], 1)
    var = 1.0 / (h + 0.5)
    flat = (s - mean).reshape(n, -1)
    assert bool((flat.mean(0).abs() <= 5 * var.flatten().sqrt() / math.sqrt(n)).all())
    assert bool(((flat.var(0) / var.flatten() - 1).abs() <= 5 * math.sqrt(2 / n)).all())
    corr = torch.corrcoef(flat.T)
    off = corr - torch.diag(torch.diagonal(corr))
    assert float(off.abs().max()) <= 5 / math.sqrt(n)

    x = torch.randn(5, 3, generator=g, dtype=DT)
    with torch.no_grad():
        out = lap.sample_layer_outputs(x, 3, generator=torch.Generator().manual_seed(8))
        draws = lap.sample(3, generator=torch.Generator().manual_seed(8))
    ref = torch.stack([F.linear(x, d[:, :-1], d[:, -1]) for d in draws])
    assert out.shape == (3, 5, 2)
    torch.testing.assert_close(out, ref)


def test_samples_are_differentiable_in_the_mean() -> None:
    lap = _laplace_with(torch.ones(2, 4, dtype=DT), torch.zeros(2, 3, dtype=DT), torch.zeros(2, dtype=DT))
    lap.sample(5).sum().backward()
    torch.testing.assert_close(lap.layer.weight.grad, torch.full((2, 3), 5.0, dtype=DT))
    torch.testing.assert_close(lap.layer.bias.grad, torch.full((2,), 5.0, dtype=DT))
    assert "layer.weight" not in lap.state_dict() and set(lap.state_dict()) == {"hessian", "prior_precision"}


def test_no_bias_layer_shapes() -> None:
    layer = torch.nn.Linear(3, 2, bias=False)
    lap = DiagonalLaplace(layer)
    assert lap.sample(4).shape == (4, 2, 3)
    assert lap.sample_layer_outputs(torch.randn(5, 3), 4).shape == (4, 5, 2)
    h, _ = lap.batch_hessian(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert h.shape == (2, 3) and bool((h >= 0).all())


def _numpy_evidence(lam: np.ndarray, h: np.ndarray, theta: np.ndarray) -> np.ndarray:
    p = theta.size
    return (
        -0.5 * lam * (theta**2).sum()
        + 0.5 * p * np.log(lam)
        - 0.5 * np.log(h[None, :] + lam[:, None]).sum(axis=1)
    )


def test_optimize_prior_precision_finds_the_evidence_maximiser() -> None:
    rng = np.random.default_rng(9)
    w, b = rng.normal(size=(3, 2)), rng.normal(size=3)
    h = np.exp(rng.normal(1.0, 2.0, size=(3, 3)))
    h[0, 0] = 0.0
    lap = _laplace_with(torch.from_numpy(h), torch.from_numpy(w), torch.from_numpy(b), prior=1.0)
    theta = np.concatenate([w, b[:, None]], axis=1).ravel()
    grid = np.exp(np.linspace(np.log(1e-4), np.log(1e4), 400_001))
    ev = _numpy_evidence(grid, h.ravel(), theta)
    brute = grid[np.argmax(ev)]
    lam = lap.optimize_prior_precision()
    assert lam == pytest.approx(brute, rel=1e-4)
    assert float(lap.prior_precision) == pytest.approx(lam)
    for probe in (0.1, 1.0, lam, 30.0):
        expected = _numpy_evidence(np.array([probe]), h.ravel(), theta)[0]
        assert float(lap.log_evidence(probe)) == pytest.approx(expected, rel=1e-12)
    assert float(lap.log_evidence(lam)) >= ev.max() - 1e-9


def test_optimize_prior_precision_bounds() -> None:
    lap = _laplace_with(torch.zeros(2, 4, dtype=DT), torch.ones(2, 3, dtype=DT), torch.ones(2, dtype=DT))
    assert lap.optimize_prior_precision(bounds=(1e-3, 1e3)) == pytest.approx(1e-3)  # H = 0: λ -> 0
    lap = _laplace_with(torch.ones(2, 4, dtype=DT), torch.zeros(2, 3, dtype=DT), torch.zeros(2, dtype=DT))
    assert lap.optimize_prior_precision(bounds=(1e-3, 1e3)) == pytest.approx(1e3)  # θ* = 0: λ -> ∞


def test_online_update_and_post_hoc_fit() -> None:
    lap = _laplace_with(
        torch.full((2, 4), 2.0, dtype=DT), torch.zeros(2, 3, dtype=DT), torch.zeros(2, dtype=DT)
    )
    h1 = torch.arange(8, dtype=DT).reshape(2, 4)
    h2 = torch.ones(2, 4, dtype=DT)
    assert online_hessian_scale(100, 40) == pytest.approx(250.0)
    lap.update(h1, memory_factor=0.9, scale=online_hessian_scale(10, 20))
    torch.testing.assert_close(lap.hessian, 0.9 * 2.0 + 5.0 * h1)
    lap.update(h2, memory_factor=0.5, scale=3.0)
    torch.testing.assert_close(lap.hessian, 0.5 * (0.9 * 2.0 + 5.0 * h1) + 3.0 * h2)
    torch.testing.assert_close(lap.posterior_precision, lap.hessian + 1.0)

    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        lap.layer.weight.copy_(torch.randn(2, 3, generator=g, dtype=DT))
    batches = [(torch.randn(6, 3, generator=g, dtype=DT), torch.tensor([0, 0, 1, 1, 2, 2])) for _ in range(2)]
    lap.fit(batches)
    expected = sum(lap.batch_hessian(f, y)[0] for f, y in batches)
    torch.testing.assert_close(lap.hessian, expected)
    assert bool((lap.hessian > 0).any())


def test_max_pairs_subsamples() -> None:
    lap = DiagonalLaplace(torch.nn.Linear(3, 2), max_pairs=4)
    _, n = lap.batch_hessian(torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2]), generator=torch.Generator())
    assert n == 4
