"""Vision Transformers (Dosovitskiy et al. 2021) as backbones: ``vit_tiny``, ``vit_small``, ``vit_base``.

Written with torch alone (attention is ``F.scaled_dot_product_attention``, which dispatches to the fused
kernels where they exist) rather than taken from timm, which cannot import beside the pinned CPU torch.
The module names are timm's (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N.norm1``,
``blocks.N.attn.qkv``, ``blocks.N.attn.proj``, ``blocks.N.mlp.fc1``, ``norm``, ``fc_norm``), and so is
the computation: pre-norm blocks, LayerNorm with eps 1e-6, exact GELU, a learnable CLS token and
learnable absolute position embeddings (the CLS token's included), the final norm on every token and
the CLS token's output as the representation (``pool="cls"``), or the mean of the patch tokens through
``fc_norm`` (``pool="mean"``, as timm's ``global_pool="avg"`` and MAE). A timm ViT's state dict
therefore loads unchanged and gives the same features (tested against timm in the vision environment).

Position embeddings are made for the grid of the image size the backbone is built for. An input of
another size (a multi-crop local view, or weights made at 224 px loaded at 96 px) gets them resampled
bicubically over the patch grid, the CLS position kept, as timm's ``resample_abs_pos_embed`` and DINO's
``interpolate_pos_encoding`` do.

Initialisation follows timm's default (and DINO's): truncated-normal (std 0.02) position embeddings and
Linear weights, zero biases, unit LayerNorms, the CLS token at N(0, 1e-6); the patch convolution keeps
PyTorch's default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probssl.config import ConfigError
from probssl.nn.backbones import BACKBONES

__all__ = [
    "POOLS",
    "VisionTransformer",
    "default_patch_size",
    "resample_position_embeddings",
    "vit_base",
    "vit_small",
    "vit_tiny",
]

POOLS = ("cls", "mean")
#: The smallest patch grid side ``patch_size=None`` allows: 224 px → 16 px patches (14 × 14), 32 px → 4 px
#: (8 × 8), 64 px → 8 px, 96 px → 8 px (12 × 12), 28 px → 4 px (7 × 7).
MIN_GRID = 7


def default_patch_size(image_size: int) -> int:
    """The largest of 16, 8, 4, 2, 1 px that divides ``image_size`` into at least ``MIN_GRID`` patches a
    side: the field's 16 px at 224 px and 4 px at 32 px (the CIFAR ViTs), in between by the same rule."""
    for patch in (16, 8, 4, 2):
        if image_size % patch == 0 and image_size // patch >= MIN_GRID:
            return patch
    return 1


def resample_position_embeddings(pos_embed: Tensor, grid: tuple[int, int], prefix_tokens: int = 1) -> Tensor:
    """[1, prefix + h·w, D] position embeddings (a square grid) resampled to ``grid`` (bicubic, antialiased
    when shrinking, as timm), the ``prefix_tokens`` (the CLS position) kept as they are."""
    prefix, patches = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise ValueError(f"position embeddings of {patches.shape[1]} patches are not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    dim = patches.shape[-1]
    image = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=tuple(grid), mode="bicubic", align_corners=False, antialias=True)
    patches = image.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, patches], dim=1)


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches, linearly embedded (a strided convolution): [B, N, D]."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv projection, ``scaled_dot_product_attention``, an output proj."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"the width {dim} does not split into {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def drop_path(x: Tensor, p: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): drop a residual branch per sample with probability ``p``,
    scaling the kept ones by 1 / (1 − p) so the expectation is unchanged."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); branches dropped per
    sample with probability ``drop_path`` while training."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class VisionTransformer(nn.Module):
    """ViT encoder without a classifier: [B, C, H, W] → [B, dim] (the CLS token's output, or the mean
    patch token). ``drop_path`` is the stochastic-depth rate of the last block, rising linearly from 0
    over the depth (timm, DINO)."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        dim: int,
        depth: int,
        num_heads: int,
        patch_size: int,
        pool: str = "cls",
        drop_path: float = 0.0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"backbone.pool={pool!r} is not one of {', '.join(POOLS)}")
        if not 0.0 <= drop_path < 1.0:
            raise ConfigError(f"backbone.drop_path must lie in [0, 1), got {drop_path}")
        if patch_size < 1 or image_size % patch_size:
            divisors = [p for p in range(1, image_size // 2 + 1) if image_size % p == 0]
            raise ConfigError(
                f"backbone.patch_size={patch_size} does not divide the image size {image_size}; use one of "
                f"{', '.join(map(str, divisors))}, or leave it unset ({default_patch_size(image_size)} here)"
            )
        self.out_dim: int = dim
        self.pool = pool
        self.grid = image_size // patch_size
        self.resolved = {"patch_size": patch_size}  # what ``patch_size=None`` became, stored with a run
        self.patch_embed = PatchEmbed(in_channels, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, dim))
        rates = torch.linspace(0, drop_path, depth, device="cpu").tolist()  # plain numbers, on any device
        self.blocks = nn.Sequential(*(Block(dim, num_heads, mlp_ratio, rate) for rate in rates))
        self.norm = nn.LayerNorm(dim, eps=1e-6) if pool == "cls" else nn.Identity()
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if pool == "mean" else nn.Identity()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def position_embeddings(self, grid: tuple[int, int]) -> Tensor:
        """The position embeddings for a ``grid`` of patches (resampled when it is not the built one)."""
        if grid == (self.grid, self.grid):
            return self.pos_embed
        return resample_position_embeddings(self.pos_embed, grid)

    def adapt_weight(self, key: str, tensor: Tensor) -> Tensor:
        """Weights loading: position embeddings made for another image size fit this one's grid."""
        if key == "pos_embed" and tensor.dim() == 3 and tensor.shape != self.pos_embed.shape:
            return resample_position_embeddings(tensor, (self.grid, self.grid))
        return tensor

    def forward(self, x: Tensor) -> Tensor:
        patch = self.patch_embed.patch_size
        height, width = x.shape[-2:]
        if height % patch or width % patch:
            raise ValueError(f"a {height}x{width} input does not split into {patch}-px patches")
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.position_embeddings((height // patch, width // patch))
        tokens = self.norm(self.blocks(tokens))
        if self.pool == "cls":
            return tokens[:, 0]
        return self.fc_norm(tokens[:, 1:].mean(dim=1))


def _vit(
    in_channels: int,
    image_size: int,
    dim: int,
    depth: int,
    heads: int,
    patch_size: int | None,
    pool: str,
    drop_path: float,
) -> VisionTransformer:
    patch = default_patch_size(image_size) if patch_size is None else patch_size
    return VisionTransformer(in_channels, image_size, dim, depth, heads, patch, pool, drop_path)


@BACKBONES.register("vit_tiny")
def vit_tiny(
    in_channels: int,
    image_size: int,
    patch_size: int | None = None,
    pool: str = "cls",
    drop_path: float = 0.0,
) -> VisionTransformer:
    """ViT-Ti: width 192, 12 blocks, 3 heads (5.5M parameters at 16-px patches); out_dim 192.
    ``patch_size=None`` picks it from the image size (:func:`default_patch_size`)."""
    return _vit(in_channels, image_size, 192, 12, 3, patch_size, pool, drop_path)


@BACKBONES.register("vit_small")
def vit_small(
    in_channels: int,
    image_size: int,
    patch_size: int | None = None,
    pool: str = "cls",
    drop_path: float = 0.0,
) -> VisionTransformer:
    """ViT-S: width 384, 12 blocks, 6 heads (21.7M parameters at 16-px patches, 224 px); out_dim 384."""
    return _vit(in_channels, image_size, 384, 12, 6, patch_size, pool, drop_path)


@BACKBONES.register("vit_base")
def vit_base(
    in_channels: int,
    image_size: int,
    patch_size: int | None = None,
    pool: str = "cls",
    drop_path: float = 0.0,
) -> VisionTransformer:
    """ViT-B: width 768, 12 blocks, 12 heads (85.8M parameters at 16-px patches, 224 px); out_dim 768."""
    return _vit(in_channels, image_size, 768, 12, 12, patch_size, pool, drop_path)
