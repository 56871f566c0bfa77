"""The one training loop, method-agnostic: it knows ``loss(views)`` and ``update_targets(progress)``.

Read top to bottom: set-up (distributed, seeds, data, model, schedules, resume), then the step loop
(batch → batched augmentation on the device → loss → finite guard → update → EMA → log →
checkpoint), then the method's post-training pass and the final weights. Data order is a pure
function of (seed, epoch) and every rank's RNG state is in the checkpoint, so ``--resume`` continues
exactly where an uninterrupted run would be. Batches come from :mod:`probssl.data.pipeline`: the
decoded split in memory, or streamed by DataLoader workers when it is too large; both give the same
batches, so the choice never changes what is computed.

Long on purpose: the loop (``_train``, 250 lines) is kept whole so it reads top to bottom like the
algorithm it runs, as nanoGPT's train.py does; cutting it into helpers would hide the order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import random
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from probssl.backbone_choice import write_backbone_record
from probssl.checkpoint import (
    finalize_checkpoint,
    latest_checkpoint,
    restore_rng,
    save_model,
    staging_dir,
)
from probssl.checkpoint_ranks import resume_checkpoint, save_rng_states
from probssl.config import (
    RUNTIME_KEYS,
    ConfigError,
    EvalConfig,
    RunConfig,
    TrainConfig,
    config_from_dict,
    save_config,
)
from probssl.data import (
    DatasetError,
    DatasetInfo,
    ImageDataset,
    MultiViewAugment,
    decoded_nbytes,
    get_dataset_info,
    load_source,
    open_source,
    preset_for_dataset,
    resolve_dataset_info,
    skipped_items,
)
from probssl.data.class_balanced import ClassBalancedBatchPlan
from probssl.data.pipeline import BatchPlan, SubsetSource, build_pipeline, choose_pipeline
from probssl.data.resolve import is_path_dataset
from probssl.data.sources import ImageSource
from probssl.data.views import PRESETS
from probssl.distributed import (
    all_reduce_mean,
    broadcast_object,
    get_rank,
    get_world_size,
    init_distributed,
    teardown_distributed,
)
from probssl.interrupt import interruptible_backward
from probssl.io import atomic_write_json, atomic_write_text, read_json
from probssl.machine import processor_name
from probssl.methods import TrainContext
from probssl.methods.base import SELF_SUPERVISED, SSLMethod, TrainingViews
from probssl.nn.backbones import check_backbone_options
from probssl.optim import build_optimizer, set_weight_decay, warmup_cosine
from probssl.precision import resolve_precision
from probssl.progress import StageProgress
from probssl.run_lock import TRAIN_LOCK, RunBusy, run_lock
from probssl.run_log import MetricLogger
from probssl.runs import (
    DATASET_INFO_FILE,
    adopt_evaluation_settings,
    build_model,
    build_run_backbone,
    dataset_info_from_json,
    read_run_config,
    resolved_config,
    resume_resolved_config,
    run_dataset_info,
    training_data_error,
)
from probssl.step_clock import StepClock
from probssl.threads import auto_threads

# Keys that may differ between a run and its resumption: how it runs (probssl.config.RUNTIME_KEYS) and
# how it will be evaluated, which never changes what is trained (adopt_evaluation_settings records them).
RESUMABLE_KEYS = set(RUNTIME_KEYS) | {f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)}


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to try."""


class NonFiniteLossError(TrainingError):
    pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def training_subset(
    dataset: ImageDataset | ImageSource, size: int | None, seed: int
) -> ImageDataset | ImageSource:
    """A fixed random ``size``-item subset (the same items whichever input path reads them)."""
    if size is not None and size > len(dataset):  # silently training on everything would mislabel the run
        raise ConfigError(
            f"data.subset={size} is larger than the training set ({len(dataset)} images); "
            f"use --subset {len(dataset)} or less, or drop it to train on every image"
        )
    if size is None or size == len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    chosen = order[:size].sort().values
    return dataset.subset(chosen) if isinstance(dataset, ImageDataset) else SubsetSource(dataset, chosen)


SKIPPED_FILE = "skipped_images.txt"


@dataclasses.dataclass
class TrainingData:
    info: DatasetInfo  # what the model and the augmentation are built for (mean/std, size, channels)
    items: ImageDataset | ImageSource  # the training split (after ``data.subset``)
    pipeline: str  # memory | stream
    skipped: list[str]  # unreadable items left out (``data.skip_corrupt``)


def open_training_data(cfg: RunConfig, out_dir: Path, resume: bool) -> TrainingData:
    """The run's DatasetInfo, its training split and the input path (``memory`` | ``stream``) to read it by.

    A resumed run reuses the DatasetInfo it stored (mean/std of a folder are computed once, at the
    start), so the normalisation cannot drift if files change. ``auto`` keeps the split in memory when
    its decoded uint8 size is below ``data.memory_limit_gb`` and streams it otherwise.
    """
    dc = cfg.data
    options = {"data_dir": dc.data_dir, **dc.reader_options()}
    refuse_evaluation_only(dc.dataset)
    try:
        source = open_source(dc.dataset, "train", download=dc.download, **options)
    except DatasetError as error:
        raise (training_data_error(cfg, error) if resume else error) from error
    stored = out_dir / DATASET_INFO_FILE
    if resume and stored.is_file():
        info = dataset_info_from_json(stored)
    else:
        info = resolve_dataset_info(dc.dataset, **options)
    skipped = skipped_items(source)
    items = training_subset(source, dc.subset, cfg.train.seed)
    kind = choose_pipeline(dc.pipeline, decoded_nbytes(items), dc.memory_limit_gb)
    if kind == "stream":
        return TrainingData(info, items, kind, skipped)
    if items is source or decoded_nbytes(source) <= dc.memory_limit_gb * 2**30:
        # decoded once into a memory-mapped cache (reused by the next run), then the same subset of it
        dataset = training_subset(load_source(source, dc.cache_dir), dc.subset, cfg.train.seed)
    else:  # a small subset of a large set: decode only its items (not cached)
        dataset = load_source(items, dc.cache_dir)
    return TrainingData(info, dataset, kind, skipped)


def refuse_evaluation_only(dataset: str) -> None:
    """A registered set without a training split (``tiny_imagenet_val``: split ``test`` only) is for
    evaluation; say so instead of "unknown split 'train'"."""
    if is_path_dataset(dataset):
        return
    info = get_dataset_info(dataset)
    if "train" not in info.splits:
        raise ConfigError(
            f"'{info.name}' is an evaluation-only set (split {', '.join(info.splits)} only): use it as an "
            f"OOD or transfer set (eval.ood_sets=[{info.name}]), and train on a dataset with a training "
            "split (probssl list) or a folder of your own images"
        )


def batch_plan(
    dataset: ImageDataset | ImageSource, tc: TrainConfig, world: int, rank: int, images_per_class: int | None
) -> tuple[BatchPlan, torch.Tensor | None]:
    """The run's batch plan and, for a method trained on class labels, the training labels it indexes.

    Self-supervised methods (``images_per_class`` None) get random batches and no labels; a method
    trained on labels gets class-balanced batches of ``images_per_class`` images per class.
    """
    if images_per_class is None:
        return BatchPlan(len(dataset), tc.batch_size, tc.seed, world_size=world, rank=rank), None
    labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)
    try:
        plan = ClassBalancedBatchPlan(
            len(dataset),
            tc.batch_size,
            tc.seed,
            world_size=world,
            rank=rank,
            labels=labels,
            images_per_class=images_per_class,
        )
    except ValueError as err:
        raise ConfigError(f"{err} (method.images_per_class={images_per_class})") from None
    return plan, labels


def supervision_note(method: SSLMethod) -> str:
    """The line config.yaml opens with when the run trains on class labels ("" when self-supervised)."""
    if method.supervision == SELF_SUPERVISED:
        return ""
    return (
        f"SUPERVISED run (supervision: {method.supervision}): trained on the training set's class labels, "
        "not self-supervised; eval.json's meta/supervision and the tables say so"
    )


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_resumable(saved: RunConfig, new: RunConfig) -> None:
    """Refuse a resume whose config would compute something else (both sides resolved, so ``auto``
    and an omitted default compare equal to the values they stand for). Own images that moved are
    the same run: ``data.dataset`` may change from one path to another. ``eval.*`` settings never
    change what is trained (:func:`adopt_evaluation_settings` records new ones): a run begun before an
    evaluation default changed must still resume — a benchmark suite picked up next session does."""
    old_flat, new_flat = saved.flat(), new.flat()
    moved = is_path_dataset(saved.data.dataset) and is_path_dataset(new.data.dataset)
    resumable = RESUMABLE_KEYS | ({"data.dataset"} if moved else set())
    changed = [k for k in old_flat if k not in resumable and old_flat[k] != new_flat.get(k)]
    if changed:
        details = ", ".join(f"{k}: {old_flat[k]!r} → {new_flat.get(k)!r}" for k in changed)
        raise ConfigError(
            f"--resume with a different config would not continue the same run ({details}). "
            "Resume without overrides, or train into a new --out directory."
        )


def check_resumable_run(out_dir: str | Path, cfg: RunConfig) -> None:
    """:func:`check_resumable` against the run in ``out_dir`` before any data is read (``probssl train
    --resume`` on a finished run must still refuse a changed config), both sides resolved with the
    DatasetInfo stored in the run; a run that has none is checked by :func:`train` once its data is open."""
    try:
        info = run_dataset_info(out_dir, cfg)
    except DatasetError:
        return
    check_resumable(read_run_config(out_dir, info), resume_resolved_config(out_dir, cfg, info))


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def train(cfg: RunConfig | Mapping[str, Any], out_dir: str | Path, resume: bool = False) -> Path:
    """Train ``cfg.method`` and write the run directory; returns it. Works under ``torchrun``.

    ``cfg`` may also be a mapping laid out as a YAML config (``{"method": "simclr", "train": {...}}``),
    validated by :func:`probssl.config.config_from_dict`.

    One process trains a run directory at a time: the main process holds ``RUN/.train.lock``
    (:mod:`probssl.run_lock`) from before anything is read or written until the run is saved, so a
    second ``probssl train`` into the same ``--out`` is refused naming the first one's pid, and the
    lock of a process that died (even by SIGKILL) is taken over.
    """
    if isinstance(cfg, Mapping):  # else "'dict' object has no attribute 'train'"
        cfg = config_from_dict(dict(cfg))
    if not isinstance(cfg, RunConfig):
        raise TypeError(
            f"train/fit takes a RunConfig (probssl.build_config) or a mapping, got {type(cfg).__name__}"
        )
    out_dir = Path(out_dir)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(auto_threads(cfg.train.threads)[0])  # probssl.threads: why not torch's default
    try:
        return _locked_train(cfg, out_dir, resume)
    finally:
        torch.set_num_threads(previous_threads)  # a library call leaves the process as it found it


def _locked_train(cfg: RunConfig, out_dir: Path, resume: bool) -> Path:
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds the lock for the whole job
        return _train(cfg, out_dir, resume)
    created = not out_dir.exists()
    try:
        with run_lock(out_dir, TRAIN_LOCK):
            return _train(cfg, out_dir, resume)
    except RunBusy as busy:
        raise TrainingError(
            f"{busy}: another training is writing this run; wait for it to finish (then --resume if "
            "needed) or choose another --out"
        ) from None
    finally:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # refused before writing anything (a bad config): leave no empty run behind


def _train(cfg: RunConfig, out_dir: Path, resume: bool) -> Path:
    device = init_distributed()
    rank, world = get_rank(), get_world_size()
    is_main = rank == 0
    tc = cfg.train
    if tc.deterministic:
        torch.use_deterministic_algorithms(True)

    check_backbone_options(cfg.backbone, cfg.backbone_args)  # a typo fails before any data is read

    # ---- data ---------------------------------------------------------------------------------
    data = open_training_data(cfg, out_dir, resume)
    # Rank 0's: a resumed run's stored DatasetInfo is in the run directory, on rank 0's machine only.
    info, dataset = broadcast_object(data.info), data.items
    # every default written out (what config.yaml stores), as rank 0 resolves it: only its machine need
    # hold a resumed run's directory, and every rank must build the same encoder
    resolved = (
        resume_resolved_config(out_dir, cfg, info, device) if resume else resolved_config(cfg, info, device)
    )
    cfg = broadcast_object(resolved)
    if len(dataset) == 0:
        raise TrainingError(f"dataset '{cfg.data.dataset}' (train split) is empty")
    if tc.batch_size % world:
        raise ConfigError(f"train.batch_size={tc.batch_size} must divide evenly over {world} processes")
    if tc.batch_size > len(dataset):
        raise ConfigError(
            f"train.batch_size={tc.batch_size} is larger than the training set ({len(dataset)} "
            f"images); use --batch-size {len(dataset)} or less"
        )

    # ---- model, optimiser, schedules (identical init on every rank) ---------------------------
    seed_everything(tc.seed)
    resumed = resume and latest_checkpoint(out_dir) is not None  # its weights replace backbone.weights
    backbone = build_run_backbone(
        cfg, info, device, run_dir=out_dir if resume else None, load_weights=not resumed, announce=is_main
    )
    method = build_model(cfg, info, backbone=backbone).to(device)
    if tc.channels_last:
        method = method.to(memory_format=torch.channels_last)
    # A method trained on class labels gets class-balanced batches and their labels (else: none).
    plan, labels = batch_plan(dataset, tc, world, rank, method.images_per_class())
    pipeline = build_pipeline(
        dataset, plan, data.pipeline, cfg.data.workers, pin_memory=device.type == "cuda"
    )
    steps_per_epoch = plan.steps_per_epoch  # the last incomplete batch is dropped
    total_steps = tc.epochs * steps_per_epoch
    lr = cfg.optim.lr * tc.batch_size / 256
    lr_schedule = warmup_cosine(
        lr, total_steps, round(cfg.optim.warmup_epochs * steps_per_epoch), final=lr * cfg.optim.min_lr_ratio
    )
    wd_end = cfg.optim.weight_decay_end  # DINO's cosine weight-decay schedule, when set
    wd_schedule = None if wd_end is None else warmup_cosine(cfg.optim.weight_decay, total_steps, 0, wd_end)
    context = TrainContext(
        run_dir=out_dir,
        is_main=is_main,
        num_data=len(dataset),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        lr=lr,
        seed=tc.seed,
    )
    optimizer = None
    if method.trainable:
        optimizer = method.configure_optimizer(context) or build_optimizer(method, cfg.optim, lr)
    # A sampler with a cyclical step size owns its schedule; everything else follows warm-up + cosine.
    owns_schedule = bool(getattr(optimizer, "owns_lr_schedule", False))
    preset = cfg.data.views or preset_for_dataset(cfg.data.dataset, info.channels, info.image_size)
    augment = MultiViewAugment(
        PRESETS[preset], info.image_size, info.channels, info.mean, info.std, num_global=method.num_views
    ).to(device)
    seed_everything(tc.seed * 7919 + rank + 1)  # each rank draws its own augmentations

    # ---- resume or start ----------------------------------------------------------------------
    start_step = 0
    # Step-loop seconds of the earlier invocations up to the checkpoint resumed from (None: a checkpoint
    # written before they were recorded), so a resumed run's training wall is the sum, not an extrapolation.
    earlier_seconds: float | None = 0.0
    precision = resolve_precision(tc.precision, device)  # what `auto` becomes here (a resume may pin it)
    if resume:

        def check_run() -> None:  # on rank 0, the one machine that holds the run directory
            if not (out_dir / "config.yaml").is_file():
                raise TrainingError(f"--resume: {out_dir} has no config.yaml; there is no run to resume")
            saved = read_run_config(out_dir, info)
            check_resumable(saved, cfg)
            adopt_evaluation_settings(out_dir, saved, cfg)

        ckpt = resume_checkpoint(out_dir, check_run)
        if ckpt is not None:
            method.load_state_dict(ckpt["model"])
            if optimizer is not None:
                optimizer.load_state_dict(ckpt["optimizer"])
            restore_rng(*ckpt["rng"])
            start_step = int(ckpt["meta"]["step"])
            earlier_seconds = ckpt["meta"].get("loop_seconds")
            precision = _resumed_precision(ckpt["meta"].get("precision"), precision, tc.precision)
    # rank 0 looks (only its machine need hold the run directory) and every rank obeys
    elif broadcast_object(
        is_main and (out_dir / "config.yaml").is_file() and latest_checkpoint(out_dir) is not None
    ):
        raise TrainingError(
            f"{out_dir} already holds a run; pass --resume (Python: resume=True) to continue it or choose "
            "another --out"
        )
    elif is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml", comment=supervision_note(method))
        atomic_write_json(out_dir / DATASET_INFO_FILE, dataclasses.asdict(info))
        write_backbone_record(out_dir, backbone)  # what `auto` became: every later use rebuilds it
        if cfg.data.skip_corrupt:
            atomic_write_text(out_dir / SKIPPED_FILE, "".join(f"{item}\n" for item in data.skipped))

    if is_main:
        print(
            start_line(cfg, info, len(dataset), method, precision, device, steps_per_epoch, start_step),
            flush=True,
        )
        if data.skipped:
            print(
                f"skipped {len(data.skipped):,} unreadable image{'s' if len(data.skipped) != 1 else ''} "
                f"(data.skip_corrupt), listed in {out_dir / SKIPPED_FILE}",
                flush=True,
            )
    model = DistributedDataParallel(method) if world > 1 and method.trainable else method
    logger = MetricLogger(out_dir, tensorboard=tc.tensorboard, enabled=is_main, start_step=start_step)
    stop_step = total_steps if tc.max_steps is None else min(total_steps, tc.max_steps)
    checkpoint_every = tc.checkpoint_every or steps_per_epoch

    def save_checkpoint(step: int) -> Path | None:
        stage = staging_dir(out_dir, step)
        if is_main:
            stage.mkdir(parents=True, exist_ok=True)
        save_rng_states(stage)  # every rank's, written by rank 0: the run directory is on its machine
        path = None
        if is_main:
            meta = {
                "epoch": step // steps_per_epoch,
                "total_steps": total_steps,
                "world_size": world,
                "method": cfg.method,
                "precision": precision,  # a resume continues at it, whatever `auto` says then
            }
            if earlier_seconds is not None:  # every invocation's step loop up to this checkpoint
                meta["loop_seconds"] = earlier_seconds + time.perf_counter() - train_start
            path = finalize_checkpoint(
                out_dir, step, method.state_dict(), optimizer.state_dict(), meta, tc.keep_checkpoints
            )
        _barrier()
        return path

    # ---- the loop -----------------------------------------------------------------------------
    bar = StageProgress(
        cfg.method,
        "step",
        total=stop_step,
        initial=start_step,
        enabled=is_main and tc.progress and method.trainable,  # nothing to count for raw pixels
    )
    interruptible_backward(method)  # Ctrl-C acts between blocks of a long backward pass
    clock = StepClock(stop_step - start_step, steps_per_epoch, enabled=is_main and method.trainable)
    window_start, window_steps, train_start = time.perf_counter(), 0, time.perf_counter()
    loss = None
    last_step = stop_step if method.trainable else start_step
    for step, batch, indices in zip(
        range(start_step, last_step),
        pipeline.batches(start_step, last_step),
        plan.steps(start_step, last_step),  # the batch's items: their class labels, where used
        strict=True,
    ):
        epoch = step // steps_per_epoch
        views = augment(batch.to(device, non_blocking=True))
        if tc.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        if not owns_schedule:
            for group in optimizer.param_groups:
                group["lr"] = float(lr_schedule[step])
        if wd_schedule is not None:
            set_weight_decay(optimizer, float(wd_schedule[step]))

        with autocast_context(device, precision):
            loss = model(views) if labels is None else model(views, labels=labels[indices].to(device))
        loss_value = float(all_reduce_mean(loss.detach().float()))
        if not math.isfinite(loss_value):
            saved = save_checkpoint(step)  # the state before this step is the last good one
            raise NonFiniteLossError(
                f"loss became {loss_value} at step {step} (epoch {epoch}); training stopped. "
                f"The last good state is saved in {saved or out_dir}. "
                f"Try a lower learning rate (optim.lr={cfg.optim.lr / 2:g}), "
                "train.precision=fp32, or a longer warm-up (optim.warmup_epochs), then resume or retrain."
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.update_targets((step + 1) / total_steps)
        method.after_step(step, context)

        window_steps += 1
        bar.update(1)
        clock.step_done()
        if (step + 1) % tc.log_every == 0 or step + 1 == stop_step:
            elapsed = time.perf_counter() - window_start
            img_s = window_steps * tc.batch_size / max(elapsed, 1e-9)
            logger.log(
                step + 1,
                {
                    "epoch": epoch,
                    "loss": loss_value,
                    "lr": optimizer.current_step_size if owns_schedule else float(lr_schedule[step]),
                    "img_per_s": img_s,
                    **method.extra_state_for_logging(),
                },
            )
            bar.set_postfix(loss=f"{loss_value:.4f}", img_s=f"{img_s:.0f}")
            window_start, window_steps = time.perf_counter(), 0
        if (step + 1) % checkpoint_every == 0 or step + 1 == stop_step:
            save_checkpoint(step + 1)
    bar.close()
    logger.close()

    finished = stop_step == total_steps or not method.trainable

    def training_views() -> Iterator[TrainingViews]:
        """One more epoch of augmented views in a fixed order, seeded apart from the training stream
        (with their class labels for a method trained on them)."""
        seed_everything(tc.seed * 7919 + 104_729 + rank)
        # the epoch after the last one: same plan, so the order is epoch_permutation(n, seed, epochs)
        after = (total_steps, total_steps + steps_per_epoch)
        for batch, indices in zip(pipeline.batches(*after), plan.steps(*after), strict=True):
            views = augment(batch.to(device, non_blocking=True))
            if tc.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            yield views if labels is None else (views, labels[indices].to(device))

    after_training_start = time.perf_counter()
    loop_seconds, steps_run = after_training_start - train_start, stop_step - start_step
    if finished and method.trainable:
        with autocast_context(device, precision):
            method.after_training(training_views, context)
    after_training_seconds = time.perf_counter() - after_training_start
    if is_main and finished:
        save_model(out_dir, method.state_dict(), {"method": cfg.method, "steps": total_steps})
        summary = {
            "steps": steps_run,
            "total_steps": total_steps,
            "world_size": world,
            "seconds": loop_seconds,  # the step loop of this invocation
            "img_per_s": steps_run * tc.batch_size / max(loop_seconds, 1e-9),
            "seconds_per_epoch": loop_seconds * steps_per_epoch / steps_run if steps_run else None,
            # every invocation's step loop (the steps an interrupted invocation ran past its last checkpoint
            # were redone, and only the redone ones count); absent when an earlier one was not recorded
            "total_seconds": None if earlier_seconds is None else earlier_seconds + loop_seconds,
            "after_training_seconds": after_training_seconds,  # e.g. post-hoc LAM's Hessian pass
            "device": str(device),
            "precision": precision,  # what `auto` became (or, resumed, what the run started at)
            "threads": torch.get_num_threads(),  # intra-op threads of this invocation (probssl.threads)
            "processor": processor_name(device),  # suites span sessions on changing machines
            "supervision": method.supervision,  # self-supervised | class labels
        }
        if not steps_run:  # nothing trained now (--resume rewriting a corrupt model.safetensors): keep
            summary.update(_previous_timing(out_dir / "train_summary.json"))  # the timing of the real run
        atomic_write_json(out_dir / "train_summary.json", summary)
    # Drop every reference before the process group goes (gloo may SIGABRT at exit otherwise).
    model = optimizer = loss = method = None
    gc.collect()
    teardown_distributed()
    return out_dir


def start_line(
    cfg: RunConfig,
    info: DatasetInfo,
    images: int,
    method: torch.nn.Module,
    precision: str,
    device: torch.device,
    steps_per_epoch: int,
    start_step: int,
) -> str:
    """What a training is about to do, in one line: a wrong dataset, backbone or thread count shows
    before the first step, not in a table hours later."""
    tc = cfg.train
    total = tc.epochs * steps_per_epoch
    stop = total if tc.max_steps is None else min(total, tc.max_steps)
    params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    shape = f"{info.image_size}×{info.image_size}×{info.channels}"
    threads, why = torch.get_num_threads(), auto_threads(tc.threads)[1]
    where = f"{device}, {threads} thread{'s' if threads != 1 else ''} ({why})"
    steps = f"{total:,} steps ({tc.epochs} epoch{'s' if tc.epochs != 1 else ''} of {steps_per_epoch})"
    if stop < total:
        steps += f", stopping at {stop:,} (train.max_steps)"
    head = f"resumed at step {start_step:,} of {total:,}: " if start_step else ""
    dataset = Path(cfg.data.dataset).name if is_path_dataset(cfg.data.dataset) else cfg.data.dataset
    return (
        f"{head}{cfg.method} on {dataset}: {images:,} images of {shape}, batch {tc.batch_size}, "
        f"backbone {cfg.backbone} ({params / 1e6:.2f}M trainable parameters in all), {precision} on {where}; "
        f"{steps}"
    )


def _resumed_precision(saved: str | None, resolved: str, requested: str) -> str:
    """The precision a resumed run continues at: the one its checkpoint was trained at.

    ``precision: auto`` is decided per machine (and by a timed probe), and suites are resumed in later
    sessions on other processors: without this a run begun in bf16 on an AVX512-BF16 machine would go on
    in fp32 on an AVX2 one and be neither. An explicit precision cannot differ (the config check refuses
    it); checkpoints written before the key existed say nothing, and ``auto``'s answer is used.
    """
    if saved is None or saved == resolved:
        return resolved
    warnings.warn(
        f"--resume: this run trained at {saved} so far and continues at {saved} for an exact resume, "
        f"although precision: {requested} chooses {resolved} on this machine (it may be slower here)",
        stacklevel=3,
    )
    return saved


def _previous_timing(path: Path) -> dict[str, Any]:
    """The step-loop timing of an earlier train_summary.json, and the precision and processor it ran
    at, {} when there is none (or it is unreadable)."""
    previous = read_json(path)
    if not isinstance(previous, dict):
        return {}
    keys = ("steps", "seconds", "img_per_s", "seconds_per_epoch", "precision", "processor")
    return {k: previous[k] for k in keys if previous.get(k) is not None}
