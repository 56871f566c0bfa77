"""Near / far OOD grouping: which OOD sets are semantically close to which in-distribution set.

Near-OOD sets share the in-distribution set's image format and low-level statistics and differ
mainly in semantics, which is where detectors fail; far-OOD sets differ in domain or are not natural
images at all. The grouping follows OpenOOD (Yang et al. 2022; Zhang et al. 2023, v1.5); each
dataset's near and far sets are facts of its catalogue entry (:mod:`probssl.data.catalog`, where the
reasons are), looked up here under any spelling of either name. A re-encoded copy
(``cifar10_jpeg``) is grouped as its original, and ``noise`` (smooth random images) is far for every
set. A pair the catalogue does not classify belongs to no group, so it is left out of the group means
rather than guessed.
"""

from __future__ import annotations

from probssl.data.catalog import find_entry

GROUPS = ("near", "far")

_FAR_EVERYWHERE = frozenset({"noise"})


def _as_grouped(name: str) -> str:
    """A registered name as the catalogue spells it (a copy: its original's); anything else as given."""
    entry = find_entry(name)
    if entry is None:
        return name
    return entry.copy_of or entry.name


def ood_group(dataset: str, ood_set: str) -> str | None:
    """ "near", "far" or ``None`` (not classified) for OOD set ``ood_set`` against ``dataset``."""
    ood_set = _as_grouped(ood_set)
    entry = find_entry(_as_grouped(dataset))
    if entry is not None and ood_set in entry.near_ood:
        return "near"
    if (entry is not None and ood_set in entry.far_ood) or ood_set in _FAR_EVERYWHERE:
        return "far"
    return None
