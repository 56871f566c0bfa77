"""Bayesian SSL with cyclical SGHMC (Javanbakhat & Lippert, arXiv 2308.01271; design.md §3.1).

The algorithm box, as this file runs it:

    objective L̂  = a registered SSL loss (BYOL by default, SimCLR selectable), unchanged
    prior        p(θ) = N(0, λ⁻¹ I) over the online network's trainable weights θ
    potential    U(θ) = N · L̂(θ) − log p(θ),  target ∝ exp(−U/T)
    for k = 0 … K_total − 1:                         (K_c = K_total // cycles steps per cycle)
        η_k = η₀/2 · [cos(π (k mod K_c)/K_c) + 1]    η₀ = optim.lr · batch/256
        exploration stage (first ``exploration_fraction`` of the cycle): SGD-momentum, no noise
        sampling stage (the rest): SGHMC, noise √(2αη_k T / N) ξ  (``textbook``) or SGLD (``paper_code``)
        update the objective's targets (BYOL's EMA)
        at ``samples_per_cycle`` positions spread over the sampling stage, ending on the cycle's
        last step: store the online encoder's weights in the sample bank (on disk, at once)
    evaluation: per stored sample, re-estimate BatchNorm statistics on training images, embed, fit
    one linear probe per sample and average the probabilities (BMA, done by the shared suite).

The sampler is :class:`~probssl.posteriors.sghmc.CyclicalSGHMC` (update rules and the per-datapoint
scaling are documented and tested there); ``temperature = 0`` keeps every step and storage position
but switches the noise off: the snapshot-ensemble ablation, so cSGHMC − snapshot is the posterior's
own effect. ``optim.lr`` is η₀; ``optim.name``, ``optim.weight_decay`` and the warm-up are not used
(the sampler owns the schedule and the prior precision plays weight decay's role, λ/N).

``embed(x, samples=S)`` returns the embedding under each of the last S stored samples ([S, N, D];
all of them by default). Deviations from the paper, on purpose:

- Downstream heads are linear probes on frozen features per sample; the paper fine-tunes.
- ``Embedding.mean`` is the posterior mean embedding, the average of the returned draws
  (1/S) Σ_s f_θs(x), the centre that ``Embedding.uncertainty`` measures the spread around. The
  average is an embedding because the samples' feature axes line up: each cycle starts from the
  previous one's end (a warm restart, not a fresh initialisation); on digits (4 cycles × 3
  samples) an image's unit embeddings under samples of different cycles have cosine 0.987–0.998.
- ``Embedding.uncertainty`` is the variance of the sampled embeddings as the paper asks, computed on
  L2-normalised draws (total variance = 1 − ‖mean direction‖²) so that it is scale-free. Where
  cycles drift apart it also reflects the rotation between them; predictive entropy and mutual
  information (computed by the suite from the per-sample probes) do not have that problem.
- Samples are stored per step at spaced positions rather than per epoch (see ``sample_positions``).
- The objective's own schedules (BYOL's EMA momentum) follow overall progress, not the cycle.
- BatchNorm statistics are re-estimated on un-augmented training images (the inputs evaluation
  sees), with exact pooled statistics (``recompute_batchnorm_stats``).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from probssl.config import ConfigError
from probssl.embedding import Embedding
from probssl.methods.base import (
    MethodConfig,
    SSLMethod,
    TrainContext,
    check_at_least,
    check_choice,
    check_interval,
)
from probssl.methods.registry import METHODS
from probssl.methods.wrapper import WrappingMethod
from probssl.posteriors.sample_bank import SampleBank, recompute_batchnorm_stats
from probssl.posteriors.sghmc import VARIANTS, CyclicalSGHMC, sample_positions

BANK_DIR = "samples"
# Part of cached features' identity: banks cached when ``Embedding.mean`` was the newest draw
# (before it became the draws' average) are recomputed rather than reused.
MEAN_DEFINITION = "mean-of-draws"


def too_short_message(total_steps: int, steps_per_epoch: int, cycles: int, samples_per_cycle: int) -> str:
    """Why a run is too short for its cycles, and the overrides that would make it fit.

    A cycle needs at least max(2, samples_per_cycle) steps (one exploration step, then one per
    sample), so the fixes are fewer cycles, fewer samples per cycle, or more epochs.
    """
    need = max(2, samples_per_cycle)
    fixes = []
    if total_steps // need >= 1:
        fixes.append(f"method.cycles={total_steps // need}")
    if total_steps // cycles >= 2:
        fixes.append(f"method.samples_per_cycle={total_steps // cycles}")
    epochs = -(-cycles * need // max(steps_per_epoch, 1))
    fixes.append(f"train.epochs={epochs}")
    return (
        f"{total_steps} training steps cannot hold method.cycles={cycles} cycles of at least "
        f"max(2, method.samples_per_cycle={samples_per_cycle}) = {need} steps; set one of: "
        + ", or ".join(fixes)
    )


@dataclass
class CSGHMCConfig(MethodConfig):
    objective: str = "byol"  # any registered trainable method; its loss is L̂
    objective_args: dict[str, Any] = field(default_factory=dict)  # that method's own hyper-parameters
    variant: str = "textbook"  # textbook | paper_code (see probssl.posteriors.sghmc)
    cycles: int = 4
    exploration_fraction: float = 0.9  # released code: 45 of 50 epochs per cycle without noise
    samples_per_cycle: int = 3
    temperature: float = 0.1  # cold posterior of the released code; 0 = snapshot ensemble
    prior_precision: float = 1.0  # λ; σ_p = 1 in the released code (weight decay 1/N)
    friction: float = 0.1  # α of the textbook variant (≈ SGD momentum 0.9)
    beta: float = 0.9  # β of paper_code (effective temperature T(1 − β))
    bank_dtype: str = "float32"  # float32 | float16 storage of the samples
    bn_images: int = 5000  # training images per sample for BatchNorm re-estimation

    def validate(self) -> None:
        """The sampler's own ranges (:class:`CyclicalSGHMC`), checked before training starts."""
        check_choice(self, "variant", VARIANTS)
        check_at_least(self, 1, "cycles", "samples_per_cycle", "bn_images")
        check_interval(self, "exploration_fraction", "[0, 1]")
        check_at_least(self, 0, "temperature", "prior_precision")
        check_interval(self, "friction", "(0, 1]")
        check_interval(self, "beta", "[0, 1)")
        check_choice(self, "bank_dtype", ("float32", "float16"))


@METHODS.register("csghmc")
class CyclicalSGHMCSSL(WrappingMethod):
    config_class = CSGHMCConfig
    deterministic_base = "byol"  # the default objective's loss, sampled
    step_time_goal = 1.10
    wrapped_field, wrapped_args_field = "objective", "objective_args"
    self_wrap_hint = "; use byol or simclr"
    probabilistic = True
    posterior_over_backbone = True
    export_note = (
        "the encoder's weights at the end of training, not a posterior sample nor an average of them: the "
        "samples live in the run's bank (probssl embed --samples)"
    )
    uncertainty_doc = (
        "spread of the weight-space posterior: 1 − ‖mean over SGHMC weight samples of the unit "
        "embedding‖², Σ_d of the per-dimension variance of unit vectors; 0 when all samples agree, at "
        "most 1"
    )

    def __init__(self, backbone: nn.Module, cfg: CSGHMCConfig) -> None:
        super().__init__(cfg)
        objective_cls = self.wrapped_class()
        self.objective: SSLMethod = self.build_wrapped(objective_cls, backbone)
        self._sampler: CyclicalSGHMC | None = None
        self._positions: set[int] = set()
        self._steps_per_cycle = 0
        self._bank: SampleBank | None = None
        self._samples: list[dict[str, Tensor]] = []  # evaluation: one backbone state per sample
        self._samples_fingerprint = ""

    def wrapped_methods(self) -> list[SSLMethod]:
        return [self.objective]

    # ---- training: the objective's loss, its targets and input normalisation (WrappingMethod) ----

    def configure_optimizer(self, ctx: TrainContext) -> CyclicalSGHMC:
        c = self.cfg
        steps_per_cycle = ctx.total_steps // c.cycles
        if steps_per_cycle < 2 or c.samples_per_cycle > steps_per_cycle:
            raise ConfigError(
                too_short_message(ctx.total_steps, ctx.steps_per_epoch, c.cycles, c.samples_per_cycle)
            )
        self._steps_per_cycle = steps_per_cycle
        self._positions = set(sample_positions(steps_per_cycle, c.exploration_fraction, c.samples_per_cycle))
        if ctx.is_main:  # reopening an existing bank (a resumed run) continues its numbering
            self._bank = SampleBank(ctx.run_dir / BANK_DIR, dtype=c.bank_dtype)
        self._sampler = CyclicalSGHMC(
            [p for p in self.objective.parameters() if p.requires_grad],
            lr=ctx.lr,
            num_data=ctx.num_data,
            prior_precision=c.prior_precision,
            temperature=c.temperature,
            friction=c.friction,
            steps_per_cycle=steps_per_cycle,
            exploration_fraction=c.exploration_fraction,
            variant=c.variant,
            beta=c.beta,
            seed=ctx.seed,  # the same on every rank: identical noise keeps DDP replicas in sync
        )
        return self._sampler

    def after_step(self, step: int, ctx: TrainContext) -> None:
        """Store the encoder after the steps at the sampling positions; rank 0 writes the bank (the bank
        is the posterior: the objective's own per-step hook is not called)."""
        if self._bank is None:
            return  # not rank 0, or not trained through configure_optimizer
        cycle, position = divmod(step, self._steps_per_cycle)
        if cycle >= self.cfg.cycles or position not in self._positions:
            return  # the (< cycles) steps left after the last full cycle store nothing
        done = step + 1
        # A resumed run repeats the steps after its last checkpoint bit-exactly: keep the first copy.
        if any(self._bank.meta(i).get("step") == done for i in range(len(self._bank))):
            return
        self._bank.add(
            self.backbone.state_dict(),
            {"step": done, "cycle": cycle, "position": position, "noise": self.cfg.temperature > 0},
        )

    def extra_state_for_logging(self) -> dict[str, Any]:
        state = dict(self.objective.extra_state_for_logging())
        if self._sampler is not None:
            state["noise_on"] = float(self._sampler.noise_on)
            state["bank_samples"] = len(self._bank) if self._bank is not None else 0
        return state

    # ---- evaluation ----------------------------------------------------------------------------

    def attach_run(self, run_dir: Path, up_to_step: int | None = None) -> None:
        """Load the run's sample bank (only samples taken by ``up_to_step`` when given); the bank, not the
        objective, is what evaluation reads."""
        directory = Path(run_dir) / BANK_DIR
        self._samples, self._samples_fingerprint = [], ""
        if not (directory / "index.json").is_file():
            return
        bank = SampleBank(directory)
        reference = self.backbone.state_dict()  # device and dtype of each entry (fp16 banks widen back)
        digest = hashlib.sha256()
        for i in range(len(bank)):
            if up_to_step is not None and bank.meta(i)["step"] > up_to_step:
                continue
            state, meta = bank.load(i)
            self._samples.append({k: v.to(reference[k]) for k, v in state.items()})
            digest.update(f"{i}:{meta['step']};".encode())
        digest.update(bank.directory.joinpath("index.json").read_bytes())
        self._samples_fingerprint = f"bank{len(self._samples)}-{digest.hexdigest()[:16]}-{MEAN_DEFINITION}"

    @property
    def num_posterior_samples(self) -> int:
        return len(self._samples)

    @torch.no_grad()
    def prepare_for_evaluation(self, train_batches: Callable[[], Iterable[Tensor]]) -> None:
        """Re-estimate each sample's BatchNorm statistics: stored running stats belong to the
        weights *and* augmented inputs of training time, not to this sample on test-like inputs."""
        if not self._samples:
            return
        scratch = copy.deepcopy(self.backbone)
        for i, state in enumerate(self._samples):
            scratch.load_state_dict(state)
            if recompute_batchnorm_stats(scratch, _first_images(train_batches(), self.cfg.bn_images)) == 0:
                return  # no BatchNorm in this backbone: nothing to re-estimate
            self._samples[i] = {k: v.detach().clone() for k, v in scratch.state_dict().items()}
        self._samples_fingerprint += "-bn"

    def available_draws(self) -> int | None:
        """The weight samples collected (0 before the first: then ``embed`` is a point embedding)."""
        return self.num_posterior_samples

    def cache_tag(self) -> str:
        return self._samples_fingerprint

    def posterior_for_timing(self, samples: int) -> None:
        """``samples`` copies of the current weights: the same S backbone passes as a real bank."""
        state = {k: v.detach().clone() for k, v in self.backbone.state_dict().items()}
        self._samples = [state] * samples
        self._samples_fingerprint = f"timing{samples}"

    @torch.no_grad()
    def point_embedding(self, x: Tensor) -> Tensor:
        return self.backbone(x).float()

    @torch.no_grad()
    def embed(self, x: Tensor, samples: int | None = None) -> Embedding:
        if not self._samples:
            # No sample collected yet (an early checkpoint): the current weights, deterministically.
            return Embedding.deterministic(self.backbone(x).float())
        chosen = self._samples if samples is None else self._samples[-samples:]
        draws = torch.stack([functional_call(self.backbone, state, (x,)).float() for state in chosen])
        directions = torch.nn.functional.normalize(draws, dim=-1)
        spread = 1.0 - directions.mean(0).pow(2).sum(-1)  # Σ_d Var_s of unit vectors
        return Embedding(mean=draws.mean(0), samples=draws, uncertainty=spread.clamp_min(0.0))


def _first_images(batches: Iterable[Tensor], count: int) -> Iterable[Tensor]:
    """The batches that make up the first ``count`` images (the last one cut to fit)."""
    seen = 0
    for batch in batches:
        if seen >= count:
            return
        batch = batch[: count - seen]
        seen += len(batch)
        yield batch
