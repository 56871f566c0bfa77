"""The cSGHMC method wired into the trainer: schedule, sample bank, resume, evaluation under samples."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from probssl.checkpoint import checkpoint_root
from probssl.config import ConfigError, build_config
from probssl.eval.evaluate import evaluate_run
from probssl.posteriors.sghmc import cyclical_step_size, is_sampling_stage, sample_positions
from probssl.runs import load_run
from probssl.train import train

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


# 512 digits, batch 64 → 8 steps/epoch, 4 epochs = 32 steps; 2 cycles of K = 16 steps; the sampling
# stage is steps 8..15 of each cycle, two samples per cycle at in-cycle positions 11 and 15.
METHOD = {"cycles": 2, "samples_per_cycle": 2, "exploration_fraction": 0.5}
K, STORED_STEPS = 16, [12, 16, 28, 32]


def _cfg(**overrides):
    train_cfg = {
        "epochs": 4,
        "batch_size": 64,
        "progress": False,
        "tensorboard": False,
        "deterministic": True,
        "checkpoint_every": 8,
        "keep_checkpoints": 10,
        **overrides.pop("train", {}),
    }
    return build_config(
        method="csghmc",
        data={"dataset": "digits", "subset": 512},
        backbone="convnet",
        backbone_args={"width": 8},
        method_args={**METHOD, **overrides.pop("method_args", {})},
        train=train_cfg,
        optim={"lr": 0.1},
    )


def test_sample_positions_spread_over_the_sampling_stage():
    assert sample_positions(100, 0.9, 1) == [99]
    assert sample_positions(100, 0.9, 3) == [93, 96, 99]  # 10 sampling steps 90..99, gap 3
    assert sample_positions(16, 0.5, 2) == [11, 15]
    assert sample_positions(10, 1.0, 2) == [8, 9]  # no sampling stage (snapshot): the last steps
    for k, f, n in [(50, 0.9, 5), (37, 0.7, 4), (8, 0.0, 8)]:
        positions = sample_positions(k, f, n)
        assert len(set(positions)) == n and positions[-1] == k - 1
        assert all(is_sampling_stage(p, k, f) for p in positions)
    with pytest.raises(ValueError):
        sample_positions(4, 0.5, 5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    run = train(_cfg(), tmp_path_factory.mktemp("csghmc") / "run")
    return run


def test_bank_holds_samples_at_the_planned_steps(trained):
    index = json.loads((trained / "samples" / "index.json").read_text())
    steps = [s["meta"]["step"] for s in index["samples"]]
    planned = [c * K + p + 1 for c in range(2) for p in sample_positions(K, 0.5, 2)]
    assert steps == planned == STORED_STEPS
    assert all(s["meta"]["noise"] for s in index["samples"])
    sample = load_file(str(trained / "samples" / index["samples"][-1]["file"]))
    final = load_file(str(trained / "model.safetensors"))
    for key, value in sample.items():  # the last sample is the encoder after the last step
        assert torch.equal(value, final[f"objective.backbone.{key}"]), key


def test_logged_step_size_follows_the_cyclical_formula(trained):
    rows = list(csv.DictReader((trained / "metrics.csv").open()))
    assert rows and {"noise_on", "bank_samples"} <= rows[0].keys()
    eta0 = 0.1 * 64 / 256
    for row in rows:
        k = int(row["step"]) - 1  # the step that produced the logged loss
        assert float(row["lr"]) == pytest.approx(cyclical_step_size(k, eta0, K))
        assert float(row["noise_on"]) == float(is_sampling_stage(k, K, 0.5))


def test_interrupted_run_resumes_to_the_same_samples(trained, tmp_path):
    part = tmp_path / "part"
    train(_cfg(train={"max_steps": 14}), part)  # sample at step 12 stored, checkpoint at 14
    # Simulate a crash after the sample was written but before any checkpoint past step 8.
    root = checkpoint_root(part)
    shutil.rmtree(root / "step_00000014")
    (root / "latest").write_text("step_00000008")
    assert len(json.loads((part / "samples" / "index.json").read_text())["samples"]) == 1
    train(_cfg(), part, resume=True)
    full_index = json.loads((trained / "samples" / "index.json").read_text())
    part_index = json.loads((part / "samples" / "index.json").read_text())
    assert [s["meta"] for s in part_index["samples"]] == [s["meta"] for s in full_index["samples"]]
    assert [s["sha256"] for s in part_index["samples"]] == [s["sha256"] for s in full_index["samples"]]


def test_temperature_zero_is_the_snapshot_ensemble(tmp_path):
    cfg = _cfg(method_args={"temperature": 0.0}, train={"epochs": 2})
    run = train(cfg, tmp_path / "s")
    # 2 epochs = 16 steps → cycles of 8; samples at in-cycle positions 5 and 7.
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert rows and all(float(r["noise_on"]) == 0.0 for r in rows)
    index = json.loads((run / "samples" / "index.json").read_text())
    assert [s["meta"]["step"] for s in index["samples"]] == [6, 8, 14, 16]
    assert not any(s["meta"]["noise"] for s in index["samples"])


def test_embed_returns_one_draw_per_sample(trained):
    loaded = load_run(trained)
    method = loaded.method
    assert method.num_posterior_samples == 4
    x = torch.randn(5, 1, 8, 8)
    emb = method.embed(x)
    assert emb.samples.shape[:2] == (4, 5)
    torch.testing.assert_close(emb.mean, emb.samples.mean(0))  # the posterior mean embedding
    unit = torch.nn.functional.normalize(emb.samples, dim=-1)
    total_variance = unit.var(dim=0, unbiased=False).sum(-1)  # Σ_d Var_s, computed directly
    torch.testing.assert_close(emb.uncertainty, total_variance, atol=1e-5, rtol=1e-5)
    assert method.embed(x, samples=2).samples.shape[0] == 2
    torch.testing.assert_close(method.embed(x, samples=2).samples, emb.samples[-2:])
    # A checkpoint evaluates only the samples that existed then.
    assert load_run(trained, step=16).method.num_posterior_samples == 2
    assert load_run(trained, step=8).method.embed(x).samples is None  # none yet: current weights


def test_timing_posterior_makes_embed_pay_one_pass_per_sample(trained):
    """`probssl bench speed` builds a fresh model (no bank): the timing hook gives it S samples."""
    method = load_run(trained, step=8).method  # no sample yet
    x = torch.randn(5, 1, 8, 8)
    method.eval()
    forward = method.backbone(x)
    for s in (1, 8):
        method.posterior_for_timing(s)
        emb = method.embed(x)
        assert method.num_posterior_samples == s and emb.samples.shape[:2] == (s, 5)
        torch.testing.assert_close(emb.mean, forward)  # copies of the current weights
    assert method.cache_tag() == "timing8"  # never mistaken for a real bank's cached features


def test_batchnorm_is_re_estimated_per_sample(trained):
    method = load_run(trained).method
    before = [s["features.1.running_mean"].clone() for s in method._samples]
    tag = method.cache_tag()
    images = torch.randn(600, 1, 8, 8)
    method.prepare_for_evaluation(lambda: iter(images.split(128)))
    first_bn_input = torch.nn.functional.conv2d(
        images[: method.cfg.bn_images], method._samples[0]["features.0.weight"], padding=1
    )
    torch.testing.assert_close(
        method._samples[0]["features.1.running_mean"],
        first_bn_input.mean(dim=(0, 2, 3)),
        atol=1e-5,
        rtol=1e-4,
    )
    assert any(
        not torch.equal(b, s["features.1.running_mean"]) for b, s in zip(before, method._samples, strict=True)
    )
    assert method.cache_tag() != tag


def test_evaluation_is_a_bayesian_model_average(trained):
    results = evaluate_run(trained, suite_name="basic", progress=False)
    assert results["meta/samples"] == 4 and results["meta/method"] == "csghmc"
    assert 0.0 <= results["linear/top1"] <= 1.0 and results["linear/nll"] > 0


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cycles"):
        train(_cfg(method_args={"cycles": 20}, train={"epochs": 1}), tmp_path / "a")
    with pytest.raises(ConfigError, match="variant"):
        train(_cfg(method_args={"variant": "nope"}), tmp_path / "b")
    with pytest.raises(ConfigError, match="unknown config key"):
        train(_cfg(method_args={"objective_args": {"nope": 1}}), tmp_path / "c")


def _fits(total_steps: int, cycles: int, samples_per_cycle: int) -> bool:
    per_cycle = total_steps // cycles
    return per_cycle >= 2 and samples_per_cycle <= per_cycle


@pytest.mark.parametrize(
    "total,steps_per_epoch,cycles,spc",
    [(8, 8, 20, 2), (8, 8, 4, 3), (12, 4, 4, 5), (3, 3, 2, 2), (1, 1, 4, 3)],
)
def test_too_short_message_names_overrides_that_fit(total, steps_per_epoch, cycles, spc):
    from probssl.methods.csghmc import too_short_message

    assert not _fits(total, cycles, spc)
    message = too_short_message(total, steps_per_epoch, cycles, spc)
    suggested = dict(
        tok.rstrip(",").split("=") for tok in message.split("set one of:")[1].split() if "=" in tok
    )
    assert "train.epochs" in suggested
    assert _fits(int(suggested["train.epochs"]) * steps_per_epoch, cycles, spc)  # each fix alone works
    if "method.cycles" in suggested:
        assert _fits(total, int(suggested["method.cycles"]), spc)
    if "method.samples_per_cycle" in suggested:
        assert _fits(total, cycles, int(suggested["method.samples_per_cycle"]))
    assert "method.cycles" in suggested or total < max(2, spc)
