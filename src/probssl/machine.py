"""What a number was measured on: the processor's name (CPU model, or the GPU for a CUDA device).

Suites are finished over several sessions and the processor changes between them (AVX512-BF16 or
AVX2 only): each run records where it trained, so a table can say whether its rows share a machine.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s first "model name"), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def processor_name(device: torch.device | str | None = None) -> str:
    """The processor that runs work on ``device``: the GPU's name for CUDA, the CPU model otherwise."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_name()
