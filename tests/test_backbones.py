"""Backbones (shapes, norms, memory format, the CIFAR stem) and the MLP head builder."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from probssl.cli import main
from probssl.config import ConfigError
from probssl.nn.backbones import BACKBONES, build_backbone
from probssl.nn.heads import mlp

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


def _count(module: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize(
    ("name", "size", "channels", "batch"),
    [
        ("convnet", 8, 1, 4),
        ("mlp", 8, 1, 4),
        ("convnet", 28, 1, 4),
        ("mlp", 28, 1, 4),
        ("resnet18", 28, 1, 2),
        ("resnet18", 32, 3, 2),
        ("resnet50", 32, 3, 2),
    ],
)
def test_backbone_output_shape(name: str, size: int, channels: int, batch: int) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, channels, size)
    assert isinstance(net.out_dim, int)
    assert net.out_dim == {"resnet18": 512, "resnet50": 2048, "convnet": 128, "mlp": 256}[name]
    out = net(torch.randn(batch, channels, size, size))
    assert out.shape == (batch, net.out_dim)
    assert torch.isfinite(out).all()


def test_registered_names_and_out_dims() -> None:
    assert {"resnet18", "resnet50", "convnet", "mlp"} <= set(BACKBONES.names())
    assert build_backbone("resnet18", 3, 32).out_dim == 512
    assert build_backbone("convnet", 1, 28).out_dim == 128
    assert build_backbone("convnet", 1, 28, width=8).out_dim == 32
    assert build_backbone("mlp", 1, 8, hidden_dim=64).out_dim == 64
    assert build_backbone("mlp", 1, 8, hidden_dim=64, out_dim=16).out_dim == 16


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize(("name", "size"), [("convnet", 8), ("mlp", 8), ("resnet18", 16)])
def test_norm_variants(name: str, size: int, norm: str) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, 1, size, norm=norm)
    batch_norms = _count(net, (nn.BatchNorm1d, nn.BatchNorm2d))
    group_norms = _count(net, nn.GroupNorm)
    assert (batch_norms > 0) == (norm == "batch")
    assert (group_norms > 0) == (norm == "group")
    x = torch.randn(3, 1, size, size)
    out = net(x)
    assert out.shape == (3, net.out_dim) and torch.isfinite(out).all()
    if norm != "batch":
        # No batch statistics: each sample's embedding is independent of the rest of the batch, even in
        # train mode (what distributed tests without SyncBatchNorm rely on).
        torch.testing.assert_close(net(x[:1]), out[:1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("name", "size"), [("convnet", 28), ("resnet18", 16), ("mlp", 8)])
def test_channels_last_input_gives_same_output(name: str, size: int) -> None:
    torch.manual_seed(0)
    net = build_backbone(name, 3, size).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = net(x)
        out = net(x.contiguous(memory_format=torch.channels_last))
        out_cl_model = net.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)
        )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out_cl_model, ref, atol=1e-5, rtol=1e-4)


def test_resnet_has_cifar_stem() -> None:
    net = build_backbone("resnet18", 3, 32)
    first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
    assert first.kernel_size == (3, 3) and first.stride == (1, 1) and first.in_channels == 3
    assert _count(net, (nn.MaxPool2d, nn.AvgPool2d, nn.Linear)) == 0
    # The stem keeps full resolution: the first stage still sees 32x32.
    features = net.stem(torch.randn(1, 3, 32, 32))
    assert features.shape[-2:] == (32, 32)


def test_resnet18_parameter_count() -> None:
    params = sum(p.numel() for p in build_backbone("resnet18", 3, 32).parameters())
    assert abs(params - 11_168_832) / 11_168_832 < 0.001


def _resnet18_params_by_hand(in_ch: int, w: int) -> int:
    """ResNet-18 (BatchNorm, bias-free convs) counted layer by layer: 3x3 conv a->b has 9ab weights, a
    BatchNorm over c channels 2c, a projection shortcut a->b a 1x1 conv (ab) plus its BatchNorm."""
    total = 9 * in_ch * w + 2 * w  # stem
    c_in = w
    for stage in range(4):
        c = w * 2**stage
        for block in range(2):
            a = c_in if block == 0 else c
            total += 9 * a * c + 2 * c + 9 * c * c + 2 * c
            if a != c:  # stages 2-4 open with a stride-2 block whose shortcut projects
                total += a * c + 2 * c
        c_in = c
    return total


@pytest.mark.parametrize("width", [8, 16, 32, 64])
def test_resnet18_width_scales_every_stage(width: int) -> None:
    net = build_backbone("resnet18", 3, 32, width=width)
    assert sum(p.numel() for p in net.parameters()) == _resnet18_params_by_hand(3, width)
    assert net.out_dim == 8 * width
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 8 * width)
    stage_channels = [stage[-1].conv2.out_channels for stage in net.stages]
    assert stage_channels == [width, 2 * width, 4 * width, 8 * width]


def test_resnet_default_width_is_the_published_net() -> None:
    """width=64 is the default, so checkpoints written before the option existed load as before."""
    default, narrow = build_backbone("resnet18", 3, 32), build_backbone("resnet18", 3, 32, width=16)
    assert _resnet18_params_by_hand(3, 64) == 11_168_832
    assert net_shapes(default) == net_shapes(build_backbone("resnet18", 3, 32, width=64))
    assert net_shapes(default)["stem.0.weight"] == (64, 3, 3, 3)
    assert net_shapes(narrow).keys() == net_shapes(default).keys()  # same layers, fewer channels
    assert build_backbone("resnet50", 3, 32, width=16).out_dim == 16 * 4 * 8
    with pytest.raises(ValueError, match="width must be >= 1"):
        build_backbone("resnet18", 3, 32, width=0)


def net_shapes(net: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_zero_init_residual_makes_blocks_identity_at_init() -> None:
    net = build_backbone("resnet18", 3, 16, norm="none")
    block = net.stages[0][0]  # identity shortcut, stride 1
    x = torch.rand(2, 64, 8, 8)  # non-negative, as after the stem's ReLU
    torch.testing.assert_close(block(x), x)
    plain = build_backbone("resnet18", 3, 16, zero_init_residual=False)
    assert any(m.weight.abs().sum() > 0 for m in plain.modules() if isinstance(m, nn.BatchNorm2d))


def test_convnet_downsampling_adapts_to_image_size() -> None:
    for size, expected in [(8, 4), (28, 4), (32, 4), (4, 4)]:
        net = build_backbone("convnet", 1, size)
        assert net.features(torch.randn(2, 1, size, size)).shape[-1] == expected


def test_mlp_backbone_resizes_other_view_sizes() -> None:
    net = build_backbone("mlp", 1, 8, hidden_dim=32)
    assert net(torch.randn(4, 1, 4, 4)).shape == (4, 32)


def test_build_errors_are_clear() -> None:
    with pytest.raises(
        KeyError, match="convnet, flat_cnn, mlp, resnet18, resnet50, vit_base, vit_small, vit_tiny"
    ):
        build_backbone("vit_huge", 3, 32)
    with pytest.raises(ConfigError, match="valid keys in backbone: width, num_stages, norm, weights"):
        build_backbone("convnet", 1, 28, widht=16)
    with pytest.raises(ValueError, match="batch, group, none"):
        build_backbone("resnet18", 3, 32, norm="layer")


@pytest.mark.parametrize(
    ("name", "option", "message"),
    [
        ("resnet18", {"stem": "imagenett"}, r"backbone.stem='imagenett' is not one of auto, cifar, imagenet"),
        ("resnet18", {"width": -3}, r"backbone.width must be >= 1, got -3"),
        ("resnet50", {"width": "wide"}, r"backbone.width must be an integer, got 'wide'"),
        ("resnet18", {"zero_init_residual": "yes"}, r"backbone.zero_init_residual must be true or false"),
        ("convnet", {"num_stages": 0}, r"backbone.num_stages must be >= 1, got 0"),
        ("convnet", {"stem": "imagenet"}, r"unknown config key 'backbone.stem'; valid keys in backbone: "),
        ("mlp", {"hidden_dim": -1}, r"backbone.hidden_dim must be >= 1"),
        (
            "vit_tiny",
            {"patch_size": 5},
            r"backbone.patch_size=5 does not divide the image size 32; use one of",
        ),
        ("vit_tiny", {"pool": "max"}, r"backbone.pool='max' is not one of cls, mean"),
        ("vit_tiny", {"drop_path": 1.5}, r"backbone.drop_path must lie in \[0, 1\)"),
    ],
)
def test_every_backbone_option_is_validated_like_method_options(name, option, message) -> None:
    """Issue 30.14: a wrong key or value is one ConfigError line naming the key, never a traceback."""
    with pytest.raises(ConfigError, match=message):
        build_backbone(name, 3, 32, **option)


def test_cli_backbone_options_are_one_error_line_before_any_data_is_read(tmp_path, capsys) -> None:
    """Issue 30.14 as the user met it: `backbone.stem=...` and `backbone.width=-3` printed tracebacks."""
    out = tmp_path / "run"
    for override, message in [
        ("backbone.stemm=imagenet", "unknown config key 'backbone.stemm'; valid keys in backbone: norm, "),
        ("backbone.width=wide", "backbone.width must be an integer, got 'wide'"),
        ("backbone.width=-3", "backbone.width must be >= 1, got -3"),
    ]:
        args = ["train", "--method", "simclr", "--dataset", "digits", "--backbone", "resnet18", override]
        assert main([*args, "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_imagenet_stem_is_the_standard_one(name: str) -> None:
    """7x7 stride-2 conv + 3x3 stride-2 max-pool: a 224-px image reaches the first stage at 56 px."""
    net = build_backbone(name, 3, 224, stem="imagenet", width=8)
    conv, _, _, pool = net.stem
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(pool, nn.MaxPool2d) and (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    assert net.stem(torch.randn(1, 3, 224, 224)).shape[-2:] == (56, 56)
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, net.out_dim)


@pytest.mark.parametrize(
    ("size", "expected"), [(8, "cifar"), (32, "cifar"), (64, "cifar"), (65, "imagenet"), (96, "imagenet")]
)
def test_stem_auto_picks_by_image_size_and_records_it(size: int, expected: str) -> None:
    net = build_backbone("resnet18", 3, size, width=8)  # stem=auto is the default
    assert net.options["stem"] == expected
    assert net.stem[0].kernel_size == ((3, 3) if expected == "cifar" else (7, 7))
    explicit = build_backbone("resnet18", 3, size, width=8, stem="cifar")
    assert explicit.options == {"norm": "batch", "zero_init_residual": True, "width": 8, "stem": "cifar"}


def test_cifar_stem_keeps_full_resolution_at_224_px() -> None:
    """The cost the wrong stem adds: the CIFAR stem keeps 224 px into stage 1, 16x the positions of 56 px."""
    cifar = build_backbone("resnet18", 3, 224, stem="cifar", width=8)
    imagenet = build_backbone("resnet18", 3, 224, stem="imagenet", width=8)
    x = torch.randn(1, 3, 224, 224)
    assert cifar.stem(x).shape[-2:] == (224, 224) and imagenet.stem(x).shape[-2:] == (56, 56)
    same_stages = [k for k in cifar.state_dict() if not k.startswith("stem.0")]
    assert all(cifar.state_dict()[k].shape == imagenet.state_dict()[k].shape for k in same_stages)


def test_backward_reaches_every_parameter() -> None:
    net = build_backbone("convnet", 1, 8, norm="group")
    net(torch.randn(4, 1, 8, 8)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ----------------------------------------------------------------------------------------------- heads


def _kinds(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


def test_mlp_two_layer_projector() -> None:
    head = mlp([16, 32, 8])
    assert _kinds(head) == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head[0].bias is None  # cancelled by the BN anyway
    assert head[3].bias is not None and head[3].out_features == 8
    assert head(torch.randn(4, 16)).shape == (4, 8)


def test_mlp_simsiam_projector_and_predictor() -> None:
    projector = mlp([16, 32, 32, 8], last_batch_norm=True, last_affine=False, last_bias=False)
    assert _kinds(projector) == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert projector[-1].affine is False and projector[-2].bias is None
    predictor = mlp([8, 2, 8])
    assert [m.out_features for m in predictor if isinstance(m, nn.Linear)] == [2, 8]


def test_mlp_without_batch_norm_and_errors() -> None:
    head = mlp([4, 6, 6, 2], batch_norm=False)
    assert _kinds(head) == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert all(m.bias is not None for m in head if isinstance(m, nn.Linear))
    assert _kinds(mlp([4, 2])) == ["Linear"]
    with pytest.raises(ValueError, match="at least"):
        mlp([4])


def test_flat_cnn_is_the_released_lam_encoder() -> None:
    """Two valid 3x3 convs (32, 64), 2x2 max-pool, flattened: 64 · 12 · 12 = 9216 features at 28 px,
    the input of LAM's Fashion-MNIST embedding layer; its parameters are the two convs' alone."""
    net = build_backbone("flat_cnn", 1, 28)
    out = net(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 9216) == (3, net.out_dim)
    assert sum(p.numel() for p in net.parameters()) == (1 * 9 + 1) * 32 + (32 * 9 + 1) * 64
    assert build_backbone("flat_cnn", 3, 32, width=8)(torch.randn(2, 3, 32, 32)).shape == (2, 16 * 14 * 14)
    assert build_backbone("flat_cnn", 1, 8, width=4).out_dim == 8 * 2 * 2
