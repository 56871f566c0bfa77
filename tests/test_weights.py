"""Local pretrained weights (backbone.weights=PATH, --init RUN): layouts, prefixes, adaptation, bad files."""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from probssl.nn import build_backbone
from probssl.nn.weights import WeightsError, load_backbone_weights, read_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")


def torchvision_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """This project's ResNet state dict renamed as torchvision names its ResNets (conv1, bn1,
    layerN.B.convK / bnK / downsample.{0,1}), written here independently of the loader's own map."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^stem\.0\.", "conv1.", key)
        key = re.sub(r"^stem\.1\.", "bn1.", key)
        key = re.sub(r"^stages\.(\d)\.", lambda m: f"layer{int(m.group(1)) + 1}.", key)
        key = re.sub(r"\.norm(\d)\.", r".bn\1.", key).replace(".shortcut.", ".downsample.")
        out[key] = value.clone()
    return out


def _features(net: nn.Module, size: int, channels: int = 3) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return net.eval()(torch.randn(2, channels, size, size))


def _randomised(net: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that loading them matters."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return net


def test_own_layout_round_trip_safetensors(tmp_path) -> None:
    torch.manual_seed(0)
    source = _randomised(build_backbone("resnet18", 3, 32, width=8))
    save_file(source.state_dict(), tmp_path / "r18.safetensors")
    target = build_backbone("resnet18", 3, 32, width=8, weights=str(tmp_path / "r18.safetensors"))
    torch.testing.assert_close(_features(target, 32), _features(source, 32), atol=0, rtol=0)
    report = target.weights_report
    assert (report.layout, report.prefix, report.missing, report.unexpected) == ("probssl", "", [], [])
    assert report.loaded == report.total == len(source.state_dict())


@pytest.mark.parametrize("nest", [None, "state_dict", "model"])
def test_nested_pt_with_a_ddp_prefix(tmp_path, nest) -> None:
    torch.manual_seed(0)
    source = _randomised(build_backbone("convnet", 1, 28, width=8))
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    content = state if nest is None else {nest: state, "epoch": 7, "optimizer": {"lr": 0.1}}
    torch.save(content, tmp_path / "w.pth")
    target = build_backbone("convnet", 1, 28, width=8)
    report = load_backbone_weights(target, tmp_path / "w.pth")
    assert report.prefix == "module." and report.loaded == len(state)
    torch.testing.assert_close(_features(target, 28, 1), _features(source, 28, 1), atol=0, rtol=0)


@pytest.mark.parametrize(("name", "size"), [("resnet18", 224), ("resnet50", 96)])
def test_torchvision_resnet_layout(tmp_path, name: str, size: int) -> None:
    """conv1/bn1/layerN/downsample names, the classifier fc reported as unexpected, outputs identical."""
    torch.manual_seed(0)
    source = _randomised(build_backbone(name, 3, size, stem="imagenet", width=8))
    state = torchvision_names(source.state_dict())
    assert "layer1.0.conv1.weight" in state and "conv1.weight" in state and "bn1.running_var" in state
    state["fc.weight"], state["fc.bias"] = torch.randn(10, source.out_dim), torch.zeros(10)
    torch.save(state, tmp_path / "tv.pth")
    target = build_backbone(name, 3, size, stem="imagenet", width=8)
    report = load_backbone_weights(target, tmp_path / "tv.pth", name)
    assert report.layout == "torchvision-resnet" and report.missing == []
    assert report.unexpected == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(_features(target, size), _features(source, size), atol=0, rtol=0)
    assert "unexpected (not loaded): fc.weight, fc.bias" in "\n".join(report.lines())


def test_timm_vit_layout_with_a_head_and_another_image_size(tmp_path) -> None:
    """timm names are the ViT's own; position embeddings made for 32 px are resampled for 16 px."""
    torch.manual_seed(0)
    source = build_backbone("vit_tiny", 3, 32, patch_size=4)
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    state["model.head.weight"] = torch.zeros(5, 192)
    save_file(state, tmp_path / "vit.safetensors")
    same = build_backbone("vit_tiny", 3, 32, patch_size=4)
    load_backbone_weights(same, tmp_path / "vit.safetensors")
    torch.testing.assert_close(_features(same, 32), _features(source, 32), atol=0, rtol=0)
    smaller = build_backbone("vit_tiny", 3, 16, patch_size=4)
    report = load_backbone_weights(smaller, tmp_path / "vit.safetensors")
    assert report.unexpected == ["head.weight"] and report.adapted == [
        "model.pos_embed (1, 65, 192) → (1, 17, 192)"
    ]
    # the net built for 32 px runs a 16-px input with the same resampled positions
    torch.testing.assert_close(_features(smaller, 16), _features(source, 16), atol=1e-5, rtol=1e-5)


def test_rgb_first_conv_on_grey_images_is_summed(tmp_path) -> None:
    torch.manual_seed(0)
    rgb = build_backbone("resnet18", 3, 32, width=8)
    save_file(rgb.state_dict(), tmp_path / "rgb.safetensors")
    grey = build_backbone("resnet18", 1, 32, width=8)
    report = load_backbone_weights(grey, tmp_path / "rgb.safetensors")
    assert report.adapted and report.adapted[0].startswith("stem.0.weight (8, 3, 3, 3) → (8, 1, 3, 3)")
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # a grey image is an RGB image with three equal channels
        torch.testing.assert_close(grey.eval()(x), rgb.eval()(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)


def test_a_runs_method_weights_give_its_backbone(tmp_path) -> None:
    """A run's model.safetensors holds backbone.*, projector.*, and for ProSMIN target.backbone.* too:
    the shortest prefix that fits is taken."""
    from probssl.methods import build_method

    torch.manual_seed(0)
    method = build_method("prosmin", build_backbone("convnet", 1, 8, width=4), {"out_dim": 16})
    with torch.no_grad():
        for p in method.target.parameters():
            p.add_(1.0)  # a target that differs from the online backbone
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, tmp_path / "model.safetensors")
    target = build_backbone("convnet", 1, 8, width=4)
    report = load_backbone_weights(target, tmp_path / "model.safetensors")
    assert report.prefix == "backbone." and report.elsewhere > 0
    torch.testing.assert_close(target.state_dict(), method.backbone.state_dict(), atol=0, rtol=0)


def test_another_architecture_is_one_error(tmp_path) -> None:
    save_file(build_backbone("vit_tiny", 3, 32).state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(WeightsError, match=r"does not fit backbone 'resnet18': 0 of its \d+ tensors found"):
        build_backbone("resnet18", 3, 32, weights=str(tmp_path / "vit.safetensors"))
    save_file(build_backbone("resnet18", 3, 32, width=8).state_dict(), tmp_path / "r18.safetensors")
    with pytest.raises(
        WeightsError, match=r"'stem.0.weight' is \(8, 3, 3, 3\) in the file but \(16, 3, 3, 3\)"
    ):
        build_backbone("resnet18", 3, 32, width=16, weights=str(tmp_path / "r18.safetensors"))
    with pytest.raises(WeightsError, match=r"does not fit backbone 'resnet50': 100 of its 265 tensors found"):
        build_backbone("resnet50", 3, 32, width=8, weights=str(tmp_path / "r18.safetensors"))


def test_truncated_files(tmp_path) -> None:
    net = build_backbone("convnet", 1, 8, width=4)
    save_file(net.state_dict(), tmp_path / "w.safetensors")
    torch.save(net.state_dict(), tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut-{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(WeightsError, match="cannot be read.*truncated"):
            read_state_dict(tmp_path / f"cut-{name}")


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_with_code_is_refused_unrun(tmp_path) -> None:
    marker = tmp_path / "code-ran"
    payload = _RunsCode()
    payload.marker = marker
    torch.save({"stem.0.weight": torch.zeros(1), "x": payload}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match=r"holds Python objects other than tensors \(.*GLOBAL.*system"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_missing_and_unknown_files(tmp_path) -> None:
    with pytest.raises(WeightsError, match="weights file not found"):
        read_state_dict(tmp_path / "nope.pt")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match=r"unknown weights format '\.npz'; use \.safetensors"):
        read_state_dict(tmp_path / "w.npz")
    (tmp_path / "folder").mkdir()
    with pytest.raises(WeightsError, match="not a probssl run"):
        read_state_dict(tmp_path / "folder")


def test_cli_bad_weights_are_one_line_and_leave_nothing_behind(tmp_path, capsys) -> None:
    """Issue 32's bad inputs through `probssl train`: exit 2, one `error:` line, no run directory."""
    from probssl.cli import main

    save_file(build_backbone("vit_tiny", 3, 32).state_dict(), tmp_path / "vit.safetensors")
    cut = tmp_path / "cut.pt"
    torch.save(build_backbone("convnet", 1, 8, width=8).state_dict(), cut)
    cut.write_bytes(cut.read_bytes()[:300])
    marker = tmp_path / "code-ran"
    payload = _RunsCode()
    payload.marker = marker
    torch.save({"x": payload}, tmp_path / "evil.pt")
    cases = [
        ("vit.safetensors", "does not fit backbone 'convnet'"),
        ("cut.pt", "cannot be read (truncated or damaged?)"),
        ("evil.pt", "holds Python objects other than tensors"),
    ]
    out = tmp_path / "run"
    for name, message in cases:
        args = ["train", "--method", "simclr", "--dataset", "digits", "--backbone", "convnet"]
        args += [
            "backbone.width=8",
            f"backbone.weights={tmp_path / name}",
            "--out",
            str(out),
            "--no-progress",
        ]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    args = ["train", "--method", "simclr", "--dataset", "digits", "--backbone", "vit_tiny"]
    assert main([*args, "backbone.patch_size=3", "--out", str(out), "--no-progress"]) == 2
    assert (
        "error: backbone.patch_size=3 does not divide the image size 8; use one of 1, 2, 4"
        in capsys.readouterr().err
    )
    assert not out.exists() and not marker.exists()
