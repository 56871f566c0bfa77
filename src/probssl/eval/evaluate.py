"""``probssl eval RUN_DIR``: features once, every probe from the cache, one flat ``eval.json``.

Protocol (design.md §4): features from the backbone on un-augmented images in eval mode; probes
are fitted on the training split only (the linear probe's L2 is chosen on a validation split
carved from it) and scored on the test split. Suites:

- ``basic``: kNN (k = 20, 200) and the linear probe.
- ``uncertainty``: basic + calibration, selective prediction and OOD — the columns a method's
  uncertainty is judged by, at a fraction of ``full``'s cost for sample-based methods.
- ``full``:  uncertainty + corruptions, low-shot, transfer, retrieval (see :mod:`probssl.eval.suite`).

``uncertainty`` and ``full`` also write ``eval_details.json`` with the report's plot data.

Cost: every image set is embedded once (banks are shared across stages), in the memory format the
run trained in, and all severities of a corruption go through the encoder in one pass; kNN computes
its similarity matrix once for every k, and the kNN OOD detector reads the test set's neighbours
from that pass (``NeighbourCache``); the linear probes use a closed-form gradient and mAP@R a
partial sort. Each stage (``STAGES``) has one progress bar and its wall and CPU time in
``meta/eval_seconds/<stage>`` and ``meta/eval_cpu_seconds/<stage>``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from probssl.data import DatasetError, ImageDataset, load_dataset, to_float
from probssl.data.corruptions import corrupt, corruption_names
from probssl.data.shift_sets import load_shift_set, ood_set_names, transfer_set_names
from probssl.embedding import Embedding
from probssl.eval import conformal, suite
from probssl.eval.evaluable import require_classes
from probssl.eval.features import FeatureBank, cached_features, content_key, extract_features
from probssl.eval.knn import NeighbourCache, knn_predict_many, knn_predict_marginal_many
from probssl.eval.linear import MAX_ITERATIONS
from probssl.eval.metrics import nll, top1
from probssl.eval.reliability import RELIABILITY_K
from probssl.io import atomic_write_json, read_json
from probssl.progress import StageProgress
from probssl.runs import LoadedRun, load_run, training_data_error

SUITES = ("basic", "uncertainty", "full")
#: eval.json keys that measure time, not the run: two evaluations of the same run differ only here.
TIMING_KEYS = ("meta/eval_seconds", "meta/eval_cpu_seconds", "meta/train_seconds", "meta/eval_to_train")
# Stages, each with one progress bar and its own ``meta/eval_seconds/<stage>`` in eval.json.
STAGES = ("features", "probes", "uncertainty", "ood", "shift", "lowshot", "transfer", "retrieval")


class Evaluator:
    """Embeds image sets with one run's method (cached per split) and fits its probes once.

    An image set is embedded once per evaluation whatever stage asks for it (an OOD set that is
    also a transfer set, e.g. MNIST for Fashion-MNIST), and each stage has one progress bar and
    one timer (:meth:`stage`). ``reuse=False`` recomputes everything every time it is asked for
    (the plain path, kept to check that sharing work changes no number).
    """

    def __init__(
        self,
        run: LoadedRun,
        data_dir: str | None,
        samples: int,
        device: torch.device,
        progress: bool,
        tag: str = "",
        reuse: bool = True,
        download: bool = False,
    ) -> None:
        self.run, self.cfg = run, run.config
        self.download = download  # fetch missing OOD / transfer sets (never by default: see evaluate_run)
        self.data_dir = data_dir or self.cfg.data.data_dir
        self.samples, self.device, self.progress, self.tag = samples, device, progress, tag
        self.info = run.info  # stored with the run: own folders have computed mean/std
        self._datasets: dict[str, ImageDataset] = {}
        self.reuse = reuse
        self._banks: dict[tuple[Callable | None, str], FeatureBank] = {}
        self._shift_sets: dict[tuple[str, int | None, bool], ImageDataset] = {}
        self._bar: StageProgress | None = None
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, unit: str = "img", total: int | None = None) -> Iterator[StageProgress]:
        """One progress bar and one timer for a stage; embedding inside it advances the bar."""
        bar = StageProgress(name, unit, total, enabled=self.progress)
        # Without a known total, the bar counts the images embedded in the stage (cached: none, no bar).
        self._bar = bar if total is None else None
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            yield bar
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
            # CPU time of this process: comparable across runs on a shared machine, where wall is not.
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + time.process_time() - cpu_started
            self._bar = None
            bar.close()

    def _count(self, images: int) -> Callable[[int], None] | None:
        """The callback that advances the current stage's count by each batch of ``images``."""
        bar = self._bar
        if bar is None or not bar.enabled:
            return None
        return bar.update

    def dataset(self, split: str) -> ImageDataset:
        """One split of the run's own dataset, read (and checksummed) once per evaluation."""
        if split not in self._datasets:
            cfg = self.cfg.data
            try:
                self._datasets[split] = load_dataset(
                    cfg.dataset, split, self.data_dir, cfg.download, **cfg.reader_options()
                )
            except DatasetError as error:  # moved since training: say so, and how to point at it
                raise training_data_error(self.cfg, error) from error
        return self._datasets[split]

    def embed(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        desc: str = "features",
        represent: Callable[[torch.Tensor], Embedding] | None = None,
    ) -> FeatureBank:
        """Features of ``images`` under the method's ``embed`` (or another ``represent``ation).

        Remembered by the images' content (and the representation), so the same images asked for
        by two stages are embedded once; ``labels`` are attached to the remembered bank. ``desc``
        names the image set (progress is shown per stage, see :meth:`stage`).
        """
        labels = labels if labels is not None else torch.full((len(images),), -1, dtype=torch.long)
        if not self.reuse:
            return self._extract(images, labels, represent)
        key = (represent, content_key(images))
        if key not in self._banks:
            self._banks[key] = self._extract(images, labels, represent)
        bank = self._banks[key]
        return FeatureBank(bank.draws, bank.mean, bank.uncertainty, labels.detach().cpu().long())

    def embed_many(self, image_sets: Sequence[torch.Tensor]) -> list[FeatureBank]:
        """Features of several equally sized image sets in one pass (batches never mix two sets)."""
        if not self.reuse:
            return [self.embed(images) for images in image_sets]
        size = len(image_sets[0])
        images = torch.cat(list(image_sets))
        labels = torch.full((len(images),), -1, dtype=torch.long)
        bank = self._extract(images, labels, None, segment=size)
        return [
            FeatureBank(bank.draws[:, i : i + size], bank.mean[i : i + size], bank.uncertainty[i : i + size],
                        labels[i : i + size])
            for i in range(0, len(images), size)
        ]  # fmt: skip

    def _extract(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        represent: Callable[[torch.Tensor], Embedding] | None,
        segment: int | None = None,
    ) -> FeatureBank:
        if represent is None:
            samples = self.samples if self.samples > 1 else None
            represent = lambda x: self.run.method.embed(x, samples=samples)  # noqa: E731
        memory_format = torch.channels_last if self.cfg.train.channels_last else torch.contiguous_format
        return extract_features(
            represent,
            images,
            labels,
            lambda x: to_float(x, self.info.mean, self.info.std).contiguous(memory_format=memory_format),
            batch_size=self.cfg.eval.batch_size,
            device=self.device,
            on_batch=self._count(len(images)),
            segment=segment,
        )

    def shift_set(self, name: str, max_items: int | None, need_labels: bool = False) -> ImageDataset:
        """An OOD / transfer set conformed to the run's images, loaded once per evaluation."""
        key = (name, max_items, need_labels)
        if key not in self._shift_sets or not self.reuse:
            cfg = self.cfg
            self._shift_sets[key] = load_shift_set(
                name,
                self.info,
                self.data_dir,
                self.download,
                max_items=max_items,
                seed=cfg.train.seed,
                need_labels=need_labels,
                verify=cfg.data.verify,
                cache_dir=cfg.data.cache_dir,
            )
        return self._shift_sets[key]

    def training_batches(self) -> Iterator[torch.Tensor]:
        """Normalised, un-augmented training images in a fixed shuffled order, one batch at a time
        (what :meth:`SSLMethod.prepare_for_evaluation` gets, e.g. for BatchNorm re-estimation)."""
        images = self.dataset("train").images
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.cfg.train.seed))
        for start in range(0, len(images), self.cfg.eval.batch_size):
            batch = images[order[start : start + self.cfg.eval.batch_size]].to(self.device)
            yield to_float(batch, self.info.mean, self.info.std)

    def split_key(self, split: str) -> str:
        """What one split's cached features depend on: the weights, the method's state, the data, S."""
        weights = self.run.weights_meta.get("sha256", "partial")
        return f"{weights}|{self.run.method.cache_tag()}|{self.cfg.data.dataset}|{split}|S={self.samples}"

    def split(self, split: str) -> tuple[FeatureBank, torch.Tensor]:
        """Cached features of one split of the run's own dataset, and its images."""
        dataset = self.dataset(split)
        path = self.run.run_dir / "features" / f"{split}_S{self.samples}{self.tag}.safetensors"
        bank = cached_features(
            path,
            self.split_key(split),
            lambda: self.embed(dataset.images, dataset.labels, f"features/{split}"),
        )
        return bank, dataset.images


def training_seconds(run_dir: Path, epochs: int) -> float | None:
    """Wall seconds of training plus any after-training step (post-hoc LAM's fit): every invocation's step
    loop (``total_seconds``), else — earlier invocations unrecorded — the last one's seconds per epoch ×
    epochs (wrong if it ran at another speed). None without ``train_summary.json``."""
    summary = read_json(Path(run_dir) / "train_summary.json")
    if not isinstance(summary, dict):
        return None
    after = float(summary.get("after_training_seconds") or 0.0)
    if summary.get("total_seconds") is not None:
        return float(summary["total_seconds"]) + after
    per_epoch = summary.get("seconds_per_epoch")
    if not per_epoch:
        return None
    return float(per_epoch) * epochs + after


def evaluate_run(
    run_dir: str | Path,
    data_dir: str | None = None,
    samples: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    step: int | None = None,
    suite_name: str = "full",
    reuse: bool = True,
    download: bool = False,
    dataset: str | None = None,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Evaluate a trained run; writes ``eval.json`` (``eval_step<N>.json`` for a checkpoint).

    ``batch_size``: images per encoder pass instead of the run's ``eval.batch_size`` — what to lower
    when large images or a large network run the evaluation out of memory; the numbers do not depend
    on it (up to float rounding).

    ``data_dir`` / ``dataset``: where the run's training data is now, if it moved since training
    (the registered sets' directory / the run's own image folder or tar; :func:`probssl.runs.point_at_data`).

    ``reuse=False`` turns off every shortcut that shares work between stages (see
    :class:`Evaluator`; kNN then runs once per k): same numbers, more time.

    OOD and transfer sets are other datasets than the one trained on: they are read from the data
    directory, and fetched over the network only with ``download=True`` (a missing one is skipped
    with one warning line; ``meta/skipped`` in eval.json keeps the full reason).
    """
    if suite_name not in SUITES:
        raise ValueError(f"unknown suite '{suite_name}'; valid suites: {', '.join(SUITES)}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    run = load_run(run_dir, device, step=step, data_dir=data_dir, dataset=dataset)
    require_classes(run.info.num_classes, run_dir)
    cfg = run.config
    if batch_size is not None:
        cfg.eval.batch_size = batch_size
    if cfg.train.channels_last:
        # The memory format the run trained in: 25–35% faster convolutions on CPU (bench speed), and
        # features equal to contiguous ones up to float rounding (≈ 1e-7 relative).
        run.method.to(memory_format=torch.channels_last)
    samples = samples or cfg.eval.samples
    started = time.perf_counter()
    tag = "" if step is None else f"_step{step}"
    ev = Evaluator(run, data_dir, samples, device, progress, tag, reuse, download)
    with ev.stage("features"):
        run.method.prepare_for_evaluation(ev.training_batches)
        train, _ = ev.split("train")
        test, test_images = ev.split("test")
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1

    results: dict[str, Any] = {}
    extra = run.method.extra_representations()  # e.g. SCL's hard code
    with ev.stage("probes", unit="probe", total=2 + len(extra)) as bar:
        knn_args = (train.draws, train.labels, test.draws, num_classes)
        # The kNN OOD detector needs the same test-vs-train neighbours: one pass serves both.
        neighbours = NeighbourCache() if reuse else None
        # k = RELIABILITY_K too: `reliability` calibrates that vote (one pass serves every k).
        knn_ks = tuple(dict.fromkeys((*cfg.eval.knn_k, RELIABILITY_K)))
        if reuse:
            knn = knn_predict_marginal_many(*knn_args, knn_ks, cfg.eval.knn_temperature, cache=neighbours)
        else:
            knn = {k: knn_predict_marginal_many(*knn_args, (k,), cfg.eval.knn_temperature)[k] for k in knn_ks}
        for k in cfg.eval.knn_k:
            results[f"knn/top1@{k}"] = top1(knn[k], test.labels)
        results["knn/top1"] = results[f"knn/top1@{cfg.eval.knn_k[0]}"]
        bar.update()

        # float64 and a convergence tolerance (probssl.eval.linear): the probe ends at its optimum, not at an
        # iteration count. eval.linear_max_iter is only a safety net and can raise it, never lower it
        # below MAX_ITERATIONS: runs stored with the old default (200, where the probe used to stop)
        # must not stop there.
        probe_kwargs = {
            "max_iter": max(cfg.eval.linear_max_iter, MAX_ITERATIONS),
            "seed": cfg.train.seed,
            "select_max_items": 10_000,
        }
        probe = suite.MarginalProbe.fit(train, num_classes, **probe_kwargs)
        sample_probs = probe.sample_probs(test.draws)
        probs = sample_probs.mean(0)
        results["linear/top1"] = top1(probs, test.labels)
        results["linear/nll"] = nll(probs, test.labels)
        bar.update()
        for name, represent in extra.items():
            banks = [
                ev.embed(ev.dataset(s).images, ev.dataset(s).labels, f"features/{name}-{s}", represent)
                for s in ("train", "test")
            ]
            extra_probe = suite.MarginalProbe.fit(banks[0], num_classes, **probe_kwargs)
            results[f"{name}/linear/top1"] = top1(
                extra_probe.sample_probs(banks[1].draws).mean(0), test.labels
            )
            bar.update()
        info = ev.info
        results.update(run.method.model_metrics((info.channels, info.image_size, info.image_size)))
        results["linear/l2"] = probe.selected_l2
        results["linear/iterations"] = probe.iterations
        results["linear/grad_norm"] = probe.gradient_norm
        results["linear/grad_rel"] = probe.relative_gradient
        results["linear/converged"] = probe.converged

    details: dict[str, Any] = {}
    skipped: list[str] = []
    if suite_name in ("uncertainty", "full"):
        with ev.stage("uncertainty"):
            detectors = suite.FeatureDetectors.fit(
                train, probe, num_classes, cfg.train.seed, cache=neighbours
            )
            scores = suite.uncertainty_scores(sample_probs, test, detectors)
            correct = probs.argmax(1) == test.labels
            cal, details_cal = suite.calibration_suite(probs, test.labels)
            results.update(cal)
            details.update(details_cal)
            results.update(suite.selective_suite(scores, correct))
            # One leave-one-out pass over the test split serves R-AUROC here and ret/ (full suite) later.
            retrieval = None
            if reuse:
                retrieval = suite.leave_one_out_retrieval(test, average_precision=suite_name == "full")
            results.update(suite.r_auroc_suite(test, scores, retrieval=retrieval))
            n_crop = min(cfg.eval.shift_max_items, len(test_images))
            embed_crops = lambda images: ev.embed(images, desc="features/crops")  # noqa: E731
            results.update(
                suite.crop_suite(embed_crops, test_images[:n_crop], test.uncertainty, cfg.train.seed)
            )
            # Conformal p-values (docs/methods.md §5): half the test split calibrates, half is scored.
            split = conformal.CalibrationSplit.of(test.labels, cfg.train.seed)
            combined = conformal.fit_combined(scores, split)
            scored = {name: score[split.rest] for name, score in scores.items()}
            scored_pvalues = {name: detector.pvalue(scored) for name, detector in combined.items()}
            results.update(suite.conformal_id_suite(scored_pvalues, split))
            results.update(suite.member_fpr_suite(scores, split))
            if test.num_samples == 1:
                knn_mean = knn[RELIABILITY_K]  # the single draw is the mean
            else:  # `reliability` calibrates the kNN of the mean embedding, the one `embed` predicts with
                knn_mean = knn_predict_many(
                    train.mean,
                    train.labels,
                    test.mean,
                    num_classes,
                    (RELIABILITY_K,),
                    cfg.eval.knn_temperature,
                )[RELIABILITY_K]
            results.update(suite.reliability_suite(knn_mean, test.labels, split))
            details["ranked_images"] = suite.ranked_images(
                test_images, scores["entropy"], labels=test.labels, predictions=probs.argmax(1)
            )
            details["ranked_images"]["criterion"] = "predictive entropy of the linear probe"
            details["ranked_images"]["classes"] = list(ev.dataset("test").classes)
            if "emb" in scores:  # what the method itself calls uncertain (κ, σ, posterior spread)
                details["ranked_images_own"] = suite.ranked_images(
                    test_images, scores["emb"], labels=test.labels, predictions=probs.argmax(1)
                )
                details["ranked_images_own"]["criterion"] = "the embedding's own uncertainty"
                details["ranked_images_own"]["classes"] = details["ranked_images"]["classes"]

    if suite_name in ("uncertainty", "full"):
        details["ood"] = {}
        with ev.stage("ood"):
            for name in ood_set_names(cfg.data.dataset, cfg.eval.ood_sets):
                try:
                    ood_set = ev.shift_set(name, max_items=test.num_items)
                except DatasetError as err:
                    skipped.append(f"ood/{name}: {err}")
                    continue
                bank = ev.embed(ood_set.images, desc=f"features/ood-{name}")
                scores_out = suite.uncertainty_scores(
                    probe.sample_probs(bank.draws), bank, detectors, like=scores
                )
                pvalues_out = {key: detector.pvalue(scores_out) for key, detector in combined.items()}
                metrics, plot = suite.ood_suite(
                    name,
                    {**scored, **suite.pvalue_scores(scored_pvalues)},
                    {**scores_out, **suite.pvalue_scores(pvalues_out)},
                )
                results.update(metrics)
                results.update(suite.conformal_ood_suite(name, pvalues_out))
                plot["pvalues"] = {
                    key: {"in": scored_pvalues[key].tolist(), "out": pvalues_out[key].tolist()}
                    for key in scored_pvalues
                }
                details["ood"][name] = plot
        results.update(suite.ood_group_means(results, cfg.data.dataset, list(details["ood"])))

    if suite_name == "full":
        n_shift = min(cfg.eval.shift_max_items, len(test_images))
        corruptions = corruption_names(ev.info.channels)
        with ev.stage("shift", unit="corruption", total=len(corruptions)) as bar:

            def embed_severities(image_sets: Sequence[torch.Tensor]) -> list[FeatureBank]:
                banks = ev.embed_many(image_sets)
                bar.update()
                return banks

            shift, details["shift"] = suite.shift_suite(
                probe,
                embed_severities,
                test_images[:n_shift],
                test.labels[:n_shift],
                corruptions,
                lambda images, name, severity: corrupt(images, name, severity, seed=cfg.train.seed),
                own_uncertainty="emb" in scores,
            )
        results.update(shift)

        with ev.stage("lowshot", unit="step", total=1) as bar:
            results.update(
                suite.lowshot_suite(train, test, num_classes, run.run_dir / "splits", **probe_kwargs)
            )
            bar.update()

        with ev.stage("transfer"):
            for name in transfer_set_names(cfg.data.dataset, cfg.eval.transfer_sets):
                try:
                    target = ev.shift_set(name, max_items=cfg.eval.transfer_max_items, need_labels=True)
                except DatasetError as err:
                    skipped.append(f"transfer/{name}: {err}")
                    continue
                bank = ev.embed(target.images, target.labels, desc=f"features/transfer-{name}")
                results.update(suite.transfer_suite(name, bank, int(target.labels.max()) + 1, **probe_kwargs))

        with ev.stage("retrieval", unit="step", total=1) as bar:
            uncertainty = test.uncertainty.float() if "emb" in scores else scores["entropy"]
            ret, details["sparsification"] = suite.retrieval_suite(test, uncertainty, retrieval=retrieval)
            results.update(ret)
            bar.update()
    for reason in skipped:
        what, _ = reason.split(": ", 1)
        hint = "not found or unreadable" + ("" if download else "; --download (or --data-dir DIR) adds it")
        warnings.warn(f"skipped {what} ({hint}; the reason is in eval.json's meta/skipped)", stacklevel=2)

    results["meta/method"] = cfg.method
    results["meta/dataset"] = cfg.data.dataset
    results["meta/suite"] = suite_name
    results["meta/samples"] = int(test.num_samples)
    results["meta/skipped"] = "; ".join(skipped)
    if suite_name in ("uncertainty", "full"):
        results["meta/ood_protocol"] = suite.OOD_PROTOCOL
    results["meta/partial_training"] = bool(run.weights_meta.get("partial", False))
    weights = run.weights_meta  # model.json ("steps") or, for an unfinished run, a checkpoint's meta
    results["meta/step"] = step if step is not None else weights.get("steps", weights.get("step"))
    results["meta/total_steps"] = weights.get("total_steps", weights.get("steps"))
    results["meta/eval_seconds"] = time.perf_counter() - started
    train_seconds = training_seconds(run.run_dir, cfg.train.epochs) if step is None else None
    if train_seconds is not None:
        results["meta/train_seconds"] = train_seconds
        if train_seconds >= 1.0:  # raw pixels train nothing: a ratio to ~0 s would be noise, not cost
            results["meta/eval_to_train"] = results["meta/eval_seconds"] / train_seconds
    results.update({f"meta/eval_seconds/{stage}": seconds for stage, seconds in ev.seconds.items()})
    results.update({f"meta/eval_cpu_seconds/{stage}": seconds for stage, seconds in ev.cpu_seconds.items()})
    results["meta/uncertainty_doc"] = run.method.uncertainty_doc
    results["meta/supervision"] = run.method.supervision  # self-supervised | class labels (tables mark it)
    results["seed"] = cfg.train.seed
    results.update({f"config/{k}": v for k, v in cfg.flat().items()})
    suffix = "" if step is None else f"_step{step}"
    if details:
        atomic_write_json(run.run_dir / f"eval_details{suffix}.json", details)
    atomic_write_json(run.run_dir / f"eval{suffix}.json", results)
    return results
