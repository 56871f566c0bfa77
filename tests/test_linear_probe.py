"""Linear probe (vs scikit-learn, train-only selection, BMA), splits and basic metrics."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from probssl.eval import linear
from probssl.eval.linear import LinearProbe, linear_probe_marginal, softmax_cross_entropy_with_grad
from probssl.eval.metrics import brier, nll, top1
from probssl.eval.splits import class_balanced_subset, stratified_split

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _blobs(
    n: int, d: int = 5, c: int = 3, spread: float = 1.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    centres = torch.zeros(c, d, dtype=torch.float64)
    centres[:, :c] = spread * torch.eye(c, dtype=torch.float64)
    return centres[y] + torch.randn(n, d, generator=g, dtype=torch.float64), y


# ------------------------------------------------------------------------------------------ probe
@pytest.mark.parametrize("l2", [1e-4, 1e-2])
def test_fixed_penalty_matches_sklearn_with_mapped_c(l2: float) -> None:
    x, y = _blobs(240)
    x = (x - x.mean(dim=0)) / x.std(dim=0, unbiased=False)  # our standardisation is then the identity
    probe = LinearProbe(l2_grid=(l2,)).fit_fixed(x, y, l2)
    reference = LogisticRegression(C=1.0 / (2.0 * l2 * len(y)), tol=1e-10, max_iter=10_000).fit(
        x.numpy(), y.numpy()
    )
    np.testing.assert_allclose(probe.predict_proba(x).numpy(), reference.predict_proba(x.numpy()), atol=1e-3)
    np.testing.assert_allclose(probe.weight.numpy(), reference.coef_, atol=1e-2)
    np.testing.assert_allclose(probe.bias.numpy(), reference.intercept_, atol=1e-2)
    assert probe.selected_l2 == l2 and probe.val_scores == {}


def test_standardisation_uses_training_statistics() -> None:
    x, y = _blobs(150)
    scaled = x * torch.tensor([1e3, 1e-3, 1.0, 5.0, 2.0], dtype=torch.float64) + 7.0
    a = LinearProbe().fit_fixed(x, y, 1e-3)
    b = LinearProbe().fit_fixed(scaled, y, 1e-3)  # affine feature rescaling is absorbed
    torch.testing.assert_close(a.predict_proba(x), b.predict_proba(scaled), atol=1e-6, rtol=0)


def test_separable_blobs_are_learned() -> None:
    x, y = _blobs(300, spread=12.0, seed=1)
    x_test, y_test = _blobs(150, spread=12.0, seed=2)
    probe = LinearProbe().fit(x.float(), y)
    assert top1(probe.predict_proba(x_test.float()), y_test) >= 0.99
    assert top1(probe.predict_proba(x.float()), y) == 1.0


def test_selection_sees_only_training_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    # fit() has no parameter through which a test set could enter.
    assert list(inspect.signature(LinearProbe.fit).parameters) == ["self", "x", "y", "num_classes"]
    x, y = _blobs(200)
    fitted_on: list[torch.Tensor] = []
    original = LinearProbe._fit

    def spy(self: LinearProbe, xs: torch.Tensor, ys: torch.Tensor, l2: float, num_classes: int) -> None:
        fitted_on.append(xs.clone())
        original(self, xs, ys, l2, num_classes)

    monkeypatch.setattr(LinearProbe, "_fit", spy)
    grid = (1e-5, 1e-3, 1e-1)
    probe = LinearProbe(l2_grid=grid, val_fraction=0.2, seed=3).fit(x, y)
    _, val_idx = stratified_split(y, 0.2, 3)
    rows = {tuple(r) for r in x.tolist()}
    val_rows = {tuple(r) for r in x[val_idx].tolist()}
    assert len(fitted_on) == len(grid) + 1
    for candidate in fitted_on[:-1]:  # candidates: training rows minus the validation rows
        seen = {tuple(r) for r in candidate.tolist()}
        assert seen <= rows and not seen & val_rows and len(seen) == len(x) - len(val_idx)
    torch.testing.assert_close(fitted_on[-1], x)  # final refit on all training rows
    assert set(probe.val_scores) == set(grid) == set(probe.val_nll)
    best = min(grid, key=lambda l2: (-probe.val_scores[l2], probe.val_nll[l2]))
    assert probe.selected_l2 == best


def test_selection_is_deterministic_and_reusable_on_tiny_grids() -> None:
    x, y = _blobs(120, spread=1.0)
    a = LinearProbe(seed=5).fit(x, y)
    b = LinearProbe(seed=5).fit(x, y)
    assert a.selected_l2 == b.selected_l2 and a.val_scores == b.val_scores
    torch.testing.assert_close(a.predict_logits(x), b.predict_logits(x))
    single = LinearProbe(l2_grid=(1e-3,)).fit(x[:4], y[:4], num_classes=3)  # no split needed
    assert single.selected_l2 == 1e-3 and single.predict_proba(x).shape == (120, 3)


def test_num_classes_beyond_observed_labels() -> None:
    x, y = _blobs(60, c=2)
    probs = LinearProbe(l2_grid=(1e-3,)).fit(x, y, num_classes=5).predict_proba(x)
    assert probs.shape == (60, 5)
    assert probs[:, 2:].max() < 0.05


def test_marginal_with_one_draw_is_the_plain_probe() -> None:
    x, y = _blobs(90)
    x_test, _ = _blobs(30, seed=9)
    plain = LinearProbe(l2_grid=(1e-4, 1e-2)).fit(x, y, 3).predict_proba(x_test)
    torch.testing.assert_close(
        linear_probe_marginal(x[None], y, x_test[None], 3, l2_grid=(1e-4, 1e-2)), plain
    )


def test_marginal_averages_probabilities_not_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    x0, y = _blobs(90, seed=0)
    x1, _ = _blobs(90, seed=1)
    t0, _ = _blobs(20, seed=2)
    t1, _ = _blobs(20, seed=3)
    t0, t1 = t0 + 100.0, t1 + 100.0  # far from the training rows, so a leak into fitting is visible
    fitted_means: list[float] = []
    original = LinearProbe._fit

    def spy(self: LinearProbe, xs: torch.Tensor, ys: torch.Tensor, l2: float, num_classes: int) -> None:
        fitted_means.append(xs.mean().item())
        original(self, xs, ys, l2, num_classes)

    monkeypatch.setattr(LinearProbe, "_fit", spy)
    kwargs = {"l2_grid": (1e-3, 1e-1), "seed": 1}
    got = linear_probe_marginal(torch.stack([x0, x1]), y, torch.stack([t0, t1]), 3, **kwargs)
    assert max(fitted_means) < 50.0  # only training draws were ever fitted
    assert len(fitted_means) == 2 + 1 + 1  # selection on draw 0 (2 candidates + refit), fixed fit on draw 1

    p0 = LinearProbe(**kwargs).fit(x0, y, 3)
    p1 = LinearProbe(**kwargs).fit_fixed(x1, y, p0.selected_l2, 3)
    expected = 0.5 * (p0.predict_proba(t0) + p1.predict_proba(t1))
    torch.testing.assert_close(got, expected)
    mean_logits = torch.softmax(0.5 * (p0.predict_logits(t0) + p1.predict_logits(t1)), dim=1)
    assert (got - mean_logits).abs().max() > 1e-4
    torch.testing.assert_close(got.sum(dim=1), torch.ones(20, dtype=got.dtype))


def test_marginal_broadcasts_a_single_train_draw() -> None:
    x, y = _blobs(90)
    t0, _ = _blobs(20, seed=4)
    t1, _ = _blobs(20, seed=5)
    probe = LinearProbe(l2_grid=(1e-3,)).fit(x, y, 3)
    got = linear_probe_marginal(x[None], y, torch.stack([t0, t1]), 3, l2_grid=(1e-3,))
    torch.testing.assert_close(got, 0.5 * (probe.predict_proba(t0) + probe.predict_proba(t1)))
    assert linear.LinearProbe is LinearProbe


def test_unfitted_probe_raises() -> None:
    with pytest.raises(RuntimeError):
        LinearProbe().predict_logits(torch.zeros(2, 3))


# ----------------------------------------------------------------------------------------- splits
def test_stratified_split_is_disjoint_balanced_and_deterministic() -> None:
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 1 + [3] * 9)
    keep, held = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(torch.sort(torch.cat([keep, held])).values, torch.arange(80))
    assert torch.equal(keep, torch.sort(keep).values) and torch.equal(held, torch.sort(held).values)
    assert torch.bincount(labels[held], minlength=4).tolist() == [5, 2, 0, 1]
    assert set(labels[keep].tolist()) == {0, 1, 2, 3}
    again = stratified_split(labels, 0.1, seed=0)
    assert torch.equal(again[0], keep) and torch.equal(again[1], held)
    assert not torch.equal(stratified_split(labels, 0.1, seed=1)[1], held)
    _, all_held = stratified_split(labels, 1.0, seed=0)  # even fraction 1 keeps one per class
    assert len(all_held) == 80 - 4


def test_class_balanced_subset_counts() -> None:
    labels = torch.tensor([0] * 200 + [1] * 100 + [2] * 3)
    subset = class_balanced_subset(labels, 0.01, seed=0)
    assert torch.bincount(labels[subset], minlength=3).tolist() == [2, 1, 1]
    subset10 = class_balanced_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[subset10], minlength=3).tolist() == [20, 10, 1]
    assert torch.equal(subset10, torch.sort(subset10).values) and len(set(subset10.tolist())) == 31
    assert torch.equal(class_balanced_subset(labels, 0.1, seed=0), subset10)
    assert not torch.equal(class_balanced_subset(labels, 0.1, seed=1), subset10)


# ---------------------------------------------------------------------------------------- metrics
def test_metrics_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    labels = torch.tensor([0, 1])
    assert top1(probs, labels) == 0.5
    assert nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    # (0.3² + 0.2² + 0.1²) = 0.14 and (0.1² + 0.7² + 0.6²) = 0.86
    assert brier(probs, labels) == pytest.approx(0.5)
    certain_wrong = torch.tensor([[0.0, 1.0]])
    assert nll(certain_wrong, torch.tensor([0])) == pytest.approx(-math.log(1e-12))
    assert brier(certain_wrong, torch.tensor([0])) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        top1(probs, torch.tensor([0]))


@pytest.mark.parametrize("l2", [0.0, 1e-3, 0.5])
def test_closed_form_gradient_equals_autograd(l2: float) -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.randn(300, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (300,), generator=g)
    weight = torch.randn(5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(z @ weight.T + bias, y) + l2 * weight.pow(2).sum()
    loss.backward()
    with torch.no_grad():
        value, grad_weight, grad_bias = softmax_cross_entropy_with_grad(z.T.contiguous(), y, weight, bias, l2)
    assert value.item() == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(grad_weight, weight.grad, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grad_bias, bias.grad, rtol=1e-10, atol=1e-13)
