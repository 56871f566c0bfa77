"""Linear probe: multinomial logistic regression on frozen, cached features (design.md §4).

Objective, for standardised features z_i = (x_i − μ) / σ (μ, σ from the training features)::

    L(W, b) = (1/N) Σ_i CE(W z_i + b, y_i) + l2 · ‖W‖²_F        (the bias b is not penalised)

minimised full-batch with L-BFGS (strong-Wolfe line search) in float64 **to convergence**: the fit
stops when every entry of the gradient (in the preconditioned coordinates below) is below
``GRADIENT_TOLERANCE`` times the objective, not on an iteration cap. L is strictly convex, so the fit
is then a well-defined function of (features, l2) up to that tolerance: the same on another CPU,
thread count or starting point, and a 1e-6 perturbation of the features leaves accuracy, NLL and ECE
unchanged to ~1e-4 (issue 28: stopped at 200 iterations in float32, the demo's ECE was 0.011 on one
CPU and 0.057 on another, rounding having decided which l2 the validation split picked).
``max_iter`` is a safety net; a fit that reaches it is reported (``converged`` False), never hidden.
The same optimum is reached by scikit-learn's ``LogisticRegression(C=C)`` (multinomial, lbfgs),
which minimises Σ_i CE + ½‖W‖²/C, when

    C = 1 / (2 · l2 · N).

Preconditioning (an exact change of variables, so the optimum is the same): W = V·P with
P = (Σ + 4·l2·I)^(−1/2), Σ = zᵀz/N. The data term's Hessian is bounded by ½·Σ per class (Böhning
1992), so in V the bounded curvature is ≈ isotropic; SSL features are strongly correlated (Σ's
condition number ~5,000 on Fashion-MNIST SimCLR features), and this cuts L-BFGS's iterations ~3×.

The penalty l2 is chosen from a grid on a stratified validation split carved from the *training*
features; the probe is then refit on all training features with the chosen l2. ``fit`` takes only
training data, so the test set cannot influence the choice. Because every fit converges, fits may
start where a neighbouring one ended (the selection walks the grid from the largest l2 down, the
final fit starts from the chosen candidate, posterior draws from the previous draw's probe):
the start changes the cost, not the optimum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from probssl.eval.splits import stratified_split

GRADIENT_TOLERANCE = 1e-5
"""The probe has converged when max |∂L/∂(V, b)| ≤ this × L(V, b): a gradient *relative to the
objective*. On separable-looking features (digits: training loss ~1e-3) both the gradient and the
curvature shrink with the loss, so an absolute tolerance that is tight on Fashion-MNIST (loss ~0.4)
leaves digits' probe far from its optimum (NLL off by 10%); relative to the loss it means the same
distance to the optimum on both. Chosen on SimCLR features of both (BENCHMARKS.md, "Evaluation you
can defend"): below 1e-5 test accuracy, NLL and ECE stay within ~2e-4 of their limit (an ECE may
still move by one test sample that sits on a bin edge), at 1e-4 they are off by up to ~3e-3."""

MAX_ITERATIONS = 10_000
"""A safety net, not a stopping rule. Typical fits take 100–700 iterations (l2 = 1e-6 on 10k
Fashion-MNIST SimCLR features: ~650); the slowest seen, l2 = 1e-6 on digits' raw pixels (nearly
separable: the loss falls to 1e-3 and only the tiny penalty bounds the weights), ~3,300 — about 3 s at
that size. A fit that reaches it is reported as not converged."""

PRECONDITIONER_MAX_ROWS = 10_000
"""Σ of the preconditioner is estimated on at most this many (evenly spaced) rows: any symmetric
positive definite P leaves the optimum unchanged, so a rougher estimate costs a little speed, never
accuracy."""


def _standardiser(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-feature mean and std of the training features; constant features get std 1 (left unscaled).

    Standardising makes one l2 grid meaningful across methods whose features differ in scale by
    orders of magnitude, and conditions L-BFGS.
    """
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    tiny = 1e-8 * max(1.0, std.max().item()) if std.numel() else 1e-8
    return mean, torch.where(std > tiny, std, torch.ones_like(std))


OBJECTIVE_BLOCK = 2048
"""Columns (training rows) per block of the objective: a block's features are read once for its
logits and again, still in cache, for its gradient (~25% less time per evaluation at N = 60k than
two passes over the whole [D, N] matrix)."""


def softmax_cross_entropy_with_grad(
    z_t: Tensor, y: Tensor, weight: Tensor, bias: Tensor, l2: float, metric: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The probe's objective and its exact gradient, mean CE(W z_i + b, y_i) + l2·‖W‖², in closed form.

    ``z_t`` is the standardised features transposed, [D, N], so the logits are class-major [C, N]:
    the softmax then reduces over C rows of N contiguous values instead of N rows of C (= 10) values,
    which is where autograd's cross-entropy spent most of its time. The gradient is the textbook
    one, ∂/∂logits = (softmax − onehot) / N, so no graph is built: ~2–5× less time per L-BFGS
    evaluation than ``F.cross_entropy`` + ``backward`` (tests compare both to autograd and
    scikit-learn). Rows are taken ``OBJECTIVE_BLOCK`` at a time. ``metric`` M [D, D] (symmetric)
    makes the penalty l2·tr(W M Wᵀ), gradient 2·l2·W M: the plain penalty in preconditioned
    coordinates (W = V P gives M = P²). Returns (loss, grad W [C, D], grad b [C]).
    """
    n = z_t.shape[1]
    penalised = weight if metric is None else weight @ metric
    grad_weight = penalised * (2.0 * l2)
    grad_bias = torch.zeros_like(bias)
    total_loss = z_t.new_zeros(())
    for start in range(0, n, OBJECTIVE_BLOCK):
        block, labels = z_t[:, start : start + OBJECTIVE_BLOCK], y[start : start + OBJECTIVE_BLOCK]
        columns = torch.arange(block.shape[1], device=z_t.device)
        logits = torch.addmm(bias[:, None], weight, block)  # [C, B]
        row_max = logits.amax(dim=0)
        exp = (logits - row_max).exp_()
        total = exp.sum(dim=0)
        # logsumexp = max + log Σ exp(shifted): loss_i = max_i + log total_i − logit_{y_i}
        total_loss += (row_max + total.log() - logits[labels, columns]).sum()
        probs = exp.div_(total)  # softmax, class-major
        probs[labels, columns] -= 1.0
        grad_weight.addmm_(probs, block.T, alpha=1.0 / n)  # += (p − onehot)ᵀ z / N
        grad_bias += probs.sum(dim=1) / n
    loss = total_loss / n + l2 * (penalised * weight).sum()
    return loss, grad_weight, grad_bias


@dataclass(frozen=True)
class ProbeFit:
    """One converged (or capped) fit: the weights in standardised coordinates, the L-BFGS iterations
    it took, the final objective and max |gradient| (in the coordinates the tolerance is checked in),
    and whether it met the tolerance."""

    weight: Tensor
    bias: Tensor
    iterations: int
    loss: float
    gradient_norm: float
    converged: bool

    @property
    def relative_gradient(self) -> float:
        """max |∇L| / L: what ``GRADIENT_TOLERANCE`` bounds."""
        return self.gradient_norm / self.loss


def _preconditioner(z: Tensor, l2: float) -> tuple[Tensor, Tensor, Tensor]:
    """(P, P², P⁻¹) with P = (Σ + 4·l2·I)^(−1/2), Σ = zᵀz/N on ≤ ``PRECONDITIONER_MAX_ROWS`` rows.

    Eigenvalues are floored at 1e-10·λ_max (l2 = 0 with a constant feature would divide by zero);
    the floor changes the conditioning, never the optimum.
    """
    rows = z[:: max(1, math.ceil(z.shape[0] / PRECONDITIONER_MAX_ROWS))]
    eigenvalues, vectors = torch.linalg.eigh(rows.T @ rows / rows.shape[0])
    floor = max(1e-10 * float(eigenvalues.max()), torch.finfo(z.dtype).tiny)
    scale = (eigenvalues.clamp_min(0.0) + 4.0 * l2).clamp_min(floor).rsqrt()
    return (vectors * scale) @ vectors.T, (vectors * scale**2) @ vectors.T, (vectors / scale) @ vectors.T


def _fit_weights(
    z: Tensor,
    y: Tensor,
    num_classes: int,
    l2: float,
    max_iter: int,
    tolerance: float = GRADIENT_TOLERANCE,
    init: tuple[Tensor, Tensor] | None = None,
) -> ProbeFit:
    """Minimise mean CE + l2·‖W‖² over (W, b) by full-batch L-BFGS until max |gradient| ≤ ``tolerance`` · L.

    torch's L-BFGS (strong-Wolfe line search, history 20) over (V, b) with W = V P (module
    docstring), with the closed-form gradient of :func:`softmax_cross_entropy_with_grad` written into
    ``.grad``: the same optimiser and objective as autograd would give it, without building a graph
    per evaluation. The objective is run in rounds, each on L / L₀ with L₀ its value where the round
    starts, so that L-BFGS's absolute thresholds (its gradient tolerance, and the 1e-10 below which it
    stops updating its curvature memory) act relative to the loss; a round that ends above the
    relative tolerance (the loss fell a lot) is followed by another from where it stopped. There is
    no stop on a small change of the loss, which in flat directions is where rounding would decide
    again; the fit ends on the tolerance, on ``max_iter`` iterations in all, or when a round makes
    no progress (both reported as ``converged`` False). ``init``: (W, b) to start from instead of zero.
    Holds a preconditioned, transposed copy of the features ([D, N]) for the fit's duration.
    """
    precondition, metric, inverse = _preconditioner(z, l2)
    weight = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device)
    bias = torch.zeros(num_classes, dtype=z.dtype, device=z.device)
    if init is not None:
        weight, bias = init[0].to(z) @ inverse, init[1].to(z).clone()
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    z_t = (z @ precondition).T.contiguous()
    y = y.to(z.device)

    def objective() -> tuple[float, float]:
        """(L, max |∇L|) at the current (V, b)."""
        with torch.no_grad():
            loss, grad_weight, grad_bias = softmax_cross_entropy_with_grad(z_t, y, weight, bias, l2, metric)
        return float(loss), max(float(grad_weight.abs().max()), float(grad_bias.abs().max()))

    loss, gradient_norm = objective()
    iterations = 0
    while gradient_norm > tolerance * loss and iterations < max_iter:
        scale = 1.0 / loss

        def closure(scale: float = scale) -> Tensor:
            with torch.no_grad():
                value, grad_weight, grad_bias = softmax_cross_entropy_with_grad(
                    z_t, y, weight, bias, l2, metric
                )
                weight.grad, bias.grad = grad_weight.mul_(scale), grad_bias.mul_(scale)
            return value * scale

        optimizer = torch.optim.LBFGS(
            [weight, bias],
            lr=1.0,
            max_iter=max_iter - iterations,
            max_eval=2 * (max_iter - iterations),
            history_size=20,
            tolerance_grad=tolerance,
            tolerance_change=0.0,
            line_search_fn="strong_wolfe",
        )
        optimizer.step(closure)
        done = int(optimizer.state[weight].get("n_iter", 0))
        previous = loss
        loss, gradient_norm = objective()
        iterations += done
        if done == 0 or not loss < previous:
            break  # no progress: a further round would start from the same point
    return ProbeFit(
        weight=weight.detach() @ precondition,
        bias=bias.detach(),
        iterations=iterations,
        loss=loss,
        gradient_norm=gradient_norm,
        converged=gradient_norm <= tolerance * loss,
    )


class LinearProbe:
    """Multinomial logistic regression on frozen features, with the L2 penalty chosen on a train-only split.

    Attributes after fitting: ``selected_l2``; ``val_scores`` (validation accuracy per l2) and
    ``val_nll`` (validation NLL per l2), both empty when no selection took place; ``weight`` [C, D],
    ``bias`` [C], ``feature_mean`` / ``feature_std`` [D] (in the probe's dtype, default float64);
    ``fitted``: the final fit's :class:`ProbeFit` (iterations, final gradient), and ``converged``:
    whether every fit it made (selection candidates and final fit) met ``tolerance`` before
    ``max_iter``.
    """

    def __init__(
        self,
        l2_grid: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
        max_iter: int = MAX_ITERATIONS,
        val_fraction: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
        select_max_items: int | None = None,
        tolerance: float = GRADIENT_TOLERANCE,
    ) -> None:
        if not l2_grid:
            raise ValueError("l2_grid must not be empty")
        if any(l2 < 0 for l2 in l2_grid):
            raise ValueError(f"l2 penalties must be >= 0, got {list(l2_grid)}")
        if max_iter < 1 or not tolerance > 0:
            raise ValueError(f"need max_iter >= 1 and tolerance > 0, got {max_iter} and {tolerance}")
        self.l2_grid = tuple(float(l2) for l2 in l2_grid)
        self.max_iter = max_iter
        self.val_fraction = val_fraction
        self.seed = seed
        self.dtype = dtype
        # Selection fits len(l2_grid) probes; on large sets a fixed random subset of the fitting
        # rows is enough to rank penalties, and the final refit still uses every row.
        self.select_max_items = select_max_items
        self.tolerance = tolerance
        self.selected_l2: float = math.nan
        self.val_scores: dict[float, float] = {}
        self.val_nll: dict[float, float] = {}
        self.weight: Tensor | None = None
        self.bias: Tensor | None = None
        self.feature_mean: Tensor | None = None
        self.feature_std: Tensor | None = None
        self.fitted: ProbeFit | None = None
        self.converged = True

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

    def _fit(
        self, x: Tensor, y: Tensor, l2: float, num_classes: int, init: LinearProbe | None = None
    ) -> None:
        self.feature_mean, self.feature_std = _standardiser(x)
        z = (x - self.feature_mean) / self.feature_std
        start = init._function_in(self.feature_mean, self.feature_std) if init is not None else None
        if start is not None and start[0].shape != (num_classes, z.shape[1]):
            start = None  # another number of classes or features: nothing to start from
        fitted = _fit_weights(z, y, num_classes, l2, self.max_iter, self.tolerance, start)
        self.weight, self.bias, self.fitted = fitted.weight, fitted.bias, fitted
        self.converged = self.converged and fitted.converged

    def _function_in(self, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
        """This probe's (W, b) re-expressed for features standardised with ``mean`` and ``std``: the
        same logits for every raw x, so another fit can start from this one's function."""
        if self.weight is None or self.bias is None or self.feature_mean is None or self.feature_std is None:
            raise RuntimeError("LinearProbe is not fitted")
        weight = self.weight * (std.to(self.weight) / self.feature_std)[None, :]
        bias = self.bias + self.weight @ ((mean.to(self.weight) - self.feature_mean) / self.feature_std)
        return weight, bias

    def _child(self) -> LinearProbe:
        return LinearProbe(
            self.l2_grid,
            self.max_iter,
            self.val_fraction,
            self.seed,
            self.dtype,
            self.select_max_items,
            self.tolerance,
        )

    def fit_fixed(
        self,
        x: Tensor,
        y: Tensor,
        l2: float,
        num_classes: int | None = None,
        init: LinearProbe | None = None,
    ) -> LinearProbe:
        """Fit with a given penalty, no selection (used to reuse one choice across posterior samples).

        ``init``: a fitted probe whose function the fit starts from (e.g. the previous posterior
        draw's); the converged result is the same as from zero, up to the tolerance.
        """
        x, y, num_classes = self._prepare(x, y, num_classes)
        self.converged = True
        self._fit(x, y, float(l2), num_classes, init)
        self.selected_l2, self.val_scores, self.val_nll = float(l2), {}, {}
        return self

    def fit(self, x: Tensor, y: Tensor, num_classes: int | None = None) -> LinearProbe:
        """Choose l2 on a stratified validation split of (x, y), then refit on all of (x, y).

        Selection criterion: highest validation accuracy, ties broken by lower validation NLL (then
        by grid order). Each candidate is fitted on the remaining training rows with its own
        standardisation, exactly as the final probe will be, so the split mimics train → test.
        """
        x, y, num_classes = self._prepare(x, y, num_classes)
        self.val_scores, self.val_nll, self.converged = {}, {}, True
        # A one-value grid needs no validation split (and so works on tiny training sets).
        if len(self.l2_grid) == 1:
            chosen, start = self.l2_grid[0], None
        else:
            chosen, start = self._select(x, y, num_classes)
        self._fit(x, y, chosen, num_classes, start)
        self.selected_l2 = chosen
        return self

    def _select(self, x: Tensor, y: Tensor, num_classes: int) -> tuple[float, LinearProbe]:
        """The chosen l2 and its candidate (the final fit starts from its function)."""
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
        # A regularisation path: from the largest l2 (the fastest fit) down, each candidate starting
        # from the previous one's optimum. Every fit converges, so this changes the cost, not the
        # candidates (a fit capped at a fixed iteration count could not do this: where it stopped
        # would depend on where it started).
        candidates: dict[float, LinearProbe] = {}
        previous = None
        for l2 in sorted(self.l2_grid, reverse=True):
            candidate = self._child()
            candidate._fit(x[fit_idx], y[fit_idx], l2, num_classes, previous)
            self.converged = self.converged and candidate.converged
            log_probs = torch.log_softmax(candidate.predict_logits(x[val_idx]), dim=1)
            self.val_scores[l2] = (log_probs.argmax(dim=1) == y[val_idx]).double().mean().item()
            self.val_nll[l2] = -log_probs.gather(1, y[val_idx, None]).mean().item()
            candidates[l2], previous = candidate, candidate
        self.val_scores = {l2: self.val_scores[l2] for l2 in self.l2_grid}  # grid order, as reported
        self.val_nll = {l2: self.val_nll[l2] for l2 in self.l2_grid}
        chosen = min(self.l2_grid, key=lambda l2: (-self.val_scores[l2], self.val_nll[l2]))
        return chosen, candidates[chosen]

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
