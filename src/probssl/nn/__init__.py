"""Backbones (a registry) and the small MLP heads methods are built from."""

from probssl.nn import vit  # noqa: F401  (registers vit_tiny, vit_small, vit_base)
from probssl.nn.backbones import BACKBONES, build_backbone
from probssl.nn.heads import mlp

__all__ = ["BACKBONES", "build_backbone", "mlp"]
