"""All methods, behind one registry and the ``Embedding`` interface.

Every module of this package is imported here, so a method registers itself by existing: a new
method is one file (``@METHODS.register("name")``), its test and its section of docs/methods.md
(docs/adding_a_method.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from probssl.config import method_config
from probssl.methods.base import MethodConfig, SSLMethod, TrainContext
from probssl.methods.registry import METHODS


def _import_every_method() -> None:
    """Import each module of the package (in file-name order) for its ``METHODS.register`` side effect."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


_import_every_method()


def build_method(name: str, backbone: nn.Module, args: dict[str, Any] | None = None) -> SSLMethod:
    """Instantiate a registered method with validated hyper-parameters."""
    method_cls = METHODS.get(name)
    cfg = method_config(method_cls.config_class, args or {}, name)
    return method_cls(backbone, cfg)


__all__ = ["METHODS", "MethodConfig", "SSLMethod", "TrainContext", "build_method"]
