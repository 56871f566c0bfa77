"""Input-pipeline figures: is training input-bound, and does streaming keep memory flat?

Three sub-commands (each prints one JSON object; run with ``PYTHONPATH=src`` from the checkout):

``make-folder DIR --count N --size S``
    Write N smooth random S x S RGB JPEGs (quality 75) into a flat folder, with one process.

``throughput --dataset NAME_OR_PATH [--data-dir D] [--workers 0 1 2] [--steps K] [--batch B]``
    uint8 images/s delivered by the in-memory path (decode cache, memory-mapped) and by the streaming
    path with each worker count, over the same batch plan the training loop uses; next to it the
    images/s of one CIFAR-shaped SimCLR training step (convnet, batch B, augmentation included) at
    the dataset's image size. Input-bound means: pipeline img/s below the step's img/s.

``rss --dataset PATH --steps K [--batch B] [--workers W]``
    Runs ``probssl train`` with ``data.pipeline=stream`` in a child process and samples, every 0.2 s,
    the resident memory of the trainer and of its DataLoader workers (from /proc); reports the peaks
    and the N*C*H*W bytes the in-memory path would need for the same folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_folder(out: Path, count: int, size: int, seed: int = 0) -> dict:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    coarse_size = max(size // 8, 2)
    for i in range(count):
        coarse = rng.integers(0, 256, (coarse_size, coarse_size, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR)
        image.save(out / f"{i:07d}.jpg", quality=75)
    nbytes = sum(p.stat().st_size for p in out.iterdir())
    return {
        "folder": str(out),
        "count": count,
        "size": size,
        "bytes": nbytes,
        "seconds": time.perf_counter() - started,
    }


def _rate(batches, steps: int, batch: int) -> float:
    iterator = iter(batches)
    next(iterator)  # the first batch pays the workers' start-up; measured separately
    started = time.perf_counter()
    for _ in range(steps - 1):
        next(iterator)
    return (steps - 1) * batch / (time.perf_counter() - started)


def throughput(dataset: str, data_dir: str | None, workers: list[int], steps: int, batch: int) -> dict:
    import torch

    from probssl.config import build_config
    from probssl.data import (
        MultiViewAugment,
        load_source,
        open_source,
        preset_for_dataset,
        resolve_dataset_info,
    )
    from probssl.data.pipeline import BatchPlan, InMemoryBatches, StreamingBatches
    from probssl.data.views import PRESETS
    from probssl.runs import build_model

    torch.set_num_threads(1)
    source = open_source(dataset, "train", data_dir=data_dir, download=False)
    plan = BatchPlan(len(source), batch, seed=0)
    result: dict = {
        "dataset": dataset,
        "items": len(source),
        "batch": batch,
        "steps": steps,
        "torch_threads": 1,
    }
    started = time.perf_counter()
    images = load_source(source).images
    result["memory_load_seconds"] = time.perf_counter() - started
    result["memory_img_s"] = _rate(InMemoryBatches(images, plan).batches(0, steps), steps, batch)
    del images
    for w in workers:
        pipeline = StreamingBatches(source, plan, workers=w)
        started = time.perf_counter()
        result[f"stream_w{w}_img_s"] = _rate(pipeline.batches(0, steps), steps, batch)
        result[f"stream_w{w}_seconds"] = time.perf_counter() - started

    info = resolve_dataset_info(dataset, data_dir=data_dir)
    cfg = build_config(method="simclr", backbone="convnet", data={"dataset": dataset})
    method = build_model(cfg, info)
    preset = preset_for_dataset(dataset, info.channels, info.image_size)
    augment = MultiViewAugment(PRESETS[preset], info.image_size, info.channels, info.mean, info.std)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01, momentum=0.9)
    x = torch.randint(0, 256, (batch, info.channels, info.image_size, info.image_size), dtype=torch.uint8)
    times = []
    for i in range(4):
        started = time.perf_counter()
        loss = method(augment(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i:  # the first step allocates
            times.append(time.perf_counter() - started)
    result["train_step_seconds"] = float(np.median(times))
    result["train_img_s"] = batch / result["train_step_seconds"]
    return result


def _tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        kids = [int(c) for c in children.read_text().split()]
    except OSError:
        return [pid]
    return [pid, *(p for k in kids for p in _tree(k))]


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss(dataset: str, steps: int, batch: int, workers: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_rss_"))
    cmd = [sys.executable, "-m", "probssl.cli", "train", "--method", "simclr", "--dataset", dataset]
    cmd += ["--batch-size", str(batch), "--epochs", "1", "--out", str(out / "run"), "--no-progress"]
    cmd += ["backbone=convnet", "train.tensorboard=false", f"train.max_steps={steps}", "train.log_every=50"]
    cmd += ["data.pipeline=stream", f"data.workers={workers}"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_main = peak_tree = peak_worker = 0
    series = []  # (seconds, steps logged, trainer MiB, workers' MiB): flat or growing?
    last_sample = 0.0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        sizes = [_rss_bytes(p) for p in pids]
        peak_main = max(peak_main, sizes[0])
        peak_tree = max(peak_tree, sum(sizes))
        peak_worker = max([peak_worker, *sizes[1:]])
        now = time.perf_counter() - started
        if now - last_sample >= 30:
            metrics = out / "run" / "metrics.csv"
            logged = len(metrics.read_text().splitlines()) - 1 if metrics.is_file() else 0
            series.append((round(now), logged * 50, sizes[0] >> 20, [s >> 20 for s in sizes[1:]]))
            last_sample = now
        time.sleep(0.2)
    _, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"training failed ({proc.returncode}):\n{err[-3000:]}")
    last = (out / "run" / "metrics.csv").read_text().splitlines()[-1].split(",")  # an early stop: no summary
    info = json.loads((out / "run" / "dataset_info.json").read_text())
    from probssl.data import open_source

    n = len(open_source(dataset, "train"))
    return {
        "dataset": dataset,
        "train_items": n,
        "steps": steps,
        "batch": batch,
        "workers": workers,
        "seconds": time.perf_counter() - started,
        "train_img_s_last_window": float(last[-1]),
        "peak_rss_trainer_bytes": peak_main,
        "peak_rss_one_worker_bytes": peak_worker,
        "peak_rss_tree_sum_bytes": peak_tree,  # counts pages shared by fork once per process
        "in_memory_would_need_bytes": n * info["channels"] * info["image_size"] ** 2,
        "series_s_steps_trainer_mib_workers_mib": series,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make-folder")
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--size", type=int, default=64)
    p = sub.add_parser("throughput")
    p.add_argument("--dataset", default="cifar10_jpeg")
    p.add_argument("--data-dir")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=256)
    p = sub.add_parser("rss")
    p.add_argument("--dataset", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.command == "make-folder":
        result = make_folder(args.out, args.count, args.size)
    elif args.command == "throughput":
        result = throughput(args.dataset, args.data_dir, args.workers, args.steps, args.batch)
    else:
        result = rss(args.dataset, args.steps, args.batch, args.workers)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
