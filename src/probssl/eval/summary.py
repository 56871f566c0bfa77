"""The few numbers ``probssl eval`` ends with: accuracy, calibration and how good the uncertainty is.

The summary reads only ``eval.json`` keys, so it works for any run and any version of the suite:

- ``kNN``, ``linear`` (top-1), ``ECE``, ``NLL`` of the marginalised linear probe;
- per OOD set, the AUROC of the best *feature-space* detector that was computed (any
  ``ood/<set>/<score>/auroc`` whose score is neither the probe's output nor the embedding's own) and
  of the method's own uncertainty (``ood/<set>/emb/auroc``);
- error AUROC of the probe's predictive entropy (``sel/err_auroc``) and of the method's own
  uncertainty (``sel/emb/err_auroc``).

A metric a run does not have (a deterministic method has no ``emb`` score; an old run has no
feature-space detector) is printed ``n/a``: a made-up 0.5 would read as "measured, and at chance".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

NOT_AVAILABLE = "n/a"

# Scores computed from the linear probe's outputs, and the embedding's own uncertainty: everything else
# under ood/<set>/<score>/auroc is a detector on the features themselves (kNN distance, Mahalanobis, ...).
PROBE_SCORES = frozenset({"msp", "entropy", "mi", "energy", "maxlogit"})
OWN_SCORE = "emb"

_OOD_AUROC = re.compile(r"ood/(?P<set>[^/]+)/(?P<score>[^/]+)/auroc")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def ood_sets(results: Mapping[str, Any]) -> list[str]:
    """OOD set names in the order their keys first appear."""
    names: dict[str, None] = {}
    for key in results:
        match = _OOD_AUROC.fullmatch(key)
        if match:
            names.setdefault(match["set"], None)
    return list(names)


def best_feature_detector(results: Mapping[str, Any], ood_set: str) -> tuple[str, float] | None:
    """(score name, AUROC) of the best feature-space detector on ``ood_set``, or None when none exists."""
    best: tuple[str, float] | None = None
    for key, value in results.items():
        match = _OOD_AUROC.fullmatch(key)
        if not match or match["set"] != ood_set or match["score"] in PROBE_SCORES | {OWN_SCORE}:
            continue
        auroc = _number(value)
        if auroc is not None and (best is None or auroc > best[1]):
            best = (match["score"], auroc)
    return best


def summary_columns(results: Mapping[str, Any]) -> list[tuple[str, float | None]]:
    """(column label, value or None) in display order."""
    columns: list[tuple[str, float | None]] = [
        ("kNN", _number(results.get("knn/top1"))),
        ("linear", _number(results.get("linear/top1"))),
        ("ECE", _number(results.get("cal/ece15"))),
        ("NLL", _number(results.get("linear/nll"))),
    ]
    for name in ood_sets(results):
        best = best_feature_detector(results, name)
        columns.append((f"OOD {name} best", None if best is None else best[1]))
        columns.append((f"OOD {name} own", _number(results.get(f"ood/{name}/{OWN_SCORE}/auroc"))))
    columns.append(("err-AUROC", _number(results.get("sel/err_auroc"))))
    columns.append(("err-AUROC own", _number(results.get(f"sel/{OWN_SCORE}/err_auroc"))))
    return columns


def format_summary(results: Mapping[str, Any]) -> str:
    """A two-line table (labels, values) plus a line naming the best detector per OOD set."""
    columns = summary_columns(results)
    cells = [NOT_AVAILABLE if value is None else f"{value:.4f}" for _, value in columns]
    widths = [max(len(label), len(cell)) for (label, _), cell in zip(columns, cells, strict=True)]
    lines = [
        "  ".join(label.ljust(w) for (label, _), w in zip(columns, widths, strict=True)).rstrip(),
        "  ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)).rstrip(),
    ]
    notes = []
    for name in ood_sets(results):
        best = best_feature_detector(results, name)
        if best is not None:
            notes.append(f"{name}: {best[0]}")
    if notes:
        lines.append("best feature-space detector: " + ", ".join(notes))
    lines.append("own = the method's own uncertainty; best = best feature-space detector; n/a = not defined")
    return "\n".join(lines)
