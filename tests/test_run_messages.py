"""What the commands say about a run (issue 30): where its data went, whether it finished, whether it has
a model at all, and progress written into a log file."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from probssl.cli import main
from probssl.config import build_config
from probssl.progress import StageProgress
from probssl.train import train

pytestmark = pytest.mark.usefixtures("single_thread")

QUIET = ["backbone.width=8", "train.tensorboard=false"]


def _photos(root: Path, per_class: int = 12, size: int = 8, corrupt: int = 0) -> Path:
    """Two class folders of small random grey PNGs (and ``corrupt`` unreadable files)."""
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / name / f"{i}.png")
    for i in range(corrupt):
        (root / "cats" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def _train_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> Path:
    """Train on ./pics given as a relative path (as a user types it), from tmp_path/work."""
    work = tmp_path / "work"
    _photos(work / "pics")
    monkeypatch.chdir(work)
    args = ["train", "--method", "simclr", "--dataset", "pics", "--batch-size", "8", "--epochs", "1"]
    assert main([*args, "--out", "run", "--no-progress", *QUIET, *extra]) == 0
    return work / "run"


# ---- 30.9: runs do not depend on where they were made ------------------------------------------


def test_a_run_stores_absolute_data_paths_and_evaluates_from_anywhere(tmp_path, monkeypatch, capsys):
    run = _train_photos(tmp_path, monkeypatch, "--data-dir", "data")
    stored = yaml.safe_load((run / "config.yaml").read_text())["data"]
    assert stored["dataset"] == str(tmp_path / "work" / "pics")
    assert stored["data_dir"] == str(tmp_path / "work" / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["eval", str(run), "--suite", "basic", "--no-progress"]) == 0


def test_moved_photos_are_named_and_found_again_with_dataset(tmp_path, monkeypatch, capsys):
    run = _train_photos(tmp_path, monkeypatch)
    capsys.readouterr()
    moved = tmp_path / "moved" / "pictures"
    moved.parent.mkdir()
    shutil.move(tmp_path / "work" / "pics", moved)
    queries = _photos(tmp_path / "queries", per_class=1)
    for command in (
        ["eval", str(run), "--suite", "basic"],
        ["embed", str(run), str(queries), "--out", "q.npz"],
    ):
        assert main([*command, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "not at" in err and "moved" in err and "--dataset NEWPATH" in err
        assert "unknown dataset" not in err
        assert main([*command, "--no-progress", "--dataset", str(moved)]) == 0
    capsys.readouterr()
    shutil.copytree(queries / "cats", queries / "birds")  # three classes: not the run's two
    assert main(["embed", str(run), str(queries), "--out", "q2.npz", "--dataset", str(queries)]) == 2
    assert "does not hold the run's training images: it has 3 classes" in capsys.readouterr().err


def test_an_unfinished_run_whose_photos_moved_resumes_from_their_new_place(tmp_path, monkeypatch, capsys):
    run = _train_photos(tmp_path, monkeypatch, "train.max_steps=1", "--epochs", "2")
    moved = tmp_path / "pictures"
    shutil.move(tmp_path / "work" / "pics", moved)
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 2
    assert "--dataset NEWPATH" in capsys.readouterr().err
    assert main(["train", "--resume", "--out", str(run), "--no-progress", "--dataset", str(moved)]) == 0
    assert (run / "model.safetensors").is_file()


def test_dataset_points_only_own_images_elsewhere(tmp_path, capsys):
    cfg = build_config(
        method="simclr",
        data={"dataset": "digits", "subset": 128},
        backbone_args={"width": 8},
        train={"epochs": 1, "batch_size": 64, "progress": False, "tensorboard": False},
    )
    run = train(cfg, tmp_path / "digits")
    assert main(["eval", str(run), "--dataset", str(tmp_path), "--no-progress"]) == 2
    assert "--data-dir" in capsys.readouterr().err


# ---- 30.10 / 30.11: unfinished runs ---------------------------------------------------------------


def test_an_interrupted_run_is_evaluated_embedded_and_reported_with_one_warning(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "simclr", "--dataset", "digits", "--subset", "128", "--batch-size", "64"]
    assert (
        main([*args, "--epochs", "2", "--out", str(out), "--no-progress", *QUIET, "train.max_steps=1"]) == 0
    )
    capsys.readouterr()
    queries = _photos(tmp_path / "queries", per_class=1)
    with pytest.warns(UserWarning, match=r"trained 1 of 4 steps .*probssl train --resume --out") as caught:
        assert main(["eval", str(out), "--suite", "basic", "--no-progress"]) == 0
    assert len([w for w in caught if "trained 1 of 4" in str(w.message)]) == 1
    from probssl import runs

    runs._WARNED_INTERRUPTED.clear()  # a new command is a new process
    with pytest.warns(UserWarning, match=r"trained 1 of 4 steps"):
        assert main(["embed", str(out), str(queries), "--out", str(tmp_path / "e.npz"), "--no-progress"]) == 0
    runs._WARNED_INTERRUPTED.clear()
    with pytest.warns(UserWarning, match=r"trained 1 of 4 steps \(its eval.json is of that model\)"):
        assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0


def test_a_run_with_only_its_config_has_no_trained_model(tmp_path, monkeypatch, capsys):
    run = _train_photos(tmp_path, monkeypatch)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare / "config.yaml")  # killed before anything else was written
    assert main(["eval", str(bare), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "has no trained model" in err and "unknown dataset" not in err and "--resume" in err


# ---- 30.13: messages --------------------------------------------------------------------------------


def test_train_says_what_it_trains_and_where_it_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--method", "simclr", "--dataset", "digits", "--subset", "128", "--batch-size", "64"]
    assert main([*args, "--epochs", "2", "--out", str(out), *QUIET, "train.max_steps=1"]) == 0
    printed = capsys.readouterr()
    start = printed.out.splitlines()[0]
    for part in (
        "simclr on digits",
        "128 images of 8×8×1",
        "backbone convnet",
        "M trainable parameters",
        "cpu",
    ):
        assert part in start, part
    assert re.search(r"(fp32|bf16) on cpu, \d+ threads?", start)
    # a log file gets one line per stage, never carriage-return frames
    assert "\r" not in printed.err and re.search(r"^simclr: 1 step in [\d.]+ s, loss", printed.err, re.M)
    assert main(["train", "--resume", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("resumed at step 1 of 4: simclr on digits")


def test_skipped_images_are_counted_at_the_start(tmp_path, capsys):
    pics = _photos(tmp_path / "pics", corrupt=2)
    args = ["train", "--method", "simclr", "--dataset", str(pics), "--batch-size", "8", "--epochs", "1"]
    assert (
        main([*args, "--out", str(tmp_path / "run"), "--no-progress", *QUIET, "data.skip_corrupt=true"]) == 0
    )
    assert "skipped 2 unreadable images (data.skip_corrupt), listed in" in capsys.readouterr().out


def test_evaluation_stages_in_a_log_are_lines_with_nothing_empty(tmp_path, capsys):
    cfg = build_config(
        method="simclr",
        data={"dataset": "digits", "subset": 128},
        backbone_args={"width": 8},
        train={"epochs": 1, "batch_size": 64, "progress": False, "tensorboard": False},
    )
    run = train(cfg, tmp_path / "run")
    capsys.readouterr()
    assert main(["eval", str(run), "--suite", "basic"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and re.search(r"^features: 1,797 img in [\d.]+ s$", err, re.M)
    assert main(["eval", str(run), "--suite", "basic"]) == 0  # features cached: no features line at all
    err = capsys.readouterr().err
    assert "features" not in err and " 0 img" not in err and "probes: 2 probes in" in err


def test_a_stage_bar_on_a_terminal_never_grows_its_total(capsys):
    bar = StageProgress("features", total=None, terminal=True)
    bar.update(1257)  # the train split ...
    bar.update(540)  # ... then the test split: a count, not a 100% that becomes 70%
    bar.close()
    err = capsys.readouterr().err
    assert "1797img" in err and "%" not in err
    StageProgress("uncertainty", terminal=True).close()  # nothing counted: nothing drawn
    assert capsys.readouterr().err == ""


def test_embed_of_one_image_says_image(tmp_path, capsys):
    cfg = build_config(
        method="simclr",
        data={"dataset": "digits", "subset": 128},
        backbone_args={"width": 8},
        train={"epochs": 1, "batch_size": 64, "progress": False, "tensorboard": False},
    )
    run = train(cfg, tmp_path / "run")
    one = _photos(tmp_path / "one", per_class=1) / "cats" / "0.png"
    assert main(["embed", str(run), str(one), "--out", str(tmp_path / "e.npz"), "--no-progress"]) == 0
    assert "embedded 1 image (" in capsys.readouterr().out


def test_a_truncated_compressed_tar_says_so_once(tmp_path, capsys):
    import tarfile

    pics = _photos(tmp_path / "pics")
    with tarfile.open(tmp_path / "pics.tar", "w") as tar:
        tar.add(pics, arcname="pics")
    (tmp_path / "cut.tar.gz").write_bytes(gzip.compress((tmp_path / "pics.tar").read_bytes())[:300])
    args = [
        "train",
        "--method",
        "simclr",
        "--dataset",
        str(tmp_path / "cut.tar.gz"),
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("damaged or truncated") == 1


def test_an_evaluation_only_set_is_refused_as_a_training_set(tmp_path, capsys):
    args = ["train", "--method", "simclr", "--dataset", "tiny_imagenet_val", "--out", str(tmp_path / "r")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "evaluation-only set" in err and "unknown split" not in err


def test_every_bundled_config_is_in_the_readme():
    from probssl.config import bundled_configs

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name in bundled_configs():
        assert re.search(rf"`(--config )?{name}`", readme), name
