"""Linear probe: multinomial logistic regression on frozen, cached features (design.md §4).

Objective, for standardised features z_i = (x_i − μ) / σ (μ, σ from the training features)::

    L(W, b) = (1/N) Σ_i CE(W z_i + b, y_i) + l2 · ‖W‖²_F        (the bias b is not penalised)

minimised full-batch with L-BFGS (strong-Wolfe line search) in float64 by default. Full batch and
float64 make the fit a deterministic function of (features, l2), so probe accuracy differences
reflect the representation and not optimiser noise. The same optimum is reached by scikit-learn's
``LogisticRegression(C=C)`` (multinomial, lbfgs), which minimises Σ_i CE + ½‖W‖²/C, when

    C = 1 / (2 · l2 · N).

The penalty l2 is chosen from a grid on a stratified validation split carved from the *training*
features; the probe is then refit on all training features with the chosen l2. ``fit`` takes only
training data, so the test set cannot influence the choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from probssl.eval.splits import stratified_split


def _standardiser(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std of the training features; constant features get std 1 (left unscaled).

    Standardising makes one l2 grid meaningful across methods whose features differ in scale by
    orders of magnitude, and conditions L-BFGS.
    """
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    tiny = 1e-8 * max(1.0, std.max().item()) if std.numel() else 1e-8
    return mean, torch.where(std > tiny, std, torch.ones_like(std))


def softmax_cross_entropy_with_grad(
    z_t: Tensor, y: Tensor, weight: Tensor, bias: Tensor, l2: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The probe's objective and its exact gradient, mean CE(W z_i + b, y_i) + l2·‖W‖², in closed form.

    ``z_t`` is the standardised features transposed, [D, N], so the logits are class-major [C, N]:
    the softmax then reduces over C rows of N contiguous values instead of N rows of C (= 10) values,
    which is where autograd's cross-entropy spent most of its time. The gradient is the textbook
    one, ∂/∂logits = (softmax − onehot) / N, so no graph is built: ~2–5× less time per L-BFGS
    evaluation than ``F.cross_entropy`` + ``backward`` (tests compare both to autograd and
    scikit-learn). Returns (loss, grad W [C, D], grad b [C]).
    """
    n = z_t.shape[1]
    logits = torch.addmm(bias[:, None], weight, z_t)  # [C, N]
    row_max = logits.amax(dim=0)  # [N]
    exp = (logits - row_max).exp_()
    total = exp.sum(dim=0)  # [N]
    columns = torch.arange(n, device=z_t.device)
    true_logit = logits[y, columns]
    log_total = total.log()
    # logsumexp = max + log Σ exp(shifted): loss_i = max_i + log_total_i − logit_{y_i}
    loss = (row_max + log_total - true_logit).mean() + l2 * weight.pow(2).sum()
    probs = exp.div_(total)  # softmax, class-major
    probs[y, columns] -= 1.0
    probs.div_(n)
    grad_weight = torch.addmm(weight, probs, z_t.T, beta=2.0 * l2)  # (p − onehot)ᵀ z / N + 2·l2·W
    return loss, grad_weight, probs.sum(dim=1)


def _fit_weights(z: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Minimise mean CE + l2·‖W‖² over (W, b) by full-batch L-BFGS from zero; returns (W [C, D], b [C]).

    torch's L-BFGS (strong-Wolfe line search) with the closed-form gradient of
    :func:`softmax_cross_entropy_with_grad` written into ``.grad``: the same optimiser and
    objective as autograd would give it, without building a graph per evaluation. A fit that stops
    on ``max_iter`` rather than at the optimum depends on rounding, so this (like another thread
    count) moves its numbers by ~5e-4 (BENCHMARKS.md, "Evaluation cost"). Holds a transposed copy of
    the features ([D, N]) for the fit's duration.
    """
    weight = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=z.dtype, device=z.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=2 * max_iter,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )
    z_t = z.T.contiguous()
    y = y.to(z.device)

    def closure() -> Tensor:
        with torch.no_grad():
            loss, weight.grad, bias.grad = softmax_cross_entropy_with_grad(z_t, y, weight, bias, l2)
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


class LinearProbe:
    """Multinomial logistic regression on frozen features, with the L2 penalty chosen on a train-only split.

    Attributes after fitting: ``selected_l2``; ``val_scores`` (validation accuracy per l2) and
    ``val_nll`` (validation NLL per l2), both empty when no selection took place; ``weight`` [C, D],
    ``bias`` [C], ``feature_mean`` / ``feature_std`` [D] (in the probe's dtype, default float64).
    """

    def __init__(
        self,
        l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
        max_iter: int = 200,
        val_fraction: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        select_max_items: int | None = None,
    ) -> None:
        if not l2_grid:
            raise ValueError("l2_grid must not be empty")
        if any(l2 < 0 for l2 in l2_grid):
            raise ValueError(f"l2 penalties must be >= 0, got {list(l2_grid)}")
        self.l2_grid = tuple(float(l2) for l2 in l2_grid)
        self.max_iter = max_iter
        self.val_fraction = val_fraction
        self.seed = seed
        self.dtype = dtype
        # Selection fits len(l2_grid) probes; on large sets a fixed random subset of the fitting
        # rows is enough to rank penalties, and the final refit still uses every row.
        self.select_max_items = select_max_items
        self.selected_l2: float = math.nan
        self.val_scores: dict[float, float] = {}
        self.val_nll: dict[float, float] = {}
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.feature_mean: Tensor | None = None
        self.feature_std: Tensor | None = None

    # ---------------------------------------------------------------- fitting
    def _prepare(self, x: Tensor, y: Tensor, num_classes: int | None) -> tuple[Tensor, Tensor, int]:
        if x.dim() != 2:
            raise ValueError(f"features must be [N, D], got shape {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"labels must be [{x.shape[0]}], got shape {tuple(y.shape)}")
        if x.shape[0] == 0:
            raise ValueError("cannot fit a probe on zero examples")
        y = y.to(x.device).long()
        if num_classes is None:
            num_classes = int(y.max().item()) + 1
        return x.to(self.dtype), y, num_classes

    def _fit(self, x: Tensor, y: Tensor, l2: float, num_classes: int) -> None:
        self.feature_mean, self.feature_std = _standardiser(x)
        z = (x - self.feature_mean) / self.feature_std
        self.weight, self.bias = _fit_weights(z, y, num_classes, l2, self.max_iter)

    def _child(self) -> LinearProbe:
        return LinearProbe(
            self.l2_grid, self.max_iter, self.val_fraction, self.seed, self.dtype, self.select_max_items
        )

    def fit_fixed(self, x: Tensor, y: Tensor, l2: float, num_classes: int | None = None) -> LinearProbe:
        """Fit with a given penalty, no selection (used to reuse one choice across posterior samples)."""
        x, y, num_classes = self._prepare(x, y, num_classes)
        self._fit(x, y, float(l2), num_classes)
        self.selected_l2, self.val_scores, self.val_nll = float(l2), {}, {}
        return self

    def fit(self, x: Tensor, y: Tensor, num_classes: int | None = None) -> LinearProbe:
        """Choose l2 on a stratified validation split of (x, y), then refit on all of (x, y).

        Selection criterion: highest validation accuracy, ties broken by lower validation NLL (then
        by grid order). Each candidate is fitted on the remaining training rows with its own
        standardisation, exactly as the final probe will be, so the split mimics train → test.
        """
        x, y, num_classes = self._prepare(x, y, num_classes)
        self.val_scores, self.val_nll = {}, {}
        # A one-value grid needs no validation split (and so works on tiny training sets).
        chosen = self.l2_grid[0] if len(self.l2_grid) == 1 else self._select(x, y, num_classes)
        self._fit(x, y, chosen, num_classes)
        self.selected_l2 = chosen
        return self

    def _select(self, x: Tensor, y: Tensor, num_classes: int) -> float:
        fit_idx, val_idx = stratified_split(y.cpu(), self.val_fraction, self.seed)
        if val_idx.numel() == 0:
            raise ValueError(
                f"validation split is empty (val_fraction={self.val_fraction}, N={x.shape[0]}); "
                "use a larger fraction, more data, or fit_fixed"
            )
        if self.select_max_items is not None and fit_idx.numel() > self.select_max_items:
            order = torch.randperm(fit_idx.numel(), generator=torch.Generator().manual_seed(self.seed))
            fit_idx = fit_idx[order[: self.select_max_items]].sort().values
        fit_idx, val_idx = fit_idx.to(x.device), val_idx.to(x.device)
        # Every candidate starts from zero, not from its neighbour on the grid: at the default
        # max_iter = 200 the small-l2 fits stop on the iteration cap, not at the optimum (on
        # Fashion-MNIST SimCLR features a warm start moved the l2 = 1e-6 weights by up to 3.3 and its
        # validation accuracy by 0.6 points), so a warm start would change the numbers it reports.
        for l2 in self.l2_grid:
            candidate = self._child()
            candidate._fit(x[fit_idx], y[fit_idx], l2, num_classes)
            log_probs = torch.log_softmax(candidate.predict_logits(x[val_idx]), dim=1)
            self.val_scores[l2] = (log_probs.argmax(dim=1) == y[val_idx]).double().mean().item()
            self.val_nll[l2] = -log_probs.gather(1, y[val_idx, None]).mean().item()
        return min(self.l2_grid, key=lambda l2: (-self.val_scores[l2], self.val_nll[l2]))

    # ------------------------------------------------------------- prediction
    def predict_logits(self, x: Tensor) -> Tensor:
        """Logits [M, C] in the probe's dtype (float64 by default, so tiny probabilities keep precision)."""
        if self.weight is None or self.bias is None or self.feature_mean is None or self.feature_std is None:
            raise RuntimeError("LinearProbe is not fitted")
        z = (x.to(self.weight.device, self.dtype) - self.feature_mean) / self.feature_std
        return z @ self.weight.T + self.bias

    def predict_proba(self, x: Tensor) -> Tensor:
        """Class probabilities [M, C]."""
        return torch.softmax(self.predict_logits(x), dim=1)


def linear_probe_marginal(
    train_draws: Tensor,
    train_labels: Tensor,
    test_draws: Tensor,
    num_classes: int,
    **probe_kwargs: Any,
) -> Tensor:
    """Bayesian model average of linear probes over embedding samples, [M, C].

    One probe per sample s, fitted on ``train_draws[s]``; the test prediction is
    p(y|x) = mean_s softmax(probe_s(z_s)) — probabilities are averaged, never logits (design.md §1).
    The penalty is selected once, on sample 0 (train split only), and reused for the other samples:
    the samples describe one posterior, so they share a regulariser, and selection is the costly
    part. ``train_draws`` [S, N, D] and ``test_draws`` [S, M, D] are paired by s; a side with a
    single draw is broadcast (S = 1 on both sides is the ordinary deterministic probe).
    """
    if train_draws.dim() != 3 or test_draws.dim() != 3:
        raise ValueError(
            f"draws must be [S, N, D], got {tuple(train_draws.shape)} and {tuple(test_draws.shape)}"
        )
    s_train, s_test = train_draws.shape[0], test_draws.shape[0]
    if s_train != s_test and 1 not in (s_train, s_test):
        raise ValueError(f"cannot pair {s_train} train draws with {s_test} test draws")
    first = LinearProbe(**probe_kwargs).fit(train_draws[0], train_labels, num_classes)
    probes = [first] + [
        LinearProbe(**probe_kwargs).fit_fixed(train_draws[s], train_labels, first.selected_l2, num_classes)
        for s in range(1, s_train)
    ]
    total = None
    for s in range(max(s_train, s_test)):
        probs = probes[min(s, s_train - 1)].predict_proba(test_draws[min(s, s_test - 1)])
        total = probs if total is None else total + probs
    return total / max(s_train, s_test)
