"""The ``cifar10`` suite without its data: every arm's config and model build at the real budget, and
one arm trains and runs the full evaluation (OOD → Tiny-ImageNet, MNIST, noise; transfer → EuroSAT)
on a tiny generated stand-in of the registered sets, so CI catches a broken arm before the CPU day."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from probssl.bench import catalogue, suites, tables
from probssl.config import method_config
from probssl.data import get_dataset_info, official_files, registered_folders
from probssl.data.catalog import CIFAR10_CLASSES
from probssl.methods import METHODS
from probssl.runs import build_model

pytestmark = pytest.mark.usefixtures("single_thread")


def _jpeg(rng: np.random.Generator, shape: tuple[int, ...], fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _tar(path: Path, members: dict[str, bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data dir holding tiny copies of every set the suite reads, their checksums trusted."""
    data, rng = tmp_path / "data", np.random.default_rng(0)
    for split, per_class in (("train", 20), ("test", 4)):
        members = {
            f"{split}/{c}/{i:04d}.jpg": _jpeg(rng, (32, 32, 3))
            for c in CIFAR10_CLASSES
            for i in range(per_class)
        }
        _tar(data / "cifar10_jpeg" / f"{split}.tar", members)
    tiny = {f"tiny-imagenet-200/val/images/val_{i}.JPEG": _jpeg(rng, (64, 64, 3)) for i in range(6)}
    lines = [f"val_{i}.JPEG\tn0{i % 3}\t0\t0\t63\t63" for i in range(6)]
    tiny["tiny-imagenet-200/val/val_annotations.txt"] = "\n".join(lines).encode()
    _tar(data / "tiny_imagenet_val" / "tiny-imagenet-200-val.tar", tiny)
    eurosat = {f"test/{k}/{i}.png": _jpeg(rng, (64, 64, 3), "PNG") for k in range(10) for i in range(20)}
    _tar(data / "eurosat_test" / "eurosat-rgb-test.tar", eurosat)
    table = dict(registered_folders.SHA256)
    for relative in table:
        table[relative] = hashlib.sha256((data / relative).read_bytes()).hexdigest()
    monkeypatch.setattr(registered_folders, "SHA256", table)
    monkeypatch.setattr(registered_folders, "_SHA_MEMO", {})
    mnist = data / "mnist"
    mnist.mkdir()
    images, labels = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.arange(6, dtype=np.uint8)
    for name, payload in (
        ("t10k-images-idx3-ubyte.gz", struct.pack(">iiii", 2051, 6, 28, 28) + images.tobytes()),
        ("t10k-labels-idx1-ubyte.gz", struct.pack(">ii", 2049, 6) + labels.tobytes()),
    ):
        (mnist / name).write_bytes(gzip.compress(payload))
        md5 = hashlib.md5((mnist / name).read_bytes()).hexdigest()
        monkeypatch.setitem(official_files._CHECKSUMS["mnist"], name, md5)
    return data


@pytest.mark.parametrize("suite_name", ["cifar10", "cifar10_gpu"])
def test_every_cifar10_arm_builds_at_the_suite_budget(suite_name):
    suite = catalogue.SUITES[suite_name]
    info = get_dataset_info(suite.budget["data"]["dataset"])
    assert (info.channels, info.image_size) == (3, 32)
    for arm in catalogue.ARMS:
        cfg = suites._arm_config(suite, arm, seed=0, data_dir=None)
        method_config(METHODS.get(arm.method).config_class, cfg.method_args, arm.method)
        if suite_name == "cifar10":  # the CPU budget's models are small enough to build them all here
            build_model(cfg, info)
    snapshot = next(a for a in catalogue.ARMS if a.name == "csghmc_snapshot")
    cfg = suites._arm_config(suite, snapshot, seed=0, data_dir=None)
    csghmc = method_config(METHODS.get("csghmc").config_class, cfg.method_args, "csghmc")
    assert csghmc.temperature == 0
    # cSGHMC's cycles must fit the budget: each cycle ≥ max(2, samples per cycle) steps (its own check)
    steps = 50_000 // cfg.train.batch_size * cfg.train.epochs
    assert steps // csghmc.cycles >= max(2, csghmc.samples_per_cycle)


def test_one_cifar10_arm_trains_and_runs_the_full_evaluation_on_a_stand_in(stand_in, tmp_path, monkeypatch):
    """The real suite's dataset, OOD and transfer wiring, at a budget of a few steps."""
    suite = copy.deepcopy(catalogue.SUITES["cifar10"])
    suite.budget["backbone_args"] = {"width": 8}
    suite.budget["train"] = {**suite.budget["train"], "epochs": 1, "batch_size": 32}
    suite.budget["data"] = {**suite.budget["data"], "download": False}
    monkeypatch.setitem(catalogue.SUITES, "cifar10", suite)
    results = suites.run_quality_benchmark(
        "cifar10", tmp_path / "bench", seeds=1, data_dir=str(stand_in), only=["simclr"], progress=False
    )
    assert not results["failures"], results["failures"]
    run = results["runs"]["simclr"]["0"]
    assert run["meta/skipped"] == ""  # a "; "-joined string: every OOD and transfer set was read
    for name in ("tiny_imagenet_val", "mnist", "noise"):
        assert 0 <= run[f"ood/{name}/best_feature/auroc"] <= 1
    assert "ood/far/best_feature/auroc" in run and run["transfer/eurosat_test/items"] == 100
    text = tables.results_markdown(results)
    assert "transfer/eurosat_test/top1" in text and "ood/far/msp/auroc" in text
