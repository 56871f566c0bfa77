"""Probes fitted on fewer or other labels: ``lowshot/`` (1% / 10% class-balanced labels, the index
files on record) and ``transfer/<set>/`` (a frozen encoder probed on another dataset's halves)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from probssl.eval.features import FeatureBank
from probssl.eval.metrics import Metrics, top1
from probssl.eval.splits import class_balanced_subset, stratified_split
from probssl.eval.suite.probe import MarginalProbe
from probssl.io import atomic_write_text


def write_index_file(path: Path, indices: Tensor) -> None:
    atomic_write_text(path, "\n".join(str(int(i)) for i in indices.tolist()) + "\n")


def lowshot_suite(
    train: FeatureBank,
    test: FeatureBank,
    num_classes: int,
    index_dir: Path,
    fractions: Sequence[float] = (0.01, 0.1),
    seeds: Sequence[int] = (0, 1, 2),
    **probe_kwargs: Any,
) -> Metrics:
    """Probe on a class-balanced fraction of the training labels; mean ± std over seeds.

    The index files (one per fraction and seed) are written beside the results so the exact label
    subsets are on record and can be reused by any other run.
    """
    out: Metrics = {}
    for fraction in fractions:
        name = f"{round(fraction * 100):g}pct"
        accs = []
        for seed in seeds:
            idx = class_balanced_subset(train.labels, fraction, seed)
            write_index_file(index_dir / f"lowshot_{name}_seed{seed}.txt", idx)
            subset = FeatureBank(
                train.draws[:, idx], train.mean[idx], train.uncertainty[idx], train.labels[idx]
            )
            kwargs = dict(probe_kwargs)
            if len(idx) < 20 * num_classes:  # too few labels to carve a validation split from
                kwargs["l2_grid"] = (1e-3,)
            probe = MarginalProbe.fit(subset, num_classes, **kwargs)
            accs.append(top1(probe.sample_probs(test.draws).mean(0), test.labels))
        mean = sum(accs) / len(accs)
        out[f"lowshot/{name}/top1"] = mean
        out[f"lowshot/{name}/top1_std"] = (sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1)) ** 0.5
    return out


def transfer_suite(name: str, bank: FeatureBank, num_classes: int, **probe_kwargs: Any) -> Metrics:
    """Frozen encoder on another dataset: fit the probe on one stratified half, test on the other."""
    keep, held = stratified_split(bank.labels, 0.5, probe_kwargs.get("seed", 0))
    fit = FeatureBank(bank.draws[:, keep], bank.mean[keep], bank.uncertainty[keep], bank.labels[keep])
    probe = MarginalProbe.fit(fit, num_classes, **probe_kwargs)
    probs = probe.sample_probs(bank.draws[:, held]).mean(0)
    return {f"transfer/{name}/top1": top1(probs, bank.labels[held]), f"transfer/{name}/items": len(held)}
