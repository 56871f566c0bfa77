"""How a number reads in a table — Markdown (``probssl table``, ``probssl bench``) and HTML (``probssl
report``) alike. Two rules, one per kind of table:

- **Any column** (``probssl table``, its ``--by-seed`` summaries, every cell of the report):
  :func:`format_number` reads each number on its own: 4 decimals, and 4 significant digits for a
  non-zero magnitude below 0.01 — VI-SimSiam's 1/κ ≈ 0.0019 would otherwise hide its variation, and
  a chosen ``linear/l2`` of 1e-5 would read as a measured 0.0000. A seed summary is ``mean ± std``
  with each part read so; an int reads as an int, a list of numbers (accuracy per uncertainty
  quintile) as ``0.912 / 0.950 / …`` to 3 decimals.
- **The bench suites' tables** (fixed columns, ``results.md`` and BENCHMARKS.md):
  :func:`format_mean_std` gives the spread the mean's decimals, 4, or 1 from 10 up (seconds and
  cost ratios need no more), so a column of ``0.9685 ± 0.0037`` lines up.

Until issue 31 the report had a third rule (3 decimals from 10 up, thousands separators, 3 significant
digits below 1e-4); it now reads as ``probssl table`` does, so a number looks the same on the page and
in the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence


def format_number(value: float) -> str:
    """One number as a table cell: 4 decimals, or 4 significant digits for non-zero magnitudes below
    0.01; an int as an int; nan / inf as Python writes them."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4g}" if 0 < abs(value) < 0.01 else f"{value:.4f}"


def format_spread(mean: float, std: float) -> str:
    """A seed summary in an any-column table: ``mean ± std``, each part by :func:`format_number`."""
    return f"{format_number(mean)} ± {format_number(std)}"


def format_list(values: Sequence[float]) -> str:
    """A list of numbers (accuracy per uncertainty quintile, a mean over seeds element-wise) in one cell."""
    return " / ".join(f"{v:.3f}" for v in values)


def format_mean_std(value: float, spread: float | None = None, signed: bool = False) -> str:
    """``value ± spread`` as the bench tables print it: 4 decimals, 1 for values ≥ 10; the spread with
    the value's decimals; no ``±`` without a spread (one seed has none, which is not a spread of 0)."""
    digits = 1 if abs(value) >= 10 else 4
    text = f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return text + (f" ± {spread:.{digits}f}" if spread is not None else "")


def partial_note(n: int, of: int) -> str:
    """`` (n=2)`` when only ``n`` of a group's ``of`` runs have the metric, else "": a half-evaluated
    group must not pass for a complete one."""
    return f" (n={n})" if n != of else ""
