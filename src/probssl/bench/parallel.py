"""`probssl bench SUITE --jobs N`: N worker processes share one quality suite, then one table.

Why processes and not threads: a training run is one PyTorch process whose kernels use the cores it
is given; on a small CPU machine N single-threaded runs side by side finish a suite sooner than
one N-threaded run after another (small convolutions do not scale across threads), while two
multi-threaded processes on the same cores slow each other down. So each worker gets
``cores // N`` threads.

How they share: every worker walks the same list of runs; a run is locked while it trains
(:mod:`probssl.run_lock`), so a worker skips what another one holds and takes the next. Each worker
writes its failures and timings to ``OUT/SUITE/.workers/<k>.json``; the parent then builds the
table, report and BENCHMARKS.md section once, from every finished run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from probssl.bench import suites
from probssl.bench.catalogue import SUITES, resolve_arms, run_dir_for
from probssl.config import ConfigError
from probssl.threads import usable_cores


def run_parallel_benchmark(
    suite_name: str,
    out: str | Path,
    jobs: int,
    seeds: int = 3,
    first_seed: int = 0,
    data_dir: str | None = None,
    only: Sequence[str] | None = None,
    update: str | Path | None = None,
    progress: bool = True,
    command: str = "",
    poll_seconds: float = 10.0,
) -> dict[str, Any]:
    """Run the suite with ``jobs`` worker processes; return the results of the whole suite."""
    if jobs < 2:
        raise ConfigError(f"--jobs must be >= 2 for parallel workers, got {jobs}")
    if suite_name not in SUITES:
        raise ConfigError(f"unknown benchmark suite {suite_name!r}; choose from {', '.join(SUITES)}")
    arms = resolve_arms(only, SUITES[suite_name])  # unknown arms: refused before any worker
    out = Path(out)
    planned = [
        run_dir_for(out, suite_name, arm.name, seed)
        for seed in range(first_seed, first_seed + seeds)
        for arm in arms
        if SUITES[suite_name].runs(arm.name, seed)
    ]
    workers_dir = out / suite_name / ".workers"
    workers_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, usable_cores() // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    base = [sys.executable, "-m", "probssl", "bench", suite_name, "--out", str(out), "--no-progress"]
    base += ["--seeds", str(seeds), "--first-seed", str(first_seed)]
    if only:
        base += ["--arms", ",".join(only)]
    if data_dir:
        base += ["--data-dir", str(data_dir)]
    procs = []
    for k in range(jobs):
        report = workers_dir / f"{k}.json"
        report.unlink(missing_ok=True)
        log = (workers_dir / f"{k}.log").open("w")
        cmd = [*base, "--worker-report", str(report)]
        procs.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log, report))
        time.sleep(0.5)  # workers then meet each run in turn, not all at once (the lock decides anyway)
    if progress:
        print(f"[bench] {jobs} workers × {threads} thread(s), {len(planned)} runs; logs in {workers_dir}")
    done_before = -1
    while any(p.poll() is None for p, _, _ in procs):
        done = sum((d / "eval.json").is_file() for d in planned)
        if progress and done != done_before:
            print(f"[bench] {done}/{len(planned)} runs finished", flush=True)
            done_before = done
        time.sleep(poll_seconds)
    failures: dict[str, str] = {}
    for k, (proc, log, report) in enumerate(procs):
        log.close()
        if report.is_file():
            failures.update(json.loads(report.read_text())["failures"])
        if proc.returncode != 0:
            failures[f"worker-{k}"] = f"exit code {proc.returncode}; see {workers_dir / f'{k}.log'}"
    return suites.run_quality_benchmark(
        suite_name,
        out,
        seeds=seeds,
        data_dir=data_dir,
        update=update,
        progress=progress,
        command=command,
        table_only=True,
        failures_elsewhere=failures,
    )
