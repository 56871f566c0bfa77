"""The few numbers ``probssl eval`` ends with: accuracy, calibration and how good the uncertainty is.

The summary reads only ``eval.json`` keys, so it works for any run and any version of the suite:

- ``kNN``, ``linear`` (top-1), ``ECE``, ``NLL`` of the marginalised linear probe;
- per OOD set, the AUROC of the combined detector (``ood/<set>/combined/auroc``: conformal p-values
  of four feature-space detectors and the method's own uncertainty, Tippett's minimum, declared in
  docs/methods.md §5 before any of its numbers), of the reference *feature-space* detector kept for
  continuity (``ood/<set>/best_feature/``: ``knn1``, the kNN distance, see
  :data:`probssl.eval.suite.REFERENCE_DETECTOR` — never the maximum over detectors on the OOD set
  itself, which would flatter the baseline) and of the method's own uncertainty (``ood/<set>/emb/auroc``);
- the realized false-positive rate of flagging in-distribution test images at p < 0.05
  (``ood/id/combined/fpr@0.05``: valid p-values keep it near 0.05);
- error AUROC of the probe's predictive entropy (``sel/err_auroc``) and of the method's own
  uncertainty (``sel/emb/err_auroc``), and the ECE of ``reliability`` (``sel/reliability/ece``).

A metric a run does not have (a deterministic method has no ``emb`` score; an old run has no
feature-space detector) is printed ``n/a``: a made-up 0.5 would read as "measured, and at chance".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

NOT_AVAILABLE = "n/a"

OWN_SCORE = "emb"
COMBINED = "combined"  # probssl.eval.conformal.COMBINED (not imported: the summary reads keys only)
REFERENCE = "best_feature"  # the pre-declared feature-space detector's keys: ood/<set>/best_feature/...
GROUP_NAMES = frozenset({"near", "far"})  # ood/near/..., ood/far/... are group means, not sets

_OOD_AUROC = re.compile(r"ood/(?P<set>[^/]+)/(?P<score>[^/]+)/auroc")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def ood_sets(results: Mapping[str, Any]) -> list[str]:
    """OOD set names in the order their keys first appear (the near / far group means excluded)."""
    names: dict[str, None] = {}
    for key in results:
        match = _OOD_AUROC.fullmatch(key)
        if match and match["set"] not in GROUP_NAMES:
            names.setdefault(match["set"], None)
    return list(names)


def best_feature_detector(results: Mapping[str, Any], ood_set: str) -> tuple[str, float] | None:
    """(detector name, AUROC) of the reference feature-space detector on ``ood_set``, or None when the
    run has none (an evaluation from before the detectors existed)."""
    auroc = _number(results.get(f"ood/{ood_set}/{REFERENCE}/auroc"))
    if auroc is None:
        return None
    return str(results.get(f"ood/{ood_set}/{REFERENCE}/detector", "knn1")), auroc


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
        columns.append((f"OOD {name} comb", _number(results.get(f"ood/{name}/{COMBINED}/auroc"))))
        # the pre-declared feature detector of issue 19, named as what it is (knn1), kept for continuity
        columns.append((f"OOD {name} {best[0] if best else 'knn1'}", None if best is None else best[1]))
        columns.append((f"OOD {name} own", _number(results.get(f"ood/{name}/{OWN_SCORE}/auroc"))))
    columns.append(("FPR@.05", _number(results.get(f"ood/id/{COMBINED}/fpr@0.05"))))
    columns.append(("err-AUROC", _number(results.get("sel/err_auroc"))))
    columns.append(("err-AUROC own", _number(results.get(f"sel/{OWN_SCORE}/err_auroc"))))
    columns.append(("rel-ECE", _number(results.get("sel/reliability/ece"))))
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
        lines.append("feature-space reference detector: " + ", ".join(notes))
    lines.append(
        "comb = the combined detector (conformal p-values, docs/methods.md §5); FPR@.05 = share of "
        "in-distribution test images it flags at p < 0.05; own = the method's own uncertainty; knn1 = "
        "the earlier reference detector (cosine distance to the nearest training feature); rel-ECE = "
        "calibration of `reliability`; n/a = not defined"
    )
    return "\n".join(lines)
