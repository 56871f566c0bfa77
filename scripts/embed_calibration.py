"""Realized false-positive rate of the ``probssl embed`` path on a run's test split (issue 29 item 3).

``embed`` calibrates its OOD p-values on a slice of the *training* split, images the encoder saw during
self-supervised training; the test split's images it never saw. If the encoder made its training
images look more familiar than new images of the same distribution, the p-values of new
in-distribution images are too small and ``ood_flag`` fires more often than α. This script embeds the
whole test split exactly as a user would (``probssl.embed_images``) and counts:

    python scripts/embed_calibration.py RUN [RUN ...] [--data-dir DIR] [--json OUT.json]

One line per run and α (0.01, 0.05, 0.1): the share of test images flagged, with its binomial 95%
interval, each single detector's share, and the ECE of ``reliability`` against the test labels.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from scipy import stats

import probssl
from probssl.data import load_dataset
from probssl.data.sources import ArraySource
from probssl.eval.calibration import binned_ece
from probssl.eval.conformal import ALPHAS
from probssl.runs import load_run


def measure(run: Path, data_dir: str | None) -> dict:
    cfg = load_run(run).config
    test = load_dataset(cfg.data.dataset, "test", data_dir or cfg.data.data_dir, **cfg.data.reader_options())
    source = ArraySource(test.images, test.labels, test.classes, cfg.data.dataset, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unreachable α is reported below, per α
        found = probssl.embed_images(run, source, data_dir=data_dir)
    n = len(found["ood_pvalue"])
    out: dict = {"run": str(run), "method": cfg.method, "dataset": cfg.data.dataset, "test_items": n}
    for alpha in ALPHAS:
        flagged = int((found["ood_pvalue"] < alpha).sum())
        low, high = stats.binomtest(flagged, n).proportion_ci(0.95)
        out[f"fpr@{alpha:g}"] = flagged / n
        out[f"fpr@{alpha:g}/ci95"] = [low, high]
        for key in found:
            if key.startswith("pvalue/"):
                out[f"fpr@{alpha:g}/{key[len('pvalue/') :]}"] = float((found[key] < alpha).mean())
    if "reliability" in found:
        correct = torch.from_numpy(found["knn_prediction"] == test.labels.numpy())
        out["reliability/ece"] = binned_ece(torch.from_numpy(found["reliability"]), correct)
        out["knn/top1"] = float(correct.double().mean())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-dir")
    parser.add_argument("--json", type=Path, help="also write every measurement to this file")
    args = parser.parse_args(argv)
    missing = [str(run) for run in args.runs if not (run / "model.safetensors").is_file()]
    if missing:
        print(f"error: not a finished run (no model.safetensors): {', '.join(missing)}", file=sys.stderr)
        return 2
    results = []
    for run in args.runs:
        row = measure(run, args.data_dir)
        results.append(row)
        for alpha in ALPHAS:
            low, high = row[f"fpr@{alpha:g}/ci95"]
            print(
                f"{run}  alpha={alpha:g}  flagged {row[f'fpr@{alpha:g}']:.4f} [{low:.4f}, {high:.4f}] "
                f"of {row['test_items']} test images"
            )
        if "reliability/ece" in row:
            print(f"{run}  reliability ECE {row['reliability/ece']:.4f} (kNN top-1 {row['knn/top1']:.4f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
