"""``probssl bench SUITE``: every method at one fixed budget per suite, evaluated with the full suite.

A suite is a budget (the training config every arm shares), an OOD pair and a list of arms (a
registered method plus overrides: the five probabilistic methods, their deterministic baselines,
and the retrieval baselines of LAM). For each arm and seed the harness trains
``OUT/SUITE/<arm>-s<seed>`` (resuming an interrupted run, skipping a finished one), evaluates it
with ``--suite full``, and writes ``OUT/SUITE/results.json`` (per-run metrics, mean ± std per arm,
the protocol, commit, date and machine), ``results.md`` and ``report.html``. ``--update FILE``
regenerates the suite's section of ``BENCHMARKS.md`` from those results. The tables are split by
question (``Suite.tables``: accuracy, uncertainty, OOD detection) so each stays readable; an arm
may be capped at fewer seeds (``Suite.max_seeds``: the 5-member LAM ensemble on CIFAR-10).
``probssl bench SUITE --curve`` (:mod:`probssl.bench.curve`) is one arm's learning curve. The arms,
suites and budgets are :mod:`probssl.bench.catalogue`; this module runs them. The tables are built
from the finished runs by :mod:`probssl.bench.tables`; one process per run is ensured by
:mod:`probssl.run_lock`; ``--status`` (:mod:`probssl.bench.status`) reads where a suite stands.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from probssl.bench.catalogue import SUITES, QualityArm, Suite, resolve_arms, run_dir_for
from probssl.bench.provenance import provenance
from probssl.bench.sections import replace_section
from probssl.bench.tables import (
    AGAINST_BASE,
    against_base,
    base_ood_columns,
    load_run_results,
    paper_markdown,
    results_markdown,
    summarise,
)
from probssl.config import ConfigError, build_config
from probssl.io import atomic_write_json, atomic_write_text
from probssl.results import split_seed
from probssl.run_lock import RunBusy, run_lock


def _arm_config(suite: Suite, arm: QualityArm, seed: int, data_dir: str | None):
    budget = copy.deepcopy(suite.budget)
    budget["method"] = arm.method
    budget["train"] = {**budget["train"], "seed": seed, "progress": False}
    if suite.keep_every_epoch:
        budget["train"]["keep_checkpoints"] = budget["train"]["epochs"]
    if data_dir:
        budget["data"] = {**budget["data"], "data_dir": data_dir}
    return build_config(None, list(arm.overrides), **budget)


def train_and_evaluate(
    suite: Suite, arm: QualityArm, seed: int, out: Path, data_dir: str | None, progress: bool
) -> dict[str, Any]:
    """One run of the suite: train (resume / skip), evaluate (skip when eval.json exists), load metrics."""
    from probssl.eval.evaluate import evaluate_run
    from probssl.train import train

    run_dir = run_dir_for(out, suite.name, arm.name, seed)
    eval_path = run_dir / "eval.json"
    if eval_path.is_file():
        return load_run_results(run_dir)
    cfg = _arm_config(suite, arm, seed, data_dir)
    cfg.train.progress = progress
    with run_lock(run_dir):
        if not (run_dir / "model.safetensors").is_file():
            resume = (run_dir / "config.yaml").is_file()
            train(cfg, run_dir, resume=resume)
        if not eval_path.is_file():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # skipped optional sets are recorded in meta/skipped
                evaluate_run(run_dir, data_dir=data_dir, progress=progress, suite_name="full")
    return load_run_results(run_dir)


def run_quality_benchmark(
    suite_name: str,
    out: str | Path,
    seeds: int = 3,
    data_dir: str | None = None,
    only: Sequence[str] | None = None,
    update: str | Path | None = None,
    progress: bool = True,
    command: str = "",
    table_only: bool = False,
    first_seed: int = 0,
    worker_report: str | Path | None = None,
    failures_elsewhere: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run (or complete) a suite and write its results; returns the results dict.

    Seeds ``first_seed .. first_seed + seeds - 1`` of each arm are run (finished runs are kept, a
    run another live invocation holds is skipped), so several invocations can share one suite.
    ``table_only`` trains and evaluates nothing: the results are rebuilt from the finished runs.
    ``worker_report`` (one worker of ``probssl bench --jobs N``): write this invocation's failures,
    skipped runs and timings there and stop; the parent builds the table once, with
    ``failures_elsewhere`` = the workers' failures.
    """
    if suite_name not in SUITES:
        raise ConfigError(f"unknown benchmark suite {suite_name!r}; choose from speed, {', '.join(SUITES)}")
    suite = SUITES[suite_name]
    arms = resolve_arms(only, suite)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if first_seed < 0:
        raise ConfigError(f"--first-seed must be >= 0, got {first_seed}")
    out = Path(out)
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    failures: dict[str, str] = {}
    busy: list[str] = []
    seconds: dict[str, float] = {}
    seed_range = range(first_seed, first_seed + (0 if table_only else seeds))
    for seed in seed_range:
        for arm in arms:
            if not suite.runs(arm.name, seed):
                continue
            start = time.perf_counter()
            label = f"{suite.name}/{arm.name}-s{seed}"
            if progress:
                print(f"[bench] {label}", flush=True)
            try:
                runs.setdefault(arm.name, {})[seed] = train_and_evaluate(
                    suite, arm, seed, out, data_dir, progress
                )
            except RunBusy as err:  # another invocation is on it: its eval.json joins the table later
                busy.append(f"{arm.name}-s{seed}")
                print(f"[bench] {label} skipped: {err}", flush=True)
            except Exception as err:  # one failing arm must not lose the others' results
                failures[f"{arm.name}-s{seed}"] = f"{type(err).__name__}: {err}"
                print(f"[bench] {label} failed: {err}", flush=True)
            seconds[f"{arm.name}-s{seed}"] = time.perf_counter() - start
    if worker_report is not None:
        report = {"failures": failures, "busy": busy, "seconds": seconds}
        atomic_write_json(Path(worker_report), report)
        return report
    failures.update(failures_elsewhere or {})
    # The table covers every finished run of the suite's arms under OUT/SUITE, not only this
    # invocation's: suites are completed arm by arm and seed by seed, over several invocations.
    every = suite.all_arms()
    for arm in every:
        for eval_path in sorted((out / suite.name).glob(f"{arm.name}-s*/eval.json")):
            name, seed = split_seed(eval_path.parent.name)
            if name == arm.name and seed is not None and seed not in runs.get(arm.name, {}):
                runs.setdefault(arm.name, {})[seed] = load_run_results(eval_path.parent)
    runs = {a.name: dict(sorted(runs[a.name].items())) for a in every if a.name in runs}
    if table_only and not runs and not failures:  # else an empty table, and --update would publish it
        raise ConfigError(
            f"--table-only: no evaluated run of suite {suite.name} under {out / suite.name} "
            f"(<arm>-s<seed>/eval.json); check --out, or run `probssl bench {suite.name} --out {out}` first"
        )
    columns = suite.columns()
    summary = summarise(runs, columns)  # the against-base columns are among the tables' (tested)
    results = {
        "suite": suite.name,
        "note": suite.note,
        "budget": suite.budget,
        "arms": {
            a.name: {"method": a.method, "overrides": list(a.overrides)} for a in every if a.name in runs
        },
        "seeds_this_invocation": list(seed_range),
        "busy_this_invocation": busy,
        "columns": columns,
        "tables": suite.tables(),
        "runs": {arm: {str(s): r for s, r in by_seed.items()} for arm, by_seed in runs.items()},
        "summary": summary,
        "against_base": against_base(summary, every, AGAINST_BASE + base_ood_columns(suite)),
        "bases": {a.name: a.base for a in every if a.base is not None},
        "failures": failures,
        "wall_seconds_this_invocation": seconds,
        "command": command,
        **provenance(),
    }
    suite_dir = out / suite.name
    suite_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(suite_dir / "results.json", results)
    table = results_markdown(results)
    if suite.paper:
        table = paper_markdown(suite, summary, runs) + "\n\n" + table
    atomic_write_text(suite_dir / "results.md", table + "\n")
    from probssl.eval.report import build_report

    run_dirs = [run_dir_for(out, suite.name, a, s) for a, by_seed in runs.items() for s in by_seed]
    if run_dirs:
        build_report(run_dirs, suite_dir / "report.html", title=f"probssl bench {suite.name}")
    print(table)
    if update:
        header = (
            f"Command: `{command}` ({results['date']}, commit {results['commit']}, this invocation on "
            f"{results['processor']}, {results['cpus']} CPUs, torch {results['torch']}). {suite.note}. "
            "Mean ± sample std over seeds; every arm trained at the same budget: "
            f"`{json.dumps(suite.budget)}`."
        )
        replace_section(
            update,
            f"quality-{suite.name}",
            f"{header}\n\n{table}",
            heading=f"## Quality: {suite.name} (generated by `probssl bench {suite.name}`)",
        )
    return results
