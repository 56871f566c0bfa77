"""Multi-node DDP as far as one machine allows: two ``torchrun --nnodes 2`` "machines" on localhost.

Each machine is a working directory of its own with its own copy of the training images and its own
decode cache, and runs the same command (``--dataset images --out run``, relative paths), as two hosts
without a shared filesystem would: the c10d rendezvous joins them into one job of two ranks. Rank 0's
machine holds the run directory; the other never gets one. Killed mid-run (``kill -9`` of the
launcher and every process under it, as a power cut would) and resumed on both machines, the job must
finish at exactly the weights of the same job on one machine (``--standalone --nproc_per_node 2``):
every step before and after the kill ran on two machines. (Not the weights of one process: each
process draws its own augmentations.) A ``--resume`` that rank 0 refuses must stop both machines.

Not tested here, because it cannot be on one machine: real network latency and a hostname-ordered
rank assignment (on localhost the c10d rendezvous orders the two launchers by process id, so the
launcher started first is rank 0).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import probssl
from probssl.config import build_config, save_config
from probssl.data import load_dataset

SRC = str(Path(probssl.__file__).resolve().parents[1])  # this checkout, whatever the cwd of a machine
TRAIN = [
    "-m", "probssl.cli", "train", "--method", "simclr", "--dataset", "images", "--batch-size", "32",
    "--epochs", "4", "--out", "run", "--no-progress", "backbone.width=8",
    "backbone.norm=group",  # BatchNorm statistics would differ per rank
    "train.deterministic=true", "train.tensorboard=false", "train.checkpoint_every=2", "train.log_every=1",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _images(root: Path) -> Path:
    """160 digits (16 per class) as 8×8 PNGs in class folders: 5 steps of 32 per epoch."""
    data = load_dataset("digits", "train")
    for label in range(10):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True)
        rows = np.flatnonzero(data.labels.numpy() == label)[:16]
        for k, i in enumerate(rows):
            Image.fromarray(data.images[i, 0].numpy()).save(folder / f"{k:02d}.png")
    return root


def _machine(root: Path, images: Path) -> Path:
    """A machine's working directory: its own copy of the images (same relative path) and cache."""
    root.mkdir(parents=True)
    shutil.copytree(images, root / "images")
    return root


def _env(machine: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=SRC, PROBSSL_CACHE=str(machine / "cache"))
    return env


def _start(machine: Path, launcher: list[str], *extra: str) -> subprocess.Popen:
    """One machine's torchrun, in a session of its own so the whole machine can be killed at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *launcher, *TRAIN, *extra],
        cwd=machine,
        env=_env(machine),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _two_nodes(port: int) -> list[str]:
    return ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"job{port}"]  # fmt: skip


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"a machine did not finish in {timeout} s:\n{err[-3000:]}")
    return proc.returncode, err


def _both(first: subprocess.Popen, second: subprocess.Popen) -> None:
    for proc in (first, second):
        code, err = _finish(proc)
        assert code == 0, err[-3000:]


def _kill_machine(proc: subprocess.Popen) -> None:
    """SIGKILL a machine's launcher and every process under it, as a power cut would. torchrun starts
    its workers in sessions of their own, so killing the launcher's group alone leaves them training."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone while we looked
    doomed, frontier = [], [proc.pid]
    while frontier:
        doomed += frontier
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
    for pid in doomed:
        with contextlib.suppress(ProcessLookupError):  # gone by itself meanwhile
            os.kill(pid, signal.SIGKILL)


def _logged_steps(run: Path) -> int:
    path = run / "metrics.csv"
    return max(len(path.read_text().splitlines()) - 1, 0) if path.is_file() else 0


def _two_machines(tmp_path: Path, images: Path) -> tuple[Path, Path]:
    return _machine(tmp_path / "machine_a", images), _machine(tmp_path / "machine_b", images)


@pytest.mark.slow  # seven processes of torch start-up: ~2 min on a busy 2-core machine
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find a machine's processes")
def test_two_nodes_train_the_one_machine_weights_and_resume_after_one_is_killed(tmp_path):
    images = _images(tmp_path / "images")
    one = _machine(tmp_path / "one_machine", images)
    code, err = _finish(_start(one, ["--standalone", "--nproc_per_node", "2"]))
    assert code == 0, err[-3000:]
    reference = load_file(str(one / "run" / "model.safetensors"))

    # Two machines; B is killed mid-run (A's job then fails too, it does not hang), both resume.
    a, b = _two_machines(tmp_path, images)
    port = _free_port()
    first = _start(a, _two_nodes(port))  # started first, so rank 0: c10d ranks one host's launchers by pid
    second = _start(b, _two_nodes(port))
    deadline = time.monotonic() + 240
    while first.poll() is None and _logged_steps(a / "run") < 7 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert first.poll() is None, "the job finished before a machine could be killed"
    _kill_machine(second)
    _finish(second)
    code, _ = _finish(first)
    assert code != 0
    assert not (a / "run" / "model.safetensors").exists()
    assert not (b / "run").exists()  # only rank 0's machine has a run directory

    port = _free_port()
    first = _start(a, _two_nodes(port), "--resume")
    _both(first, _start(b, _two_nodes(port), "--resume"))
    assert not (b / "run").exists()
    resumed = load_file(str(a / "run" / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    for key in reference:  # every step before and after the kill ran on two machines
        assert torch.equal(resumed[key], reference[key]), key


@pytest.mark.parametrize(
    ("holder", "error"),
    [
        ("machine_a", "error: --resume with a different config would not continue the same run"),
        ("machine_b", "but rank 0 runs on"),
    ],
)
def test_a_resume_that_rank_0_refuses_stops_every_machine(tmp_path, holder, error):
    """Rank 0 alone reads the run directory: its refusal reaches the other machine as the same one-line
    error, instead of leaving it waiting for a rank that stopped. Refused: a changed config (the run,
    of another learning rate, is on rank 0's machine A), and a run directory on machine B only (rank 0
    would start afresh beside it)."""
    images = _images(tmp_path / "images")
    a, b = _two_machines(tmp_path, images)
    run = tmp_path / holder / "run"
    run.mkdir()
    other_lr = build_config(method="simclr", data={"dataset": "images"}, optim={"lr": 0.5})
    save_config(other_lr, run / "config.yaml")
    port = _free_port()
    first = _start(a, _two_nodes(port), "--resume")  # started first, so rank 0
    second = _start(b, _two_nodes(port), "--resume")
    for proc in (first, second):
        code, err = _finish(proc, timeout=240)
        assert code != 0
        assert error in err, err[-3000:]
    assert [p.name for p in (a / "run", b / "run") if p.exists()] == [run.name] and run.exists()
    assert sorted(q.name for q in run.iterdir()) == ["config.yaml"]  # nothing written beside it


def test_the_readme_two_machine_command_parses():
    """The README's multi-node command as written: torchrun's own parser, then probssl's."""
    from torch.distributed.run import get_args_parser

    from probssl.cli import build_parser

    readme = (Path(SRC).parent / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", readme, flags=re.S)).replace("\\\n", " ")
    commands = [line.split("  #")[0].strip() for line in blocks.splitlines() if "torchrun --nnodes" in line]
    assert commands, "README shows no multi-node command"
    for command in commands:
        argv = shlex.split(command.replace("$MAIN_HOST", "10.0.0.1"))[1:]
        launcher = get_args_parser().parse_args(argv)
        assert (launcher.nnodes, launcher.rdzv_backend, launcher.module) == ("2", "c10d", True)
        assert launcher.training_script == "probssl.cli"
        args, extra = build_parser().parse_known_args(launcher.training_script_args)
        assert args.command == "train" and all("=" in e for e in extra), extra
