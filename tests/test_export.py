"""``probssl export``: ONNX (onnxruntime) and TorchScript files that give ``probssl embed``'s numbers."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch

import probssl
from probssl.cli import main
from probssl.config import ConfigError, build_config
from probssl.data import load_dataset, to_float
from probssl.data.sources import ArraySource
from probssl.export import export_run, format_for
from probssl.runs import load_run
from probssl.train import train

pytestmark = pytest.mark.usefixtures("single_thread")

TOLERANCE = 1e-4  # max abs difference on 32 images (issue 32)


def _run(tmp_path_factory, method: str, backbone: str = "convnet", **backbone_args):
    cfg = build_config(
        method=method,
        backbone=backbone,
        backbone_args={"width": 8} if backbone == "convnet" else backbone_args,
        method_args={"posterior": "posthoc"} if method == "lam" else {},
        data={"dataset": "digits", "subset": 128},
        train={"epochs": 1, "batch_size": 64, "progress": False, "tensorboard": False},
    )
    return train(cfg, tmp_path_factory.mktemp(method) / "run")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {m: _run(tmp_path_factory, m) for m in ("simclr", "vi_simsiam", "prosmin", "scl", "lam")}
    out["vit"] = _run(tmp_path_factory, "vi_simsiam", "vit_tiny", patch_size=4)
    return out


def _images(n: int = 32) -> tuple[ArraySource, np.ndarray]:
    test = load_dataset("digits", "test")
    source = ArraySource(test.images[:n], test.labels[:n], test.classes, "digits", "test")
    return source, np.asarray(test.images[:n], dtype=np.float32) / 255.0


@pytest.mark.parametrize("name", ["simclr", "vi_simsiam", "prosmin", "scl", "vit"])
def test_onnx_matches_probssl_embed(runs, tmp_path, name: str) -> None:
    ort = pytest.importorskip("onnxruntime")  # the export extra (installed by `make test`)
    path, meta = export_run(runs[name], tmp_path / "encoder.onnx")
    source, unit = _images()
    expected = probssl.embed_images(runs[name], source)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": unit})
    assert [o.name for o in session.get_outputs()] == list(meta["outputs"])
    np.testing.assert_allclose(outputs[0], expected["embedding"], atol=TOLERANCE, rtol=0)
    if name == "simclr":
        assert list(meta["outputs"]) == ["embedding"]  # deterministic: no uncertainty output
    else:
        np.testing.assert_allclose(outputs[1], expected["uncertainty"], atol=TOLERANCE, rtol=0)
    stored = json.loads(session.get_modelmeta().custom_metadata_map["probssl"])
    assert stored["image_size"] == 8 and stored["channels"] == 1 and stored["method"] == meta["method"]


def test_sampling_posterior_exports_its_point_embedding_with_a_note(runs, tmp_path) -> None:
    """LAM: the embedding under θ*, said in the metadata; no uncertainty output (it needs draws)."""
    ort = pytest.importorskip("onnxruntime")
    path, meta = export_run(runs["lam"], tmp_path / "lam.onnx")
    assert list(meta["outputs"]) == ["embedding"] and "posterior mean weights" in meta["outputs"]["embedding"]
    run = load_run(runs["lam"])
    test = load_dataset("digits", "test")
    with torch.no_grad():
        expected = run.method.point_embedding(to_float(test.images[:32], run.info.mean, run.info.std))
    (embedding,) = ort.InferenceSession(str(path)).run(None, {"images": _images()[1]})
    np.testing.assert_allclose(embedding, expected.numpy(), atol=TOLERANCE, rtol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", ["scl", "vit"])
def test_torchscript_matches_probssl_embed(runs, tmp_path, name: str) -> None:
    path, meta = export_run(runs[name], tmp_path / "encoder.pt")
    source, unit = _images()
    expected = probssl.embed_images(runs[name], source)
    extra = {"probssl.json": ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    embedding, uncertainty = module(torch.from_numpy(unit))
    np.testing.assert_allclose(embedding.numpy(), expected["embedding"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(uncertainty.numpy(), expected["uncertainty"], atol=TOLERANCE, rtol=0)
    assert json.loads(extra["probssl.json"])["outputs"].keys() == {"embedding", "uncertainty"}
    assert module(torch.rand(5, 1, 8, 8))[0].shape[0] == 5  # any batch size


def test_cli_refuses_to_overwrite_what_it_did_not_write(runs, tmp_path, capsys) -> None:
    run = runs["simclr"]
    model = run / "model.safetensors"
    before = model.read_bytes()
    assert main(["export", str(run), "--out", str(model)]) == 2
    assert "--format onnx|torchscript" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "x.onnx")]) == 2
    assert "a torchscript file ends in .pt or .ts" in capsys.readouterr().err
    other = tmp_path / "notes.pt"
    other.write_text("mine")
    assert main(["export", str(run), "--out", str(other)]) == 2
    assert "exists and is not a file probssl export wrote" in capsys.readouterr().err
    assert model.read_bytes() == before and other.read_text() == "mine"
    assert main(["export", str(run), "--out", str(tmp_path / "enc.pt")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "enc.pt")]) == 0  # its own file: replaced
    assert zipfile.is_zipfile(tmp_path / "enc.pt")
    assert "exported simclr (embedding; input float32 [N, 1, 8, 8])" in capsys.readouterr().out


def test_format_from_the_suffix() -> None:
    assert format_for("a.onnx", None) == "onnx" and format_for("a.ts", None) == "torchscript"
    with pytest.raises(ConfigError, match="not one of onnx, torchscript"):
        format_for("a.onnx", "tflite")
