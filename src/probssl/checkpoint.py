"""Checkpoints that resume exactly and cannot be half-written.

Layout of a run directory::

    config.yaml                      the validated config (the run's one source of truth)
    checkpoints/step_00000100/       state.safetensors (model.* + optim.* tensors), meta.json,
                                     rng_rank{r}.safetensors + rng_rank{r}.json (every rank's RNG)
    checkpoints/latest               name of the newest complete checkpoint
    model.safetensors + model.json   the final weights, for evaluation

A checkpoint directory is assembled under a temporary name and renamed into place only when
complete, so a crash at any moment leaves the previous checkpoint untouched. ``meta.json`` holds
the SHA-256 of the state file: a truncated or tampered file is refused before anything is loaded.
Only safetensors and JSON are ever read back — no pickle.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from probssl.io import atomic_write, atomic_write_json, atomic_write_text, sha256_file


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says what to do instead."""


def _tensors_for_saving(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous tensors: store independent copies.
    return {k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> str:
    """Atomic safetensors write; returns the file's SHA-256."""
    data = _tensors_for_saving(tensors)
    atomic_write(path, lambda p: save_file(data, str(p), metadata=metadata))
    return sha256_file(path)


def load_verified(path: str | Path, expected_sha256: str | None) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CheckpointError(
            f"{path} is corrupt or was modified (SHA-256 does not match its metadata). "
            "It will not be loaded; delete this checkpoint directory to resume from an older one, "
            "or train again into a new --out directory."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(
            f"{path} cannot be read as safetensors ({err}); delete it and resume from an "
            "older checkpoint or retrain."
        ) from None


# ---- optimizer state <-> flat tensors + JSON -------------------------------------------------


def flatten_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---- RNG state ----------------------------------------------------------------------------------


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---- whole checkpoints ---------------------------------------------------------------------------


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoint_root(run_dir) / f".step_{step:08d}.partial"


def write_rng(
    stage: Path, rank: int, state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
) -> None:
    """Save rank ``rank``'s RNG state (``state`` as :func:`capture_rng` gave it on that rank, else
    this process's own) into the staging directory of a checkpoint."""
    tensors, meta = state if state is not None else capture_rng()
    save_tensors(stage / f"rng_rank{rank}.safetensors", tensors)
    atomic_write_json(stage / f"rng_rank{rank}.json", meta)


def read_rng(path: str | Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Rank ``rank``'s RNG state saved in checkpoint ``path``, or ``None`` when it holds none for that
    rank (a checkpoint of a run with fewer processes)."""
    path = Path(path)
    rng_file = path / f"rng_rank{rank}.safetensors"
    if not rng_file.is_file():
        return None
    return load_verified(rng_file, None), json.loads((path / f"rng_rank{rank}.json").read_text())


def finalize_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write model/optimizer state into the staging dir, then rename it into place (main rank only)."""
    stage = staging_dir(run_dir, step)
    optim_tensors, optim_meta = flatten_optimizer_state(optimizer_state)
    tensors = {f"model.{k}": v for k, v in model_state.items()} | optim_tensors
    digest = save_tensors(stage / "state.safetensors", tensors)
    atomic_write_json(stage / "meta.json", {**meta, "step": step, "optimizer": optim_meta, "sha256": digest})
    final = checkpoint_root(run_dir) / f"step_{step:08d}"
    if final.exists():
        shutil.rmtree(final)
    stage.rename(final)
    atomic_write_text(checkpoint_root(run_dir) / "latest", final.name + "\n")
    _prune(checkpoint_root(run_dir), keep)
    return final


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in done[: max(len(done) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    done = sorted(p for p in root.glob("step_*") if p.is_dir())
    return done[-1] if done else None


def load_checkpoint(path: str | Path, rank: int = 0) -> dict[str, Any]:
    """Read and verify one checkpoint directory: model state, optimizer state, meta, this rank's RNG."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {path} has no readable meta.json ({err}); it is incomplete — "
            "delete it to resume from an older checkpoint."
        ) from None
    tensors = load_verified(path / "state.safetensors", meta.get("sha256"))
    model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    optimizer_state = unflatten_optimizer_state(tensors, meta["optimizer"])
    return {"model": model_state, "optimizer": optimizer_state, "meta": meta, "rng": read_rng(path, rank)}


def save_model(run_dir: str | Path, model_state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    path = Path(run_dir) / "model.safetensors"
    digest = save_tensors(path, model_state)
    atomic_write_json(Path(run_dir) / "model.json", {**meta, "sha256": digest})
    return path


def final_weights_intact(run_dir: str | Path) -> bool:
    """Whether the run finished and its ``model.safetensors`` still matches the SHA-256 in ``model.json``."""
    run_dir = Path(run_dir)
    try:
        meta = json.loads((run_dir / "model.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    path = run_dir / "model.safetensors"
    return path.is_file() and meta.get("sha256") == sha256_file(path)


def load_model_state(
    run_dir: str | Path, step: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The final weights if training finished (or the checkpoint at ``step``), else the latest one's."""
    run_dir = Path(run_dir)
    if step is not None:
        path = checkpoint_root(run_dir) / f"step_{step:08d}"
        if not path.is_dir():
            kept = ", ".join(
                p.name.removeprefix("step_").lstrip("0") or "0"
                for p in sorted(checkpoint_root(run_dir).glob("step_*"))
            )
            raise CheckpointError(f"{run_dir} has no checkpoint at step {step}; kept steps: {kept or 'none'}")
        ckpt = load_checkpoint(path)
        return ckpt["model"], {**ckpt["meta"], "partial": True}
    if (run_dir / "model.json").is_file():
        meta = json.loads((run_dir / "model.json").read_text())
        try:
            return load_verified(run_dir / "model.safetensors", meta.get("sha256")), meta
        except CheckpointError:
            if latest_checkpoint(run_dir) is None:
                raise
            # The final weights are a copy of the last checkpoint's: --resume on a finished run rewrites them.
            raise CheckpointError(
                f"{run_dir / 'model.safetensors'} is missing, corrupt or was modified (it does not match "
                f"model.json); rewrite it from the run's last checkpoint with: "
                f"probssl train --resume --out {run_dir}"
            ) from None
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointError(
            f"{run_dir} has neither model.safetensors nor a checkpoint: train it first "
            f"(probssl train ... --out {run_dir})."
        )
    ckpt = load_checkpoint(latest)
    return ckpt["model"], {**ckpt["meta"], "partial": True}
