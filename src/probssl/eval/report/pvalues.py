"""The report's conformal p-value figure (issue 29): per run and OOD set, the combined detector's p-values.

In-distribution test images (the scored half) should give a flat histogram — valid p-values are
uniform, so flagging p < α wrongly flags a fraction α of them — and OOD images a pile near 0. Under
the panels, the share flagged at α = 0.05 on each side, from the same ``eval.json`` keys the tables
print (``ood/id/combined/fpr@0.05``, ``ood/<set>/combined/tpr@0.05``).
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.patches
import numpy as np

from probssl.eval.report import figures
from probssl.eval.report.figures import (
    _IN_COLOUR,
    _OUT_COLOUR,
    _floats,
    _legend_below,
    _panel_figure,
    _styled,
    _wrapped,
)
from probssl.eval.report.runs import Run
from probssl.results import numeric

DETECTOR = "combined"  # probssl.eval.conformal.COMBINED
ALPHA = 0.05  # probssl.eval.conformal.DEFAULT_ALPHA
_BINS = np.linspace(0.0, 1.0, 21)

CAPTION = (
    "<b>How to read:</b> the combined detector's conformal p-value (docs/methods.md §5) on the scored "
    "half of the in-distribution test set (blue) and on each OOD set (orange). For in-distribution images "
    "the histogram should be flat (valid p-values are uniform: flagging p &lt; α wrongly flags a fraction "
    "α of them); OOD images should pile up near 0. The table gives the share flagged at α = 0.05: on the "
    "in-distribution side the realized false-positive rate (close to 0.05 when calibration holds), on the "
    "OOD side the detection rate."
)


def pvalue_data(run: Run) -> dict[str, dict[str, Any]] | None:
    """{OOD set: {"in", "out": p-values, "fpr", "tpr": flagged shares at α (None if not recorded)}}."""
    section = run.details.get("ood")
    if not section:
        return None
    out: dict[str, dict[str, Any]] = {}
    for set_name, entry in section.items():
        pvalues = (entry.get("pvalues") or {}).get(DETECTOR)
        if not pvalues:
            continue
        p_in, p_out = _floats(pvalues["in"]), _floats(pvalues["out"])
        if not (len(p_in) and len(p_out)):
            continue
        fpr = run.metrics.get(f"ood/id/{DETECTOR}/fpr@{ALPHA:g}")
        tpr = run.metrics.get(f"ood/{set_name}/{DETECTOR}/tpr@{ALPHA:g}")
        out[str(set_name)] = {
            "in": p_in,
            "out": p_out,
            "fpr": float(fpr) if numeric(fpr) else float(np.mean(p_in < ALPHA)),
            "tpr": float(tpr) if numeric(tpr) else float(np.mean(p_out < ALPHA)),
        }
    return out or None


def pvalue_figure(runs: Sequence[Run], data: Mapping[str, dict[str, dict[str, Any]]]) -> str:
    """One row of panels per run (a panel per OOD set) and the flagged-share table, as figure HTML."""
    shown = [run for run in runs if run.name in data]
    sets = list(dict.fromkeys(name for run in shown for name in data[run.name]))
    with _styled():
        fig = _panel_figure(3.2 * len(sets), 2.6 * len(shown) + 0.3)
        axes = fig.subplots(len(shown), len(sets), squeeze=False)
        for r, run in enumerate(shown):
            for c, set_name in enumerate(sets):
                entry = data[run.name].get(set_name)
                ax = axes[r, c]
                if entry is None:
                    ax.set_visible(False)
                    continue
                for values, colour in ((entry["in"], _IN_COLOUR), (entry["out"], _OUT_COLOUR)):
                    ax.hist(values, bins=_BINS, density=True, color=colour, alpha=0.3)
                    ax.hist(values, bins=_BINS, density=True, histtype="step", color=colour, linewidth=1.3)
                ax.axhline(1.0, color="#6b7280", linewidth=0.8, linestyle="--")  # the uniform density
                ax.axvline(ALPHA, color="#d23c4b", linewidth=0.8)
                # The axis is scaled to the in-distribution histogram, whose flatness is the point; an
                # OOD pile taller than that is cut and its height written on it.
                top = _top(entry["in"])
                ax.set_ylim(0, top)
                pile = np.histogram(entry["out"], bins=_BINS, density=True)[0][0]
                if pile > top:
                    ax.annotate(f"↑ {pile:.0f}", (0.05, 0.92 * top), color=_OUT_COLOUR, fontsize=8)
                ax.set_title(_wrapped(run.name, f"vs {set_name}", width=34), loc="left")
                ax.set(xlim=(0, 1), xlabel="combined p-value", ylabel="density")
                ax.spines["left"].set_color(run.colour)
                ax.spines["left"].set_linewidth(2.5)
        handles = [
            matplotlib.patches.Patch(facecolor=_IN_COLOUR, alpha=0.5, label="in-distribution (scored half)"),
            matplotlib.patches.Patch(facecolor=_OUT_COLOUR, alpha=0.5, label="OOD set"),
        ]
        _legend_below(fig, handles, [h.get_label() for h in handles], ncol=2)
        uri = figures._png(fig)  # looked up at call time, like every figure's
    return (
        f'<figure><img src="{uri}" alt="conformal p-value histograms">'
        f"{flagged_table(shown, data, sets)}<figcaption>{CAPTION}</figcaption></figure>"
    )


def _top(values: np.ndarray) -> float:
    """The y-axis top: room above the in-distribution histogram (at least twice the uniform density)."""
    return max(2.0, 1.25 * float(np.histogram(values, bins=_BINS, density=True)[0].max()))


def flagged_table(
    runs: Sequence[Run], data: Mapping[str, dict[str, dict[str, Any]]], sets: Sequence[str]
) -> str:
    """ "Flagged at α = 0.05: ID x%, <set> y%", one row per run."""
    head = "".join(f"<th>{html.escape(name)}</th>" for name in sets)
    rows = []
    for run in runs:
        entries = data[run.name]
        fpr = next(iter(entries.values()))["fpr"]
        cells = "".join(
            f"<td>{100 * entries[name]['tpr']:.1f}%</td>" if name in entries else "<td>–</td>"
            for name in sets
        )
        rows.append(f"<tr><td>{html.escape(run.name)}</td><td>{100 * fpr:.1f}%</td>{cells}</tr>")
    return (
        f'<table class="flagged"><caption>Flagged at α = {ALPHA:g}</caption>'
        f"<thead><tr><th>run</th><th>in-distribution</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
