"""``probssl bench SUITE --curve 10,20,30``: one arm's learning curve at the suite's budget.

Why: a CPU budget is a choice, and issue 21 asks how far it is from the field's figures and from
raw pixels. The arm (SimCLR by default) is trained **once** at the suite's budget with every
epoch's checkpoint kept (``train.keep_checkpoints``), then the checkpoints at the requested
epochs are evaluated with the ``basic`` suite (kNN and linear probe: the two numbers the field
quotes), next to raw pixels (the ``pixels`` arm) as the floor. Points before the last epoch are
checkpoints of one run whose cosine schedule has not annealed yet, so they understate a run
trained to that budget from scratch; the last point is the suite's own budget.

Runs live in ``OUT/SUITE/curve/<arm>-s<seed>`` (apart from the suite's runs, whose checkpoints are
not kept), except for a suite with ``keep_every_epoch`` (a budget too long to train twice), whose own
run ``OUT/SUITE/<arm>-s<seed>`` is the curve's; ``curve.json`` and ``curve.md`` go to
``OUT/SUITE/curve``; ``--update FILE`` writes the section ``curve-SUITE``. Everything finished is
reused, so the command can be interrupted and rerun.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from probssl.bench.catalogue import SUITES, QualityArm, Suite, resolve_arms, run_dir_for
from probssl.bench.provenance import provenance
from probssl.bench.sections import replace_section
from probssl.bench.suites import _arm_config
from probssl.config import ConfigError
from probssl.io import atomic_write_json, atomic_write_text
from probssl.run_lock import run_lock

#: The field's figures for SimCLR with a ResNet-18 on the official CIFAR-10 files, as issue 21 quotes
#: them: the yardstick for the CIFAR-10 suites' curve (not comparable digit for digit with the JPEG copy).
FIELD_FIGURES: dict[str, tuple[tuple[str, str, float], ...]] = {
    "cifar10_jpeg": (
        ("knn/top1", "SimCLR, ResNet-18, 200 epochs, kNN", 0.85),
        ("linear/top1", "SimCLR, ResNet-18, 1000 epochs, linear", 0.91),
    ),
}

COLUMNS = (("knn/top1", "kNN top-1"), ("linear/top1", "linear top-1"))


def parse_epochs(text: str, suite: Suite) -> list[int]:
    """``"10,20,30"`` → [10, 20, 30]: positive, at most the suite's epochs, sorted, no repeats."""
    total = int(suite.budget["train"]["epochs"])
    try:
        epochs = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(
            f"--curve takes comma-separated epochs (e.g. 10,20,{total}), got {text!r}"
        ) from None
    if not epochs or epochs[0] < 1 or epochs[-1] > total:
        raise ConfigError(f"--curve epochs must lie in 1..{total} (the {suite.name} budget), got {text!r}")
    return epochs


def _train(suite: Suite, arm: QualityArm, seed: int, run_dir: Path, data_dir: str | None, progress: bool):
    from probssl.train import train

    cfg = _arm_config(suite, arm, seed, data_dir)
    cfg.train.progress = progress
    cfg.train.keep_checkpoints = max(cfg.train.keep_checkpoints, cfg.train.epochs)  # every epoch's
    if not (run_dir / "model.safetensors").is_file():
        train(cfg, run_dir, resume=(run_dir / "config.yaml").is_file())


def _evaluate(run_dir: Path, step: int | None, data_dir: str | None, progress: bool) -> dict[str, Any]:
    from probssl.eval.evaluate import evaluate_run

    path = run_dir / ("eval.json" if step is None else f"eval_step{step}.json")
    if not path.is_file():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluate_run(run_dir, data_dir=data_dir, progress=progress, step=step, suite_name="basic")
    return json.loads(path.read_text())


def learning_curve(
    suite_name: str,
    out: str | Path,
    epochs: Sequence[int] | str,
    arm_name: str = "simclr",
    seed: int = 0,
    data_dir: str | None = None,
    progress: bool = True,
    update: str | Path | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Train ``arm_name`` once at the suite's budget, evaluate it at ``epochs``; write the table."""
    if suite_name not in SUITES:
        raise ConfigError(f"unknown benchmark suite {suite_name!r}; choose from {', '.join(SUITES)}")
    suite = SUITES[suite_name]
    if isinstance(epochs, str):
        epochs = parse_epochs(epochs, suite)
    else:
        epochs = parse_epochs(",".join(str(e) for e in epochs), suite)
    if arm_name == "pixels":
        raise ConfigError("--curve needs a trained arm (e.g. simclr); raw pixels are its reference row")
    (arm,) = resolve_arms([arm_name], suite)
    curve_dir = Path(out) / suite.name / "curve"
    # A suite whose runs keep every epoch's checkpoint gives its own run; others train one apart.
    run_dir = (
        run_dir_for(Path(out), suite.name, arm.name, seed)
        if suite.keep_every_epoch
        else (curve_dir / f"{arm.name}-s{seed}")
    )
    pixels_dir = curve_dir / f"pixels-s{seed}"
    total_epochs = int(suite.budget["train"]["epochs"])
    with run_lock(run_dir):
        _train(suite, arm, seed, run_dir, data_dir, progress)
        summary = json.loads((run_dir / "train_summary.json").read_text())
        steps_per_epoch = int(summary["total_steps"]) // total_epochs
        points = []
        for epoch in epochs:
            metrics = _evaluate(run_dir, epoch * steps_per_epoch, data_dir, progress)
            points.append(
                {
                    "epochs": epoch,
                    "step": epoch * steps_per_epoch,
                    "train_minutes": summary["seconds_per_epoch"] * epoch / 60,
                    **{key: metrics.get(key) for key, _ in COLUMNS},
                }
            )
    with run_lock(pixels_dir):
        _train(suite, resolve_arms(["pixels"])[0], seed, pixels_dir, data_dir, progress)
        pixels = _evaluate(pixels_dir, None, data_dir, progress)
    result = {
        "suite": suite.name,
        "arm": arm.name,
        "seed": seed,
        "budget": suite.budget,
        "points": points,
        "pixels": {key: pixels.get(key) for key, _ in COLUMNS},
        "field": [
            {"key": k, "what": w, "value": v}
            for k, w, v in FIELD_FIGURES.get(suite.budget["data"]["dataset"], ())
        ],
        "precision": summary.get("precision"),
        "command": command,
        **provenance(),
    }
    atomic_write_json(curve_dir / "curve.json", result)
    table = curve_markdown(result, total_epochs)
    atomic_write_text(curve_dir / "curve.md", table + "\n")
    print(table)
    if update:
        header = (
            f"Command: `{command}` ({result['date']}, commit {result['commit']}, {result['processor']}, "
            f"{result['cpus']} CPUs, torch {result['torch']}, precision {result['precision']}). {suite.note}."
        )
        replace_section(
            update,
            f"curve-{suite.name}",
            f"{header}\n\n{table}",
            heading=f"## Learning curve: {arm.name} on {suite.name} "
            f"(generated by `probssl bench {suite.name} --curve`)",
        )
    return result


def _number(value: Any) -> str:
    return "–" if not isinstance(value, int | float) else f"{value:.4f}"


def curve_markdown(result: dict[str, Any], total_epochs: int) -> str:
    """The curve as a table (epochs, training minutes, kNN, linear; raw pixels last) and a reading."""
    head = ["epochs", "train min", *(label for _, label in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for point in result["points"]:
        cells = [
            str(point["epochs"]),
            f"{point['train_minutes']:.1f}",
            *(_number(point[k]) for k, _ in COLUMNS),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| raw pixels | 0 | " + " | ".join(_number(result["pixels"][k]) for k, _ in COLUMNS) + " |")
    last = result["points"][-1]
    notes = [
        f"\n{result['arm']}, seed {result['seed']}, trained once for {total_epochs} epochs; rows before "
        f"{total_epochs} are that run's checkpoints (learning rate not yet annealed), so they understate "
        "a run trained to that budget. Train minutes: the run's mean epoch time × epochs."
    ]
    for field in result["field"]:
        ours = last.get(field["key"])
        if isinstance(ours, int | float):
            pixels = result["pixels"].get(field["key"])
            above = f", {ours - pixels:+.4f} against raw pixels" if isinstance(pixels, int | float) else ""
            notes.append(
                f"- {field['key']} at {last['epochs']} epochs: {ours:.4f}, "
                f"{ours - field['value']:+.4f} against the field's {field['value']:.2f} "
                f"({field['what']}, official CIFAR-10){above}."
            )
    return "\n".join(lines + notes)
