"""What a number was measured on: the processor's name (CPU model, or the GPU for a CUDA device).

Suites are finished over several sessions and the processor changes between them (AVX512-BF16 or
AVX2 only): each run records where it trained, so a table can say whether its rows share a machine.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

#: Instruction-set flags that decide CPU speed here (bf16 autocast is 1.4–3× faster with AVX512-BF16,
#: 6–10× slower without), best first: the model name alone does not tell the machines apart.
_ISA_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model (``/proc/cpuinfo``'s first "model name") with its best vector extension, e.g.
    ``AMD EPYC (avx512_bf16)``: this project's sessions ran on two "AMD EPYC" kinds, one with
    AVX512-BF16 and one with AVX2 only, whose timings differ several-fold."""
    model, flags = "", set()
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    best = next((flag for flag in _ISA_FLAGS if flag in flags), None)
    return f"{model} ({best})" if best else model


def processor_name(device: torch.device | str | None = None) -> str:
    """The processor that runs work on ``device``: the GPU's name for CUDA, the CPU model otherwise."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_name()
