"""The report's OOD score histograms: per run and OOD set, the in-distribution and OOD scores of the
probe, of the feature-space reference detector and of the method's own uncertainty, side by side.

Each panel's title carries the AUROC that the metric table prints for that very score, so page and
histogram cannot disagree; a score whose values barely differ is stated as its range instead of drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.patches
import numpy as np
from matplotlib.ticker import MaxNLocator

from probssl.eval.ood import binary_auroc
from probssl.eval.report import figures
from probssl.eval.report.figures import (
    _IN_COLOUR,
    _OUT_COLOUR,
    _floats,
    _legend_below,
    _panel_figure,
    _styled,
    _wrapped,
    significant_digits,
)
from probssl.eval.report.runs import Run
from probssl.results import numeric


def _auroc(score_in: np.ndarray, score_out: np.ndarray) -> float:
    """AUROC with OOD positive, by the suite's one tested definition (:func:`probssl.eval.ood.binary_auroc`):
    for a run whose eval.json lacks the number its histogram shows."""
    scores = np.concatenate([score_in, score_out])
    return binary_auroc(scores, np.r_[np.zeros(len(score_in), bool), np.ones(len(score_out), bool)])


#: How each OOD score is named on a histogram, in the order its panels sit: the probe's score, the
#: pre-declared feature-space reference, the method's own uncertainty (eval_details ``by_criterion``).
_OOD_SCORE_NAMES = {"entropy": "probe", "msp": "probe", "knn1": "reference", "emb": "own"}


def _ood_data(run: Run) -> dict[str, dict[str, dict[str, Any]]] | None:
    """{OOD set: {criterion: histogram data}}: the set's headline score (``criterion``) and every score
    of ``by_criterion`` (the reference detector and the method's own uncertainty), each with the AUROC
    the metric table prints for that very score."""
    section = run.details.get("ood")
    if not section:
        return None
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for set_name, entry in section.items():
        scores = {str(entry.get("criterion", "")): entry}
        scores.update({str(c): scored for c, scored in (entry.get("by_criterion") or {}).items()})
        for criterion, scored in scores.items():
            score_in, score_out = _floats(scored["score_in"]), _floats(scored["score_out"])
            score_in, score_out = score_in[np.isfinite(score_in)], score_out[np.isfinite(score_out)]
            if not (len(score_in) and len(score_out)):
                continue
            table_value = run.metrics.get(f"ood/{set_name}/{criterion}/auroc") if criterion else None
            out.setdefault(str(set_name), {})[criterion] = {
                "in": score_in,
                "out": score_out,
                "criterion": criterion,
                # The table's number for this very score, so page and histogram cannot disagree.
                "auroc": float(table_value) if numeric(table_value) else _auroc(score_in, score_out),
            }
    return out or None


def _ood_figure(runs: Sequence[Run], data: Mapping[str, dict[str, dict[str, dict[str, Any]]]]) -> str:
    """One block of panels per run: a row per OOD set, a column per score (probe, reference detector,
    own uncertainty), each at the same place in every block so runs compare at a glance. Blocks fill rows
    four panels wide: with one score, four runs side by side (one run per row and one panel made a
    single column, 10,000 px tall at 42 runs)."""
    shown = [run for run in runs if run.name in data]
    sets = list(dict.fromkeys(name for run in shown for name in data[run.name]))
    seen = dict.fromkeys(c for run in shown for entry in data[run.name].values() for c in entry)
    order = list(_OOD_SCORE_NAMES)
    scores = sorted(seen, key=lambda c: order.index(c) if c in order else len(order))
    cols = len(scores)
    rows_per_run = len(sets)
    runs_per_row = min(max(1, 4 // cols), len(shown))
    block_rows = math.ceil(len(shown) / runs_per_row)
    with _styled():
        fig = _panel_figure(3.4 * cols * runs_per_row, 2.8 * rows_per_run * block_rows + 0.3)
        axes = fig.subplots(rows_per_run * block_rows, cols * runs_per_row, squeeze=False)
        for ax in axes.ravel():
            ax.set_visible(False)
        for r, run in enumerate(shown):
            block_row, block_col = divmod(r, runs_per_row)
            for i, set_name in enumerate(sets):
                for j, score in enumerate(scores):
                    entry = data[run.name].get(set_name, {}).get(score)
                    if entry is not None:
                        ax = axes[block_row * rows_per_run + i, block_col * cols + j]
                        ax.set_visible(True)
                        _ood_panel(ax, run, set_name, entry)
        handles = [
            matplotlib.patches.Patch(facecolor=_IN_COLOUR, alpha=0.5, label="in-distribution test set"),
            matplotlib.patches.Patch(facecolor=_OUT_COLOUR, alpha=0.5, label="OOD set"),
        ]
        _legend_below(fig, handles, [h.get_label() for h in handles], ncol=2)
        return figures._png(fig)  # looked up at call time, like every figure's


#: A score whose values all lie within this fraction of their size is shown as its range, not drawn:
#: a histogram stretches any range to the panel's width, so 0.9140–0.9148 looked like a real spread.
NEARLY_CONSTANT = 0.01


def nearly_constant(values: np.ndarray) -> bool:
    """Whether every value lies within ``NEARLY_CONSTANT`` of the largest magnitude (or all are equal)."""
    lo, hi = float(values.min()), float(values.max())
    return hi - lo <= NEARLY_CONSTANT * max(abs(lo), abs(hi))


def range_statement(score_in: np.ndarray, score_out: np.ndarray) -> str:
    """The range of a nearly constant score in words: bounds with the digits that tell them apart, the
    range as a share of the value, and each set's median (where inside the range the two sets sit)."""
    both = np.concatenate([score_in, score_out])
    lo, hi = float(both.min()), float(both.max())
    medians = float(np.median(score_in)), float(np.median(score_out))
    digits = significant_digits([lo, hi, *medians])

    def shown(value: float) -> str:
        return f"{value:.{digits}g}"

    if hi == lo:
        return f"constant: every value is {shown(lo)}"
    share = (hi - lo) / max(abs(lo), abs(hi))
    return "\n".join(
        [
            "nearly constant: every value in",
            f"{shown(lo)} – {shown(hi)}",
            f"(a range of {hi - lo:.2g}, {100 * share:.2g}% of the value)",
            f"median: test {shown(medians[0])}",
            f"median: OOD {shown(medians[1])}",
        ]
    )


def _ood_panel(ax: Any, run: Run, set_name: str, d: Mapping[str, Any]) -> None:
    both = np.concatenate([d["in"], d["out"]])
    score = d["criterion"] or "score"
    name = _OOD_SCORE_NAMES.get(score, score)
    # Three lines in every panel (a long set name wrapped "vs <set> · <score>" onto a fourth in some).
    title = _wrapped(run.name, f"vs {set_name}", f"{name} · AUROC({score}) = {d['auroc']:.3f}", width=34)
    ax.set_title(title, loc="left")
    ax.spines["left"].set_color(run.colour)
    ax.spines["left"].set_linewidth(2.5)
    xlabel = _wrapped(f"OOD score: {score} (higher = more OOD)", width=40)
    if nearly_constant(both):
        ax.set(xticks=[], yticks=[], xlabel=xlabel)
        ax.grid(False)
        statement = range_statement(d["in"], d["out"])
        ax.text(0.5, 0.5, statement, ha="center", va="center", transform=ax.transAxes, fontsize=8)
        return
    lo, hi = np.percentile(both, [0.5, 99.5]) if len(both) > 20 else (both.min(), both.max())
    if hi <= lo:  # a few outliers hold the spread: draw all of it
        lo, hi = both.min(), both.max()
    bins = np.linspace(lo, hi, 41)
    for scores, colour in ((d["in"], _IN_COLOUR), (d["out"], _OUT_COLOUR)):
        clipped = np.clip(scores, lo, hi)
        ax.hist(clipped, bins=bins, density=True, color=colour, alpha=0.3)
        ax.hist(clipped, bins=bins, density=True, histtype="step", color=colour, linewidth=1.3)
    ax.set(xlabel=xlabel, ylabel="density")
    ax.xaxis.set_major_locator(MaxNLocator(5))  # knn1's cosines (−0.975 …) ran into each other at 8 ticks
