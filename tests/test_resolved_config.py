"""A run remembers every setting: ``RUN/config.yaml`` holds every resolved value, defaults included, so a
default changed later cannot change what an old run reloads as (issue 28 item 5)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import pytest
import yaml

from probssl.config import build_config
from probssl.methods import METHODS
from probssl.methods.simclr import SimCLR, SimCLRConfig
from probssl.nn.backbones import BACKBONES, convnet
from probssl.runs import load_run, resolved_config
from probssl.train import train

pytestmark = pytest.mark.usefixtures("single_thread")


def _tiny(method: str = "simclr", **extra) -> object:
    return build_config(
        method=method,
        data={"dataset": "digits", "subset": 128},
        train={"epochs": 1, "batch_size": 64, "progress": False, "tensorboard": False},
        **extra,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(_tiny(backbone_args={"width": 8}), tmp_path_factory.mktemp("run") / "simclr")


def test_config_yaml_holds_every_resolved_value(trained: Path) -> None:
    stored = yaml.safe_load((trained / "config.yaml").read_text())
    assert stored["method_args"] == {"temperature": 0.2, "proj_hidden_dim": 512, "proj_dim": 128}
    assert stored["backbone"] == "convnet"  # `auto` on 8-px grey digits
    assert stored["backbone_args"] == {"width": 8, "num_stages": 3, "norm": "batch"}
    assert stored["data"]["views"] == "digits"
    assert os.path.isabs(stored["data"]["data_dir"])
    assert stored["train"]["epochs"] == 1 and stored["eval"]["knn_k"] == [20, 200]


def _changed_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Today's defaults move: SimCLR's temperature, and the ConvNet's depth (which changes the weights'
    shapes, so a run rebuilt with it could not load its state dict at all)."""

    @dataclasses.dataclass
    class Hotter(SimCLRConfig):
        temperature: float = 0.9

    def shallower(
        in_channels: int, image_size: int, width: int = 32, num_stages: int = 2, norm: str = "batch"
    ):
        return convnet(in_channels, image_size, width, num_stages, norm)

    monkeypatch.setattr(SimCLR, "config_class", Hotter)
    monkeypatch.setitem(BACKBONES._entries, "convnet", shallower)


def test_a_changed_default_does_not_change_a_saved_run(
    trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _changed_defaults(monkeypatch)
    assert build_config(method="simclr").method_args == {}  # the new defaults are in force ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... and a run that stored its settings reloads without a word
        run = load_run(trained)
    assert run.method.cfg.temperature == 0.2 and run.config.method_args["temperature"] == 0.2
    assert run.config.backbone_args["num_stages"] == 3
    assert run.method.backbone.out_dim == 32  # width 8 × 2² after three stages; two would give 16


def test_a_run_from_before_fills_its_gaps_from_todays_defaults_and_says_so_once(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(trained, old)
    stored = yaml.safe_load((old / "config.yaml").read_text())
    stored.update(backbone="auto", method_args={}, backbone_args={"width": 8})  # as runs were written
    stored["data"]["views"] = None
    (old / "config.yaml").write_text(yaml.safe_dump(stored))
    monkeypatch.setattr(SimCLR, "config_class", dataclasses.make_dataclass(
        "Hotter", [("temperature", float, dataclasses.field(default=0.9))], bases=(SimCLRConfig,)
    ))  # fmt: skip
    with pytest.warns(UserWarning, match="written before runs recorded every setting") as caught:
        run = load_run(old)
    message = str(caught[0].message)
    assert len([w for w in caught if "recorded every setting" in str(w.message)]) == 1
    for gap in (
        "backbone (auto → convnet)",
        "method_args (all 3 keys)",
        "backbone_args.num_stages",
        "data.views (the dataset's preset → digits)",
    ):
        assert gap in message
    assert run.method.cfg.temperature == 0.9  # today's default: the gap could not be filled otherwise
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run(old)  # once per run and process


def test_wrapped_methods_store_their_inner_methods_settings() -> None:
    csghmc = METHODS.get("csghmc").resolved_args({"objective": "simclr", "cycles": 2}, "csghmc")
    assert csghmc["cycles"] == 2 and csghmc["samples_per_cycle"] == 3
    assert csghmc["objective_args"] == {"temperature": 0.2, "proj_hidden_dim": 512, "proj_dim": 128}
    ensemble = METHODS.get("ensemble").resolved_args({}, "ensemble")
    assert ensemble["member_args"]["posterior"] == "none" and ensemble["member_args"]["margin"] == 0.7
    # resolving twice changes nothing: a stored config reads back as itself
    assert METHODS.get("ensemble").resolved_args(ensemble, "ensemble") == ensemble


def test_resolution_is_idempotent_and_keeps_explicit_values() -> None:
    from probssl.data import get_dataset_info

    info = get_dataset_info("digits")
    cfg = _tiny(method="byol", backbone="mlp", backbone_args={"hidden_dim": 64})
    once = resolved_config(cfg, info)
    assert once.backbone == "mlp" and once.backbone_args == {
        "hidden_dim": 64,
        "out_dim": None,
        "norm": "batch",
    }
    assert resolved_config(once, info).to_dict() == once.to_dict()
    assert cfg.method_args == {}  # the caller's config is not changed in place
