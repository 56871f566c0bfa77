"""Runs that differ only by seed, and the one summary every table gives them: mean, sample standard
deviation and count.

Runs of one configuration are named ``<name>-s<seed>`` (``probssl bench`` names them so; ``probssl
table --by-seed`` and the report group by it). The mean is :func:`statistics.fmean` and the spread
:func:`statistics.stdev` (n − 1 in the denominator): both correctly rounded, so seeds that agree give a
spread of exactly 0, never a float residue, and every table prints the same digits for the same runs.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: ``<name>-s<seed>``: the seed is the trailing ``-s`` and digits (``csghmc-T0-s10`` → ``csghmc-T0``, 10).
_SEED_SUFFIX = re.compile(r"^(?P<name>.+)-s(?P<seed>\d+)$")


def split_seed(name: str) -> tuple[str, int | None]:
    """(name without its seed, the seed) of a run directory's name; (name, None) when it has none."""
    match = _SEED_SUFFIX.fullmatch(name)
    return (match["name"], int(match["seed"])) if match else (name, None)


def seed_group(run_dir: str | Path) -> str:
    """Runs that differ only by seed share a name up to a ``-s<seed>`` suffix: ``byol-s2`` → ``byol``."""
    return split_seed(Path(run_dir).name)[0]


def numeric(value: Any) -> bool:
    """An int or float that is not a bool (eval.json's ``True`` is a flag, not the number 1)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class SeedSummary:
    """One metric over the seeds that have it: mean, sample std (0.0 for a single seed) and count."""

    mean: float
    std: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        """The ``{"mean", "std", "n"}`` cell of ``results.json``."""
        return {"mean": self.mean, "std": self.std, "n": self.n}


def summarise_values(values: Iterable[float]) -> SeedSummary | None:
    """The summary of ``values``, or None when there are none."""
    values = list(values)
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return SeedSummary(statistics.fmean(values), std, len(values))
