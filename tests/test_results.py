"""The one reader of results (probssl.results): seed summaries against numpy, the two number rules
written out by hand, and the three tables (``probssl table --by-seed``, the bench summary, the report's
arm rows) giving one summary for the same runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from probssl.results import (
    format_list,
    format_mean_std,
    format_number,
    read_eval,
    seed_group,
    split_seed,
    summarise_values,
)


@pytest.mark.parametrize(
    "value, text",
    [
        (0.98765, "0.9877"),
        (0.0019534, "0.001953"),  # 4 significant digits below 0.01
        (1e-5, "1e-05"),
        (0.0, "0.0000"),
        (-0.00512, "-0.00512"),
        (12.5, "12.5000"),
        (1257, "1257"),  # an int stays an int
        (float("nan"), "nan"),
    ],
)
def test_format_number(value, text):
    assert format_number(value) == text


@pytest.mark.parametrize(
    "args, text",
    [
        ((0.96851, 0.00372), "0.9685 ± 0.0037"),  # the spread takes the value's decimals
        ((123.456, 4.21), "123.5 ± 4.2"),  # 1 decimal from 10 up (seconds)
        ((0.5, None), "0.5000"),  # one seed: no spread at all
        ((-0.01234, 0.004, True), "-0.0123 ± 0.0040"),
        ((0.01234, None, True), "+0.0123"),
    ],
)
def test_format_mean_std(args, text):
    assert format_mean_std(*args) == text


def test_format_list():
    assert format_list([0.5, 0.91234]) == "0.500 / 0.912"


def test_seed_summary_against_numpy():
    values = [0.81, 0.84, 0.80, 0.8333]
    summary = summarise_values(values)
    assert summary.n == 4
    assert summary.mean == pytest.approx(np.mean(values), abs=1e-15)
    assert summary.std == pytest.approx(np.std(values, ddof=1), abs=1e-15)
    assert summarise_values([0.9, 0.9, 0.9]).std == 0.0  # agreeing seeds: exactly 0, no float residue
    assert summarise_values([0.7]).std == 0.0 and summarise_values([]) is None


def test_seed_names():
    assert split_seed("lam_online-s12") == ("lam_online", 12)
    assert split_seed("csghmc-T0-s1") == ("csghmc-T0", 1)
    assert split_seed("s1-model") == ("s1-model", None) and split_seed("-s3") == ("-s3", None)
    assert seed_group("runs/fm/byol-s2") == "byol"


def test_read_eval_adds_where_the_run_trained(tmp_path: Path):
    (tmp_path / "eval.json").write_text(json.dumps({"linear/top1": 0.5}))
    (tmp_path / "train_summary.json").write_text(json.dumps({"precision": "bf16", "processor": None}))
    assert read_eval(tmp_path) == {"linear/top1": 0.5}
    assert read_eval(tmp_path, with_training=True) == {"linear/top1": 0.5, "meta/train_precision": "bf16"}
    with pytest.raises(FileNotFoundError, match="probssl eval"):
        read_eval(tmp_path / "missing")


def test_the_three_tables_summarise_seeds_alike(tmp_path: Path):
    """``probssl table --by-seed``, the bench summary and the report's arm row: one mean, std and n."""
    from probssl.bench.tables import summarise
    from probssl.eval.report.runs import label_runs, load_run
    from probssl.eval.report.tables import arm_rows
    from probssl.tables import aggregate_seeds

    accs = [0.8123, 0.8456, 0.79]
    dirs = []
    for seed, acc in enumerate(accs):
        run = tmp_path / f"simclr-s{seed}"
        run.mkdir()
        (run / "eval.json").write_text(
            json.dumps({"linear/top1": acc, "seed": seed, "config/method": "simclr"})
        )
        dirs.append(run)
    rows = {str(d): read_eval(d) for d in dirs}
    by_seed = aggregate_seeds(rows, ["linear/top1"])["simclr"]["linear/top1"]
    bench = summarise({"simclr": dict(enumerate(rows.values()))}, ["linear/top1"])["simclr"]["linear/top1"]
    runs = [load_run(d) for d in dirs]
    label_runs(runs)
    _, means, spreads = arm_rows([[(run, {"linear/top1": run.metrics["linear/top1"]}) for run in runs]])
    assert bench == {"mean": means[0]["linear/top1"], "std": spreads[0]["linear/top1"].std, "n": 3}
    assert by_seed == f"{bench['mean']:.4f} ± {bench['std']:.4f}"
    assert bench["mean"] == pytest.approx(np.mean(accs)) and bench["std"] == pytest.approx(
        np.std(accs, ddof=1)
    )


def test_the_report_auroc_is_the_suites(tmp_path: Path):
    """The histogram's AUROC of a run that lacks the table's number: scikit-learn's, ties included."""
    from sklearn.metrics import roc_auc_score

    from probssl.eval.report.ood_histograms import _auroc

    rng = np.random.default_rng(0)
    score_in = rng.integers(0, 5, 40).astype(float)  # many ties
    score_out = rng.integers(2, 7, 30).astype(float)
    labels = np.r_[np.zeros(40), np.ones(30)]
    assert _auroc(score_in, score_out) == pytest.approx(
        roc_auc_score(labels, np.r_[score_in, score_out]), abs=1e-12
    )
