"""Encoders ("backbones") mapping images [B, C, H, W] to representations [B, out_dim].

Written here rather than taken from torchvision (not a dependency) and shaped for the small images SSL
research uses: the ResNets have the CIFAR stem (3x3 stride-1 conv, no max-pool) because the ImageNet stem
would shrink a 32x32 image to 8x8 before the first residual stage.

Every builder takes ``norm`` in {"batch", "group", "none"}: BatchNorm is the default, but it couples the
samples of a batch (and needs SyncBatchNorm, CUDA-only, to be exact across processes), so tests of
distributed training and per-sample uncertainty use "group" or "none".
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

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
    "build_backbone",
]

BACKBONES: Registry[Callable[..., nn.Module]] = Registry("backbone")

NORMS = ("batch", "group", "none")


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm '{norm}'; valid norms: {', '.join(NORMS)}")


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


class ResNet(nn.Module):
    """CIFAR-stem ResNet without the classifier: stem, four stages (64-128-256-512 widths), global avg pool.

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
    ) -> None:
        super().__init__()
        _check_norm(norm)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.stem = nn.Sequential(
            conv3x3(in_channels, width, 1, bias=norm == "none"), norm_2d(norm, width), nn.ReLU()
        )
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
        if width < 1 or num_stages < 1:
            raise ValueError(f"width and num_stages must be >= 1, got {width}, {num_stages}")
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
) -> ResNet:
    """CIFAR ResNet-18, out_dim ``8 * width`` (512), ~11.17M parameters at width 64 (~0.70M at 16).
    ``image_size`` is unused: any size works."""
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels, norm, zero_init_residual, width)


@BACKBONES.register("resnet50")
def resnet50(
    in_channels: int,
    image_size: int,
    norm: str = "batch",
    zero_init_residual: bool = True,
    width: int = 64,
) -> ResNet:
    """CIFAR ResNet-50, out_dim ``32 * width`` (2048). ``image_size`` is unused: the net is size-agnostic."""
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels, norm, zero_init_residual, width)


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


def _check_kwargs(name: str, builder: Callable[..., nn.Module], kwargs: dict[str, object]) -> None:
    """Reject unknown options with the list of valid ones (a config typo must not be silently ignored)."""
    params = inspect.signature(builder).parameters
    accepted = [p for p in params if p not in ("in_channels", "image_size")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"backbone '{name}' got unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(accepted)}"
        )


def build_backbone(name: str, in_channels: int, image_size: int, **kwargs: object) -> nn.Module:
    """Build a registered backbone mapping [B, in_channels, H, W] -> [B, out_dim]; ``.out_dim`` is an int."""
    builder = BACKBONES.get(name)
    _check_kwargs(name, builder, kwargs)
    if in_channels < 1 or image_size < 1:
        raise ValueError(f"in_channels and image_size must be >= 1, got {in_channels}, {image_size}")
    return builder(in_channels, image_size, **kwargs)
