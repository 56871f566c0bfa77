"""LAM, the Laplacian metric learner (Warburg, Miani, Brack, Hauberg, NeurIPS 2023), design.md §3.5.

network:   h = f(v)                      (backbone, deterministic)
           x = W h + b,  z = x / ‖x‖      (the embedding layer θ = [W, b], then L2 normalisation)
pairs:     pairs = views (default, self-supervised): the 2B views of a (global) batch, labelled by the
           image they came from; pairs = labels (supervised, the paper's setting): one view of each
           image of a class-balanced batch (m images of each of B/m classes), labelled by its class.
           Mined "semihard" (default) or "all"
loss:      (1/P) Σ_pairs  ½d² (positive)  or  ½[m − d]₊² (negative),   d = ‖z_a − z_o‖
posterior: q(θ) = N(θ*, (H + λ)⁻¹), H the diagonal GGN of that loss (pos | fix | full,
           euclidean | arccos: :mod:`probssl.posteriors.laplace`)

``posterior = "online"`` (online LAM), each step:
    θ_s = θ* + σ ⊙ ε, σ = (H + λ)^-½ (detached), ε seeded by (seed, step): the same on every rank
    loss at θ_s; back-propagate into θ* and the backbone
    H ← m_H·H + (N²/P)·h_batch(θ_s)          (after the optimizer step, from the same pairs)
``posterior = "posthoc"`` (post-hoc LAM): train θ* deterministically; after the last step one pass
    over augmented training views sums H at θ* (:meth:`after_training`); λ fixed, or set by the
    Laplace evidence when ``optimize_prior``.
``posterior = "none"``: the deterministic metric learner (baseline).
``posterior = "mc_dropout"``: dropout (p = ``dropout``) before the embedding layer, kept on at
    evaluation (the MC dropout baseline).

embed: S weight draws (S = ``samples`` or ``eval_samples``), fixed for a whole evaluation (seeded,
not drawn per batch), give z_s = normalise(W_s h + b_s); mean = normalise(mean_s z_s); uncertainty
= Σ_d std_d(z_s).

Self-supervised reading and simplifications (also in BENCHMARKS.md):
- The paper learns a metric from class labels. By default the labels here are image identities: the
  two augmented views of an image are the positive pair, every other view a negative (SimCLR's
  pairing), so LAM trains without labels like every other method in the library.
  ``method.pairs=labels`` is the paper's supervised setting: positives are images of the same class,
  negatives of other classes, mined inside class-balanced batches of ``method.images_per_class``
  images per class (the released code draws random batches, which on a 10-class set hold ~B/10 images
  of every class; a class-balanced batch guarantees positives for any number of classes). One view
  per image (the released code trains on un-augmented images: pair it with ``data.views=identity``
  for the paper's recipe). Such a run is supervised: eval.json's ``meta/supervision`` and the
  tables say so.
- MC dropout drops only the embedding layer's input (last-layer dropout): the backbone has no
  dropout layers, and the Laplace posterior covers that same layer, so the two are comparable.
- The GGN variant defaults to ``pos``. With self-supervised pairs each view has one positive and
  ~2B negatives, so the negatives' (negative) curvature outweighs the positives': on digits the
  ``fix`` Hessian clamps to exactly 0 and ``full`` to a mean of 0.15, leaving online LAM sampling
  from the prior (σ ≈ 1 per weight) and its recall@1 at 0.75-0.76, against 0.80 for ``pos``
  (σ ≈ 0.007) and 0.86 for the deterministic learner (BENCHMARKS.md). The paper's supervised
  batches have many positives per anchor, where the trade-off differs.
- The online Hessian is scaled by N²/P with N the number of training *images* (the data set's pairs
  of images), as in the paper; the released code's extra prediction-time Hessian scale is not kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from probssl.distributed import gather_with_grad, is_distributed
from probssl.embedding import Embedding
from probssl.losses.metric_learning import contrastive_pair_loss, mine_pairs
from probssl.methods.base import (
    MethodConfig,
    SSLMethod,
    TrainContext,
    TrainingViews,
    check_at_least,
    check_choice,
    check_interval,
    check_positive,
)
from probssl.methods.registry import METHODS
from probssl.posteriors.laplace import OUTPUT_SPACES, VARIANTS, DiagonalLaplace, online_hessian_scale

POSTERIORS = ("online", "posthoc", "none", "mc_dropout")
PAIRINGS = ("views", "labels")
MINERS = ("semihard", "all")
#: Seed of the evaluation's weight draws / dropout masks: every batch of an evaluation (and every
#: evaluation of the same weights) sees the same S posterior draws.
_EVAL_SEED = 20_230_201


@dataclass
class LAMConfig(MethodConfig):
    posterior: str = "online"  # online | posthoc | none (deterministic) | mc_dropout
    embed_dim: int = 128  # output width of the embedding layer (the layer with the posterior)
    margin: float = 0.7  # m of the negative hinge, on the unit sphere (d ∈ [0, 2])
    miner: str = "semihard"  # semihard | all
    variant: str = "pos"  # GGN's positive-definite variant: pos | fix | full (module docstring)
    output_space: str = "euclidean"  # euclidean | arccos (normalisation folded into the loss Hessian)
    prior_precision: float = 1.0  # λ of the isotropic Gaussian prior over θ
    optimize_prior: bool = False  # post-hoc: set λ by the Laplace evidence after the Hessian pass
    hessian_memory: float = 0.999  # m_H of online LAM's running Hessian
    max_pairs: int | None = 5000  # pairs per batch Hessian, a random subset (as the released code)
    dropout: float = 0.05  # p of MC dropout (posterior = mc_dropout only)
    eval_samples: int = 20  # S when the evaluation asks for no particular number
    pairs: str = "views"  # views (self-supervised: two views of an image) | labels (supervised: classes)
    images_per_class: int = 32  # pairs = labels: m images of each class in a class-balanced batch

    def validate(self) -> None:
        for name, valid in (
            ("posterior", POSTERIORS),
            ("miner", MINERS),
            ("variant", VARIANTS),
            ("output_space", OUTPUT_SPACES),
            ("pairs", PAIRINGS),
        ):
            check_choice(self, name, valid)
        check_interval(self, "margin", "(0, 2]")  # distances between unit vectors
        check_positive(self, "prior_precision")
        check_interval(self, "hessian_memory", "[0, 1]")
        check_interval(self, "dropout", "[0, 1)")
        check_at_least(self, 1, "embed_dim", "eval_samples")
        # one image of a class (one view) has no positive in its batch
        check_at_least(self, 2, "images_per_class", why=" (positives per class)")


def image_identity_labels(num_images: int, num_views: int, device: torch.device) -> Tensor:
    """Labels of views laid out image-major ([img0 view0, img0 view1, img1 view0, ...])."""
    return torch.arange(num_images, device=device).repeat_interleave(num_views)


@METHODS.register("lam")
class LAM(SSLMethod):
    config_class = LAMConfig
    probabilistic = True  # posterior = "none" (the deterministic baseline) embeds with zero uncertainty
    uncertainty_doc = (
        "Laplace (or MC-dropout) posterior of the embedding layer: Σ_d std over posterior draws of the "
        "unit embedding; 0 with posterior = none or one draw, grows with the posterior variance"
    )
    supervised_modes = {
        "method.pairs=labels": "pairs mined from class labels in class-balanced batches "
        "(method.images_per_class per class), the paper's metric-learning setting"
    }

    export_note = (
        "the embedding under the posterior mean weights θ* (normalise(W* h + b*)); probssl embed averages "
        "seeded posterior draws instead, and the uncertainty needs those draws"
    )

    def __init__(self, backbone: nn.Module, cfg: LAMConfig) -> None:
        super().__init__(backbone, cfg)
        # Supervised pairs come from classes, not from a second view of the same image.
        self.num_views = 1 if cfg.pairs == "labels" else 2
        self.embedding = nn.Linear(backbone.out_dim, cfg.embed_dim)
        self.laplace = DiagonalLaplace(
            self.embedding,
            margin=cfg.margin,
            variant=cfg.variant,
            output_space=cfg.output_space,
            miner=cfg.miner,
            max_pairs=cfg.max_pairs,
            prior_precision=cfg.prior_precision,
        )
        # Steps taken, saved with the weights: online LAM's weight noise is seeded by it, so a
        # resumed run draws the same θ_s as an uninterrupted one.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._seed = 0
        self._pending_hessian: tuple[Tensor, int] | None = None

    # ------------------------------------------------------------------------------ training
    def configure_optimizer(self, ctx: TrainContext) -> None:
        """Not an optimizer of its own: LAM only needs the seed of its weight noise from the run."""
        self._seed = ctx.seed
        return None

    def images_per_class(self) -> int | None:
        return self.cfg.images_per_class if self.cfg.pairs == "labels" else None

    def _global_features(self, views: list[Tensor], labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Backbone features of all views of the global batch, image-major, and the labels that pair
        them: each view's image (``pairs = views``) or its image's class (``pairs = labels``)."""
        if (labels is None) != (self.cfg.pairs == "views"):
            raise ValueError(
                "method.pairs=labels mines pairs from class labels: loss(views, labels) needs the batch's "
                "labels [B] (the training loop passes them)"
                if labels is None
                else "labels were passed but method.pairs=views pairs the views of each image; "
                "use method.pairs=labels to train on class labels"
            )
        feats = torch.stack([self.backbone(v).float() for v in views], dim=1)  # [B, V, I]
        if self.cfg.posterior == "mc_dropout":
            feats = F.dropout(feats, self.cfg.dropout, training=self.training)
        if is_distributed():
            feats = gather_with_grad(feats)  # every rank mines the same global pairs
            labels = gather_with_grad(labels) if labels is not None else None  # in the same rank order
        b, v, i = feats.shape
        if labels is None:
            return feats.reshape(b * v, i), image_identity_labels(b, v, feats.device)
        return feats.reshape(b * v, i), labels.to(feats.device).long().repeat_interleave(v)

    def _weight_noise(self) -> torch.Generator:
        device = self.embedding.weight.device
        return torch.Generator(device=device).manual_seed(self._seed * 1_000_003 + int(self.steps_done))

    def loss(self, views: list[Tensor], labels: Tensor | None = None) -> Tensor:
        feats, labels = self._global_features(views, labels)
        if self.cfg.posterior == "online":
            noise = self._weight_noise()
            theta = self.laplace.sample(1, generator=noise)[0]  # differentiable in θ*
            x = F.linear(feats, theta[:, :-1], theta[:, -1])
        else:
            theta, x = None, self.embedding(feats)
        z = F.normalize(x, dim=-1)
        pairs = mine_pairs(labels, self.cfg.miner, z, self.cfg.margin)
        loss = contrastive_pair_loss(z, pairs, self.cfg.margin)
        if theta is not None:  # curvature at θ_s, applied after the optimizer step (after_step)
            self._pending_hessian = self.laplace.batch_hessian(
                feats.detach(), labels, params=theta.detach(), generator=noise
            )
        return loss

    @torch.no_grad()
    def after_step(self, step: int, ctx: TrainContext) -> None:
        if self._pending_hessian is not None:
            h_batch, num_pairs = self._pending_hessian
            scale = online_hessian_scale(ctx.num_data, num_pairs)
            self.laplace.update(h_batch, self.cfg.hessian_memory, scale)
            self._pending_hessian = None
        self.steps_done += 1

    @torch.no_grad()
    def after_training(self, view_batches: Callable[[], Iterable[TrainingViews]], ctx: TrainContext) -> None:
        """Post-hoc LAM: one pass over augmented training views sums the GGN at θ* (then λ), on the
        same pairs as training: of views, or of classes (``(views, labels)`` batches)."""
        if self.cfg.posterior != "posthoc":
            return
        was_training = self.training
        self.eval()  # BatchNorm in eval mode: the curvature of the network that will be evaluated
        self.laplace.hessian.zero_()
        subsets = torch.Generator(device=self.embedding.weight.device).manual_seed(ctx.seed)
        for batch in view_batches():
            views, classes = batch if isinstance(batch, tuple) else (batch, None)
            feats, labels = self._global_features(views, classes)
            h, _ = self.laplace.batch_hessian(feats, labels, generator=subsets)
            self.laplace.hessian += h
        if self.cfg.optimize_prior:
            self.laplace.optimize_prior_precision()
        self.train(was_training)

    # ------------------------------------------------------------------------------ inference
    def _embedding_draws(self, h: Tensor, num_samples: int) -> Tensor:
        """[S, N, D] normalised embeddings under S posterior draws (fixed per evaluation)."""
        if self.cfg.posterior == "mc_dropout":
            # Masks seeded per call: the same batch always gets the same draws.
            gen = torch.Generator(device=h.device).manual_seed(_EVAL_SEED)
            keep = torch.rand((num_samples, *h.shape), generator=gen, device=h.device) >= self.cfg.dropout
            x = self.embedding(h * keep / (1.0 - self.cfg.dropout))
        else:
            gen = torch.Generator(device=h.device).manual_seed(_EVAL_SEED)
            x = self.laplace.sample_layer_outputs(h, num_samples, generator=gen)
        return F.normalize(x, dim=-1)

    @torch.no_grad()
    def embed(self, x: Tensor, samples: int | None = None) -> Embedding:
        h = self.backbone(x).float()
        if self.cfg.posterior == "none":
            return Embedding.deterministic(F.normalize(self.embedding(h), dim=-1))
        draws = self._embedding_draws(h, samples or self.cfg.eval_samples)
        return Embedding(
            mean=F.normalize(draws.mean(dim=0), dim=-1),
            samples=draws,
            uncertainty=draws.std(dim=0).sum(dim=-1) if draws.shape[0] > 1 else draws.new_zeros(h.shape[0]),
        )

    def point_embedding(self, x: Tensor) -> Tensor:
        """normalise(W* f(x) + b*): the posterior mean of the weights (no dropout for MC dropout)."""
        return F.normalize(self.embedding(self.backbone(x).float()), dim=-1)

    def extra_state_for_logging(self) -> dict[str, float]:
        if self.cfg.posterior not in ("online", "posthoc"):
            return {}
        return {
            "hessian_mean": float(self.laplace.hessian.mean()),
            "posterior_std_mean": float(self.laplace.posterior_std.mean()),
        }
