"""``probssl table``: plain-text / Markdown tables built from ``eval.json`` files — never typed by hand.

Reading the runs, grouping seeds and how a number reads are :mod:`probssl.results`, shared with the
report and the bench tables; this module lays out the rows and columns.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from probssl.results import (
    format_list,
    format_number,
    numeric,
    partial_note,
    seed_group,
    summarise_values,
    supervision_mark,
    supervision_of,
)
from probssl.results.numbers import format_spread

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


def _cell(value: Any) -> str:
    """A number by :func:`~probssl.results.format_number`; a list of numbers joined by ' / '."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return format_number(value)
    if _numeric_list(value):
        return format_list(value)
    return str(value)


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
                cells[col] = format_list(mean_list) + partial_note(len(lists), len(results))
                continue
            summary = summarise_values(r[col] for r in results if numeric(r.get(col)))
            if summary is not None:
                cells[col] = format_spread(summary.mean, summary.std) + partial_note(summary.n, len(results))
        table[name] = cells
    return table
