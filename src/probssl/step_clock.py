"""How long this run will take, said early: after the first step, and again once the speed has settled.

A run whose default network is too large for the machine used to give no sign of it until the first
epoch ended (hours later on a CPU). The first step's time includes one-off set-up (memory allocation,
kernel selection), so it overestimates; the second line, after a few more steps, uses their mean.
Both lines come before the first epoch ends whenever an epoch has more than :data:`SETTLED_AFTER` steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

__all__ = ["StepClock", "format_duration"]

#: Steps after the first whose mean gives the settled estimate.
SETTLED_AFTER = 5
#: Runs estimated shorter than this print nothing (the demo, tests): there is nothing to plan for.
QUIET_BELOW_S = 60.0
#: Epochs longer than this get the hint to checkpoint more often (Ctrl-C keeps only the last checkpoint).
LONG_EPOCH_S = 1800.0


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.4 h``, ``2.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


class StepClock:
    """Call :meth:`step_done` after every optimiser step; it prints (through ``write``) at most twice."""

    def __init__(
        self,
        steps_to_run: int,
        steps_per_epoch: int,
        enabled: bool = True,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self.steps_to_run = steps_to_run
        self.steps_per_epoch = steps_per_epoch
        self.enabled = enabled
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.done = 0
        self.started = time.perf_counter()
        self.first_seconds: float | None = None
        self.loud = False

    def _total(self, per_step: float) -> str:
        epoch = per_step * self.steps_per_epoch
        hint = "; train.checkpoint_every=N saves every N steps" if epoch > LONG_EPOCH_S else ""
        return (
            f"~{format_duration(per_step * self.steps_to_run)} for the {self.steps_to_run} steps to run "
            f"(an epoch of {self.steps_per_epoch} steps, checkpointed at its end: ~{format_duration(epoch)}"
            f"{hint})"
        )

    def step_done(self) -> None:
        self.done += 1
        if not self.enabled or self.done > 1 + SETTLED_AFTER:
            return
        now = time.perf_counter()
        if self.done == 1:
            self.first_seconds = now - self.started
            self.settle_start = now
            self.loud = self.first_seconds * self.steps_to_run >= QUIET_BELOW_S
            if self.loud:
                self.write(
                    f"first step: {self.first_seconds:.1f} s (with set-up); at that speed "
                    f"{self._total(self.first_seconds)}. Ctrl-C stops within seconds; --resume continues"
                )
        elif self.done == 1 + SETTLED_AFTER and self.loud and self.steps_to_run > self.done:
            per_step = (now - self.settle_start) / SETTLED_AFTER
            self.write(f"steps 2-{self.done}: {per_step:.2f} s each: {self._total(per_step)}")
