"""Run configuration: one dataclass default per value, validated, written with every run.

Values come from three places, later ones winning: dataclass defaults, a YAML file
(``--config``), and ``section.key=value`` overrides on the command line. Every key and every
value's type is checked here, so a typo fails at start-up with the list of valid keys instead of
silently training with a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A wrong key or value in a config file or override; the message says what is valid."""


@dataclass
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None  # None: $PROBSSL_DATA, else ./data
    subset: int | None = None  # train on a fixed class-balanced random subset of this many images
    download: bool = True  # fetch missing official files when a network exists
    views: str | None = None  # augmentation preset; None: the dataset's own preset
    # Own images (a directory or a .tar as `dataset`) and the input pipeline. Reading and decoding
    # live in probssl.data; the training loop only picks the path.
    image_size: int | None = None  # resize (shorter side + centre crop) to N x N; None: the source's size
    verify: bool = True  # check the sha256 of registered image-folder sets (off for one's own copies)
    skip_corrupt: bool = False  # skip unreadable images (counted and listed in the run) instead of failing
    pipeline: str = "auto"  # auto (by decoded size) | memory (decoded once, cached on disk) | stream
    workers: int = 2  # DataLoader worker processes of the streaming path
    cache_dir: str | None = None  # decoded-image cache; None: $PROBSSL_CACHE, else ~/.cache/probssl
    memory_limit_gb: float = 4.0  # auto: in memory below this decoded size, streaming above

    def reader_options(self) -> dict[str, Any]:
        """The keywords every reader of the data takes alike (``probssl.data.open_source``,
        ``load_dataset``, ``resolve_dataset_info``), so the loop, the evaluation and ``embed`` read
        the same images the same way."""
        return {
            "image_size": self.image_size,
            "verify": self.verify,
            "skip_corrupt": self.skip_corrupt,
            "cache_dir": self.cache_dir,
        }


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | lars | adamw
    lr: float = 0.05  # base learning rate for a batch of 256; scaled linearly with the global batch
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: float = 2.0
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    weight_decay_end: float | None = None  # cosine weight decay to this value (DINO: 0.04 → 0.4); None: fixed


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 256  # global batch (split evenly across DDP ranks)
    seed: int = 0
    precision: str = "auto"  # auto (bf16 on GPU and where fast on CPU: probssl.precision) | fp32 | bf16
    channels_last: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms: bit-exact resume on CPU
    checkpoint_every: int = 0  # steps between checkpoints; 0: at the end of every epoch
    keep_checkpoints: int = 2
    log_every: int = 10
    max_steps: int | None = None  # stop early (time budgets, tests); the schedule still spans `epochs`
    progress: bool = True
    tensorboard: bool = True
    freeze_backbone: bool = False  # train only the method's heads on a fixed (eval-mode) backbone
    threads: int | None = None  # intra-op CPU threads; None: auto (probssl/threads.py, README "Threads")


@dataclass
class EvalConfig:
    knn_k: tuple[int, ...] = (20, 200)
    knn_temperature: float = 0.07
    samples: int = 1  # embedding samples per image for probabilistic methods
    batch_size: int = 512
    linear_max_iter: int = 10_000  # the probe stops on convergence; this safety cap can only be raised
    shift_max_items: int = 2000  # corrupted copies are made of the first N test images
    transfer_max_items: int = 10_000  # a fixed random subset of the transfer set's test split
    ood_sets: tuple[str, ...] | None = None  # registered names or paths; None: the dataset's defaults
    transfer_sets: tuple[str, ...] | None = None  # registered names or paths; None: the dataset's defaults


@dataclass
class RunConfig:
    method: str = "simclr"
    backbone: str = "auto"  # auto: convnet for small grey images, resnet18 otherwise
    method_args: dict[str, Any] = field(default_factory=dict)
    backbone_args: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flat ``section.key`` view, for eval.json and tables."""
        out: dict[str, Any] = {}
        for key, value in self.to_dict().items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    out[f"{key}.{sub}"] = list(v) if isinstance(v, tuple) else v
            else:
                out[key] = value
        return out


#: Keys that change how a run is watched, where it stops, where its data is read from or how many
#: threads compute it, never what it computes (thread counts aside, which move float rounding): a
#: ``--resume`` may change them, and a run written before one of them existed has no gap worth a warning.
RUNTIME_KEYS = frozenset(
    {
        "train.max_steps",
        "train.progress",
        "train.tensorboard",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.threads",
        "data.data_dir",
        "data.download",
        # where and how images are read, never which pixels: the data order and the pixels are the same
        "data.workers",
        "data.cache_dir",
        "data.verify",
        "data.pipeline",
        "data.memory_limit_gb",
    }
)

# Override aliases: `method.temperature=0.3` reads better than `method_args.temperature=0.3`.
_ALIASES = {"method": "method_args", "backbone": "backbone_args"}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check ``value`` against a dataclass field's annotation, converting the harmless cases."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if annotation is float:
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e30` (no dot) as a string
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is None:
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(number):  # `.nan` / `.inf` pass every `<= 0` check and train to a NaN loss
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):  # a pathlib.Path for data.dataset, data_dir, cache_dir
            return os.fspath(value)
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(annotation)
        items = value if isinstance(value, list | tuple) else [value]
        return tuple(_coerce(v, item_type, where) for v in items)
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    return value


def named_mappings(mapping: dict[str, Any]) -> dict[str, Any]:
    """``method: {name: simclr, temperature: 0.3}`` → ``method: simclr`` + ``method_args: {temperature:
    0.3}`` (and the same for ``backbone``): the nested form reads naturally in YAML, so accept it."""
    mapping = dict(mapping)
    for key, args_key in _ALIASES.items():
        value = mapping.get(key)
        if not isinstance(value, dict):
            continue
        args = dict(value)
        name = args.pop("name", None)
        if not isinstance(name, str):
            raise ConfigError(
                f"'{key}' given as a mapping needs its name: `{key}: {{name: NAME, ...}}`, or write "
                f"`{key}: NAME` and put the hyper-parameters under `{args_key}:` (e.g. "
                + (
                    "`method: simclr` + `method_args: {temperature: 0.3}`)"
                    if key == "method"
                    else "`backbone: convnet` + `backbone_args: {width: 64}`)"
                )
            )
        mapping[key] = name
        mapping[args_key] = {**(mapping.get(args_key) or {}), **args}
    return mapping


def apply_mapping(obj: Any, mapping: dict[str, Any], prefix: str = "") -> None:
    """Set the fields of dataclass ``obj`` from a nested mapping, validating keys and types."""
    if isinstance(obj, RunConfig):
        mapping = named_mappings(mapping)
    hints = typing.get_type_hints(type(obj))
    valid = [f.name for f in dataclasses.fields(obj)]
    for key, value in mapping.items():
        where = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(
                f"unknown config key '{where}'; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                f"{', '.join(valid)}"
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"'{where}' is a section; give it as a mapping of {', '.join(_field_names(current))}"
                )
            apply_mapping(current, value, prefix=f"{where}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            current.update(value)
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def _field_names(obj: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(obj)]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=0.1`` → (["optim", "lr"], 0.1). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. optim.lr=0.1)")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': cannot parse value: {err}") from None
    if len(path) > 1 and path[0] in _ALIASES:
        path[0] = _ALIASES[path[0]]
    return path, value


def overrides_to_mapping(overrides: list[str]) -> dict[str, Any]:
    mapping: dict[str, Any] = {}
    for text in overrides:
        path, value = parse_override(text)
        node = mapping
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}' conflicts with an earlier override")
        node[path[-1]] = value
    return mapping


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error: PyYAML keeps the
    last one silently, so a second ``train:`` section would drop every value of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` overrides by design
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader's own error below says so
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"key {key!r} is given twice (lines {first} and {line}); keep one, or merge them",
                    key_node.start_mark,
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        content = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        hint = " (indent with spaces: YAML does not allow tabs)" if "'\\t'" in str(err) else ""
        raise ConfigError(f"config file {path} is not valid YAML{hint}: {err}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(content).__name__}")
    return content


def bundled_configs() -> list[str]:
    """Names of the configs shipped inside the package (``src/probssl/configs/NAME.yaml``)."""
    from importlib.resources import files

    return sorted(
        p.name[: -len(".yaml")]
        for p in files("probssl").joinpath("configs").iterdir()
        if p.name.endswith(".yaml")
    )


def resolve_config_path(path: str | Path) -> Path:
    """A config file on disk, else a bundled config given by name.

    ``--config fashion_mnist``, ``fashion_mnist.yaml`` and ``configs/fashion_mnist.yaml`` (the form the
    repository's docs use, which has no ``configs/`` folder in an installed copy) all name the bundled
    file when no such path exists, so the same command works from a clone and from a wheel.
    """
    given = Path(path)
    if given.is_file():
        return given
    bundled = bundled_configs()
    name = given.name.removesuffix(".yaml").removesuffix(".yml")
    if given.parent in (Path("."), Path("configs")) and name in bundled:
        from importlib.resources import as_file, files

        with as_file(files("probssl").joinpath("configs", f"{name}.yaml")) as found:
            return Path(found)
    raise ConfigError(
        f"config file not found: {path}; bundled configs (pass one by name, e.g. --config {bundled[0]}): "
        f"{', '.join(bundled)}"
    )


def build_config(
    yaml_path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: RunConfig | None = None,
    **mapping: Any,
) -> RunConfig:
    """``base`` (default: the dataclass defaults) ← YAML file ← keyword mapping ← ``key=value`` overrides."""
    cfg = base if base is not None else RunConfig()
    if yaml_path is not None:
        apply_mapping(cfg, load_yaml(resolve_config_path(yaml_path)))
    apply_mapping(cfg, mapping)
    apply_mapping(cfg, overrides_to_mapping(overrides or []))
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need more than a type."""
    choices = {
        "optim.name": (cfg.optim.name, ("sgd", "lars", "adamw")),
        "train.precision": (cfg.train.precision, ("auto", "fp32", "bf16")),
        "data.pipeline": (cfg.data.pipeline, ("auto", "memory", "stream")),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(valid)}")
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "optim.lr": cfg.optim.lr,
        "eval.samples": cfg.eval.samples,
        "eval.batch_size": cfg.eval.batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    if cfg.data.image_size is not None and cfg.data.image_size <= 0:
        raise ConfigError(f"data.image_size must be positive, got {cfg.data.image_size}")
    if cfg.data.workers < 0:
        raise ConfigError(f"data.workers must be ≥ 0, got {cfg.data.workers}")
    if cfg.data.subset is not None and cfg.data.subset <= 0:
        raise ConfigError(f"data.subset must be positive, got {cfg.data.subset}")
    if cfg.train.threads is not None and cfg.train.threads < 1:
        raise ConfigError(f"train.threads must be ≥ 1 (or null: auto), got {cfg.train.threads}")
    if cfg.train.max_steps is not None and cfg.train.max_steps < 0:
        raise ConfigError(f"train.max_steps must be ≥ 0, got {cfg.train.max_steps}")
    if cfg.optim.weight_decay_end is not None and cfg.optim.weight_decay_end < 0:
        raise ConfigError(f"optim.weight_decay_end must be ≥ 0, got {cfg.optim.weight_decay_end}")
    _validate_ranges(cfg)


def _validate_ranges(cfg: RunConfig) -> None:
    """Values a type admits but the run cannot use: refused here, before any data is read, rather than
    as a traceback at the first step (a negative warm-up), at evaluation after hours of training
    (``eval.knn_k=0``), or never (a momentum of 1.5 or a negative weight decay train silently)."""
    at_least = {
        "optim.weight_decay": (cfg.optim.weight_decay, 0),
        "optim.warmup_epochs": (cfg.optim.warmup_epochs, 0),
        "train.checkpoint_every": (cfg.train.checkpoint_every, 0),
        "train.keep_checkpoints": (cfg.train.keep_checkpoints, 1),  # 0 would leave --resume nothing
        "train.log_every": (cfg.train.log_every, 1),
        "eval.linear_max_iter": (cfg.eval.linear_max_iter, 1),
        "eval.shift_max_items": (cfg.eval.shift_max_items, 1),
        "eval.transfer_max_items": (cfg.eval.transfer_max_items, 1),
    }
    for key, (value, minimum) in at_least.items():
        if value < minimum:
            raise ConfigError(f"{key} must be ≥ {minimum}, got {value}")
    if not 0.0 <= cfg.optim.momentum < 1.0:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {cfg.optim.momentum}")
    if not 0.0 <= cfg.optim.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"optim.min_lr_ratio must be in [0, 1] (a share of optim.lr), got {cfg.optim.min_lr_ratio}"
        )
    if not cfg.data.memory_limit_gb > 0:
        raise ConfigError(f"data.memory_limit_gb must be > 0, got {cfg.data.memory_limit_gb}")
    if not cfg.eval.knn_k or any(k < 1 for k in cfg.eval.knn_k):
        raise ConfigError(f"eval.knn_k must be one or more neighbour counts ≥ 1, got {list(cfg.eval.knn_k)}")
    if not cfg.eval.knn_temperature > 0:
        raise ConfigError(f"eval.knn_temperature must be > 0, got {cfg.eval.knn_temperature}")
    if cfg.data.views is not None:
        from probssl.data.views import PRESETS  # torch and kornia: imported only when a preset is named

        if cfg.data.views not in PRESETS:
            raise ConfigError(
                f"data.views={cfg.data.views!r} is not a preset; valid: {', '.join(sorted(PRESETS))} "
                "(or leave it out for the dataset's own)"
            )


def config_from_dict(content: dict[str, Any]) -> RunConfig:
    cfg = RunConfig()
    apply_mapping(cfg, content)
    validate(cfg)
    return cfg


def yaml_safe(value: Any) -> Any:
    """``value`` with every tuple, at any depth, a list: YAML's safe dumper writes lists, not tuples
    (the dataclasses turn them back into tuples when the file is read)."""
    if isinstance(value, dict):
        return {k: yaml_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [yaml_safe(v) for v in value]
    return value


def save_config(cfg: RunConfig, path: str | Path, comment: str = "") -> None:
    """Write ``cfg`` as YAML; ``comment`` lines go first as ``# ...`` (e.g. that a run is supervised)."""
    from probssl.io import atomic_write_text

    header = "".join(f"# {line}\n" for line in comment.splitlines())
    atomic_write_text(path, header + yaml.safe_dump(yaml_safe(cfg.to_dict()), sort_keys=False))


def method_config(config_class: type, args: dict[str, Any], method: str) -> Any:
    """Build a method's hyper-parameter dataclass from ``method_args``, validating keys, types and ranges."""
    cfg = config_class()
    try:
        apply_mapping(cfg, args, prefix="method.")
        cfg.validate()  # ranges (MethodConfig.validate): refused here, before any data is read
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"{err} (method '{method}')") from None
    return cfg
