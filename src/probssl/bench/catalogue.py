"""The bench suites' catalogue: every arm (a registered method plus overrides) and every suite (a budget,
its OOD and transfer sets, its tables, the published figures it is read against).

What runs them is :mod:`probssl.bench.suites`; what tabulates them is :mod:`probssl.bench.tables`. The
budgets live here, not in the repository's ``configs/``, so an installed package can run them;
``tests/test_bench.py`` checks they match the YAML files that document them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from probssl.config import ConfigError


def _declared_base(method: str) -> str | None:
    from probssl.methods import METHODS

    return METHODS.get(method).deterministic_base


@dataclass(frozen=True)
class QualityArm:
    name: str
    method: str
    overrides: tuple[str, ...] = ()
    #: The deterministic arm its paper's claims are measured against (same objective, no posterior),
    #: as in ``probssl bench speed``; None for the bases themselves. Left out, an arm that runs its
    #: method at the defaults takes the method's own ``deterministic_base`` (an arm of that name); an
    #: arm with overrides has a base only when it names one.
    base: str | None = None

    def __post_init__(self) -> None:
        if self.base is None and not self.overrides:
            object.__setattr__(self, "base", _declared_base(self.method))


#: The named arms, in the tables' order; every other registered method joins them (:func:`shared_arms`).
ARMS: tuple[QualityArm, ...] = (
    QualityArm("pixels", "pixels"),
    QualityArm("simclr", "simclr"),
    QualityArm("byol", "byol"),
    QualityArm("simsiam", "simsiam"),
    QualityArm("csghmc", "csghmc"),  # BYOL's loss, sampled with cyclical SGHMC; its base is BYOL
    # cSGHMC's ablation (issue 4, scripts/bench_csghmc.sh): the same cyclical schedule and sample
    # positions at temperature 0 — a snapshot ensemble, so the table separates noise from cycling.
    QualityArm("csghmc_snapshot", "csghmc", ("method.temperature=0",), base="byol"),
    QualityArm("prosmin", "prosmin"),
    QualityArm("vi_simsiam", "vi_simsiam"),
    QualityArm("scl", "scl"),
    QualityArm("lam_deterministic", "lam", ("method.posterior=none",)),
    QualityArm("lam_mc_dropout", "lam", ("method.posterior=mc_dropout",), base="lam_deterministic"),
    QualityArm("lam_ensemble", "ensemble", ("method.member=lam", "method.size=5"), base="lam_deterministic"),
    QualityArm("lam_posthoc", "lam", ("method.posterior=posthoc",), base="lam_deterministic"),
    QualityArm("lam_online", "lam", ("method.posterior=online",), base="lam_deterministic"),
)

#: Ablation arms, run only when named with ``--arms`` (the issues' sweeps): SCL's KL weight β and
#: code length K, LAM's GGN variants and output spaces, VI-SimSiam's log-κ head. A sweep point
#: that equals a default arm's configuration is that arm (``SWEEP_ALIASES``), not a second run.
SWEEP_ARMS: tuple[QualityArm, ...] = (
    QualityArm("vi_simsiam_exp", "vi_simsiam", ("method.kappa_activation=exp",)),  # log-κ head
    *(QualityArm(f"scl_beta{b}", "scl", (f"method.kl_weight={b}",)) for b in ("0", "1e-3", "1e-2")),
    *(
        QualityArm(f"scl_bits{k}", "scl", ("method.latent=bernoulli", f"method.latent_dim={k}"))
        for k in (32, 64, 128, 256, 512, 1024)
    ),
    *(
        QualityArm(
            f"lam_online_{v}_{o}",
            "lam",
            ("method.posterior=online", f"method.variant={v}", f"method.output_space={o}"),
        )
        for v in ("pos", "fix", "full")
        for o in ("euclidean", "arccos")
        if (v, o) != ("pos", "euclidean")
    ),
)
#: Sweep points that are a default arm (SCL's default β is 1e-4; online LAM's default GGN is pos
#: in the Euclidean output space): naming them runs, and tabulates, that arm.
SWEEP_ALIASES: dict[str, str] = {"scl_beta1e-4": "scl", "lam_online_pos_euclidean": "lam_online"}


def shared_arms() -> tuple[QualityArm, ...]:
    """The arms of every suite without arms of its own: ``ARMS``, then each registered method that no
    arm of ``ARMS`` runs, at its defaults and against its ``deterministic_base`` — so a method added to
    the registry is benchmarked with no edit here."""
    from probssl.methods import METHODS

    covered = {arm.method for arm in ARMS}
    return ARMS + tuple(QualityArm(name, name) for name in METHODS.names() if name not in covered)


def all_shared_arms() -> tuple[QualityArm, ...]:
    """Every arm ``--arms`` may name in a suite without arms of its own: the shared ones and the sweeps."""
    return shared_arms() + SWEEP_ARMS


_SGD = {"name": "sgd", "lr": 0.05, "weight_decay": 5.0e-4}

#: LAM in its paper's regime (``probssl bench lam_fmnist``): pairs mined from class labels in
#: class-balanced batches (25 images of each of the 10 classes in a batch of 250), the released code's
#: 3-D embedding on the authors' Fashion-MNIST network. Supervised: every table marks these rows.
_LAM_LABELS = ("method.pairs=labels", "method.images_per_class=25", "method.embed_dim=3")
LAM_PAPER_ARMS: tuple[QualityArm, ...] = (
    QualityArm("lam_deterministic", "lam", (*_LAM_LABELS, "method.posterior=none")),
    QualityArm("lam_online", "lam", (*_LAM_LABELS, "method.posterior=online"), base="lam_deterministic"),
    QualityArm("lam_posthoc", "lam", (*_LAM_LABELS, "method.posterior=posthoc"), base="lam_deterministic"),
    QualityArm(
        "lam_mc_dropout",
        "lam",
        (*_LAM_LABELS, "method.posterior=mc_dropout", "method.dropout=0.05"),
        base="lam_deterministic",
    ),
    QualityArm(
        "lam_ensemble",
        "ensemble",
        (
            "method.member=lam",
            "method.size=5",
            "method.member_args={posterior: none, pairs: labels, images_per_class: 25, embed_dim: 3}",
        ),
        base="lam_deterministic",
    ),
)

#: The figures the LAM table is read against: online LAM, Fashion-MNIST (→ MNIST for OOD), as issue 33
#: and BENCHMARKS.md carry them from Warburg et al. (NeurIPS 2023, arXiv 2302.01332). What each measures
#: in the authors' released evaluation (``src/evaluate/*.py``) and how ours differs is in
#: ``PAPER_PROTOCOL``; the paper's own table text was not available to check the digits against.
LAM_PAPER_FIGURES: tuple[tuple[str, str, float], ...] = (
    ("ret/recall@1", "lam_online", 0.81),
    ("ood/mnist/emb/auroc", "lam_online", 0.98),
    ("ret/ausc", "lam_online", 0.89),
    ("ret/ece", "lam_online", 0.03),
)
PAPER_PROTOCOL: dict[str, str] = {
    "ret/recall@1": "leave-one-out on the test set: the share of queries whose nearest other test image "
    "(posterior-mean embedding) has the query's class — the same here",
    "ood/mnist/emb/auroc": "Fashion-MNIST test (in) against MNIST test (out) ranked by the embedding's "
    "posterior spread: the authors sum the variances over dimensions, we sum the standard deviations "
    "(`Embedding.uncertainty`; a different order where the spread's shape differs between images)",
    "ret/ausc": "area under the sparsification curve: 1-NN accuracy of the queries left after removing the "
    "most uncertain ones; the authors rank by query + neighbour variance over 100 steps, we by the "
    "query's own uncertainty over 20 steps",
    "ret/ece": "calibration of retrieval: confidence = share of posterior draws whose 1-NN label is the "
    "modal one, accuracy = modal label correct; the authors bin in 10, we in 15 (the probe's ECE bins)",
}


@dataclass(frozen=True)
class Suite:
    name: str
    budget: dict[str, Any]  # a RunConfig mapping shared by every arm
    ood: tuple[str, ...]  # the OOD sets the tables show (the evaluation's defaults for the dataset)
    note: str
    transfer: tuple[str, ...] = ()  # transfer sets the tables show
    #: Arms run at fewer seeds than asked (seeds 0 .. N-1 only): e.g. a 5-member ensemble that costs
    #: five runs. The table's ``seeds`` column shows what was run.
    max_seeds: dict[str, int] = field(default_factory=dict)
    #: The suite's own arms, replacing the shared ones and ``SWEEP_ARMS`` (a suite about one method
    #: in its paper's regime, e.g. ``lam_fmnist``); empty: the shared ones.
    arms: tuple[QualityArm, ...] = ()
    #: The published figures its table is read against: (metric key, arm, the authors' value).
    paper: tuple[tuple[str, str, float], ...] = ()
    #: Every run keeps one checkpoint per epoch, and ``--curve`` evaluates the suite's own run (no
    #: second training): for budgets too long to train twice (``cifar10_budget``).
    keep_every_epoch: bool = False

    def default_arms(self) -> tuple[QualityArm, ...]:
        """What runs without ``--arms``."""
        return self.arms or shared_arms()

    def all_arms(self) -> tuple[QualityArm, ...]:
        """Every arm ``--arms`` may name (the defaults and the sweeps)."""
        return self.arms or all_shared_arms()

    def runs(self, arm: str, seed: int) -> bool:
        """Whether seed ``seed`` of ``arm`` belongs to the suite (``max_seeds`` caps some arms)."""
        return seed < self.max_seeds.get(arm, seed + 1)

    def tables(self) -> list[tuple[str, list[str]]]:
        """(title, metric keys) of the suite's tables: accuracy, uncertainty, OOD, the combined detector,
        the paired comparisons, trends, then cost.

        Why several: one row of ~35 columns is unreadable; each table answers one question (how good
        are the features / how good is the uncertainty / does it detect OOD inputs / what did the
        run and its evaluation cost — issue 19's goal is evaluation ≤ 10–25% of training). OOD columns
        per set: the probe's MSP (defined for every method), the pre-declared feature-space detector
        (``best_feature`` = kNN distance, issue 19) and the method's own uncertainty (``emb``).
        """
        accuracy = [
            "linear/top1",
            "knn/top1@20",
            "lowshot/1pct/top1",
            "lowshot/10pct/top1",
            "shift/mean/acc",
            *(f"transfer/{name}/top1" for name in self.transfer),
            "ret/recall@1",
            "ret/map@r",
            "code/linear/top1",
            "compress/ratio",
        ]
        uncertainty = [
            "cal/ece15",
            "cal/nll",
            "cal/brier",
            "sel/err_auroc",
            "sel/emb/err_auroc",
            "ret/r_auroc",
            "sel/crop_up",
            "sel/reliability/ece",
        ]
        ood = [f"ood/{name}/{score}/auroc" for name in self.ood for score in OOD_SCORES]
        ood.append("ood/id/combined/fpr@0.05")
        ood += [f"ood/{group}/{score}/auroc" for group in self.ood_groups() for score in OOD_SCORES]
        cost = [
            "meta/train_seconds",
            "meta/eval_seconds",
            "meta/eval_to_train",
            "meta/eval_cpu_seconds",
            "meta/eval_cpu_to_train",
        ]
        from probssl.eval.suite import REFERENCE_DETECTOR as ref

        versus = [f"vs/ood/{name}/{pair}-{ref}" for name in self.ood for pair in ("own", "mi", "bma")]
        versus += [f"vs/sel/own-{ref}", "vs/sel/own-entropy"]
        trends = [
            "trend/acc_by_own_unc",
            "trend/acc_by_entropy",
            "trend/own_unc_by_severity",
            "trend/own_unc_rise",
        ]
        paper = []
        if self.paper:  # a suite in its paper's regime: the paper's evaluation first, as one table
            paper = [
                (
                    "The paper's evaluation (leave-one-out retrieval on the test set; OOD detected by the "
                    "posterior's own spread; retrieval calibration and sparsification)",
                    [
                        "ret/recall@1",
                        "ret/recall@5",
                        "ret/recall@10",
                        "ret/map@r",
                        *(f"ood/{name}/emb/auroc" for name in self.ood),
                        "ret/ece",
                        "ret/ausc",
                        "ret/ausc_oracle",
                    ],
                )
            ]
        combined = [
            f"{prefix}/{name}/{key}"
            for name in self.ood
            for prefix, key in (
                ("ood", "combined/auroc"),
                ("vs/ood", "combined-best_single"),
                ("vs/ood", "own_in_combined"),
            )
        ]
        combined += [f"ood/id/combined/fpr@{alpha}" for alpha in ("0.01", "0.05", "0.1")]
        combined.append("sel/reliability/ece")
        return [
            *paper,
            ("Accuracy", accuracy),
            ("Uncertainty", uncertainty),
            ("OOD detection (AUROC)", ood),
            (
                "The combined detector (docs/methods.md §5): AUROC per OOD set; `combined-best_single`: "
                "against the best single detector of the same run, chosen afterwards (< 0: below that "
                "oracle); `own_in_combined`: minus the same rule without the method's own p-value (> 0: the "
                "own uncertainty adds power); realized false-positive rates at α on in-distribution test "
                "images; ECE of `reliability`",
                combined,
            ),
            (
                "Own uncertainty against the deterministic references (AUROC differences paired within "
                "each run; > 0: the first score is better)",
                versus,
            ),
            (
                "Trends of the uncertainty (Spearman over five points: probe accuracy across the five "
                "uncertainty quantiles, −1 = falls monotonically as the uncertainty rises; own uncertainty "
                "over corruption severities 1–5, +1 = rises monotonically; `own_unc_rise`: severity 5 over "
                "severity 1, − 1)",
                trends,
            ),
            (
                "Cost (seconds: training wall, full-evaluation wall and CPU, each over training; CPU time "
                "is what survives other jobs on the same cores)",
                cost,
            ),
        ]

    def columns(self) -> list[str]:
        return list(dict.fromkeys(col for _, cols in self.tables() for col in cols))

    def ood_groups(self) -> list[str]:
        """Near / far groups holding two or more of the suite's OOD sets (a one-set mean repeats it)."""
        from probssl.eval.ood_groups import GROUPS, ood_group

        dataset = self.budget["data"]["dataset"]
        return [g for g in GROUPS if sum(ood_group(dataset, name) == g for name in self.ood) >= 2]


#: Per OOD set: the probe's MSP, the pre-declared feature-space reference detector (knn1, kept for
#: continuity), the combined detector (docs/methods.md §5, the reference of issue 29), the method's own.
OOD_SCORES = ("msp", "best_feature", "combined", "emb")

_JPEG_NOTE = (
    "CIFAR-10 as the public JPEG copy (quality 75, `cifar10_jpeg`, ~30 dB PSNR against the originals): "
    "numbers are not comparable digit for digit with published figures on the official CIFAR-10 files. "
    "OOD: Tiny-ImageNet-200 validation (near), MNIST (far, grey → RGB, 32 px), smooth noise (far); "
    "transfer: EuroSAT RGB (32 px, stratified halves). The LAM deep ensemble (5 members) runs 1 seed"
)

SUITES: dict[str, Suite] = {
    "digits": Suite(
        "digits",
        {
            "backbone": "convnet",
            "data": {"dataset": "digits"},
            "train": {"epochs": 30, "batch_size": 256, "precision": "fp32"},
            "optim": {**_SGD, "warmup_epochs": 2},
        },
        ("fashion_mnist", "noise"),
        "scikit-learn's 8×8 digits (1,257 train / 540 test), the embedded default, at 30 epochs (the demo, "
        "configs/digits.yaml, trains 50): a few minutes for every arm on 2 cores",
        transfer=("mnist",),
    ),
    "fashion_mnist": Suite(
        "fashion_mnist",
        {
            "backbone": "convnet",
            "data": {"dataset": "fashion_mnist"},
            "train": {"epochs": 15, "batch_size": 256, "channels_last": True, "precision": "fp32"},
            "optim": {**_SGD, "warmup_epochs": 1},
        },
        ("mnist", "noise"),
        "Fashion-MNIST → MNIST (OOD); ≤ 15 min per method and seed on 2 cores",
        transfer=("mnist",),
    ),
    "cifar10": Suite(
        "cifar10",
        {  # configs/cifar10_cpu.yaml: ≤ 20 min of training per run on one core
            "backbone": "convnet",
            "backbone_args": {"width": 32},
            "data": {"dataset": "cifar10_jpeg"},
            "train": {"epochs": 30, "batch_size": 256, "channels_last": True, "precision": "auto"},
            "optim": {**_SGD, "warmup_epochs": 1},
        },
        ("tiny_imagenet_val", "mnist", "noise"),
        f"{_JPEG_NOTE}. CPU budget of `configs/cifar10_cpu.yaml` (ConvNet width 32, 30 epochs, ≤ 20 min of "
        "training per run on one core)",
        transfer=("eurosat_test",),
        max_seeds={"lam_ensemble": 1},
    ),
    "lam_fmnist": Suite(
        "lam_fmnist",
        {  # configs/lam_fmnist.yaml (minus the method): the released code's Fashion-MNIST recipe
            "backbone": "flat_cnn",
            "data": {"dataset": "fashion_mnist", "views": "identity"},
            "train": {"epochs": 20, "batch_size": 250, "precision": "fp32"},
            "optim": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 1.0e-5, "warmup_epochs": 1},
        },
        ("mnist", "noise"),
        "LAM in its paper's regime, **supervised**: pairs mined from Fashion-MNIST's class labels "
        "(semi-hard, margin 0.7) in class-balanced batches of 25 images × 10 classes, one un-augmented view "
        "per image, the authors' network (2 convs + max-pool, 9,216 features → 3-D unit embedding, from "
        "their released Fashion-MNIST configs), 20 epochs; AdamW 1e-3 with cosine decay stands in for "
        "their RMSprop with exponential decay. OOD: MNIST (the paper's pair) and noise. The deep ensemble "
        "(5 members) runs 1 seed",
        max_seeds={"lam_ensemble": 1},
        arms=LAM_PAPER_ARMS,
        paper=LAM_PAPER_FIGURES,
    ),
    "cifar10_budget": Suite(
        "cifar10_budget",
        {  # configs/cifar10_budget.yaml: the SimCLR configuration with the best kNN in ≤ 2.5 h on one core
            "backbone": "resnet18",
            "backbone_args": {"width": 16},
            "data": {"dataset": "cifar10_jpeg"},
            "train": {"epochs": 54, "batch_size": 256, "channels_last": True, "precision": "auto"},
            "optim": {**_SGD, "warmup_epochs": 3},
        },
        ("tiny_imagenet_val", "mnist", "noise"),
        f"{_JPEG_NOTE}. Budget check of issue 33 (`configs/cifar10_budget.yaml`): CIFAR-stem ResNet-18 at "
        "width 16, 54 epochs ≈ 2.5 h of training on one core (bf16), chosen by measured step costs and "
        "short candidate runs; every epoch's checkpoint is kept (the learning curve reads them)",
        transfer=("eurosat_test",),
        max_seeds={"lam_ensemble": 1},
        keep_every_epoch=True,
    ),
    "cifar10_gpu": Suite(
        "cifar10_gpu",
        {  # configs/cifar10.yaml on the JPEG copy (the official files are not in the shared data)
            "backbone": "resnet18",
            "data": {"dataset": "cifar10_jpeg"},
            "train": {"epochs": 200, "batch_size": 512, "channels_last": True, "precision": "auto"},
            "optim": {**_SGD, "lr": 0.06, "warmup_epochs": 10},
        },
        ("tiny_imagenet_val", "mnist", "noise"),
        f"{_JPEG_NOTE}. GPU budget of `configs/cifar10.yaml` (ResNet-18 full width, 200 epochs); "
        "for a machine with a GPU",
        transfer=("eurosat_test",),
        max_seeds={"lam_ensemble": 1},
    ),
}


def resolve_arms(only: Sequence[str] | None, suite: Suite | None = None) -> tuple[QualityArm, ...]:
    """The arms ``--arms`` names (aliases resolved, in suite order), or the default arms — of ``suite``
    when it has arms of its own, else the shared ones."""
    default, every = (suite.default_arms(), suite.all_arms()) if suite else (shared_arms(), all_shared_arms())
    if not only:
        return default
    aliases = SWEEP_ALIASES if suite is None or not suite.arms else {}
    names = {aliases.get(name, name) for name in only}
    unknown = names - {a.name for a in every}
    if unknown:
        known = [a.name for a in every] + list(aliases)
        raise ConfigError(f"unknown arm(s) {sorted(unknown)}; choose from {known}")
    return tuple(a for a in every if a.name in names)


def run_dir_for(out: Path, suite: str, arm: str, seed: int) -> Path:
    """Where seed ``seed`` of ``arm`` runs: ``OUT/SUITE/<arm>-s<seed>``."""
    return out / suite / f"{arm}-s{seed}"
