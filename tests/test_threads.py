"""train.threads: every usable core with passive OpenMP waiting, one thread where waiting spins, what the
user or the environment says otherwise (probssl/threads.py has the measurements behind it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from probssl.config import ConfigError, build_config
from probssl.threads import auto_threads, usable_cores
from probssl.train import train

SRC = str(Path(__file__).parents[1] / "src")


def test_auto_threads_follows_the_wait_policy_and_what_was_asked(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert auto_threads(None) == (usable_cores(), "every usable core, passive waiting")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(usable_cores() * 2))  # more ranks than cores: still one each
    assert auto_threads(None)[0] == 1
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # spinning waiters: the count that is never a disaster
    assert auto_threads(None) == (1, "OMP_WAIT_POLICY is not PASSIVE")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the environment (bench --jobs workers) decides
    assert auto_threads(None) == (3, "OMP_NUM_THREADS")
    assert auto_threads(5) == (5, "train.threads")  # and an explicit setting above all


def _wait_policy_after(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = SRC
    probe = f"{code}; import os; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    return subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True
    ).stdout.strip()


def test_import_probssl_asks_for_passive_waiting_only_before_torch_loads():
    assert _wait_policy_after("import probssl") == "PASSIVE"
    assert _wait_policy_after("import torch, probssl") == "unset"  # too late to matter: left alone


def test_train_uses_the_count_records_it_and_restores_the_callers(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cfg = build_config(
        method="simclr",
        data={"dataset": "digits", "subset": 128},
        backbone_args={"width": 8},
        train={"epochs": 1, "batch_size": 64, "progress": False, "tensorboard": False, "threads": 2},
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = train(cfg, tmp_path / "run")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert json.loads((run / "train_summary.json").read_text())["threads"] == 2


def test_a_thread_count_must_be_positive():
    with pytest.raises(ConfigError, match="train.threads must be ≥ 1"):
        build_config(train={"threads": 0})
