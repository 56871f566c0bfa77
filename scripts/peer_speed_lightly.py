"""probssl's SimCLR step against lightly's, interleaved in one process (issue 32, the peer speed ratio).

Run in the vision environment, where lightly imports (it needs torchvision):

    .venv-vision/bin/pip install lightly
    .venv-vision/bin/python scripts/peer_speed_lightly.py --backbone convnet --size 32 --batch 256

Both arms get the same backbone instance's copy, the same batch of already augmented views, fp32, the same
optimizer (SGD, momentum 0.9) and the same projector shape (Linear-BN-ReLU-Linear, 512 hidden, 128 out).
lightly's arm is its documented loop: ``SimCLRProjectionHead`` and ``NTXentLoss`` on the two views,
``loss.backward(); optimizer.step(); optimizer.zero_grad()``. probssl's arm is what ``probssl.train`` does
per step minus data loading and augmentation (which lightly does in DataLoader workers with torchvision,
not comparable): ``method(views)``, ``backward``, ``step``, ``update_targets``, ``after_step``. Repeats
alternate the arms (A B A B ...); the median CPU time of each is reported (one intra-op thread by default,
so CPU time is the step's cost on a core of its own), and their ratio (≤ 1.0 is the goal).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="convnet")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    from probssl.methods import TrainContext, build_method
    from probssl.nn import build_backbone

    torch.manual_seed(0)
    options = {} if args.width is None else {"width": args.width}
    backbone = build_backbone(args.backbone, 3, args.size, **options)
    ours = build_method("simclr", copy.deepcopy(backbone), {"temperature": 0.2})
    ours_opt = torch.optim.SGD(ours.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    ctx = TrainContext(run_dir=None, is_main=True, num_data=50_000, steps_per_epoch=195, total_steps=1000,
                       lr=0.06, seed=0)  # fmt: skip

    class LightlySimCLR(nn.Module):  # lightly's documented SimCLR module
        def __init__(self, backbone: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            self.projection_head = SimCLRProjectionHead(backbone.out_dim, 512, 128)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.projection_head(self.backbone(x).flatten(start_dim=1))

    theirs = LightlySimCLR(copy.deepcopy(backbone))
    criterion = NTXentLoss(temperature=0.2)
    their_opt = torch.optim.SGD(theirs.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    views = [torch.randn(args.batch, 3, args.size, args.size) for _ in range(2)]

    def probssl_step() -> None:
        loss = ours(views)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()
        ours.update_targets(0.5)
        ours.after_step(0, ctx)

    def lightly_step() -> None:
        z0, z1 = theirs(views[0]), theirs(views[1])
        loss = criterion(z0, z1)
        loss.backward()
        their_opt.step()
        their_opt.zero_grad()

    times: dict[str, list[float]] = {"probssl": [], "lightly": []}  # CPU seconds of the process
    for step in (probssl_step, lightly_step):  # warm-up, not timed
        step()
    for _ in range(args.repeats):
        for name, step in (("probssl", probssl_step), ("lightly", lightly_step)):
            start = time.process_time()  # CPU time: robust to other processes on a shared machine
            step()
            times[name].append(time.process_time() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    import lightly

    print(json.dumps({
        "backbone": args.backbone, "width": args.width, "size": args.size, "batch": args.batch,
        "threads": args.threads, "torch": torch.__version__, "lightly": lightly.__version__,
        "probssl_s": medians["probssl"], "lightly_s": medians["lightly"],
        "ratio": medians["probssl"] / medians["lightly"], "repeats": args.repeats,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
