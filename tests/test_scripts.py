"""The shell scripts in scripts/: refuse bad arguments with a message, and do their job on a tiny run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / name), *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_compare_eval_refuses_bad_arguments(tmp_path: Path) -> None:
    assert _script("compare_eval.sh").returncode == 2
    done = _script("compare_eval.sh", str(tmp_path), str(tmp_path))
    assert done.returncode == 2 and "not a probssl checkout" in done.stderr
    done = _script("compare_eval.sh", str(REPO), str(tmp_path))
    assert done.returncode == 2 and "no model.safetensors" in done.stderr


@pytest.mark.slow
def test_compare_eval_of_one_checkout_against_itself_finds_identical_numbers(tmp_path: Path) -> None:
    from probssl.config import build_config
    from probssl.train import train

    cfg = build_config(
        None,
        ["backbone.width=8", "eval.shift_max_items=40", "eval.linear_max_iter=15"],
        method="simclr",
        data={"dataset": "digits", "subset": 128, "data_dir": str(tmp_path / "no-data"), "download": False},
        train={"epochs": 1, "batch_size": 32, "progress": False, "tensorboard": False},
    )
    run_dir = train(cfg, tmp_path / "run")
    (tmp_path / "no-data").mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    done = _script("compare_eval.sh", str(REPO), str(run_dir), str(tmp_path / "no-data"), env=env)
    assert done.returncode == 0, done.stderr
    counted = next(line for line in done.stdout.splitlines() if " numbers, " in line)
    total, identical = counted.split(" numbers, ")[0], counted.split(", ")[1].split(" identical")[0]
    assert int(total) > 20 and identical == total  # same code, same thread count: bit for bit


def test_screenshot_report_says_what_to_install_without_chromium(tmp_path: Path) -> None:
    bare = tmp_path / "bin"
    bare.mkdir()
    for tool in ("bash", "realpath", "mkdir", "dirname"):
        found = shutil.which(tool)
        if found:
            (bare / tool).symlink_to(found)
    done = _script("screenshot_report.sh", "report.html", str(tmp_path / "out"), env={"PATH": str(bare)})
    assert done.returncode == 2 and "apt-get install chromium" in done.stderr
