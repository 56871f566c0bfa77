"""Which encoder a run trains, built with its options, weights and freezing, and stored with the run.

``backbone: auto`` picks by the images and by the device that trains them (a default has to fit the
machine: a full-width CIFAR-stem ResNet-18 at 64 px takes minutes per step on a laptop CPU):

- grey images up to 28 px: the small ConvNet (digits, MNIST, Fashion-MNIST);
- on a GPU: ResNet-18 with ``stem=auto`` (the CIFAR stem up to 64 px, the ImageNet stem above);
- on a CPU: ResNet-18 at width 16 with the CIFAR stem up to 32 px (the CPU-budget net, ~1/16 of the
  FLOPs), and the standard ResNet-18 with the ImageNet stem above 32 px, which at 64 px costs about as
  much as the narrow one at 32 px and is the architecture published weights are made for.

Whatever ``auto`` and the ``auto`` options (``stem``, ``patch_size``) became is written to
``RUN/backbone.json`` with the weights the run started from, and every later use of the run (resume,
eval, embed, export, ``--init``) rebuilds exactly that encoder, on whatever machine. Runs from before
the record existed were built by the old rule: the ConvNet for small grey images, otherwise the
CIFAR-stem ResNet-18.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from probssl.config import ConfigError, RunConfig
from probssl.data import DatasetInfo
from probssl.io import atomic_write_json

__all__ = [
    "BACKBONE_FILE",
    "auto_backbone",
    "chosen_backbone",
    "read_backbone_record",
    "stored_backbone",
    "write_backbone_record",
]

BACKBONE_FILE = "backbone.json"
WEIGHTS_KEY = "weights"  # backbone.weights=PATH: not an architecture option, loaded after building


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def auto_backbone(info: DatasetInfo, device: torch.device | str | None = None) -> tuple[str, dict[str, Any]]:
    """``backbone: auto`` for these images on this device: (name, options); module docstring."""
    if info.channels == 1 and info.image_size <= 28:
        return "convnet", {}
    if _device(device).type != "cpu":
        return "resnet18", {}
    if info.image_size <= 32:
        return "resnet18", {"width": 16, "stem": "cifar"}
    return "resnet18", {"stem": "imagenet"}


def _legacy_backbone(cfg: RunConfig, info: DatasetInfo) -> tuple[str, dict[str, Any]]:
    """How runs without a ``backbone.json`` were built: ``auto`` meant the ConvNet for small grey images
    and otherwise ResNet-18, and every ResNet had the CIFAR stem."""
    name = cfg.backbone
    if name == "auto":
        name = "convnet" if info.channels == 1 and info.image_size <= 28 else "resnet18"
    options = {k: v for k, v in cfg.backbone_args.items() if k != WEIGHTS_KEY}
    if name in ("resnet18", "resnet50"):
        options.setdefault("stem", "cifar")
    return name, options


def read_backbone_record(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``backbone.json`` ({name, options, weights, frozen}), ``None`` for older runs."""
    path = Path(run_dir) / BACKBONE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); restore it or retrain the run") from None
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise ConfigError(f"{path} is not a backbone record (no 'name'); restore it or retrain the run")
    return record


def stored_backbone(run_dir: str | Path, cfg: RunConfig, info: DatasetInfo) -> tuple[str, dict[str, Any]]:
    """(name, options) a run was trained with: its record, else the rule of its time."""
    record = read_backbone_record(run_dir)
    if record is None:
        return _legacy_backbone(cfg, info)
    return record["name"], dict(record.get("options") or {})


def chosen_backbone(
    cfg: RunConfig,
    info: DatasetInfo,
    device: torch.device | str | None = None,
    init: tuple[str, dict[str, Any]] | None = None,
) -> tuple[str, dict[str, Any]]:
    """(name, options) for a new run: ``auto`` resolved for the device (or, with ``init``, the encoder
    of the run whose weights it starts from, so they fit), the config's options on top."""
    options = {k: v for k, v in cfg.backbone_args.items() if k != WEIGHTS_KEY}
    if cfg.backbone != "auto":
        return cfg.backbone, options
    name, base = init if init is not None else auto_backbone(info, device)
    return name, {**base, **options}


def write_backbone_record(run_dir: str | Path, net: nn.Module) -> None:
    record = getattr(net, "record", None)
    if record is not None:
        atomic_write_json(Path(run_dir) / BACKBONE_FILE, record)
