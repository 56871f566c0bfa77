"""Checkpoints of a DDP run whose run directory exists on rank 0's machine only.

Across machines (``torchrun --nnodes N``) the other nodes may have no view of the run directory: a
filesystem every node mounts is common on clusters but not between two workstations. So rank 0 is the
one process that reads or writes it. Saving a checkpoint gathers every rank's RNG state to rank 0, which
writes them beside the weights (each rank used to write its own file, which needed a shared
directory). Resuming, rank 0 checks the run and reads its latest checkpoint and sends every rank the
weights, the optimizer state and its own RNG state. A problem rank 0 finds (no run there, a changed
config, a corrupt checkpoint, another number of processes) is raised on every rank, so no rank is left
waiting in a collective for one that has stopped. In one process all of this is the plain file I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from probssl.checkpoint import (
    CheckpointError,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    read_rng,
    write_rng,
)
from probssl.distributed import broadcast_object, gather_objects, get_rank, get_world_size

__all__ = ["resume_checkpoint", "save_rng_states"]


def save_rng_states(stage: Path) -> None:
    """Every rank's RNG state into checkpoint staging directory ``stage``, written by rank 0.

    Called on every rank (it is a collective); ``stage`` need exist on rank 0 only.
    """
    states = gather_objects(capture_rng())
    for rank, state in enumerate(states or []):
        write_rng(stage, rank, state)


def resume_checkpoint(run_dir: Path, check_run: Callable[[], None]) -> dict[str, Any] | None:
    """The latest checkpoint of ``run_dir`` as this rank resumes from it, or ``None`` when it has none.

    ``{"model", "optimizer", "meta", "rng"}`` with this rank's RNG state. Rank 0 first calls
    ``check_run`` (which raises when the directory holds no run that may be resumed) and reads the
    checkpoint; every rank gets the same outcome, an exception included. Called on every rank.
    """
    rank, world = get_rank(), get_world_size()
    outcome: dict[str, Any] | BaseException | None = None
    if rank == 0:
        try:
            outcome = _read_on_main(run_dir, check_run, world)
        except Exception as err:  # raised below on every rank, not on rank 0 alone
            outcome = err
    outcome = broadcast_object(outcome)
    if isinstance(outcome, BaseException):
        raise outcome
    if outcome is None:
        return None
    return {**{k: outcome[k] for k in ("model", "optimizer", "meta")}, "rng": outcome["rngs"][rank]}


def _read_on_main(run_dir: Path, check_run: Callable[[], None], world: int) -> dict[str, Any] | None:
    check_run()
    latest = latest_checkpoint(run_dir)
    if latest is None:
        return None
    checkpoint = load_checkpoint(latest, 0)
    rngs = [checkpoint["rng"], *(read_rng(latest, r) for r in range(1, world))]
    missing = [r for r, state in enumerate(rngs) if state is None]
    if missing:
        saved = checkpoint["meta"].get("world_size")
        raise CheckpointError(
            f"{latest} holds no RNG state for rank {missing[0]}: it was written by a run with "
            f"{saved} process{'es' if saved != 1 else ''}, and this one has {world}; resume it with "
            f"{saved} (torchrun --nnodes × --nproc_per_node), or train into a new --out"
        )
    return {**{k: checkpoint[k] for k in ("model", "optimizer", "meta")}, "rngs": rngs}
