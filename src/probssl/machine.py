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


def _cpuinfo_fields(cpuinfo: Path) -> dict[str, str] | None:
    """Each ``key: value`` of ``/proc/cpuinfo`` at its first occurrence (the first processor's), or
    None where there is no such file (macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def _flags(fields: dict[str, str]) -> set[str] | None:
    value = fields.get("flags", fields.get("Features"))  # "Features" on ARM
    return set(value.split()) if value is not None else None


def cpuinfo_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU feature flags of the first processor, or None where /proc/cpuinfo does not exist or
    lists none."""
    return _flags(_cpuinfo_fields(cpuinfo) or {})


def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model (``/proc/cpuinfo``'s first "model name") with its best vector extension, e.g.
    ``AMD EPYC (avx512_bf16)``: this project's sessions ran on two "AMD EPYC" kinds, one with
    AVX512-BF16 and one with AVX2 only, whose timings differ several-fold."""
    fields = _cpuinfo_fields(cpuinfo) or {}
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = _flags(fields) or set()
    best = next((flag for flag in _ISA_FLAGS if flag in flags), None)
    return f"{model} ({best})" if best else model


def processor_name(device: torch.device | str | None = None) -> str:
    """The processor that runs work on ``device``: the GPU's name for CUDA, the CPU model otherwise."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return cpu_name()
