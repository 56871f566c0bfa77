"""What a run directory survives (issue 30): a second trainer into the same --out, an --out that names a
run's own files, a kill between a log line and its checkpoint, a nonsense --samples."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from probssl.apply_run import write_embeddings
from probssl.checkpoint import checkpoint_root
from probssl.cli import main
from probssl.config import build_config
from probssl.output_files import is_embedding_file, is_report
from probssl.run_lock import TRAIN_LOCK, run_lock
from probssl.train import TrainingError, train

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--dataset", "digits", "--subset", "128", "--batch-size", "64", "--no-progress"]
QUIET = ["backbone.width=8", "train.tensorboard=false"]


def _cfg(**train_args):
    train_args = {"epochs": 1, "batch_size": 64, "progress": False, "tensorboard": False, **train_args}
    return build_config(
        method="simclr",
        data={"dataset": "digits", "subset": 128},
        backbone_args={"width": 8},
        train=train_args,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from probssl.eval.evaluate import evaluate_run

    run_dir = train(_cfg(), tmp_path_factory.mktemp("runs") / "simclr")
    evaluate_run(run_dir, progress=False, suite_name="basic")  # report leaves unevaluated runs out
    return run_dir


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- 30.1: one trainer per run directory -----------------------------------------------------------


def test_a_second_trainer_into_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    out = tmp_path / "race"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    first = subprocess.Popen(
        [sys.executable, "-m", "probssl", "train", "--method", "simclr", *TINY, "--epochs", "500",
         "--out", str(out), *QUIET],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        lock = out / TRAIN_LOCK
        deadline = time.monotonic() + 120
        while not (lock.is_file() and lock.read_text() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, (
                "the first trainer never took its lock"
            )
            time.sleep(0.1)
        code = main(["train", "--method", "byol", *TINY, "--epochs", "2", "--out", str(out), *QUIET])
        err = capsys.readouterr().err.strip()
        assert code == 2
        assert err.startswith("error: ") and "\n" not in err and f"process {first.pid}" in err
        assert first.poll() is None  # the first one trains on, untouched
    finally:
        first.kill()
        first.wait()
    config = out / "config.yaml"
    assert not config.is_file() or "method: simclr" in config.read_text()  # never byol's


def test_the_lock_of_a_killed_trainer_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # what run_lock does (flock the file, write the pid), without importing torch in the holder
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR, 0o644)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "os.write(fd, str(os.getpid()).encode()); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(out / TRAIN_LOCK)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TrainingError, match=f"process {holder.pid}"):  # alive: refused
        train(_cfg(), out)
    holder.kill()  # kill -9: its lock file stays behind, naming a dead process
    holder.wait()
    assert (out / TRAIN_LOCK).read_text() == str(holder.pid)
    train(_cfg(), out)
    assert (out / "model.safetensors").is_file() and not (out / TRAIN_LOCK).exists()


def test_a_killed_trainers_forked_workers_do_not_keep_its_lock(tmp_path):
    """A streaming run's DataLoader workers are forked with the lock's descriptor: after kill -9 of the
    trainer they live on for a while (or for good, orphaned), and must not keep the run locked."""
    import signal

    module = Path(__file__).parents[1] / "src" / "probssl" / "run_lock.py"
    code = (  # the real module, loaded without the package (no torch import in the holder)
        "import importlib.util, os, sys, time; from pathlib import Path\n"
        "spec = importlib.util.spec_from_file_location('run_lock', sys.argv[1])\n"
        "lock = importlib.util.module_from_spec(spec); spec.loader.exec_module(lock)\n"
        "with lock.run_lock(Path(sys.argv[2]), lock.TRAIN_LOCK):\n"
        "    child = os.fork()\n"
        "    if child == 0:\n"  # the child speaks once its after-fork hooks (closing the lock) have run
        "        print(os.getpid(), flush=True); time.sleep(60); os._exit(0)\n"
        "    time.sleep(60)"
    )
    run_dir = tmp_path / "run"
    trainer = subprocess.Popen(
        [sys.executable, "-c", code, str(module), str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    worker = int(trainer.stdout.readline())
    try:
        trainer.kill()
        trainer.wait()
        with run_lock(run_dir, TRAIN_LOCK):  # taken over although the worker still lives
            assert (run_dir / TRAIN_LOCK).read_text() == str(os.getpid())
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_refused_config_leaves_no_empty_run_directory(tmp_path):
    from probssl.config import ConfigError

    with pytest.raises(ConfigError, match="larger than the training set"):
        train(_cfg(batch_size=4096), tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_the_lock_is_the_same_mechanism_as_the_benchmarks(tmp_path):
    """`probssl train` inside a suite's run (the suite holds .bench.lock) takes its own lock beside it."""
    with run_lock(tmp_path / "run"):
        train(_cfg(), tmp_path / "run")
    assert (tmp_path / "run" / "model.safetensors").is_file()


# ---- 30.2: an --out that is not the command's own ----------------------------------------------


def test_report_refuses_to_overwrite_a_runs_model(run, capsys):
    model = run / "model.safetensors"
    before = _digest(model)
    assert main(["report", str(run), "--out", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "\n" not in err and "file of the run" in err
    assert _digest(model) == before


def test_report_replaces_its_own_page_only(run, tmp_path, capsys):
    page = tmp_path / "report.html"
    assert main(["report", str(run), "--out", str(page)]) == 0
    assert is_report(page)
    assert main(["report", str(run), "--out", str(page)]) == 0  # its own page: rewritten
    for name, text in (("notes.txt", "mine"), ("other.html", "<html><body>someone's page</body></html>")):
        (tmp_path / name).write_text(text)
        assert main(["report", str(run), "--out", str(tmp_path / name)]) == 2
        assert (tmp_path / name).read_text() == text
    assert main(["report", str(run), "--out", str(tmp_path)]) == 2  # a directory
    assert "is a directory" in capsys.readouterr().err


def test_embed_refuses_an_out_whose_csv_is_the_runs_training_log(run, tmp_path, capsys):
    log = run / "metrics.csv"
    before = _digest(log)
    images = tmp_path / "images"
    images.mkdir()
    code = main(["embed", str(run), str(images), "--out", str(run / "metrics.npz"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "metrics.csv" in err and "\n" not in err
    assert _digest(log) == before and not (run / "metrics.npz").exists()


def test_embed_recognises_its_own_files(tmp_path):
    result = {
        "embedding": np.zeros((2, 3), np.float32),
        "uncertainty": np.zeros(2, np.float32),
        "ood_score": np.ones(2, np.float32),
        "ood_pvalue": np.full(2, 0.5),
        "ood_flag": np.zeros(2, bool),
        "path": np.array(["a.png", "b.png"]),
    }
    npz, table = write_embeddings(result, tmp_path / "new")
    assert is_embedding_file(npz) and is_embedding_file(table)
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    (tmp_path / "foreign.csv").write_text("step,loss\n1,2.0\n")
    assert not is_embedding_file(tmp_path / "foreign.npz") and not is_embedding_file(tmp_path / "foreign.csv")


def test_table_update_refuses_a_runs_files_and_binary_files(run, capsys):
    config = run / "config.yaml"
    before = _digest(config)
    for target in (config, run / "model.safetensors"):
        assert main(["table", str(run), "--update", str(target), "--section", "x"]) == 2
    assert _digest(config) == before
    assert capsys.readouterr().err.count("error: --update") == 2


# ---- 30.8: the training log after kill -9 and --resume ------------------------------------------


def _logged_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [int(row["step"]) for row in csv.DictReader(handle)]


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    args = {"epochs": 3, "log_every": 1, "checkpoint_every": 4, "tensorboard": True}
    train(_cfg(**args, max_steps=6), out)  # 2 steps per epoch; checkpoints at 4 and 6, log rows 1..6
    # kill -9 after step 6 was logged but before its checkpoint: only the one at step 4 survives
    root = checkpoint_root(out)
    import shutil

    shutil.rmtree(root / "step_00000006")
    (root / "latest").write_text("step_00000004\n")
    assert _logged_steps(out) == [1, 2, 3, 4, 5, 6]
    train(_cfg(**args), out, resume=True)
    assert _logged_steps(out) == [1, 2, 3, 4, 5, 6]  # 5 and 6 once each, from the resumed run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]


def test_a_fresh_start_begins_a_new_log(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text(
        "step,epoch,loss,other\n7,0,1.0,x\n"
    )  # a killed attempt's, no checkpoint
    train(_cfg(log_every=1), out)
    assert _logged_steps(out) == [1, 2]
    assert "other" not in (out / "metrics.csv").read_text().splitlines()[0]


# ---- 30.7: embed --samples ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def csghmc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = build_config(
        method="csghmc",
        method_args={"cycles": 1, "samples_per_cycle": 2},
        data={"dataset": "digits", "subset": 256},
        backbone_args={"width": 8},
        train={"epochs": 2, "batch_size": 64, "progress": False, "tensorboard": False},
    )
    return train(cfg, tmp_path_factory.mktemp("runs") / "csghmc")


@pytest.mark.parametrize("samples", ["0", "-3", "3"])
def test_embed_samples_must_be_a_positive_count_of_the_runs_draws(csghmc_run, tmp_path, samples, capsys):
    images = tmp_path / "images"
    images.mkdir()
    out = tmp_path / "e.npz"
    assert main(["embed", str(csghmc_run), str(images), "--out", str(out), "--samples", samples]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --samples") and "\n" not in err and not out.exists()
    if samples == "3":
        assert "2 posterior draws" in err and "1 to 2" in err


def test_eval_samples_must_be_positive(run, capsys):
    assert main(["eval", str(run), "--samples", "0", "--no-progress"]) == 2
    assert "error: --samples must be a positive integer" in capsys.readouterr().err


def test_training_into_a_run_that_exists_names_the_flag_and_the_python_argument(tmp_path):
    out = tmp_path / "run"
    train(_cfg(max_steps=1, epochs=2), out)  # a checkpoint, not finished
    with pytest.raises(TrainingError, match=r"already holds a run; pass --resume \(Python: resume=True\)"):
        train(_cfg(epochs=2), out)
