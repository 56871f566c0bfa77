"""What a reader of ``probssl report`` sees: no rows for unevaluated runs, no column that repeats
another, readable headers with the eval.json key on hover, and a nearly constant score stated as its
range rather than stretched into a histogram (issue 30, item 12)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib.figure import Figure

from probssl.cli import main
from probssl.eval.report import build_report
from probssl.eval.report.names import NON_BREAKING_HYPHEN

pytestmark = pytest.mark.usefixtures("single_thread")


def _metrics(method: str, ood_sets: dict[str, str]) -> dict:
    """An eval.json with the keys a digits evaluation writes, OOD sets {name: group}."""
    metrics = {
        "config/method": method,
        "config/data.dataset": "digits",
        "seed": 0,
        "knn/top1@20": 0.95,
        "linear/top1": 0.96,
        "cal/ece15": 0.02,
        "cal/aece15": 0.03,
        "sel/err_auroc": 0.9,
        "sel/mahalanobis_unsup/aurc": 0.01,
        "lowshot/10pct/top1": 0.9,
        "ret/map@r": 0.7,
        "shift/gaussian_noise/1/acc": 0.9,
    }
    for k, name in enumerate(ood_sets):
        for score in ("msp", "knn1", "best_feature"):
            metrics[f"ood/{name}/{score}/auroc"] = 0.6 + 0.1 * k
    for group in sorted(set(ood_sets.values())):
        members = [name for name, g in ood_sets.items() if g == group]
        metrics[f"ood/{group}/sets"] = ", ".join(members)
        for score in ("msp", "knn1", "best_feature"):
            metrics[f"ood/{group}/{score}/auroc"] = float(
                np.mean([metrics[f"ood/{m}/{score}/auroc"] for m in members])
            )
    return metrics


def _write(path: Path, metrics: dict | None) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text("method: simclr\n")
    if metrics is not None:
        (path / "eval.json").write_text(json.dumps(metrics))
    return path


class _Headers(HTMLParser):
    """The metric tables' column headers as (tooltip, shown text) and the run names of their rows."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[tuple[str, str]] = []
        self.rows: list[str] = []
        self._in_metrics = False
        self._th: tuple[str, list[str]] | None = None
        self._run: list[str] | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._in_metrics = "metrics" in (a.get("class") or "")
        elif self._in_metrics and tag == "th" and a.get("title"):
            self._th = (a["title"] or "", [])
        elif self._in_metrics and tag == "td" and "run" in (a.get("class") or "").split():
            self._run = []
        elif self._th is not None and tag == "span":
            self._depth += 1  # the ↑/↓ arrow: not part of the name

    def handle_endtag(self, tag: str) -> None:
        if tag == "th" and self._th is not None:
            self.headers.append((self._th[0], "".join(self._th[1]).strip()))
            self._th = None
        elif tag == "span" and self._depth:
            self._depth -= 1
        elif tag == "td" and self._run is not None:
            self.rows.append("".join(self._run).strip())
            self._run = None

    def handle_data(self, data: str) -> None:
        if self._th is not None and not self._depth:
            self._th[1].append(data)
        elif self._run is not None:
            self._run.append(data)


def _parsed(page: str) -> _Headers:
    parser = _Headers()
    parser.feed(page)
    return parser


def test_unevaluated_runs_are_left_out_with_a_note(tmp_path, capsys):
    evaluated = _write(tmp_path / "simclr", _metrics("simclr", {"noise": "far"}))
    training = _write(tmp_path / "byol", None)  # trained (or training), never evaluated
    out = tmp_path / "report.html"
    note = f"skipped {training}: not evaluated yet (run `probssl eval {training}`)"
    with pytest.warns(UserWarning, match=re.escape(note)):  # a `warning:` line on the command line
        assert main(["report", str(evaluated), str(training), "--out", str(out)]) == 0
    page = out.read_text(encoding="utf-8")
    assert set(_parsed(page).rows) == {"simclr · seed 0"}  # no all-n/a row (in any band)
    assert ">n/a<" not in page.split('id="metrics"', 1)[1].split("</section>", 1)[0]
    assert f"not evaluated yet (run `probssl eval {training}`)" in page  # the page says who is missing
    assert "1 run<" in page

    with pytest.warns(UserWarning, match="not evaluated yet"):
        assert main(["report", str(training), "--out", str(tmp_path / "none.html")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: none of") and "probssl eval" in err
    assert not (tmp_path / "none.html").exists()


def test_a_near_or_far_group_of_one_set_is_not_a_column(tmp_path):
    """digits: noise is the only far set, so ``ood/far/*`` repeated ``ood/noise/*`` column for column."""
    one = _write(tmp_path / "one", _metrics("simclr", {"noise": "far", "fashion_mnist": "near"}))
    page = build_report([one], tmp_path / "one.html").read_text(encoding="utf-8")
    keys = [key for key, _ in _parsed(page).headers]
    assert "ood/noise/msp/auroc" in keys and "ood/fashion_mnist/msp/auroc" in keys
    assert not [key for key in keys if key.startswith(("ood/far/", "ood/near/"))]

    two = _metrics("simclr", {"noise": "far", "mnist": "far"})
    page = build_report([_write(tmp_path / "two", two)], tmp_path / "two.html").read_text(encoding="utf-8")
    keys = [key for key, _ in _parsed(page).headers]
    assert {"ood/far/msp/auroc", "ood/far/knn1/auroc", "ood/far/best_feature/auroc"} <= set(keys)

    old = {k: v for k, v in _metrics("simclr", {"noise": "far"}).items() if not k.endswith("/sets")}
    page = build_report([_write(tmp_path / "old", old)], tmp_path / "old.html").read_text(encoding="utf-8")
    assert not [key for key, _ in _parsed(page).headers if key.startswith("ood/far/")]  # from the grouping


def test_headers_are_readable_names_with_the_key_on_hover(tmp_path):
    run = _write(tmp_path / "r", _metrics("simclr", {"noise": "far", "mnist": "far"}))
    page = build_report([run], tmp_path / "r.html").read_text(encoding="utf-8")
    shown = {key: text.replace(NON_BREAKING_HYPHEN, "-") for key, text in _parsed(page).headers}
    assert shown["knn/top1@20"] == "top-1, k=20"
    assert shown["cal/ece15"] == "ECE (15 bins)"
    assert shown["cal/aece15"] == "adaptive ECE (15 bins)"
    assert shown["ood/noise/msp/auroc"] == "noise: MSP AUROC"
    assert shown["ood/noise/knn1/auroc"] == "noise: 1-NN distance AUROC"
    assert shown["ood/far/best_feature/auroc"] == "far-OOD mean: feature reference AUROC"
    assert shown["lowshot/10pct/top1"] == "10% labels: top-1"
    assert shown["ret/map@r"] == "mAP@R"
    for key, text in shown.items():  # every header is a name, never the key or a piece of it
        assert "_" not in text and "/" not in text, (key, text)
    assert "-" not in "".join(text for _, text in _parsed(page).headers)  # never split at a hyphen


def _panel(scores_in: np.ndarray, scores_out: np.ndarray) -> matplotlib.axes.Axes:
    from probssl.eval.report.ood_histograms import _ood_panel
    from probssl.eval.report.runs import Run

    run = Run(name="vi_simsiam · seed 0", path=Path("r"), metrics={}, details={})
    ax = Figure().subplots()
    _ood_panel(ax, run, "noise", {"in": scores_in, "out": scores_out, "criterion": "emb", "auroc": 0.5})
    return ax


def test_a_nearly_constant_score_is_stated_as_its_range_not_drawn_as_a_spread():
    rng = np.random.default_rng(0)
    narrow_in, narrow_out = rng.uniform(0.9140, 0.9146, 300), rng.uniform(0.9142, 0.9148, 200)
    narrow_in[0], narrow_out[0] = 0.9140, 0.9148  # the exact bounds
    ax = _panel(narrow_in, narrow_out)
    assert not ax.patches  # no bars stretched over the panel
    (text,) = [t.get_text() for t in ax.texts]
    assert "0.914 – 0.9148" in text
    share = 100 * (0.9148 - 0.9140) / 0.9148  # the range as a share of the value, computed here
    assert f"{share:.2g}%" in text and "range of 0.0008" in text
    assert f"test {np.median(narrow_in):.6g}" in text and f"OOD {np.median(narrow_out):.6g}" in text

    (constant,) = [t.get_text() for t in _panel(np.full(5, 0.5), np.full(4, 0.5)).texts]
    assert constant == "constant: every value is 0.5"

    wide = _panel(rng.normal(0.0, 1.0, 300), rng.normal(1.0, 1.0, 200))  # an ordinary score: a histogram
    assert wide.patches and not wide.texts
    near_zero = _panel(rng.uniform(0.0, 0.013, 300), rng.uniform(0.0, 0.013, 200))  # small, but all spread
    assert near_zero.patches and not near_zero.texts


def test_nearly_constant_is_relative_to_the_values_size():
    from probssl.eval.report.ood_histograms import NEARLY_CONSTANT, nearly_constant

    assert nearly_constant(np.array([0.9140, 0.9148]))
    assert nearly_constant(np.array([-3.0, -3.0]))
    assert nearly_constant(np.zeros(3))
    assert not nearly_constant(np.array([0.0, 1e-6]))
    inside, outside = 1.0 - 0.9 * NEARLY_CONSTANT, 1.0 - 1.1 * NEARLY_CONSTANT
    assert nearly_constant(np.array([inside, 1.0])) and not nearly_constant(np.array([outside, 1.0]))


def test_report_pages_name_each_column_once(tmp_path):
    """Two columns of one group never share a name (two keys under one name would read as a repeat)."""
    run = _write(tmp_path / "r", _metrics("simclr", {"noise": "far", "mnist": "far"}))
    page = build_report([run], tmp_path / "r.html").read_text(encoding="utf-8")
    headers = set(_parsed(page).headers)  # the headline table repeats its columns in the full one
    by_group: dict[str, list[str]] = {}
    for key, text in headers:
        by_group.setdefault(key.split("/", 1)[0], []).append(text)
    for group, texts in by_group.items():
        assert len(texts) == len(set(texts)), (group, texts)
    assert re.search(r'title="ood/noise/msp/auroc">noise: MSP AUROC', page)
