"""A suite's results as tables: per-run derived numbers, seed summaries, comparisons, markdown.

Everything here reads finished runs (``eval.json``, ``train_summary.json``) and never trains: the
numbers the readings in BENCHMARKS.md rest on — seed means ± std, differences paired inside a run
(own uncertainty against the deterministic reference detector), each probabilistic arm against its
deterministic base, evaluation cost, and where the runs trained.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probssl.bench.catalogue import PAPER_PROTOCOL, QualityArm, Suite
from probssl.results import (
    format_mean_std,
    numeric,
    partial_note,
    read_eval,
    summarise_values,
    supervision_mark,
    training_keys,
)


def paired_comparisons(run: dict[str, Any]) -> dict[str, float]:
    """The differences the readings are about, paired within one run (same features, same test set):

    - ``vs/ood/<set>/own-knn1``: AUROC of the method's own uncertainty minus that of the pre-declared
      deterministic feature-space detector (``REFERENCE_DETECTOR``, kNN distance) — does the
      probabilistic embedding beat a strong deterministic detector on the same features?
    - ``vs/ood/<set>/mi-knn1``: the same for the mutual information of the posterior-averaged probe,
      the epistemic score the sample-based papers (cSGHMC, ensembles, LAM) report beside the embedding's
      spread.
    - ``vs/ood/<set>/bma-knn1``: the same detector averaged over posterior draws minus it on the point
      estimate — does the posterior help a strong detector?
    - ``vs/sel/own-knn1`` and ``vs/sel/own-entropy``: error-ranking AUROC of the own uncertainty minus
      the kNN distance's and minus the probe's predictive entropy's.
    - ``vs/ood/<set>/own_in_combined``: the combined detector's AUROC minus that of the same rule without
      the method's own p-value (``combined_features``) — does the own uncertainty add power to the
      combination? (Runs with an own uncertainty only.)
    - ``vs/ood/<set>/combined-best_single``: the combined detector's AUROC minus the best single
      detector's of the same run, chosen *afterwards* over every ``ood/<set>/<detector>/auroc`` — what
      declaring the rule in advance costs against an oracle choice (issue 29's robustness goal).

    Averaging paired differences over seeds (rather than subtracting two seed means) keeps the seed-
    to-seed spread that both scores share out of the comparison's ± std. A difference exists only when
    both of its scores do.
    """
    from probssl.eval.suite import REFERENCE_DETECTOR as ref

    pairs = {
        f"vs/sel/own-{ref}": ("sel/emb/err_auroc", f"sel/{ref}/err_auroc"),
        "vs/sel/own-entropy": ("sel/emb/err_auroc", "sel/err_auroc"),
    }
    for key in run:
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "ood" and parts[2:] == ["emb", "auroc"]:
            name = parts[1]
            pairs[f"vs/ood/{name}/own-{ref}"] = (key, f"ood/{name}/{ref}/auroc")
            pairs[f"vs/ood/{name}/bma-{ref}"] = (f"ood/{name}/{ref}_bma/auroc", f"ood/{name}/{ref}/auroc")
        if len(parts) == 4 and parts[0] == "ood" and parts[2:] == ["mi", "auroc"]:
            pairs[f"vs/ood/{parts[1]}/mi-{ref}"] = (key, f"ood/{parts[1]}/{ref}/auroc")
        own = len(parts) == 4 and f"ood/{parts[1]}/emb/auroc" in run  # a method with its own uncertainty
        if own and parts[0] == "ood" and parts[2:] == ["combined", "auroc"]:
            pairs[f"vs/ood/{parts[1]}/own_in_combined"] = (key, f"ood/{parts[1]}/combined_features/auroc")
    numbers = {k: v for k, v in run.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    differences = {
        key: numbers[a] - numbers[b] for key, (a, b) in pairs.items() if a in numbers and b in numbers
    }
    return differences | _combined_against_best_single(numbers)


#: ``ood/<set>/<name>/auroc`` keys that are not single detectors: the combinations and the alias of the
#: pre-declared reference (``best_feature`` repeats ``knn1``).
_NOT_SINGLE = ("combined", "combined_features", "best_feature")


def _combined_against_best_single(numbers: dict[str, float]) -> dict[str, float]:
    """``vs/ood/<set>/combined-best_single`` for every OOD set with a combined detector."""
    best: dict[str, float] = {}
    for key, value in numbers.items():
        parts = key.split("/")
        if len(parts) == 4 and parts[0] == "ood" and parts[3] == "auroc" and parts[2] not in _NOT_SINGLE:
            best[parts[1]] = max(best.get(parts[1], value), value)
    return {
        f"vs/ood/{name}/combined-best_single": numbers[f"ood/{name}/combined/auroc"] - top
        for name, top in best.items()
        if f"ood/{name}/combined/auroc" in numbers
    }


def uncertainty_trends(run: dict[str, Any]) -> dict[str, float]:
    """Does an uncertainty move the way the papers say it does? Spearman correlations over five points:

    - ``trend/acc_by_own_unc``: accuracy of the probe across the five equal-count bins of the method's
      own uncertainty, most to least certain (``sel/emb/acc_by_quantile``); −1 = accuracy falls
      monotonically as the uncertainty rises (VI-SimSiam: "accuracy rises over κ-quantile bins").
    - ``trend/acc_by_entropy``: the same for the probe's predictive entropy (``sel/acc_by_quantile``),
      the reference every method has.
    - ``trend/own_unc_by_severity``: the mean own uncertainty over corruption severities 1–5 (averaged
      over corruptions); +1 = it rises monotonically as the images degrade (VI-SimSiam: "κ falls as
      corruption strength rises"; the other papers' uncertainty-under-shift plots).
    - ``trend/own_unc_rise``: its relative size, severity 5 over severity 1 minus 1 — a perfectly
      monotone rise of 0.1% is not an uncertainty anyone can use.

    Five points give a coarse correlation (steps of 0.1); the seed spread in the tables says how stable
    it is. scipy's ``spearmanr`` (average ranks for ties) does the ranking; a constant sequence has no
    rank correlation and yields no key. "Constant" and "tied" are exact equality: the quantile bins are
    exact fractions rounded once (``eval.selective.accuracy_by_quantile``), so equal bins — all five
    for a constant uncertainty — are equal floats, and no tolerance is needed (or wanted: a tolerance
    would also merge bins that truly differ).
    """
    from scipy.stats import spearmanr

    from probssl.eval.suite import SEVERITIES

    out: dict[str, float] = {}

    def trend(key: str, values: Sequence[Any]) -> None:
        if len(values) < 3 or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
            return
        if len(set(values)) > 1:
            out[key] = float(spearmanr(range(len(values)), values).statistic)

    trend("trend/acc_by_own_unc", run.get("sel/emb/acc_by_quantile") or [])
    trend("trend/acc_by_entropy", run.get("sel/acc_by_quantile") or [])
    by_severity = [run.get(f"shift/severity{s}/emb_uncertainty") for s in SEVERITIES]
    trend("trend/own_unc_by_severity", by_severity)
    first, last = by_severity[0], by_severity[-1]
    if isinstance(first, int | float) and isinstance(last, int | float) and first > 0:
        out["trend/own_unc_rise"] = last / first - 1.0
    return out


def evaluation_cpu(run: dict[str, Any]) -> dict[str, float]:
    """``meta/eval_cpu_seconds`` (the stages' CPU seconds summed) and ``meta/eval_cpu_to_train`` (over the
    training wall, like ``meta/eval_to_train``; absent when training took < 1 s). The wall ratio counts
    the waits for cores other jobs hold; on a shared machine the CPU ratio is the comparable one."""
    stages = [
        v for k, v in run.items() if k.startswith("meta/eval_cpu_seconds/") and isinstance(v, int | float)
    ]
    if not stages:
        return {}
    out = {"meta/eval_cpu_seconds": float(sum(stages))}
    train = run.get("meta/train_seconds")
    if isinstance(train, int | float) and train >= 1.0:
        out["meta/eval_cpu_to_train"] = out["meta/eval_cpu_seconds"] / train
    return out


def load_run_results(run_dir: Path) -> dict[str, Any]:
    """A finished run's eval.json, the numbers derived from it here (paired comparisons, evaluation CPU,
    trends) and where it trained (:func:`probssl.results.training_keys`)."""
    results = read_eval(run_dir)
    results.update(paired_comparisons(results))
    results.update(evaluation_cpu(results))
    results.update(uncertainty_trends(results))
    results.update(training_keys(run_dir))
    return results


def training_note(runs: dict[str, dict[Any, dict[str, Any]]]) -> str:
    """One line under a suite's tables: the precision and processor its runs trained at, and — when
    they differ — which runs are the exceptions, so no one compares a bf16 row with an fp32 one (or
    seconds across machines) unawares."""
    where = {
        f"{arm}-s{seed}": (
            str(run.get("meta/train_precision", "precision not recorded")),
            str(run.get("meta/train_processor", "processor not recorded")),
        )
        for arm, by_seed in runs.items()
        for seed, run in by_seed.items()
    }
    if not where:
        return ""
    groups = Counter(where.values()).most_common()
    if len(groups) == 1:
        (precision, processor), count = groups[0]
        return f"Trained: all {count} runs at {precision} on {processor}."
    (precision, processor), count = groups[0]
    parts = [f"{count} runs at {precision} on {processor}"]
    for (precision, processor), count in groups[1:]:
        names = ", ".join(name for name, group in where.items() if group == (precision, processor))
        parts.append(f"{count} at {precision} on {processor} ({names})")
    return (
        "**Trained on mixed machines or precisions** (compare accuracy across them with care, seconds "
        "not at all): " + "; ".join(parts) + "."
    )


def summarise(runs: dict[str, dict[int, dict[str, Any]]], columns: Sequence[str]) -> dict[str, Any]:
    """Mean, sample std and count per arm and column over the seeds that have the metric."""
    table: dict[str, Any] = {}
    for arm, by_seed in runs.items():
        cells = {}
        for col in columns:
            summary = summarise_values(r[col] for r in by_seed.values() if numeric(r.get(col)))
            if summary is not None:
                cells[col] = summary.as_dict()
        table[arm] = cells
    return table


@dataclass(frozen=True)
class BaseComparison:
    """One column of the against-base table: the arm's ``arm_key`` against its base's ``base_key``."""

    label: str
    arm_key: str
    base_key: str

    @classmethod
    def same(cls, key: str) -> BaseComparison:
        return cls(key, key, key)


#: What each paper claims its posterior improves, measured against the arm's deterministic base:
#: accuracy (probe, kNN, corruptions) and calibration of the probe.
AGAINST_BASE = tuple(
    BaseComparison.same(key)
    for key in ("linear/top1", "knn/top1@20", "shift/mean/acc", "cal/ece15", "cal/nll")
)


def against_base(
    summary: dict[str, dict[str, dict[str, float]]],
    arms: Sequence[QualityArm],
    columns: Sequence[BaseComparison],
) -> dict[str, dict[str, dict[str, float]]]:
    """Per arm with a base: (arm's seed mean of ``arm_key`` − base's seed mean of ``base_key``) and its
    standard error √(s²_arm/n_arm + s²_base/n_base) for each column both sides have (Welch's; the two arms
    are different runs, so unlike the ``vs/`` table nothing pairs them). A column measured on one seed
    of either side has no standard error (``se`` None): one seed has no spread to estimate.
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    for arm in arms:
        if arm.base is None or arm.name not in summary or arm.base not in summary:
            continue
        cells = {}
        for col in columns:
            a, b = summary[arm.name].get(col.arm_key), summary[arm.base].get(col.base_key)
            if a is None or b is None:
                continue
            se = None
            if a["n"] > 1 and b["n"] > 1:
                se = (a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]) ** 0.5
            cells[col.label] = {"diff": a["mean"] - b["mean"], "se": se}
        out[arm.name] = cells
    return out


def base_ood_columns(suite: Suite) -> tuple[BaseComparison, ...]:
    """The against-base OOD columns per OOD set: the probe's MSP and the reference feature detector
    (``best_feature``, the pre-declared ``knn1``) on each side's own features — does the posterior make
    the features a better detector? — and the arm's own uncertainty against the *base's* reference
    detector: is training the probabilistic method worth it for OOD, or does the deterministic base
    with a kNN detector do as well? (The ``vs/`` table compares own and ``knn1`` inside one run.)"""
    out: list[BaseComparison] = []
    for name in suite.ood:
        reference = f"ood/{name}/best_feature/auroc"
        out += [
            BaseComparison.same(f"ood/{name}/msp/auroc"),
            BaseComparison.same(reference),
            BaseComparison(f"ood/{name}/own-base_best_feature", f"ood/{name}/emb/auroc", reference),
        ]
    return tuple(out)


def against_base_markdown(table: dict[str, dict[str, dict[str, float]]], bases: dict[str, str]) -> str:
    """The against-base table: ``+0.0123 ± 0.0040`` = difference of seed means ± its standard error."""
    present = list(dict.fromkeys(k for cells in table.values() for k in cells))
    if not present:
        return ""
    lines = [
        "**Against its deterministic base (arm − base: difference of seed means ± its standard error; "
        "ECE and NLL: < 0 is better; `own-base_best_feature`: the arm's own uncertainty against the "
        "base's reference detector)**\n",
        "| arm | base | " + " | ".join(present) + " |",
        "|" + "---|" * (len(present) + 2),
    ]
    for arm, cells in table.items():
        row = []
        for col in present:
            cell = cells.get(col)
            if cell is None:
                row.append("–")
                continue
            row.append(format_mean_std(cell["diff"], cell["se"], signed=True))
        lines.append(f"| {arm} | {bases[arm]} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _cell(cell: dict[str, Any] | None, seeds: int) -> str:
    if cell is None:
        return "–"
    spread = cell["std"] if cell["n"] > 1 else None  # one seed has no spread, not 0
    return format_mean_std(cell["mean"], spread) + partial_note(cell["n"], seeds)


def arm_supervision_mark(by_seed: dict[Any, dict[str, Any]]) -> str:
    """The arm's mark when any of its runs trained on class labels (``probssl.results.supervision_mark``)."""
    return next((mark for run in by_seed.values() if (mark := supervision_mark(run))), "")


def results_markdown(results: dict[str, Any]) -> str:
    """The suite's tables (``results['tables']``: accuracy, uncertainty, OOD) as markdown.

    A column no arm has (e.g. a transfer set whose files are missing) is left out; results saved
    before the tables were split have one table of ``results['columns']``.
    """
    tables = results.get("tables") or [("", results["columns"])]
    blocks = []
    for title, columns in tables:
        present = [c for c in columns if any(c in cells for cells in results["summary"].values())]
        if not present:
            continue
        head = ["arm", "seeds", *present]
        lines = [f"**{title}**\n"] if title else []
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm, cells in results["summary"].items():
            if not any(c in cells for c in present):
                continue  # a deterministic arm in the own-uncertainty table: dashes say nothing
            seeds = len(results["runs"].get(arm, {}))
            label = arm + arm_supervision_mark(results["runs"].get(arm, {}))
            lines.append(
                "| " + " | ".join([label, str(seeds), *(_cell(cells.get(c), seeds) for c in present)]) + " |"
            )
        blocks.append("\n".join(lines))
    versus_base = against_base_markdown(results.get("against_base", {}), results.get("bases", {}))
    if versus_base:  # before the cost table, which closes the list
        cost = [i for i, block in enumerate(blocks) if block.startswith("**Cost")]
        blocks.insert(cost[0] if cost else len(blocks), versus_base)
    text = "\n\n".join(blocks)
    note = training_note(results.get("runs", {}))
    if note:
        text += f"\n\n{note}"
    for arm, message in results.get("failures", {}).items():
        text += f"\n\n**{arm} failed**: {message}"
    return text


def paper_markdown(suite: Suite, summary: dict[str, Any], runs: dict[str, dict[int, dict[str, Any]]]) -> str:
    """The suite's figures beside the authors' (``Suite.paper``): ours as mean ± std over seeds, the
    difference, and what the metric measures in their protocol and ours (``PAPER_PROTOCOL``)."""
    lines = [
        "**Against the authors' figures**\n",
        "| metric | arm | authors | ours | ours − authors | what it measures |",
        "|---|---|---|---|---|---|",
    ]
    for key, arm, value in suite.paper:
        cell = summary.get(arm, {}).get(key)
        ours = "–" if cell is None else f"{format_mean_std(cell['mean'], cell['std'])} (n={cell['n']})"
        diff = "–" if cell is None else f"{cell['mean'] - value:+.4f}"
        label = arm + arm_supervision_mark(runs.get(arm, {}))
        lines.append(f"| {key} | {label} | {value:.2f} | {ours} | {diff} | {PAPER_PROTOCOL.get(key, '')} |")
    return "\n".join(lines)
