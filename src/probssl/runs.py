"""Building a method from a config, and loading a finished (or interrupted) run back."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from probssl.backbone_choice import WEIGHTS_KEY, chosen_backbone, stored_backbone
from probssl.checkpoint import load_model_state
from probssl.config import ConfigError, RunConfig, config_from_dict, load_yaml
from probssl.data import DatasetInfo, get_dataset_info
from probssl.methods import SSLMethod, build_method
from probssl.nn import build_backbone
from probssl.nn.frozen import freeze_backbone

DATASET_INFO_FILE = "dataset_info.json"  # the DatasetInfo a run was trained with (own folders: computed)


def dataset_info_from_json(path: str | Path) -> DatasetInfo:
    raw = json.loads(Path(path).read_text())
    return DatasetInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def run_dataset_info(run_dir: str | Path, cfg: RunConfig) -> DatasetInfo:
    """The DatasetInfo stored with the run; runs from before it was stored used a registered dataset."""
    path = Path(run_dir) / DATASET_INFO_FILE
    return dataset_info_from_json(path) if path.is_file() else get_dataset_info(cfg.data.dataset)


def resolve_backbone(cfg: RunConfig, info: DatasetInfo, device: torch.device | str | None = None) -> str:
    """The backbone a new run of ``cfg`` builds on ``device``: ``auto`` resolved
    (:func:`probssl.backbone_choice.auto_backbone`)."""
    return chosen_backbone(cfg, info, device, init=_init_backbone(cfg))[0]


def _init_backbone(cfg: RunConfig) -> tuple[str, dict] | None:
    """The encoder of the run ``backbone.weights`` names (``--init RUN``), so that its weights fit."""
    weights = cfg.backbone_args.get(WEIGHTS_KEY)
    run = Path(str(weights)).expanduser() if weights is not None else None
    if run is None or not (run / "config.yaml").is_file():
        return None
    other = config_from_dict(load_yaml(run / "config.yaml"))
    return stored_backbone(run, other, run_dataset_info(run, other))


def build_run_backbone(
    cfg: RunConfig,
    info: DatasetInfo,
    device: torch.device | str | None = None,
    run_dir: str | Path | None = None,
    load_weights: bool = True,
    announce: bool = False,
) -> nn.Module:
    """The encoder of a run: the one stored with ``run_dir`` when it is a run (resume, evaluation), else
    the one the config chooses for ``device``, with ``backbone.weights`` loaded when ``load_weights``
    (``announce``: their report on stderr). ``.record`` is what the run stores (``backbone.json``)."""
    if run_dir is not None and (Path(run_dir) / "config.yaml").is_file():
        name, options = stored_backbone(run_dir, cfg, info)
    else:
        name, options = chosen_backbone(cfg, info, device, init=_init_backbone(cfg))
    weights = cfg.backbone_args.get(WEIGHTS_KEY)
    if weights is not None and load_weights:
        options[WEIGHTS_KEY] = weights
    net = build_backbone(name, info.channels, info.image_size, **options)
    report = getattr(net, "weights_report", None)
    if report is not None and announce:
        print("\n".join(report.lines()), file=sys.stderr)
    net.record = {
        "name": name,
        "options": dict(net.options),
        "weights": report.to_json() if report is not None else None,
        "frozen": cfg.train.freeze_backbone,
    }
    net.pretrained = weights is not None  # copies of it (an ensemble's members) keep the weights
    return net


def _augmentation_is_fixed(cfg: RunConfig, info: DatasetInfo) -> bool:
    from probssl.data import preset_for_dataset
    from probssl.data.views import PRESETS

    preset = cfg.data.views or preset_for_dataset(cfg.data.dataset, info.channels, info.image_size)
    return preset in PRESETS and PRESETS[preset].deterministic


def build_model(
    cfg: RunConfig,
    info: DatasetInfo | None = None,
    device: torch.device | str | None = None,
    backbone: nn.Module | None = None,
    training: bool = True,
) -> SSLMethod:
    """The method of ``cfg`` on ``backbone`` (default: the one the config chooses for ``device``, with
    its ``backbone.weights``), frozen with ``train.freeze_backbone`` (caching features for training
    without augmentation; ``training=False`` for a run loaded to be evaluated, which needs no cache)."""
    info = info or get_dataset_info(cfg.data.dataset)
    if backbone is None:
        backbone = build_run_backbone(cfg, info, device)
    if cfg.train.freeze_backbone:
        freeze_backbone(backbone, cache_features=training and _augmentation_is_fixed(cfg, info))
    method = build_method(cfg.method, backbone, cfg.method_args)
    if cfg.train.freeze_backbone and method.posterior_over_backbone:
        raise ConfigError(
            f"train.freeze_backbone=true leaves {cfg.method} nothing to sample: its posterior is over the "
            "encoder's weights. Freeze with a method whose uncertainty lives in its heads (lam, vi_simsiam, "
            "prosmin, scl, ensemble)"
        )
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
    # the stored encoder; backbone.weights are not read: the run's own weights replace them below
    backbone = build_run_backbone(cfg, info, run_dir=run_dir, load_weights=False)
    method = build_model(cfg, info, backbone=backbone, training=False)
    state, meta = load_model_state(run_dir, step)
    method.load_state_dict(state)
    method = method.to(device).eval()
    method.attach_run(run_dir, up_to_step=step)
    return LoadedRun(run_dir=run_dir, config=cfg, method=method, weights_meta=meta, info=info)
