"""Cheaper evaluation must not change a number; undefined metrics are absent, and the summary says n/a."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from probssl.embedding import Embedding
from probssl.eval.evaluate import TIMING_KEYS
from probssl.eval.features import FeatureBank, extract_features
from probssl.eval.suite import uncertainty_scores
from probssl.eval.summary import best_feature_detector, format_summary, summary_columns

pytestmark = pytest.mark.usefixtures("single_thread")


def _tiny_run(tmp_path: Path, method: str, overrides: list[str]) -> Path:
    from probssl.config import build_config
    from probssl.train import train

    cfg = build_config(
        None,
        ["backbone.width=8", "eval.shift_max_items=40", "eval.linear_max_iter=15", *overrides],
        method=method,
        data={"dataset": "digits", "subset": 128, "data_dir": str(tmp_path / "no-data"), "download": False},
        train={"epochs": 1, "batch_size": 32, "progress": False, "tensorboard": False},
    )
    return train(cfg, tmp_path / method)


def _assert_same_numbers(plain: dict[str, Any], shared: dict[str, Any]) -> None:
    timings = {k for k in (*plain, *shared) if k.startswith(TIMING_KEYS)}
    assert set(plain) - timings == set(shared) - timings
    for key in set(plain) - timings:
        a, b = plain[key], shared[key]
        if isinstance(a, float) and isinstance(b, float) and not (math.isnan(a) and math.isnan(b)):
            assert abs(a - b) <= 1e-6, (key, a, b)
        elif not (isinstance(a, float) and math.isnan(a)):
            assert a == b, (key, a, b)


def _evaluate_both_ways(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import shutil

    from probssl.eval.evaluate import evaluate_run

    plain = evaluate_run(run_dir, progress=False, suite_name="full", reuse=False)
    shutil.rmtree(run_dir / "features")  # the shared path must extract the banks itself, not read them
    shared = evaluate_run(run_dir, progress=False, suite_name="full", reuse=True)
    return plain, shared


def test_sharing_work_across_stages_changes_no_number(tmp_path: Path) -> None:
    plain, shared = _evaluate_both_ways(_tiny_run(tmp_path, "simclr", []))
    _assert_same_numbers(plain, shared)
    stages = {k.removeprefix("meta/eval_seconds/") for k in shared if k.startswith("meta/eval_seconds/")}
    assert stages == {"features", "probes", "uncertainty", "ood", "shift", "lowshot", "transfer", "retrieval"}
    # The cost table's columns: training wall (step loop per epoch × epochs) and the ratio.
    assert shared["meta/train_seconds"] > 0
    # How the probe ended (issue 28): converged, with the iterations and final gradient on record.
    from probssl.eval.linear import GRADIENT_TOLERANCE

    assert shared["linear/converged"] is True and shared["linear/iterations"] > 0
    assert 0 < shared["linear/grad_rel"] <= GRADIENT_TOLERANCE and shared["linear/grad_norm"] > 0
    # A deterministic method: no measured-looking value for what it does not have.
    assert not [k for k in shared if "/emb/" in k or "/mi/" in k or "emb_uncertainty" in k]
    details = json.loads((tmp_path / "simclr" / "eval_details.json").read_text())
    assert "ranked_images" in details and "ranked_images_own" not in details  # nothing of its own to rank by


@pytest.mark.slow
def test_sharing_work_changes_no_number_for_draws_seeded_per_batch(tmp_path: Path) -> None:
    """LAM's MC-dropout masks are seeded per call: the same images must meet the same batches."""
    run_dir = _tiny_run(tmp_path, "lam", ["method.posterior=mc_dropout", "method.eval_samples=3"])
    plain, shared = _evaluate_both_ways(run_dir)
    _assert_same_numbers(plain, shared)
    assert "sel/emb/err_auroc" in shared and "ood/noise/mi/auroc" in shared
    own = json.loads((run_dir / "eval_details.json").read_text())["ranked_images_own"]
    assert own["criterion"] == "the embedding's own uncertainty"
    assert own["uncertainty_most"] == sorted(own["uncertainty_most"])  # least uncertain first
    assert min(own["uncertainty_least"]) >= max(own["uncertainty_most"])


def test_segments_are_cut_into_the_batches_each_set_would_get_alone() -> None:
    """An encoder whose output depends on the batch (here: minus the batch mean) sees the same batches."""

    def batch_dependent(x: torch.Tensor) -> Embedding:
        flat = x.flatten(1)
        return Embedding.deterministic(flat - flat.mean(0, keepdim=True))

    sets = [torch.randint(0, 255, (7, 1, 2, 2), dtype=torch.uint8) for _ in range(3)]
    alone = [
        extract_features(
            batch_dependent, s, torch.zeros(7, dtype=torch.long), lambda x: x.float(), batch_size=3
        )
        for s in sets
    ]
    together = extract_features(
        batch_dependent, torch.cat(sets), torch.zeros(21, dtype=torch.long), lambda x: x.float(), 3, segment=7
    )
    assert torch.equal(together.draws, torch.cat([bank.draws for bank in alone], dim=1))
    with pytest.raises(ValueError, match="segment"):
        extract_features(batch_dependent, torch.cat(sets), torch.zeros(21), lambda x: x.float(), segment=5)


def _bank(uncertainty: torch.Tensor) -> FeatureBank:
    n = uncertainty.numel()
    draws = torch.randn(1, n, 3)
    return FeatureBank(draws, draws[0], uncertainty, torch.zeros(n, dtype=torch.long))


def test_undefined_criteria_are_left_out() -> None:
    probs = torch.softmax(torch.randn(1, 6, 4), dim=-1)
    deterministic = uncertainty_scores(probs, _bank(torch.zeros(6)))
    assert set(deterministic) == {"msp", "entropy"}  # MI of one draw is 0 by construction
    sampled = uncertainty_scores(probs.expand(3, -1, -1), _bank(torch.rand(6) + 0.1))
    assert set(sampled) == {"msp", "entropy", "mi", "emb"}
    # An OOD set gets the in-distribution criteria even where its own values happen to be zero.
    out = uncertainty_scores(probs.expand(3, -1, -1), _bank(torch.zeros(6)), like=sampled)
    assert set(out) == set(sampled) and torch.equal(out["emb"], torch.zeros(6))


def test_summary_prints_na_for_what_a_run_does_not_have() -> None:
    results = {
        "knn/top1": 0.9,
        "linear/top1": 0.91,
        "cal/ece15": 0.02,
        "linear/nll": 0.3,
        "ood/mnist/msp/auroc": 0.49,
        "ood/mnist/entropy/auroc": 0.5,
        "sel/err_auroc": 0.85,
    }
    columns = dict(summary_columns(results))
    assert columns["OOD mnist knn1"] is None and columns["OOD mnist own"] is None
    assert columns["OOD mnist comb"] is None and columns["FPR@.05"] is None
    assert columns["err-AUROC own"] is None and columns["ECE"] == 0.02
    text = format_summary(results)
    assert text.count("n/a") >= 3 and "0.5000" not in text  # the probe's entropy is no feature detector

    results |= {"ood/mnist/knn1/auroc": 0.97, "ood/mnist/mahalanobis/auroc": 0.98, "ood/mnist/emb/auroc": 0.6}
    results |= {"ood/mnist/best_feature/auroc": 0.97, "ood/mnist/best_feature/detector": "knn1"}
    results |= {"sel/emb/err_auroc": 0.7, "ood/near/best_feature/auroc": 0.97}
    results |= {
        "ood/mnist/combined/auroc": 0.99,
        "ood/id/combined/fpr@0.05": 0.051,
        "sel/reliability/ece": 0.02,
    }
    # the pre-declared reference, not the maximum over detectors on the OOD set itself
    assert best_feature_detector(results, "mnist") == ("knn1", 0.97)
    columns = dict(summary_columns(results))
    assert columns["OOD mnist knn1"] == 0.97 and columns["OOD mnist own"] == 0.6
    assert columns["OOD mnist comb"] == 0.99 and columns["FPR@.05"] == 0.051 and columns["rel-ECE"] == 0.02
    assert "OOD near knn1" not in columns and "OOD near comb" not in columns  # a group mean is not a set
    assert "mnist: knn1" in format_summary(results)


def test_probssl_eval_ends_with_the_summary(monkeypatch: pytest.MonkeyPatch, capsys, tmp_path: Path) -> None:
    import probssl.eval.evaluate as evaluate
    from probssl.cli import main

    results = {"knn/top1": 0.9, "linear/top1": 0.91, "cal/ece15": 0.02, "ood/noise/msp/auroc": 0.7}
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *args, **kwargs: results)
    assert main(["eval", str(tmp_path), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["kNN", "linear", "ECE", "NLL"] and "err-AUROC" in lines[0]
    assert lines[1].split()[:4] == ["0.9000", "0.9100", "0.0200", "n/a"]


def test_channels_last_runs_are_embedded_in_their_memory_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run trained channels_last is evaluated channels_last (faster convolutions): the encoder's
    convolutions are channels_last, and its features equal the contiguous ones up to rounding."""
    import shutil

    from safetensors.torch import load_file

    import probssl.eval.evaluate as evaluate

    loaded, load_run = [], evaluate.load_run

    def recording(*args, **kwargs):  # type: ignore[no-untyped-def]
        loaded.append(load_run(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(evaluate, "load_run", recording)

    def conv_formats() -> set[bool]:
        weights = [p for p in loaded[-1].method.parameters() if p.dim() == 4 and p.shape[1] > 1]
        assert weights
        return {w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights}

    run_dir = _tiny_run(tmp_path, "simclr", ["train.channels_last=true", "backbone.width=16"])
    evaluate.evaluate_run(run_dir, progress=False, suite_name="basic")
    assert conv_formats() == {True}
    fast = load_file(run_dir / "features" / "test_S1.safetensors")["mean"]
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("channels_last: true", "channels_last: false"))
    shutil.rmtree(run_dir / "features")
    evaluate.evaluate_run(run_dir, progress=False, suite_name="basic")
    assert conv_formats() == {False}
    plain = load_file(run_dir / "features" / "test_S1.safetensors")["mean"]
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)


def test_training_seconds_count_every_epoch_and_the_after_training_step(tmp_path: Path) -> None:
    import json

    from probssl.eval.evaluate import training_seconds

    assert training_seconds(tmp_path, 5) is None  # no train_summary.json: no cost columns
    summary = {"seconds": 4.0, "seconds_per_epoch": 2.0, "after_training_seconds": 3.0}
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    # a resumed run's last invocation ran 2 epochs (4 s), but the run trained 5: 5 × 2 + 3
    assert training_seconds(tmp_path, 5) == pytest.approx(13.0)


def test_the_cost_ratio_needs_a_run_that_trained(tmp_path: Path) -> None:
    import json

    from probssl.eval.evaluate import evaluate_run

    run_dir = _tiny_run(tmp_path, "pixels", [])
    results = evaluate_run(run_dir, progress=False, suite_name="basic")
    assert results["meta/train_seconds"] < 1.0 and "meta/eval_to_train" not in results  # trains nothing
    summary = json.loads((run_dir / "train_summary.json").read_text())
    summary.update(total_seconds=5.0, after_training_seconds=0.0)  # as if training had taken 5 s
    (run_dir / "train_summary.json").write_text(json.dumps(summary))
    results = evaluate_run(run_dir, progress=False, suite_name="basic")
    assert results["meta/train_seconds"] == 5.0
    assert results["meta/eval_to_train"] == pytest.approx(results["meta/eval_seconds"] / 5.0)


def test_a_smaller_encoder_batch_changes_memory_not_numbers(tmp_path: Path) -> None:
    # `probssl eval --batch-size N`: what a user lowers when large images run evaluation out of memory.
    import shutil

    from safetensors.torch import load_file

    from probssl.cli import main

    run_dir = _tiny_run(tmp_path, "simclr", ["backbone.width=8"])
    assert main(["eval", str(run_dir), "--suite", "basic", "--no-progress"]) == 0
    default = load_file(run_dir / "features" / "test_S1.safetensors")["mean"]
    first = json.loads((run_dir / "eval.json").read_text())
    shutil.rmtree(run_dir / "features")
    assert main(["eval", str(run_dir), "--suite", "basic", "--no-progress", "--batch-size", "7"]) == 0
    small = load_file(run_dir / "features" / "test_S1.safetensors")["mean"]
    second = json.loads((run_dir / "eval.json").read_text())
    torch.testing.assert_close(default, small, rtol=1e-5, atol=1e-6)
    assert second["knn/top1@20"] == first["knn/top1@20"] and second["linear/top1"] == first["linear/top1"]
