from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from probssl.cli import main
from probssl.config import ConfigError, build_config, load_yaml
from probssl.train import train

FAST = {
    "data": {"dataset": "digits", "subset": 256},
    "backbone": "convnet",
    "backbone_args": {"width": 8},
    "train": {
        "epochs": 3,
        "batch_size": 64,
        "progress": False,
        "tensorboard": False,
        "deterministic": True,
        "checkpoint_every": 2,
    },
}


def _cfg(method: str, **train):
    mapping = {k: (dict(v) if isinstance(v, dict) else v) for k, v in FAST.items()}
    mapping["train"] = {**FAST["train"], **train}
    return build_config(method=method, **mapping)


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, method):
    full = train(_cfg(method), tmp_path / "full")
    part = train(_cfg(method, max_steps=5), tmp_path / "part")  # stops mid-epoch 2 (4 steps/epoch)
    assert not (part / "model.safetensors").exists()
    train(_cfg(method), tmp_path / "part", resume=True)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows = (part / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss") and len(rows) > 2


def test_a_run_resumes_across_a_changed_evaluation_setting_and_records_it(tmp_path, capsys):
    """A suite run interrupted before an evaluation default changed (eval.linear_max_iter 200 → 10,000
    did) must resume: evaluation settings never change what is trained. The run then records the new
    ones, keeps its header comment, and a change of anything that is trained is still refused."""
    part = train(_cfg("simclr", max_steps=5), tmp_path / "part")
    path = part / "config.yaml"
    old_default = path.read_text().replace("linear_max_iter: 10000", "linear_max_iter: 200")
    path.write_text("# a header line\n" + old_default)
    changed = build_config(None, ["eval.knn_k=[5]", "optim.lr=0.2"], **_cfg("simclr").to_dict())
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.05 → 0\.2") as err:
        train(changed, part, resume=True)
    assert "linear_max_iter" not in str(err.value) and "knn_k" not in str(err.value)
    train(build_config(None, ["eval.knn_k=[5]"], **_cfg("simclr").to_dict()), part, resume=True)
    assert (part / "model.safetensors").is_file()
    assert "linear_max_iter: 200 → 10000" in capsys.readouterr().out
    stored = load_yaml(path)
    assert stored["eval"]["linear_max_iter"] == 10000 and stored["eval"]["knn_k"] == [5]
    assert path.read_text().startswith("# a header line\n")
    assert stored["optim"]["lr"] == 0.05


def test_a_resumed_runs_training_wall_sums_its_invocations(tmp_path):
    """A run trained over several invocations reports the step loops of all of them (the cost tables
    divide evaluation by it): the last invocation's seconds per epoch × epochs is wrong whenever that
    invocation ran at another speed (a starved resume said 1,590 s an epoch for a ~140 s epoch). A run
    resumed from a checkpoint that did not record its time keeps the old extrapolation."""
    from probssl.eval.evaluate import training_seconds

    for name, recorded in (("recorded", True), ("old", False)):
        part = train(_cfg("simclr", max_steps=5), tmp_path / name)
        latest = (part / "checkpoints" / "latest").read_text().strip()
        meta_path = part / "checkpoints" / latest / "meta.json"
        meta = json.loads(meta_path.read_text())
        assert meta["loop_seconds"] > 0
        if not recorded:  # as a checkpoint written before the time was recorded
            meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "loop_seconds"}))
        train(_cfg("simclr"), part, resume=True)
        summary = json.loads((part / "train_summary.json").read_text())
        after = summary["after_training_seconds"]
        if recorded:
            assert summary["total_seconds"] == pytest.approx(meta["loop_seconds"] + summary["seconds"])
            assert training_seconds(part, epochs=3) == pytest.approx(summary["total_seconds"] + after)
        else:
            assert summary["total_seconds"] is None
            expected = summary["seconds_per_epoch"] * 3 + after
            assert training_seconds(part, epochs=3) == pytest.approx(expected)


def test_a_resumed_run_continues_at_the_precision_it_started_at(tmp_path, monkeypatch):
    """precision: auto is decided per machine; a run begun in bf16 and resumed where auto says fp32 goes
    on in bf16 (with a warning), so it equals the uninterrupted bf16 run bit for bit."""
    monkeypatch.setenv("PROBSSL_CPU_BF16", "1")  # the machine where bf16 is fast
    full = train(_cfg("simclr", precision="auto"), tmp_path / "full")
    part = train(_cfg("simclr", precision="auto", max_steps=5), tmp_path / "part")
    latest = (part / "checkpoints" / "latest").read_text().strip()
    assert json.loads((part / "checkpoints" / latest / "meta.json").read_text())["precision"] == "bf16"
    monkeypatch.setenv("PROBSSL_CPU_BF16", "0")  # resumed on a machine where auto picks fp32
    with pytest.warns(UserWarning, match="trained at bf16 so far and continues at bf16"):
        train(_cfg("simclr", precision="auto"), tmp_path / "part", resume=True)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert json.loads((part / "train_summary.json").read_text())["precision"] == "bf16"


def test_run_directory_contents_and_eval(tmp_path):
    run = train(_cfg("simclr"), tmp_path / "run")
    for name in ("config.yaml", "model.safetensors", "model.json", "metrics.csv", "train_summary.json"):
        assert (run / name).is_file(), name
    # `auto` is recorded as what it resolved to (fp32: conftest sets PROBSSL_CPU_BF16=0)
    assert json.loads((run / "train_summary.json").read_text())["precision"] == "fp32"
    assert main(["eval", str(run), "--no-progress", "--suite", "basic"]) == 0
    results = json.loads((run / "eval.json").read_text())
    for key in (
        "knn/top1",
        "knn/top1@20",
        "knn/top1@200",
        "linear/top1",
        "linear/nll",
        "seed",
        "config/method",
        "config/train.epochs",
    ):
        assert key in results, key
    assert 0.0 <= results["knn/top1"] <= 1.0
    assert (run / "features" / "test_S1.safetensors").is_file()  # cached for the next probe


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_state(tmp_path, capsys):
    code = main(
        [
            "train",
            "--method",
            "simclr",
            "--dataset",
            "digits",
            "--subset",
            "128",
            "--batch-size",
            "64",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "nan"),
            "--no-progress",
            "optim.lr=1e30",
            "backbone.width=8",
            "train.tensorboard=false",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "loss became" in err and "at step" in err and "optim.lr=" in err
    assert (tmp_path / "nan" / "checkpoints" / "latest").is_file()


def test_torchrun_two_process_training_completes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "probssl.cli",
        "train",
        "--method",
        "simclr",
        "--dataset",
        "digits",
        "--subset",
        "128",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--out",
        str(tmp_path / "ddp"),
        "--no-progress",
        "backbone.width=8",
        "backbone.norm=group",
        "train.tensorboard=false",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4


def test_full_suite_fills_every_prefix(tmp_path, shared_data):
    cfg = _cfg("byol", epochs=1)
    cfg.eval.shift_max_items, cfg.eval.transfer_max_items, cfg.eval.linear_max_iter = 100, 1000, 50
    run = train(cfg, tmp_path / "run")
    assert main(["eval", str(run), "--no-progress", "--data-dir", str(shared_data), "--suite", "full"]) == 0
    results = json.loads((run / "eval.json").read_text())
    for prefix in (
        "cal/ece15",
        "ood/noise/auroc",
        "ood/fashion_mnist/auroc",
        "shift/gaussian_noise/5/acc",
        "lowshot/1pct/top1",
        "lowshot/10pct/top1",
        "transfer/mnist/top1",
        "sel/err_auroc",
        "ret/recall@1",
        "ret/ausc",
        "ret/ece",
    ):
        assert prefix in results, prefix
    assert results["meta/skipped"] == ""
    details = json.loads((run / "eval_details.json").read_text())
    assert {"reliability", "ood", "shift", "sparsification", "ranked_images"} <= set(details)
    assert details["ranked_images"]["classes"] == [str(digit) for digit in range(10)]  # the report names them
    assert len((run / "splits" / "lowshot_1pct_seed0.txt").read_text().split()) >= 10


def test_fit_takes_a_mapping_laid_out_as_a_yaml_config(tmp_path):
    # before: AttributeError: 'dict' object has no attribute 'train'
    settings = {
        "method": "simclr",
        "backbone": {"name": "convnet", "width": 4},
        "data": {"dataset": "digits", "subset": 64},
        "train": {"epochs": 1, "batch_size": 32, "progress": False, "tensorboard": False},
    }
    run = train(settings, tmp_path / "run")
    assert (run / "model.safetensors").is_file()
    saved = (run / "config.yaml").read_text()
    assert "width: 4" in saved and "subset: 64" in saved
    with pytest.raises(TypeError, match="takes a RunConfig .* or a mapping, got str"):
        train("simclr", tmp_path / "other")
