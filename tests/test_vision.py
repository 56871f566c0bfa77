"""Against the field's own libraries, in the second environment (`make test-vision`; marked `vision`).

torchvision's ResNets and timm's ViTs, randomly initialised here (nothing is downloaded), give their
state dicts to the project's backbones through ``backbone.weights``: the features must be the same.
timm backbones (``backbone=timm:<name>``) train, embed and export end to end.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from probssl.nn import build_backbone

pytestmark = [pytest.mark.vision, pytest.mark.usefixtures("single_thread")]

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def _randomise_norms(net: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_torchvision_resnet_weights_give_torchvision_features(tmp_path, arch: str) -> None:
    torch.manual_seed(0)
    reference = _randomise_norms(getattr(torchvision.models, arch)(weights=None))
    torch.save(reference.state_dict(), tmp_path / f"{arch}.pth")  # conv1, bn1, layer1.0..., fc
    reference.fc = nn.Identity()
    ours = build_backbone(arch, 3, 128, stem="imagenet", weights=str(tmp_path / f"{arch}.pth")).eval()
    assert ours.weights_report.layout == "torchvision-resnet"
    assert ours.weights_report.unexpected == ["fc.weight", "fc.bias"] and ours.weights_report.missing == []
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("timm_name", "ours_name"), [("vit_small_patch16_224", "vit_small")])
def test_timm_vit_weights_give_timm_features_in_both_models(tmp_path, timm_name: str, ours_name: str) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(timm_name, pretrained=False, num_classes=0).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "vit.safetensors")
    ours = build_backbone(ours_name, 3, 224, weights=str(tmp_path / "vit.safetensors")).eval()
    assert ours.weights_report.missing == [] and ours.weights_report.unexpected == []
    theirs = build_backbone(f"timm:{timm_name}", 3, 224, weights=str(tmp_path / "vit.safetensors")).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(ours(x), expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(theirs(x), expected, atol=0, rtol=0)
    # and the other way: the project's ViT weights load into timm's model unchanged
    reference.load_state_dict(ours.state_dict())


def test_timm_backbone_trains_embeds_and_exports_end_to_end(tmp_path) -> None:
    import probssl
    from probssl.config import build_config
    from probssl.data import load_dataset
    from probssl.data.sources import ArraySource
    from probssl.export import export_run
    from probssl.train import train

    cfg = build_config(
        method="vi_simsiam",
        backbone="timm:resnet10t",
        data={"dataset": "digits", "subset": 64},
        train={"epochs": 1, "batch_size": 32, "progress": False, "tensorboard": False},
    )
    run = train(cfg, tmp_path / "run")
    assert '"name": "timm:resnet10t"' in (run / "backbone.json").read_text()
    test = load_dataset("digits", "test")
    found = probssl.embed_images(
        run, ArraySource(test.images[:8], test.labels[:8], test.classes, "d", "test")
    )
    assert found["embedding"].shape == (8, 512)
    path, _ = export_run(run, tmp_path / "enc.pt")
    module = torch.jit.load(str(path))
    embedding, uncertainty = module(test.images[:8].float() / 255)
    torch.testing.assert_close(embedding, torch.from_numpy(found["embedding"]), atol=1e-4, rtol=0)
    torch.testing.assert_close(uncertainty, torch.from_numpy(found["uncertainty"]), atol=1e-4, rtol=0)
