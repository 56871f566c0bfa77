"""Fault injection: a training process killed with SIGKILL at arbitrary moments resumes bit-exactly.

Each case trains once uninterrupted and once with ``kill -9`` delivered after a chosen number of
logged steps — possibly in the middle of writing a checkpoint, a sample-bank entry or the CSV — then
resumes with ``--resume`` until done. Final weights, the cSGHMC sample bank and ``eval.json`` must be
bit-identical. Both runs are subprocesses with the same thread count (float reductions depend on it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from probssl.eval.evaluate import TIMING_KEYS

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _train_args(method: str, out: Path) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "probssl.cli",
        "train",
        "--method",
        method,
        "--dataset",
        "digits",
        "--subset",
        "320",
        "--batch-size",
        "32",
        "--epochs",
        "3",
        "--out",
        str(out),
        "--no-progress",
        "backbone.width=8",
        "train.deterministic=true",
        "train.tensorboard=false",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=3",
        "train.log_every=1",
    ]
    if method == "csghmc":  # 30 steps: 2 cycles of 15, samples at in-cycle positions 8, 11, 14
        args += ["method.cycles=2", "method.exploration_fraction=0.5", "method.bn_images=256"]
    if method == "lam":  # online LAM: the running Hessian and the step counter of its noise are state
        args += ["method.posterior=online", "method.max_pairs=200"]
    return args


def _logged_steps(out: Path) -> int:
    path = out / "metrics.csv"
    return max(len(path.read_text().splitlines()) - 1, 0) if path.is_file() else 0


def _run_killed_at(method: str, out: Path, kill_after: int) -> None:
    proc = subprocess.Popen(
        _train_args(method, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while proc.poll() is None and _logged_steps(out) < kill_after and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed; lower kill_after"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _check(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _eval(run: Path) -> dict:
    _check([sys.executable, "-m", "probssl.cli", "eval", str(run), "--suite", "basic", "--no-progress"])
    results = json.loads((run / "eval.json").read_text())
    drop = (*TIMING_KEYS, "config/data.data_dir")  # timings, paths
    return {k: v for k, v in results.items() if not k.startswith(drop)}


@pytest.mark.parametrize(("method", "kill_after"), [("simclr", 7), ("csghmc", 13), ("lam", 11)])
def test_sigkill_then_resume_is_bit_identical(tmp_path, method, kill_after):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _check(_train_args(method, reference))
    _run_killed_at(method, killed, kill_after)
    assert not (killed / "model.safetensors").exists()
    _check([sys.executable, "-m", "probssl.cli", "train", "--resume", "--out", str(killed), "--no-progress"])

    a, b = load_file(str(reference / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if method == "csghmc":
        bank_a = json.loads((reference / "samples" / "index.json").read_text())["samples"]
        bank_b = json.loads((killed / "samples" / "index.json").read_text())["samples"]
        assert len(bank_a) == 6
        assert [(s["meta"], s["sha256"]) for s in bank_a] == [(s["meta"], s["sha256"]) for s in bank_b]
    ref_eval, killed_eval = _eval(reference), _eval(killed)
    ref_eval.pop("config/train.max_steps", None), killed_eval.pop("config/train.max_steps", None)
    assert ref_eval == killed_eval


def test_posthoc_hessian_pass_interrupted_before_the_final_weights_is_redone_identically(tmp_path):
    """Post-hoc LAM's Hessian pass runs after the last checkpoint: a run killed during it has the
    final checkpoint but no model.safetensors, and ``--resume`` must redo the pass to the same H."""
    reference = tmp_path / "reference"
    _check(_train_args("lam", reference)[:-2] + ["method.posterior=posthoc", "method.max_pairs=200"])
    interrupted = tmp_path / "interrupted"
    subprocess.run(["cp", "-r", str(reference), str(interrupted)], check=True)
    for name in ("model.safetensors", "model.json", "train_summary.json"):
        (interrupted / name).unlink(missing_ok=True)
    _check(
        [sys.executable, "-m", "probssl.cli", "train", "--resume", "--out", str(interrupted), "--no-progress"]
    )
    a = load_file(str(reference / "model.safetensors"))
    b = load_file(str(interrupted / "model.safetensors"))
    assert a["laplace.hessian"].abs().sum() > 0  # the pass did run
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simclr", "csghmc"])
def test_repeated_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path, method):
    """Long variant: three kills at seeded random steps, each followed by ``--resume``."""
    rng = random.Random(f"sigkill-{method}")
    kill_points = sorted(rng.sample(range(2, 28), 3))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _check(_train_args(method, reference))
    resume = [sys.executable, "-m", "probssl.cli", "train", "--resume", "--out", str(killed), "--no-progress"]
    for i, kill_after in enumerate(kill_points):
        args = _train_args(method, killed) if i == 0 else resume
        proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _logged_steps(killed) < kill_after and time.monotonic() < deadline:
            time.sleep(0.002)
        assert proc.poll() is None, f"run finished before kill at {kill_after}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    _check(resume)
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ref_eval, killed_eval = _eval(reference), _eval(killed)
    ref_eval.pop("config/train.max_steps", None), killed_eval.pop("config/train.max_steps", None)
    assert ref_eval == killed_eval


def _children_by_rank(parent: int) -> dict[int, int]:
    """pid of each torchrun worker under ``parent``, keyed by its RANK environment variable."""
    workers = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # the process went away while we looked
        for entry in env:
            if entry.startswith(b"RANK="):
                workers[int(entry[5:])] = int(stat.parent.name)
    return workers


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find torchrun's workers")
def test_ddp_rank_killed_mid_run_resumes_cleanly(tmp_path):
    """SIGKILL one of two torchrun workers: the job fails loudly, ``--resume`` under torchrun finishes
    and reaches exactly the weights of an uninterrupted 2-process run."""
    extra = ["backbone.norm=group"]  # BatchNorm statistics would differ per rank

    def torchrun(out: Path, resume: bool = False) -> list[str]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += ["-m", "probssl.cli"]
        if resume:
            return [*cmd, "train", "--resume", "--out", str(out), "--no-progress"]
        return [*cmd, *_train_args("simclr", out)[3:], *extra]

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _check(torchrun(reference))
    proc = subprocess.Popen(torchrun(killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and _logged_steps(killed) < 6 and time.monotonic() < deadline:
        time.sleep(0.005)
    workers = _children_by_rank(proc.pid)
    assert proc.poll() is None and 1 in workers, "could not find rank 1 before the run ended"
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0, stderr[-2000:]  # torchrun tears the other rank down and fails
    assert not (killed / "model.safetensors").exists()
    _check(torchrun(killed, resume=True))

    a, b = load_file(str(reference / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
