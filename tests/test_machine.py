"""The processor a run records: model name plus the vector extension that decides its speed."""

from __future__ import annotations

from pathlib import Path

import pytest

from probssl.machine import cpu_name, processor_name

_CPU = "processor\t: {i}\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 {flags}\n\n"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("avx2 avx512f avx512_bf16", "AMD EPYC (avx512_bf16)"),
        ("avx2", "AMD EPYC (avx2)"),  # the AVX2-only sessions: same model name, several-fold other timings
        ("avx2 avx512f", "AMD EPYC (avx512f)"),
        ("", "AMD EPYC"),
    ],
)
def test_cpu_name_tells_the_two_epyc_kinds_apart(tmp_path: Path, flags: str, expected: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(_CPU.format(i=0, flags=flags) + _CPU.format(i=1, flags="amx_bf16"))  # first CPU counts
    assert cpu_name(cpuinfo) == expected


def test_without_cpuinfo_the_name_still_says_something(tmp_path: Path) -> None:
    assert cpu_name(tmp_path / "missing")
    assert processor_name("cpu") == cpu_name()


def test_cpuinfo_flags_are_the_first_processors_and_read_arm_features(tmp_path: Path) -> None:
    from probssl.machine import cpuinfo_flags

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(_CPU.format(i=0, flags="avx2") + _CPU.format(i=1, flags="avx512_bf16"))
    assert cpuinfo_flags(cpuinfo) == {"fpu", "sse2", "avx2"}
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpuinfo_flags(cpuinfo) == {"fp", "asimd", "bf16"}
    assert cpuinfo_flags(tmp_path / "missing") is None
