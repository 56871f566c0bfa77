"""Near / far OOD grouping: which OOD sets are semantically close to which in-distribution set.

Near-OOD sets share the in-distribution set's image format and low-level statistics and differ
mainly in semantics, which is where detectors fail; far-OOD sets differ in domain or are not natural
images at all. The grouping follows OpenOOD (Yang et al. 2022; Zhang et al. 2023, v1.5):

- MNIST as in-distribution: Fashion-MNIST (and NotMNIST) are near-OOD (OpenOOD v1's MNIST
  benchmark). By the same criterion — same 28 × 28 grey format, other classes — MNIST is near-OOD for
  Fashion-MNIST, and Fashion-MNIST for the 8 × 8 ``digits`` set.
- CIFAR-10 / CIFAR-100: each other and Tiny ImageNet are near-OOD, SVHN and MNIST far (OpenOOD v1.5).
- SVHN → CIFAR-10 and STL-10 → SVHN: digits vs natural objects, far.
- ``cifar10_jpeg`` (the public JPEG copy of CIFAR-10) is grouped as CIFAR-10.
- ``noise`` (smooth random images) is far for every set.

A pair not listed here belongs to no group, so it is left out of the group means rather than guessed.
"""

from __future__ import annotations

GROUPS = ("near", "far")

_NEAR: dict[str, frozenset[str]] = {
    "digits": frozenset({"fashion_mnist"}),
    "mnist": frozenset({"fashion_mnist"}),
    "fashion_mnist": frozenset({"mnist"}),
    "cifar10": frozenset({"cifar100", "tiny_imagenet", "tiny_imagenet_val"}),
    "cifar100": frozenset({"cifar10", "tiny_imagenet", "tiny_imagenet_val"}),
}
_FAR: dict[str, frozenset[str]] = {
    "cifar10": frozenset({"svhn", "mnist"}),
    "cifar100": frozenset({"svhn", "mnist"}),
    "svhn": frozenset({"cifar10"}),
    "stl10": frozenset({"svhn"}),
}
_FAR_EVERYWHERE = frozenset({"noise"})


_SAME_AS = {"cifar10_jpeg": "cifar10"}  # a re-encoded copy has its original's semantics


def ood_group(dataset: str, ood_set: str) -> str | None:
    """ "near", "far" or ``None`` (not classified) for OOD set ``ood_set`` against ``dataset``."""
    dataset, ood_set = _SAME_AS.get(dataset, dataset), _SAME_AS.get(ood_set, ood_set)
    if ood_set in _NEAR.get(dataset, ()):
        return "near"
    if ood_set in _FAR.get(dataset, ()) or ood_set in _FAR_EVERYWHERE:
        return "far"
    return None
