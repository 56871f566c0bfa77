"""``probssl export RUN --format onnx|torchscript --out FILE``: a run's encoder as one file for serving.

The exported graph takes float32 images [N, C, H, W] in [0, 1] (uint8 pixels / 255) at the run's image
size and channel count, and applies the run's own normalisation inside, so a deployment only has to
resize (shorter side, centre crop, as ``probssl embed`` does). Its outputs:

- ``embedding`` [N, D]: ``embed``'s mean where ``embed`` is a function of the image; for posteriors that
  draw samples (LAM, cSGHMC, ensembles of them) a point of the posterior, said in the file's metadata
  (``SSLMethod.export_note``, e.g. LAM's embedding under the posterior mean weights θ*);
- ``uncertainty`` [N], where it is a deterministic function of the image too (VI-SimSiam's 1/κ,
  ProSMIN's σ, SCL's latent spread: ``SSLMethod.exports_uncertainty``).

The batch dimension is dynamic. Metadata (method, image size, channels, mean/std, what each output
means, the run and the SHA-256 of its weights) travels in the file: ONNX ``metadata_props`` (written
with the ``onnx`` package) and a TorchScript archive's extra file ``probssl.json``.

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): the dynamo exporter needs
``onnxscript``, a further dependency, for no gain on these graphs. ``pip install probssl[export]``
brings ``onnx`` (the metadata) and ``onnxruntime`` (to run and check the file).
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from probssl.config import ConfigError
from probssl.io import atomic_write
from probssl.runs import LoadedRun, load_run

__all__ = ["FORMATS", "ExportedEncoder", "export_run", "format_for"]

FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts")}
METADATA_FILE = "probssl.json"  # the TorchScript extra file; ONNX: metadata_props["probssl"]
METADATA_KEY = "probssl"


class ExportedEncoder(nn.Module):
    """[0, 1] images → (embedding,) or (embedding, uncertainty), the run's normalisation inside."""

    def __init__(self, run: LoadedRun) -> None:
        super().__init__()
        self.method = run.method
        channels = run.info.channels
        self.register_buffer("mean", torch.tensor(run.info.mean, dtype=torch.float32).view(1, channels, 1, 1))
        self.register_buffer("std", torch.tensor(run.info.std, dtype=torch.float32).view(1, channels, 1, 1))
        self.with_uncertainty = run.method.exports_uncertainty

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        x = (images - self.mean) / self.std
        if self.with_uncertainty:
            embedding = self.method.embed(x)
            return embedding.mean.float(), embedding.uncertainty.float()
        return (self.method.point_embedding(x).float(),)


def format_for(out: str | Path, fmt: str | None) -> str:
    """The export format: ``fmt`` checked against ``out``'s suffix, or read from it."""
    suffix = Path(out).suffix
    if fmt is None:
        for name, suffixes in FORMATS.items():
            if suffix in suffixes:
                return name
        raise ConfigError(
            f"--out {out}: name the format with --format onnx|torchscript, or end it in .onnx / .pt"
        )
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt} is not one of {', '.join(FORMATS)}")
    if suffix not in FORMATS[fmt]:
        raise ConfigError(f"--out {out}: a {fmt} file ends in {' or '.join(FORMATS[fmt])}")
    return fmt


def _is_previous_export(path: Path) -> bool:
    """Whether ``path`` is a file this command wrote (so overwriting it loses nothing else)."""
    if path.suffix == ".onnx":
        try:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
        except Exception:  # noqa: BLE001  (whatever cannot be parsed as ONNX is not ours)
            return False
        return any(prop.key == METADATA_KEY for prop in model.metadata_props)
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(f"extra/{METADATA_FILE}") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def _metadata(run: LoadedRun, module: ExportedEncoder, fmt: str) -> dict[str, Any]:
    method = run.method
    outputs = {"embedding": method.export_note or "the mean embedding (probssl embed's `embedding`)"}
    if module.with_uncertainty:
        outputs["uncertainty"] = method.uncertainty_doc
    weights = run.run_dir / "model.json"
    return {
        "format": fmt,
        "method": run.config.method,
        "run": str(run.run_dir.absolute()),
        "weights_sha256": json.loads(weights.read_text()).get("sha256") if weights.is_file() else None,
        "input": (
            f"float32 [N, {run.info.channels}, {run.info.image_size}, {run.info.image_size}] in [0, 1] "
            "(uint8 pixels / 255), resized like probssl embed: shorter side, then the centre crop"
        ),
        "image_size": run.info.image_size,
        "channels": run.info.channels,
        "mean": list(run.info.mean),
        "std": list(run.info.std),
        "outputs": outputs,
        "probabilistic": method.probabilistic,
    }


def _write_onnx(module: nn.Module, example: Tensor, names: list[str], path: Path, meta: dict) -> None:
    try:
        import onnx
    except ImportError:
        raise ConfigError(
            "ONNX export needs the onnx package: pip install 'probssl[export]' (or --format torchscript)"
        ) from None
    axes = {"images": {0: "batch"}, **{name: {0: "batch"} for name in names}}

    def write(target: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
            torch.onnx.export(
                module, (example,), str(target), dynamo=False, input_names=["images"],
                output_names=names, dynamic_axes=axes, opset_version=17,
            )  # fmt: skip
        model = onnx.load(str(target))
        onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(meta)})
        onnx.save(model, str(target))

    atomic_write(path, write)


def _write_torchscript(module: nn.Module, example: Tensor, path: Path, meta: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export, still supported
        traced = torch.jit.trace(module, (example,), check_trace=False)
        atomic_write(
            path, lambda target: torch.jit.save(traced, str(target), {METADATA_FILE: json.dumps(meta)})
        )


def export_run(run_dir: str | Path, out: str | Path, fmt: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Export the run in ``run_dir`` to ``out`` (module docstring); returns the path and the metadata."""
    out = Path(out)
    fmt = format_for(out, fmt)
    if out.exists() and not (out.is_file() and _is_previous_export(out)):
        raise ConfigError(f"--out {out} exists and is not a file probssl export wrote; choose another path")
    run = load_run(run_dir, "cpu")
    module = ExportedEncoder(run).eval().requires_grad_(False)  # a served model computes no gradients
    size, channels = run.info.image_size, run.info.channels
    example = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(0))
    meta = _metadata(run, module, fmt)
    names = list(meta["outputs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        if fmt == "onnx":
            _write_onnx(module, example, names, out, meta)
        else:
            _write_torchscript(module, example, out, meta)
    return out, meta
