"""A static, self-contained HTML report comparing evaluated runs.

``build_report(run_dirs, out)`` reads each run's ``eval.json`` (flat metric keys, design.md §4) and, when
present, ``eval_details.json`` (plot data), and writes one HTML file: a metric table with the best value per
column highlighted, then figures overlaying the runs (reliability diagrams, OOD score histograms, accuracy
under corruption, sparsification curves, test images ranked by uncertainty).

Design choices, and why:

* **One file, no network.** Reports get mailed, attached to issues and opened years later on machines
  without the package, so all CSS is inline and every plot is a PNG embedded as a base64 ``data:`` URI.
* **Partial runs never break the page.** A run evaluated without details (or with a malformed section)
  just has no panel in that figure, and the page says which runs are missing from it.
* **Matplotlib without pyplot.** Figures are built from ``matplotlib.figure.Figure`` (Agg canvas) under an
  ``rc_context``, so building a report never switches the caller's backend or touches global figure state.
* **Tables are built, not typed.** Columns are whatever metric keys any run has, grouped by prefix; the
  direction of "better" comes from the metric's name (ECE, NLL, Brier, FPR95, AURC ... are lower-better).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import matplotlib
import matplotlib.patches
import numpy as np
from matplotlib.figure import Figure

__all__ = ["GROUPS", "Run", "build_report", "load_run", "metric_direction", "shift_summary", "table_columns"]

# Metric groups in display order: (key prefix, heading).
GROUPS: tuple[tuple[str, str], ...] = (
    ("knn", "kNN"),
    ("linear", "Linear probe"),
    ("cal", "Calibration"),
    ("ood", "OOD detection"),
    ("shift", "Corruptions"),
    ("lowshot", "Low-shot"),
    ("transfer", "Transfer"),
    ("sel", "Selective prediction"),
    ("ret", "Retrieval"),
    ("compress", "Compression"),
)
_OTHER_GROUP = ("other", "Other")
# Keys that describe a run rather than measure it; shown in the run overview, not the metric table.
_DESCRIPTIVE_PREFIXES = ("config/", "meta/")
_DESCRIPTIVE_KEYS = ("seed",)

# Direction of "better" from name tokens; the last token that matches decides (``err_auroc`` is an AUROC).
_HIGHER_TOKENS = re.compile(
    r"top\d*|acc|accuracy|auroc|auc|aupr|recall|precision|map|mrr|ndcg|spearman|kendall|pearson|corr|f1|"
    r"ausc|r2|agreement"
)
_NEUTRAL_TOKENS = frozenset({"std", "items", "l2", "uncertainty", "seconds"})
_LOWER_TOKENS = re.compile(
    r"a?ece\d*|mce|nll|brier|fpr\d*|e?aurc|err|error|risk|loss|ause|bpd|bits|mse|rmse|mae|distortion"
)

_PALETTE = ("#3b6fd6", "#e8730c", "#2b9d5a", "#d23c4b", "#8b5cc7", "#8c5a3c", "#d45fb0", "#6b7280", "#b5a11b")
_IN_COLOUR, _OUT_COLOUR = "#3b6fd6", "#e8730c"
_DPI = 110
_RC = {
    "font.size": 9,
    "axes.titlesize": 9.5,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e6e8ec",
    "grid.linewidth": 0.7,
    "axes.edgecolor": "#9aa1ad",
    "axes.axisbelow": True,
    "xtick.color": "#4b5563",
    "ytick.color": "#4b5563",
    "legend.frameon": False,
    "legend.fontsize": 8.5,
}


# ---------------------------------------------------------------------------------------------- runs


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


def metric_direction(key: str) -> Literal["higher", "lower"] | None:
    """Whether a larger value of metric ``key`` is better ("higher"), worse ("lower"), or neither (None,
    e.g. mean uncertainty or timings, which get no "best" highlight)."""
    tokens = [t for t in re.split(r"[/_@.\-\s]+", key.lower()) if t and not t.isdigit()]
    if tokens and tokens[-1] in _NEUTRAL_TOKENS:
        return None  # a spread, a count or a chosen hyper-parameter is neither better nor worse
    for token in reversed(tokens):
        if _HIGHER_TOKENS.fullmatch(token):
            return "higher"
        if _LOWER_TOKENS.fullmatch(token):
            return "lower"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _group_of(key: str) -> str:
    prefix = key.split("/", 1)[0]
    return prefix if any(prefix == g for g, _ in GROUPS) else _OTHER_GROUP[0]


# Per-criterion OOD keys (ood/<set>/<criterion>/<metric>) would add 16 columns per set: the table keeps
# their AUROC only; every value stays in eval.json.
_OOD_CRITERION_KEY = re.compile(r"ood/[^/]+/[^/]+/(?!auroc$)[^/]+")


def _is_metric(key: str, value: Any) -> bool:
    descriptive = key.startswith(_DESCRIPTIVE_PREFIXES) or key in _DESCRIPTIVE_KEYS
    return _is_number(value) and not descriptive and "/" in key and not _OOD_CRITERION_KEY.fullmatch(key)


_SHIFT_KEY = re.compile(r"shift/(?P<name>[^/]+)/(?P<severity>\d+)/(?P<metric>[^/]+)")


def _shift_points(metrics: Mapping[str, Any]) -> dict[str, dict[str, dict[int, float]]]:
    """``shift/<corruption>/<severity>/<metric>`` keys as {corruption: {metric: {severity: value}}}."""
    points: dict[str, dict[str, dict[int, float]]] = {}
    for key, value in metrics.items():
        match = _SHIFT_KEY.fullmatch(key)
        if match and _is_number(value):
            by_metric = points.setdefault(match["name"], {})
            by_metric.setdefault(match["metric"], {})[int(match["severity"])] = float(value)
    return points


def shift_summary(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Per-severity corruption keys collapsed for the table: ``shift/mean/<metric>`` (mean over every
    corruption and severity) and ``shift/<corruption>/<metric>`` (mean over severities). 45+ columns of
    ``shift/<name>/<sev>/acc`` would drown the table; the curves are in the figure below it."""
    out: dict[str, float] = {}
    pooled: dict[str, list[float]] = {}
    for name, by_metric in sorted(_shift_points(metrics).items()):
        for metric, by_severity in by_metric.items():
            values = [v for v in by_severity.values() if math.isfinite(v)]
            if values:
                out[f"shift/{name}/{metric}"] = float(np.mean(values))
                pooled.setdefault(metric, []).extend(values)
    for metric, values in pooled.items():
        out[f"shift/mean/{metric}"] = float(np.mean(values))
    return out


def _table_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics shown in the main table: per-severity shift keys become their means."""
    summary = shift_summary(metrics)
    table = {k: float(v) for k, v in metrics.items() if _is_metric(k, v) and not _SHIFT_KEY.fullmatch(k)}
    table.update({k: v for k, v in summary.items() if k.startswith("shift/mean/")})
    return table


def table_columns(rows: Iterable[Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    """Metric keys present in any row, grouped by prefix in ``GROUPS`` order, sorted within a group."""
    keys: set[str] = set()
    for row in rows:
        keys.update(row)
    grouped: dict[str, list[str]] = {}
    for key in keys:
        grouped.setdefault(_group_of(key), []).append(key)
    order = [g for g, _ in GROUPS] + [_OTHER_GROUP[0]]
    return [(g, sorted(grouped[g], key=_column_order)) for g in order if g in grouped]


def _column_order(key: str) -> tuple[bool, list[Any]]:
    """Summary columns (``<group>/mean...``) first, then natural order."""
    return (not key.split("/", 1)[-1].startswith("mean"), _natural_key(key))


def _natural_key(key: str) -> list[Any]:
    """Sort ``top1@20`` before ``top1@200`` and ``recall@2`` before ``recall@10``."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", key)]


def _best_rows(values: Sequence[float | None], direction: str | None) -> set[int]:
    """Indices of the best finite value(s); none when there is no direction or fewer than two values."""
    finite = [(i, v) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if direction is None or len(finite) < 2:
        return set()
    pick = max if direction == "higher" else min
    best = pick(v for _, v in finite)
    if all(math.isclose(v, best, rel_tol=1e-12, abs_tol=1e-15) for _, v in finite):
        return set()  # a tie across every run highlights nothing
    return {i for i, v in finite if math.isclose(v, best, rel_tol=1e-12, abs_tol=1e-15)}


def _format_number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not _is_number(value):
        return html.escape(str(value))
    if isinstance(value, int):
        return f"{value:,}"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.1f}"
    if magnitude >= 10:
        return f"{value:.3f}"
    return f"{value:.4f}"


# ------------------------------------------------------------------------------------------------ html


_CSS = """
:root { --fg:#1d2330; --muted:#5f6b7a; --line:#e3e6eb; --soft:#f4f6f8; --best:#e4f5ea; --best-fg:#0b5b33;
        --accent:#2f5bd3; }
* { box-sizing: border-box; }
body { margin:0; background:#eef1f4; color:var(--fg);
       font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1280px; margin:0 auto; padding:28px 28px 72px; }
header h1 { font-size:28px; margin:0 0 4px; letter-spacing:-0.01em; }
header .sub { color:var(--muted); font-size:14px; }
nav { margin:14px 0 4px; display:flex; flex-wrap:wrap; gap:8px; }
nav a { color:var(--accent); text-decoration:none; font-size:13px; padding:3px 10px; border-radius:999px;
        background:#fff; border:1px solid var(--line); }
nav a:hover { border-color:var(--accent); }
section { background:#fff; border:1px solid var(--line); border-radius:12px; padding:20px 24px 22px;
          margin:18px 0; box-shadow:0 1px 2px rgba(16,24,40,.05); }
h2 { font-size:19px; margin:0 0 6px; }
h3 { font-size:15px; margin:18px 0 6px; }
p.lead, p.note { color:var(--muted); font-size:13.5px; margin:4px 0 12px; max-width:95ch; }
p.note { font-style:italic; }
.table-wrap { overflow-x:auto; border:1px solid var(--line); border-radius:8px; margin:0 0 12px; }
table { border-collapse:collapse; font-size:13px; width:100%; }
table.metrics th.run, table.metrics td.run { width:210px; }
th, td { padding:6px 10px; border-bottom:1px solid var(--line); white-space:nowrap; }
thead th { background:var(--soft); font-weight:600; vertical-align:bottom; text-align:left; }
thead tr.groups th { text-align:center; font-size:12px; text-transform:uppercase; letter-spacing:.04em;
                     color:var(--muted); border-bottom:1px solid var(--line); }
thead tr.keys th { text-align:right; font-size:12.5px; white-space:normal; }
th.run, td.run { text-align:left; position:sticky; left:0; background:#fff; z-index:1;
                 border-right:1px solid var(--line); }
thead th.run { background:var(--soft); }
td.num { text-align:right; font-variant-numeric:tabular-nums; font-size:12.5px;
         font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace; }
td.missing { color:#b0b6c0; }
td.best { background:var(--best); color:var(--best-fg); font-weight:700; }
.g0 { border-left:2px solid #d5dae1; }
tbody tr:hover td { background:#f8fafc; }
tbody tr:hover td.best { background:#d6efdf; }
.dir { font-size:11px; color:var(--muted); display:block; }
.arrow { color:var(--muted); font-weight:400; margin-left:2px; }
.swatch { display:inline-block; width:11px; height:11px; border-radius:3px; margin-right:7px;
          vertical-align:-1px; }
.chip { display:inline-block; font-size:11.5px; padding:1px 7px; margin:1px 2px; border-radius:999px;
        background:var(--soft); color:var(--muted); border:1px solid var(--line); }
.chip.on { background:#e8effd; color:#2446a8; border-color:#c9d7f7; }
.warn { color:#9a3b07; font-size:12px; }
.legend { font-size:12.5px; color:var(--muted); margin:8px 2px 0; }
.legend .best-demo { background:var(--best); color:var(--best-fg); font-weight:700; padding:0 5px;
                     border-radius:3px; }
figure { margin:10px 0 0; }
figure img { max-width:100%; height:auto; display:block; margin:0 auto; }
figcaption { color:var(--muted); font-size:13.5px; margin:8px auto 0; max-width:100ch; }
figcaption b { color:var(--fg); font-weight:600; }
footer { color:var(--muted); font-size:12px; text-align:center; margin-top:28px; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _swatch(run: Run) -> str:
    return f'<span class="swatch" style="background:{run.colour}"></span>'


def _arrow(direction: str | None) -> str:
    symbol = {"higher": "↑", "lower": "↓"}.get(direction or "", "")
    title = {"higher": "higher is better", "lower": "lower is better"}.get(direction or "", "")
    return f'<span class="arrow" title="{title}">{symbol}</span>' if symbol else ""


_TABLE_BUDGET_PX = 940  # metric columns per band: what fits beside the run column in the page width


def _column_label(key: str, group: str) -> str:
    return key.split("/", 1)[1] if group != _OTHER_GROUP[0] and "/" in key else key


def _column_px(label: str) -> int:
    """Rough rendered width of a column: its header label (which may wrap at spaces) or a 6-digit number,
    plus padding."""
    return 7 * max(max(len(word) for word in label.split()) + 2, 8) + 22


def _bands(groups: list[tuple[str, list[str]]]) -> list[list[tuple[str, list[str], bool]]]:
    """Split the columns into stacked tables that each fit the page width, never splitting a group that fits
    in one band; a group wider than a band is cut into evenly sized parts. A table that needs sideways
    scrolling hides half its numbers in a screenshot or a printout."""
    bands: list[list[tuple[str, list[str], bool]]] = [[]]
    used = 0
    for group, columns in groups:
        width = sum(_column_px(_column_label(key, group)) for key in columns)
        if used + width <= _TABLE_BUDGET_PX:
            bands[-1].append((group, columns, False))
            used += width
            continue
        parts = math.ceil(width / _TABLE_BUDGET_PX)
        size = math.ceil(len(columns) / parts)
        for i in range(0, len(columns), size):
            chunk = columns[i : i + size]
            bands.append([(group, chunk, i > 0)])
            used = sum(_column_px(_column_label(key, group)) for key in chunk)
    return [band for band in bands if band]


def _metric_table(
    runs: Sequence[Run],
    rows: Sequence[Mapping[str, float]],
    direction: Callable[[str], str | None] = metric_direction,
) -> str:
    """Rows = runs, columns = metrics grouped by prefix (two header rows), best per column highlighted;
    wide tables are stacked in bands rather than scrolled."""
    groups = table_columns(rows)
    if not groups:
        return '<p class="note">No numeric metrics in any run.</p>'
    best = {
        key: _best_rows([row.get(key) for row in rows], direction(key)) for _, cols in groups for key in cols
    }
    return "".join(_table_band(runs, rows, band, best, direction) for band in _bands(groups))


def _table_band(
    runs: Sequence[Run],
    rows: Sequence[Mapping[str, float]],
    band: list[tuple[str, list[str], bool]],
    best: Mapping[str, set[int]],
    direction: Callable[[str], str | None],
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
            cells.append(f'<td class="{" ".join(classes)}">{_format_number(row.get(key))}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        '<div class="table-wrap"><table class="metrics"><thead>'
        f'<tr class="groups">{"".join(top)}</tr><tr class="keys">{"".join(keys)}</tr>'
        f"</thead><tbody>{''.join(body)}</tbody></table></div>"
    )


def _has_plot_data(run: Run, section: str) -> bool:
    """Whether the run brought data for a figure (corruption curves can also come from eval.json)."""
    if isinstance(run.details.get(section), dict) and run.details[section]:
        return True
    return section == "shift" and bool(_shift_points(run.metrics))


def _overview_table(runs: Sequence[Run]) -> str:
    """Who is who: directory, method, dataset, seed, and which plot data each run brought."""
    sections = ("reliability", "ood", "shift", "sparsification", "ranked_images")
    header = "".join(f"<th>{h}</th>" for h in ("run", "method", "dataset", "seed", "samples", "plot data"))
    body = []
    for run in runs:
        m = run.metrics
        chips = "".join(
            f'<span class="chip{" on" if _has_plot_data(run, s) else ""}">{s.replace("_", " ")}</span>'
            for s in sections
        )
        warnings = "".join(f'<div class="warn">⚠ {_e(n)}</div>' for n in run.notes)
        if m.get("meta/partial_training"):
            warnings += '<div class="warn">⚠ weights from an unfinished training run</div>'
        cells = [
            f'<td class="run">{_swatch(run)}{_e(run.name)}<span class="dir" title="{_e(run.path)}">'
            f"{_e(run.path.name)}</span></td>",
            f"<td>{_e(m.get('config/method', m.get('meta/method', '–')))}</td>",
            f"<td>{_e(m.get('config/data.dataset', m.get('meta/dataset', '–')))}</td>",
            f"<td>{_e(m.get('seed', m.get('config/seed', '–')))}</td>",
            f"<td>{_e(m.get('meta/samples', '–'))}</td>",
            f"<td>{chips}{warnings}</td>",
        ]
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f'<div class="table-wrap"><table><thead><tr>{header}</tr></thead><tbody>{"".join(body)}'
        "</tbody></table></div>"
    )


def _section(anchor: str, title: str, lead: str, content: str) -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{lead_html}{content}</section>'


def _figure(uri: str, alt: str, caption: str) -> str:
    return f'<figure><img src="{uri}" alt="{_e(alt)}"><figcaption>{caption}</figcaption></figure>'


def _missing_note(runs: Sequence[Run], drawn: set[str], what: str) -> str:
    missing = [run.name for run in runs if run.name not in drawn]
    if not missing:
        return ""
    return f'<p class="note">No {what} data for: {_e(", ".join(missing))}.</p>'


# --------------------------------------------------------------------------------------------- figures


@contextmanager
def _styled():
    with matplotlib.rc_context(_RC):
        yield


def _png(fig: Figure) -> str:
    """The figure as a ``data:image/png;base64,...`` URI (no Software tag: the page carries no URLs)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _floats(values: Any) -> np.ndarray:
    """A 1-D float array with JSON nulls as NaN."""
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _grid(count: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(count, max_cols))
    return math.ceil(count / cols), cols


def _draw_per_run(
    runs: Sequence[Run], draw: Callable[[Run], Any], failures: list[str], what: str
) -> dict[str, Any]:
    """Extract each run's plot data with ``draw``; a malformed section is noted and skipped, never fatal."""
    out = {}
    for run in runs:
        try:
            data = draw(run)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            failures.append(f"{run.name}: {what} data malformed ({type(err).__name__}: {err})")
            continue
        if data is not None:
            out[run.name] = data
    return out


def _reliability_data(run: Run) -> dict[str, np.ndarray] | None:
    section = run.details.get("reliability")
    if not section:
        return None
    lower, upper = _floats(section["bin_lower"]), _floats(section["bin_upper"])
    n = len(lower)
    conf = _floats(section.get("confidence") or [None] * n)
    acc = _floats(section.get("accuracy") or [None] * n)
    count = _floats(section.get("count") or [0] * n)
    if not (len(upper) == len(conf) == len(acc) == len(count) == n) or n == 0:
        raise ValueError("reliability lists differ in length or are empty")
    centre = (lower + upper) / 2
    conf = np.where(np.isnan(conf), centre, conf)
    return {"lower": lower, "upper": upper, "conf": conf, "acc": acc, "count": np.nan_to_num(count)}


def _reliability_figure(runs: Sequence[Run], data: Mapping[str, dict[str, np.ndarray]]) -> str:
    shown = [run for run in runs if run.name in data]
    rows, cols = _grid(len(shown), 4)
    with _styled():
        fig = Figure(figsize=(3.0 * cols, 3.35 * rows))
        outer = fig.add_gridspec(rows, cols, wspace=0.28, hspace=0.45)
        for k, run in enumerate(shown):
            d = data[run.name]
            inner = outer[k // cols, k % cols].subgridspec(2, 1, height_ratios=[3.2, 1], hspace=0.08)
            ax, ax_count = fig.add_subplot(inner[0]), fig.add_subplot(inner[1])
            width = d["upper"] - d["lower"]
            ok = ~np.isnan(d["acc"])
            ax.plot([0, 1], [0, 1], ls="--", color="#9aa1ad", lw=1, zorder=1)
            ax.bar(
                d["lower"][ok],
                d["acc"][ok],
                width=width[ok],
                align="edge",
                color=run.colour,
                alpha=0.85,
                edgecolor="white",
                linewidth=0.6,
                zorder=2,
                label="accuracy",
            )
            gap_bottom = np.minimum(d["acc"][ok], d["conf"][ok])
            ax.bar(
                d["lower"][ok],
                np.abs(d["conf"][ok] - d["acc"][ok]),
                bottom=gap_bottom,
                width=width[ok],
                align="edge",
                facecolor="none",
                edgecolor="#d23c4b",
                hatch="////",
                linewidth=0.0,
                zorder=3,
                label="gap to confidence",
            )
            ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy")
            ax.tick_params(labelbottom=False)
            ax.set_title(_reliability_title(run, d), loc="left")
            total = d["count"].sum()
            share = d["count"] / total if total > 0 else d["count"]
            ax_count.bar(
                d["lower"],
                share,
                width=width,
                align="edge",
                color="#9aa1ad",
                edgecolor="white",
                linewidth=0.5,
            )
            ax_count.set(xlim=(0, 1), xlabel="confidence", ylabel="share")
            ax_count.set_ylim(0, max(float(share.max()) * 1.15, 1e-3))
            ax_count.grid(axis="x", visible=False)
            if k == 0:
                ax.legend(loc="upper left", fontsize=7.5)
        return _png(fig)


def _reliability_title(run: Run, d: Mapping[str, np.ndarray]) -> str:
    """Run name plus ECE: from eval.json when present, else recomputed from the bins."""
    ece = run.metrics.get("cal/ece15")
    if not _is_number(ece):
        total = d["count"].sum()
        ok = ~np.isnan(d["acc"])
        ece = float((d["count"][ok] * np.abs(d["acc"][ok] - d["conf"][ok])).sum() / total) if total else None
    return f"{run.name}\nECE = {ece:.4f}" if ece is not None else run.name


def _auroc(score_in: np.ndarray, score_out: np.ndarray) -> float:
    """P(out scores higher than in), ties counted half (Mann-Whitney U)."""
    scores = np.concatenate([score_in, score_out])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2 + 1
    ranks[order] = np.repeat(average, counts)
    n_in, n_out = len(score_in), len(score_out)
    u = ranks[n_in:].sum() - n_out * (n_out + 1) / 2
    return float(u / (n_in * n_out))


def _ood_data(run: Run) -> dict[str, dict[str, Any]] | None:
    section = run.details.get("ood")
    if not section:
        return None
    out = {}
    for set_name, entry in section.items():
        score_in, score_out = _floats(entry["score_in"]), _floats(entry["score_out"])
        score_in, score_out = score_in[np.isfinite(score_in)], score_out[np.isfinite(score_out)]
        if len(score_in) and len(score_out):
            out[str(set_name)] = {"in": score_in, "out": score_out, "criterion": entry.get("criterion", "")}
    return out or None


def _ood_figure(runs: Sequence[Run], data: Mapping[str, dict[str, dict[str, Any]]]) -> str:
    """One row per run, one column per OOD set (same set in the same column, so runs compare vertically)."""
    shown = [run for run in runs if run.name in data]
    sets = list(dict.fromkeys(name for run in shown for name in data[run.name]))
    cols = min(len(sets), 4)
    rows_per_run = math.ceil(len(sets) / cols)
    with _styled():
        fig = Figure(figsize=(3.7 * cols + 0.4, 2.55 * rows_per_run * len(shown) + 0.5))
        axes = fig.subplots(rows_per_run * len(shown), cols, squeeze=False)
        for ax in axes.ravel():
            ax.set_visible(False)
        for r, run in enumerate(shown):
            for k, set_name in enumerate(sets):
                if set_name in data[run.name]:
                    ax = axes[r * rows_per_run + k // cols, k % cols]
                    ax.set_visible(True)
                    _ood_panel(ax, run, set_name, data[run.name][set_name])
        handles = [
            matplotlib.patches.Patch(facecolor=_IN_COLOUR, alpha=0.5, label="in-distribution test set"),
            matplotlib.patches.Patch(facecolor=_OUT_COLOUR, alpha=0.5, label="OOD set"),
        ]
        fig.legend(handles=handles, loc="upper center", ncol=2, bbox_to_anchor=(0.5, 1.0))
        fig.subplots_adjust(hspace=0.65, wspace=0.28, top=1 - 0.45 / fig.get_figheight())
        return _png(fig)


def _ood_panel(ax: Any, run: Run, set_name: str, d: Mapping[str, Any]) -> None:
    both = np.concatenate([d["in"], d["out"]])
    lo, hi = np.percentile(both, [0.5, 99.5]) if len(both) > 20 else (both.min(), both.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 41)
    for scores, colour in ((d["in"], _IN_COLOUR), (d["out"], _OUT_COLOUR)):
        clipped = np.clip(scores, lo, hi)
        ax.hist(clipped, bins=bins, density=True, color=colour, alpha=0.3)
        ax.hist(clipped, bins=bins, density=True, histtype="step", color=colour, linewidth=1.3)
    criterion = f" · score: {d['criterion']}" if d["criterion"] else ""
    ax.set_title(f"{run.name}\nvs {set_name}{criterion}", loc="left")
    ax.text(
        0.98,
        0.95,
        f"AUROC {_auroc(d['in'], d['out']):.3f}",
        transform=ax.transAxes,
        ha="right",
        va="top",
        fontsize=8.5,
        bbox={"boxstyle": "round,pad=0.3", "facecolor": "white", "edgecolor": "#d0d5dd"},
    )
    ax.set(xlabel="OOD score (higher = more OOD)", ylabel="density")
    ax.spines["left"].set_color(run.colour)
    ax.spines["left"].set_linewidth(2.5)


def _shift_data(run: Run) -> dict[str, dict[str, dict[int, float]]] | None:
    """{corruption: {metric: {severity: value}}} from details, else from the eval.json keys."""
    section = run.details.get("shift")
    if section:
        out: dict[str, dict[str, dict[int, float]]] = {}
        for name, entry in section.items():
            severities = [int(s) for s in entry["severity"]]
            by_metric = {}
            for metric, values in entry.items():
                if metric == "severity" or not isinstance(values, list):
                    continue
                if len(values) != len(severities):
                    raise ValueError(
                        f"shift/{name}/{metric} has {len(values)} values for {len(severities)} severities"
                    )
                by_metric[metric] = {
                    s: float(v) for s, v in zip(severities, values, strict=True) if v is not None
                }
            out[str(name)] = by_metric
        return out or None
    return _shift_points(run.metrics) or None


def _mean_over_corruptions(
    shift: Mapping[str, Mapping[str, Mapping[int, float]]], metric: str
) -> dict[int, float]:
    pooled: dict[int, list[float]] = {}
    for by_metric in shift.values():
        for severity, value in by_metric.get(metric, {}).items():
            pooled.setdefault(severity, []).append(value)
    return {s: float(np.mean(v)) for s, v in sorted(pooled.items())}


def _plot_curve(ax: Any, points: Mapping[int, float], run: Run, **kwargs: Any) -> None:
    if points:
        severities = sorted(points)
        ax.plot(
            severities,
            [points[s] for s in severities],
            marker="o",
            markersize=3.5,
            lw=1.7,
            color=run.colour,
            label=run.name,
            **kwargs,
        )


def _shift_figure(
    runs: Sequence[Run], data: Mapping[str, Mapping[str, Mapping[str, Mapping[int, float]]]]
) -> str:
    shown = [run for run in runs if run.name in data]
    corruptions = sorted({name for run in shown for name in data[run.name]})
    summary = ["acc"] + [
        metric
        for metric in ("uncertainty", "emb_uncertainty")  # the probe's, and the embedding's own (1/κ, σ, ...)
        if any(_varies(data[run.name], metric) for run in shown)
    ]
    cols = 4
    rows = 1 + math.ceil(len(corruptions) / cols)
    with _styled():
        fig = Figure(figsize=(3.2 * cols, 2.45 * rows + 0.4))
        grid = fig.add_gridspec(rows, cols, hspace=0.7, wspace=0.32)
        top = grid[0, :].subgridspec(1, len(summary), wspace=0.32)
        for j, metric in enumerate(summary):
            ax = fig.add_subplot(top[0, j])
            for run in shown:
                _plot_curve(ax, _mean_over_corruptions(data[run.name], metric), run)
            label = {"acc": "accuracy", "uncertainty": "probe uncertainty"}.get(
                metric, "embedding uncertainty"
            )
            ax.set(title=f"{label}, mean over corruptions", xlabel="severity", ylabel=label)
            ax.set_xticks(range(1, 6))
        shared = None
        for k, name in enumerate(corruptions):
            ax = fig.add_subplot(grid[1 + k // cols, k % cols], sharey=shared)
            shared = shared or ax
            for run in shown:
                _plot_curve(ax, data[run.name].get(name, {}).get("acc", {}), run)
            ax.set_title(name.replace("_", " "))
            ax.set_xticks(range(1, 6))
            if k % cols == 0:
                ax.set_ylabel("accuracy")
        handles, labels = _unique_legend(fig)
        fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 5), bbox_to_anchor=(0.5, 1.0))
        fig.subplots_adjust(top=1 - 0.55 / (2.45 * rows + 0.4))
        return _png(fig)


def _varies(by_corruption: Mapping[str, Mapping[str, Mapping[int, float]]], metric: str) -> bool:
    """Whether ``metric`` is present and not constant (a deterministic run's embedding uncertainty is 0)."""
    values = {v for m in by_corruption.values() for v in m.get(metric, {}).values()}
    return len(values) > 1


def _unique_legend(fig: Figure) -> tuple[list[Any], list[str]]:
    """Legend entries from every axis of ``fig``, one per label (a run may be missing from some panels)."""
    seen: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)


def _sparsification_data(run: Run) -> dict[str, np.ndarray] | None:
    section = run.details.get("sparsification")
    if not section:
        return None
    fractions, accuracy = _floats(section["fractions_removed"]), _floats(section["accuracy"])
    oracle_values = section.get("oracle", section.get("accuracy_oracle"))
    oracle = _floats(oracle_values) if oracle_values is not None else None
    if len(fractions) != len(accuracy) or (oracle is not None and len(oracle) != len(fractions)):
        raise ValueError("sparsification lists differ in length")
    return {"fractions": fractions, "accuracy": accuracy, "oracle": oracle}


def _area(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2)) if len(x) > 1 else float("nan")


def _sparsification_figure(runs: Sequence[Run], data: Mapping[str, Mapping[str, Any]]) -> str:
    with _styled():
        fig = Figure(figsize=(9.0, 4.0))
        ax = fig.add_subplot()
        for run in runs:
            if run.name not in data:
                continue
            d = data[run.name]
            label = run.name
            if d["oracle"] is not None:
                ause = _area(d["fractions"], d["oracle"]) - _area(d["fractions"], d["accuracy"])
                label += f"  (gap to oracle {ause:.4f})"
                ax.plot(d["fractions"], d["oracle"], ls="--", lw=1.3, color=run.colour, alpha=0.8)
            ax.plot(d["fractions"], d["accuracy"], lw=2.0, color=run.colour, label=label)
        ax.plot([], [], ls="--", color="#6b7280", label="oracle (errors removed first)")
        ax.set(xlabel="fraction of most-uncertain test points removed", ylabel="accuracy of the rest")
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
        return _png(fig)


def _ranked_data(run: Run) -> dict[str, Any] | None:
    section = run.details.get("ranked_images")
    if not section:
        return None
    shape = tuple(int(s) for s in section["shape"])
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"ranked_images shape must be [C, H, W] with C in (1, 3), got {list(shape)}")
    rows = {}
    for key in ("most_certain", "least_certain"):
        images = [_to_hwc(image, shape) for image in section.get(key) or []]
        values = [
            None if v is None else float(v) for v in section.get(f"uncertainty_{key.split('_')[0]}") or []
        ]
        values += [None] * (len(images) - len(values))
        rows[key] = list(zip(images, values, strict=False))
    return rows if any(rows.values()) else None


def _to_hwc(image: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """A flat (or nested) CHW pixel list as an HWC float array in [0, 1] for ``imshow``."""
    array = np.asarray(image, dtype=float).reshape(shape)
    scale = 1.0 if array.max(initial=0) <= 1.0 else 255.0
    return np.clip(array / scale, 0, 1).transpose(1, 2, 0)


def _ranked_figure(run: Run, rows: Mapping[str, Sequence[tuple[np.ndarray, float | None]]]) -> str:
    n = max(len(v) for v in rows.values())
    with _styled():
        fig = Figure(figsize=(0.95 * n + 1.3, 2.75))
        axes = fig.subplots(2, n, squeeze=False)
        for r, (key, label) in enumerate(
            (("most_certain", "most certain"), ("least_certain", "least certain"))
        ):
            for c in range(n):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c >= len(rows.get(key, [])):
                    continue
                image, value = rows[key][c]
                grey = image.shape[-1] == 1
                ax.imshow(
                    image[..., 0] if grey else image,
                    cmap="gray" if grey else None,
                    vmin=0,
                    vmax=1,
                    interpolation="nearest",
                )
                ax.set_xlabel("–" if value is None else f"{value:.3g}", fontsize=8, labelpad=2)
            axes[r, 0].set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center", labelpad=8)
        fig.subplots_adjust(wspace=0.12, hspace=0.45)
        return _png(fig)


# ----------------------------------------------------------------------------------------------- page


_CAPTIONS = {
    "reliability": (
        "<b>How to read:</b> test predictions are grouped by confidence (15 equal-width bins); each bar "
        "is the accuracy in its bin. On the dashed diagonal, confidence matches accuracy. Bars "
        "<i>below</i> it mean over-confidence, bars above it under-confidence; the hatched red part is "
        "the gap. The grey strip below shows how many predictions fall into each bin, so a large gap in "
        "an empty bin matters little."
    ),
    "ood": (
        "<b>How to read:</b> histograms of the out-of-distribution score (higher = judged more OOD) on "
        "the in-distribution test set (blue) and on an OOD set (orange). Well separated histograms mean "
        "OOD inputs can be flagged; overlap means they cannot. AUROC is the chance that a random OOD "
        "image scores higher than a random in-distribution image (0.5 = chance, 1 = perfect)."
    ),
    "shift": (
        "<b>How to read:</b> accuracy on corrupted copies of the test set as the corruption gets stronger"
        " (severity 1–5), one line per run. The top row averages over all corruptions; a flatter line is "
        "a more robust representation. Good uncertainty should <i>rise</i> as accuracy falls: the probe's "
        "predictive entropy, and the embedding's own uncertainty (1/κ for VI-SimSiam, σ for ProSMIN, Σ std "
        "for LAM and ensembles) when a run has one; the small panels show each corruption separately."
    ),
    "sparsification": (
        "<b>How to read:</b> the most uncertain test points are removed first and accuracy is measured on"
        " the rest. Solid lines rank by the model's uncertainty; dashed lines (same colour) are the "
        "oracle that removes errors first. A solid line that climbs close to its dashed line means the "
        "uncertainty knows where the errors are; a flat line means it is uninformative. The gap to the "
        "oracle (area between the curves, lower is better) is in the legend."
    ),
    "ranked": (
        "<b>How to read:</b> for each run, the test images with the lowest (top row) and highest (bottom "
        "row) uncertainty, with the uncertainty value under each image. Sensible uncertainty puts clean, "
        "typical images on top and ambiguous, atypical or damaged ones below."
    ),
}


def _single_figure(
    draw: Callable[[Sequence[Run], Any], str], alt: str, caption: str
) -> Callable[[Sequence[Run], Any], str]:
    return lambda runs, data: _figure(draw(runs, data), alt, _CAPTIONS[caption])


def _ranked_body(runs: Sequence[Run], data: Mapping[str, Any]) -> str:
    """One two-row image grid per run (runs differ in which images they rank, so they are not overlaid)."""
    parts = []
    for run in runs:
        if run.name in data:
            uri = _ranked_figure(run, data[run.name])
            parts.append(
                f'<h3>{_swatch(run)}{_e(run.name)}</h3><figure><img src="{uri}" alt="ranked images">'
            )
            parts.append("</figure>")
    return "".join(parts) + f"<figcaption>{_CAPTIONS['ranked']}</figcaption>"


@dataclass(frozen=True)
class _FigureSpec:
    """One figure section: where it links from, how to pull each run's data, how to draw them all."""

    anchor: str
    nav: str
    title: str
    what: str
    extract: Callable[[Run], Any]
    draw: Callable[[Sequence[Run], Any], str]


_FIGURES = (
    _FigureSpec(
        "reliability", "Reliability", "Reliability diagrams", "reliability", _reliability_data,
        _single_figure(_reliability_figure, "reliability diagrams", "reliability"),
    ),
    _FigureSpec(
        "ood", "OOD scores", "OOD score histograms", "OOD score", _ood_data,
        _single_figure(_ood_figure, "OOD score histograms", "ood"),
    ),
    _FigureSpec(
        "shift", "Corruptions", "Accuracy under corruption", "corruption", _shift_data,
        _single_figure(_shift_figure, "accuracy versus corruption severity", "shift"),
    ),
    _FigureSpec(
        "sparsification", "Sparsification", "Sparsification", "sparsification", _sparsification_data,
        _single_figure(_sparsification_figure, "sparsification curves", "sparsification"),
    ),
    _FigureSpec(
        "ranked", "Ranked images", "Test images ranked by uncertainty", "ranked-image", _ranked_data,
        _ranked_body,
    ),
)  # fmt: skip


def _figure_sections(runs: Sequence[Run], failures: list[str]) -> list[tuple[str, str, str]]:
    """(anchor, nav label, html) for every figure section that at least one run has data for."""
    out = []
    for spec in _FIGURES:
        data = _draw_per_run(runs, spec.extract, failures, spec.what)
        if not data:
            continue
        try:
            body = spec.draw(runs, data)
        except Exception as err:  # one unexpected figure failure must not cost the reader the whole page
            failures.append(f"{spec.title}: figure could not be drawn ({type(err).__name__}: {err})")
            continue
        body += _missing_note(runs, set(data), spec.what)
        out.append((spec.anchor, spec.nav, _section(spec.anchor, spec.title, "", body)))
    return out


def _shift_table(runs: Sequence[Run]) -> str:
    """Mean accuracy over severities per corruption (columns) and run (rows), when any run has shift keys."""
    rows = []
    for run in runs:
        summary = shift_summary(run.metrics)
        rows.append(
            {k.removesuffix("/acc").replace("_", " "): v for k, v in summary.items() if k.endswith("/acc")}
        )
    if not any(rows):
        return ""
    return (
        "<h3>Accuracy under corruption, mean over severities</h3>"
        + _metric_table(runs, rows, direction=lambda key: "higher")
        + '<p class="legend">Column <i>mean</i> averages every corruption and severity.</p>'
    )


def _page(title: str, runs: Sequence[Run]) -> str:
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    failures: list[str] = []
    table = _metric_table(runs, [_table_metrics(run.metrics) for run in runs])
    legend = (
        '<p class="legend"><span class="best-demo">bold green</span> = best in its column among the runs '
        "(↑ higher is better, ↓ lower is better; columns without an arrow are descriptive and never "
        "highlighted). <i>corruptions / mean</i> columns average every corruption and severity. "
        "Hover a header for the full eval.json key.</p>"
    )
    figures = _figure_sections(runs, failures)
    nav_items = [("runs", "Runs"), ("metrics", "Metrics")] + [(a, label) for a, label, _ in figures]
    nav = "".join(f'<a href="#{a}">{_e(label)}</a>' for a, label in nav_items)
    failure_html = "".join(f'<p class="note">⚠ {_e(f)}</p>' for f in failures)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        f'<header><h1>{_e(title)}</h1><div class="sub">Generated {_e(generated)} · {len(runs)} '
        f"run{'s' if len(runs) != 1 else ''}</div><nav>{nav}</nav></header>",
        _section(
            "runs",
            "Runs",
            "Each run's colour is the same in every table and figure.",
            _overview_table(runs) + failure_html,
        ),
        _section(
            "metrics",
            "Metrics",
            "One row per run, one column per metric in <code>eval.json</code>, grouped by protocol.",
            table + legend + _shift_table(runs),
        ),
        *(html_ for _, _, html_ in figures),
        "<footer>probssl report · self-contained: no scripts, no external resources</footer>",
        "</main></body></html>",
    ]
    return "\n".join(parts)


def _write_atomic(path: Path, text: str) -> None:
    """Write next to the target and rename, so a reader never sees a half-written report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_report(run_dirs: Sequence[str | Path], out: str | Path, title: str = "probssl report") -> Path:
    """Write a self-contained HTML report comparing ``run_dirs`` to ``out`` and return its path.

    Each directory needs ``eval.json`` for the table (a missing one gives an empty row and a warning) and
    optionally ``eval_details.json`` for the figures; sections missing from a run are skipped for that run.
    """
    if isinstance(run_dirs, str | Path):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    for run, name, i in zip(runs, _display_names(runs), range(len(runs)), strict=True):
        run.name = name
        run.colour = _PALETTE[i % len(_PALETTE)]
    path = Path(out)
    _write_atomic(path, _page(title, runs))
    return path
