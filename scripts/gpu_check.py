"""One GPU, at most ~8 minutes: the speed table of every arm, then SimCLR on CIFAR-10 for as many epochs as
fit a time budget, with the data and the augmentation on the GPU, and its kNN accuracy (issue 21).

Prepared in advance for a session that gets a GPU machine; ``--dry-run`` runs the same code on the CPU in
seconds (tiny backbone, a few steps, random data) so that the test suite keeps it working.

    scripts/gpu_check.sh [--dry-run] [--data-dir DIR] [--total-budget-s 450] [--out DIR]

Writes to ``--out``, else ``$OUT`` (the GPU machine's output folder), else ``runs/gpu_check/``:
``speed.json`` / ``speed.md`` (``probssl bench speed`` on ``configs/cifar10.yaml``), ``train.json`` (epochs,
img/s, step time, kNN top-1) and ``summary.md`` (both, with the device named).

The training loop here is a lean copy of ``probssl.train``'s step (same model, optimizer, schedule,
augmentation and autocast), not a call of it: the library loop fetches each batch from host memory and
checkpoints every epoch, while this check keeps the whole uint8 training set in GPU memory (150 MB for
CIFAR-10) to measure the step the GPU can sustain, and has to size its epochs to a time budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from probssl.bench.speed import default_arms, run_speed_benchmark, speed_markdown  # noqa: E402
from probssl.config import build_config  # noqa: E402
from probssl.data import MultiViewAugment, get_dataset_info, load_dataset  # noqa: E402
from probssl.data.pipeline import epoch_permutation  # noqa: E402
from probssl.data.views import PRESETS, to_float  # noqa: E402
from probssl.eval.features import extract_features  # noqa: E402
from probssl.eval.knn import knn_predict  # noqa: E402
from probssl.methods import TrainContext  # noqa: E402
from probssl.optim import build_optimizer, warmup_cosine  # noqa: E402
from probssl.precision import resolve_precision  # noqa: E402
from probssl.runs import build_model  # noqa: E402
from probssl.train import autocast_context, seed_everything  # noqa: E402

CONFIG = ROOT / "src" / "probssl" / "configs" / "cifar10.yaml"
#: Tried in this order; the first with its files under --data-dir is trained on.
DATASETS = ("cifar10_jpeg", "cifar10")
#: The dry run: every code path, tiny shapes (ResNet-18 at width 4, batch 32, a handful of steps).
DRY_OVERRIDES = ["backbone.width=4", "train.batch_size=32"]


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def output_dir(arg: str | None) -> Path:
    out = Path(arg or os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    return out


def describe_device(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "precision": resolve_precision("auto", device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
    else:
        info |= {"name": "cpu", "threads": torch.get_num_threads()}
    return info


def select_arms(names: str | None) -> tuple:
    """The default arms, or the named ones plus their bases (as ``probssl bench speed --arms``)."""
    if not names:
        return default_arms()
    wanted = set(names.split(","))
    arms = default_arms()
    unknown = wanted - {a.name for a in arms}
    if unknown:
        raise SystemExit(
            f"error: unknown arm(s) {sorted(unknown)}; choose from {[a.name for a in arms]}"
        )
    keep = wanted | {a.base for a in arms if a.name in wanted and a.base}
    return tuple(a for a in arms if a.name in keep)


def speed(out: Path, device: torch.device, dry: bool, arms: tuple) -> dict:
    """``probssl bench speed`` on the GPU config: every arm, ratios to its base and to the floor, peak
    memory, S = 1/8/32 inference, and the augment entry (step vs the backbone's own work)."""
    overrides = DRY_OVERRIDES if dry else []
    result = run_speed_benchmark(
        CONFIG,
        overrides,
        arms=arms,
        repeats=1 if dry else 3,
        steps=1 if dry else 5,
        warmup=1 if dry else 3,
        device=str(device),
        samples=(1, 2) if dry else (1, 8, 32),
        progress=log,
    )
    result["command"] = "scripts/gpu_check.sh" + (" --dry-run" if dry else "")
    table = speed_markdown(result)
    (out / "speed.json").write_text(json.dumps(result, indent=2))
    (out / "speed.md").write_text(table + "\n")
    print(table, flush=True)
    return result


def training_data(data_dir: str | None, dataset: str | None, dry: bool):
    """(name, info, train, test): the first registered CIFAR-10 set with files, else random images."""
    names = [dataset] if dataset else ([] if dry else list(DATASETS))
    for name in names:
        if name == "random":
            break
        try:
            info = get_dataset_info(name)
            train = load_dataset(name, "train", data_dir, download=False)
            test = load_dataset(name, "test", data_dir, download=False)
            return name, info, train.images, train.labels, test.images, test.labels
        except (KeyError, ValueError, RuntimeError, OSError) as err:  # unregistered, or no files
            log(f"dataset {name} unavailable ({type(err).__name__}: {err}); trying the next")
    log(
        "training on RANDOM images (no CIFAR-10 files found): the step timing holds, the kNN figure is chance"
    )
    info = get_dataset_info("cifar10")  # the shapes and normalisation the config expects
    n_train, n_test = (256, 128) if dry else (50_000, 10_000)
    gen = torch.Generator().manual_seed(0)
    shape = (info.channels, info.image_size, info.image_size)
    images = torch.randint(0, 256, (n_train + n_test, *shape), generator=gen, dtype=torch.uint8)
    labels = torch.randint(0, info.num_classes, (n_train + n_test,), generator=gen)
    return "random", info, images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


class SimCLRRun:
    """Model, optimizer, schedule and augmentation of a SimCLR run on ``configs/cifar10.yaml``."""

    def __init__(self, cfg, info, images: torch.Tensor, device: torch.device, epochs: int) -> None:
        seed_everything(cfg.train.seed)
        self.cfg, self.device, self.images = cfg, device, images
        self.batch = cfg.train.batch_size
        self.steps_per_epoch = images.shape[0] // self.batch
        self.total_steps = epochs * self.steps_per_epoch
        self.method = build_model(cfg, info).to(device)
        if cfg.train.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.method.train()
        lr = cfg.optim.lr * self.batch / 256
        ctx = TrainContext(Path("."), True, images.shape[0], self.steps_per_epoch, self.total_steps, lr, 0)
        self.ctx = ctx
        self.optimizer = self.method.configure_optimizer(ctx) or build_optimizer(self.method, cfg.optim, lr)
        warmup = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.lr = warmup_cosine(lr, max(self.total_steps, 1), min(warmup, self.total_steps // 10))
        preset = cfg.data.views or "cifar"  # the recipe of CIFAR-10, whichever copy of it is trained on
        self.augment = MultiViewAugment(
            PRESETS[preset], info.image_size, info.channels, info.mean, info.std, self.method.num_views
        ).to(device)

    def step(self, step: int) -> float:
        epoch, it = divmod(step, self.steps_per_epoch)
        order = epoch_permutation(self.images.shape[0], self.cfg.train.seed, epoch)[
            it * self.batch : (it + 1) * self.batch
        ]
        views = self.augment(self.images[order.to(self.device)])
        if self.cfg.train.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        for group in self.optimizer.param_groups:
            group["lr"] = float(self.lr[min(step, len(self.lr) - 1)])
        with autocast_context(self.device, self.cfg.train.precision):
            loss = self.method(views)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.update_targets((step + 1) / max(self.total_steps, 1))
        return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_and_knn(out: Path, device: torch.device, args: argparse.Namespace, budget_s: float) -> dict:
    name, info, train_x, train_y, test_x, test_y = training_data(args.data_dir, args.dataset, args.dry_run)
    overrides = [*(DRY_OVERRIDES if args.dry_run else []), "method=simclr"]
    cfg = build_config(CONFIG, overrides)
    gpu_images = train_x.to(device)  # the whole uint8 training set in device memory
    log(f"training set {name}: {tuple(train_x.shape)} on {device} ({gpu_images.nbytes / 2**20:.0f} MiB)")

    # Probe: the sustained step time on this device sizes the epochs to the budget.
    probe = SimCLRRun(cfg, info, gpu_images, device, epochs=1)
    probe_steps = 2 if args.dry_run else 20
    for s in range(3):
        probe.step(s)
    synchronize(device)
    start = time.perf_counter()
    for s in range(probe_steps):
        probe.step(3 + s)
    synchronize(device)
    step_s = (time.perf_counter() - start) / probe_steps
    del probe
    epoch_s = step_s * (train_x.shape[0] // cfg.train.batch_size)
    epochs = max(1, math.floor(budget_s / epoch_s)) if not args.dry_run else 1
    log(f"step {1000 * step_s:.1f} ms → {epoch_s:.1f} s/epoch; {epochs} epoch(s) fit ~{budget_s:.0f} s")

    run = SimCLRRun(cfg, info, gpu_images, device, epochs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the training run's own peak, not the speed table's
    steps = min(run.total_steps, 3) if args.dry_run else run.total_steps
    loss = float("nan")
    synchronize(device)
    start = time.perf_counter()
    for s in range(steps):
        loss_t = run.step(s)
        if (s + 1) % run.steps_per_epoch == 0 or s + 1 == steps:
            loss = float(loss_t)
            done = (s + 1) / run.steps_per_epoch
            log(f"epoch {done:.1f}: loss {loss:.4f}, {time.perf_counter() - start:.0f} s")
    synchronize(device)
    train_s = time.perf_counter() - start
    if not math.isfinite(loss):
        raise RuntimeError(f"SimCLR loss became {loss}; the GPU check's training failed")

    # kNN (k = 20, T = 0.07, cosine) on the backbone's features of the clean images, as `probssl eval`.
    run.method.eval()
    preprocess = lambda x: to_float(x, info.mean, info.std)  # noqa: E731
    with autocast_context(device, cfg.train.precision):
        bank_train = extract_features(run.method.embed, train_x, train_y, preprocess, 1024, device)
        bank_test = extract_features(run.method.embed, test_x, test_y, preprocess, 1024, device)
    probs = knn_predict(
        bank_train.mean.to(device), train_y.to(device), bank_test.mean.to(device), info.num_classes, k=20
    )
    top1 = float((probs.argmax(1).cpu() == test_y).float().mean())
    result = {
        "dataset": name,
        "epochs": epochs,
        "steps": steps,
        "batch_size": cfg.train.batch_size,
        "probe_step_ms": 1000 * step_s,
        "train_seconds": train_s,
        "img_per_s": steps * cfg.train.batch_size / max(train_s, 1e-9),
        "final_loss": loss,
        "knn_top1@20": top1,
        "precision": resolve_precision(cfg.train.precision, device),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    (out / "train.json").write_text(json.dumps(result, indent=2))
    log(f"SimCLR on {name}: {epochs} epoch(s), kNN top-1 {top1:.4f}, {result['img_per_s']:.0f} img/s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, a few steps: seconds")
    parser.add_argument(
        "--data-dir", help="directory holding cifar10_jpeg/ (default: $PROBSSL_DATA or ./data)"
    )
    parser.add_argument(
        "--dataset", help="train on this registered set, or 'random' (default: cifar10_jpeg, cifar10)"
    )
    parser.add_argument(
        "--total-budget-s", type=float, default=450.0, help="whole check, speed table included"
    )
    parser.add_argument("--out", help="results folder (default: $OUT, else runs/gpu_check)")
    parser.add_argument("--skip-speed", action="store_true", help="only the training run")
    parser.add_argument("--arms", help="comma-separated subset of the speed arms (default: all)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    out = output_dir(args.out)
    if args.dry_run:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        log("no CUDA device: run with --dry-run on a CPU machine")
        return 2
    env = describe_device(device)
    log(f"device: {env}")
    arms = select_arms(args.arms)
    speed_result = None if args.skip_speed else speed(out, device, args.dry_run, arms)
    elapsed = time.perf_counter() - start
    # What is left of the budget, less ~60 s for the probe, the feature pass and kNN.
    budget = max(30.0, args.total_budget_s - elapsed - 60.0)
    train = train_and_knn(out, device, args, budget)

    lines = [f"# GPU check ({env['name']}, torch {env['torch']}, auto precision → {env['precision']})", ""]
    if speed_result is not None:
        lines += [
            "## Speed (`probssl bench speed`, configs/cifar10.yaml)",
            "",
            speed_markdown(speed_result),
            "",
        ]
    lines += [
        "## SimCLR, data and augmentation on the device",
        "",
        f"{train['dataset']}: {train['epochs']} epoch(s) of batch {train['batch_size']} in "
        f"{train['train_seconds']:.0f} s ({train['img_per_s']:.0f} img/s, {train['precision']}), "
        f"kNN top-1 (k = 20) {train['knn_top1@20']:.4f}, final loss {train['final_loss']:.4f}"
        + (f", peak memory {train['peak_memory_gib']:.1f} GiB" if train["peak_memory_gib"] else "")
        + ".",
        "",
        f"Whole check: {time.perf_counter() - start:.0f} s.",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    log(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
