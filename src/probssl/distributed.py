"""Thin helpers around ``torch.distributed`` for training under ``torchrun`` with PyTorch's own DDP.

Everything here degrades to the identity (or a constant) when no process group is initialised, so
the same training and loss code runs unchanged in one process, on CPU or on one GPU. Backends:
NCCL when CUDA is available, gloo otherwise (CPU tests and CI use gloo).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_reduce_mean",
    "broadcast_from_main",
    "broadcast_object",
    "gather_objects",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "teardown_distributed",
]


def is_distributed() -> bool:
    """True when a process group is up (i.e. we are one of several ranks)."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 alone writes checkpoints, logs and evaluation results."""
    return get_rank() == 0


def _default_device() -> torch.device:
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed() -> torch.device:
    """Initialise the process group from ``torchrun``'s environment and return this rank's device.

    ``torchrun`` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
    the default ``env://`` init method reads them. With ``WORLD_SIZE`` unset or 1 no group is created
    (collectives would only add overhead) and the device is ``cuda:0`` if available, else CPU.
    Calling this again once the group exists just returns the device.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or "RANK" not in os.environ:
        return _default_device()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # Pin the device *before* creating the NCCL communicator, so that every rank does not open
        # a context on GPU 0 and collectives run on the right device.
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not is_distributed():
        dist.init_process_group(backend=backend)
    return device


def teardown_distributed(*objects_to_release: Any) -> None:
    """Destroy the process group in an order that lets gloo exit cleanly.

    gloo occasionally aborts (SIGABRT) at interpreter exit when the process group is destroyed while
    DDP's reducer or tensors registered with it are still alive, or when one rank tears down while
    another is still communicating; the resulting random non-zero exit code fails CI. The safe order
    is: drop every reference to the DDP model, optimizer and loss (the caller must ``del`` its own
    names too; passing the objects here only lets us drop *our* references last), ``gc.collect()``
    so that the reducer is really freed, ``barrier()`` so that no rank is still mid-collective, and
    only then ``destroy_process_group()``. No-op when not distributed.
    """
    del objects_to_release
    gc.collect()
    if not is_distributed():
        return
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()
    dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward all-reduces (SUM) the gradient and keeps this rank's slice.

    Why SUM: each rank r computes its loss L_r as a mean over its *local* anchors, but L_r depends
    on every rank's embeddings through the gathered tensor. DDP averages parameter gradients over
    the W ranks, so the gradient it produces equals ∂((1/W) Σ_r L_r)/∂θ, the gradient of the
    global-batch loss (a mean of equal-sized local means), only if rank q back-propagates
    ∂(Σ_r L_r)/∂z_q through its own embeddings z_q. Rank r's contribution ∂L_r/∂z_q lives on rank r
    as the q-th slice of the gradient of the gathered tensor; summing those gradients over ranks and
    taking slice q gives exactly ∂(Σ_r L_r)/∂z_q. (Returning only the local slice would drop every
    other rank's negatives' gradient; averaging would divide by W a second time.)
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        world_size = dist.get_world_size()
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world_size)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
        assert all(int(s.item()) == x.shape[0] for s in sizes), (
            f"gather_with_grad needs the same local batch size on every rank, got {[int(s) for s in sizes]}"
        )
        x = x.contiguous()
        chunks = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(chunks, x)
        ctx.rank = dist.get_rank()
        ctx.local_batch = x.shape[0]
        return torch.cat(chunks, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> Tensor:
        grad = grad_output.contiguous().clone()  # all_reduce is in place; never write into autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_batch
        return grad[start : start + ctx.local_batch]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` of shape [B_local, ...] from all ranks along dim 0, in rank order, keeping autograd.

    The backward pass sums the incoming gradient over ranks and returns this rank's slice (see
    :class:`_GatherWithGrad` for why SUM is what makes DDP's averaged gradient equal the gradient
    of the global-batch loss). Every rank must pass the same B_local (asserted; drop the last
    incomplete batch). Identity when not distributed.
    """
    if not is_distributed() or get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks, as a new tensor without grad (for logging losses and metrics).

    Identity (detached) when not distributed.
    """
    out = x.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    if not is_distributed():
        return out
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / get_world_size()


@torch.no_grad()
def broadcast_from_main(x: Tensor) -> Tensor:
    """Overwrite ``x`` in place with rank 0's value and return it (e.g. identical noise on every rank).

    Identity when not distributed.
    """
    if is_distributed():
        dist.broadcast(x, src=0)
    return x


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (any picklable object, tensors included) on every rank; identity when not
    distributed. For what one rank reads from disk that the others may not have (their machine has no
    copy of the run directory)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` in rank order on rank 0, ``None`` on the others; ``[obj]`` when not
    distributed. For what only rank 0 writes (every rank's RNG state in a checkpoint)."""
    if not is_distributed():
        return [obj]
    out: list[Any] | None = [None] * get_world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out
