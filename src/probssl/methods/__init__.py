"""All methods, behind one registry and the ``Embedding`` interface."""

from __future__ import annotations

from typing import Any

from torch import nn

from probssl.config import method_config
from probssl.methods import (  # noqa: F401  (registration side effects)
    byol,
    csghmc,
    ensemble,
    lam,
    pixels,
    prosmin,
    scl,
    simclr,
    simsiam,
    vi_simsiam,
)
from probssl.methods.base import MethodConfig, SSLMethod, TrainContext
from probssl.methods.registry import METHODS


def build_method(name: str, backbone: nn.Module, args: dict[str, Any] | None = None) -> SSLMethod:
    """Instantiate a registered method with validated hyper-parameters."""
    method_cls = METHODS.get(name)
    cfg = method_config(method_cls.config_class, args or {}, name)
    return method_cls(backbone, cfg)


__all__ = ["METHODS", "MethodConfig", "SSLMethod", "TrainContext", "build_method"]
