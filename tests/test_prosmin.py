"""ProSMIN: EMA target, centring, head structure, and a smoke test of loss / embed."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import parametrize

import probssl.methods.prosmin as prosmin_module
from probssl.embedding import Embedding
from probssl.losses.scoring_rules import energy_score_l1
from probssl.methods.byol import cosine_momentum
from probssl.methods.prosmin import ProSMINConfig
from probssl.methods.registry import METHODS
from probssl.nn import build_backbone

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _method(**overrides):
    torch.manual_seed(0)
    cfg = ProSMINConfig(
        proj_hidden_dim=16, bottleneck_dim=8, out_dim=12, pred_hidden_dim=16, pred_dim=8, **overrides
    )
    return METHODS.get("prosmin")(build_backbone("convnet", 1, 8, width=8), cfg)


def _views(batch: int = 6) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=gen)
    return [x + 0.1 * torch.randn(x.shape, generator=gen), x + 0.1 * torch.randn(x.shape, generator=gen)]


def _perturb_online(method) -> None:
    with torch.no_grad():
        for p in list(method.backbone.parameters()) + list(method.projector.parameters()):
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def test_smoke_loss_backward_embed_and_head_samples():
    method = _method()
    loss = method.loss(_views())
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in method.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # The heads get gradient too; the target gets none.
    assert method.logvar_head.weight.grad is not None and method.logvar_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.target.parameters())
    method.update_targets(0.5)
    assert set(method.extra_state_for_logging()) == {"ema_momentum", "mean_sigma"}

    method.eval()
    x = _views()[0]
    for s in (None, 4):
        emb = method.embed(x, samples=s)
        assert isinstance(emb, Embedding)
        assert emb.mean.shape == (6, method.backbone.out_dim) and emb.samples is None
        assert emb.uncertainty.shape == (6,) and (emb.uncertainty > 0).all()
    _, logvar = method.predictive(x)
    assert torch.allclose(emb.uncertainty, (0.5 * logvar).exp().mean(dim=-1))
    assert method.head_samples(x, 5).shape == (5, 6, 12)


def test_embed_mean_is_the_target_backbone():
    method = _method()
    _perturb_online(method)
    method.eval()
    x = _views()[0]
    emb = method.embed(x)
    assert torch.allclose(emb.mean, method.target["backbone"](x))
    assert not torch.allclose(emb.mean, method.backbone(x))


def test_head_samples_have_the_head_moments():
    method = _method().eval()
    x = _views(batch=2)[0]
    mu, logvar = method.predictive(x)
    torch.manual_seed(3)
    draws = method.head_samples(x, 20_000)
    assert torch.allclose(draws.mean(0), mu, atol=0.05)
    assert torch.allclose(draws.std(0), (0.5 * logvar).exp(), rtol=0.05)


def test_ema_update_formula_and_target_is_a_separate_module():
    method = _method(base_momentum=0.9)
    online = list(method.backbone.parameters()) + list(method.projector.parameters())
    target = list(method.target["backbone"].parameters()) + list(method.target["projector"].parameters())
    # Only f and g are averaged: the predictor and the Gaussian heads have no target copy.
    assert len(target) == len(online)
    assert {p.data_ptr() for p in online}.isdisjoint({p.data_ptr() for p in target})
    assert not any(p.requires_grad for p in target)

    _perturb_online(method)  # a separate copy is untouched by this in-place change
    old = [t.detach().clone() for t in target]
    assert any(not torch.equal(t, o) for t, o in zip(old, online, strict=True))
    method.update_targets(0.3)
    m = cosine_momentum(0.9, 0.3)
    assert method.momentum == pytest.approx(m)
    for t, t_old, o in zip(target, old, online, strict=True):
        assert torch.allclose(t, m * t_old + (1 - m) * o.detach(), atol=1e-6)


def _expected_loss(method, views, center, seed):
    """The loss recomputed from its parts with the same ε draws (same order as ``loss``)."""
    with torch.no_grad():
        z = [method.target["projector"](method.target["backbone"](v)) for v in views]
    torch.manual_seed(seed)
    samples = []
    for v in views:
        mu, logvar = method.predictive(v)
        samples.append(method.rsample(mu, logvar, method.cfg.num_samples))
    lam = method.cfg.energy_lambda
    loss = 0.5 * (
        energy_score_l1(samples[0], z[1] - center, lam) + energy_score_l1(samples[1], z[0] - center, lam)
    )
    return loss, z


def test_centring_update_and_loss_uses_the_centred_target():
    method = _method()
    views = _views()
    c0 = 0.3 * torch.randn(12)
    method.center.copy_(c0)
    torch.manual_seed(5)
    loss = method.loss(views)
    expected, z = _expected_loss(method, views, c0, seed=5)
    uncentred, _ = _expected_loss(method, views, torch.zeros(12), seed=5)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert abs(loss.item() - uncentred.item()) > 1e-3  # the test can tell centred from uncentred
    batch_mean = torch.cat(z).mean(dim=0)
    assert torch.allclose(method.center, 0.9 * c0 + 0.1 * batch_mean, atol=1e-6)


def test_centre_update_goes_through_the_distributed_mean(monkeypatch):
    calls = []

    def fake_all_reduce_mean(x):
        calls.append(x.shape)
        return torch.ones_like(x)  # as if the other ranks' batches averaged to 1

    monkeypatch.setattr(prosmin_module, "all_reduce_mean", fake_all_reduce_mean)
    method = _method()
    method.loss(_views())
    assert calls == [torch.Size([12])]
    assert torch.allclose(method.center, torch.full((12,), 0.1))


def test_weight_normalised_last_layer_with_unit_rows():
    method = _method()
    last = method.projector.last
    assert parametrize.is_parametrized(last, "weight")
    gain = last.parametrizations.weight.original0
    assert not gain.requires_grad
    # A step on the direction leaves each row at unit norm: the gain, not the direction, sets the scale.
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1.0)
    method.loss(_views()).backward()
    opt.step()
    assert torch.allclose(last.weight.norm(dim=1), torch.ones(12), atol=1e-5)
    free = _method(norm_last_layer=False).projector.last
    assert (
        parametrize.is_parametrized(free, "weight") and free.parametrizations.weight.original0.requires_grad
    )


def test_log_variance_is_clamped():
    method = _method(logvar_min=-3.0, logvar_max=1.0)
    x = _views()[0]
    with torch.no_grad():
        method.logvar_head.weight.fill_(1e3)
    assert torch.all(method.predictive(x)[1] == 1.0)
    with torch.no_grad():
        method.logvar_head.weight.fill_(-1e3)
    assert torch.all(method.predictive(x)[1] == -3.0)


def test_local_crops_are_online_only_and_view_count_is_checked():
    method = _method(num_local=2)
    with pytest.raises(ValueError, match="2 global"):
        method.loss(_views())
    gen = torch.Generator().manual_seed(4)
    local = [torch.randn(6, 1, 4, 4, generator=gen) for _ in range(2)]
    seen = []
    method.target["backbone"].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    loss = method.loss(_views() + local)
    assert math.isfinite(loss.item())
    assert seen == [torch.Size([6, 1, 8, 8])] * 2


def test_config_is_validated():
    with pytest.raises(ValueError, match="num_samples"):
        _method(num_samples=1)
    with pytest.raises(ValueError, match="logvar_min"):
        _method(logvar_min=1.0, logvar_max=0.0)
