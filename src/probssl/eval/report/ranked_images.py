"""The report's ranked test images: per run, the most and the least certain test images, by the
probe's predictive entropy (every run) or by the method's own uncertainty (where it has one), each
labelled with its class, the probe's prediction and the uncertainty it was ranked by.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from probssl.eval.report import figures
from probssl.eval.report.figures import _styled, significant_digits
from probssl.eval.report.runs import Run


def _ranked_data(run: Run, key: str = "ranked_images") -> dict[str, Any] | None:
    """The ranked test images of eval_details ``key``: ``ranked_images`` (by the probe's predictive
    entropy, every run) or ``ranked_images_own`` (by the embedding's own uncertainty, where it has one)."""
    section = run.details.get(key)
    if not section:
        return None
    shape = tuple(int(s) for s in section["shape"])
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"ranked_images shape must be [C, H, W] with C in (1, 3), got {list(shape)}")
    rows: dict[str, Any] = {}
    for key in ("most_certain", "least_certain"):
        images = [_to_hwc(image, shape) for image in section.get(key) or []]
        end = key.split("_")[0]

        def column(name: str, cast: Callable[[Any], Any], count: int = len(images), end: str = end) -> list:
            values = [None if v is None else cast(v) for v in section.get(f"{name}_{end}") or []]
            return (values + [None] * count)[:count]

        rows[key] = list(
            zip(
                images,
                column("uncertainty", float),
                column("label", int),
                column("prediction", int),
                strict=True,
            )
        )
    if not any(rows.values()):
        return None
    rows["criterion"] = str(section.get("criterion", ""))
    rows["classes"] = [str(name) for name in section.get("classes") or []]
    return rows


def _class_name(index: int | None, classes: Sequence[str], width: int = 11) -> str:
    """A label as the reader knows it: the class name (cut to ``width``) when the run recorded names,
    else the class number; ``?`` when unknown."""
    if index is None:
        return "?"
    if 0 <= index < len(classes):
        name = classes[index]
        return name if len(name) <= width else name[: width - 1] + "…"
    return str(index)


def _ranked_own_data(run: Run) -> dict[str, Any] | None:
    return _ranked_data(run, "ranked_images_own")


def _to_hwc(image: Any, shape: tuple[int, int, int]) -> np.ndarray:
    """A flat (or nested) CHW pixel list as an HWC float array in [0, 1] for ``imshow``."""
    array = np.asarray(image, dtype=float).reshape(shape)
    scale = 1.0 if array.max(initial=0) <= 1.0 else 255.0
    return np.clip(array / scale, 0, 1).transpose(1, 2, 0)


def _ranked_figure(run: Run, rows: Mapping[str, Any]) -> str:
    """Two rows of test images; under each: label y, the probe's prediction ŷ (red when wrong) and
    the uncertainty the rows are ranked by."""
    n = max(len(rows.get(key, [])) for key in ("most_certain", "least_certain"))
    digits = significant_digits(
        [value for key in ("most_certain", "least_certain") for _, value, _, _ in rows.get(key, [])]
    )
    with _styled():
        fig = Figure(figsize=(0.95 * n + 1.3, 3.6 if rows.get("classes") else 3.3))
        axes = fig.subplots(2, n, squeeze=False)
        for r, (key, label) in enumerate(
            (("most_certain", "most certain"), ("least_certain", "least certain"))
        ):
            for c in range(n):
                ax = axes[r, c]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c >= len(rows.get(key, [])):
                    continue
                image, value, label_, prediction = rows[key][c]
                grey = image.shape[-1] == 1
                ax.imshow(
                    image[..., 0] if grey else image,
                    cmap="gray" if grey else None,
                    vmin=0,
                    vmax=1,
                    interpolation="nearest",
                )
                text = "n/a" if value is None else f"{value:.{digits}g}"
                wrong = label_ is not None and prediction is not None and label_ != prediction
                if label_ is not None or prediction is not None:
                    y, y_hat = (_class_name(i, rows.get("classes") or []) for i in (label_, prediction))
                    text = f"y {y}\nŷ {y_hat}\n{text}" if rows.get("classes") else f"y={y} ŷ={y_hat}\n{text}"
                ax.set_xlabel(text, fontsize=7.5, labelpad=2, color="#d23c4b" if wrong else "#1d2330")
            axes[r, 0].set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center", labelpad=8)
        if rows.get("criterion"):
            fig.suptitle(
                f"ranked by {rows['criterion']} · y = label, ŷ = prediction (red: wrong)", fontsize=8.5
            )
        fig.subplots_adjust(wspace=0.12, hspace=0.85 if rows.get("classes") else 0.75)
        return figures._png(fig)  # looked up at call time, like every figure's
