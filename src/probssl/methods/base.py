"""The interface every method implements, deterministic or probabilistic.

A method is an ``nn.Module`` holding a backbone and its own heads. The training loop knows only
``loss(views)`` and ``update_targets(progress)``; the evaluation suite knows only ``embed(x)``.
``forward`` is ``loss`` so that DistributedDataParallel's gradient hooks see the whole step. A method
may offer a supervised mode (:meth:`images_per_class` not ``None``): the loop then draws
class-balanced batches and passes their class labels, ``loss(views, labels=...)``.

Methods whose posterior lives in *weight* space (cSGHMC's sample bank, LAM's Laplace posterior)
need a little more of the machinery, through hooks that default to doing nothing: choose their own
optimizer (:meth:`configure_optimizer`), act after each step (:meth:`after_step`, e.g. store a
sample), make one more pass over the training views once training is done (:meth:`after_training`,
e.g. a post-hoc Hessian), find their artefacts in a run directory (:meth:`attach_run`) and get
ready for evaluation on training images (:meth:`prepare_for_evaluation`, e.g. re-estimate
BatchNorm statistics per sample). The shared machinery calls the hooks; it never asks which method
it is running.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from probssl.config import method_config, yaml_safe
from probssl.embedding import Embedding

_WARNED_NO_SAMPLES: set[str] = set()

#: :attr:`SSLMethod.supervision` values: trained without labels (the library's default) or on class labels.
SELF_SUPERVISED = "self-supervised"
CLASS_LABELS = "class labels"

#: What ``after_training``'s batches are: the views, or (views, class labels) for a label-trained method.
TrainingViews = list[Tensor] | tuple[list[Tensor], Tensor]


def _warn_when_samples_ignored(embed: Callable[..., Embedding]) -> Callable[..., Embedding]:
    """Wrap a method's ``embed``: asking for samples from a method that has none warns, once per method.

    Silently returning ``samples=None`` for ``embed(x, samples=8)`` looks like a bug to the caller;
    the point estimate and ``uncertainty`` are what such a method offers.
    """

    @functools.wraps(embed)
    def wrapper(self: SSLMethod, x: Tensor, samples: int | None = None) -> Embedding:
        result = embed(self, x, samples=samples)
        name = type(self).__name__
        if samples is not None and samples > 1 and result.samples is None and name not in _WARNED_NO_SAMPLES:
            _WARNED_NO_SAMPLES.add(name)
            warnings.warn(
                f"{name}.embed(x, samples={samples}) has no samples to draw: its embedding is a point "
                "(Embedding.mean) with its uncertainty in Embedding.uncertainty (see docs/methods.md)",
                stacklevel=2,
            )
        return result

    return wrapper


@dataclass
class MethodConfig:
    """Base class of each method's hyper-parameter dataclass (one home per value)."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming ``method.<key>`` and what it may be, for a value out of range.

        Why a method, not ``__post_init__``: a run's overrides are set on the dataclass after it is made.
        :func:`probssl.config.method_config` calls it, so a bad value is a one-line ``ConfigError``
        before any data is read or run directory written; :class:`SSLMethod`'s constructor calls it
        too, for methods built from the Python API. The base class accepts everything.
        """


def check_at_least(cfg: MethodConfig, minimum: float, *names: str, why: str = "") -> None:
    """Each ``method.<name>`` must be ≥ ``minimum`` (``why``: what a smaller value would break)."""
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise ValueError(f"method.{name} must be >= {minimum:g}{why}, got {value}")


def check_positive(cfg: MethodConfig, *names: str, why: str = "") -> None:
    """Each ``method.<name>`` must be > 0."""
    for name in names:
        value = getattr(cfg, name)
        if not value > 0:
            raise ValueError(f"method.{name} must be > 0{why}, got {value}")


def check_interval(cfg: MethodConfig, name: str, interval: str) -> None:
    """``method.<name>`` must lie in ``interval``, written as in mathematics: "[0, 1]", "(0, 1]", "[0, 1)"."""
    value = getattr(cfg, name)
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    if not (above and below):
        raise ValueError(f"method.{name} must be in {interval}, got {value}")


def check_choice(cfg: MethodConfig, name: str, choices: Iterable[str]) -> None:
    """``method.<name>`` must be one of ``choices``."""
    value, valid = getattr(cfg, name), tuple(choices)
    if value not in valid:
        raise ValueError(f"method.{name} must be one of {', '.join(valid)}, got {value!r}")


@dataclass(frozen=True)
class TrainContext:
    """What the training loop tells a method's hooks about the run it is in."""

    run_dir: Path
    is_main: bool  # rank 0: the one process that writes files
    num_data: int  # training images (N of a likelihood N·L̂)
    steps_per_epoch: int
    total_steps: int
    lr: float  # the base learning rate after batch-size scaling
    seed: int


def _expects_normalised_float(embed: Callable[..., Embedding]) -> Callable[..., Embedding]:
    """Guard one ``embed``: raw uint8 pixels would be silently mis-scaled (0..255, unnormalised)."""

    @functools.wraps(embed)
    def checked(self: SSLMethod, x: Tensor, *args: Any, **kwargs: Any) -> Embedding:
        if not torch.is_tensor(x) or not torch.is_floating_point(x):
            got = x.dtype if torch.is_tensor(x) else type(x).__name__
            raise TypeError(
                f"{type(self).__name__}.embed expects normalised float images [N, C, H, W], got {got}. "
                "Convert uint8 images with probssl.data.to_float(images, info.mean, info.std) using the "
                "run's DatasetInfo (probssl.load_run(run_dir).info), or call "
                "probssl.embed_images(run_dir, images) with the uint8 images or their folder, which does "
                "it for you."
            )
        if x.dim() != 4:  # else a layer deep inside reports "expected 4D input (got 3D input)"
            single = " (one image: x.unsqueeze(0))" if x.dim() == 3 else ""
            raise ValueError(
                f"{type(self).__name__}.embed expects a batch of images [N, C, H, W], got shape "
                f"{list(x.shape)}{single}"
            )
        if x.dtype == torch.float64:  # else "expected scalar type Double but found Float" from a conv
            name = type(self).__name__
            raise TypeError(f"{name}.embed computes in float32; got float64 images: pass x.float()")
        return embed(self, x, *args, **kwargs)

    checked.__guarded_input__ = True  # type: ignore[attr-defined]
    return checked


class SSLMethod(nn.Module):
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: False for methods with nothing to train (the raw-pixel floor): the loop skips them.
    trainable: ClassVar[bool] = True
    #: True for methods whose embeddings carry uncertainty (non-zero ``Embedding.uncertainty``).
    probabilistic: ClassVar[bool] = False
    #: One line for reports and the README: what ``Embedding.uncertainty`` measures and on what scale.
    uncertainty_doc: ClassVar[str] = "none (deterministic): the embedding carries no uncertainty of its own"
    #: True when ``embed`` returns as many draws as the model has (an ensemble's members), not ``samples``.
    draws_fixed_by_model: ClassVar[bool] = False
    #: number of augmented views the loss expects (2 global; multi-crop methods may ask for more).
    num_views: ClassVar[int] = 2
    #: True when the posterior is over the backbone's own weights (cSGHMC): a frozen backbone
    #: (``train.freeze_backbone``) would leave it nothing to sample.
    posterior_over_backbone: ClassVar[bool] = False
    #: True where ``embed``'s uncertainty is a deterministic function of the image, so ``probssl export``
    #: writes it as a second output; posteriors that draw samples export :meth:`point_embedding` only.
    exports_uncertainty: ClassVar[bool] = False
    #: What an exported model's embedding is, where it is not ``embed``'s mean (kept in the file).
    export_note: ClassVar[str] = ""
    #: Options that make the method train on class labels, each with what it does (``probssl list``).
    supervised_modes: ClassVar[dict[str, str]] = {}
    #: The registered deterministic method (at its defaults) this one adds a posterior to, whose numbers
    #: its paper's claims are measured against: the bench tables' "against its base" and ``probssl bench
    #: speed``'s ratio. None for the bases themselves and where it depends on the options (LAM's
    #: posteriors, the ensemble's member).
    deterministic_base: ClassVar[str | None] = None
    #: The training step's time over its base's that the method's issue set as a goal (``bench speed``).
    step_time_goal: ClassVar[float | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every method's own ``embed`` gets the same input check and the one-time "no samples"
        warning, so no method has to repeat them."""
        super().__init_subclass__(**kwargs)
        embed = cls.__dict__.get("embed")
        if embed is not None and not getattr(embed, "__guarded_input__", False):
            cls.embed = _warn_when_samples_ignored(_expects_normalised_float(embed))

    def __init__(self, backbone: nn.Module, cfg: MethodConfig) -> None:
        cfg.validate()  # also done by method_config; here for methods built from the Python API
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg

    @classmethod
    def resolved_args(cls, args: dict[str, Any], name: str) -> dict[str, Any]:
        """Every hyper-parameter of this method: ``args`` validated, each default filled in.

        Why: a run stores these in its ``config.yaml``, so a default changed later cannot change what
        an old run reloads as. Methods that wrap another registered method (its name and arguments in
        their own config) override this to fill the wrapped method's arguments too.
        """
        return yaml_safe(dataclasses.asdict(method_config(cls.config_class, args, name)))

    def loss(self, views: list[Tensor]) -> Tensor:
        raise NotImplementedError

    def forward(self, views: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """``loss(views)``; a method trained on class labels (:meth:`images_per_class`) gets them too."""
        return self.loss(views) if labels is None else self.loss(views, labels=labels)

    def images_per_class(self) -> int | None:
        """Images of each class per batch when the method trains on class labels, else ``None``.

        ``None`` (every self-supervised method): batches are random and ``loss(views)`` sees no label.
        An integer m makes the training loop draw class-balanced batches (B/m classes × m images,
        :mod:`probssl.data.class_balanced`) and call ``loss(views, labels=...)`` with the batch's class
        labels — a *supervised* mode, reported as such (:attr:`supervision`).
        """
        return None

    @property
    def supervision(self) -> str:
        """What the training signal was: ``"self-supervised"`` or ``"class labels"`` (eval.json, tables)."""
        return SELF_SUPERVISED if self.images_per_class() is None else CLASS_LABELS

    @torch.no_grad()
    def update_targets(self, progress: float) -> None:
        """Called after each optimizer step with progress = step / total_steps (EMA targets etc.)."""

    @_warn_when_samples_ignored
    @_expects_normalised_float
    @torch.no_grad()
    def embed(self, x: Tensor, samples: int | None = None) -> Embedding:
        """Backbone features of un-augmented, normalised images; deterministic by default.

        ``samples``: how many draws a probabilistic method should return in ``Embedding.samples``;
        methods without draws return ``samples=None`` (and warn once when asked for more than one).
        """
        return Embedding.deterministic(self.backbone(x).float())

    def point_embedding(self, x: Tensor) -> Tensor:
        """A deterministic embedding [N, D] of normalised images, for export: ``embed(x).mean``, which
        methods whose ``embed`` draws from a posterior replace by a point of it (``export_note``)."""
        return self.embed(x).mean

    def set_input_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Told once at build time how inputs were normalised; methods that need raw pixels override it."""

    def extra_state_for_logging(self) -> dict[str, Any]:
        """Scalars worth logging beside the loss (e.g. the current EMA momentum)."""
        return {}

    # ---- hooks for methods with more state than their weights (defaults: nothing to do) --------

    def configure_optimizer(self, ctx: TrainContext) -> torch.optim.Optimizer | None:
        """An optimizer of the method's own (e.g. a sampler), or ``None`` for the configured one.

        An optimizer with a true ``owns_lr_schedule`` attribute sets its own step sizes; the loop
        then leaves ``group["lr"]`` alone and logs ``optimizer.current_step_size``.
        """
        return None

    def after_step(self, step: int, ctx: TrainContext) -> None:
        """Called after optimizer step ``step`` (0-based) and ``update_targets``, on every rank."""

    def after_training(self, view_batches: Callable[[], Iterable[TrainingViews]], ctx: TrainContext) -> None:
        """Called once after the last step, on every rank, before the final weights are saved.

        ``view_batches()`` yields one epoch of augmented training views (this rank's shard, seeded:
        a resumed run sees the same views), for post-hoc posteriors such as LAM's Hessian pass; for
        a method trained on class labels (:meth:`images_per_class`) each item is a
        ``(views, labels)`` pair of class-balanced batches.
        """

    def attach_run(self, run_dir: Path, up_to_step: int | None = None) -> None:
        """Called when a run is loaded for evaluation: read artefacts kept beside the weights.

        ``up_to_step`` restricts them to what existed at that checkpoint (learning curves).
        """

    def prepare_for_evaluation(self, train_batches: Callable[[], Iterable[Tensor]]) -> None:
        """Called once before embedding, with normalised, un-augmented training batches."""

    def extra_representations(self) -> dict[str, Callable[[Tensor], Embedding]]:
        """Other representations worth their own linear probe, by name (e.g. SCL's hard K-bit code).

        The evaluation reports ``<name>/linear/top1`` for each; the default is none.
        """
        return {}

    def model_metrics(self, image_shape: tuple[int, int, int]) -> dict[str, float]:
        """Numbers about the model rather than its embeddings (e.g. code bits, compression ratio)."""
        return {}

    def available_draws(self) -> int | None:
        """How many distinct posterior draws ``embed`` can return, or None when it samples as many as
        asked (a parametric posterior) or has none (a point embedding). A bank of stored weight
        samples or an ensemble's members override it, so ``embed --samples`` can refuse more."""
        return None

    def cache_tag(self) -> str:
        """Extra identity for cached features beyond the weights' checksum (e.g. the sample bank)."""
        return ""

    def posterior_for_timing(self, samples: int) -> None:
        """Give the model ``samples`` posterior samples of its current weights, for timing only.

        Why: posteriors that live outside the module (cSGHMC's bank of weight snapshots, written
        during training) are empty in a freshly built model, so ``probssl bench speed`` would time
        a single deterministic pass. Methods whose ``embed`` draws its own samples need nothing.
        """
