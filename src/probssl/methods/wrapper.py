"""Methods built around another registered method: cSGHMC samples the weights of an objective's loss,
the deep ensemble trains M copies of a member. What both need, in one place:

- **Configuration.** The wrapped method is named in one field of the wrapper's config and its
  hyper-parameters in another (``objective`` / ``objective_args``, ``member`` / ``member_args``).
  :meth:`WrappingMethod.resolved_args` fills the wrapped method's defaults in too, so a run's
  ``config.yaml`` holds every value. ``wrapped_defaults`` are where a wrapper starts a given method
  from (the ensemble's LAM members are deterministic), under whatever the user gives.
- **Construction.** ``SSLMethod.__init__`` would register the backbone a second time, beside the
  wrapped method that owns it (``backbone.*`` and ``objective.backbone.*`` in the weights file), so a
  wrapper starts from ``nn.Module.__init__`` and :attr:`~WrappingMethod.backbone` is the first
  wrapped method's. Wrapping itself, or a method with nothing to train, is refused.
- **Hooks.** Everything the training loop and the evaluation call is passed on to every wrapped
  method unless the wrapper has its own use for it (cSGHMC's sampler replaces the objective's
  optimizer, its weight-sample bank replaces the objective's evaluation hooks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from probssl.config import ConfigError, method_config
from probssl.methods.base import MethodConfig, SSLMethod, TrainContext, TrainingViews
from probssl.methods.registry import METHODS


class WrappingMethod(SSLMethod):
    """An :class:`SSLMethod` whose loss and embedding come from other registered methods."""

    #: The config field naming the wrapped method, and the one holding its hyper-parameters.
    wrapped_field: ClassVar[str]
    wrapped_args_field: ClassVar[str]
    #: Arguments a wrapped method starts from, by its name; the user's ``<wrapped_args_field>`` go on top.
    wrapped_defaults: ClassVar[dict[str, dict[str, Any]]] = {}
    #: Appended to the refusal of wrapping itself: which methods to name instead.
    self_wrap_hint: ClassVar[str] = ""

    @classmethod
    def wrapped_args(cls, name: str, given: dict[str, Any]) -> dict[str, Any]:
        """The wrapped method ``name``'s arguments: its ``wrapped_defaults`` under ``given``."""
        return {**cls.wrapped_defaults.get(name, {}), **given}

    @classmethod
    def resolved_args(cls, args: dict[str, Any], name: str) -> dict[str, Any]:
        """The wrapper's own arguments and, filled in the same way, those of the method it wraps."""
        resolved = super().resolved_args(args, name)
        inner, inner_cls = resolved[cls.wrapped_field], METHODS.get(resolved[cls.wrapped_field])
        if inner_cls is not cls:  # wrapping itself is refused by the constructor, with its own message
            given = cls.wrapped_args(inner, resolved[cls.wrapped_args_field])
            resolved[cls.wrapped_args_field] = inner_cls.resolved_args(given, inner)
        return resolved

    def __init__(self, cfg: MethodConfig) -> None:
        cfg.validate()
        nn.Module.__init__(self)  # the backbone lives inside the wrapped method(s), registered once
        self.cfg = cfg

    def wrapped_class(self) -> type[SSLMethod]:
        """The wrapped method's class, refused when it is the wrapper itself or has nothing to train."""
        name = getattr(self.cfg, self.wrapped_field)
        inner_cls = METHODS.get(name)
        if inner_cls is type(self):
            raise ConfigError(f"method.{self.wrapped_field} cannot be {name} itself{self.self_wrap_hint}")
        if not inner_cls.trainable:
            raise ConfigError(f"method.{self.wrapped_field} '{name}' has nothing to train")
        return inner_cls

    def build_wrapped(self, inner_cls: type[SSLMethod], backbone: nn.Module) -> SSLMethod:
        """One wrapped method on ``backbone``, with its arguments from the wrapper's config."""
        name = getattr(self.cfg, self.wrapped_field)
        args = self.wrapped_args(name, getattr(self.cfg, self.wrapped_args_field))
        return inner_cls(backbone, method_config(inner_cls.config_class, args, name))

    def wrapped_methods(self) -> list[SSLMethod]:
        """The methods this one wraps, in order (the first one's backbone is :attr:`backbone`)."""
        raise NotImplementedError

    @property
    def backbone(self) -> nn.Module:  # type: ignore[override]
        return self.wrapped_methods()[0].backbone

    @property
    def num_views(self) -> int:  # type: ignore[override]
        return self.wrapped_methods()[0].num_views

    # ---- passed on to every wrapped method -------------------------------------------------------

    def loss(self, views: list[Tensor], labels: Tensor | None = None) -> Tensor:
        """The wrapped methods' losses summed (each one's gradient is what training it alone gives)."""
        losses = [method(views, labels) for method in self.wrapped_methods()]
        return losses[0] if len(losses) == 1 else torch.stack(losses).sum()

    def images_per_class(self) -> int | None:
        return self.wrapped_methods()[0].images_per_class()  # the wrapped methods share one config

    def set_input_normalisation(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        for method in self.wrapped_methods():
            method.set_input_normalisation(mean, std)

    @torch.no_grad()
    def update_targets(self, progress: float) -> None:
        for method in self.wrapped_methods():
            method.update_targets(progress)

    def configure_optimizer(self, ctx: TrainContext) -> torch.optim.Optimizer | None:
        """The configured optimizer for all; a wrapped method with an optimizer of its own is refused."""
        for method in self.wrapped_methods():
            if method.configure_optimizer(ctx) is not None:
                name = getattr(self.cfg, self.wrapped_field)
                raise ConfigError(
                    f"method.{self.wrapped_field} '{name}' brings its own optimizer; not wrapped"
                )
        return None

    def after_step(self, step: int, ctx: TrainContext) -> None:
        for method in self.wrapped_methods():
            method.after_step(step, ctx)

    def after_training(self, view_batches: Callable[[], Iterable[TrainingViews]], ctx: TrainContext) -> None:
        for method in self.wrapped_methods():
            method.after_training(view_batches, ctx)

    def attach_run(self, run_dir: Path, up_to_step: int | None = None) -> None:
        for method in self.wrapped_methods():
            method.attach_run(run_dir, up_to_step)

    def prepare_for_evaluation(self, train_batches: Callable[[], Iterable[Tensor]]) -> None:
        for method in self.wrapped_methods():
            method.prepare_for_evaluation(train_batches)
