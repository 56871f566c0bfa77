"""Training logs: a CSV file always, TensorBoard when the package is installed."""

from __future__ import annotations

import csv
import io
import warnings
from pathlib import Path
from typing import Any

from probssl.io import atomic_write_text


class MetricLogger:
    """Appends one row per logged step to ``metrics.csv`` (resumes append) and mirrors to TensorBoard.

    ``start_step``: the step training (re)starts from. A run killed after logging step 20 but
    resumed from its checkpoint at step 16 logs steps 17–20 again, so rows after ``start_step`` are
    cut from the log first (TensorBoard: ``purge_step``), and each step appears once. A fresh start
    (step 0) begins a new log: an earlier one can only be a killed attempt's, perhaps of another
    config with other columns.
    """

    def __init__(
        self, run_dir: str | Path, tensorboard: bool = True, enabled: bool = True, start_step: int = 0
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self._writer = None
        self._columns: list[str] | None = None
        if enabled and self.path.is_file():
            self._columns = _cut_log(self.path, start_step)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn(
                    "tensorboard is not installed; logging to metrics.csv only "
                    "(pip install 'probssl[tensorboard]')",
                    stacklevel=2,
                )
            else:
                purge = {"purge_step": start_step + 1} if start_step > 0 else {}
                self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), **purge)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **values}
        if self._columns is None:
            self._columns = list(row)
            with open(self.path, "w", newline="") as handle:
                csv.writer(handle).writerow(self._columns)
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow([row.get(c, "") for c in self._columns])
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, int | float):
                    self._writer.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _cut_log(path: Path, start_step: int) -> list[str] | None:
    """Keep the rows of ``path`` up to ``start_step`` (all of it goes at 0); return its header, or None
    when the file is gone."""
    if start_step <= 0:
        path.unlink()
        return None
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        return None
    header, kept = rows[0], [rows[0]]
    for row in rows[1:]:
        try:
            if int(row[0]) <= start_step:
                kept.append(row)
        except (ValueError, IndexError):  # a half-written last line of a killed process
            continue
    if len(kept) < len(rows):
        buffer = io.StringIO()
        csv.writer(buffer).writerows(kept)
        atomic_write_text(path, buffer.getvalue())
    return header
