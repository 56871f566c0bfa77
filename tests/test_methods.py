from __future__ import annotations

import math
import warnings

import pytest
import torch

from probssl.embedding import Embedding
from probssl.methods import METHODS, build_method
from probssl.methods.byol import cosine_momentum, ema_update
from probssl.nn import build_backbone


def _views(batch: int = 8) -> list[torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(batch, 1, 8, 8)
    return [x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)]


@pytest.mark.parametrize("name", [m for m in METHODS.names() if METHODS.get(m).trainable])
def test_every_trainable_method_trains_and_embeds(name):
    torch.manual_seed(0)
    method = build_method(name, build_backbone("convnet", 1, 8))
    loss = method.loss(_views())
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in method.backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    method.update_targets(0.5)
    method.eval()
    emb = method.embed(_views()[0])
    assert isinstance(emb, Embedding)
    assert emb.mean.shape[0] == 8 and emb.mean.ndim == 2
    assert emb.uncertainty.shape == (8,) and torch.isfinite(emb.uncertainty).all()
    if method.available_draws() == 0:  # a bank of weight samples, empty before training: deterministic
        assert emb.samples is None and torch.equal(emb.uncertainty, torch.zeros(8))
    elif METHODS.get(name).probabilistic:
        assert (emb.uncertainty > 0).all()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*has no samples to draw")  # tested below
            sampled = method.embed(_views()[0], samples=4)
        if sampled.samples is not None and not method.draws_fixed_by_model:
            assert sampled.samples.shape == (4, 8, sampled.mean.shape[1])
    else:
        assert emb.samples is None and torch.equal(emb.uncertainty, torch.zeros(8))


def test_pixels_embeds_raw_pixels():
    method = build_method("pixels", build_backbone("mlp", 1, 8))
    method.set_input_normalisation((0.25,), (0.5,))
    raw = torch.rand(4, 1, 8, 8)
    emb = method.embed((raw - 0.25) / 0.5)
    assert torch.allclose(emb.mean, raw.flatten(1), atol=1e-6)
    assert not method.trainable


def test_cosine_momentum_schedule_endpoints_and_midpoint():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(1 - 0.01 * 0.5)


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    expected = 0.9 * target.weight.detach() + 0.1 * online.weight.detach()
    ema_update(target, online, 0.9)
    assert torch.allclose(target.weight, expected)


def test_byol_target_is_a_separate_network_that_follows_by_ema():
    torch.manual_seed(0)
    method = build_method("byol", build_backbone("convnet", 1, 8), {"base_momentum": 0.5})
    online = dict(method.backbone.named_parameters())
    target = dict(method.target["backbone"].named_parameters())
    assert all(online[k].data_ptr() != target[k].data_ptr() for k in online)
    assert not any(p.requires_grad for p in method.target.parameters())
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.5)
    before = {k: v.detach().clone() for k, v in target.items()}
    method.loss(_views()).backward()
    opt.step()
    method.update_targets(0.0)  # momentum at progress 0 is base_momentum = 0.5
    for k in online:
        assert torch.allclose(target[k], 0.5 * before[k] + 0.5 * online[k].detach(), atol=1e-6)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_explains_its_uncertainty_in_one_line(name):
    from probssl.methods.base import SSLMethod

    method_cls = METHODS.get(name)
    doc = method_cls.uncertainty_doc
    assert isinstance(doc, str) and doc.strip() and "\n" not in doc and len(doc) < 300
    # A probabilistic method says what its own score is; only deterministic ones keep the default line.
    assert (doc != SSLMethod.uncertainty_doc) == method_cls.probabilistic


@pytest.mark.parametrize("name", METHODS.names())
def test_asking_for_samples_a_method_lacks_warns_once(name, monkeypatch):
    from probssl.methods import base

    monkeypatch.setattr(base, "_WARNED_NO_SAMPLES", set())
    torch.manual_seed(0)
    method = build_method(name, build_backbone("convnet", 1, 8)).eval()
    x = _views()[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = method.embed(x, samples=4)
        method.embed(x, samples=4)
        method.embed(x)  # no samples asked: never a warning
    notes = [str(w.message) for w in caught if "has no samples to draw" in str(w.message)]
    assert len(notes) == (1 if first.samples is None else 0), notes
    if notes:
        assert notes[0].startswith(f"{type(method).__name__}.embed(x, samples=4)")
