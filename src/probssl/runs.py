"""Building a method from a config, and loading a finished (or interrupted) run back."""

from __future__ import annotations

import copy
import itertools
import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from probssl.backbone_choice import WEIGHTS_KEY, chosen_backbone, stored_backbone
from probssl.checkpoint import CheckpointError, final_weights_intact, latest_checkpoint, load_model_state
from probssl.config import (
    RUNTIME_KEYS,
    ConfigError,
    RunConfig,
    config_from_dict,
    load_yaml,
    named_mappings,
    yaml_safe,
)
from probssl.data import DatasetError, DatasetInfo, default_data_dir, get_dataset_info, preset_for_dataset
from probssl.data.resolve import is_path_dataset, open_source
from probssl.io import atomic_write_text, read_json
from probssl.methods import METHODS, SSLMethod, build_method
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


def resolved_backbone_args(name: str, options: dict[str, Any], info: DatasetInfo) -> dict[str, Any]:
    """Every option of backbone ``name`` as it would be built for ``info``'s images: defaults filled
    in and ``auto`` values (a ResNet's stem, a ViT's patch size) resolved — the built network's own
    ``.options`` (:func:`probssl.nn.backbones.resolved_options`, the one place that rule lives), read
    off a copy built on the ``meta`` device, which allocates and computes nothing. ``backbone.weights``
    is not an architecture option: it is kept as given and not loaded here."""
    architecture = {k: v for k, v in options.items() if k != WEIGHTS_KEY}
    try:
        with torch.device("meta"):
            net = build_backbone(name, info.channels, info.image_size, **architecture)
    except (NotImplementedError, RuntimeError):  # a third-party builder (timm) that reads its tensors
        net = build_backbone(name, info.channels, info.image_size, **architecture)
    resolved = dict(net.options)
    if WEIGHTS_KEY in options:
        resolved[WEIGHTS_KEY] = options[WEIGHTS_KEY]
    return resolved


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


def absolute_data(cfg: RunConfig) -> tuple[str, str]:
    """``(data.dataset, data.data_dir)`` as absolute paths: a folder / tar / image given as a path, and
    the data directory (``$PROBSSL_DATA`` or ``./data`` when unset). A registered name stays a name.

    Why: a run read from another working directory (``probssl eval RUN`` elsewhere, a colleague's
    copy) must find the same files; a relative path would be read against the new directory.
    """
    dc = cfg.data
    dataset = str(Path(dc.dataset).expanduser().absolute()) if is_path_dataset(dc.dataset) else dc.dataset
    data_dir = Path(dc.data_dir).expanduser().absolute() if dc.data_dir is not None else default_data_dir()
    return dataset, str(data_dir)


def resolved_config(
    cfg: RunConfig,
    info: DatasetInfo,
    device: torch.device | str | None = None,
    backbone: tuple[str, dict[str, Any]] | None = None,
) -> RunConfig:
    """A copy of ``cfg`` with every value the run depends on written out, defaults included.

    The method's hyper-parameters (its config dataclass filled in, wrapped methods' too), the backbone
    ``auto`` resolves to and all of its options, the augmentation preset and the data's absolute
    paths. This is what ``RUN/config.yaml`` stores (as nanoGPT keeps ``model_args`` and DINO its
    ``args`` in the checkpoint), so a default changed later cannot change what an old run reloads as.
    ``info`` is the data the run is built for (``auto`` choices depend on its channels and size, and
    on the ``device`` that trains it); ``backbone``: the (name, options) a trained run was built with
    (:func:`probssl.backbone_choice.stored_backbone`), instead of what ``auto`` would choose today.
    """
    out = copy.deepcopy(cfg)
    name, options = backbone or chosen_backbone(cfg, info, device, init=_init_backbone(cfg))
    if WEIGHTS_KEY in cfg.backbone_args:
        options = {**options, WEIGHTS_KEY: cfg.backbone_args[WEIGHTS_KEY]}
    out.backbone = name
    out.backbone_args = resolved_backbone_args(name, options, info)
    out.method_args = METHODS.get(cfg.method).resolved_args(cfg.method_args, cfg.method)
    out.data.dataset, out.data.data_dir = absolute_data(cfg)
    out.data.views = cfg.data.views or preset_for_dataset(cfg.data.dataset, info.channels, info.image_size)
    return out


def resume_resolved_config(
    run_dir: str | Path, cfg: RunConfig, info: DatasetInfo, device: torch.device | str | None = None
) -> RunConfig:
    """:func:`resolved_config` of ``cfg`` for resuming the run in ``run_dir``: a backbone left at
    ``auto`` is the one the run was built with (its record, or for older runs the rule of their time),
    not what ``auto`` would choose today, so an unchanged config compares equal to the stored one."""
    backbone = None
    if cfg.backbone == "auto" and (Path(run_dir) / "config.yaml").is_file():
        backbone = stored_backbone(run_dir, cfg, info)
    return resolved_config(cfg, info, device, backbone=backbone)


def _missing_keys(stored: dict[str, Any], resolved: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of ``resolved`` that ``stored`` (a config.yaml as written) does not hold."""
    missing = []
    for key, value in resolved.items():
        where = f"{prefix}{key}"
        if key not in stored:
            missing.append(where)
        elif isinstance(value, dict) and stored[key] == {} and value:  # all of it: one entry, not each key
            missing.append(f"{where} (all {len(value)} keys)")
        elif isinstance(value, dict) and isinstance(stored[key], dict):
            missing += _missing_keys(stored[key], value, f"{where}.")
    return missing


_WARNED_GAPS: set[Path] = set()


def read_run_config(run_dir: str | Path, info: DatasetInfo | None = None) -> RunConfig:
    """A run's ``config.yaml``, resolved (:func:`resolved_config`).

    A run written before config.yaml held every setting has gaps (a method hyper-parameter, a
    backbone option, ``backbone: auto``, a key added since): they are filled from today's defaults,
    which may differ from the ones it was trained with, and one warning per run and process says so.
    ``info`` defaults to the DatasetInfo stored with the run.
    """
    run_dir = Path(run_dir)
    stored = load_yaml(run_dir / "config.yaml")
    cfg = config_from_dict(stored)
    info = info or run_dataset_info(run_dir, cfg)
    resolved = resolved_config(cfg, info, backbone=stored_backbone(run_dir, cfg, info))
    normalised = named_mappings(stored)  # `method: {name: ..., ...}` read as method + method_args
    gaps = [key for key in _missing_keys(normalised, resolved.to_dict()) if key not in RUNTIME_KEYS]
    if normalised.get("backbone") == "auto":
        gaps.insert(0, f"backbone (auto → {resolved.backbone})")
    if (normalised.get("data") or {}).get("views", "") is None:
        gaps.append(f"data.views (the dataset's preset → {resolved.data.views})")
    key = run_dir.resolve()
    if gaps and key not in _WARNED_GAPS:
        _WARNED_GAPS.add(key)
        shown = ", ".join(gaps[:8]) + (f" and {len(gaps) - 8} more" if len(gaps) > 8 else "")
        warnings.warn(
            f"{run_dir / 'config.yaml'} was written before runs recorded every setting: {shown} "
            "filled in from today's defaults, which may differ from the ones it was trained with",
            stacklevel=2,
        )
    return resolved


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
        in_heads = [
            name
            for name in METHODS.names()
            if METHODS.get(name).probabilistic and not METHODS.get(name).posterior_over_backbone
        ]
        raise ConfigError(
            f"train.freeze_backbone=true leaves {cfg.method} nothing to sample: its posterior is over the "
            "encoder's weights. Freeze with a method whose uncertainty lives in its heads "
            f"({', '.join(in_heads)})"
        )
    method.set_input_normalisation(info.mean, info.std)
    return method


@dataclass
class LoadedRun:
    run_dir: Path
    config: RunConfig
    method: SSLMethod
    weights_meta: dict
    info: DatasetInfo  # channels, size and normalisation the run was trained with


def load_run(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    step: int | None = None,
    *,
    data_dir: str | Path | None = None,
    dataset: str | Path | None = None,
) -> LoadedRun:
    """Rebuild the run's method from its ``config.yaml`` and load its weights (eval mode).

    ``step`` picks a kept checkpoint instead of the final weights (learning curves). ``data_dir`` and
    ``dataset`` say where the run's training data is now, if it moved (:func:`point_at_data`).
    A run whose training did not finish is loaded from its latest checkpoint, with one warning.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a probssl run directory (no config.yaml); "
            "pass the --out directory of a `probssl train` run"
        )
    if step is None and not (run_dir / "model.json").is_file() and latest_checkpoint(run_dir) is None:
        # before anything reads the data: "unknown dataset" would hide what is really missing
        raise CheckpointError(
            f"{run_dir} has no trained model (no model.safetensors and no checkpoint: its training "
            f"stopped before the first checkpoint); train it with: probssl train --resume --out {run_dir}"
        )
    state, meta = load_model_state(run_dir, step)
    cfg = read_run_config(run_dir)
    info = run_dataset_info(run_dir, cfg)
    point_at_data(cfg, info, data_dir, dataset)
    # the stored encoder; backbone.weights are not read: the run's own weights replace them below
    backbone = build_run_backbone(cfg, info, run_dir=run_dir, load_weights=False)
    method = build_model(cfg, info, backbone=backbone, training=False)
    method.load_state_dict(state)
    method = method.to(device).eval()
    method.attach_run(run_dir, up_to_step=step)
    if step is None and meta.get("partial"):
        warn_interrupted(run_dir, meta.get("step"), meta.get("total_steps"))
    return LoadedRun(run_dir=run_dir, config=cfg, method=method, weights_meta=meta, info=info)


_WARNED_INTERRUPTED: set[Path] = set()


def warn_interrupted(
    run_dir: Path, step: int | None, total_steps: int | None, what: str = "its latest checkpoint's weights"
) -> None:
    """One warning per run and process: results of a run whose training stopped early (Ctrl-C, a kill,
    ``train.max_steps``) must not pass for the finished run's."""
    key = Path(run_dir).resolve()
    if key in _WARNED_INTERRUPTED:
        return
    _WARNED_INTERRUPTED.add(key)
    done = f"{step} of {total_steps}" if step is not None and total_steps else "only part of its"
    warnings.warn(
        f"{run_dir}: trained {done} steps ({what}); `probssl train --resume --out {run_dir}` to finish",
        stacklevel=3,
    )


def warn_partial_results(run_dir: str | Path) -> None:
    """For ``probssl report``: warn once when a run's ``eval.json`` was measured on an unfinished
    training (``meta/partial_training``), or on a run that has finished since."""
    run_dir = Path(run_dir)
    results = read_json(run_dir / "eval.json")
    if not isinstance(results, dict) or not results.get("meta/partial_training"):
        return
    step, total = results.get("meta/step"), results.get("meta/total_steps")
    if final_weights_intact(run_dir):
        done = f"{step} of {total}" if step is not None and total else "only part of its"
        warnings.warn(
            f"{run_dir}: its eval.json is of the model trained {done} steps; the run has finished since: "
            f"`probssl eval {run_dir}` to evaluate the finished model",
            stacklevel=2,
        )
        return
    warn_interrupted(run_dir, step, total, "its eval.json is of that model")


def point_at_data(
    cfg: RunConfig, info: DatasetInfo, data_dir: str | Path | None = None, dataset: str | Path | None = None
) -> None:
    """Read the run's data from where it is now (in place on ``cfg``): ``data_dir`` for the registered
    sets' files, ``dataset`` for the run's own images (a folder or tar) that moved.

    The new ``dataset`` must look like the run's (channels, image size, number of classes: what
    ``dataset_info.json`` recorded), so a wrong folder is refused rather than evaluated.
    """
    if data_dir is not None:
        cfg.data.data_dir = str(Path(data_dir).expanduser().absolute())
    if dataset is None:
        return
    if not is_path_dataset(cfg.data.dataset):
        raise ConfigError(
            f"the run was trained on the registered dataset '{cfg.data.dataset}'; --dataset points a run "
            "trained on your own images at their new place. For a registered set's files use --data-dir DIR"
        )
    path = Path(dataset).expanduser().absolute()
    if not is_path_dataset(str(dataset)) or not path.exists():
        raise DatasetError(f"--dataset {dataset}: no folder, tar or image file there")
    split = "train" if "train" in info.splits else "all"
    dc = cfg.data
    options = {"image_size": dc.image_size, "skip_corrupt": dc.skip_corrupt, "cache_dir": dc.cache_dir}
    found = open_source(str(path), split, verify=False, **options)
    seen = (found.channels, found.image_size, len(found.classes))
    trained = (info.channels, info.image_size, info.num_classes)
    if seen != trained:
        raise DatasetError(
            f"--dataset {dataset} does not hold the run's training images: it has {seen[2]} classes of "
            f"{seen[0]}-channel {seen[1]}px images, the run was trained on {trained[2]} classes of "
            f"{trained[0]}-channel {trained[1]}px images ({cfg.data.dataset})"
        )
    cfg.data.dataset = str(path)


def training_data_error(cfg: RunConfig, error: DatasetError) -> DatasetError:
    """``error`` (reading the run's training data failed) with what to do when the data moved."""
    dc = cfg.data
    if is_path_dataset(dc.dataset):
        if Path(dc.dataset).exists():
            return error
        return DatasetError(
            f"the run's training images are not at {dc.dataset} any more (moved or deleted?); point at "
            "their new place with --dataset NEWPATH (Python: dataset=NEWPATH)"
        )
    if dc.data_dir is not None and not (Path(dc.data_dir) / dc.dataset).exists():
        return DatasetError(
            f"{error} (the run read {dc.dataset} from {dc.data_dir}; if its files moved, pass "
            "--data-dir NEWDIR)"
        )
    return error


def adopt_evaluation_settings(out_dir: Path, saved: RunConfig, new: RunConfig) -> None:
    """Write ``new``'s ``eval`` section into the run's config.yaml when it differs from the stored one,
    so the ``probssl eval`` that follows the resumed training uses what this invocation asked for;
    every other line of the file (its header comment included) stays as it was."""
    if saved.eval == new.eval:
        return
    path = out_dir / "config.yaml"
    lines = path.read_text().splitlines(keepends=True)
    header = "".join(itertools.takewhile(lambda line: line.startswith("#"), lines))
    stored = load_yaml(path)
    old_eval = stored.get("eval") or {}
    stored["eval"] = yaml_safe(new.to_dict()["eval"])
    changes = ", ".join(
        f"{key}: {old_eval.get(key)!r} → {value!r}"
        for key, value in stored["eval"].items()
        if old_eval.get(key) != value
    )
    atomic_write_text(path, header + yaml.safe_dump(stored, sort_keys=False))
    print(f"resume: the run's evaluation settings are now this invocation's ({changes})", flush=True)
