from __future__ import annotations

import pytest
import torch

from probssl.config import ConfigError, build_config, config_from_dict, load_yaml, save_config
from probssl.methods import build_method
from probssl.nn import build_backbone


def test_defaults_yaml_and_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("method: byol\noptim:\n  lr: 0.3\ntrain:\n  epochs: 7\n")
    cfg = build_config(path, ["optim.lr=0.1", "method.base_momentum=0.996"], train={"epochs": 9})
    assert cfg.method == "byol"
    assert cfg.optim.lr == 0.1  # override beats YAML
    assert cfg.train.epochs == 9  # keyword mapping beats YAML
    assert cfg.method_args == {"base_momentum": 0.996}  # `method.` is an alias of method_args
    assert cfg.optim.momentum == 0.9  # untouched default


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'.*lr"):
        build_config(overrides=["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        build_config(overrides=["trian.epochs=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=ten", "must be an integer"),
        ("train.epochs=1.5", "must be an integer"),
        ("optim.lr=fast", "must be a number"),
        ("train.deterministic=3", "true or false"),
        ("optim.name=rmsprop", "not one of"),
        ("train.batch_size=0", "must be positive"),
        ("optim", "section.key=value"),
    ],
)
def test_wrong_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[override])


def test_int_is_accepted_for_float_and_tuple_from_list():
    cfg = build_config(overrides=["optim.lr=1", "eval.knn_k=[5, 10]"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.eval.knn_k == (5, 10)


def test_method_args_are_validated_against_the_method():
    backbone = build_backbone("mlp", 1, 8)
    with pytest.raises(ConfigError, match="unknown config key 'method.temprature'.*temperature"):
        build_method("simclr", backbone, {"temprature": 0.5})
    with pytest.raises(ConfigError, match="must be a number"):
        build_method("simclr", backbone, {"temperature": "hot"})
    assert build_method("simclr", backbone, {"temperature": 0.5}).cfg.temperature == 0.5


def test_saved_config_round_trips(tmp_path):
    cfg = build_config(overrides=["method=simsiam", "eval.knn_k=[3]", "method.proj_dim=64"])
    save_config(cfg, tmp_path / "config.yaml")
    again = config_from_dict(load_yaml(tmp_path / "config.yaml"))
    assert again == cfg


def test_yaml_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        build_config(tmp_path / "missing.yaml")
    assert torch.tensor(1)  # keep torch imported for the method builders


def test_method_hyper_parameters_in_yaml_both_forms(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text(
        "method: simclr\nmethod_args: {temperature: 0.3}\nbackbone: convnet\nbackbone_args: {width: 8}\n"
    )
    nested = tmp_path / "nested.yaml"
    nested.write_text("method: {name: simclr, temperature: 0.3}\nbackbone: {name: convnet, width: 8}\n")
    a, b = build_config(flat), build_config(nested)
    assert a.to_dict() == b.to_dict()
    assert (b.method, b.method_args, b.backbone, b.backbone_args) == (
        "simclr",
        {"temperature": 0.3},
        "convnet",
        {"width": 8},
    )
    assert build_config(nested, ["method.temperature=0.5"]).method_args == {
        "temperature": 0.5
    }  # overrides win
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("method: {temperature: 0.3}\n")
    with pytest.raises(ConfigError, match=r"needs its name.*method_args: \{temperature: 0.3\}"):
        build_config(nameless)


@pytest.mark.parametrize("given", ["fashion_mnist", "fashion_mnist.yaml", "configs/fashion_mnist.yaml"])
def test_bundled_configs_by_name_or_by_the_repository_path(given, tmp_path, monkeypatch):
    from importlib.resources import files

    import yaml

    monkeypatch.chdir(tmp_path)  # as from an installed copy: no configs/ folder here
    shipped = yaml.safe_load(files("probssl").joinpath("configs", "fashion_mnist.yaml").read_text())
    cfg = build_config(given)
    assert cfg.data.dataset == shipped["data"]["dataset"] == "fashion_mnist"
    assert cfg.train.epochs == shipped["train"]["epochs"]
    own = tmp_path / "configs" / "fashion_mnist.yaml"  # a file of one's own at that path wins
    own.parent.mkdir()
    own.write_text("data: {dataset: digits}\n")
    assert build_config("configs/fashion_mnist.yaml").data.dataset == "digits"


def test_a_missing_config_lists_the_bundled_ones(tmp_path, monkeypatch):
    from probssl.config import bundled_configs

    monkeypatch.chdir(tmp_path)
    assert {"digits", "fashion_mnist", "cifar10"} <= set(bundled_configs())
    with pytest.raises(ConfigError, match="bundled configs .*digits, fashion_mnist"):
        build_config("fashion_mnistt")
    with pytest.raises(ConfigError, match="config file not found: elsewhere/digits.yaml"):
        build_config("elsewhere/digits.yaml")  # only the bare name or configs/NAME.yaml fall back


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.momentum=1.5", r"optim.momentum must be in \[0, 1\)"),
        ("optim.weight_decay=-1", "optim.weight_decay must be ≥ 0"),
        ("optim.warmup_epochs=-2", "optim.warmup_epochs must be ≥ 0"),
        ("optim.min_lr_ratio=2", r"optim.min_lr_ratio must be in \[0, 1\]"),
        ("eval.knn_k=[20, 0]", "eval.knn_k must be one or more neighbour counts ≥ 1"),
        ("eval.knn_temperature=0", "eval.knn_temperature must be > 0"),
        ("eval.linear_max_iter=0", "eval.linear_max_iter must be ≥ 1"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints must be ≥ 1"),
        ("train.log_every=0", "train.log_every must be ≥ 1"),
        ("data.memory_limit_gb=0", "data.memory_limit_gb must be > 0"),
        ("data.views=cifar10", "data.views='cifar10' is not a preset; valid: .*cifar"),
    ],
)
def test_values_a_type_admits_but_a_run_cannot_use_are_refused_up_front(override, message):
    # Each trained silently, failed at the first step with a library's traceback, or failed at
    # evaluation after the whole training before these checks (see config._validate_ranges).
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=[override])


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_a_number_that_is_not_finite_is_refused(value, tmp_path):
    # optim.lr=.nan passed every `<= 0` check and trained to a NaN loss at the first step
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        build_config(overrides=[f"optim.lr={value}"])
    path = tmp_path / "nan.yaml"
    path.write_text(f"optim: {{weight_decay: {value}}}\n")
    with pytest.raises(ConfigError, match="optim.weight_decay must be a finite number"):
        build_config(path)


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    # PyYAML keeps the last of two `train:` sections silently, dropping the first one's values
    path = tmp_path / "twice.yaml"
    path.write_text("method: simclr\ntrain: {epochs: 3}\noptim: {lr: 0.1}\ntrain: {batch_size: 64}\n")
    with pytest.raises(ConfigError, match=r"key 'train' is given twice \(lines 2 and 4\)"):
        build_config(path)
    path.write_text("train: {epochs: 3, epochs: 4}\n")
    with pytest.raises(ConfigError, match="key 'epochs' is given twice"):
        build_config(path)
    path.write_text("base: &b {epochs: 3}\n")  # anchors and merge keys still load
    assert load_yaml(path) == {"base": {"epochs": 3}}


def test_a_yaml_file_indented_with_tabs_says_to_use_spaces(tmp_path):
    path = tmp_path / "tabs.yaml"
    path.write_text("train:\n\tepochs: 1\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(indent with spaces"):
        build_config(path)


def test_a_path_object_is_accepted_where_a_path_string_is(tmp_path):
    cfg = build_config(data={"dataset": tmp_path / "pictures", "cache_dir": tmp_path})
    assert cfg.data.dataset == str(tmp_path / "pictures") and cfg.data.cache_dir == str(tmp_path)
