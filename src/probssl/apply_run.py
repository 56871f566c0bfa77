"""``probssl embed`` / ``probssl.embed_images``: a trained run's embeddings, uncertainties and OOD scores.

The images get exactly the run's own preprocessing: resized to the run's image size (shorter side +
centre crop, by the data layer's reader), converted to its channel count, normalised with the mean/std
stored with the run (``dataset_info.json``). The source is read in batches through the streaming
reader, so a folder of any size is embedded with a few batches in memory.

The OOD score of an image is the cosine distance ``1 - cos`` between its (mean) embedding and the k-th
nearest (k = 1 by default) of the run's training embeddings, both L2-normalised: **higher = more
out-of-distribution**. The training embeddings are the run's cached feature bank
(``features/train_S<S>.safetensors``, as ``probssl eval`` writes it) when it exists; otherwise the
training split is embedded once and cached there.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from probssl.config import ConfigError
from probssl.data import DatasetError, open_source, skipped_items, to_float
from probssl.data.pipeline import sequential_batches
from probssl.data.shift_sets import conform
from probssl.data.sources import ImageSource
from probssl.io import atomic_write_text
from probssl.runs import load_run

__all__ = ["embed_images", "embedding_paths", "knn_cosine_distance", "open_images", "write_embeddings"]


def open_images(
    source: str | os.PathLike[str] | ImageSource, image_size: int, skip_corrupt: bool = False
) -> ImageSource:
    """A folder (flat or with class folders), a tar of one, one image file, or an ImageSource as it is.

    Paths are read at the run's ``image_size`` (shorter side + centre crop); channels are matched per
    batch (grey <-> RGB) by :func:`embed_images`. ``skip_corrupt`` decodes every image once up front
    and leaves the unreadable ones out (``skipped_items`` names them) instead of stopping at the first.
    """
    if isinstance(source, ImageSource):
        return source
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"{path} does not exist; pass an image folder, a .tar of one, or an image file")
    return open_source(
        str(path.absolute()),
        "all",
        image_size=image_size,
        download=False,
        verify=False,
        skip_corrupt=skip_corrupt,
    )


def knn_cosine_distance(
    queries: torch.Tensor, reference: torch.Tensor, k: int = 1, chunk: int = 1024
) -> torch.Tensor:
    """``1 - cos`` to the k-th most similar reference row, for each query row ([Q, D], [R, D] → [Q]).

    Both sides are L2-normalised; the similarities are the evaluation's own
    (:func:`probssl.eval.knn.top_similarities`, ``chunk`` queries at a time), so this score is the
    ``knn<k>`` OOD detector of ``eval.json`` shifted by one.
    """
    from probssl.eval.knn import top_similarities

    if not 1 <= k <= reference.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the {reference.shape[0]} reference features")
    return 1.0 - top_similarities(reference.float(), queries.float(), k, chunk)[:, k - 1]


def check_samples(samples: int | None, available: int | None = None, run_dir: object = "the run") -> None:
    """``samples``: None, or a positive integer no larger than the ``available`` draws (None: any)."""
    if samples is None:
        return
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ConfigError(f"--samples must be a positive integer (posterior draws per image), got {samples}")
    if available is not None and samples > available:
        can = f"ask for 1 to {available}" if available else "drop --samples (its embedding is a point)"
        raise ConfigError(f"--samples {samples}: {run_dir} has {available} posterior draws; {can}")


def embed_images(
    run_dir: str | os.PathLike[str],
    source: str | os.PathLike[str] | ImageSource,
    samples: int | None = None,
    *,
    k: int = 1,
    batch_size: int | None = None,
    workers: int = 0,
    data_dir: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    skip_corrupt: bool = False,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Embed every image of ``source`` with the run in ``run_dir``.

    Returns numpy arrays: ``embedding`` [N, D] (``Embedding.mean``: the mean of the method's
    embedding distribution as docs/methods.md defines it per method, e.g. the average over the
    cSGHMC weight samples used, so it depends on ``samples``), ``uncertainty`` [N] (the
    method's own; zeros for deterministic methods), ``ood_score`` [N] (cosine distance to the k-th
    nearest training embedding; higher = more OOD), ``path`` [N] (file or tar member of each row), and
    ``samples`` [S, N, D] when ``samples`` is given and the method draws embeddings. With
    ``skip_corrupt``, unreadable images are left out and named in ``skipped`` (one path each).
    ``samples`` must be a positive integer, at most the run's posterior draws where it has a fixed
    number (cSGHMC's weight samples, an ensemble's members). ``data_dir`` / ``dataset``: where the
    run's training data is now, if it moved (the OOD reference embeds it).
    """
    from probssl.eval.evaluate import Evaluator  # heavy; keeps `import probssl.apply_run` light

    check_samples(samples)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = load_run(run_dir, device, data_dir=data_dir, dataset=dataset)
    cfg, info, method = run.config, run.info, run.method
    check_samples(samples, method.available_draws(), run_dir)
    images = open_images(source, info.image_size, skip_corrupt)
    if len(images) == 0:
        raise DatasetError(f"{source} holds no images")

    evaluator = Evaluator(run, data_dir, cfg.eval.samples, device, progress)
    method.prepare_for_evaluation(evaluator.training_batches)  # e.g. BatchNorm statistics per draw
    train_bank, _ = evaluator.split("train")

    means, uncertainties, draws = [], [], []
    warned = False
    with torch.no_grad():
        for batch in sequential_batches(images, batch_size or cfg.eval.batch_size, workers):
            x = conform(batch, info.channels, info.image_size).to(device, non_blocking=True)
            embedding = method.embed(to_float(x, info.mean, info.std), samples=samples)
            means.append(embedding.mean.float().cpu())
            uncertainties.append(embedding.uncertainty.float().cpu())
            if samples is not None and embedding.samples is not None:
                draws.append(embedding.samples.float().cpu())
            elif samples is not None and not warned:
                warnings.warn(
                    f"{cfg.method} has no posterior draws (a point embedding); samples={samples} is ignored",
                    stacklevel=2,
                )
                warned = True
    mean = torch.cat(means)
    result: dict[str, Any] = {
        "embedding": mean.numpy(),
        "uncertainty": torch.cat(uncertainties).numpy(),
        "ood_score": knn_cosine_distance(mean, train_bank.mean, k=k).numpy(),
        "path": np.array([images.item_id(i) for i in range(len(images))], dtype=str),
    }
    if draws:
        result["samples"] = torch.cat(draws, dim=1).numpy()
    if skip_corrupt:
        result["skipped"] = np.array(skipped_items(images), dtype=str)
    return result


def embedding_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The .npz ``embed --out`` writes (``.npz`` appended unless given) and the .csv beside it."""
    out = Path(out)
    if out.suffix != ".npz":
        out = out.with_name(out.name + ".npz")
    return out, out.with_suffix(".csv")


def write_embeddings(result: dict[str, Any], out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``out`` (.npz with every array) and ``out`` with .csv: one row per image, most uncertain first
    (then highest OOD score first)."""
    out, table = embedding_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial.npz")  # atomic: a killed write leaves no half file
    np.savez(partial, **result)
    os.replace(partial, out)
    # most uncertain first; ties (all of them for a deterministic method) most out-of-distribution first
    order = np.lexsort((-result["ood_score"], -result["uncertainty"]))
    lines = [["rank", "path", "uncertainty", "ood_score"]]
    for rank, i in enumerate(order, start=1):
        lines.append(
            [
                str(rank),
                str(result["path"][i]),
                repr(float(result["uncertainty"][i])),
                repr(float(result["ood_score"][i])),
            ]
        )
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    atomic_write_text(table, buffer.getvalue())
    return out, table
