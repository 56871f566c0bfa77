"""One process per run directory: its lock file.

Why: two processes writing the same run directory interleave checkpoints, logs and config (two
``probssl train --out RUN`` at once once left byol's config over SimCLR's weights, both exiting 0), and
a benchmark suite is completed over several invocations, often several at once (``--jobs N``).
``probssl train`` holds ``RUN/.train.lock`` while it trains; a suite holds ``RUN/.bench.lock`` while it
trains and evaluates a run. The lock is an advisory ``flock`` on the file, so the kernel releases it
the moment its owner exits — a killed run or a rebooted machine never leaves a lock behind, and a
recycled pid cannot keep one alive (the pid written into the file is only for the message). Where
``fcntl`` does not exist (Windows) the file's existence is the lock.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: run_lock falls back to an exclusive-create lock file
    fcntl = None  # type: ignore[assignment]


#: Descriptors of the lock files this process holds (see _forget_in_child).
_HELD: set[int] = set()


def _forget_in_child() -> None:
    """In a forked child (a DataLoader worker), close the inherited lock descriptors.

    An ``flock`` belongs to the open file, which a forked child shares: a streaming run's data workers
    would keep the run locked after the trainer itself was killed (they notice a dead parent only after
    a few seconds, or never if orphaned), and the ``--resume`` that follows would be refused. Closing
    the child's copy leaves the parent's lock in place.
    """
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):  # not on Windows (no fork there)
    os.register_at_fork(after_in_child=_forget_in_child)


class RunBusy(Exception):
    """Another live process is training or evaluating this run (its lock file names the pid)."""


def _lock_owner(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 64).decode(errors="replace").strip() or "?"


BENCH_LOCK = ".bench.lock"  # held by a benchmark suite over a run's training and evaluation
TRAIN_LOCK = ".train.lock"  # held by ``probssl train`` (and probssl.fit) while it trains


@contextlib.contextmanager
def run_lock(run_dir: Path, name: str = BENCH_LOCK):
    """Hold ``run_dir/<name>`` while a run is trained (and, in a suite, evaluated); :class:`RunBusy`
    names the process that holds it. The next invocation resumes the run from its checkpoint."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / name
    fd = _take_flock(lock) if fcntl is not None else _create_exclusive(lock)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD.add(fd)
    try:
        yield
    finally:
        _HELD.discard(fd)
        lock.unlink(missing_ok=True)  # before closing: nobody can flock the old file once it is gone
        os.close(fd)


def _take_flock(lock: Path) -> int:
    """An open descriptor of ``lock`` that this process holds the ``flock`` of, or RunBusy."""
    for _ in range(5):
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _lock_owner(fd)
            os.close(fd)
            raise RunBusy(f"{lock.parent} is being run by process {owner} (lock {lock})") from None
        try:  # the holder we waited behind may have unlinked the file: lock the one on disk
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        if current is not None and os.path.samestat(current, os.fstat(fd)):
            return fd
        os.close(fd)
    raise RunBusy(f"could not take the lock {lock}")


def _create_exclusive(lock: Path) -> int:
    """Without ``fcntl``: the file's existence is the lock (a crashed owner's file must be deleted)."""
    try:
        return os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        message = f"{lock.parent} is locked by {lock}; delete that file if no process is running the run"
        raise RunBusy(message) from None


def lock_is_held(run_dir: Path, name: str = BENCH_LOCK) -> bool:
    """Whether a live process holds ``run_dir/<name>`` (probed with a shared, non-blocking flock
    that is released at once; without ``fcntl`` the file's existence decides)."""
    lock = run_dir / name
    if not lock.is_file():
        return False
    if fcntl is None:
        return True
    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:  # released between the check and the open
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's own lock, if it got one
    return False
