"""Feature bank: the embedding distribution of one data split, computed once and cached (design.md §4).

Every probe (kNN, linear, low-shot, calibration, OOD, retrieval) reads the same cached draws, so a
method's encoder runs once per split and checkpoint rather than once per probe. Banks are stored as
safetensors with string metadata; the metadata carries a cache key (e.g. checkpoint checksum + split
+ number of samples) so a stale bank is recomputed instead of silently reused.
"""

from __future__ import annotations

import hashlib
import os
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import Tensor
from tqdm import tqdm

from probssl.embedding import Embedding

_TENSORS = ("draws", "mean", "uncertainty", "labels")


@dataclass
class FeatureBank:
    """Cached features of one split.

    draws:       [S, N, D] float32 — embedding samples; S = 1 (the mean) for deterministic methods.
    mean:        [N, D] float32 — the point estimate.
    uncertainty: [N] float32 — the method's per-input uncertainty (zeros when deterministic).
    labels:      [N] int64.
    """

    draws: Tensor
    mean: Tensor
    uncertainty: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.draws.dim() != 3:
            raise ValueError(f"draws must be [S, N, D], got shape {tuple(self.draws.shape)}")
        _, n, d = self.draws.shape
        expected = {"mean": (n, d), "uncertainty": (n,), "labels": (n,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}")

    @property
    def num_samples(self) -> int:
        return self.draws.shape[0]

    @property
    def num_items(self) -> int:
        return self.draws.shape[1]

    @property
    def dim(self) -> int:
        return self.draws.shape[2]

    def save(self, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
        """Write to ``path`` atomically: a temporary file in the same directory, then ``os.replace``.

        A crash or error mid-write therefore leaves either the previous bank or nothing, never a
        truncated file that a later run would try to load. Same directory = same file system, which
        is what makes the rename atomic.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in _TENSORS}
        meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        # A unique name (not mkstemp) so the file gets the usual umask permissions, not 0600.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            safetensors.torch.save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple[FeatureBank, dict[str, str]]:
        """Read a bank written by :meth:`save`; returns ``(bank, metadata)``."""
        with safetensors.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in _TENSORS}
        return cls(**tensors), metadata


def content_key(tensor: Tensor) -> str:
    """A digest of a tensor's shape, dtype and bytes: equal keys mean equal contents. What evaluation
    remembers work by (image sets embedded once, neighbour lists shared), so a hit can never be a
    different tensor that happens to reuse an address."""
    digest = hashlib.blake2b(str((tuple(tensor.shape), tensor.dtype)).encode(), digest_size=16)
    digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def extract_features(
    embed: Callable[[Tensor], Embedding],
    images: Tensor,
    labels: Tensor,
    preprocess: Callable[[Tensor], Tensor],
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "features",
    on_batch: Callable[[int], None] | None = None,
    segment: int | None = None,
) -> FeatureBank:
    """Run ``embed`` over ``images`` in batches and collect its distribution into a :class:`FeatureBank`.

    ``images`` is uint8 [N, C, H, W] on the CPU; each batch is moved to ``device`` first and only then
    passed to ``preprocess`` (uint8 → normalised float), so the host→device copy moves 1 byte per
    pixel instead of 4. ``embed`` runs under ``torch.inference_mode``; the caller is responsible for
    eval mode (the protocol needs norm layers in eval mode, design.md §4, and only the caller knows
    the model). Results go to the CPU as float32 batch by batch, so device memory holds one batch at
    a time.

    ``segment``: ``images`` is several image sets of ``segment`` rows each, embedded in one pass;
    no batch straddles two sets, so every set is cut into exactly the batches it would get on its
    own (methods that seed their draws per call, e.g. LAM, then give identical features).
    ``on_batch(count)`` is called after each batch (a caller's progress bar); ``progress`` draws a
    bar of its own.
    """
    n = images.shape[0]
    if labels.shape != (n,):
        raise ValueError(f"labels must be [{n}], got shape {tuple(labels.shape)}")
    if n == 0:
        raise ValueError("no images to embed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if segment is not None and (segment < 1 or n % segment):
        raise ValueError(f"segment must divide the {n} images into equal sets, got {segment}")
    segment = segment or n
    starts = [lo + i for lo in range(0, n, segment) for i in range(0, segment, batch_size)]
    # Preallocated once the first batch shows S and D, then filled in place: peak memory is the
    # bank itself plus one batch, not the bank twice (a list of batches and their concatenation).
    draws = means = uncertainties = None
    for start in tqdm(starts, desc=desc, disable=not progress):
        stop = min(start + batch_size, (start // segment + 1) * segment)
        with torch.inference_mode():
            batch = preprocess(images[start:stop].to(device, non_blocking=True))
            embedding = embed(batch)
            batch_draws = embedding.draws().detach()
            if batch_draws.shape[1] != stop - start:
                raise ValueError(f"embed returned {batch_draws.shape[1]} rows for {stop - start} images")
        if draws is None:
            draws = torch.empty((batch_draws.shape[0], n, batch_draws.shape[2]), dtype=torch.float32)
            means = torch.empty((n, embedding.mean.shape[1]), dtype=torch.float32)
            uncertainties = torch.empty(n, dtype=torch.float32)
        elif batch_draws.shape[0] != draws.shape[0]:
            raise ValueError(
                "embed returned a varying number of samples across batches: "
                f"{draws.shape[0]} then {batch_draws.shape[0]}"
            )
        draws[:, start:stop] = batch_draws.float().cpu()
        means[start:stop] = embedding.mean.detach().float().cpu()
        uncertainties[start:stop] = embedding.uncertainty.detach().float().cpu()
        if on_batch is not None:
            on_batch(stop - start)
    return FeatureBank(
        draws=draws, mean=means, uncertainty=uncertainties, labels=labels.detach().cpu().long()
    )


def cached_features(
    path: str | os.PathLike[str], key: str, compute: Callable[[], FeatureBank]
) -> FeatureBank:
    """Return the bank at ``path`` if its metadata ``key`` equals ``key``; otherwise compute, save, return.

    The key should identify everything the features depend on (checkpoint checksum, split, number
    of samples, preprocessing), so a bank is never reused for a different model or setting. An
    unreadable file (e.g. from an older format) is treated as a cache miss and overwritten.
    """
    path = Path(path)
    if path.exists():
        try:
            bank, metadata = FeatureBank.load(path)
        except Exception as error:  # a cache must never be the reason a run fails: recompute instead
            warnings.warn(f"ignoring unreadable feature bank {path}: {error}", stacklevel=2)
        else:
            if metadata.get("key") == key:
                return bank
    bank = compute()
    bank.save(path, metadata={"key": key})
    return bank
