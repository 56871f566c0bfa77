"""The report's figures, each a PNG data URI: reliability diagrams, accuracy under corruption and
sparsification curves here, and the drawing they all share (style, PNG encoding, panel grids, legends);
the OOD score histograms are in :mod:`.ood_histograms`, the ranked test images in :mod:`.ranked_images`
and the conformal p-values in :mod:`.pvalues`. Those modules call :func:`_png` through this module, at
call time, so one replacement reaches every figure.

Matplotlib without pyplot: figures are built from ``matplotlib.figure.Figure`` (Agg canvas) under an
``rc_context``, so building a report never switches the caller's backend or touches global figure state.
Legends sit outside the axes (below the panels or to their right), so they never cover a title or a bar;
panel grids use the constrained layout, which spaces panels by their titles and labels, so a long run
name cannot run into the next panel, and titles are wrapped to their panel's width.
"""

from __future__ import annotations

import base64
import io
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from probssl.eval.report.metric_keys import _shift_points
from probssl.eval.report.runs import Run
from probssl.results import numeric

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


def _wrapped(*lines: str, width: int) -> str:
    """Title lines broken at ``width`` characters (a panel is ~30-40 characters of title wide)."""
    return "\n".join(textwrap.fill(line, width, break_on_hyphens=False) for line in lines)


def _panel_figure(width: float, height: float) -> Figure:
    """A figure for a grid of panels, in inches: constrained layout, with a little more room between rows
    than its default so a panel's title does not read as a caption of the tick labels above it."""
    fig = Figure(figsize=(width, height), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.08)
    return fig


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
        fig = _panel_figure(3.0 * cols, 3.35 * rows + 0.3)
        # One flat grid, diagram and count strip in alternate rows: the constrained layout spreads a nested
        # 2x1 grid over the whole cell, which put the strip far below its diagram.
        grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3.2, 1] * rows)
        for k, run in enumerate(shown):
            d = data[run.name]
            row, col = 2 * (k // cols), k % cols
            ax, ax_count = fig.add_subplot(grid[row, col]), fig.add_subplot(grid[row + 1, col])
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
        _legend_below(fig, *fig.axes[0].get_legend_handles_labels(), ncol=2)
        return _png(fig)


def _reliability_title(run: Run, d: Mapping[str, np.ndarray]) -> str:
    """Run name plus ECE: from eval.json when present, else recomputed from the bins."""
    ece = run.metrics.get("cal/ece15")
    if not numeric(ece):
        total = d["count"].sum()
        ok = ~np.isnan(d["acc"])
        ece = float((d["count"][ok] * np.abs(d["acc"][ok] - d["conf"][ok])).sum() / total) if total else None
    return _wrapped(run.name, *([f"ECE = {ece:.4f}"] if ece is not None else []), width=30)


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
            label=run.group or run.name,
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
        fig = _panel_figure(3.2 * cols, 2.45 * rows + 0.4)
        grid = fig.add_gridspec(rows, cols)
        top = grid[0, :].subgridspec(1, len(summary))
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
        _legend_below(fig, handles, labels, ncol=min(len(labels), 4))
        return _png(fig)


def _varies(by_corruption: Mapping[str, Mapping[str, Mapping[int, float]]], metric: str) -> bool:
    """Whether ``metric`` is present and not constant (a deterministic run's embedding uncertainty is 0)."""
    values = {v for m in by_corruption.values() for v in m.get(metric, {}).values()}
    return len(values) > 1


def _legend_below(fig: Figure, handles: Sequence[Any], labels: Sequence[str], ncol: int) -> None:
    """A figure legend right under the panels, outside every axes, so it covers no title, bar or line.
    The constrained layout makes room for it; anchored to the figure's bottom edge instead, it sat below
    the gridspec's margin, a blank band that grows with the figure (400 px at 42 runs)."""
    fig.legend(handles, labels, loc="outside lower center", ncol=max(1, ncol))


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


def _mean_height(x: np.ndarray, y: np.ndarray) -> float:
    """Trapezoidal area under y(x) over the x-range: how ``ret/ausc`` normalises (``eval.retrieval``)."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 2 or x[-1] == x[0]:
        return float(y[0]) if len(y) else float("nan")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / (x[-1] - x[0]))


def _oracle_gap(run: Run, d: Mapping[str, Any]) -> float | None:
    """``ret/ausc_oracle − ret/ausc``: the table's two numbers when eval.json has them, so the legend
    and the table cannot disagree; else the same mean height between the curves."""
    ausc, oracle = run.metrics.get("ret/ausc"), run.metrics.get("ret/ausc_oracle")
    if numeric(ausc) and numeric(oracle):
        return float(oracle) - float(ausc)
    if d["oracle"] is None:
        return None
    return _mean_height(d["fractions"], d["oracle"]) - _mean_height(d["fractions"], d["accuracy"])


def _sparsification_figure(runs: Sequence[Run], data: Mapping[str, Mapping[str, Any]]) -> str:
    """One solid curve (and its dashed oracle) per run; one legend entry per group with its mean gap."""
    gaps: dict[str, list[float]] = {}
    handles: dict[str, Any] = {}
    with _styled():
        fig = Figure(figsize=(9.0, 4.0))
        ax = fig.add_subplot()
        for run in runs:
            if run.name not in data:
                continue
            d, group = data[run.name], run.group or run.name
            if d["oracle"] is not None:
                ax.plot(d["fractions"], d["oracle"], ls="--", lw=1.3, color=run.colour, alpha=0.8)
            (line,) = ax.plot(d["fractions"], d["accuracy"], lw=2.0, color=run.colour)
            handles.setdefault(group, line)
            gap = _oracle_gap(run, d)
            if gap is not None and math.isfinite(gap):
                gaps.setdefault(group, []).append(gap)
        labels = [
            f"{g}  ({'mean ' if len(gaps[g]) > 1 else ''}gap to oracle {np.mean(gaps[g]):.4f})"
            if g in gaps
            else g
            for g in handles
        ]
        (oracle,) = ax.plot([], [], ls="--", color="#6b7280")
        ax.set(
            xlabel="fraction of most-uncertain test points removed",
            ylabel="1-NN retrieval accuracy of the rest",
        )
        ax.legend(
            [*handles.values(), oracle],
            [*labels, "oracle (errors removed first)"],
            loc="center left",
            bbox_to_anchor=(1.02, 0.5),
            ncol=math.ceil((len(labels) + 1) / 18),
        )
        return _png(fig)


def significant_digits(values: Sequence[float | None], least: int = 3, most: int = 7) -> int:
    """Significant digits that tell the shown values apart: 3 normally, more when they differ only far
    down (VI-SimSiam's 1/κ is 0.00196 for every image at 3 digits; the ranking lives in the 5th)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v)]
    if len(finite) < 2 or max(finite) == 0:
        return least
    spread = (max(finite) - min(finite)) / max(finite)
    if spread == 0:
        return least
    return int(min(most, max(least, math.ceil(-math.log10(spread)) + 2)))
