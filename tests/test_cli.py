from __future__ import annotations

import pytest

from probssl.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--method", "simclrr"],
            "unknown method 'simclrr'; valid methods: byol, csghmc, ensemble, lam, pixels, prosmin, scl, simclr, simsiam, vi_simsiam",  # noqa: E501
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
    assert main(["train", "--resume", "--out", out, "--no-progress", "optim.lr=0.5"]) == 2
    assert "optim.lr" in capsys.readouterr().err
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
