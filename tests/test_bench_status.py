"""``probssl bench SUITE --status``: the state of each run read off its directory, and the time left."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from probssl.bench import status
from probssl.cli import main


def _finished(run: Path, train: float, evaluate: float) -> None:
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"meta/train_seconds": train, "meta/eval_seconds": evaluate}))


def _checkpoint(run: Path, step: int, total: int) -> None:
    step_dir = run / "checkpoints" / f"step_{step:08d}"
    step_dir.mkdir(parents=True)
    (step_dir / "meta.json").write_text(json.dumps({"step": step, "total_steps": total}))
    (run / "checkpoints" / "latest").write_text(step_dir.name)


@pytest.fixture
def suite_dir(tmp_path: Path) -> Path:
    root = tmp_path / "fashion_mnist"
    _finished(root / "simclr-s0", 100.0, 20.0)
    _finished(root / "byol-s0", 300.0, 30.0)
    _checkpoint(root / "simclr-s1", 50, 100)
    (root / "byol-s1").mkdir()
    (root / "byol-s1" / "model.safetensors").write_bytes(b"weights")
    return tmp_path


def test_states_and_the_estimate_come_from_the_run_directories(suite_dir: Path) -> None:
    lock = suite_dir / "fashion_mnist" / "simclr-s1" / ".bench.lock"
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a worker on simclr-s1 (another open file: it conflicts)
    try:
        states = status.suite_status("fashion_mnist", suite_dir, seeds=3, only=["simclr", "byol"])
        assert [(s.name, s.state) for s in states] == [
            ("simclr-s0", "done"),
            ("byol-s0", "done"),
            ("simclr-s1", "training"),
            ("byol-s1", "trained"),
            ("simclr-s2", "not started"),
            ("byol-s2", "not started"),
        ]
        assert (states[2].step, states[2].total_steps) == (50, 100)
        # simclr-s1: half its arm's training + its evaluation; byol-s1: evaluation only; the s2 runs: in full
        expected = (0.5 * 100 + 20) + 30 + (100 + 20) + (300 + 30)
        assert status.remaining_seconds(states) == pytest.approx(expected)
        text = status.status_text("fashion_mnist", states, jobs=2)
        assert "2 of 6 runs done" in text and "simclr-s1: training, step 50 of 100" in text
        assert (
            f"≈ {expected / 60:.0f} min of one worker's time; ≈ {expected / 120:.0f} min with 2 workers"
            in text
        )
    finally:
        os.close(fd)
    assert status.run_state(suite_dir / "fashion_mnist" / "simclr-s1", "simclr", 1).state == "interrupted"


def test_an_arm_without_a_finished_seed_costs_the_median_run(suite_dir: Path) -> None:
    states = status.suite_status("fashion_mnist", suite_dir, seeds=1, only=["simclr", "byol", "simsiam"])
    assert states[2].state == "not started"
    assert status.remaining_seconds(states) == pytest.approx((100 + 300) / 2 + (20 + 30) / 2)
    nothing = status.suite_status("fashion_mnist", suite_dir / "empty", seeds=1, only=["simclr"])
    assert status.remaining_seconds(nothing) is None
    assert "no finished run to estimate from yet" in status.status_text("fashion_mnist", nothing)


def test_the_cli_prints_the_status_and_trains_nothing(suite_dir: Path, capsys) -> None:
    before = sorted(p.relative_to(suite_dir) for p in suite_dir.rglob("*"))
    argv = [
        "bench",
        "fashion_mnist",
        "--out",
        str(suite_dir),
        "--status",
        "--arms",
        "simclr,byol",
        "--seeds",
        "2",
    ]
    assert main(argv) == 0
    assert "2 of 4 runs done" in capsys.readouterr().out
    assert sorted(p.relative_to(suite_dir) for p in suite_dir.rglob("*")) == before  # read-only
    assert main(["bench", "speed", "--out", str(suite_dir), "--status"]) == 2
    assert "--status is for quality suites" in capsys.readouterr().err
