"""LAM as a method (design.md §3.5): online / post-hoc posterior, embeddings, baselines.

The curvature itself (closed-form GGN diagonals vs autograd) is tested in test_contrastive_ggn.py;
here the method is checked to use it as the algorithm box says.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from probssl.losses.metric_learning import contrastive_pair_loss, mine_pairs
from probssl.methods import TrainContext, build_method
from probssl.methods.lam import LAM, image_identity_labels
from probssl.nn import build_backbone
from probssl.posteriors.laplace import online_hessian_scale

pytestmark = pytest.mark.usefixtures("single_thread")

NUM_DATA = 1000


def _context(seed: int = 3) -> TrainContext:
    return TrainContext(Path("."), True, NUM_DATA, 10, 100, 0.05, seed)


def _lam(**args) -> LAM:
    torch.manual_seed(0)
    method = build_method("lam", build_backbone("convnet", 1, 8), {"max_pairs": 40, **args})
    method.configure_optimizer(_context())
    return method


def _views(batch: int = 6, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    return [x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape, generator=g)]


def test_labels_pair_the_views_of_each_image():
    assert image_identity_labels(3, 2, torch.device("cpu")).tolist() == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("posterior", "laplace"),
        ("miner", "hard"),
        ("variant", "psd"),
        ("output_space", "cosine"),
        ("margin", 0.0),
        ("margin", 2.5),
        ("prior_precision", 0.0),
        ("hessian_memory", 1.5),
        ("dropout", 1.0),
    ],
)
def test_config_is_validated(key, value):
    with pytest.raises(ValueError, match=key):
        build_method("lam", build_backbone("convnet", 1, 8), {key: value})


def test_deterministic_loss_is_the_pair_loss_on_the_normalised_embedding():
    method = _lam(posterior="none")
    views = _views()
    feats = torch.stack([method.backbone(v) for v in views], dim=1).reshape(12, -1)
    z = F.normalize(method.embedding(feats), dim=-1)
    labels = image_identity_labels(6, 2, z.device)
    expected = contrastive_pair_loss(z, mine_pairs(labels, "semihard", z, 0.7), 0.7)
    torch.testing.assert_close(method.loss(views), expected)


def test_online_step_uses_a_seeded_weight_sample_and_updates_the_hessian():
    method = _lam(posterior="online", hessian_memory=0.5)
    method.laplace.hessian.fill_(2.0)
    views = _views()
    # The sample θ_s = θ* + σ ε with ε from the (seed, step) generator: reproduce it by hand.
    noise = torch.Generator().manual_seed(3 * 1_000_003 + 0)
    theta = method.laplace.sample(1, generator=noise)[0]
    subsets = noise  # the same generator then picks the Hessian's pair subset
    feats = torch.stack([method.backbone(v) for v in views], dim=1).reshape(12, -1)
    labels = image_identity_labels(6, 2, feats.device)
    z = F.normalize(F.linear(feats, theta[:, :-1], theta[:, -1]), dim=-1)
    expected = contrastive_pair_loss(z, mine_pairs(labels, "semihard", z, 0.7), 0.7)
    h_batch, pairs = method.laplace.batch_hessian(feats, labels, params=theta.detach(), generator=subsets)

    loss = method.loss(views)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert method.embedding.weight.grad.abs().sum() > 0  # θ* learns through the reparameterised sample
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.backbone.parameters())

    method.after_step(0, _context())
    scale = online_hessian_scale(NUM_DATA, pairs)
    torch.testing.assert_close(method.laplace.hessian, 0.5 * 2.0 + scale * h_batch)
    assert int(method.steps_done) == 1
    # The next step draws different noise; the same step (e.g. after a resume) the same noise.
    first = method._weight_noise().initial_seed()
    assert first == 3 * 1_000_003 + 1


def test_non_finite_step_leaves_the_hessian_untouched():
    """The curvature is applied in after_step, so a step the loop rejects never reaches H."""
    method = _lam(posterior="online")
    method.loss(_views())
    assert torch.equal(method.laplace.hessian, torch.zeros_like(method.laplace.hessian))


def test_posthoc_pass_sums_the_ggn_at_the_mean_and_can_tune_the_prior():
    method = _lam(posterior="posthoc", optimize_prior=True)
    batches = [_views(seed=s) for s in (1, 2, 3)]
    method.eval()
    expected = torch.zeros_like(method.laplace.hessian)
    subsets = torch.Generator().manual_seed(3)
    for views in batches:
        feats = torch.stack([method.backbone(v) for v in views], dim=1).reshape(12, -1)
        labels = image_identity_labels(6, 2, feats.device)
        expected += method.laplace.batch_hessian(feats, labels, generator=subsets)[0]
    method.train()
    method.after_training(lambda: iter(batches), _context())
    torch.testing.assert_close(method.laplace.hessian, expected)
    assert method.training  # the pass restores the mode it found
    # λ maximises the Laplace evidence over the search bounds (1e-6, 1e6): no grid point does better.
    lam = float(method.laplace.prior_precision)
    assert lam != 1.0  # it was tuned, not left at its initial value
    best = float(method.laplace.log_evidence(lam))
    for candidate in torch.logspace(-6, 6, 49).tolist():
        assert float(method.laplace.log_evidence(candidate)) <= best + 1e-9


def test_embed_samples_are_fixed_normalised_and_summarised_as_the_paper_says():
    method = _lam(posterior="online").eval()
    x = _views()[0]
    emb = method.embed(x, samples=7)
    assert emb.samples.shape == (7, 6, 128)
    torch.testing.assert_close(emb.samples.norm(dim=-1), torch.ones(7, 6))
    torch.testing.assert_close(emb.mean, F.normalize(emb.samples.mean(0), dim=-1))
    torch.testing.assert_close(emb.uncertainty, emb.samples.std(0).sum(-1))
    # The weight draws are fixed per evaluation: a second call (another batch) uses the same draws.
    again = method.embed(x, samples=7)
    assert torch.equal(again.samples, emb.samples)
    single = method.embed(x[:2], samples=7)
    torch.testing.assert_close(single.samples, emb.samples[:, :2])
    assert method.embed(x).samples.shape[0] == method.cfg.eval_samples


def test_a_sharp_posterior_collapses_to_the_deterministic_embedding():
    method = _lam(posterior="online").eval()
    x = _views()[0]
    wide = method.embed(x, samples=8).uncertainty
    method.laplace.hessian.fill_(1e12)
    sharp = method.embed(x, samples=8)
    deterministic = F.normalize(method.embedding(method.backbone(x)), dim=-1)
    torch.testing.assert_close(sharp.mean, deterministic, atol=1e-4, rtol=0)
    assert (sharp.uncertainty < 1e-3 * wide).all()


def test_deterministic_and_mc_dropout_baselines():
    det = _lam(posterior="none").eval()
    x = _views()[0]
    emb = det.embed(x)
    assert emb.samples is None and torch.equal(emb.uncertainty, torch.zeros(6))

    drop = _lam(posterior="mc_dropout", dropout=0.2).eval()
    emb = drop.embed(x, samples=5)
    assert emb.samples.shape == (5, 6, 128) and (emb.uncertainty > 0).all()
    drop.cfg.dropout = 0.0
    assert torch.allclose(drop.embed(x, samples=5).uncertainty, torch.zeros(6), atol=1e-6)
    # Dropout is part of training too (it is the model whose posterior MC dropout approximates).
    drop.cfg.dropout = 0.5
    drop.train()
    torch.manual_seed(0)
    a = drop.loss(_views()).detach()
    torch.manual_seed(1)
    b = drop.loss(_views()).detach()
    assert not math.isclose(a.item(), b.item())


def test_deep_ensemble_members_differ_and_train_independently():
    torch.manual_seed(0)
    method = build_method("ensemble", build_backbone("convnet", 1, 8), {"size": 3})
    assert len(method.members) == 3 and method.backbone is method.members[0].backbone
    w = [m.backbone.features[0].weight for m in method.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])  # own initialisations
    views = _views()
    losses = [m.loss(views) for m in method.members]
    total = method.loss(views)
    torch.testing.assert_close(total, torch.stack(losses).sum())
    total.backward()
    # Each member's gradient is the gradient of its own loss alone.
    alone = build_method("ensemble", build_backbone("convnet", 1, 8), {"size": 3})
    alone.load_state_dict(method.state_dict())
    alone.members[1].loss(views).backward()
    torch.testing.assert_close(
        alone.members[1].embedding.weight.grad, method.members[1].embedding.weight.grad
    )
    method.eval()
    emb = method.embed(views[0])
    assert emb.samples.shape == (3, 6, 128)
    torch.testing.assert_close(emb.mean, F.normalize(emb.samples.mean(0), dim=-1))
    torch.testing.assert_close(emb.uncertainty, emb.samples.std(0).sum(-1))
    assert len({k.split(".")[0] for k in method.state_dict()}) == 1  # backbones registered once


@pytest.mark.parametrize("args", [{"size": 1}, {"member": "ensemble"}, {"member": "pixels"}])
def test_ensemble_config_errors(args):
    from probssl.config import ConfigError

    with pytest.raises(ConfigError):
        build_method("ensemble", build_backbone("convnet", 1, 8), args)


def test_posthoc_lam_trains_then_fits_its_hessian_in_one_extra_pass(tmp_path):
    import json

    from probssl.config import build_config
    from probssl.runs import load_run
    from probssl.train import train

    cfg = build_config(
        None,
        ["method.posterior=posthoc", "method.max_pairs=100", "backbone.width=8"],
        method="lam",
        data={"dataset": "digits", "subset": 128},
        train={"epochs": 2, "batch_size": 32, "progress": False, "tensorboard": False},
    )
    run = train(cfg, tmp_path / "run")
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["after_training_seconds"] > 0 and summary["seconds_per_epoch"] > 0
    method = load_run(run).method
    assert method.laplace.hessian.abs().sum() > 0  # saved with the final weights
    emb = method.embed(torch.zeros(4, 1, 8, 8))
    assert emb.samples.shape[0] == method.cfg.eval_samples and (emb.uncertainty > 0).all()


def test_hessian_is_float32_under_bf16_autocast():
    method = _lam(posterior="online")
    feats, labels = torch.randn(12, 128), image_identity_labels(6, 2, torch.device("cpu"))
    plain, _ = method.laplace.batch_hessian(feats, labels, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = method.laplace.batch_hessian(feats, labels, generator=torch.Generator().manual_seed(0))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)
