"""Atomic writes leave files with the mode the user's umask asks for, not mkstemp's private 0600."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from probssl.checkpoint import save_model
from probssl.io import atomic_write_json, atomic_write_text, current_umask


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)

    old = os.umask(0o022)
    yield set_mask
    os.umask(old)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert current_umask() == mask
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    atomic_write_json(tmp_path / "eval.json", {"x": 1.0})
    save_model(tmp_path, {"w": torch.zeros(2)}, {"method": "m"})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what an ordinary open() gives, as the independent reference
    for name in ("config.yaml", "eval.json", "model.safetensors", "model.json"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == expected == stat.S_IMODE(plain.stat().st_mode), name
