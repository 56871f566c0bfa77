"""Run directories and their results: which paths are evaluated runs, and what their ``eval.json``
and ``train_summary.json`` say.

Two ways to read, for two readers: a table (``probssl table``, the bench tables) refuses a run whose
``eval.json`` it cannot read, since a table with a silently missing row misleads; a report page
(:func:`read_json_object`) keeps going with a note, since one broken run must not cost the reader the
whole page.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from probssl.io import read_json

EVAL_FILE = "eval.json"
TRAIN_SUMMARY_FILE = "train_summary.json"

#: train_summary.json keys a run's results carry (as ``meta/train_<key>``): where it trained. A suite is
#: finished over several sessions, and the processor — hence what ``precision: auto`` resolves to, and
#: every time — changes between them.
TRAINING_KEYS = ("precision", "processor")

#: eval.json's ``meta/supervision`` of a run trained without labels; any other value is marked in tables.
SELF_SUPERVISED = "self-supervised"


def is_run_dir(path: str | Path) -> bool:
    """A directory ``probssl train`` wrote (``config.yaml``) or results were copied into (``eval.json``):
    what ``table`` and ``report`` accept."""
    path = Path(path)
    return (path / "config.yaml").is_file() or (path / EVAL_FILE).is_file()


def select_runs(paths: Sequence[str | Path], need_eval: bool = True) -> tuple[list[Path], list[str]]:
    """The run directories among ``paths`` (a shell glob like ``runs/demo/*`` also catches
    ``report.html``), and one note per path left out and why.

    With ``need_eval`` a run without ``eval.json`` is left out too (it is not evaluated yet), so one
    unfinished run does not stop a table of the others. Nothing left is an error: the message says
    what was given and what a run directory is.
    """
    kept: list[Path] = []
    notes: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if not is_run_dir(path):
            if path.is_dir():  # a plain file beside the runs (report.html, results.md) is skipped quietly
                notes.append(f"skipped {path}: not a run directory (no config.yaml or eval.json)")
            continue
        if need_eval and not (path / EVAL_FILE).is_file():
            notes.append(f"skipped {path}: not evaluated yet (run `probssl eval {path}`)")
            continue
        kept.append(path)
    if not kept:
        given = ", ".join(str(p) for p in paths[:4]) + (" ..." if len(paths) > 4 else "")
        what = "an evaluated run directory" if need_eval else "a run directory"
        raise FileNotFoundError(
            f"none of {given} is {what}; pass the --out directories of `probssl train` runs"
            + (" after `probssl eval RUN`" if need_eval else "")
        )
    return kept, notes


def training_keys(run_dir: str | Path) -> dict[str, Any]:
    """``meta/train_precision`` and ``meta/train_processor`` from the run's train_summary.json; empty for
    runs trained before they were recorded (or copied without it)."""
    summary = read_json(Path(run_dir) / TRAIN_SUMMARY_FILE)
    if not isinstance(summary, dict):
        return {}
    return {f"meta/train_{k}": summary[k] for k in TRAINING_KEYS if summary.get(k) is not None}


def read_eval(run_dir: str | Path, with_training: bool = False) -> dict[str, Any]:
    """A run's ``eval.json`` (and with ``with_training`` where it trained, :func:`training_keys`).

    A missing file is an error naming the command that writes it; an unreadable one raises as
    ``json`` does: a table must not drop a row without saying so.
    """
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `probssl eval {run_dir}` first")
    results = json.loads(path.read_text())
    if with_training:
        results.update(training_keys(run_dir))
    return results


def read_json_object(path: Path, notes: list[str]) -> dict[str, Any]:
    """A JSON object from ``path``, or {} with a note: a half-written file must not sink a whole report."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        notes.append(f"could not read {path.name}: {err}")
        return {}
    if not isinstance(data, dict):
        notes.append(f"{path.name} is not a JSON object")
        return {}
    return data


def supervision_of(result: dict[str, Any]) -> str | None:
    """What supervised the run (e.g. ``"class labels"``), or None for a self-supervised one."""
    supervision = result.get("meta/supervision", SELF_SUPERVISED)
    return None if supervision == SELF_SUPERVISED else str(supervision)


def supervision_mark(result: dict[str, Any]) -> str:
    """`` [supervised: class labels]`` for a run trained on labels, else "": a table must never let a
    supervised row pass for a self-supervised one."""
    supervision = supervision_of(result)
    return "" if supervision is None else f" [supervised: {supervision}]"
