"""Training through the streaming input path: exact resume after SIGKILL, and DDP sharding.

The SIGKILL case mirrors tests/test_faults.py: one uninterrupted run, one run killed with ``kill -9``
(its DataLoader workers die with it) and resumed with ``--resume``; the final weights must be
bit-identical. The reference runs *in memory*, so the test also shows that both paths compute the
same run. The DDP case runs a real 2-process gloo job under torchrun.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from probssl.config import build_config
from probssl.data import load_dataset
from probssl.runs import load_run
from probssl.train import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _train_args(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "probssl.cli",
        "train",
        "--method",
        "simclr",
        "--dataset",
        "digits",
        "--subset",
        "192",
        "--batch-size",
        "32",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "backbone.width=8",
        "train.deterministic=true",
        "train.tensorboard=false",
        "train.checkpoint_every=2",
        "train.log_every=1",
        *extra,
    ]


def _logged_steps(out: Path) -> int:
    path = out / "metrics.csv"
    return max(len(path.read_text().splitlines()) - 1, 0) if path.is_file() else 0


def _check(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_sigkill_during_streaming_training_then_resume_is_bit_identical(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _check(_train_args(reference, "data.pipeline=memory"))
    stream = ("data.pipeline=stream", "data.workers=1")
    proc = subprocess.Popen(
        _train_args(killed, *stream), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while (
        proc.poll() is None and _logged_steps(killed) < 8 and time.monotonic() < deadline
    ):  # epoch 1 of 6 steps
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    _check([sys.executable, "-m", "probssl.cli", "train", "--resume", "--out", str(killed), "--no-progress"])

    a, b = load_file(str(reference / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


WORKER_SRC = textwrap.dedent(
    """
    import gc
    import sys

    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from probssl.data.pipeline import BatchPlan, StreamingBatches
    from probssl.data.sources import ArraySource

    N, BATCH = 70, 8  # 8 steps per epoch, 6 items dropped
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = torch.arange(N)
    images = torch.zeros(N, 3, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (ids % 256).to(torch.uint8), (ids // 256).to(torch.uint8)
    source = ArraySource(images, torch.zeros(N, dtype=torch.long), ["x"], "ids", "train")
    plan = BatchPlan(N, BATCH, seed=5, world_size=world, rank=rank)
    pipeline = StreamingBatches(source, plan, workers=1, prefetch_factor=2)

    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Linear(48, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []
    for batch in pipeline.batches(plan.steps_per_epoch, 2 * plan.steps_per_epoch):  # epoch 1
        seen.append(batch[:, 0, 0, 0].long() + 256 * batch[:, 0, 0, 1].long())
        loss = model(batch.float().flatten(1) / 255).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    mine = torch.cat(seen)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        torch.save(torch.stack(gathered), sys.argv[1])
    del model, opt, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_streaming_epoch_sees_every_image_once(tmp_path):
    script, result = tmp_path / "worker.py", tmp_path / "seen.pt"
    script.write_text(WORKER_SRC)
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(script), str(result)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = torch.load(result, weights_only=True)  # [rank, items]
    assert seen.shape == (2, 32)
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
    flat = seen.flatten()
    assert len(set(flat.tolist())) == 64  # every item of the epoch once: 70 // 8 * 8
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(5 * 100_003 + 1))
    assert set(flat.tolist()) == set(perm[:64].tolist())


# ------------------------------------------------------------------------- own folders, in-process


def _write_folder(root: Path, per_class: int = 24, size: int = 8, corrupt: bool = False) -> Path:
    """``root/<class>/<image>.png``: two classes of small RGB images, bright vs dark."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "bright")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 128, (size, size, 3), dtype=np.uint8) + 127 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i:03d}.png")
    if corrupt:
        (root / "dark" / "broken.png").write_bytes(b"not a png")
    return root


def _folder_cfg(folder: Path, pipeline: str, **data):
    return build_config(
        method="simclr",
        backbone="convnet",
        backbone_args={"width": 8},
        data={"dataset": str(folder), "pipeline": pipeline, "workers": 1, **data},
        train={"epochs": 2, "batch_size": 8, "progress": False, "tensorboard": False, "deterministic": True},
    )


def test_a_folder_trains_identically_in_memory_and_streaming(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBSSL_CACHE", str(tmp_path / "cache"))
    folder = _write_folder(tmp_path / "imgs")
    memory = train(_folder_cfg(folder, "memory"), tmp_path / "memory")
    stream = train(_folder_cfg(folder, "stream"), tmp_path / "stream")
    a, b = load_file(str(memory / "model.safetensors")), load_file(str(stream / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key

    info = load_run(stream).info  # computed from the folder's training split, stored with the run
    train_split = load_dataset(str(folder), "train").images.double() / 255
    np.testing.assert_allclose(info.mean, train_split.mean((0, 2, 3)).numpy(), atol=1e-6)
    np.testing.assert_allclose(info.std, train_split.std((0, 2, 3), unbiased=False).numpy(), atol=1e-6)
    assert json.loads((stream / "dataset_info.json").read_text())["image_size"] == 8


def test_skip_corrupt_lists_the_skipped_images_in_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("PROBSSL_CACHE", str(tmp_path / "cache"))
    folder = _write_folder(tmp_path / "imgs", corrupt=True)
    run = train(_folder_cfg(folder, "stream", skip_corrupt=True), tmp_path / "run")
    listed = (run / "skipped_images.txt").read_text().splitlines()
    assert len(listed) == 1 and listed[0].endswith("broken.png")


def test_cli_trains_and_evaluates_a_folder_streaming(tmp_path, monkeypatch):
    from probssl.cli import main

    monkeypatch.setenv("PROBSSL_CACHE", str(tmp_path / "cache"))
    folder = _write_folder(tmp_path / "imgs", size=10)
    run = tmp_path / "run"
    args = ["train", "--dataset", str(folder), "--image-size", "8", "--batch-size", "8", "--epochs", "1"]
    args += [
        "--out",
        str(run),
        "--no-progress",
        "backbone=convnet",
        "backbone.width=8",
        "train.tensorboard=false",
    ]
    assert main([*args, "data.pipeline=stream", "data.workers=0"]) == 0
    info = json.loads((run / "dataset_info.json").read_text())
    assert info["channels"] == 3 and info["image_size"] == 8 and info["num_classes"] == 2
    assert main(["eval", str(run), "--suite", "basic", "--no-progress"]) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["knn/top1"] > 0.9  # bright vs dark images: trivially separable


def test_a_small_subset_of_a_large_folder_decodes_only_its_items(tmp_path, monkeypatch):
    import probssl.train as train_module

    monkeypatch.setenv("PROBSSL_CACHE", str(tmp_path / "cache"))
    decoded = []
    real_load_source = train_module.load_source
    monkeypatch.setattr(
        train_module,
        "load_source",
        lambda source, *a: decoded.append(len(source)) or real_load_source(source, *a),
    )
    folder = _write_folder(tmp_path / "imgs")
    # the folder is "too large" for memory, its 16-image subset is not
    cfg = _folder_cfg(folder, "auto", subset=16, memory_limit_gb=16 * 3 * 8 * 8 / 2**30)
    small = train(cfg, tmp_path / "small")
    assert decoded == [16]
    large = train(_folder_cfg(folder, "stream", subset=16), tmp_path / "large")
    a, b = load_file(str(small / "model.safetensors")), load_file(str(large / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
