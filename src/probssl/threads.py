"""How many intra-op CPU threads training uses (``train.threads``), and how idle OpenMP threads wait.

Why this is not left to torch: torch starts one intra-op thread per core, and its OpenMP runtime
(libgomp) lets a thread that waits for the others *spin*. On a shared or busy machine a spinning thread
burns the time slice its partner needs, and a training step became 5–7× slower with two threads than
with one (``OMP_WAIT_POLICY`` unset, 2-core AMD EPYC at load average 10–25 from other users, SimCLR
steps, 1 and 2 threads interleaved in one process, median of 5: ConvNet width 32 on 8 px digits at
batch 256 0.87 s vs 5.76 s, on 28 px 0.83 vs 5.47, ResNet-18 width 16 at batch 128 5.1 vs 27.3,
width 64 at batch 64 33.6 vs 50.0). With ``OMP_WAIT_POLICY=PASSIVE`` waiting threads sleep instead,
and the same steps took 0.79 / 0.25 s (1 / 2 threads), 1.24 / 0.70, 6.2 / 3.5, 25.8 / 20.9: two
threads became the faster choice under load too, and one thread costs what it did. (No idle machine
was available to measure; there, more threads are the usual gain for the larger networks, and passive
waiting adds a thread wake-up, microseconds, to each parallel region — not measured here.) So:

- ``import probssl`` sets ``OMP_WAIT_POLICY=PASSIVE`` when it is unset and torch is not imported yet
  (the runtime reads it once, when torch loads it; the ``probssl`` command always qualifies);
- ``train.threads`` unset (``auto``) uses every usable core (``sched_getaffinity``, shared among the
  processes of a DDP job on this machine) when waiting is passive, and one thread when it is not
  (torch was imported first, without the variable): the one count that is never the catastrophe;
- ``OMP_NUM_THREADS`` in the environment (set by ``probssl bench --jobs N`` for its workers, or by
  you) and ``train.threads=N`` are obeyed as they are.

The count is printed in ``train``'s start line and recorded in ``train_summary.json``. Float sums are
split by thread, so runs at different counts agree only to rounding (an exact ``--resume`` needs the
same count; the demo and the test suite pin one thread).
"""

from __future__ import annotations

import os
import sys

#: OpenMP reads this once, when torch first loads its runtime.
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def prefer_passive_waiting() -> None:
    """Make idle OpenMP threads sleep rather than spin, if it is not too late (see the module docstring).
    Called by ``import probssl``; an explicit ``OMP_WAIT_POLICY`` is left as it is."""
    if "torch" not in sys.modules:
        os.environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")


def waiting_is_passive() -> bool:
    """Whether OpenMP was told to wait passively (the variable set when torch loaded its runtime; set
    later, it has no effect, and :func:`prefer_passive_waiting` does not set it then)."""
    return os.environ.get(WAIT_POLICY_ENV, "").strip().upper() == "PASSIVE"


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_threads(requested: int | None) -> tuple[int, str]:
    """The intra-op thread count for ``train.threads`` = ``requested`` (None: auto), and why."""
    if requested is not None:
        return requested, "train.threads"
    forced = os.environ.get("OMP_NUM_THREADS", "").strip()
    if forced.isdigit() and int(forced) > 0:
        return int(forced), "OMP_NUM_THREADS"
    if not waiting_is_passive():
        return 1, f"{WAIT_POLICY_ENV} is not PASSIVE"
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # torchrun on this machine
    return max(1, usable_cores() // local_processes), "every usable core, passive waiting"
