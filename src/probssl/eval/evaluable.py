"""What a run must have before the evaluation protocol can score it, checked before any work starts."""

from __future__ import annotations

from pathlib import Path

from probssl.data import DatasetError


def require_classes(num_classes: int, run_dir: str | Path) -> None:
    """Refuse, with what to do instead, a run whose training images carry fewer than two classes.

    Why: the protocol scores an embedding by how it separates classes — kNN and linear probes,
    calibration, selective prediction, retrieval, and the class statistics of the OOD detectors — so a
    run on an unlabelled (flat) folder or on one class has nothing to be scored against; it used to
    fail deep inside the kNN vote or the probe with an index or division error.
    """
    if num_classes >= 2:
        return
    what = "unlabelled images (a flat folder)" if num_classes < 1 else "images of a single class"
    raise DatasetError(
        f"{run_dir} was trained on {what}: evaluation scores an embedding by how it separates classes "
        "(kNN and linear probes, calibration, retrieval), which needs at least two. For embeddings, "
        "uncertainties and OOD p-values of new images, which need no labels, use `probssl embed "
        f"{run_dir} IMAGES --out FILE.npz`; to evaluate, train on a labelled folder (FOLDER/<class>/<image>)"
    )
