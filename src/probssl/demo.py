"""``make demo``: the thin slice end to end on the embedded ``digits`` data, in a few CPU minutes.

Trains SimCLR and BYOL with the bundled ``configs/digits.yaml`` (the one place the demo's budget is
written), evaluates them (full suite) beside the raw-pixel floor, prints the table and writes the
HTML report. Re-running skips what is already trained (and re-uses cached features). Each stage
says what it is doing, so the minutes of evaluation are not silent.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from probssl.checkpoint import final_weights_intact
from probssl.config import RunConfig, build_config
from probssl.eval.evaluate import evaluate_run
from probssl.eval.report import build_report
from probssl.tables import format_table
from probssl.train import train

DEMO_CONFIG = "digits"  # src/probssl/configs/digits.yaml
DEMO_METHODS = ("pixels", "simclr", "byol")
DEMO_THREADS = 1
DEMO_COLUMNS = (
    "knn/top1@20",
    "linear/top1",
    "cal/ece15",
    "cal/nll",
    "ood/noise/msp/auroc",  # the linear probe's confidence ...
    "ood/noise/knn1/auroc",  # ... and the pre-declared feature-space detector (kNN distance)
    "sel/err_auroc",
    "ret/recall@1",
    "lowshot/10pct/top1",
)


def demo_config(method: str, epochs: int | None = None, progress: bool = True) -> RunConfig:
    """The bundled digits config with ``method`` (and, for a quick try, fewer ``epochs``)."""
    train_args: dict = {"progress": progress, "threads": DEMO_THREADS}
    if epochs is not None:
        train_args["epochs"] = epochs
    return build_config(DEMO_CONFIG, method=method, train=train_args)


def _report_warnings(caught: list[warnings.WarningMessage], said: set[str]) -> None:
    """The same optional set is missing for every run: say so once, not once per run; pass the rest on."""
    skipped = sorted(
        str(w.message).split()[1]
        for w in caught
        if str(w.message).startswith("skipped ") and len(str(w.message).split()) > 1
    )
    new = [name for name in skipped if name not in said]
    if new:
        said.update(new)
        print(
            f"  skipped {', '.join(new)}: other datasets, not in the data directory "
            "(`probssl eval RUN --download` or --data-dir adds them)"
        )
    for w in caught:
        if not str(w.message).startswith("skipped "):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def run_demo(
    out: str | Path = "runs/demo", epochs: int | None = None, progress: bool = True
) -> dict[str, dict]:
    # One intra-op thread: the demo's network on 8x8 images is too small to gain from more, and on a
    # shared or busy machine two spinning threads per process were measured 15x slower per step
    # (7 s vs 0.45 s on 2 loaded cores). It also takes the thread count out of what makes the
    # figures differ between machines (the float sums' order depends on it).
    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)
    try:
        return _run_demo(Path(out), epochs, progress)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, epochs: int | None, progress: bool) -> dict[str, dict]:
    results = {}
    said: set[str] = set()
    for method in DEMO_METHODS:
        run_dir = out / method
        cfg = demo_config(method, epochs, progress)
        started = time.perf_counter()
        if final_weights_intact(run_dir):
            print(f"{method}: already trained in {run_dir}")
        elif cfg.method == "pixels":
            print("pixels: nothing to train (raw pixels are the floor every method should beat)")
            train(cfg, run_dir, resume=(run_dir / "config.yaml").is_file())
        else:
            print(f"{method}: training {cfg.train.epochs} epochs on digits into {run_dir}")
            train(cfg, run_dir, resume=(run_dir / "config.yaml").is_file())
        print(
            f"{method}: evaluating (kNN, linear probe, calibration, OOD, corruptions, low-shot, retrieval)",
            flush=True,
        )
        # Per-batch feature bars would print dozens of lines here (one per corrupted copy): the stage
        # lines above and below say where the demo is instead.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[method] = evaluate_run(run_dir, progress=False)
        _report_warnings(caught, said)
        print(f"{method}: done in {time.perf_counter() - started:.0f} s", flush=True)
    report = build_report([out / m for m in DEMO_METHODS], out / "report.html", title="probssl demo: digits")
    print()
    print(format_table(results, DEMO_COLUMNS))
    print(f"\neval.json files under {out}/<method>/; report: {report}")
    return results
