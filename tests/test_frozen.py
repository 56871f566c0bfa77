"""Frozen encoders (train.freeze_backbone): only heads train; BatchNorm fixed; features cached once."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from probssl.config import ConfigError, build_config
from probssl.data import MultiViewAugment, get_dataset_info, load_dataset
from probssl.data.views import PRESETS
from probssl.nn import build_backbone
from probssl.nn.frozen import freeze_backbone, is_frozen
from probssl.runs import build_model
from probssl.train import train

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """An encoder the user already has: a ConvNet with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    net = build_backbone("convnet", 1, 8, width=8)
    with torch.no_grad():
        for name, buffer in net.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("encoder") / "encoder.safetensors"
    save_file(net.state_dict(), path)
    return path


def _cfg(method: str, encoder, **method_args):
    return build_config(
        method=method,
        method_args=method_args,
        backbone="convnet",
        backbone_args={"width": 8, "weights": str(encoder)},
        data={"dataset": "digits", "subset": 128},
        train={
            "epochs": 2,
            "batch_size": 64,
            "progress": False,
            "tensorboard": False,
            "freeze_backbone": True,
        },
    )


@pytest.mark.parametrize(
    ("method", "args", "prefix"),
    [
        ("lam", {"posterior": "posthoc"}, "backbone."),
        ("vi_simsiam", {}, "backbone."),
        ("ensemble", {"size": 2}, "members.1.backbone."),
    ],
)
def test_frozen_backbone_is_bit_identical_after_training(
    tmp_path, encoder_file, method, args, prefix
) -> None:
    run = train(_cfg(method, encoder_file, **args), tmp_path / "run")
    given, trained = load_file(encoder_file), load_file(run / "model.safetensors")
    for key, value in given.items():  # weights and BatchNorm statistics alike
        assert torch.equal(trained[prefix + key], value), key
    heads = [
        k for k in trained if not k.startswith(("backbone.", "members.0.backbone.", "members.1.backbone."))
    ]
    assert heads  # and the heads did train: not one of them is left at its initialisation
    untrained = build_model(_cfg(method, encoder_file, **args), get_dataset_info("digits")).state_dict()
    changed = [k for k in heads if k in untrained and not torch.equal(untrained[k], trained[k])]
    assert changed


def test_frozen_means_no_gradient_and_eval_mode_whatever_train_says(encoder_file) -> None:
    method = build_model(_cfg("vi_simsiam", encoder_file), get_dataset_info("digits"))
    method.train()
    assert is_frozen(method.backbone) and not method.backbone.training and method.projector.training
    assert not any(p.requires_grad for p in method.backbone.parameters())
    views = [torch.randn(8, 1, 8, 8) for _ in range(2)]
    method(views).backward()
    assert all(p.grad is None for p in method.backbone.parameters())
    assert all(p.grad is not None for p in method.kappa_head.parameters())


def test_features_are_computed_once_without_augmentation(encoder_file) -> None:
    cfg = _cfg("lam", encoder_file, posterior="posthoc")
    cfg.data.views = "none"
    info = get_dataset_info("digits")
    method = build_model(cfg, info)
    cache = method.backbone.feature_cache
    assert cache is not None  # no augmentation: every view of an image is the image itself
    augment = MultiViewAugment(PRESETS["none"], info.image_size, info.channels, info.mean, info.std)
    images = load_dataset("digits", "train").images[:32]
    for _ in range(3):  # three "epochs" over the same 32 images, two views each
        method.loss(augment(images))
    assert (cache.misses, cache.hits, len(cache)) == (32, 5 * 32, 32)
    reference = build_backbone("convnet", 1, 8, width=8, weights=str(encoder_file)).eval()
    with torch.no_grad():
        expected = reference(augment(images)[0])
    torch.testing.assert_close(method.backbone(augment(images)[0]), expected, atol=0, rtol=0)
    augmented = _cfg("lam", encoder_file, posterior="posthoc")  # the dataset's own random views
    assert build_model(augmented, info).backbone.feature_cache is None


def test_a_posterior_over_the_encoder_cannot_be_frozen(encoder_file) -> None:
    with pytest.raises(ConfigError, match="leaves csghmc nothing to sample"):
        build_model(_cfg("csghmc", encoder_file), get_dataset_info("digits"))


def test_freezing_twice_keeps_one_frozen_class() -> None:
    net = freeze_backbone(freeze_backbone(build_backbone("mlp", 1, 8, hidden_dim=4)))
    assert type(net).__name__ == "FrozenMLPBackbone" and type(net).__mro__[2].__name__ == "MLPBackbone"
