"""``make demo``: the thin slice end to end on the embedded ``digits`` data, in a few CPU minutes.

Trains SimCLR and BYOL, evaluates them (full suite) beside the raw-pixel floor, prints the table
and writes the HTML report. Re-running skips what is already trained.
"""

from __future__ import annotations

from pathlib import Path

from probssl.config import build_config
from probssl.eval.evaluate import evaluate_run
from probssl.eval.report import build_report
from probssl.tables import format_table
from probssl.train import train

DEMO_METHODS = ("pixels", "simclr", "byol")
DEMO_EPOCHS = 50
DEMO_COLUMNS = (
    "knn/top1@20",
    "linear/top1",
    "cal/ece15",
    "cal/nll",
    "ood/noise/auroc",
    "sel/err_auroc",
    "ret/recall@1",
    "lowshot/10pct/top1",
)


def run_demo(
    out: str | Path = "runs/demo", epochs: int | None = None, progress: bool = True
) -> dict[str, dict]:
    out = Path(out)
    results = {}
    for method in DEMO_METHODS:
        run_dir = out / method
        cfg = build_config(
            method=method,
            data={"dataset": "digits"},
            train={
                "epochs": epochs or DEMO_EPOCHS,
                "batch_size": 256,
                "precision": "fp32",  # the README's figures; `auto` would pick bf16 on AVX512-BF16 CPUs
                "progress": progress,
            },
        )
        if not (run_dir / "model.safetensors").is_file():
            train(cfg, run_dir, resume=(run_dir / "config.yaml").is_file())
        results[method] = evaluate_run(run_dir, progress=False)
    report = build_report([out / m for m in DEMO_METHODS], out / "report.html", title="probssl demo: digits")
    print()
    print(format_table(results, DEMO_COLUMNS))
    print(f"\neval.json files under {out}/<method>/; report: {report}")
    return results
