"""``probssl eval RUN_DIR``: features once, every probe from the cache, one flat ``eval.json``.

Protocol (design.md §4): features from the backbone on un-augmented images in eval mode; probes
are fitted on the training split only (the linear probe's L2 is chosen on a validation split
carved from it) and scored on the test split. Suites:

- ``basic``: kNN (k = 20, 200) and the linear probe.
- ``uncertainty``: basic + calibration, selective prediction and OOD — the columns a method's
  uncertainty is judged by, at a fraction of ``full``'s cost for sample-based methods.
- ``full``:  uncertainty + corruptions, low-shot, transfer, retrieval (see :mod:`probssl.eval.suite`).

``uncertainty`` and ``full`` also write ``eval_details.json`` with the report's plot data.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from probssl.data import DatasetError, ImageDataset, get_dataset_info, load_dataset, to_float
from probssl.data.corruptions import corrupt, corruption_names
from probssl.data.shift_sets import OOD_SETS, TRANSFER_SETS, load_shift_set
from probssl.embedding import Embedding
from probssl.eval import suite
from probssl.eval.features import FeatureBank, cached_features, extract_features
from probssl.eval.knn import knn_predict_marginal
from probssl.eval.metrics import nll, top1
from probssl.io import atomic_write_json
from probssl.runs import LoadedRun, load_run

SUITES = ("basic", "uncertainty", "full")


class Evaluator:
    """Embeds image sets with one run's method (cached per split) and fits its probes once."""

    def __init__(
        self,
        run: LoadedRun,
        data_dir: str | None,
        samples: int,
        device: torch.device,
        progress: bool,
        tag: str = "",
    ) -> None:
        self.run, self.cfg = run, run.config
        self.data_dir = data_dir or self.cfg.data.data_dir
        self.samples, self.device, self.progress, self.tag = samples, device, progress, tag
        self.info = get_dataset_info(self.cfg.data.dataset)
        self._datasets: dict[str, ImageDataset] = {}

    def dataset(self, split: str) -> ImageDataset:
        """One split of the run's own dataset, read (and checksummed) once per evaluation."""
        if split not in self._datasets:
            cfg = self.cfg.data
            self._datasets[split] = load_dataset(cfg.dataset, split, self.data_dir, cfg.download)
        return self._datasets[split]

    def embed(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        desc: str = "features",
        represent: Callable[[torch.Tensor], Embedding] | None = None,
    ) -> FeatureBank:
        """Features of ``images`` under the method's ``embed`` (or another ``represent``ation)."""
        labels = labels if labels is not None else torch.full((len(images),), -1, dtype=torch.long)
        if represent is None:
            samples = self.samples if self.samples > 1 else None
            represent = lambda x: self.run.method.embed(x, samples=samples)  # noqa: E731
        return extract_features(
            represent,
            images,
            labels,
            lambda x: to_float(x, self.info.mean, self.info.std),
            batch_size=self.cfg.eval.batch_size,
            device=self.device,
            progress=self.progress,
            desc=desc,
        )

    def training_batches(self) -> Iterator[torch.Tensor]:
        """Normalised, un-augmented training images in a fixed shuffled order, one batch at a time
        (what :meth:`SSLMethod.prepare_for_evaluation` gets, e.g. for BatchNorm re-estimation)."""
        images = self.dataset("train").images
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.cfg.train.seed))
        for start in range(0, len(images), self.cfg.eval.batch_size):
            batch = images[order[start : start + self.cfg.eval.batch_size]].to(self.device)
            yield to_float(batch, self.info.mean, self.info.std)

    def split(self, split: str) -> tuple[FeatureBank, torch.Tensor]:
        """Cached features of one split of the run's own dataset, and its images."""
        dataset = self.dataset(split)
        weights = self.run.weights_meta.get("sha256", "partial")
        key = f"{weights}|{self.run.method.cache_tag()}|{self.cfg.data.dataset}|{split}|S={self.samples}"
        path = self.run.run_dir / "features" / f"{split}_S{self.samples}{self.tag}.safetensors"
        bank = cached_features(
            path, key, lambda: self.embed(dataset.images, dataset.labels, f"features/{split}")
        )
        return bank, dataset.images


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | None = None,
    samples: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    step: int | None = None,
    suite_name: str = "full",
    download: bool = False,
) -> dict[str, Any]:
    """Evaluate a trained run; writes ``eval.json`` (``eval_step<N>.json`` for a checkpoint).

    OOD and transfer sets are other datasets than the one trained on: they are read from the data
    directory, and fetched over the network only with ``download=True`` (a missing one is skipped
    with one warning line; ``meta/skipped`` in eval.json keeps the full reason).
    """
    if suite_name not in SUITES:
        raise ValueError(f"unknown suite '{suite_name}'; valid suites: {', '.join(SUITES)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run = load_run(run_dir, device, step=step)
    cfg = run.config
    samples = samples or cfg.eval.samples
    started = time.perf_counter()
    ev = Evaluator(run, data_dir, samples, device, progress, "" if step is None else f"_step{step}")
    run.method.prepare_for_evaluation(ev.training_batches)
    train, _ = ev.split("train")
    test, test_images = ev.split("test")
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1

    results: dict[str, Any] = {}
    for k in cfg.eval.knn_k:
        probs = knn_predict_marginal(
            train.draws, train.labels, test.draws, num_classes, k=k, temperature=cfg.eval.knn_temperature
        )
        results[f"knn/top1@{k}"] = top1(probs, test.labels)
    results["knn/top1"] = results[f"knn/top1@{cfg.eval.knn_k[0]}"]

    probe_kwargs = {
        "max_iter": cfg.eval.linear_max_iter,
        "seed": cfg.train.seed,
        "dtype": torch.float32,
        "select_max_items": 10_000,
    }
    probe = suite.MarginalProbe.fit(train, num_classes, **probe_kwargs)
    sample_probs = probe.sample_probs(test.draws)
    probs = sample_probs.mean(0)
    results["linear/top1"] = top1(probs, test.labels)
    results["linear/nll"] = nll(probs, test.labels)
    for name, represent in run.method.extra_representations().items():  # e.g. SCL's hard code
        banks = [
            ev.embed(ev.dataset(s).images, ev.dataset(s).labels, f"features/{name}-{s}", represent)
            for s in ("train", "test")
        ]
        extra_probe = suite.MarginalProbe.fit(banks[0], num_classes, **probe_kwargs)
        results[f"{name}/linear/top1"] = top1(extra_probe.sample_probs(banks[1].draws).mean(0), test.labels)
    info = ev.info
    results.update(run.method.model_metrics((info.channels, info.image_size, info.image_size)))
    results["linear/l2"] = probe.selected_l2

    details: dict[str, Any] = {}
    skipped: list[str] = []
    if suite_name in ("uncertainty", "full"):
        scores = suite.uncertainty_scores(sample_probs, test)
        correct = probs.argmax(1) == test.labels
        cal, details_cal = suite.calibration_suite(probs, test.labels)
        results.update(cal)
        details.update(details_cal)
        results.update(suite.selective_suite(scores, correct))
        details["ranked_images"] = suite.ranked_images(test_images, scores["entropy"])

        details["ood"] = {}
        for name in OOD_SETS.get(cfg.data.dataset, ("noise",)):
            try:
                ood_set = load_shift_set(
                    name,
                    cfg.data.dataset,
                    ev.data_dir,
                    download,
                    max_items=test.num_items,
                    seed=cfg.train.seed,
                )
            except DatasetError as err:
                skipped.append(f"ood/{name}: {err}")
                continue
            bank = ev.embed(ood_set.images, desc=f"features/ood-{name}")
            scores_out = suite.uncertainty_scores(probe.sample_probs(bank.draws), bank)
            metrics, plot = suite.ood_suite(name, scores, scores_out)
            results.update(metrics)
            details["ood"][name] = plot

    if suite_name == "full":
        n_shift = min(cfg.eval.shift_max_items, len(test_images))
        shift, details["shift"] = suite.shift_suite(
            probe,
            lambda images: ev.embed(images, desc="features/shift"),
            test_images[:n_shift],
            test.labels[:n_shift],
            corruption_names(ev.info.channels),
            lambda images, name, severity: corrupt(images, name, severity, seed=cfg.train.seed),
        )
        results.update(shift)

        results.update(suite.lowshot_suite(train, test, num_classes, run.run_dir / "splits", **probe_kwargs))

        for name in TRANSFER_SETS.get(cfg.data.dataset, ()):
            try:
                target = load_shift_set(
                    name,
                    cfg.data.dataset,
                    ev.data_dir,
                    download,
                    max_items=cfg.eval.transfer_max_items,
                    seed=cfg.train.seed,
                )
            except DatasetError as err:
                skipped.append(f"transfer/{name}: {err}")
                continue
            bank = ev.embed(target.images, target.labels, desc=f"features/transfer-{name}")
            results.update(suite.transfer_suite(name, bank, int(target.labels.max()) + 1, **probe_kwargs))

        uncertainty = test.uncertainty.float() if test.uncertainty.abs().sum() > 0 else scores["entropy"]
        ret, details["sparsification"] = suite.retrieval_suite(test, uncertainty)
        results.update(ret)
    for reason in skipped:
        what, _ = reason.split(": ", 1)
        hint = "not found or unreadable" + ("" if download else "; --download (or --data-dir DIR) adds it")
        warnings.warn(f"skipped {what} ({hint}; the reason is in eval.json's meta/skipped)", stacklevel=2)

    results["meta/method"] = cfg.method
    results["meta/dataset"] = cfg.data.dataset
    results["meta/suite"] = suite_name
    results["meta/samples"] = int(test.num_samples)
    results["meta/skipped"] = "; ".join(skipped)
    results["meta/partial_training"] = bool(run.weights_meta.get("partial", False))
    results["meta/step"] = step if step is not None else run.weights_meta.get("steps")
    results["meta/eval_seconds"] = time.perf_counter() - started
    results["seed"] = cfg.train.seed
    results.update({f"config/{k}": v for k, v in cfg.flat().items()})
    suffix = "" if step is None else f"_step{step}"
    if details:
        atomic_write_json(run.run_dir / f"eval_details{suffix}.json", details)
    atomic_write_json(run.run_dir / f"eval{suffix}.json", results)
    return results
