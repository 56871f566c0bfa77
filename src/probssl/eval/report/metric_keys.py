"""The report's reading of eval.json keys: which keys are metrics, which direction is better, how a
number reads in a cell, and which columns a table shows.

Tables are built, not typed: columns are whatever metric keys any run has, grouped by prefix; the
direction of "better" comes from the metric's name (ECE, NLL, Brier, FPR95, AURC ... are lower-better).
A metric a run does not have is shown "n/a", never as a number; a number reads as in every other table
(:mod:`probssl.results.numbers`). The HTML around them is :mod:`.tables`.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from probssl.eval.ood_groups import ood_group
from probssl.eval.summary import GROUP_NAMES, NOT_AVAILABLE, best_feature_detector, ood_sets
from probssl.results import format_number, numeric

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


def _group_of(key: str) -> str:
    prefix = key.split("/", 1)[0]
    return prefix if any(prefix == g for g, _ in GROUPS) else _OTHER_GROUP[0]


# Per-criterion OOD keys (ood/<set>/<criterion>/<metric>) would add 16 columns per set: the table keeps
# their AUROC only; every value stays in eval.json.
_OOD_CRITERION_KEY = re.compile(r"ood/[^/]+/[^/]+/(?!auroc$)[^/]+")


def _is_metric(key: str, value: Any) -> bool:
    descriptive = key.startswith(_DESCRIPTIVE_PREFIXES) or key in _DESCRIPTIVE_KEYS
    return numeric(value) and not descriptive and "/" in key and not _OOD_CRITERION_KEY.fullmatch(key)


_SHIFT_KEY = re.compile(r"shift/(?P<name>[^/]+)/(?P<severity>\d+)/(?P<metric>[^/]+)")


def _shift_points(metrics: Mapping[str, Any]) -> dict[str, dict[str, dict[int, float]]]:
    """``shift/<corruption>/<severity>/<metric>`` keys as {corruption: {metric: {severity: value}}}."""
    points: dict[str, dict[str, dict[int, float]]] = {}
    for key, value in metrics.items():
        match = _SHIFT_KEY.fullmatch(key)
        if match and numeric(value):
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


_OOD_ALIAS_KEY = re.compile(r"ood/(?P<set>[^/]+)/(auroc|aupr_in|aupr_out|fpr95)")


def ood_group_sizes(metrics: Mapping[str, Any]) -> dict[str, int]:
    """How many OOD sets each near / far group mean of a run averages: from ``ood/<group>/sets`` (the
    sets eval.json says it averaged), else (an evaluation from before that key) the run's OOD sets that
    :func:`probssl.eval.ood_groups.ood_group` puts in the group."""
    dataset = metrics.get("config/data.dataset", metrics.get("meta/dataset"))
    sizes = {}
    for group in sorted(GROUP_NAMES):
        named = metrics.get(f"ood/{group}/sets")
        if isinstance(named, str):
            sizes[group] = len([name for name in named.split(",") if name.strip()])
        elif isinstance(dataset, str):
            sizes[group] = sum(ood_group(dataset, name) == group for name in ood_sets(metrics))
    return sizes


def _table_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics shown in the main table: per-severity shift keys become their means.

    OOD columns always name their score: ``ood/<set>/auroc`` (an alias of the MSP criterion) is left
    out when the per-score keys are there, so a table AUROC and a histogram's AUROC of the same name
    are the same number; ``ood/<set>/best_feature/auroc`` is the pre-declared feature-space detector's.
    A near / far group mean over a single OOD set is left out too: it repeats that set's columns (the
    bench tables show a group only when it holds two or more sets, for the same reason).
    """
    summary = shift_summary(metrics)
    table = {k: float(v) for k, v in metrics.items() if _is_metric(k, v) and not _SHIFT_KEY.fullmatch(k)}
    for key in list(table):
        alias = _OOD_ALIAS_KEY.fullmatch(key)
        if alias and f"ood/{alias['set']}/msp/auroc" in metrics:
            del table[key]
    for group, size in ood_group_sizes(metrics).items():
        if size < 2:
            for key in [k for k in table if k.startswith(f"ood/{group}/")]:
                del table[key]
    for name in ood_sets(metrics):
        best = best_feature_detector(metrics, name)
        if best is not None:
            table[f"ood/{name}/best_feature/auroc"] = best[1]
    table.update({k: v for k, v in summary.items() if k.startswith("shift/mean/")})
    return table


#: The columns a reader looks for first (the BENCHMARKS.md suite tables' choice): accuracy, calibration,
#: corruptions, low-shot and transfer, error ranking, retrieval, and per OOD set (or near / far group) the
#: probe's MSP, the reference feature detector, the method's own uncertainty and the posterior's MI.
_HEADLINE_KEY = re.compile(
    r"knn/top1@20|linear/top1|cal/(ece15|nll|brier)|shift/mean/acc|lowshot/[^/]+/top1|transfer/[^/]+/top1"
    r"|sel/(err_auroc|emb/err_auroc|crop_up)|ret/(recall@1|map@r|r_auroc)"
    r"|ood/[^/]+/(msp|best_feature|emb|mi)/auroc|code/.+|compress/.+"
)


def headline_metrics(row: Mapping[str, float]) -> dict[str, float]:
    """The headline columns of a metric row (``_HEADLINE_KEY``); the page folds the rest below them."""
    return {key: value for key, value in row.items() if _HEADLINE_KEY.fullmatch(key)}


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
    """Indices of the best finite value(s) as shown (two cells that both read 1.0000 are both best or
    neither); none when there is no direction or fewer than two values."""
    finite = [(i, _shown(v)) for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    if direction is None or len(finite) < 2:
        return set()
    pick = max if direction == "higher" else min
    best = pick(v for _, v in finite)
    if all(math.isclose(v, best, rel_tol=1e-12, abs_tol=1e-15) for _, v in finite):
        return set()  # a tie across every run highlights nothing
    return {i for i, v in finite if math.isclose(v, best, rel_tol=1e-12, abs_tol=1e-15)}


def _shown(value: float) -> float:
    """``value`` rounded as its cell shows it."""
    return float(format_number(value))


def _format_number(value: Any) -> str:
    """A cell's number as every table writes it (:func:`probssl.results.format_number`), escaped text
    for anything else, "n/a" for a metric the run lacks."""
    if value is None:
        return NOT_AVAILABLE
    if not numeric(value):
        return html.escape(str(value))
    return format_number(value)
