"""``probssl bench speed``: train-step time of each probabilistic method against its deterministic base.

Why this shape: a ratio is only meaningful when both arms see the same machine state, so every arm
lives in one process and the arms are *interleaved* (arm A, arm B, ..., arm A, ...) over several
repeats; the median of the repeats is reported. A step is what the training loop does per batch
minus data loading: batched augmentation, forward, backward, optimizer step, target update and the
method's ``after_step`` hook. The backbone's own forward + backward on the same views (a sum of
its features as the loss) is the floor no method can go below.

Inference: ``embed(x, samples=S)`` for S = 1, 8, 32 against one backbone forward on the same batch.

Augmentation (the ``augment`` entry): the views' cost on its own (and that of the kornia reference ops
the fused ones replaced), the backbone's forward + backward on fixed, already-made views, and the whole
step of the SimCLR arm (or the first arm) against it: the goal of issue 21 is a step within 1.15x the
backbone's own work, i.e. augmentation, heads, loss and optimizer together under 15% on top.

Memory: on a GPU the peak allocated memory of a step; on the CPU, where PyTorch's allocator keeps
no statistics, the bytes of the tensors autograd saves for backward (the activation memory, which
is what differs between methods) plus parameters, gradients and optimizer state.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from probssl.bench.provenance import provenance
from probssl.config import RunConfig, build_config
from probssl.data import DatasetInfo, MultiViewAugment, preset_for_dataset, resolve_dataset_info
from probssl.data.views import PRESETS
from probssl.methods import SSLMethod, TrainContext
from probssl.optim import build_optimizer
from probssl.precision import resolve_precision
from probssl.runs import build_model

CPU_MEMORY_KIND = "saved-for-backward + params/grads/optimizer state"

#: The whole SimCLR step over the backbone's own forward + backward on the same views (issue 21).
AUGMENT_GOAL = 1.15


@dataclass(frozen=True)
class Arm:
    """One timed configuration: a name for the table, a method and its overrides, and its base."""

    name: str
    method: str
    overrides: tuple[str, ...] = ()
    base: str | None = None  # the arm this one is compared with (None: a base itself)
    goal: float | None = None  # the ratio to the base its issue asks for (≤ goal)


#: LAM's posterior against its own deterministic form: one method, two arms (its base is an option of
#: the method, not another registered method), with the goal of its issue.
LAM_ARMS: tuple[Arm, ...] = (
    Arm("lam_deterministic", "lam", ("method.posterior=none",)),
    Arm("lam_online", "lam", ("method.posterior=online",), "lam_deterministic", 1.3),
)


def default_arms() -> tuple[Arm, ...]:
    """Every registered method that declares a ``deterministic_base``, timed against it with the goal it
    declares (``step_time_goal``), after the bases themselves; then LAM's pair. A method added to the
    registry is timed with no edit here."""
    from probssl.methods import METHODS

    declared = {name: METHODS.get(name) for name in METHODS.names() if METHODS.get(name).deterministic_base}
    bases = [Arm(base, base) for base in dict.fromkeys(cls.deterministic_base for cls in declared.values())]
    timed = [Arm(n, n, (), cls.deterministic_base, cls.step_time_goal) for n, cls in declared.items()]
    return (*bases, LAM_ARMS[0], *timed, LAM_ARMS[1])


@dataclass
class ArmResult:
    arm: Arm
    step_seconds: list[float] = field(default_factory=list)
    memory_bytes: int = 0
    embed_seconds: dict[int, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.step_seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _SavedTensorBytes:
    """Counts the bytes autograd saves for backward (distinct storages) inside the context."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self) -> _SavedTensorBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def _dataset_info(cfg: RunConfig) -> DatasetInfo:
    """The run's image shape and statistics: registered sets and own folders (``data.image_size``) alike."""
    data = cfg.data
    return resolve_dataset_info(data.dataset, data_dir=data.data_dir, **data.reader_options())


class _Runner:
    """A built method, its optimizer and augmentation, and a closure doing one training step."""

    def __init__(self, cfg: RunConfig, device: torch.device, batch: Tensor) -> None:
        info = _dataset_info(cfg)
        torch.manual_seed(cfg.train.seed)
        self.method: SSLMethod = build_model(cfg, info).to(device)
        if cfg.train.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.method.train()
        steps = 1000
        ctx = TrainContext(Path("."), True, 60_000, steps, steps, cfg.optim.lr, cfg.train.seed)
        self.ctx = ctx
        self.optimizer = self.method.configure_optimizer(ctx) or build_optimizer(
            self.method, cfg.optim, cfg.optim.lr
        )
        preset = cfg.data.views or preset_for_dataset(cfg.data.dataset, info.channels, info.image_size)
        self.augment = MultiViewAugment(
            PRESETS[preset], info.image_size, info.channels, info.mean, info.std, self.method.num_views
        ).to(device)
        self.reference_augment = MultiViewAugment(
            PRESETS[preset],
            info.image_size,
            info.channels,
            info.mean,
            info.std,
            self.method.num_views,
            backend="kornia",
        ).to(device)
        self.batch, self.device, self.channels_last = batch, device, cfg.train.channels_last
        self.precision = cfg.train.precision
        self.step_index = 0
        self.fixed_views: list[Tensor] | None = None

    def views(self) -> list[Tensor]:
        views = self.augment(self.batch)
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        return views

    def autocast(self):  # noqa: ANN201 - a context manager
        from probssl.train import autocast_context

        return autocast_context(self.device, self.precision)

    def step(self) -> None:
        with self.autocast():
            loss = self.method(self.views())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.method.update_targets(min(self.step_index / 1000, 1.0))
        self.method.after_step(self.step_index, self.ctx)
        self.step_index += 1

    def floor_step(self) -> None:
        self._backbone_step(self.views())

    def _backbone_step(self, views: list[Tensor]) -> None:
        with self.autocast():
            loss = sum(self.method.backbone(v).float().sum() for v in views)
        self.method.zero_grad(set_to_none=True)
        loss.backward()

    def backbone_step(self) -> None:
        """Forward + backward of the backbone on views made once: the work no augmentation can hide."""
        if self.fixed_views is None:
            self.fixed_views = [v.detach() for v in self.views()]
        self._backbone_step(self.fixed_views)

    def augment_only(self) -> None:
        self.views()

    def reference_augment_only(self) -> None:
        views = self.reference_augment(self.batch)
        if self.channels_last:
            [v.contiguous(memory_format=torch.channels_last) for v in views]

    def memory(self, fn: Callable[[], None]) -> int:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            return int(torch.cuda.max_memory_allocated(self.device))
        with _SavedTensorBytes() as saved, self.autocast():
            self.method(self.views())
        state = sum(p.numel() * p.element_size() * 2 for p in self.method.parameters())
        for buffers in self.optimizer.state.values():
            state += sum(t.numel() * t.element_size() for t in buffers.values() if isinstance(t, Tensor))
        return saved.total + state


def _time(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _synchronize(device)
    return (time.perf_counter() - start) / steps


def run_speed_benchmark(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    arms: tuple[Arm, ...] | None = None,
    repeats: int = 5,
    steps: int = 10,
    warmup: int = 3,
    device: str | None = None,
    samples: tuple[int, ...] = (1, 8, 32),
    progress: Callable[[str], None] | None = None,
    include_reference_augment: bool = True,
) -> dict[str, Any]:
    """Time every arm (by default :func:`default_arms`) interleaved; return a JSON-ready dict (rows,
    machine, protocol)."""
    arms = arms or default_arms()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base_cfg = build_config(config, list(overrides or []))
    info = _dataset_info(base_cfg)
    gen = torch.Generator().manual_seed(0)
    shape = (base_cfg.train.batch_size, info.channels, info.image_size, info.image_size)
    batch = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(dev)
    runners = {
        arm.name: _Runner(
            build_config(config, [*(overrides or []), f"method={arm.method}", *arm.overrides]), dev, batch
        )
        for arm in arms
    }
    results = {arm.name: ArmResult(arm) for arm in arms}
    floor: list[float] = []
    first = next(iter(runners.values()))
    # The augment entry's arm: SimCLR (the goal is stated for it) if timed, else the first.
    aug_arm = "simclr" if "simclr" in runners else arms[0].name
    aug_runner = runners[aug_arm]
    aug_parts = {"augment": aug_runner.augment_only, "backbone": aug_runner.backbone_step}
    if include_reference_augment:
        aug_parts["augment_kornia"] = aug_runner.reference_augment_only
    aug_times: dict[str, list[float]] = {name: [] for name in aug_parts}
    for runner in runners.values():  # warm-up: allocator, kernels, lazy state
        for _ in range(warmup):
            runner.step()
    for _ in range(warmup):
        first.floor_step()
        for fn in aug_parts.values():
            fn()
    for r in range(repeats):
        for arm in arms:
            results[arm.name].step_seconds.append(_time(runners[arm.name].step, steps, dev))
        floor.append(_time(first.floor_step, steps, dev))
        for name, fn in aug_parts.items():
            aug_times[name].append(_time(fn, steps, dev))
        if progress:
            progress(f"repeat {r + 1}/{repeats} done")
    for arm in arms:
        results[arm.name].memory_bytes = runners[arm.name].memory(runners[arm.name].step)

    # Inference: marginalised embedding of one batch of clean images vs one backbone forward.
    clean = first.views()[0].detach()
    inference: dict[str, dict[str, float]] = {}
    with torch.no_grad(), warnings.catch_warnings():
        # Every arm is timed at every S, including those that have no draws: that is the comparison.
        warnings.filterwarnings("ignore", ".*has no samples to draw")
        for runner in runners.values():
            runner.method.eval()
        backbone_forward = statistics.median(
            _time(lambda: first.method.backbone(clean), steps, dev) for _ in range(repeats)
        )
        for arm in arms:
            method = runners[arm.name].method
            times = {}
            for s in samples:
                method.posterior_for_timing(s)  # a sample bank of S (cSGHMC); a no-op elsewhere
                times[str(s)] = statistics.median(
                    _time(lambda m=method, s=s: m.embed(clean, samples=s if s > 1 else None), steps, dev)
                    for _ in range(repeats)
                )
            inference[arm.name] = times

    floor_median = statistics.median(floor)
    aug_step = results[aug_arm].median
    aug_median = {name: statistics.median(times) for name, times in aug_times.items()}
    augment = {
        "arm": aug_arm,
        "augment_ms": 1000 * aug_median["augment"],
        "augment_kornia_ms": 1000 * aug_median["augment_kornia"] if "augment_kornia" in aug_median else None,
        "backbone_ms": 1000 * aug_median["backbone"],
        "step_ms": 1000 * aug_step,
        "ratio": aug_step / aug_median["backbone"],
        "augment_share": aug_median["augment"] / aug_median["backbone"],
        "goal": AUGMENT_GOAL,
        "meets_goal": aug_step / aug_median["backbone"] <= AUGMENT_GOAL,
    }
    meta = provenance()
    rows = []
    for arm in arms:
        res = results[arm.name]
        base = results[arm.base].median if arm.base else None
        rows.append(
            {
                "arm": arm.name,
                "method": arm.method,
                "overrides": list(arm.overrides),
                "base": arm.base,
                "step_ms": 1000 * res.median,
                "step_ms_all": [1000 * s for s in res.step_seconds],
                "ratio_to_base": res.median / base if base else None,
                "goal": arm.goal,
                "meets_goal": (res.median / base <= arm.goal) if base and arm.goal else None,
                "ratio_to_floor": res.median / floor_median,
                "img_per_s": base_cfg.train.batch_size / res.median,
                "memory_mib": res.memory_bytes / 2**20,
                "embed_ms": {s: 1000 * t for s, t in inference[arm.name].items()},
                "embed_ratio_to_forward": {s: t / backbone_forward for s, t in inference[arm.name].items()},
            }
        )
    return {
        "rows": rows,
        "floor_step_ms": 1000 * floor_median,
        "augment": augment,
        "backbone_forward_ms": 1000 * backbone_forward,
        "memory_kind": "peak allocated (CUDA)"
        if dev.type == "cuda"
        else "saved-for-backward + params/grads/optimizer state",
        "protocol": {
            "config": str(config) if config else None,
            "overrides": list(overrides or []),
            "batch_size": base_cfg.train.batch_size,
            "backbone": base_cfg.backbone,
            "dataset": base_cfg.data.dataset,
            "precision": base_cfg.train.precision,
            "precision_resolved": resolve_precision(base_cfg.train.precision, dev),
            "channels_last": base_cfg.train.channels_last,
            "repeats": repeats,
            "steps_per_repeat": steps,
            "warmup_steps": warmup,
            "samples": list(samples),
        },
        "machine": {
            "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
            "processor": meta["processor"],
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "date": meta["date"],
        "commit": meta["commit"],
    }


def speed_markdown(result: dict[str, Any]) -> str:
    """The speed table as Markdown (one row per arm)."""
    samples = result["protocol"]["samples"]
    head = ["arm", "step ms", "img/s", "ratio to base (goal)", "ratio to backbone floor", "memory MiB"]
    head += [f"embed S={s} / fwd" for s in samples]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        if row["ratio_to_base"] is None:
            ratio = "base"
        else:
            mark = "" if row["meets_goal"] is None else (" ✓" if row["meets_goal"] else " ✗")
            ratio = f"{row['ratio_to_base']:.3f} vs {row['base']} (≤ {row['goal']}){mark}"
        cells = [
            row["arm"],
            f"{row['step_ms']:.1f}",
            f"{row['img_per_s']:.0f}",
            ratio,
            f"{row['ratio_to_floor']:.2f}",
            f"{row['memory_mib']:.1f}",
        ]
        cells += [f"{row['embed_ratio_to_forward'][str(s)]:.2f}" for s in samples]
        lines.append("| " + " | ".join(cells) + " |")
    p = result["protocol"]
    resolved = f" → {p['precision_resolved']}" if p.get("precision_resolved") else ""
    aug = result.get("augment")
    if aug:  # results saved before the entry existed have none
        lines.append("")
        lines.append(augment_markdown(aug))
    lines.append("")
    lines.append(
        f"Backbone floor (forward + backward of the views): {result['floor_step_ms']:.1f} ms; one backbone "
        f"forward of a clean batch: {result['backbone_forward_ms']:.1f} ms. Batch {p['batch_size']}, "
        f"{p['dataset']} shapes, precision {p['precision']}{resolved}, channels_last {p['channels_last']}; "
        "median of "
        f"{p['repeats']} interleaved repeats × {p['steps_per_repeat']} steps. "
        f"Memory: {result['memory_kind']}. "
        f"Machine: {result['machine']['device']} ({result['machine']['processor']}, "
        f"{result['machine']['threads']} threads, torch {result['machine']['torch']})."
    )
    return "\n".join(lines)


def augment_markdown(aug: dict[str, Any]) -> str:
    """The augment entry: views, backbone and whole step, and the step's ratio to the backbone."""
    head = [
        "augment",
        "views ms",
        "backbone fwd+bwd ms",
        "step ms",
        f"step / backbone (goal ≤ {aug['goal']})",
    ]
    views = f"{aug['augment_ms']:.1f}"
    if aug.get("augment_kornia_ms") is not None:
        views += f" (kornia ops: {aug['augment_kornia_ms']:.1f})"
    mark = " ✓" if aug["meets_goal"] else " ✗"
    cells = [
        aug["arm"],
        views,
        f"{aug['backbone_ms']:.1f}",
        f"{aug['step_ms']:.1f}",
        f"{aug['ratio']:.3f}{mark}",
    ]
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(cells) + " |"]
    )
