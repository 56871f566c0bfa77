"""`train.precision: auto`: bf16 on the CPU only where the CPU has it natively and a probe finds it fast."""

from __future__ import annotations

import pytest
import torch

from probssl import precision
from probssl.config import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def measured(monkeypatch):
    """No env override, a fresh cache, and knobs for the capability check and the probe's speed-up."""
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    precision._measured_cpu_bf16_is_fast.cache_clear()
    calls = {"probe": 0}
    knobs = {"native": True, "speedup": 2.0}

    def probe() -> float:
        calls["probe"] += 1
        return knobs["speedup"]

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: knobs["native"])
    monkeypatch.setattr(precision, "bf16_speedup_probe", probe)
    yield knobs, calls
    precision._measured_cpu_bf16_is_fast.cache_clear()


@pytest.mark.parametrize(
    ("native", "speedup", "expected"),
    [(True, 2.0, "bf16"), (True, 0.15, "fp32"), (True, 1.05, "fp32"), (False, 2.0, "fp32")],
)
def test_auto_on_cpu_follows_flags_and_probe(measured, native, speedup, expected):
    knobs, calls = measured
    knobs.update(native=native, speedup=speedup)
    assert precision.resolve_precision("auto", "cpu") == expected
    assert calls["probe"] == (1 if native else 0)  # no timing where the CPU has no native bf16


def test_probe_runs_once_per_process(measured):
    _, calls = measured
    for _ in range(3):
        precision.resolve_precision("auto", torch.device("cpu"))
    assert calls["probe"] == 1


@pytest.mark.parametrize("requested", ["fp32", "bf16"])
@pytest.mark.parametrize("native", [True, False])
def test_explicit_precision_is_respected(measured, requested, native):
    knobs, calls = measured
    knobs.update(native=native, speedup=0.1 if requested == "bf16" else 3.0)
    assert precision.resolve_precision(requested, "cpu") == requested
    assert calls["probe"] == 0


def test_environment_overrides_the_probe(measured, monkeypatch):
    knobs, calls = measured
    monkeypatch.setenv(precision.CPU_BF16_ENV, "1")
    knobs.update(native=False)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setenv(precision.CPU_BF16_ENV, "0")
    knobs.update(native=True, speedup=5.0)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    assert calls["probe"] == 0
    monkeypatch.setenv(precision.CPU_BF16_ENV, "yes")
    with pytest.raises(ConfigError, match="0 or 1"):
        precision.resolve_precision("auto", "cpu")


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="auto, fp32, bf16"):
        precision.resolve_precision("fp16", "cpu")


def test_cuda_auto_follows_bf16_support(monkeypatch):
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert precision.resolve_precision("auto", "cuda") == expected


def test_native_flag_check_reads_cpuinfo(monkeypatch):
    monkeypatch.setattr(precision, "cpuinfo_flags", lambda: {"avx2", "fma"})
    assert not precision.cpu_has_native_bf16()
    monkeypatch.setattr(precision, "cpuinfo_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert precision.cpu_has_native_bf16()
    monkeypatch.setattr(precision, "cpuinfo_flags", lambda: {"amx_bf16", "amx_tile"})
    assert precision.cpu_has_native_bf16()
    # No /proc/cpuinfo (macOS, Windows): oneDNN's own check decides.
    monkeypatch.setattr(precision, "cpuinfo_flags", lambda: None)
    assert precision.cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_probe_measures_a_ratio_of_two_timings(monkeypatch):
    """The probe's number is fp32 time / bf16 time: feed it a fake clock where bf16 steps take 3x less."""
    durations = {False: 0.3, True: 0.1}
    clock = {"now": 0.0, "mode": None}

    def fake_step(weights, x, bf16):
        clock["mode"] = bf16

    def fake_time():
        if clock["mode"] is not None:
            clock["now"] += durations[clock["mode"]]
            clock["mode"] = None
        return clock["now"]

    monkeypatch.setattr(precision, "_probe_step", fake_step)
    monkeypatch.setattr(precision.time, "perf_counter", fake_time)
    assert precision.bf16_speedup_probe(repeats=2) == pytest.approx(3.0)


def test_probe_step_runs_both_precisions():
    """The real probe step computes gradients in both modes (bf16 autocast on convs, fp32 master weights)."""
    w = [(torch.randn(8, 3, 3, 3) * 0.1).requires_grad_()]
    x = torch.randn(2, 3, 8, 8)
    grads = []
    for bf16 in (False, True):
        precision._probe_step(w, x, bf16)
        grads.append(w[0].grad.clone())
        assert w[0].grad.dtype == torch.float32
    torch.testing.assert_close(grads[1], grads[0], rtol=0.05, atol=0.02)
