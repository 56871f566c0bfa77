"""Plain-text / Markdown tables built from ``eval.json`` files — never typed by hand."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_COLUMNS = (
    "knn/top1@20",
    "knn/top1@200",
    "linear/top1",
    "linear/nll",
    # The combined OOD detector (docs/methods.md §5): near / far OOD AUROC, realized FPR at α = 0.05.
    "ood/near/combined/auroc",
    "ood/far/combined/auroc",
    "ood/id/combined/fpr@0.05",
    "sel/reliability/ece",
)


def read_eval(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `probssl eval {run_dir}` first")
    return json.loads(path.read_text())


def select_runs(paths: Sequence[str | Path], need_eval: bool = True) -> tuple[list[Path], list[str]]:
    """The run directories among ``paths`` (a shell glob like ``runs/demo/*`` also catches
    ``report.html``), and one note per path left out and why.

    With ``need_eval`` a run without ``eval.json`` is left out too (it is not evaluated yet), so one
    unfinished run does not stop a table of the others. Nothing left is an error: the message says
    what was given and what a run directory is.
    """
    from probssl.runs import is_run_dir

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
        if need_eval and not (path / "eval.json").is_file():
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


def known_columns(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Every metric key present in at least one row, in first-seen order."""
    seen: dict[str, None] = {}
    for result in rows.values():
        seen.update(dict.fromkeys(k for k in result if not k.startswith("config/")))
    return list(seen)


def check_columns(rows: dict[str, dict[str, Any]], columns: Sequence[str]) -> None:
    """Refuse a column no run has (a typo: ``ece`` for ``cal/ece15``), listing the close and valid ones."""
    import difflib

    from probssl.config import ConfigError

    valid = known_columns(rows)
    for col in columns:
        if col == "n" or any(col in r for r in rows.values()):
            continue
        close = (
            difflib.get_close_matches(col, valid, n=5, cutoff=0.3)
            or [k for k in valid if col.lower() in k.lower()][:5]
        )
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"no run has a metric '{col}'{hint}; valid keys: {', '.join(valid)}")


def format_table(
    rows: dict[str, dict[str, Any]], columns: Sequence[str] = DEFAULT_COLUMNS, markdown: bool = False
) -> str:
    """One row per run, one column per metric; missing metrics print as '–'."""
    header = ["run", *columns]
    body = []
    for name, result in rows.items():
        cells = [name + supervision_mark(result)]
        for col in columns:
            cells.append(_cell(result.get(col)))
        body.append(cells)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells, widths, strict=True)]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded)

    sep = (
        ("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        if markdown
        else "  ".join("-" * w for w in widths)
    )
    return "\n".join([line(header), sep, *(line(r) for r in body)])


#: eval.json's ``meta/supervision`` of a run trained without labels; any other value is marked in tables.
SELF_SUPERVISED = "self-supervised"


def supervision_of(result: dict[str, Any]) -> str | None:
    """What supervised the run (e.g. ``"class labels"``), or None for a self-supervised one."""
    supervision = result.get("meta/supervision", SELF_SUPERVISED)
    return None if supervision == SELF_SUPERVISED else str(supervision)


def supervision_mark(result: dict[str, Any]) -> str:
    """`` [supervised: class labels]`` for a run trained on labels, else "": a table must never let a
    supervised row pass for a self-supervised one."""
    supervision = supervision_of(result)
    return "" if supervision is None else f" [supervised: {supervision}]"


def _number(value: float) -> str:
    """Four decimals, or four significant digits for small non-zero values (1/κ ≈ 0.0019 would
    otherwise hide its variation)."""
    return f"{value:.4g}" if 0 < abs(value) < 0.01 else f"{value:.4f}"


def _cell(value: Any) -> str:
    """Floats to 4 places; lists of numbers (e.g. accuracy per uncertainty quintile) joined by ' / '."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, list) and value and all(isinstance(v, int | float) for v in value):
        return " / ".join(f"{v:.3f}" for v in value)
    return str(value)


def seed_group(run_dir: str | Path) -> str:
    """Runs that differ only by seed share a name up to a ``-s<seed>`` suffix: ``byol-s2`` → ``byol``."""
    return re.sub(r"-s\d+$", "", Path(run_dir).name)


def _numeric_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, int | float) for v in value)


def aggregate_seeds(rows: dict[str, dict[str, Any]], columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Mean ± sample standard deviation per seed group; ``n`` = the number of runs in the group.

    A metric missing from some runs of a group is averaged over the runs that have it (and its
    count shown), so a half-evaluated group cannot pass for a complete one.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for run_dir, result in rows.items():
        groups.setdefault(seed_group(run_dir), []).append(result)
    table: dict[str, dict[str, Any]] = {}
    for name, results in groups.items():
        cells: dict[str, Any] = {"n": str(len(results))}
        supervised = {kind for r in results if (kind := supervision_of(r))}  # marks the group's row
        if supervised:
            cells["meta/supervision"] = ", ".join(sorted(supervised))
        for col in columns:
            lists = [r[col] for r in results if _numeric_list(r.get(col))]
            if lists and len({len(v) for v in lists}) == 1:  # element-wise mean, e.g. per-quintile accuracy
                mean_list = [statistics.fmean(column) for column in zip(*lists, strict=True)]
                partial = f" (n={len(lists)})" if len(lists) != len(results) else ""
                cells[col] = " / ".join(f"{v:.3f}" for v in mean_list) + partial
                continue
            values = [r[col] for r in results if isinstance(r.get(col), int | float)]
            if not values:
                continue
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            partial = f" (n={len(values)})" if len(values) != len(results) else ""
            cells[col] = f"{_number(mean)} ± {_number(std)}{partial}"
        table[name] = cells
    return table
