"""The runs a report compares: each run directory's ``eval.json`` (metrics) and ``eval_details.json``
(plot data).

A half-written or missing file gives an empty section plus a note on the run, never an exception: one
broken run must not cost the reader the whole page.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probssl.results import read_json_object, split_seed

# 17 colours that stay apart on white: a bench suite has up to 16 arms (the seeds of one arm share one).
_PALETTE = (
    "#3b6fd6", "#e8730c", "#2b9d5a", "#d23c4b", "#8b5cc7", "#8c5a3c", "#d45fb0", "#6b7280", "#b5a11b",
    "#17a2b8", "#1e3a8a", "#84cc16", "#9f1239", "#0f766e", "#f59e0b", "#c084fc", "#111827",
)  # fmt: skip


@dataclass
class Run:
    """One evaluated run: its display name, colour, metrics (``eval.json``) and plot data (details)."""

    name: str
    path: Path
    metrics: dict[str, Any]
    details: dict[str, Any]
    colour: str = _PALETTE[0]
    group: str = ""  # legend label shared by the runs of one bench arm (see label_runs)
    notes: list[str] = field(default_factory=list)


def load_run(run_dir: str | Path) -> Run:
    """Read one run directory. Missing ``eval.json`` or details give an empty section plus a note."""
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    notes: list[str] = []
    metrics = read_json_object(path / "eval.json", notes)
    if not (path / "eval.json").is_file():
        notes.append("no eval.json (run `probssl eval` on it)")
    details = read_json_object(path / "eval_details.json", notes)
    if not (path / "eval_details.json").is_file():
        notes.append("no eval_details.json: only what eval.json holds (table, corruption curves)")
    return Run(name=path.name, path=path, metrics=metrics, details=details, notes=notes)


def split_evaluated(runs: Sequence[Run]) -> tuple[list[Run], list[str]]:
    """The runs that have metrics to show, and one note per run left out and why.

    A run directory without ``eval.json`` (still training, or never evaluated) or with an unreadable
    or empty one would be a row of n/a in every column and a gap in every figure: it is left out and
    named instead, as ``probssl table`` does.
    """
    kept: list[Run] = []
    notes: list[str] = []
    for run in runs:
        if run.metrics:
            kept.append(run)
        elif not (run.path / "eval.json").is_file():
            notes.append(f"skipped {run.path}: not evaluated yet (run `probssl eval {run.path}`)")
        else:
            why = [note for note in run.notes if "eval.json" in note and "eval_details" not in note]
            reason = "; ".join(why) or "eval.json holds no metrics"
            notes.append(f"skipped {run.path}: {reason} (run `probssl eval {run.path}` again)")
    return kept, notes


def _seed_and_method(run: Run) -> tuple[Any, str | None]:
    method = run.metrics.get("config/method", run.metrics.get("meta/method"))
    seed = run.metrics.get("seed", run.metrics.get("config/seed"))
    return seed, method if isinstance(method, str) and method else None


def _arm(run: Run, seed: Any) -> str | None:
    """The bench arm of a run directory named ``<arm>-s<seed>`` (``lam_online-s0``) with the seed its
    eval.json records, else None."""
    arm, named_seed = split_seed(run.path.name)
    return arm if named_seed is not None and str(named_seed) == str(seed) else None


def _disambiguate(names: list[str], extra: Sequence[str | None]) -> list[str]:
    """``names`` with every name that occurs more than once replaced by ``extra`` where given. Counted
    before any is replaced: replacing one at a time leaves the last of a clash with the clashing name."""
    counts = {name: names.count(name) for name in names}
    return [alt if counts[name] > 1 and alt else name for name, alt in zip(names, extra, strict=True)]


def label_runs(runs: Sequence[Run]) -> None:
    """Name, group and colour the runs for display, in place.

    Name: ``method · seed N`` when eval.json says so, else the directory name. Runs of one method from
    different bench arms (``lam_online-s0``, ``lam_posthoc-s0``: both method ``lam``) are named by their
    arm; whatever is still ambiguous gets its directory, then its position.

    Group: the runs of one bench arm differ only in seed, so they share a colour and one entry in a
    figure legend (``arm · 3 seeds``); any other run is a group of its own. With one colour per run a
    42-run suite cycles the palette four times and the overlaid curves cannot be told apart.
    """
    seeds, methods = zip(*(_seed_and_method(run) for run in runs), strict=True)
    arms = [_arm(run, seed) for run, seed in zip(runs, seeds, strict=True)]
    names = [
        (f"{m} · seed {s}" if s is not None else m) if m else (run.path.name or str(run.path))
        for run, s, m in zip(runs, seeds, methods, strict=True)
    ]
    names = _disambiguate(names, [f"{a} · seed {s}" if a else None for a, s in zip(arms, seeds, strict=True)])
    names = _disambiguate(names, [f"{n} ({run.path.name})" for n, run in zip(names, runs, strict=True)])
    names = _disambiguate(names, [f"{n} #{i + 1}" for i, n in enumerate(names)])
    keys = [
        (str(run.path.parent), a) if a else (str(run.path), "") for run, a in zip(runs, arms, strict=True)
    ]
    order = list(dict.fromkeys(keys))
    for run, name, key, seed in zip(runs, names, keys, seeds, strict=True):
        size = keys.count(key)
        run.name = name
        run.group = f"{name.removesuffix(f' · seed {seed}')} · {size} seeds" if size > 1 else name
        run.colour = _PALETTE[order.index(key) % len(_PALETTE)]
