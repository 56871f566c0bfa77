"""Building a method from a config, and loading a finished (or interrupted) run back."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from probssl.checkpoint import load_model_state
from probssl.config import RunConfig, config_from_dict, load_yaml
from probssl.data import DatasetInfo, get_dataset_info
from probssl.methods import SSLMethod, build_method
from probssl.nn import build_backbone

DATASET_INFO_FILE = "dataset_info.json"  # the DatasetInfo a run was trained with (own folders: computed)


def dataset_info_from_json(path: str | Path) -> DatasetInfo:
    raw = json.loads(Path(path).read_text())
    return DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def run_dataset_info(run_dir: str | Path, cfg: RunConfig) -> DatasetInfo:
    """The DatasetInfo stored with the run; runs from before it was stored used a registered dataset."""
    path = Path(run_dir) / DATASET_INFO_FILE
    return dataset_info_from_json(path) if path.is_file() else get_dataset_info(cfg.data.dataset)


def resolve_backbone(cfg: RunConfig, info: DatasetInfo) -> str:
    """``auto``: the small ConvNet for small grey images, a CIFAR-stem ResNet-18 otherwise."""
    if cfg.backbone != "auto":
        return cfg.backbone
    return "convnet" if info.channels == 1 and info.image_size <= 28 else "resnet18"


def build_model(cfg: RunConfig, info: DatasetInfo | None = None) -> SSLMethod:
    info = info or get_dataset_info(cfg.data.dataset)
    backbone = build_backbone(
        resolve_backbone(cfg, info), info.channels, info.image_size, **cfg.backbone_args
    )
    method = build_method(cfg.method, backbone, cfg.method_args)
    method.set_input_normalisation(info.mean, info.std)
    return method


def is_run_dir(path: str | Path) -> bool:
    """A directory ``probssl train`` wrote (``config.yaml``) or results were copied into (``eval.json``):
    what ``table`` and ``report`` accept."""
    path = Path(path)
    return (path / "config.yaml").is_file() or (path / "eval.json").is_file()


@dataclass
class LoadedRun:
    run_dir: Path
    config: RunConfig
    method: SSLMethod
    weights_meta: dict
    info: DatasetInfo  # channels, size and normalisation the run was trained with


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", step: int | None = None) -> LoadedRun:
    """Rebuild the run's method from its ``config.yaml`` and load its weights (eval mode).

    ``step`` picks a kept checkpoint instead of the final weights (learning curves).
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a probssl run directory (no config.yaml); "
            "pass the --out directory of a `probssl train` run"
        )
    cfg = config_from_dict(load_yaml(config_path))
    info = run_dataset_info(run_dir, cfg)
    method = build_model(cfg, info)
    state, meta = load_model_state(run_dir, step)
    method.load_state_dict(state)
    method = method.to(device).eval()
    method.attach_run(run_dir, up_to_step=step)
    return LoadedRun(run_dir=run_dir, config=cfg, method=method, weights_meta=meta, info=info)
