"""The runs a report compares: each run directory's ``eval.json`` (metrics) and ``eval_details.json``
(plot data).

A half-written or missing file gives an empty section plus a note on the run, never an exception: one
broken run must not cost the reader the whole page.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_PALETTE = ("#3b6fd6", "#e8730c", "#2b9d5a", "#d23c4b", "#8b5cc7", "#8c5a3c", "#d45fb0", "#6b7280", "#b5a11b")


@dataclass
class Run:
    """One evaluated run: its display name, colour, metrics (``eval.json``) and plot data (details)."""

    name: str
    path: Path
    metrics: dict[str, Any]
    details: dict[str, Any]
    colour: str = _PALETTE[0]
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, notes: list[str]) -> dict[str, Any]:
    """A JSON object from ``path``, or {} with a note: a half-written file must not sink the whole report."""
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


def load_run(run_dir: str | Path) -> Run:
    """Read one run directory. Missing ``eval.json`` or details give an empty section plus a note."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    notes: list[str] = []
    metrics = _read_json(path / "eval.json", notes)
    if not (path / "eval.json").is_file():
        notes.append("no eval.json (run `probssl eval` on it)")
    details = _read_json(path / "eval_details.json", notes)
    if not (path / "eval_details.json").is_file():
        notes.append("no eval_details.json: only what eval.json holds (table, corruption curves)")
    return Run(name=path.name, path=path, metrics=metrics, details=details, notes=notes)


def _display_names(runs: Sequence[Run]) -> list[str]:
    """``method · seed N`` when the run says so, else the directory name; disambiguated by directory."""
    names = []
    for run in runs:
        method = run.metrics.get("config/method", run.metrics.get("meta/method"))
        seed = run.metrics.get("seed", run.metrics.get("config/seed"))
        if isinstance(method, str) and method:
            names.append(f"{method} · seed {seed}" if seed is not None else method)
        else:
            names.append(run.path.name or str(run.path))
    for i, name in enumerate(names):
        if names.count(name) > 1:
            names[i] = f"{name} ({runs[i].path.name})"
    for i, name in enumerate(names):  # same directory name in different parents
        if names.count(name) > 1:
            names[i] = f"{name} #{i + 1}"
    return names


# --------------------------------------------------------------------------------------------- metrics
