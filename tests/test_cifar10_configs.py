"""The CIFAR-10 configs (GPU and CPU budget) and the prepared GPU check, run on the CPU (issue 21)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from probssl.config import build_config
from probssl.data import get_dataset_info
from probssl.data.catalog import DatasetError
from probssl.runs import build_model, resolve_backbone

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _shapes_of(cfg):
    """The registered info of the config's dataset, or CIFAR-10's where the JPEG copy is not registered
    in this checkout (same shapes: 3 x 32 x 32, 10 classes)."""
    try:
        return get_dataset_info(cfg.data.dataset)
    except DatasetError:
        return get_dataset_info("cifar10")


def test_gpu_config_is_the_full_width_resnet18_in_auto_precision():
    cfg = build_config(REPO / "src" / "probssl" / "configs" / "cifar10.yaml")
    assert (cfg.backbone, cfg.train.batch_size, cfg.train.channels_last) == ("resnet18", 512, True)
    assert cfg.train.precision == "auto" and cfg.backbone_args.get("width", 64) == 64
    model = build_model(cfg, get_dataset_info("cifar10"))
    assert model.backbone.out_dim == 512
    assert sum(p.numel() for p in model.backbone.parameters()) == 11_168_832


def test_cpu_budget_config_builds_a_32px_rgb_encoder():
    cfg = build_config(REPO / "src" / "probssl" / "configs" / "cifar10_cpu.yaml")
    assert cfg.train.precision == "auto" and cfg.train.batch_size == 256
    assert cfg.data.dataset == "cifar10_jpeg"
    info = _shapes_of(cfg)
    model = build_model(cfg, info)
    assert resolve_backbone(cfg, info) == cfg.backbone
    out = model.backbone(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, model.backbone.out_dim)


def test_gpu_check_dry_run_writes_every_result(tmp_path, monkeypatch):
    """The whole GPU script on the CPU with a tiny budget: speed table, training, kNN, summary."""
    monkeypatch.delenv("OUT", raising=False)
    gpu_check = _gpu_check()
    assert gpu_check.main(["--dry-run", "--arms", "scl", "--out", str(tmp_path)]) == 0
    speed = json.loads((tmp_path / "speed.json").read_text())
    assert [row["arm"] for row in speed["rows"]] == ["simclr", "scl"]
    assert speed["augment"]["arm"] == "simclr" and speed["augment"]["ratio"] > 0
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["dataset"] == "random" and train["steps"] >= 1
    assert 0.0 <= train["knn_top1@20"] <= 1.0 and train["precision"] == "fp32"  # PROBSSL_CPU_BF16=0
    summary = (tmp_path / "summary.md").read_text()
    assert "| scl |" in summary and "kNN top-1" in summary


def test_gpu_check_writes_to_out_and_trains_on_a_registered_set(tmp_path, monkeypatch):
    """$OUT (the GPU machine's output folder) is the default destination; a named set is loaded."""
    monkeypatch.setenv("OUT", str(tmp_path))
    gpu_check = _gpu_check()
    assert gpu_check.main(["--dry-run", "--skip-speed", "--dataset", "digits"]) == 0
    train = json.loads((tmp_path / "train.json").read_text())
    assert train["dataset"] == "digits"
    assert not (tmp_path / "speed.json").exists()
    with pytest.raises(SystemExit, match="unknown arm"):
        gpu_check.main(["--dry-run", "--arms", "nope"])


@pytest.mark.slow
def test_gpu_check_dry_run_of_every_arm(tmp_path):
    assert _gpu_check().main(["--dry-run", "--out", str(tmp_path)]) == 0
    assert len(json.loads((tmp_path / "speed.json").read_text())["rows"]) == 9
