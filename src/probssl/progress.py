"""Progress of a long stage: a live tqdm bar on a terminal, one summary line in a log file.

Why not tqdm alone: written into a file (``probssl train ... > log``, a bench worker's log, a cluster
job's output) a bar is hundreds of carriage-return frames on one line, unreadable with ``less`` or
``tail``. And a stage that turns out to have nothing to count (its features were cached) must not
leave an empty ``uncertainty: 0img`` bar behind. So a bar is opened on the first count, only on a
terminal; elsewhere the stage prints one line when it ends (what it counted, its wall time, its last
postfix). A stage whose total is not known up front counts without a total rather than growing one
(a bar whose 100% turns into 70% when the next image set starts tells the reader nothing).
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr, where progress goes) is an interactive terminal."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


class StageProgress:
    """``update`` / ``set_postfix`` / ``close`` like a tqdm bar, shown as the module docstring says.

    ``total``: the count the stage ends at (None: unknown, a running count); ``initial``: where it
    starts (a resumed training); ``enabled=False`` shows nothing at all.
    """

    def __init__(
        self,
        desc: str,
        unit: str = "img",
        total: int | None = None,
        initial: int = 0,
        enabled: bool = True,
        terminal: bool | None = None,
    ) -> None:
        self.desc, self.unit, self.total, self.initial = desc, unit, total, initial
        self.enabled = enabled
        self.terminal = is_terminal() if terminal is None else terminal
        self.n = initial
        self._bar: tqdm | None = None
        self._postfix: dict[str, Any] = {}
        self._started = time.perf_counter()
        if self.enabled and self.terminal and total:  # a known amount of work: shown from the start
            self._open()

    def _open(self) -> None:
        self._bar = tqdm(total=self.total, initial=self.n, desc=self.desc, unit=self.unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.n += n
        if self.terminal:
            if self._bar is None:
                self._open()
            else:
                self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        self._postfix = values
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def summary(self) -> str:
        """The line a non-terminal gets: ``features: 1,797 img in 3.2 s`` (plus the postfix)."""
        seconds = time.perf_counter() - self._started
        done = self.n - self.initial
        of = f" of {self.total:,}" if self.total and (self.initial or done != self.total) else ""
        units = self.unit if self.unit == "img" else f"{self.unit}s"  # img, steps, probes, corruptions
        if self.initial:  # a resumed run: which steps this invocation did
            counted = f"{units} {self.initial:,}–{self.n:,}{of}"
        else:
            counted = f"{done:,} {self.unit if done == 1 else units}{of}"
        extra = "".join(f", {key} {value}" for key, value in self._postfix.items())
        return f"{self.desc}: {counted} in {seconds:.1f} s{extra}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and not self.terminal and self.n > self.initial:
            print(self.summary(), file=sys.stderr, flush=True)
            self.enabled = False  # closed: a second close prints nothing
