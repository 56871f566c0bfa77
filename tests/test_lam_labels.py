"""LAM with ``method.pairs=labels`` (the paper's supervised metric learning): the pairs a labelled
batch gives, the training loop's class-balanced batches and labels, exact resume, DDP, and the
supervised mark on the run's config, eval.json and tables.

Pairs and losses are checked against brute force in numpy (every pair enumerated by hand).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from probssl.config import build_config
from probssl.data import load_dataset
from probssl.data.class_balanced import ClassBalancedBatchPlan
from probssl.losses.metric_learning import mine_pairs
from probssl.methods import build_method
from probssl.methods.lam import LAM
from probssl.nn import build_backbone
from probssl.train import train, training_subset

pytestmark = pytest.mark.usefixtures("single_thread")

MARGIN = 0.7


def _lam(**args) -> LAM:
    torch.manual_seed(0)
    backbone = build_backbone("convnet", 1, 8, width=4)
    return build_method("lam", backbone, {"pairs": "labels", "posterior": "none", "embed_dim": 4, **args})


def _unit_embedding(method: LAM, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return F.normalize(method.embedding(method.backbone(x)), dim=-1).double().numpy()


def _brute_force_loss(z: np.ndarray, pairs: list[tuple[int, int, bool]]) -> float:
    total = 0.0
    for a, o, positive in pairs:
        d = float(np.linalg.norm(z[a] - z[o]))
        total += 0.5 * d * d if positive else 0.5 * max(MARGIN - d, 0.0) ** 2
    return total / len(pairs)


def test_a_batch_with_known_labels_gives_exactly_the_expected_pairs():
    method = _lam(miner="all")
    labels = torch.tensor([2, 0, 2, 1, 0, 2])
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    feats, pair_labels = method._global_features([x], labels)
    assert feats.shape[0] == 6 and pair_labels.tolist() == labels.tolist()  # one view, its class
    anchor, other, positive = mine_pairs(pair_labels, "all")
    got = set(zip(anchor.tolist(), other.tolist(), positive.tolist(), strict=True))
    # by hand: class 2 = {0, 2, 5}, class 0 = {1, 4}, class 1 = {3}
    expected_positive = {(0, 2), (0, 5), (2, 5), (1, 4)}
    expected = {(i, j, (i, j) in expected_positive) for i, j in itertools.combinations(range(6), 2)}
    assert got == expected
    z = _unit_embedding(method, x)
    torch.testing.assert_close(
        method.loss([x], labels).double(),
        torch.tensor(_brute_force_loss(z, sorted(expected)), dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )


def test_semihard_label_pairs_follow_the_triplet_rule_by_brute_force():
    """Negatives kept: some anchor a of the pair has a positive p (same class, p ≠ a) with
    d(a,p) < d(a,n) < d(a,p) + margin; every positive pair is kept."""
    method = _lam(miner="semihard")
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 3, 0])
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    z = _unit_embedding(method, x)
    d = np.linalg.norm(z[:, None] - z[None], axis=-1)
    lab = labels.numpy()

    def semihard(a: int, n: int) -> bool:
        return any(
            lab[p] == lab[a] and p != a and d[a, p] < d[a, n] < d[a, p] + MARGIN for p in range(len(lab))
        )

    pairs = [
        (i, j, bool(lab[i] == lab[j]))
        for i, j in itertools.combinations(range(12), 2)
        if lab[i] == lab[j] or semihard(i, j) or semihard(j, i)
    ]
    assert any(not positive for *_, positive in pairs)  # the rule keeps some negatives here
    assert len([p for p in pairs if not p[2]]) < sum(
        lab[i] != lab[j] for i, j in itertools.combinations(range(12), 2)
    )
    torch.testing.assert_close(
        method.loss([x], labels).double(),
        torch.tensor(_brute_force_loss(z, pairs), dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )


def test_label_mode_is_declared_and_checked():
    supervised, default = _lam(images_per_class=6), build_method("lam", build_backbone("convnet", 1, 8), {})
    assert supervised.images_per_class() == 6 and supervised.supervision == "class labels"
    assert supervised.num_views == 1
    assert default.images_per_class() is None and default.supervision == "self-supervised"
    assert default.num_views == 2
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(ValueError, match="needs the batch's labels"):
        supervised.loss([x])
    with pytest.raises(ValueError, match="use method.pairs=labels"):
        default.loss([x, x], torch.zeros(4, dtype=torch.long))
    for bad in ({"pairs": "classes"}, {"images_per_class": 1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            build_method("lam", build_backbone("convnet", 1, 8), bad)
    assert "method.pairs=labels" in LAM.supervised_modes


def test_an_ensemble_of_label_trained_members_passes_the_labels_on():
    torch.manual_seed(0)
    ensemble = build_method(
        "ensemble",
        build_backbone("convnet", 1, 8, width=4),
        {
            "member": "lam",
            "size": 2,
            "member_args": {"posterior": "none", "pairs": "labels", "images_per_class": 3},
        },
    )
    assert (
        ensemble.images_per_class() == 3
        and ensemble.supervision == "class labels"
        and ensemble.num_views == 1
    )
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = torch.randn(6, 1, 8, 8)
    expected = sum(member.loss([x], labels) for member in ensemble.members)
    torch.testing.assert_close(ensemble([x], labels), expected)


def _cfg(**train_args):
    train_cfg = {
        "epochs": 2,
        "batch_size": 40,
        "progress": False,
        "tensorboard": False,
        "deterministic": True,
    }
    return build_config(
        None,
        ["method.pairs=labels", "method.images_per_class=4", "method.embed_dim=8", "method.max_pairs=300"],
        method="lam",
        backbone="flat_cnn",
        backbone_args={"width": 4},
        data={"dataset": "digits", "subset": 400, "views": "identity"},
        train={**train_cfg, **train_args},
        method_args={"posterior": "posthoc"},
    )


def test_the_loop_trains_on_the_plans_class_balanced_batches_and_their_labels(tmp_path, monkeypatch):
    seen: list[torch.Tensor] = []
    after: list[torch.Tensor] = []
    loss, hook = LAM.loss, LAM.after_training

    def spy_loss(self, views, labels=None):
        seen.append(labels.clone())
        return loss(self, views, labels)

    def spy_after(self, view_batches, ctx):
        def recorded():
            for views, labels in view_batches():  # (views, labels) pairs for a label-trained method
                after.append(labels.clone())
                yield views, labels

        return hook(self, recorded, ctx)

    monkeypatch.setattr(LAM, "loss", spy_loss)
    monkeypatch.setattr(LAM, "after_training", spy_after)
    cfg = _cfg()
    run = train(cfg, tmp_path / "run")

    items = training_subset(load_dataset("digits", "train"), 400, cfg.train.seed)
    plan = ClassBalancedBatchPlan(400, 40, cfg.train.seed, labels=items.labels, images_per_class=4)
    expected = [items.labels[i] for i in plan.steps(0, 2 * plan.steps_per_epoch)]
    assert len(seen) == len(expected) == 20
    for got, want in zip(seen, expected, strict=True):
        assert torch.equal(got, want)
        assert sorted(np.bincount(got.numpy(), minlength=10).tolist()) == [4] * 10
    after_expected = [items.labels[i] for i in plan.steps(20, 30)]  # the epoch after the last one
    assert len(after) == 10 and all(torch.equal(a, b) for a, b in zip(after, after_expected, strict=True))

    assert (run / "config.yaml").read_text().startswith("# SUPERVISED run (supervision: class labels)")
    summary = (run / "train_summary.json").read_text()
    assert '"supervision": "class labels"' in summary


def test_a_resumed_supervised_run_equals_the_uninterrupted_one(tmp_path):
    full = train(_cfg(), tmp_path / "full")
    part = train(_cfg(max_steps=13), tmp_path / "part")  # mid-epoch 2 (10 steps per epoch)
    assert not (part / "model.safetensors").exists()
    train(_cfg(), tmp_path / "part", resume=True)
    a, b = load_file(str(full / "model.safetensors")), load_file(str(part / "model.safetensors"))
    assert a.keys() == b.keys() and "laplace.hessian" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_impossible_class_balance_is_a_config_error(tmp_path):
    from probssl.config import ConfigError

    cfg = _cfg()
    cfg.method_args["images_per_class"] = 3  # 40 is no multiple of 3
    with pytest.raises(ConfigError, match="multiple of images_per_class=3"):
        train(cfg, tmp_path / "run")


def test_eval_json_and_tables_mark_the_run_as_supervised(tmp_path):
    from probssl.eval.evaluate import evaluate_run
    from probssl.tables import aggregate_seeds, format_table

    run = train(_cfg(epochs=1), tmp_path / "lam-s0")
    results = evaluate_run(run, suite_name="basic")
    assert results["meta/supervision"] == "class labels"
    assert "[supervised: class labels]" in format_table({"lam-s0": results}, ["knn/top1@20"])
    by_seed = aggregate_seeds({str(run): results}, ["knn/top1@20"])
    assert "lam [supervised: class labels]" in format_table(by_seed, ["n", "knn/top1@20"])
    plain = {"meta/supervision": "self-supervised", "knn/top1@20": 0.5}
    assert "supervised" not in format_table({"simclr-s0": plain}, ["knn/top1@20"])


DDP_ARGS = [
    "train",
    "--method",
    "lam",
    "--dataset",
    "digits",
    "--subset",
    "400",
    "--batch-size",
    "40",
    "--epochs",
    "2",
    "--no-progress",
    "backbone=flat_cnn",  # no BatchNorm: its batch statistics would differ per rank
    "backbone.width=4",
    "data.views=identity",  # no augmentation: one process and two see the same pixels
    "method.pairs=labels",
    "method.images_per_class=4",
    "method.posterior=online",
    "method.embed_dim=8",
    "method.max_pairs=300",
    "train.deterministic=true",
    "train.tensorboard=false",
    "train.precision=fp32",
]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def test_two_ranks_shard_the_class_balanced_batches_and_resume_exactly(tmp_path):
    """torchrun with 2 ranks: each rank reads its half of every global batch and the gathered pairs
    are the global batch's, so the run follows the one-process run; interrupted and resumed under
    torchrun, it ends bit-identical to the uninterrupted 2-rank run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    from probssl.cli import main

    assert main([*DDP_ARGS, "--out", str(one)]) == 0  # the one-process reference, in this process
    _run([*torchrun, "-m", "probssl.cli", *DDP_ARGS, "--out", str(two)])
    _run([*torchrun, "-m", "probssl.cli", *DDP_ARGS, "--out", str(resumed), "train.max_steps=13"])
    assert not (resumed / "model.safetensors").exists()
    _run([*torchrun, "-m", "probssl.cli", "train", "--resume", "--out", str(resumed), "--no-progress"])

    a, b, c = (load_file(str(d / "model.safetensors")) for d in (one, two, resumed))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
        assert torch.equal(b[key], c[key]), key
    assert b["laplace.hessian"].abs().sum() > 0
