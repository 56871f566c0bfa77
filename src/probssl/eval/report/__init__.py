"""A static, self-contained HTML report comparing evaluated runs.

``build_report(run_dirs, out)`` reads each run's ``eval.json`` (flat metric keys, design.md §4) and, when
present, ``eval_details.json`` (plot data), and writes one HTML file: a metric table with the best value per
column highlighted, then figures overlaying the runs (reliability diagrams, OOD score histograms, accuracy
under corruption, sparsification curves, test images ranked by uncertainty).

The package is split by job: :mod:`.runs` reads run directories, :mod:`.metric_keys` says which keys
are metrics and how they read, :mod:`.tables` lays them out as HTML tables, :mod:`.figures` (with
:mod:`.ood_histograms`, :mod:`.ranked_images`, :mod:`.pvalues`) draws the plots and :mod:`.page`
assembles the HTML file.
"""

from probssl.eval.report.metric_keys import GROUPS, metric_direction, shift_summary, table_columns
from probssl.eval.report.page import build_report
from probssl.eval.report.runs import Run, load_run

__all__ = ["GROUPS", "Run", "build_report", "load_run", "metric_direction", "shift_summary", "table_columns"]
