"""Which floating-point precision a run computes in: ``train.precision: auto`` resolved per machine.

Why not "bf16 whenever asked for speed": on a GPU with bf16 tensor cores autocast is a clear win, and on
CPUs with native bf16 dot products (AVX512-BF16, AMX) oneDNN runs bf16 convolutions 1.4-3x faster than
fp32; but on a CPU without them (AVX2-only, or AVX512 without the BF16 extension) every bf16 op is
emulated and the same step is 6-10x *slower*. So ``auto`` picks bf16 on the CPU only where it is fast,
decided in two stages:

1. a capability check (cheap, no timing): the CPU must advertise ``avx512_bf16`` or ``amx_bf16`` in
   ``/proc/cpuinfo`` (where that file exists; elsewhere oneDNN's own check,
   ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, which is looser: it also says yes on AVX512
   without BF16);
2. a timed probe, once per process: a small conv stack's forward + backward in fp32 and under bf16
   autocast, interleaved, best of a few repeats. bf16 is chosen only if it is at least
   ``MIN_BF16_SPEEDUP`` times faster. This is the honest test: it measures what the flags only promise,
   with this process's thread count and torch build.

Explicit ``fp32`` / ``bf16`` are always respected (benchmarks that must compare at one precision).
``PROBSSL_CPU_BF16=0`` / ``=1`` in the environment replaces the CPU verdict (check and probe) by hand: the
test suite sets 0 so that its runs, subprocesses included, compute alike on every machine.
"""

from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F

from probssl.config import ConfigError
from probssl.machine import cpuinfo_flags

__all__ = [
    "CPU_BF16_ENV",
    "MIN_BF16_SPEEDUP",
    "PRECISIONS",
    "cpu_bf16_is_fast",
    "cpu_has_native_bf16",
    "resolve_precision",
]

PRECISIONS = ("auto", "fp32", "bf16")

#: bf16 must beat fp32 by this factor in the probe; a marginal win is not worth bf16's rounding.
MIN_BF16_SPEEDUP = 1.1

_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

#: Environment variable that overrides the CPU verdict: "1" bf16, "0" fp32.
CPU_BF16_ENV = "PROBSSL_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Does the CPU have bf16 dot-product instructions (not only emulation)?"""
    flags = cpuinfo_flags()
    if flags is not None:
        return any(flag in flags for flag in _NATIVE_BF16_FLAGS)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _probe_step(weights: list[torch.Tensor], x: torch.Tensor, bf16: bool) -> None:
    """Forward + backward of a 3-layer conv stack (the shape of a small CIFAR encoder)."""
    for w in weights:
        w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        h = x
        for i, w in enumerate(weights):
            h = F.relu(F.conv2d(h, w, stride=1 if i == 0 else 2, padding=1))
        loss = h.float().mean()
    loss.backward()


def bf16_speedup_probe(repeats: int = 3, batch: int = 32) -> float:
    """fp32 time / bf16 time of a small conv fwd+bwd on the CPU (> 1: bf16 is faster)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    shapes = [(32, 3), (64, 32), (128, 64)]
    weights = [(torch.randn(o, i, 3, 3, generator=gen) * 0.1).requires_grad_() for o, i in shapes]
    best = {False: float("inf"), True: float("inf")}
    for bf16 in (False, True):  # warm-up: oneDNN builds its kernels on first use
        _probe_step(weights, x, bf16)
    for _ in range(repeats):
        for bf16 in (False, True):
            start = time.perf_counter()
            _probe_step(weights, x, bf16)
            best[bf16] = min(best[bf16], time.perf_counter() - start)
    return best[False] / max(best[True], 1e-12)


def cpu_bf16_is_fast() -> bool:
    """The CPU verdict: ``PROBSSL_CPU_BF16`` if set, else native bf16 and a measured speed-up of at least
    ``MIN_BF16_SPEEDUP`` (probed once per process)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ConfigError(f"{CPU_BF16_ENV} must be 0 or 1 (or unset to measure), got {forced!r}")
    return _measured_cpu_bf16_is_fast()


@functools.cache
def _measured_cpu_bf16_is_fast() -> bool:
    return cpu_has_native_bf16() and bf16_speedup_probe() >= MIN_BF16_SPEEDUP


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """``"bf16"`` or ``"fp32"``: the precision a run asking for ``requested`` computes in on ``device``."""
    if requested not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested != "auto":
        return requested
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_bf16_is_fast() else "fp32"
    return "fp32"
