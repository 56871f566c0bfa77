"""Where a benchmark number came from: the commit, the date and the machine."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

import torch

from probssl.machine import cpu_name


def git_commit(cwd: str | Path = ".") -> str:
    """``HEAD``'s short hash, ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=cwd, capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def provenance() -> dict[str, str | int]:
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "processor": cpu_name(),
        "cpus": os.cpu_count() or 0,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
