"""Encoders ("backbones") mapping images [B, C, H, W] to representations [B, out_dim].

Written here rather than taken from torchvision (not a dependency). The ResNets have two stems: the
CIFAR stem (3x3 stride-1 conv, no max-pool) for small images, because the ImageNet stem would shrink a
32x32 image to 8x8 before the first residual stage, and the ImageNet stem (7x7 stride-2 conv, 3x3
stride-2 max-pool) for larger ones, where the CIFAR stem costs 16x the FLOPs and fits no published
weights. ``stem=auto`` picks by the image size (:func:`resolve_stem`).

Every builder takes ``norm`` in {"batch", "group", "none"}: BatchNorm is the default, but it couples the
samples of a batch (and needs SyncBatchNorm, CUDA-only, to be exact across processes), so tests of
distributed training and per-sample uncertainty use "group" or "none".
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from probssl.config import ConfigError, _coerce
from probssl.registry import Registry

__all__ = [
    "BACKBONES",
    "NORMS",
    "BasicBlock",
    "Bottleneck",
    "ConvNet",
    "FlatCNN",
    "MLPBackbone",
    "ResNet",
    "STEMS",
    "backbone_option_names",
    "build_backbone",
    "resolve_stem",
]

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")

NORMS = ("batch", "group", "none")
STEMS = ("auto", "cifar", "imagenet")
#: ``stem=auto`` keeps the CIFAR stem up to this side (a 64-px image still has an 8x8 map in the last
#: stage) and takes the ImageNet stem above it, as the field does for 96-px STL-10 and 224-px ImageNet.
CIFAR_STEM_MAX_SIZE = 64


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ConfigError(f"backbone.norm={norm!r} is not one of {', '.join(NORMS)}")


def _check_positive(**values: int | None) -> None:
    for key, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"backbone.{key} must be >= 1, got {value}")


def resolve_stem(stem: str, image_size: int) -> str:
    """``cifar`` | ``imagenet`` for a ResNet's ``stem`` option; ``auto`` picks by the image size."""
    if stem not in STEMS:
        raise ConfigError(f"backbone.stem={stem!r} is not one of {', '.join(STEMS)}")
    if stem != "auto":
        return stem
    return "cifar" if image_size <= CIFAR_STEM_MAX_SIZE else "imagenet"


def _group_count(channels: int) -> int:
    """Largest of 32, 16, ..., 1 groups that divides ``channels`` and leaves >= 2 channels per group
    (a 1-channel group is InstanceNorm, which erases per-channel contrast on tiny feature maps)."""
    for groups in (32, 16, 8, 4, 2):
        if channels % groups == 0 and channels // groups >= 2:
            return groups
    return 1


def norm_2d(norm: str, channels: int) -> nn.Module:
    """Normalisation layer for conv features [B, C, H, W]."""
    _check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(_group_count(channels), channels)
    return nn.Identity()


def norm_1d(norm: str, features: int) -> nn.Module:
    """Normalisation layer for flat features [B, F] (GroupNorm accepts [B, C] directly)."""
    _check_norm(norm)
    if norm == "batch":
        return nn.BatchNorm1d(features)
    if norm == "group":
        return nn.GroupNorm(_group_count(features), features)
    return nn.Identity()


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal (fan_out, ReLU) convs as in the ResNet paper; norms start as the identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or 1x1 projection) shortcut: ResNet-18/34."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        out_ch = width * self.expansion
        self.conv1 = conv3x3(in_ch, width, stride, bias)
        self.norm1 = norm_2d(norm, width)
        self.conv2 = conv3x3(width, out_ch, 1, bias)
        self.norm2 = norm_2d(norm, out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)

    def last_layers(self) -> tuple[nn.Module, nn.Module]:
        return self.conv2, self.norm2


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's "ResNet v1.5"), 1x1 expand: ResNet-50."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        bias = norm == "none"
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=bias)
        self.norm1 = norm_2d(norm, width)
        self.conv2 = conv3x3(width, width, stride, bias)
        self.norm2 = norm_2d(norm, width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=bias)
        self.norm3 = norm_2d(norm, out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride, norm)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)), inplace=True)
        out = F.relu(self.norm2(self.conv2(out)), inplace=True)
        out = self.norm3(self.conv3(out))
        return F.relu(out + self.shortcut(x), inplace=True)

    def last_layers(self) -> tuple[nn.Module, nn.Module]:
        return self.conv3, self.norm3


def _shortcut(in_ch: int, out_ch: int, stride: int, norm: str) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=norm == "none"), norm_2d(norm, out_ch)
    )


def resnet_stem(kind: str, in_channels: int, width: int, norm: str) -> nn.Sequential:
    """``cifar``: 3x3 stride-1 conv, norm, ReLU (full resolution). ``imagenet``: 7x7 stride-2 conv, norm,
    ReLU, 3x3 stride-2 max-pool (a quarter of the side), exactly torchvision's ``conv1, bn1, relu,
    maxpool``, so its weights fit. The conv and norm are ``stem.0`` and ``stem.1`` in both."""
    bias = norm == "none"
    if kind == "cifar":
        return nn.Sequential(conv3x3(in_channels, width, 1, bias=bias), norm_2d(norm, width), nn.ReLU())
    if kind == "imagenet":
        return nn.Sequential(
            nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=bias),
            norm_2d(norm, width),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
    raise ConfigError(f"backbone.stem={kind!r} is not one of cifar, imagenet")


class ResNet(nn.Module):
    """ResNet without the classifier: stem, four stages (64-128-256-512 widths), global avg pool.

    ``width`` is the stem's and first stage's channel count (64 in the paper); the stages keep the
    1-2-4-8 ratio, so ``width=16`` gives 16-32-64-128 with ~1/16 of the parameters and FLOPs: the
    CPU-budget ResNet-18 (the default 64 is the published net, so older checkpoints load unchanged).

    ``zero_init_residual`` starts every residual branch at zero (its last norm's gamma, or its last conv when
    there is no norm), so each block is the identity at init: deep nets then train stably from the first
    step, which matters most for ``norm="none"`` where nothing else rescales the residual sum.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        in_channels: int,
        norm: str = "batch",
        zero_init_residual: bool = True,
        width: int = 64,
        stem: str = "cifar",
    ) -> None:
        super().__init__()
        _check_norm(norm)
        _check_positive(width=width)
        self.resolved = {"stem": stem}  # what ``stem=auto`` became, stored with a run
        self.stem = resnet_stem(stem, in_channels, width, norm)
        stages: list[nn.Module] = []
        in_ch = width
        stage_widths = (width, 2 * width, 4 * width, 8 * width)
        for i, (stage_width, depth) in enumerate(zip(stage_widths, layers, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(in_ch, stage_width, stride, norm))
                in_ch = stage_width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.out_dim: int = in_ch
        _init_weights(self)
        if zero_init_residual:
            self._zero_init_residual()

    def _zero_init_residual(self) -> None:
        for m in self.modules():
            if isinstance(m, BasicBlock | Bottleneck):
                conv, norm = m.last_layers()
                target = norm if isinstance(norm, nn.BatchNorm2d | nn.GroupNorm) else conv
                nn.init.zeros_(target.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return x.mean(dim=(2, 3))


def _num_halvings(image_size: int, num_stages: int) -> int:
    """How many 2x downsamplings bring the map to ~4x4: 8 -> 1, 28/32 -> 3 (capped at one per stage)."""
    if image_size <= 4:
        return 0
    return max(0, min(num_stages, round(math.log2(image_size / 4))))


class ConvNet(nn.Module):
    """Small conv-norm-ReLU encoder for 8x8 and 28x28 images: one 3x3 conv per stage, widths w, 2w, 4w, ...

    Downsampling is a stride-2 conv, placed in the *last* stages first, with as many halvings as bring the
    map to ~4x4: an 8x8 digit keeps full resolution for two stages (8, 8, 4), a 28x28 image is halved at every
    stage (14, 7, 4). Striding (rather than max-pooling a full-resolution map) keeps the per-pixel work of
    wide layers small, which is what dominates on CPU: fwd+bwd of 256 28x28 images costs ~80 ms of one core.
    """

    def __init__(
        self, in_channels: int, image_size: int, width: int = 32, num_stages: int = 3, norm: str = "batch"
    ) -> None:
        super().__init__()
        _check_norm(norm)
        _check_positive(width=width, num_stages=num_stages)
        halvings = _num_halvings(image_size, num_stages)
        layers: list[nn.Module] = []
        in_ch = in_channels
        for i in range(num_stages):
            out_ch = width * 2**i
            stride = 2 if i >= num_stages - halvings else 1
            layers += [conv3x3(in_ch, out_ch, stride, bias=norm == "none"), norm_2d(norm, out_ch), nn.ReLU()]
            in_ch = out_ch
        self.features = nn.Sequential(*layers)
        self.out_dim: int = in_ch
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x).mean(dim=(2, 3))


class FlatCNN(nn.Module):
    """Two valid 3x3 convs (``width``, ``2·width`` channels, ReLU), a 2x2 max-pool, flattened: no pooling
    to a vector, so out_dim = 2·width·((S − 4) // 2)² (9216 for 28x28 at width 32).

    Why: the encoder of LAM's released Fashion-MNIST / MNIST code (the feature extractor of PyTorch's
    MNIST example), which its paper's small-image numbers come from; the embedding layer LAM puts its
    posterior on is then a 9216-input linear map. No normalisation by default, as there.
    """

    def __init__(self, in_channels: int, image_size: int, width: int = 32, norm: str = "none") -> None:
        super().__init__()
        _check_norm(norm)
        if image_size < 6 or width < 1:
            raise ValueError(
                f"flat_cnn needs images of at least 6 px and width >= 1, got {image_size}, {width}"
            )
        bias = norm == "none"
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, bias=bias),
            norm_2d(norm, width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, bias=bias),
            norm_2d(norm, 2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.out_dim: int = 2 * width * ((image_size - 4) // 2) ** 2
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class MLPBackbone(nn.Module):
    """Flatten + two Linear-norm-ReLU layers: a tiny baseline and a fast encoder for tests.

    Its input size is fixed by ``image_size``; other sizes (multi-crop local views) are resized to it
    bilinearly, so every backbone accepts every view.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        hidden_dim: int = 256,
        out_dim: int | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        _check_norm(norm)
        _check_positive(hidden_dim=hidden_dim, out_dim=out_dim)
        self.image_size = image_size
        self.out_dim: int = out_dim if out_dim is not None else hidden_dim
        self.net = nn.Sequential(
            nn.Linear(in_channels * image_size * image_size, hidden_dim),
            norm_1d(norm, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, self.out_dim),
            norm_1d(norm, self.out_dim),
            nn.ReLU(),
        )
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return self.net(x.flatten(1))


@BACKBONES.register("resnet18")
def resnet18(
    in_channels: int,
    image_size: int,
    norm: str = "batch",
    zero_init_residual: bool = True,
    width: int = 64,
    stem: str = "auto",
) -> ResNet:
    """ResNet-18, out_dim ``8 * width`` (512), ~11.17M parameters at width 64 (~0.70M at 16).
    ``image_size`` only decides ``stem=auto``: any size works."""
    stem = resolve_stem(stem, image_size)
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels, norm, zero_init_residual, width, stem)


@BACKBONES.register("resnet50")
def resnet50(
    in_channels: int,
    image_size: int,
    norm: str = "batch",
    zero_init_residual: bool = True,
    width: int = 64,
    stem: str = "auto",
) -> ResNet:
    """ResNet-50 (v1.5), out_dim ``32 * width`` (2048). ``image_size`` only decides ``stem=auto``."""
    stem = resolve_stem(stem, image_size)
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels, norm, zero_init_residual, width, stem)


@BACKBONES.register("convnet")
def convnet(
    in_channels: int, image_size: int, width: int = 32, num_stages: int = 3, norm: str = "batch"
) -> ConvNet:
    """Small ConvNet, out_dim ``width * 2**(num_stages - 1)`` (128 by default)."""
    return ConvNet(in_channels, image_size, width, num_stages, norm)


@BACKBONES.register("flat_cnn")
def flat_cnn(in_channels: int, image_size: int, width: int = 32, norm: str = "none") -> FlatCNN:
    """LAM's small-image encoder: 2 convs + max-pool, flattened (out_dim 9216 at 28 px, width 32)."""
    return FlatCNN(in_channels, image_size, width, norm)


@BACKBONES.register("mlp")
def mlp_backbone(
    in_channels: int, image_size: int, hidden_dim: int = 256, out_dim: int | None = None, norm: str = "batch"
) -> MLPBackbone:
    """Flatten + 2-layer MLP, out_dim ``out_dim`` (defaults to ``hidden_dim``)."""
    return MLPBackbone(in_channels, image_size, hidden_dim, out_dim, norm)


def backbone_option_names(name: str) -> list[str]:
    """The ``backbone.*`` keys backbone ``name`` takes, in its signature's order (and ``weights``, which
    every backbone takes: a file of pretrained weights, :mod:`probssl.nn.weights`)."""
    params = inspect.signature(BACKBONES.get(name)).parameters
    return [p for p in params if p not in ("in_channels", "image_size")] + ["weights"]


def _checked_options(name: str, builder: Callable[..., nn.Module], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown options with the list of valid ones (a config typo must not be silently ignored) and
    values of the wrong type, as ``method.*`` options are: one :class:`ConfigError` line each."""
    accepted = backbone_option_names(name)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"unknown config key 'backbone.{unknown[0]}'; valid keys in backbone: "
            f"{', '.join(accepted) or '(none)'} (backbone '{name}')"
        )
    hints = typing.get_type_hints(builder)
    hints["weights"] = str
    return {key: _coerce(value, hints.get(key, Any), f"backbone.{key}") for key, value in kwargs.items()}


def check_backbone_options(name: str, options: dict[str, Any]) -> None:
    """The keys and value types of ``backbone.*`` for a named backbone, before anything is built (values
    that need the image size, such as a ViT's patch size, are checked when it is built; ``auto`` is
    checked once it is resolved)."""
    if name == "auto" or name.startswith("timm:"):
        return  # timm's own options are checked by timm when the model is created
    builder = BACKBONES.get(name)
    _checked_options(name, builder, options)


def resolved_options(name: str, net: nn.Module, given: dict[str, Any]) -> dict[str, Any]:
    """Every option of the built backbone, defaults filled in and ``auto`` values resolved: what a run
    stores so that it is rebuilt identically wherever and whenever it is loaded."""
    params = inspect.signature(BACKBONES.get(name)).parameters
    options = {k: p.default for k, p in params.items() if k not in ("in_channels", "image_size")}
    options.update(given)
    options.update(getattr(net, "resolved", {}))
    return options


def build_backbone(name: str, in_channels: int, image_size: int, **kwargs: object) -> nn.Module:
    """Build a registered backbone mapping [B, in_channels, H, W] -> [B, out_dim]; ``.out_dim`` is an int.

    ``.options`` holds every option it was built with, ``auto`` values resolved (:func:`resolved_options`).
    Bad options raise :class:`ConfigError` naming the ``backbone.*`` key.
    """
    if name.startswith("timm:"):
        from probssl.nn.timm_backbone import build_timm_backbone

        return build_timm_backbone(name.removeprefix("timm:"), in_channels, image_size, **kwargs)
    builder = BACKBONES.get(name)
    options = _checked_options(name, builder, dict(kwargs))
    weights = options.pop("weights", None)
    if in_channels < 1 or image_size < 1:
        raise ValueError(f"in_channels and image_size must be >= 1, got {in_channels}, {image_size}")
    net = builder(in_channels, image_size, **options)
    net.options = resolved_options(name, net, options)
    if weights is not None:
        from probssl.nn.weights import load_backbone_weights

        net.weights_report = load_backbone_weights(net, weights, name)
    return net
