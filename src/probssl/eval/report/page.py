"""Page assembly: the self-contained HTML file that puts the tables and figures of the runs together.

Design choices, and why:

* **One file, no network.** Reports get mailed, attached to issues and opened years later on machines
  without the package, so all CSS is inline and every plot is a PNG embedded as a base64 ``data:`` URI.
* **Partial runs never break the page.** A run evaluated without details (or with a malformed section)
  just has no panel in that figure, and the page says which runs are missing from it.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probssl.eval.report.figures import (
    _draw_per_run,
    _reliability_data,
    _reliability_figure,
    _shift_data,
    _shift_figure,
    _sparsification_data,
    _sparsification_figure,
)
from probssl.eval.report.metric_keys import _table_metrics, headline_metrics
from probssl.eval.report.ood_histograms import NEARLY_CONSTANT, _ood_data, _ood_figure
from probssl.eval.report.pvalues import pvalue_data, pvalue_figure
from probssl.eval.report.ranked_images import _ranked_data, _ranked_figure, _ranked_own_data
from probssl.eval.report.runs import Run, label_runs, load_run, split_evaluated
from probssl.eval.report.tables import (
    _e,
    _overview_table,
    _shift_table,
    _swatch,
    grouped_metric_table,
    seed_groups,
)

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
td.num .sd { color:var(--muted); font-weight:400; font-size:11.5px; }
details.per-run, details.all-metrics { margin:4px 0 12px; }
details.per-run summary, details.all-metrics > summary { cursor:pointer; color:var(--accent); font-size:13px;
  margin-bottom:8px; }
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
td.doc { min-width:260px; max-width:380px; font-size:12.5px; color:var(--muted); white-space:normal; }
td.chips { min-width:190px; white-space:normal; }
footer { color:var(--muted); font-size:12px; text-align:center; margin-top:28px; }
"""


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
        "image scores higher than a random in-distribution image (0.5 = chance, 1 = perfect); each panel "
        "names its score, and its AUROC is the table's <code>ood/&lt;set&gt;/&lt;score&gt;/auroc</code>. "
        "One row per OOD set, one column per score: the probe's entropy, <code>knn1</code> (distance to "
        "the nearest training feature, the pre-declared deterministic reference) and, where the method "
        "has one, its own uncertainty — the question is whether the own score separates as well as "
        f"<code>knn1</code>. A score whose values all lie within {NEARLY_CONSTANT:.0%} of their size is "
        "stated as its range (and each set's median) instead: a histogram would stretch that sliver "
        "over the whole axis."
    ),
    "shift": (
        "<b>How to read:</b> accuracy on corrupted copies of the test set as the corruption gets stronger"
        " (severity 1–5), one line per run. The top row averages over all corruptions; a flatter line is "
        "a more robust representation. Good uncertainty should <i>rise</i> as accuracy falls: the probe's "
        "predictive entropy, and the embedding's own uncertainty (1/κ for VI-SimSiam, σ for ProSMIN, Σ std "
        "for LAM and ensembles) when a run has one; the small panels show each corruption separately."
    ),
    "sparsification": (
        "<b>How to read:</b> each test image queries the rest of the test set (leave-one-out 1-NN "
        "retrieval: correct when its nearest neighbour has its label, <code>ret/recall@1</code> at 0). The "
        "most uncertain queries are removed first, by the run's own uncertainty (the probe's predictive "
        "entropy when the embedding has none), and the accuracy of the rest is measured. Dashed lines "
        "(same colour) are the oracle that removes errors first. A solid line that climbs close to its "
        "dashed line means the uncertainty knows where the errors are; a flat line means it is "
        "uninformative. The legend's gap to the oracle is the table's <code>ret/ausc_oracle − "
        "ret/ausc</code> (mean height between the curves, lower is better)."
    ),
    "ranked": (
        "<b>How to read:</b> for each run, the test images with the lowest (top row) and highest (bottom "
        "row) uncertainty; under each image its label y, the probe's prediction ŷ (red when wrong) and the "
        "uncertainty value. Sensible uncertainty puts clean, typical images on top and ambiguous, atypical, "
        "damaged or misclassified ones below."
    ),
}


def _single_figure(
    draw: Callable[[Sequence[Run], Any], str], alt: str, caption: str
) -> Callable[[Sequence[Run], Any], str]:
    return lambda runs, data: _figure(draw(runs, data), alt, _CAPTIONS[caption])


def _has_own_uncertainty(run: Run) -> bool:
    """Whether the run's method reports a per-input uncertainty (its eval.json has ``sel/emb/`` keys)."""
    return any(key.startswith("sel/emb/") for key in run.metrics)


def _ranked_body(runs: Sequence[Run], data: Mapping[str, Any]) -> str:
    """One two-row image grid per run (runs differ in which images they rank, so they are not overlaid),
    all in one figure with one caption."""
    parts = [
        f'<h3>{_swatch(run)}{_e(run.name)}</h3><img src="{_ranked_figure(run, data[run.name])}" '
        f'alt="{_e(run.name)}: test images ranked by uncertainty">'
        for run in runs
        if run.name in data
    ]
    return f"<figure>{''.join(parts)}<figcaption>{_CAPTIONS['ranked']}</figcaption></figure>"


@dataclass(frozen=True)
class _FigureSpec:
    """One figure section: where it links from, how to pull each run's data, how to draw them all."""

    anchor: str
    nav: str
    title: str
    what: str
    extract: Callable[[Run], Any]
    draw: Callable[[Sequence[Run], Any], str]
    applies: Callable[[Run], bool] = lambda run: True  # runs without the data by design get no note
    #: Draw one run per bench arm (its first seed with data), not every seed: these figures are a panel
    #: per run, and 42 of them (a 14-arm, 3-seed suite: 84 OOD histograms, a 40k px page) say nothing 14
    #: do not; the seeds' numbers are all in the metric tables.
    one_per_arm: bool = False


_FIGURES = (
    _FigureSpec(
        "reliability", "Reliability", "Reliability diagrams", "reliability", _reliability_data,
        _single_figure(_reliability_figure, "reliability diagrams", "reliability"), one_per_arm=True,
    ),
    _FigureSpec(
        "ood", "OOD scores", "OOD score histograms", "OOD score", _ood_data,
        _single_figure(_ood_figure, "OOD score histograms", "ood"), one_per_arm=True,
    ),
    _FigureSpec(
        "pvalues", "OOD p-values", "Is this image unlike the training data? Conformal p-values", "p-value",
        pvalue_data, pvalue_figure, one_per_arm=True,
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
        _ranked_body, one_per_arm=True,
    ),
    _FigureSpec(
        "ranked-own", "Ranked by own", "Test images ranked by the method's own uncertainty",
        "own-uncertainty ranking", _ranked_own_data, _ranked_body, _has_own_uncertainty, one_per_arm=True,
    ),
)  # fmt: skip


def _shown_runs(
    runs: Sequence[Run], spec: _FigureSpec, failures: list[str]
) -> tuple[list[Run], dict[str, Any]]:
    """The runs a figure shows and their data. For a one-per-arm figure, each seed group's first run that
    has data (else its first run): the later seeds are not read at all, since a ranked-image grid decodes
    every thumbnail of its run."""
    if not spec.one_per_arm:
        return list(runs), _draw_per_run(runs, spec.extract, failures, spec.what)
    shown: list[Run] = []
    data: dict[str, Any] = {}
    for group in seed_groups(runs):
        for run in group:
            found = _draw_per_run([run], spec.extract, failures, spec.what)
            if found:
                data.update(found)
                shown.append(run)
                break
        else:
            shown.append(group[0])
    return shown, data


def _figure_sections(runs: Sequence[Run], failures: list[str]) -> list[tuple[str, str, str]]:
    """(anchor, nav label, html) for every figure section that at least one run has data for."""
    out = []
    for spec in _FIGURES:
        shown, data = _shown_runs(runs, spec, failures)
        if not data:
            continue
        try:
            body = spec.draw(shown, data)
        except Exception as err:  # one unexpected figure failure must not cost the reader the whole page
            failures.append(f"{spec.title}: figure could not be drawn ({type(err).__name__}: {err})")
            continue
        body += _missing_note([run for run in shown if spec.applies(run)], set(data), spec.what)
        if len(shown) < len(runs):
            body += (
                '<p class="note">One run per bench arm (its first seed with data); every seed\'s numbers '
                "are in the per-run fold of the Metrics table, and <code>probssl report RUN_DIR…</code> "
                "draws any run's own panels.</p>"
            )
        out.append((spec.anchor, spec.nav, _section(spec.anchor, spec.title, "", body)))
    return out


def _page(title: str, runs: Sequence[Run], skipped: Sequence[str] = ()) -> str:
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip()
    failures: list[str] = []
    rows = [_table_metrics(run.metrics) for run in runs]
    headline = [headline_metrics(row) for row in rows]
    table = grouped_metric_table(runs, rows)
    hidden = len({key for row in rows for key in row}) - len({key for row in headline for key in row})
    if any(headline) and hidden > 0:  # 61 bands of every detector x set x posterior draw bury the headline
        table = (
            grouped_metric_table(runs, headline)
            + f'<details class="all-metrics"><summary>All metrics ({hidden} more columns: every detector, '
            "score and retrieval / selective criterion)</summary>" + table + "</details>"
        )
    by_arm = any(len(group) > 1 for group in seed_groups(runs))
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
    failure_html += "".join(f'<p class="note">{_e(note)}</p>' for note in skipped)
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
            "Each run's colour is the same in every table and figure; the seeds of one bench arm share "
            "it (and one legend entry).",
            _overview_table(runs) + failure_html,
        ),
        _section(
            "metrics",
            "Metrics",
            (
                "One row per bench arm: the mean ± sample std over its seeds (<i>n=</i> when fewer seeds "
                "have the metric); one row per run in the fold below. "
                if by_arm
                else "One row per run. "
            )
            + "One column per metric in <code>eval.json</code>, grouped by protocol.",
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

    Each directory needs ``eval.json`` for the table and optionally ``eval_details.json`` for the
    figures; sections missing from a run are skipped for that run. A run without a readable
    ``eval.json`` is left out, with a warning and a note on the page; none left is an error.
    """
    if isinstance(run_dirs, str | Path):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ValueError("build_report needs at least one run directory")
    runs, skipped = split_evaluated([load_run(d) for d in run_dirs])
    for note in skipped:
        warnings.warn(note, stacklevel=2)
    if not runs:
        given = ", ".join(str(d) for d in run_dirs[:4]) + (" ..." if len(run_dirs) > 4 else "")
        raise FileNotFoundError(f"none of {given} is an evaluated run; run `probssl eval RUN` on each first")
    label_runs(runs)
    path = Path(out)
    _write_atomic(path, _page(title, runs, skipped))
    return path
