"""``probssl embed`` / ``probssl.embed_images``: a trained run's embeddings, uncertainties and OOD p-values.

The images get exactly the run's own preprocessing: resized to the run's image size (shorter side +
centre crop, by the data layer's reader), converted to its channel count, normalised with the mean/std
stored with the run (``dataset_info.json``). The source is read in batches through the streaming
reader, so a folder of any size is embedded with a few batches in memory.

*Is this image unlike my training data?* ``ood_pvalue`` is a conformal p-value (docs/methods.md §5):
if an image comes from the training distribution, P(ood_pvalue < α) ≤ α, so flagging
``ood_pvalue < alpha`` (``ood_flag``) wrongly flags at most a fraction α of in-distribution images.
It combines four feature-space detectors and the method's own uncertainty (Tippett's minimum,
re-calibrated), each calibrated on a fixed slice of the training split that their reference left out
(:mod:`probssl.eval.ood_reference`; fitted once and cached in ``RUN/features/``). ``ood_score`` is
the cosine distance ``1 - cos`` between an image's (mean) embedding and the k-th nearest (k = 1 by
default) reference embedding: higher = more out-of-distribution, but on no stated scale. The
training embeddings are the run's cached feature bank (``features/train_S<S>.safetensors``, as
``probssl eval`` writes it) when it exists; otherwise the training split is embedded once and cached.
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
from probssl.data.given_images import GIVEN, images_in_memory, is_in_memory
from probssl.data.pipeline import sequential_batches
from probssl.data.shift_sets import conform
from probssl.data.sources import ImageSource
from probssl.eval.conformal import DEFAULT_ALPHA, check_alpha, unreachable_alpha_message
from probssl.io import atomic_write_text
from probssl.runs import load_run

__all__ = ["embed_images", "embedding_paths", "knn_cosine_distance", "open_images", "write_embeddings"]


def open_images(
    source: str | os.PathLike[str] | ImageSource | Any,
    image_size: int,
    skip_corrupt: bool = False,
) -> ImageSource:
    """A folder (flat or with class folders), a tar of one, one image file, or an ImageSource as it is;
    or images in memory (:func:`probssl.data.given_images.images_in_memory`: uint8 [N, C, H, W], a
    list of Pillow images or image paths).

    Images are read at the run's ``image_size`` (shorter side + centre crop); channels are matched per
    batch (grey <-> RGB) by :func:`embed_images`. ``skip_corrupt`` decodes every image once up front
    and leaves the unreadable ones out (``skipped_items`` names them) instead of stopping at the first.
    """
    if isinstance(source, ImageSource):
        return source
    if is_in_memory(source):
        return images_in_memory(source, image_size)
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"cannot read images from a {type(source).__name__}; pass {GIVEN}")
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
    ``knn<k>`` OOD detector of ``eval.json``.
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
    source: str | os.PathLike[str] | ImageSource | Any,
    samples: int | None = None,
    *,
    k: int = 1,
    alpha: float = DEFAULT_ALPHA,
    batch_size: int | None = None,
    workers: int = 0,
    data_dir: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    skip_corrupt: bool = False,
    dataset: str | None = None,
) -> dict[str, Any]:
    """Embed every image of ``source`` with the run in ``run_dir``: a folder, a tar of one or an image
    file; or images in memory — uint8 pixels [N, C, H, W] (tensor or array, C = 1 or 3) or a list of
    Pillow images or image paths — resized, converted and normalised as the run's own images were.

    Returns numpy arrays: ``embedding`` [N, D] (the mean embedding), ``uncertainty`` [N] (the
    method's own; zeros for deterministic methods), ``ood_pvalue`` [N] (the combined conformal
    p-value: small = unlike the training data), ``ood_flag`` [N] (``ood_pvalue < alpha``),
    ``pvalue/<detector>`` [N] for each member of the combination, ``ood_score`` [N] (cosine distance
    to the k-th nearest reference training embedding; higher = more OOD), ``path`` [N] (file or tar
    member of each row), ``alpha`` (0-d), and ``samples`` [S, N, D] when ``samples`` is given and the
    method draws embeddings. With labelled training data also ``reliability`` [N] (the calibrated
    probability that ``knn_prediction`` [N], the run's kNN label for the image, is right) and
    ``classes`` [C]; without labels ``reliability`` is absent and a warning says why. With
    ``skip_corrupt``, unreadable images are left out and named in ``skipped`` (one path each).

    ``embedding`` and ``uncertainty`` are computed as the run's evaluation computes them (its
    ``eval.samples`` posterior draws), since the p-values are calibrated on those; a different
    ``samples`` only changes the draws returned in ``samples``.
    ``samples`` must be a positive integer, at most the run's posterior draws where it has a fixed
    number (cSGHMC's weight samples, an ensemble's members). ``data_dir`` / ``dataset``: where the
    run's training data is now, if it moved (the OOD reference embeds it).
    """
    from probssl.eval.evaluate import Evaluator  # heavy; keeps `import probssl.apply_run` light
    from probssl.eval.ood_reference import fitted_reference, is_labelled, reference_key

    check_samples(samples)
    check_alpha(alpha)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = load_run(run_dir, device, data_dir=data_dir, dataset=dataset)
    cfg, info, method = run.config, run.info, run.method
    check_samples(samples, method.available_draws(), run_dir)
    images = open_images(source, info.image_size, skip_corrupt)
    if len(images) == 0:
        raise DatasetError("no images given" if is_in_memory(source) else f"{source} holds no images")

    evaluator = Evaluator(run, data_dir, cfg.eval.samples, device, progress)
    method.prepare_for_evaluation(evaluator.training_batches)  # e.g. BatchNorm statistics per draw
    train_bank, _ = evaluator.split("train")
    reference = fitted_reference(
        run.run_dir / "features" / f"ood_reference_S{cfg.eval.samples}.safetensors",
        reference_key(evaluator.split_key("train"), cfg.train.seed, cfg.eval.knn_temperature),
        train_bank,
        cfg.train.seed,
        cfg.eval.knn_temperature,
    )
    message = unreachable_alpha_message(alpha, reference.calibration_items)
    if message is not None:
        warnings.warn(message, stacklevel=2)

    calibrated = cfg.eval.samples if cfg.eval.samples > 1 else None  # as the feature bank was embedded
    means, uncertainties, draws = [], [], []
    warned = False
    with torch.no_grad():
        for batch in sequential_batches(images, batch_size or cfg.eval.batch_size, workers):
            x = to_float(
                conform(batch, info.channels, info.image_size).to(device, non_blocking=True),
                info.mean,
                info.std,
            )
            embedding = method.embed(x, samples=calibrated)
            means.append(embedding.mean.float().cpu())
            uncertainties.append(embedding.uncertainty.float().cpu())
            if samples is not None and samples != calibrated:
                embedding = method.embed(x, samples=samples)
            if samples is not None and embedding.samples is not None:
                draws.append(embedding.samples.float().cpu())
            elif samples is not None and not warned:
                warnings.warn(
                    f"{cfg.method} has no posterior draws (a point embedding); samples={samples} is ignored",
                    stacklevel=2,
                )
                warned = True
    mean, uncertainty = torch.cat(means), torch.cat(uncertainties)
    found = reference.apply(mean, uncertainty, k=k)
    result: dict[str, Any] = {
        "embedding": mean.numpy(),
        "uncertainty": uncertainty.numpy(),
        "ood_score": found["ood_score"].float().numpy(),
        "ood_pvalue": found["ood_pvalue"].numpy(),
        "ood_flag": (found["ood_pvalue"] < alpha).numpy(),
        "alpha": np.array(alpha),
        "path": np.array([images.item_id(i) for i in range(len(images))], dtype=str),
    }
    result.update({key: value.numpy() for key, value in found.items() if key.startswith("pvalue/")})
    if "reliability" in found:
        result["reliability"] = found["reliability"].numpy()
        result["knn_prediction"] = found["knn_prediction"].numpy()
        classes = list(evaluator.dataset("train").classes or ())
        if len(classes) == reference.num_classes:
            result["classes"] = np.array(classes, dtype=str)
    elif not is_labelled(train_bank.labels):
        warnings.warn(
            "no `reliability`: the run's training images have no labels, so there is no kNN label "
            "prediction to calibrate (train on class folders to get one)",
            stacklevel=2,
        )
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
    """``out`` (.npz with every array) and ``out`` with .csv: one row per image, the most
    out-of-distribution first (smallest ``ood_pvalue``; ties by the highest ``ood_score``, then the
    highest uncertainty)."""
    out, table = embedding_paths(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial.npz")  # atomic: a killed write leaves no half file
    np.savez(partial, **result)
    os.replace(partial, out)
    order = np.lexsort((-result["uncertainty"], -result["ood_score"], result["ood_pvalue"]))
    labelled = "reliability" in result
    header = ["rank", "path", "ood_pvalue", "ood_flag", "ood_score", "uncertainty"]
    header += ["knn_prediction", "reliability"] if labelled else []
    lines = [header]
    for rank, i in enumerate(order, start=1):
        row = [
            str(rank),
            str(result["path"][i]),
            repr(float(result["ood_pvalue"][i])),
            str(bool(result["ood_flag"][i])).lower(),
            repr(float(result["ood_score"][i])),
            repr(float(result["uncertainty"][i])),
        ]
        if labelled:
            prediction = int(result["knn_prediction"][i])
            classes = result.get("classes")
            row += [str(classes[prediction]) if classes is not None else str(prediction)]
            row += [repr(float(result["reliability"][i]))]
        lines.append(row)
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(lines)
    atomic_write_text(table, buffer.getvalue())
    return out, table
