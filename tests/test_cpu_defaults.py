"""Issue 30.4: defaults that fit the machine, the run's time said early, Ctrl-C within seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from probssl import step_clock
from probssl.backbone_choice import auto_backbone, stored_backbone
from probssl.cli import main
from probssl.config import build_config
from probssl.data import DatasetInfo
from probssl.interrupt import interruptible_backward
from probssl.methods import build_method
from probssl.nn import build_backbone
from probssl.step_clock import StepClock

pytestmark = pytest.mark.usefixtures("single_thread")


def _info(channels: int, size: int) -> DatasetInfo:
    return DatasetInfo("photos", channels, size, 10, (0.5,) * channels, (0.25,) * channels, ("a",) * 10)


@pytest.mark.parametrize(
    ("channels", "size", "device", "expected"),
    [
        (1, 28, "cpu", ("convnet", {})),
        (3, 32, "cpu", ("resnet18", {"width": 16, "stem": "cifar"})),
        (3, 64, "cpu", ("resnet18", {"stem": "imagenet"})),  # the folder of 64-px photos
        (3, 224, "cpu", ("resnet18", {"stem": "imagenet"})),
        (3, 64, "cuda", ("resnet18", {})),  # stem=auto: CIFAR stem up to 64 px on a GPU
    ],
)
def test_auto_backbone_fits_the_device(channels, size, device, expected) -> None:
    assert auto_backbone(_info(channels, size), device) == expected


def test_the_cpu_default_at_64_px_costs_a_fraction_of_the_old_one() -> None:
    """Multiply-adds per image, counted by hooks on every conv and linear layer: the CIFAR-stem ResNet-18
    that `auto` used to pick at 64 px costs ~15x the ImageNet-stem one it picks on a CPU now."""

    def macs(net: nn.Module, size: int) -> int:
        total = 0

        def count(module, inputs, output) -> None:
            nonlocal total
            if isinstance(module, nn.Conv2d):
                total += output.numel() * module.in_channels * module.kernel_size[0] * module.kernel_size[1]
            elif isinstance(module, nn.Linear):
                total += output.numel() * module.in_features

        for m in net.modules():
            m.register_forward_hook(count)
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size))
        return total

    old = macs(build_backbone("resnet18", 3, 64, stem="cifar"), 64)
    new = macs(build_backbone("resnet18", 3, 64, stem="imagenet"), 64)
    assert 2.2e9 < old < 2.3e9 and 1.4e8 < new < 1.6e8 and old / new > 14


def test_runs_from_before_the_record_rebuild_their_cifar_stem() -> None:
    """A ResNet run at 96 px trained before `stem` existed had the CIFAR stem: loading it must not switch."""
    cfg = build_config(backbone="resnet18")
    assert stored_backbone("/nonexistent-run", cfg, _info(3, 96)) == ("resnet18", {"stem": "cifar"})
    auto = build_config()
    assert stored_backbone("/nonexistent-run", auto, _info(3, 96)) == ("resnet18", {"stem": "cifar"})
    assert stored_backbone("/nonexistent-run", auto, _info(1, 28)) == ("convnet", {})


def test_step_clock_says_the_first_step_and_the_settled_estimate(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(step_clock.time, "perf_counter", lambda: now[0])
    lines: list[str] = []
    clock = StepClock(steps_to_run=3900, steps_per_epoch=39, write=lines.append)
    for seconds in (9.0, 4.0, 4.0, 4.0, 4.0, 4.0, 4.0):
        now[0] += seconds
        clock.step_done()
    assert len(lines) == 2
    assert lines[0].startswith("first step: 9.0 s (with set-up); at that speed ~9.8 h for the 3900 steps")
    assert "an epoch of 39 steps, checkpointed at its end: ~6 min" in lines[0]
    assert lines[1].startswith("steps 2-6: 4.00 s each: ~4.3 h for the 3900 steps to run")


def test_step_clock_is_quiet_for_short_runs() -> None:
    lines: list[str] = []
    clock = StepClock(steps_to_run=10, steps_per_epoch=5, write=lines.append)
    for _ in range(10):
        clock.step_done()
    assert lines == []


def test_backward_runs_python_between_blocks_and_ctrl_c_leaves_it() -> None:
    """Python code (where the interpreter runs a pending SIGINT handler) runs between the blocks of the
    backward pass; a KeyboardInterrupt raised there leaves backward() at once, before the stem's grad."""
    torch.manual_seed(0)
    method = build_method("simclr", build_backbone("resnet18", 3, 16, width=8), {})
    handles = interruptible_backward(method)
    assert len(handles) >= 8 + 4  # at least every residual block and every stage
    calls = []
    hooked = method.backbone.stages[3][1]  # the last block: the first the backward pass reaches

    def on_output(hook):  # a forward hook that puts ``hook`` on the block's output (and returns None)
        return lambda module, inputs, out: out.register_hook(hook) and None

    handle = hooked.register_forward_hook(on_output(lambda g: calls.append("last block")))
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    method(views).backward()
    assert calls and all(p.grad is not None for p in method.backbone.parameters())

    method.zero_grad(set_to_none=True)

    def interrupt(grad: torch.Tensor) -> None:
        raise KeyboardInterrupt  # what the SIGINT handler raises when the hook gives it the chance

    handle.remove()
    hooked.register_forward_hook(on_output(interrupt))
    with pytest.raises(KeyboardInterrupt):
        method(views).backward()
    assert method.backbone.stem[0].weight.grad is None  # stopped before it reached the stem


def _photo_folder(root, count: int = 48, size: int = 72) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_a_64px_folder_trains_at_the_cpu_default_and_says_how_long(tmp_path, monkeypatch, capsys) -> None:
    _photo_folder(tmp_path / "photos")
    monkeypatch.setattr(step_clock, "QUIET_BELOW_S", 0.0)  # this tiny run is quick; a real one is not
    out = tmp_path / "run"
    args = ["train", "--method", "simclr", "--dataset", str(tmp_path / "photos"), "--image-size", "64"]
    args += ["--batch-size", "4", "--epochs", "1", "--out", str(out), "--no-progress", "train.max_steps=6"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "first step: " in err and "for the 6 steps to run (an epoch of 11 steps" in err
    assert "steps 2-6: " not in err  # six steps run: nothing left to estimate after them
    record = json.loads((out / "backbone.json").read_text())
    assert (record["name"], record["options"]["stem"], record["options"]["width"]) == (
        "resnet18",
        "imagenet",
        64,
    )
