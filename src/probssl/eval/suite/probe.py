"""The probe every block of the suite reads: one linear probe per posterior draw, averaged as
probabilities (Bayesian model averaging), so deterministic and probabilistic methods go through the
same code (a deterministic method has one draw)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from probssl.eval.features import FeatureBank
from probssl.eval.linear import LinearProbe

WARM_START_DRAWS = True
"""Whether the probe of posterior draw s starts from draw s − 1's probe (as a function of the raw
features) instead of from zero. Every fit converges to the same tolerance either way, so this moves
the cost, not the optimum: on digits and Fashion-MNIST runs top-1, NLL and ECE stayed within 0.002
of cold starts (≤ 0.0002 measured; tests/test_linear_probe.py; BENCHMARKS.md, "Evaluation you can defend")."""


@dataclass
class MarginalProbe:
    """One linear probe per embedding sample; predictions are averaged as probabilities (BMA)."""

    probes: list[LinearProbe]

    @classmethod
    def fit(
        cls, bank: FeatureBank, num_classes: int, warm_start: bool = WARM_START_DRAWS, **probe_kwargs: Any
    ) -> MarginalProbe:
        """The penalty is chosen on draw 0 (train split only) and reused for every other draw: the draws
        describe one posterior, so they share a regulariser. ``warm_start``: see ``WARM_START_DRAWS``.
        Warns when a probe did not converge (its numbers then depend on where it stopped)."""
        probes = [LinearProbe(**probe_kwargs).fit(bank.draws[0], bank.labels, num_classes)]
        for s in range(1, bank.num_samples):
            start = probes[-1] if warm_start else None
            probes.append(
                LinearProbe(**probe_kwargs).fit_fixed(
                    bank.draws[s], bank.labels, probes[0].selected_l2, num_classes, init=start
                )
            )
        marginal = cls(probes)
        if not marginal.converged:
            first = probes[0]
            warnings.warn(
                f"a linear probe did not converge within {first.max_iter} L-BFGS iterations (largest "
                f"final max|gradient|/loss {marginal.relative_gradient:.1e}, tolerance {first.tolerance:g}): "
                "its numbers depend on where it stopped",
                stacklevel=2,
            )
        return marginal

    @property
    def converged(self) -> bool:
        """Every fit of every draw's probe (selection candidates included) met the tolerance."""
        return all(probe.converged for probe in self.probes)

    @property
    def iterations(self) -> int:
        """The most L-BFGS iterations a draw's final fit took."""
        return max(probe.fitted.iterations for probe in self.probes if probe.fitted is not None)

    @property
    def gradient_norm(self) -> float:
        """The largest final max |∂L/∂(V, b)| over the draws' probes (preconditioned coordinates)."""
        return max(probe.fitted.gradient_norm for probe in self.probes if probe.fitted is not None)

    @property
    def relative_gradient(self) -> float:
        """The largest final max |∇L| / L over the draws' probes (converged: ≤ the tolerance)."""
        return max(probe.fitted.relative_gradient for probe in self.probes if probe.fitted is not None)

    @property
    def selected_l2(self) -> float:
        return self.probes[0].selected_l2

    def sample_probs(self, draws: Tensor) -> Tensor:
        """[S, M, C] probabilities, draw s through probe s (a single draw goes through every probe)."""
        count = max(len(self.probes), draws.shape[0])
        return torch.stack(
            [
                self.probes[min(s, len(self.probes) - 1)]
                .predict_proba(draws[min(s, draws.shape[0] - 1)])
                .float()
                for s in range(count)
            ]
        )
