"""CPU time of training steps for issue 32's encoder tables (BENCHMARKS.md, "Encoders for real images").

    python scripts/encoder_cpu_steps.py 224 FOLDER [--precision bf16]   # ResNet-50 / ViT-S/16 at 224 px
    python scripts/encoder_cpu_steps.py frozen FOLDER                    # frozen heads vs SimCLR at 64 px

The steps are ``probssl bench speed``'s own (its ``_Runner``: augmentation, forward, backward, optimizer,
target update; and the backbone's forward + backward on fixed views, the floor). Timed as CPU time of one
intra-op thread (``time.process_time``), so that a machine shared with other jobs still gives the step's
cost on a core of its own; arms interleaved, median of the repeats. On an idle machine
``probssl bench speed`` gives the same ratios in wall time (README, Benchmarks).

``224``: whole SimCLR step / backbone forward + backward for ResNet-50 with the ImageNet stem, ViT-S/16,
and ResNet-50 with the CIFAR stem (batch 2: it costs 16x per image). ``frozen``: SimCLR end to end against
LAM post-hoc and VI-SimSiam heads on the frozen encoder (ResNet-18, ImageNet stem), and LAM on cached
features (``data.views=none``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from probssl.bench.speed import _Runner
from probssl.config import build_config


def _cpu_medians(runners: dict[str, _Runner], parts: tuple[str, ...], repeats: int) -> dict[str, dict]:
    times = {label: {part: [] for part in parts} for label in runners}
    for runner in runners.values():  # warm-up (and the pass that fills a feature cache)
        for part in parts:
            getattr(runner, part)()
    for _ in range(repeats):
        for label, runner in runners.items():
            for part in parts:
                start = time.process_time()
                getattr(runner, part)()
                times[label][part].append(time.process_time() - start)
    return {label: {p: statistics.median(v) for p, v in t.items()} for label, t in times.items()}


def at_224(folder: str, precision: str, repeats: int) -> None:
    arms = [
        ("resnet50, ImageNet stem", {"backbone": "resnet50", "backbone_args": {"stem": "imagenet"}}, 8),
        ("vit_small, 16-px patches", {"backbone": "vit_small", "backbone_args": {"patch_size": 16}}, 8),
        ("resnet50, CIFAR stem", {"backbone": "resnet50", "backbone_args": {"stem": "cifar"}}, 2),
    ]
    for label, mapping, batch in arms:  # one arm at a time: each compares with its own floor
        cfg = build_config(
            method="simclr",
            data={"dataset": folder, "image_size": 224},
            train={"batch_size": batch, "precision": precision},
            **mapping,
        )
        images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8)
        runner = _Runner(cfg, torch.device("cpu"), images)
        med = _cpu_medians({label: runner}, ("step", "backbone_step"), repeats)[label]
        print(json.dumps({
            "arm": label, "batch": batch, "precision": precision, "step_cpu_s": med["step"],
            "backbone_cpu_s": med["backbone_step"], "ratio": med["step"] / med["backbone_step"],
            "step_cpu_s_per_image": med["step"] / batch,
        }), flush=True)  # fmt: skip


def frozen(folder: str, repeats: int) -> None:
    arms = [
        ("simclr end to end", "simclr", {}, False, None),
        ("lam posthoc, frozen", "lam", {"posterior": "posthoc"}, True, None),
        ("vi_simsiam, frozen", "vi_simsiam", {}, True, None),
        ("lam posthoc, frozen, views=none (cached)", "lam", {"posterior": "posthoc"}, True, "none"),
    ]
    images = torch.randint(0, 256, (64, 3, 64, 64), dtype=torch.uint8)
    runners = {}
    for label, method, args, freeze, views in arms:
        cfg = build_config(
            method=method,
            method_args=args,
            backbone="resnet18",
            backbone_args={"stem": "imagenet"},
            data={"dataset": folder, "image_size": 64, "views": views},
            train={"batch_size": 64, "precision": "fp32", "freeze_backbone": freeze},
        )
        runners[label] = _Runner(cfg, torch.device("cpu"), images)
    medians = _cpu_medians(runners, ("step",), repeats)
    reference = medians["simclr end to end"]["step"]
    for label, med in medians.items():
        print(
            json.dumps({"arm": label, "step_cpu_s": med["step"], "ratio_to_simclr": med["step"] / reference})
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=("224", "frozen"))
    parser.add_argument("folder", help="an image folder (e.g. scripts/tiny_imagenet_folder.py's output)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.table == "224":
        at_224(args.folder, args.precision, args.repeats)
    else:
        frozen(args.folder, args.repeats)


if __name__ == "__main__":
    main()
