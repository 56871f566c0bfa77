"""Print how wide a LAM run's Laplace posterior is, from its saved ``model.safetensors``.

Why: the retrieval table alone cannot tell "the posterior is too narrow to matter" from "the
posterior is wide but its spread is uninformative". This reads the accumulated GGN diagonal H and
the prior precision λ of each run and reports the posterior std 1/√(H + λ) next to the size of the
weights it perturbs (the embedding layer's θ*, weight and bias as one [O, I+1] matrix).

Usage: python scripts/laplace_stats.py RUN_DIR [RUN_DIR ...]   (markdown table on stdout)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from probssl.runs import load_run


@torch.no_grad()
def posterior_summary(run_dir: Path) -> dict[str, float]:
    laplace = getattr(load_run(run_dir).method, "laplace", None)
    if laplace is None:
        raise SystemExit(f"{run_dir}: its method has no Laplace posterior (not a post-hoc / online LAM run)")
    hessian = laplace.hessian.double()
    std = laplace.posterior_std.double()
    return {
        "H mean": hessian.mean().item(),
        "H median": hessian.median().item(),
        "H ≤ 0 (clamped)": (hessian <= 0).double().mean().item(),
        "λ": float(laplace.prior_precision),
        "std median": std.median().item(),
        "std mean": std.mean().item(),
        "θ* abs median": laplace.mean.abs().median().item(),
    }


def main(run_dirs: list[str]) -> None:
    rows = [(Path(d).name, posterior_summary(Path(d))) for d in run_dirs]
    columns = list(rows[0][1])
    print("| run | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, summary in rows:
        print(f"| {name} | " + " | ".join(f"{summary[c]:.3g}" for c in columns) + " |")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(sys.argv[1:])
