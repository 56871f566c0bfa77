"""The report's tables as HTML: metric tables cut into bands that fit the page, one row per run or
per arm (mean ± std over seeds), the best value per column highlighted, the run overview and the
corruption table. Which keys are metrics and how their numbers read is :mod:`.metric_keys`.
"""

from __future__ import annotations

import html
import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from probssl.eval.report.metric_keys import (
    _OTHER_GROUP,
    GROUPS,
    _best_rows,
    _format_number,
    _shift_points,
    metric_direction,
    shift_summary,
    table_columns,
)
from probssl.eval.report.names import readable_label
from probssl.eval.report.runs import Run
from probssl.eval.summary import NOT_AVAILABLE
from probssl.results import partial_note, summarise_values

# ------------------------------------------------------------------------------------------------ html


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _swatch(run: Run) -> str:
    return f'<span class="swatch" style="background:{run.colour}"></span>'


def _arrow(direction: str | None) -> str:
    symbol = {"higher": "↑", "lower": "↓"}.get(direction or "", "")
    title = {"higher": "higher is better", "lower": "lower is better"}.get(direction or "", "")
    return f'<span class="arrow" title="{title}">{symbol}</span>' if symbol else ""


_TABLE_BUDGET_PX = 940  # metric columns per band: the card's 1,172 px less the 218 px run column (Chromium)
# Rendered widths measured in headless Chromium on the Fashion-MNIST suite report (min-content layout, the
# one an overflowing table falls back to): a header piece (bold 12.5 px) ≈ 8.2 px per character, a cell
# (monospace 12.5 px) ≈ 7.3 px, 20 px of padding. Slightly generous, so a band never needs scrolling.
_HEADER_PX_PER_CHAR = 8.3
_CELL_PX_PER_CHAR = 7.4
_CELL_PADDING_PX = 20


def _column_label(key: str, group: str) -> str:
    """The readable header of column ``key`` under its group's heading (the key is its tooltip)."""
    return readable_label(key.split("/", 1)[1] if group != _OTHER_GROUP[0] and "/" in key else key)


def _header_pieces(label: str) -> list[str]:
    """The pieces a header can wrap into: at spaces and after each ``/`` (``_table_band`` adds ``<wbr>``)."""
    return [piece for piece in re.split(r"(?<=/)|\s+", label) if piece]


def _column_px(label: str, cell_chars: int = 0) -> int:
    """Rendered width of a column: its header's longest unbreakable piece (plus the ↑/↓ arrow), its widest
    cell (``cell_chars``: "0.8459 ± 0.0012 (n=2)" in a seed-mean table) or a 6-digit number, plus padding."""
    header = _HEADER_PX_PER_CHAR * (max(len(piece) for piece in _header_pieces(label)) + 1)
    cell = _CELL_PX_PER_CHAR * max(cell_chars, 6)
    return math.ceil(max(header, cell)) + _CELL_PADDING_PX


def _cut(widths: Sequence[int], budget: int) -> list[int]:
    """Where to cut a run of columns (``widths``): the start index of every part after the first. The
    fewest parts that each fit ``budget`` (a column wider than it stands alone), and among those the cut
    whose widest part is narrowest — even parts, not a full band and a stub of one column."""

    def greedy(cap: int) -> list[int]:
        cuts, used = [], 0
        for i, width in enumerate(widths):
            if used and used + width > cap:
                cuts.append(i)
                used = 0
            used += width
        return cuts

    fewest = len(greedy(budget))
    low, high = max(widths, default=0), max(budget, *widths, 0)
    while low < high:  # the narrowest cap that still needs no more parts (greedy is optimal for a cap)
        middle = (low + high) // 2
        low, high = (low, middle) if len(greedy(middle)) <= fewest else (middle + 1, high)
    return greedy(low)


def _bands(
    groups: list[tuple[str, list[str]]], cell_chars: Mapping[str, int] | None = None
) -> list[list[tuple[str, list[str], bool]]]:
    """Split the columns into stacked tables that each fit the page width, never splitting a group that fits
    in one band; a group wider than a band is cut into parts that each fit, as even in width as possible.
    A table that needs sideways scrolling hides half its numbers in a screenshot or a printout."""
    chars = cell_chars or {}

    def px(key: str, group: str) -> int:
        return _column_px(_column_label(key, group), chars.get(key, 0))

    bands: list[list[tuple[str, list[str], bool]]] = [[]]
    used = 0
    for group, columns in groups:
        widths = [px(key, group) for key in columns]
        if used + sum(widths) <= _TABLE_BUDGET_PX:
            bands[-1].append((group, columns, False))
            used += sum(widths)
            continue
        starts = [0, *_cut(widths, _TABLE_BUDGET_PX), len(columns)]
        for begin, end in itertools.pairwise(starts):
            bands.append([(group, columns[begin:end], begin > 0)])
            used = sum(widths[begin:end])
    return [band for band in bands if band]


@dataclass(frozen=True)
class Spread:
    """How one arm's seeds spread around the mean a cell shows: sample std (None with one value), how
    many seeds have the metric (``n``) and how many the arm has (``of``)."""

    std: float | None
    n: int
    of: int


def seed_groups(runs: Sequence[Run]) -> list[list[Run]]:
    """The runs by ``Run.group`` (the seeds of one bench arm, see ``label_runs``), in first-seen order."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group or run.name, []).append(run)
    return list(groups.values())


def arm_rows(
    groups: Sequence[Sequence[tuple[Run, Mapping[str, float]]]],
) -> tuple[list[Run], list[dict[str, float]], list[dict[str, Spread]]]:
    """One row per group of (run, its metric row): the mean over the group's runs of every metric, with
    its :class:`Spread`.

    A metric enters the mean of the runs that have it as a finite number (``n`` says how many), with
    the arithmetic of every other table (:func:`probssl.results.summarise_values`); the row is named by
    the group (``simclr · 3 seeds``) and keeps the group's colour.
    """
    heads: list[Run] = []
    means: list[dict[str, float]] = []
    spreads: list[dict[str, Spread]] = []
    for group in groups:
        values: dict[str, list[float]] = {}
        for _, row in group:
            for key, value in row.items():
                if math.isfinite(value):
                    values.setdefault(key, []).append(value)
        summaries = {key: summarise_values(v) for key, v in values.items()}
        first = group[0][0]
        heads.append(replace(first, name=first.group or first.name))
        means.append({key: s.mean for key, s in summaries.items() if s is not None})
        spreads.append(
            {
                key: Spread(s.std if s.n > 1 else None, s.n, len(group))
                for key, s in summaries.items()
                if s is not None
            }
        )
    return heads, means, spreads


def _metric_table(
    runs: Sequence[Run],
    rows: Sequence[Mapping[str, float]],
    direction: Callable[[str], str | None] = metric_direction,
    spreads: Sequence[Mapping[str, Spread]] | None = None,
) -> str:
    """Rows = runs, columns = metrics grouped by prefix (two header rows), best per column highlighted;
    wide tables are stacked in bands rather than scrolled. With ``spreads`` the rows are seed means and
    each cell adds ``± std`` (and ``n=`` when some seeds lack the metric); the best is the best mean."""
    groups = table_columns(rows)
    if not groups:
        return '<p class="note">No numeric metrics in any run.</p>'
    best = {
        key: _best_rows([row.get(key) for row in rows], direction(key)) for _, cols in groups for key in cols
    }
    cell_chars = {
        key: max(
            len(" ".join(_cell_parts(row.get(key), spreads[i].get(key) if spreads else None)))
            for i, row in enumerate(rows)
        )
        for _, cols in groups
        for key in cols
    }
    return "".join(
        _table_band(runs, rows, band, best, direction, spreads) for band in _bands(groups, cell_chars)
    )


def _cell_parts(value: float | None, spread: Spread | None) -> list[str]:
    """A cell's words: the number, then ``± std`` and ``(n=…)`` for a seed mean — as ``probssl table
    --by-seed`` writes them (:mod:`probssl.results.numbers`)."""
    parts = [_format_number(value)]
    if spread is None or value is None:
        return parts
    if spread.std is not None:
        parts.append(f"± {_format_number(spread.std)}")
    note = partial_note(spread.n, spread.of).strip()
    return [*parts, note] if note else parts


def _cell_text(value: float | None, spread: Spread | None) -> str:
    number, *extra = _cell_parts(value, spread)
    return number + "".join(f' <span class="sd">{_e(part)}</span>' for part in extra)


def _table_band(
    runs: Sequence[Run],
    rows: Sequence[Mapping[str, float]],
    band: list[tuple[str, list[str], bool]],
    best: Mapping[str, set[int]],
    direction: Callable[[str], str | None],
    spreads: Sequence[Mapping[str, Spread]] | None = None,
) -> str:
    headings = dict((*GROUPS, _OTHER_GROUP))
    top = ['<th class="run" rowspan="2">run</th>']
    keys = []
    for group, columns, continued in band:
        heading = headings[group] + (" (cont.)" if continued else "")
        top.append(f'<th class="g0" colspan="{len(columns)}">{_e(heading)}</th>')
        for j, key in enumerate(columns):
            label = _e(_column_label(key, group)).replace("/", "/<wbr>")
            css = ' class="g0"' if j == 0 else ""
            keys.append(f'<th{css} title="{_e(key)}">{label}{_arrow(direction(key))}</th>')
    columns = [(j == 0, key) for _, cols, _ in band for j, key in enumerate(cols)]
    body = []
    for i, (run, row) in enumerate(zip(runs, rows, strict=True)):
        cells = [f'<td class="run">{_swatch(run)}{_e(run.name)}</td>']
        for first, key in columns:
            classes = ["num"] + (["g0"] if first else [])
            if key not in row:
                classes.append("missing")
            elif i in best[key]:
                classes.append("best")
            spread = spreads[i].get(key) if spreads is not None else None
            cells.append(f'<td class="{" ".join(classes)}">{_cell_text(row.get(key), spread)}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        '<div class="table-wrap"><table class="metrics"><thead>'
        f'<tr class="groups">{"".join(top)}</tr><tr class="keys">{"".join(keys)}</tr>'
        f"</thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def grouped_metric_table(
    runs: Sequence[Run],
    rows: Sequence[Mapping[str, float]],
    direction: Callable[[str], str | None] = metric_direction,
) -> str:
    """The metric table a reader can take in: one row per bench arm (mean ± std over its seeds) when
    some arm has several seeds, the per-run rows folded below it; otherwise one row per run.

    A 14-arm, 3-seed suite as 42 per-run rows was 38.6k px tall in Chromium (digits suite, issue 21);
    as arm rows it is a third of that and reads like the BENCHMARKS.md table of the same suite.
    """
    groups = seed_groups(runs)
    if all(len(group) == 1 for group in groups):
        return _metric_table(runs, rows, direction)
    row_of = {id(run): row for run, row in zip(runs, rows, strict=True)}
    heads, means, spreads = arm_rows([[(run, row_of[id(run)]) for run in group] for group in groups])
    return (
        _metric_table(heads, means, direction, spreads)
        + f'<details class="per-run"><summary>One row per run ({len(runs)} runs)</summary>'
        + _metric_table(runs, rows, direction)
        + "</details>"
    )


def _has_plot_data(run: Run, section: str) -> bool:
    """Whether the run brought data for a figure (corruption curves can also come from eval.json)."""
    if isinstance(run.details.get(section), dict) and run.details[section]:
        return True
    return section == "shift" and bool(_shift_points(run.metrics))


def uncertainty_doc(metrics: Mapping[str, Any]) -> str:
    """What the run's own uncertainty is, in one line: from eval.json (``meta/uncertainty_doc``), else
    from the registered method's ``uncertainty_doc`` (runs evaluated before the key existed)."""
    doc = metrics.get("meta/uncertainty_doc")
    if isinstance(doc, str) and doc:
        return doc
    method = metrics.get("config/method", metrics.get("meta/method"))
    if not isinstance(method, str):
        return NOT_AVAILABLE
    from probssl.methods import METHODS  # the registry, never a method by name

    try:
        return METHODS.get(method).uncertainty_doc
    except Exception:  # an unknown or since-removed method: the report still renders
        return NOT_AVAILABLE


_PLOT_SECTIONS = ("reliability", "ood", "shift", "sparsification", "ranked_images")


def _overview_row(group: Sequence[Run]) -> str:
    """One row of the Runs table: a run, or the seeds of one bench arm (named by the arm, its run
    directories listed, a plot-data chip marked ``k/n`` when only some seeds brought that data)."""
    first, several = group[0], len(group) > 1

    def joined(key: str, fallback: str) -> str:
        """The seeds' distinct values of ``key`` (else ``fallback``), in order."""
        values = (run.metrics.get(key, run.metrics.get(fallback, "–")) for run in group)
        return _e(", ".join(str(v) for v in dict.fromkeys(values)))

    chips = []
    for section in _PLOT_SECTIONS:
        have = sum(_has_plot_data(run, section) for run in group)
        label = section.replace("_", " ") + (
            f" {have}/{len(group)}" if several and 0 < have < len(group) else ""
        )
        chips.append(f'<span class="chip{" on" if have else ""}">{_e(label)}</span>')
    warnings = []
    for run in group:
        who = f"{run.name}: " if several else ""
        warnings += [f'<div class="warn">⚠ {_e(who + note)}</div>' for note in run.notes]
        if run.metrics.get("meta/partial_training"):
            warnings.append(f'<div class="warn">⚠ {_e(who)}weights from an unfinished training run</div>')
    name = (first.group or first.name) if several else first.name
    dirs = " ".join(f'<span class="dir" title="{_e(run.path)}">{_e(run.path.name)}</span>' for run in group)
    m = first.metrics
    cells = [
        f'<td class="run">{_swatch(first)}{_e(name)}{dirs}</td>',
        f"<td>{joined('config/method', 'meta/method')}</td>",
        f"<td>{joined('config/data.dataset', 'meta/dataset')}</td>",
        f"<td>{joined('seed', 'config/seed')}</td>",
        f"<td>{joined('meta/samples', 'meta/samples')}</td>",
        f'<td class="doc">{_e(uncertainty_doc(m))}</td>',
        f'<td class="chips">{"".join(chips)}{"".join(warnings)}</td>',
    ]
    return f"<tr>{''.join(cells)}</tr>"


def _overview_table(runs: Sequence[Run]) -> str:
    """Who is who: directory, method, dataset, seed, and which plot data each run brought — one row per
    bench arm when arms have several seeds (42 rows of the same method description made the Runs table
    of the Fashion-MNIST suite 5,000 px tall)."""
    columns = ("run", "method", "dataset", "seed", "samples", "its uncertainty", "plot data")
    header = "".join(f"<th>{h}</th>" for h in columns)
    body = "".join(_overview_row(group) for group in seed_groups(runs))
    return (
        f'<div class="table-wrap"><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>'
    )


def _shift_row(run: Run) -> dict[str, float]:
    summary = shift_summary(run.metrics)
    return {k.removesuffix("/acc").replace("_", " "): v for k, v in summary.items() if k.endswith("/acc")}


def _shift_table(runs: Sequence[Run]) -> str:
    """Mean accuracy over severities per corruption (columns) and run or arm (rows), when any run has
    shift keys."""
    rows = [_shift_row(run) for run in runs]
    if not any(rows):
        return ""
    return (
        "<h3>Accuracy under corruption, mean over severities</h3>"
        + grouped_metric_table(runs, rows, direction=lambda key: "higher")
        + '<p class="legend">Column <i>mean</i> averages every corruption and severity.</p>'
    )
