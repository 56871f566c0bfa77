"""The report's figures, each a PNG data URI: reliability diagrams, OOD score histograms, accuracy under
corruption, sparsification curves, test images ranked by uncertainty.

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
import matplotlib.patches
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from probssl.eval.report.runs import Run
from probssl.eval.report.tables import _is_number, _shift_points

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
    if not _is_number(ece):
        total = d["count"].sum()
        ok = ~np.isnan(d["acc"])
        ece = float((d["count"][ok] * np.abs(d["acc"][ok] - d["conf"][ok])).sum() / total) if total else None
    return _wrapped(run.name, *([f"ECE = {ece:.4f}"] if ece is not None else []), width=30)


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
                "auroc": float(table_value) if _is_number(table_value) else _auroc(score_in, score_out),
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
        return _png(fig)


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
    if _is_number(ausc) and _is_number(oracle):
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


def _ranked_data(run: Run, key: str = "ranked_images") -> dict[str, Any] | None:
    """The ranked test images of eval_details ``key``: ``ranked_images`` (by the probe's predictive
    entropy, every run) or ``ranked_images_own`` (by the embedding's own uncertainty, where it has one)."""
    section = run.details.get(key)
    if not section:
        return None
    shape = tuple(int(s) for s in section["shape"])
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"ranked_images shape must be [C, H, W] with C in (1, 3), got {list(shape)}")
    rows: dict[str, Any] = {}
    for key in ("most_certain", "least_certain"):
        images = [_to_hwc(image, shape) for image in section.get(key) or []]
        end = key.split("_")[0]

        def column(name: str, cast: Callable[[Any], Any], count: int = len(images), end: str = end) -> list:
            values = [None if v is None else cast(v) for v in section.get(f"{name}_{end}") or []]
            return (values + [None] * count)[:count]

        rows[key] = list(
            zip(
                images,
                column("uncertainty", float),
                column("label", int),
                column("prediction", int),
                strict=True,
            )
        )
    if not any(rows.values()):
        return None
    rows["criterion"] = str(section.get("criterion", ""))
    rows["classes"] = [str(name) for name in section.get("classes") or []]
    return rows


def _class_name(index: int | None, classes: Sequence[str], width: int = 11) -> str:
    """A label as the reader knows it: the class name (cut to ``width``) when the run recorded names,
    else the class number; ``?`` when unknown."""
    if index is None:
        return "?"
    if 0 <= index < len(classes):
        name = classes[index]
        return name if len(name) <= width else name[: width - 1] + "…"
    return str(index)


def _ranked_own_data(run: Run) -> dict[str, Any] | None:
    return _ranked_data(run, "ranked_images_own")


def _to_hwc(image: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """A flat (or nested) CHW pixel list as an HWC float array in [0, 1] for ``imshow``."""
    array = np.asarray(image, dtype=float).reshape(shape)
    scale = 1.0 if array.max(initial=0) <= 1.0 else 255.0
    return np.clip(array / scale, 0, 1).transpose(1, 2, 0)


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


def _ranked_figure(run: Run, rows: Mapping[str, Any]) -> str:
    """Two rows of test images; under each: label y, the probe's prediction ŷ (red when wrong) and
    the uncertainty the rows are ranked by."""
    n = max(len(rows.get(key, [])) for key in ("most_certain", "least_certain"))
    digits = significant_digits(
        [value for key in ("most_certain", "least_certain") for _, value, _, _ in rows.get(key, [])]
    )
    with _styled():
        fig = Figure(figsize=(0.95 * n + 1.3, 3.6 if rows.get("classes") else 3.3))
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
                image, value, label_, prediction = rows[key][c]
                grey = image.shape[-1] == 1
                ax.imshow(
                    image[..., 0] if grey else image,
                    cmap="gray" if grey else None,
                    vmin=0,
                    vmax=1,
                    interpolation="nearest",
                )
                text = "n/a" if value is None else f"{value:.{digits}g}"
                wrong = label_ is not None and prediction is not None and label_ != prediction
                if label_ is not None or prediction is not None:
                    y, y_hat = (_class_name(i, rows.get("classes") or []) for i in (label_, prediction))
                    text = f"y {y}\nŷ {y_hat}\n{text}" if rows.get("classes") else f"y={y} ŷ={y_hat}\n{text}"
                ax.set_xlabel(text, fontsize=7.5, labelpad=2, color="#d23c4b" if wrong else "#1d2330")
            axes[r, 0].set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center", labelpad=8)
        if rows.get("criterion"):
            fig.suptitle(
                f"ranked by {rows['criterion']} · y = label, ŷ = prediction (red: wrong)", fontsize=8.5
            )
        fig.subplots_adjust(wspace=0.12, hspace=0.85 if rows.get("classes") else 0.75)
        return _png(fig)


# ----------------------------------------------------------------------------------------------- page
