"""Frozen encoders (``train.freeze_backbone=true``): only a method's heads train on a fixed backbone.

The question practitioners ask most is *how uncertain are the embeddings of the encoder I already use?*
Post-hoc LAM answers it by design, and the other methods' uncertainty heads (VI-SimSiam's κ, ProSMIN's σ,
SCL's latent, an ensemble's heads) can be trained on a fixed encoder too. Freezing here means:

- no gradient: every parameter has ``requires_grad=False`` (the optimiser never sees them) and the
  forward runs under ``torch.no_grad()`` (no activation memory, no backward through the encoder);
- fixed statistics: the backbone stays in eval mode whatever ``.train()`` its parent calls, so
  BatchNorm uses and keeps its running statistics;
- the same module: the class is swapped for a subclass in place (as ``torch.nn.utils.parametrize``
  does) rather than wrapped, so the state dict keeps its names and a run's weights load as before.

``cache_features=True`` memoises the features of each distinct input (by the bytes of the view): with a
deterministic augmentation (``data.views=none``) every image's features are computed once, in the first
epoch, and the heads train on the cached features afterwards. With random augmentations no view repeats,
so the cache is not used there.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["FeatureCache", "freeze_backbone", "is_frozen"]


class FeatureCache:
    """Features by the content of their input row: exact (bytes, not a similarity) and device-agnostic."""

    def __init__(self) -> None:
        self.rows: dict[bytes, Tensor] = {}
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _keys(x: Tensor) -> list[bytes]:
        flat = x.detach().to("cpu", torch.float32).contiguous().reshape(x.shape[0], -1).numpy()
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]

    def __call__(self, x: Tensor, compute: Any) -> Tensor:
        keys = self._keys(x)
        todo = [i for i, key in enumerate(keys) if key not in self.rows]
        if todo:
            fresh = compute(x[todo])
            for i, row in zip(todo, fresh, strict=True):
                self.rows[keys[i]] = row.detach()
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return torch.stack([self.rows[key] for key in keys])

    def __len__(self) -> int:
        return len(self.rows)


class _Frozen:
    """Mixed in before the backbone's own class by :func:`freeze_backbone`."""

    frozen = True

    def train(self, mode: bool = True) -> nn.Module:  # noqa: ARG002  (always eval: statistics stay fixed)
        return super().train(False)  # type: ignore[misc]

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            cache = getattr(self, "feature_cache", None)
            if cache is None:
                return super().forward(x)  # type: ignore[misc]
            return cache(x, super().forward)  # type: ignore[misc]


def is_frozen(net: nn.Module) -> bool:
    return bool(getattr(net, "frozen", False))


def freeze_backbone(net: nn.Module, cache_features: bool = False) -> nn.Module:
    """Freeze ``net`` in place (module docstring) and return it."""
    if not is_frozen(net):
        cls = type(net)
        net.__class__ = type(f"Frozen{cls.__name__}", (_Frozen, cls), {})
    net.requires_grad_(False)
    net.eval()
    net.feature_cache = FeatureCache() if cache_features else None
    return net
