"""Cyclical stochastic-gradient Hamiltonian Monte Carlo (cSGHMC) over network weights.

Used by Bayesian SSL (Javanbakhat & Lippert, arXiv 2308.01271; design.md §3.1), which follows
cSG-MCMC (Zhang et al., ICLR 2020): a cosine step size that restarts every cycle, an exploration
stage at the start of each cycle (noise off: optimisation towards a new mode) and a sampling stage
at its end (noise on: a local posterior sample), with weight samples stored near the end of a cycle.

Target and scaling
------------------
The posterior is p(θ | D)^{1/T} ∝ exp(−U(θ)/T), with the potential

    U(θ) = N · L̂(θ) − log p(θ),    p(θ) = N(0, λ⁻¹ I),  so  ∇U = N ∇L̂ + λ θ,

L̂ = the per-datapoint loss of a mini-batch (the mean the training loop back-propagates), N =
``num_data``, λ = ``prior_precision``, T = ``temperature``. We use the **per-datapoint scaling** of
the cSG-MCMC code: the update applies the gradient of U/N = L̂ + (λ/N)·‖θ‖²/2 and rescales the noise
by 1/N. This is exactly the N-scaled update with step size η/N (substitute η' = η/N below), so the
stationary distribution is still exp(−U/T); but η keeps the scale of an ordinary SGD learning rate
on the mean loss (≈ 0.1–0.5), the exploration stage *is* SGD with weight decay λ/N, and the released
code's ``weight_decay = 1/N`` reads as λ = 1 (σ_p = 1). ``tests/test_sghmc.py`` checks the stationary
covariance on Gaussian potentials, including its 1/N and T scaling.

The two update rules, side by side (η = η_k from the schedule, α = ``friction``, ξ ~ N(0, I), noise
only in the sampling stage)::

    textbook   (Chen et al. 2014; cSG-MCMC code)      paper_code  (our reading of the released code)
    g = ∇L̂ + (λ/N) θ                                 g = ∇L̂ + (λ/N) θ
    v ← (1−α) v − η g + √(2 α η T / N) ξ              θ ← θ − η g + √(2 η T (1−β) / N) ξ
    θ ← θ + v
    target ∝ exp(−U / T)                              target ∝ exp(−U / (T (1−β)))
    exploration: SGD, momentum 1−α                    exploration: plain SGD

Textbook SGHMC is the Euler discretisation of underdamped Langevin dynamics with friction α: the
noise variance 2αηT balances the friction (fluctuation–dissipation), whatever α is.

*paper_code* is our reading of ``core/csghmc.py`` in the authors' repository (Mjavan/PSelf-Supervised):
there the step applies −(lr/2)·g, multiplies the momentum buffer by β·√(lr/N) (≈ 0.002 for lr = 0.2,
β = 0.9, N = 50 000, so momentum is effectively absent) and adds noise of variance lr·T(1−β)/N. With
η = lr/2 that is SGLD, θ ← θ − η g + √(2η·T(1−β)/N) ξ, at the effective temperature T(1−β): the
friction-like factor (1−β) shrinks the noise without a momentum to balance it. We drop the residual
β√(η/N) momentum term; to reproduce a released run use ``lr`` = their lr / 2 and ``beta`` = their
momentum (0.9), ``temperature`` = their ``temp`` (0.1).

Setting ``temperature = 0`` keeps the schedule and stages but removes the noise: the
snapshot-ensemble ablation of design.md §3.1 (b). ``steps_per_cycle = None`` gives a constant step
size η₀ with noise always on (plain SGHMC / SGLD), which is what the stationary tests use.

Distributed training
--------------------
The noise comes from a dedicated ``torch.Generator`` seeded at construction, on the parameters'
device. Under DDP every rank builds the sampler with the same ``seed`` and steps it in the same
order, so every rank draws the same ξ and, since DDP all-reduces the gradients, the replicas stay
identical without communication (no ``broadcast_from_main`` per step). This assumes identical
accelerator models on all ranks: CUDA's ``randn`` maps a generator state to numbers through a launch
grid sized by the SM count, so heterogeneous GPUs would draw different noise.

State and resume
----------------
Per parameter: the velocity ``v`` (textbook only). Sampler-wide: the step counter k, from which η_k
and the stage are computed, and the generator state. The latter two travel inside ``param_groups[0]``
of :meth:`CyclicalSGHMC.state_dict` (a JSON-friendly dict: the generator state as hex), because
:mod:`probssl.checkpoint` persists exactly ``state`` and ``param_groups``; a resumed run therefore
continues with bit-identical noise and step sizes.

The schedule functions are unit-agnostic: called with epochs and epochs per cycle they give the
epoch-based variant of the released code (noise and sample saving decided per epoch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "VARIANTS",
    "CyclicalSGHMC",
    "cycle_phase",
    "cyclical_step_size",
    "is_sampling_stage",
    "sample_positions",
    "should_store_sample",
]

VARIANTS = ("textbook", "paper_code")

#: Key in ``state_dict()["param_groups"][0]`` that carries the sampler-wide state (see module doc).
_SAMPLER_KEY = "sampler_state"


def _check_cycle(steps_per_cycle: int) -> None:
    if int(steps_per_cycle) != steps_per_cycle or steps_per_cycle < 1:
        raise ValueError(f"steps_per_cycle must be a positive integer, got {steps_per_cycle}")


def cycle_phase(step: int, steps_per_cycle: int) -> float:
    """Position of (0-based) ``step`` inside its cycle, (k mod K)/K ∈ [0, 1)."""
    _check_cycle(steps_per_cycle)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return (step % steps_per_cycle) / steps_per_cycle


def cyclical_step_size(step: int, eta0: float, steps_per_cycle: int) -> float:
    """Zhang et al. (2020), eq. 1: η_k = η₀/2 · [cos(π · (k mod K)/K) + 1].

    η₀ at the first step of every cycle, η₀/2 half-way, → 0 at its end (never exactly 0).
    """
    if eta0 < 0:
        raise ValueError(f"eta0 must be >= 0, got {eta0}")
    return 0.5 * eta0 * (math.cos(math.pi * cycle_phase(step, steps_per_cycle)) + 1.0)


def is_sampling_stage(step: int, steps_per_cycle: int, exploration_fraction: float) -> bool:
    """True when ``step`` lies in the noisy sampling stage: phase ≥ ``exploration_fraction``.

    The first ``exploration_fraction`` of each cycle explores (no noise, large steps find a new mode);
    the rest samples. Fraction 0 = noise always on; fraction 1 = never (a snapshot ensemble).
    """
    if not 0.0 <= exploration_fraction <= 1.0:
        raise ValueError(f"exploration_fraction must be in [0, 1], got {exploration_fraction}")
    return cycle_phase(step, steps_per_cycle) >= exploration_fraction


def should_store_sample(step: int, steps_per_cycle: int, samples_per_cycle: int) -> bool:
    """True when the (0-based) ``step`` just taken is one of the last ``samples_per_cycle`` of its cycle.

    Call it *after* the update of step k, with k: with ``samples_per_cycle = 1`` it fires once per
    cycle, on the smallest step size, which is where the sampler is closest to the posterior mode it
    explored. The released code's epoch rule, ``(epoch % cycle) + 1 > cycle − n``, is the same
    function called with epochs.
    """
    _check_cycle(steps_per_cycle)
    if not 1 <= samples_per_cycle <= steps_per_cycle:
        raise ValueError(
            f"samples_per_cycle must be in [1, steps_per_cycle={steps_per_cycle}], got {samples_per_cycle}"
        )
    return step % steps_per_cycle >= steps_per_cycle - samples_per_cycle


def sample_positions(steps_per_cycle: int, exploration_fraction: float, samples_per_cycle: int) -> list[int]:
    """In-cycle step indices (0-based, ascending) after which a sample is stored.

    Spread evenly over the sampling stage and ending on the cycle's last step (the smallest step
    size): position K−1−j·gap for j < n, gap = ⌊(sampling steps)/n⌋ ≥ 1. With per-step samples the
    released code's "last n epochs" rule would store n nearly identical weights (η_k ≈ 0 for the
    last few steps); spacing them over the noisy stage gives the sampler time to move between them.
    A snapshot ensemble (T = 0) uses the same positions, so the two arms differ only in the noise.
    """
    _check_cycle(steps_per_cycle)
    if not 1 <= samples_per_cycle <= steps_per_cycle:
        raise ValueError(
            f"samples_per_cycle must be in [1, steps_per_cycle={steps_per_cycle}], got {samples_per_cycle}"
        )
    if not 0.0 <= exploration_fraction <= 1.0:
        raise ValueError(f"exploration_fraction must be in [0, 1], got {exploration_fraction}")
    first_sampling = next(
        (k for k in range(steps_per_cycle) if is_sampling_stage(k, steps_per_cycle, exploration_fraction)),
        steps_per_cycle - 1,
    )
    gap = max(1, (steps_per_cycle - first_sampling) // samples_per_cycle)
    return sorted(steps_per_cycle - 1 - j * gap for j in range(samples_per_cycle))


class CyclicalSGHMC(torch.optim.Optimizer):
    """cSGHMC as a ``torch.optim.Optimizer``; the gradient in ``p.grad`` must be that of the mean loss L̂.

    Args:
        params: parameters (or groups) to sample.
        lr: η₀, the step size at the start of each cycle. The optimizer computes η_k itself from its
            step counter; a training loop must not overwrite ``group["lr"]`` with its own schedule.
        num_data: N, the number of training points (the likelihood is N·L̂).
        prior_precision: λ of the Gaussian prior N(0, λ⁻¹ I); 0 = flat prior.
        temperature: T; 1 = the Bayes posterior, < 1 a cold one (0.1 in the released code); 0 = no noise.
        friction: α (textbook); 0.1 ≈ SGD momentum 0.9. Ignored by ``paper_code``.
        steps_per_cycle: K; ``None`` = constant step size η₀ and noise always on.
        exploration_fraction: share of each cycle without noise (0.9 = the released 45 of 50 epochs).
        variant: ``"textbook"`` or ``"paper_code"`` (see the module docstring).
        beta: β of ``paper_code``, which samples at temperature T(1−β). Ignored by ``textbook``.
        seed: seeds the noise generator; use the same seed on every DDP rank.
    """

    #: The sampler computes η_k itself: a training loop must not write ``group["lr"]``.
    owns_lr_schedule = True

    def __init__(
        self,
        params: Iterable,
        lr: float,
        num_data: int,
        prior_precision: float = 1.0,
        temperature: float = 1.0,
        friction: float = 0.1,
        steps_per_cycle: int | None = None,
        exploration_fraction: float = 0.0,
        variant: str = "textbook",
        beta: float = 0.9,
        seed: int = 0,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr (η₀) must be >= 0, got {lr}")
        if num_data < 1:
            raise ValueError(f"num_data must be >= 1, got {num_data}")
        if prior_precision < 0:
            raise ValueError(f"prior_precision must be >= 0, got {prior_precision}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not 0.0 < friction <= 1.0:
            raise ValueError(f"friction must be in (0, 1], got {friction}")
        if steps_per_cycle is not None:
            _check_cycle(steps_per_cycle)
        if not 0.0 <= exploration_fraction <= 1.0:
            raise ValueError(f"exploration_fraction must be in [0, 1], got {exploration_fraction}")
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant '{variant}'; valid: {', '.join(VARIANTS)}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        defaults = dict(
            lr=lr,
            num_data=int(num_data),
            prior_precision=prior_precision,
            temperature=temperature,
            friction=friction,
            steps_per_cycle=steps_per_cycle,
            exploration_fraction=exploration_fraction,
            variant=variant,
            beta=beta,
        )
        super().__init__(params, defaults)
        self._sampler_step = 0  # k: the index of the next step
        self._seed = int(seed)
        self._generator: torch.Generator | None = None  # built lazily on the parameters' device
        self._pending_generator_state: tuple[str, str] | None = None  # (device type, hex) from a resume

    # ---- schedule, for the loop and for logging ------------------------------------------------

    @property
    def step_count(self) -> int:
        """Number of steps taken so far (k of the next step)."""
        return self._sampler_step

    def _last_or_next(self) -> int:
        # Logging happens right after step(): describe the step that produced the logged loss.
        return max(self._sampler_step - 1, 0)

    def step_size_at(self, step: int, group: dict[str, Any] | None = None) -> float:
        """η of step ``step`` for ``group`` (default: the first param group)."""
        group = self.param_groups[0] if group is None else group
        if group["steps_per_cycle"] is None:
            return float(group["lr"])
        return cyclical_step_size(step, group["lr"], group["steps_per_cycle"])

    def noise_on_at(self, step: int, group: dict[str, Any] | None = None) -> bool:
        """Whether step ``step`` injects noise: sampling stage and T > 0 (T = 0 is the no-noise ablation)."""
        group = self.param_groups[0] if group is None else group
        if group["temperature"] == 0:
            return False
        if group["steps_per_cycle"] is None:
            return True
        return is_sampling_stage(step, group["steps_per_cycle"], group["exploration_fraction"])

    @property
    def current_step_size(self) -> float:
        """η of the most recent step (of the first step before any was taken), first param group."""
        return self.step_size_at(self._last_or_next())

    @property
    def noise_on(self) -> bool:
        """Whether the most recent step (the first, before any) injected noise: sampling stage and T > 0."""
        return self.noise_on_at(self._last_or_next())

    # ---- the update -----------------------------------------------------------------------------

    def _noise_generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed)
            if self._pending_generator_state is not None:
                self._set_generator_state(*self._pending_generator_state)
                self._pending_generator_state = None
        elif self._generator.device != device:
            raise RuntimeError(
                f"CyclicalSGHMC keeps one noise generator on {self._generator.device}, but a parameter "
                f"lives on {device}; put all sampled parameters on one device"
            )
        return self._generator

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self._sampler_step
        for group in self.param_groups:
            eta = self.step_size_at(k, group)
            noise_on = self.noise_on_at(k, group)
            n, temp = group["num_data"], group["temperature"]
            decay = group["prior_precision"] / n  # ∇(−log p)/N: the prior on the per-datapoint scale
            if group["variant"] == "textbook":
                alpha = group["friction"]
                noise_std = math.sqrt(2.0 * alpha * eta * temp / n)
            else:
                noise_std = math.sqrt(2.0 * eta * temp * (1.0 - group["beta"]) / n)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.add(p, alpha=decay) if decay else p.grad
                if group["variant"] == "textbook":
                    state = self.state[p]
                    if "velocity" not in state:
                        state["velocity"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    v = state["velocity"]
                    v.mul_(1.0 - alpha).add_(grad, alpha=-eta)
                    if noise_on:
                        v.add_(self._noise_like(p), alpha=noise_std)
                    p.add_(v)
                else:
                    p.add_(grad, alpha=-eta)
                    if noise_on:
                        p.add_(self._noise_like(p), alpha=noise_std)
        self._sampler_step = k + 1
        return loss

    def _noise_like(self, p: Tensor) -> Tensor:
        return torch.randn(p.shape, generator=self._noise_generator(p.device), device=p.device, dtype=p.dtype)

    # ---- exact resume ---------------------------------------------------------------------------

    def _generator_state(self) -> tuple[str, str] | None:
        if self._generator is not None:
            state = self._generator.get_state()
            return self._generator.device.type, bytes(state.tolist()).hex()
        return self._pending_generator_state  # resumed but not stepped yet, or None (fresh)

    def _set_generator_state(self, device_type: str, hex_state: str) -> None:
        assert self._generator is not None
        if self._generator.device.type != device_type:
            raise RuntimeError(
                f"this sampler state was saved with its noise generator on '{device_type}' but the "
                f"parameters now live on '{self._generator.device.type}': the noise stream cannot be "
                "continued exactly; resume on the same kind of device"
            )
        self._generator.set_state(torch.tensor(list(bytes.fromhex(hex_state)), dtype=torch.uint8))

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus the step counter, seed and generator state in ``param_groups[0]``."""
        sd = super().state_dict()
        generator = self._generator_state()
        sd["param_groups"][0][_SAMPLER_KEY] = {
            "step": self._sampler_step,
            "seed": self._seed,
            "generator_device": None if generator is None else generator[0],
            "generator_state": None if generator is None else generator[1],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = [dict(g) for g in state_dict["param_groups"]]
        if _SAMPLER_KEY not in groups[0]:
            raise ValueError(
                "this optimizer state has no cSGHMC sampler state (step counter and noise generator): "
                "it was not written by CyclicalSGHMC.state_dict()"
            )
        sampler = groups[0].pop(_SAMPLER_KEY)
        super().load_state_dict({**state_dict, "param_groups": groups})
        self._sampler_step = int(sampler["step"])
        self._seed = int(sampler["seed"])
        self._generator, self._pending_generator_state = None, None
        if sampler["generator_state"] is not None:
            self._pending_generator_state = (sampler["generator_device"], sampler["generator_state"])
