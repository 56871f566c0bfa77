"""``reliability``: the calibrated probability that the run's kNN label prediction is right.

docs/methods.md §5: isotonic regression (scikit-learn) of "the kNN prediction is correct" on the
kNN's top vote share, fitted on labelled calibration images. Isotonic regression is the
non-parametric calibration map (Zadrozny & Elkan 2002): monotone in the vote share, so it never
reorders images, and with no shape assumed beyond that — a 20-neighbour vote share is far from a
probability for an SSL embedding (neighbours agree more often than they are right, or less).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

RELIABILITY_K = 20
"""Neighbours of the kNN prediction that ``reliability`` calibrates: the evaluation's k = 20 vote."""


def _vector(values: Tensor | np.ndarray, name: str) -> np.ndarray:
    array = torch.as_tensor(values).detach().cpu().double().numpy()
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty [N] vector, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


@dataclass
class Reliability:
    """A fitted monotone map from the kNN top vote share to P(prediction correct)."""

    share: np.ndarray  # the fitted step function's knots (increasing vote share)
    probability: np.ndarray  # its values there, in [0, 1]

    @classmethod
    def fit(cls, vote_share: Tensor, correct: Tensor) -> Reliability:
        """``vote_share`` [N] in [0, 1] and ``correct`` [N] (bool / 0-1) of calibration images."""
        from sklearn.isotonic import IsotonicRegression

        x = _vector(vote_share, "vote_share")
        y = _vector(correct, "correct")
        if y.shape != x.shape or not np.isin(y, (0.0, 1.0)).all():
            raise ValueError("correct must be a 0/1 vector of the vote shares' length")
        model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(x, y)
        return cls(share=np.asarray(model.X_thresholds_), probability=np.asarray(model.y_thresholds_))

    def predict(self, vote_share: Tensor) -> Tensor:
        """[N] float64 P(correct): the isotonic fit, linear between its knots and flat beyond them
        (scikit-learn's ``predict`` with ``out_of_bounds='clip'``)."""
        x = _vector(vote_share, "vote_share")
        return torch.from_numpy(np.interp(x, self.share, self.probability))


def top_vote(probabilities: Tensor) -> tuple[Tensor, Tensor]:
    """(top vote share [N], predicted class [N]) of kNN vote distributions [N, C]."""
    share, prediction = probabilities.max(dim=1)
    return share.double(), prediction
