"""``probssl bench SUITE --status``: where a long suite stands, without touching it.

A quality suite is a day of CPU time finished over several sessions, so the first question of each
session is what is done, what a worker is on right now (training step k of N, or evaluating), what
was interrupted and resumes, and roughly how long the rest takes. This reads the run directories
only: finished runs (``eval.json``), checkpoints (``checkpoints/latest`` → its ``meta.json``), the
final weights, and whether a live process holds the run's lock (:mod:`probssl.run_lock`).

The estimate is deliberately plain: each unfinished run is expected to cost what the finished seeds
of its arm cost (training wall × the share of steps left, plus evaluation), an arm with no finished
seed what the finished runs cost at the median; the sum is divided by the number of workers. Runs of
one arm cost alike; arms do not (the 5-member ensemble is 5×), hence per arm.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from probssl.bench import catalogue
from probssl.checkpoint import latest_checkpoint
from probssl.config import ConfigError
from probssl.io import read_json
from probssl.run_lock import lock_is_held


@dataclass
class RunState:
    """One run of the suite as its directory shows it."""

    arm: str
    seed: int
    state: str  # done | training | evaluating | interrupted | trained | not started
    step: int | None = None  # of the latest checkpoint
    total_steps: int | None = None
    train_seconds: float | None = None  # finished runs: from eval.json
    eval_seconds: float | None = None

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


def _latest_checkpoint_meta(run_dir: Path) -> dict | None:
    """The meta.json of the checkpoint a resume would start from (:func:`latest_checkpoint`)."""
    latest = latest_checkpoint(run_dir)
    meta = read_json(latest / "meta.json") if latest is not None else None
    return meta if isinstance(meta, dict) else None


def run_state(run_dir: Path, arm: str, seed: int) -> RunState:
    """What ``run_dir`` holds: a finished evaluation, a checkpoint (and whether a process is on it), or
    nothing."""
    results = read_json(run_dir / "eval.json")
    if isinstance(results, dict):
        return RunState(
            arm,
            seed,
            "done",
            train_seconds=results.get("meta/train_seconds"),
            eval_seconds=results.get("meta/eval_seconds"),
        )
    busy = lock_is_held(run_dir)
    if (run_dir / "model.safetensors").is_file():
        return RunState(arm, seed, "evaluating" if busy else "trained")
    meta = _latest_checkpoint_meta(run_dir)
    if meta is not None:
        step, total = meta.get("step"), meta.get("total_steps")
        return RunState(arm, seed, "training" if busy else "interrupted", step, total)
    return RunState(arm, seed, "training" if busy else "not started")


def suite_status(
    suite_name: str, out: str | Path, seeds: int = 3, first_seed: int = 0, only: Sequence[str] | None = None
) -> list[RunState]:
    """Every run the suite asks for (seeds ``first_seed ..``, ``--arms``), seed by seed, in the order the
    workers take them."""
    if suite_name not in catalogue.SUITES:
        raise ConfigError(f"--status is for quality suites; choose from {', '.join(catalogue.SUITES)}")
    suite = catalogue.SUITES[suite_name]
    return [
        run_state(catalogue.run_dir_for(Path(out), suite_name, arm.name, seed), arm.name, seed)
        for seed in range(first_seed, first_seed + seeds)
        for arm in catalogue.resolve_arms(only, suite)
        if suite.runs(arm.name, seed)
    ]


def _typical(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def remaining_seconds(states: Sequence[RunState]) -> float | None:
    """Worker-seconds still to spend (see the module docstring); None before any run has finished."""
    done = [s for s in states if s.state == "done" and s.train_seconds is not None]
    if not done:
        return None
    overall_train = _typical([s.train_seconds for s in done if s.train_seconds is not None]) or 0.0
    overall_eval = _typical([s.eval_seconds for s in done if s.eval_seconds is not None]) or 0.0
    total = 0.0
    for state in states:
        if state.state == "done":
            continue
        same_arm = [s for s in done if s.arm == state.arm]
        train = _typical([s.train_seconds for s in same_arm if s.train_seconds is not None])
        evaluate = _typical([s.eval_seconds for s in same_arm if s.eval_seconds is not None])
        train = overall_train if train is None else train
        evaluate = overall_eval if evaluate is None else evaluate
        left = 1.0
        if state.state in ("evaluating", "trained"):
            left = 0.0
        elif state.step is not None and state.total_steps:
            left = max(0.0, 1.0 - state.step / state.total_steps)
        total += train * left + evaluate
    return total


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def status_text(suite_name: str, states: Sequence[RunState], jobs: int = 1) -> str:
    """A few lines: counts, the runs in progress, and the estimate for ``jobs`` workers."""
    done = sum(s.state == "done" for s in states)
    lines = [f"{suite_name}: {done} of {len(states)} runs done"]
    for state in states:
        if state.state == "done" or state.state == "not started":
            continue
        detail = state.state
        if state.step is not None and state.total_steps:
            detail += f", step {state.step} of {state.total_steps}"
        if state.state == "interrupted":
            detail += " (the next invocation resumes it from there)"
        if state.state == "trained":
            detail += " (the next invocation evaluates it)"
        lines.append(f"  {state.name}: {detail}")
    waiting = [s.name for s in states if s.state == "not started"]
    if waiting:
        lines.append(f"  not started ({len(waiting)}): {', '.join(waiting)}")
    left = remaining_seconds(states)
    if left is None:
        lines.append("remaining: no finished run to estimate from yet")
    elif left > 0:
        workers = max(1, jobs)
        lines.append(
            f"remaining ≈ {_hours(left)} of one worker's time; ≈ {_hours(left / workers)} with {workers} "
            f"worker{'s' if workers > 1 else ''} (an unfinished run costs what its arm's finished seeds did)"
        )
    return "\n".join(lines)
