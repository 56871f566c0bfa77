"""Shared fixtures: the official data beside the checkout (../shared/data) when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# `train.precision: auto` picks bf16 on CPUs where a timed probe finds it fast; tests (and the
# subprocesses they start) compute in fp32 on every machine instead. tests/test_precision.py
# exercises the probe itself.
os.environ.setdefault("PROBSSL_CPU_BF16", "0")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PROBSSL_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "fashion_mnist").is_dir():
        pytest.skip(f"official data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def single_thread():
    """One intra-op thread for the test, then the previous count back.

    Tiny tensor ops on a shared 2-core box are far slower with two spinning intra-op threads than
    with one. Test modules opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _private_image_cache(tmp_path_factory: pytest.TempPathFactory):
    """Decoded-image caches of the test session go to a temp folder, never to ~/.cache/probssl."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PROBSSL_CACHE", str(tmp_path_factory.mktemp("probssl-cache")))
        yield
