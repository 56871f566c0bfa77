from __future__ import annotations

import json

import numpy as np
import pytest

from probssl.cli import main
from probssl.methods import METHODS


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--method", "simclrr"],
            f"unknown method 'simclrr'; valid methods: {', '.join(METHODS.names())}",  # every registered one
        ),
        (["train", "--dataset", "imagenet"], "unknown dataset"),
        (["train", "--backbone", "vit"], "unknown backbone 'vit'"),
        (["train", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["train", "train.epochs=many"], "must be an integer"),
        (["train", "--method", "simclr", "method.temprature=1"], "unknown config key 'method.temprature'"),
        (["train", "--batch-size", "5000"], "larger than the training set"),
        (["eval", "does/not/exist"], "not a probssl run directory"),
        (["train", "--config", "nope.yaml"], "config file not found"),
    ],
)
def test_bad_input_gives_one_clear_error(tmp_path, capsys, argv, message):
    argv = [*argv, "--out", str(tmp_path / "run")] if argv[0] == "train" else argv
    assert main([*argv, "--no-progress"] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_list_names_everything(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "simclr" in out and "digits" in out and "convnet" in out


def test_resume_without_a_run_is_refused(tmp_path, capsys):
    assert main(["train", "--resume", "--out", str(tmp_path / "none"), "--no-progress"]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_cli_resume_continues_and_refuses_a_changed_config(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = [
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
        out,
        "--no-progress",
        "backbone.width=8",
        "train.tensorboard=false",
    ]
    assert main([*base, "train.max_steps=1"]) == 0
    assert not (tmp_path / "run" / "model.safetensors").exists()
    said = capsys.readouterr().out.splitlines()  # the start line, then the result
    assert said[-1].startswith("stopped simclr on digits at step 1 of 4 (train.max_steps)")
    assert main(["train", "--resume", "--out", out, "--no-progress", "optim.lr=0.5"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", out, "--no-progress"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_max_steps_zero_says_nothing_was_trained_and_resume_starts_it(tmp_path, capsys):
    # max_steps=0 writes the run's settings and no checkpoint: the message must not claim a step count it
    # does not know ("step 0 of ?") — it says so, and --resume then trains the run from step 0.
    out = str(tmp_path / "run")
    argv = ["train", "--method", "simclr", "--dataset", "digits", "--subset", "64", "--batch-size", "32"]
    argv += ["--epochs", "1", "--out", out, "--no-progress", "backbone.width=8", "train.tensorboard=false"]
    assert main([*argv, "train.max_steps=0"]) == 0
    said = capsys.readouterr().out.splitlines()[-1]
    assert said.startswith("stopped simclr on digits before its first step (train.max_steps=0)")
    assert "?" not in said and "no checkpoint" in said
    assert main(["train", "--resume", "--out", out, "--no-progress"]) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_overrides_may_sit_anywhere_among_the_flags(tmp_path, capsys):
    # The second group of key=value pairs is parsed as overrides (its typo is reported as a config key) ...
    argv = ["train", "optim.lr=0.1", "--method", "simclr", "--no-progress", "method.temprature=1"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    assert "unknown config key 'method.temprature'" in capsys.readouterr().err
    # ... while a stray word that is not key=value is still refused by the argument parser.
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "simclr", "stray", "--no-progress", "junk"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: junk" in capsys.readouterr().err


def _tiny_train(out, *extra):
    return [
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
        str(out),
        "--no-progress",
        "backbone.width=8",
        "train.tensorboard=false",
        *extra,
    ]


def test_ctrl_c_stops_cleanly_and_the_run_resumes_to_the_end(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from probssl.checkpoint import latest_checkpoint, load_checkpoint

    out = tmp_path / "run"
    # 4 steps per epoch, a checkpoint every step: Ctrl-C lands mid-run, possibly mid-checkpoint.
    argv = [*_tiny_train(out, "train.checkpoint_every=1", "train.log_every=1")]
    argv[argv.index("--subset") + 1], argv[argv.index("--epochs") + 1] = "256", "400"
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    # A shell's background job (CI, `cmd &`) inherits SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored: restore the default in the child so it gets Ctrl-C as a terminal user's process does.
    proc = subprocess.Popen(
        [sys.executable, "-m", "probssl", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    while latest_checkpoint(out) is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=60))
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "trained" not in stdout
    assert f"probssl train --resume --out {out}" in stderr
    stopped_at = int(load_checkpoint(latest_checkpoint(out))["meta"]["step"])  # intact and verifiable
    assert 0 < stopped_at < 1600
    # Continue it (to a few steps past the interruption, as the full 1,600 would take too long here).
    assert (
        main(["train", "--resume", "--out", str(out), "--no-progress", f"train.max_steps={stopped_at + 3}"])
        == 0
    )
    assert int(load_checkpoint(latest_checkpoint(out))["meta"]["step"]) == stopped_at + 3


def test_resume_says_what_it_does(tmp_path, capsys):
    out = tmp_path / "run"
    # A directory with a config but no checkpoint (stopped before its first one): it starts from step 0.
    assert main([*_tiny_train(out), "train.max_steps=0"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "has no checkpoint yet; training it from step 0" in captured.err and "trained" in captured.out
    # Resuming a finished run trains nothing and says so.
    assert main(["train", "--resume", "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "already finished" in captured.out and "trained" not in captured.out
    # ... unless asked to change it: that is refused as for any resumption, not called finished.
    assert main(["train", "--resume", "--out", str(out), "--no-progress", "--epochs", "5"]) == 2
    assert "train.epochs: 2 → 5" in capsys.readouterr().err


def test_corrupt_final_weights_name_the_fix_that_works(tmp_path, capsys):
    from probssl.runs import load_run

    out = tmp_path / "run"
    assert main(_tiny_train(out)) == 0
    good = (out / "model.safetensors").read_bytes()
    timing = json.loads((out / "train_summary.json").read_text())
    assert timing["processor"] and timing["precision"] == "fp32"
    timing["processor"] = "the machine that trained it"  # the repair runs elsewhere: it must not claim it
    (out / "train_summary.json").write_text(json.dumps(timing))
    (out / "model.safetensors").write_bytes(good[:-8] + b"\0" * 8)
    assert main(["eval", str(out), "--suite", "basic", "--no-progress"]) == 2
    err = capsys.readouterr().err
    fix = f"probssl train --resume --out {out}"
    assert fix in err and "without --resume" not in err
    assert main(fix.split()[1:] + ["--no-progress"]) == 0  # the advice works as printed
    assert (out / "model.safetensors").read_bytes() == good
    load_run(out)
    # The repair trained no step: the summary keeps the run's own timing (evaluation's cost columns use it).
    repaired = json.loads((out / "train_summary.json").read_text())
    assert (
        repaired["seconds_per_epoch"] == timing["seconds_per_epoch"] and repaired["steps"] == timing["steps"]
    )
    assert repaired["processor"] == "the machine that trained it"


def test_a_subset_larger_than_the_dataset_is_refused(tmp_path, capsys):
    argv = _tiny_train(tmp_path / "run")
    argv[argv.index("--subset") + 1] = "100000"
    assert main(argv) == 2
    assert "data.subset=100000 is larger than the training set" in capsys.readouterr().err


def test_warnings_print_as_one_line(monkeypatch):
    import warnings

    import probssl.cli as cli

    seen = []

    def format_two(args):  # what Python prints for a warning is formatwarning's text
        seen.append(warnings.formatwarning("skipped ood/mnist (not found)\n  detail", UserWarning, "x.py", 3))
        seen.append(warnings.formatwarning("old API", DeprecationWarning, "x.py", 3, "source line"))
        return 0

    monkeypatch.setitem(cli.COMMANDS, "list", format_two)
    standard = warnings.formatwarning
    assert main(["list"]) == 0
    assert seen == [
        "warning: skipped ood/mnist (not found) detail\n",
        "warning (DeprecationWarning): old API\n",
    ]
    assert warnings.formatwarning is standard  # restored for the library's other users


def test_only_rank_zero_reports_the_run(tmp_path, capsys, monkeypatch):
    import torch

    import probssl.train
    from probssl.checkpoint import save_model

    def finished_run(cfg, out, resume=False):  # what each rank runs, as far as the CLI can tell
        save_model(out, {"w": torch.zeros(1)}, {"method": cfg.method})
        return out

    monkeypatch.setattr(probssl.train, "train", finished_run)
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it for the second process
    assert main(_tiny_train(tmp_path / "run")) == 0
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    assert main(_tiny_train(tmp_path / "run")) == 0
    assert capsys.readouterr().out.startswith("trained simclr on digits")


@pytest.mark.parametrize(("layout", "said"), [("flat", "unlabelled images"), ("one_class", "a single class")])
def test_eval_of_a_run_without_two_classes_says_what_works_instead(tmp_path, capsys, layout, said):
    # It failed inside the kNN vote (index -1) or the probe (division by zero) before.
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "pics" / ("only" if layout == "one_class" else "")
    folder.mkdir(parents=True)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = str(tmp_path / "run")
    argv = ["train", "--method", "simclr", "--dataset", str(tmp_path / "pics"), "--epochs", "1"]
    argv += [
        "--batch-size",
        "8",
        "--out",
        out,
        "--no-progress",
        "backbone.width=4",
        "train.tensorboard=false",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["eval", out, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said in err[0] and "probssl embed" in err[0]
    assert not (tmp_path / "run" / "eval.json").exists()
