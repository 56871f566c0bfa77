"""Static HTML report: self-contained, tolerant of partial runs, best values highlighted."""

from __future__ import annotations

import base64
import html
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from probssl.eval.report import build_report, metric_direction, shift_summary, table_columns

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny ops: one intra-op thread is faster


CORRUPTIONS = ("gaussian_noise", "contrast")


def _metrics(method: str, seed: int, top1: float, ece: float) -> dict:
    metrics = {
        "config/method": method,
        "config/data.dataset": "digits",
        "seed": seed,
        "meta/samples": 4,
        "knn/top1": top1 - 0.01,
        "linear/top1": top1,
        "linear/nll": 0.5 - top1 / 4,
        "cal/ece15": ece,
        "cal/brier": 0.2 + ece,
        "ood/mnist/auroc": 0.7 + ece,
        "ood/mnist/fpr95": 0.5 + ece,
        "sel/err_auroc": 0.8 - ece,
        "sel/aurc": 0.05 + ece,
        "ret/recall@1": top1 - 0.05,
        "sel/acc_by_quantile": [0.9, 0.8],  # lists are not table metrics
    }
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            metrics[f"shift/{name}/{severity}/acc"] = top1 - 0.05 * severity
            metrics[f"shift/{name}/{severity}/uncertainty"] = 0.1 * severity
    return metrics


def _details(rng: np.random.Generator) -> dict:
    edges = np.linspace(0, 1, 16)
    centres = (edges[:-1] + edges[1:]) / 2
    accuracy = [None, None, *np.clip(centres[2:] - 0.05, 0, 1).tolist()]
    confidence = [None, None, *centres[2:].tolist()]
    fractions = np.linspace(0, 0.9, 10)
    grey = rng.integers(0, 256, size=(3, 1 * 8 * 8)).tolist()
    return {
        "reliability": {
            "bin_lower": edges[:-1].tolist(),
            "bin_upper": edges[1:].tolist(),
            "confidence": confidence,
            "accuracy": accuracy,
            "count": [0, 0, *range(1, 14)],
        },
        "ood": {
            "mnist": {
                "criterion": "msp",
                "score_in": rng.normal(0, 1, 200).tolist(),
                "score_out": rng.normal(1.5, 1, 200).tolist(),
            }
        },
        "shift": {
            name: {
                "severity": [1, 2, 3, 4, 5],
                "acc": [0.9, 0.8, 0.7, 0.6, 0.5],
                "uncertainty": [1, 2, 3, 4, 5],
            }
            for name in CORRUPTIONS
        },
        "sparsification": {
            "fractions_removed": fractions.tolist(),
            "accuracy": (0.8 + 0.1 * fractions).tolist(),
            "oracle": np.minimum(1, 0.8 / (1 - fractions)).tolist(),
        },
        "ranked_images": {
            "shape": [1, 8, 8],
            "most_certain": grey,
            "least_certain": grey[:2],
            "uncertainty_most": [0.01, 0.02, 0.03],
            "uncertainty_least": [0.9, 0.8],
        },
    }


def _write_run(path: Path, metrics: dict | None, details: dict | None = None) -> Path:
    path.mkdir(parents=True)
    if metrics is not None:
        (path / "eval.json").write_text(json.dumps(metrics))
    if details is not None:
        (path / "eval_details.json").write_text(json.dumps(details))
    return path


class _Cells(HTMLParser):
    """Collects the metric tables as {run name: [(column key, css classes, text)]}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, list[tuple[str, str, str]]] = {}
        self.headers: list[str] = []
        self._in_metrics = False
        self._row: list[tuple[str, str, str]] | None = None
        self._cell: list[str] | None = None
        self._classes = ""
        self._band_keys: list[str] = []
        self._run = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._in_metrics = "metrics" in (a.get("class") or "")
            self._band_keys = []
        elif self._in_metrics and tag == "th" and a.get("title"):
            self._band_keys.append(a["title"] or "")
            self.headers.append(a["title"] or "")
        elif self._in_metrics and tag == "tr":
            self._row = []
        elif self._in_metrics and tag == "td" and self._row is not None:
            self._cell, self._classes = [], a.get("class") or ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._row is not None:
            text = "".join(self._cell).strip()
            if "run" in self._classes.split():
                self._run = text
            else:
                self._row.append((self._band_keys[len(self._row)], self._classes, text))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._run:
                self.rows.setdefault(self._run, []).extend(self._row)
            self._row, self._run = None, ""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[Path]]:
    root = tmp_path_factory.mktemp("runs")
    complete = _write_run(
        root / "run_complete", _metrics("vi_simsiam", 0, 0.90, 0.02), _details(np.random.default_rng(0))
    )
    partial = _write_run(root / "run_partial", _metrics("simclr", 1, 0.85, 0.05))
    backend = matplotlib.get_backend()
    out = build_report([complete, partial], root / "nested" / "report.html", title="Test <report>")
    assert matplotlib.get_backend() == backend  # no pyplot / backend switching behind the caller's back
    return out, out.read_text(encoding="utf-8"), [complete, partial]


def test_report_is_self_contained_html(report: tuple[Path, str, list[Path]]) -> None:
    path, page, _ = report
    assert path.is_file() and path.name == "report.html"
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>Test &lt;report&gt;</title>" in page  # escaped, not injected
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    assert not [p for p in path.parent.iterdir() if p.name != "report.html"]  # no temp file left behind


def test_report_names_runs_and_metrics(report: tuple[Path, str, list[Path]]) -> None:
    _, page, _ = report
    assert "vi_simsiam · seed 0" in page and "simclr · seed 1" in page
    for heading in ("kNN", "Linear probe", "Calibration", "OOD detection", "Corruptions", "Retrieval"):
        assert f">{heading}<" in page
    parser = _Cells()
    parser.feed(page)
    for key in ("knn/top1", "linear/top1", "cal/ece15", "ood/mnist/auroc", "shift/mean/acc", "ret/recall@1"):
        assert key in parser.headers
    # 2 corruptions x 5 severities are summarised, not listed; lists, config and seed are not columns
    assert not any(re.fullmatch(r"shift/\w+/\d/\w+", h) for h in parser.headers)
    assert not any(h.startswith(("config/", "meta/", "sel/acc_by")) or h == "seed" for h in parser.headers)
    for section in ("Reliability diagrams", "OOD score histograms", "Accuracy under corruption"):
        assert section in page
    assert "Sparsification" in page and "Test images ranked by uncertainty" in page
    assert "How to read" in page
    assert "no eval_details.json" in page  # the partial run is flagged, not dropped


def test_report_highlights_best_values(report: tuple[Path, str, list[Path]]) -> None:
    _, page, _ = report
    parser = _Cells()
    parser.feed(page)
    good, worse = parser.rows["vi_simsiam · seed 0"], parser.rows["simclr · seed 1"]

    def cell(row: list[tuple[str, str, str]], key: str) -> tuple[str, str]:
        matches = [(classes, text) for k, classes, text in row if k == key]
        assert matches, key
        return matches[0]

    # higher-better and lower-better metrics: the complete run wins both kinds
    for key in ("linear/top1", "cal/ece15", "cal/brier", "ood/mnist/fpr95", "sel/aurc", "sel/err_auroc"):
        assert "best" in cell(good, key)[0].split(), key
        assert "best" not in cell(worse, key)[0].split(), key
    # but the partial run has the higher OOD AUROC (0.75 > 0.72)
    assert "best" in cell(worse, "ood/mnist/auroc")[0].split()
    classes, text = cell(good, "linear/top1")
    assert text == "0.9000" and "num" in classes.split()
    assert 'class="num' in page and "text-align:right" in page


def test_embedded_pngs_are_valid_and_carry_no_urls(report: tuple[Path, str, list[Path]]) -> None:
    _, page, _ = report
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) >= 5  # reliability, OOD, shift, sparsification, one ranked-image grid
    for encoded in images:
        data = base64.b64decode(encoded)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"http" not in data


@pytest.mark.parametrize(
    ("key", "direction"),
    [
        ("knn/top1@20", "higher"),
        ("linear/top1", "higher"),
        ("linear/nll", "lower"),
        ("cal/ece15", "lower"),
        ("cal/aece15", "lower"),
        ("cal/brier", "lower"),
        ("cal/acc", "higher"),
        ("ood/mnist/auroc", "higher"),
        ("ood/mnist/aupr_in", "higher"),
        ("ood/mnist/fpr95", "lower"),
        ("sel/err_auroc", "higher"),
        ("sel/aurc", "lower"),
        ("sel/spearman", "higher"),
        ("ret/recall@1", "higher"),
        ("shift/mean/acc", "higher"),
        ("shift/mean/uncertainty", None),
        ("meta/eval_seconds", None),
    ],
)
def test_metric_direction(key: str, direction: str | None) -> None:
    assert metric_direction(key) == direction


def test_shift_summary_and_column_groups() -> None:
    metrics = _metrics("m", 0, 0.9, 0.02)
    summary = shift_summary(metrics)
    assert summary["shift/gaussian_noise/acc"] == pytest.approx(0.9 - 0.15)
    assert summary["shift/mean/acc"] == pytest.approx(0.75)
    assert summary["shift/mean/uncertainty"] == pytest.approx(0.3)
    groups = table_columns([{"ret/recall@10": 1, "knn/top1@200": 1, "knn/top1@20": 1, "foo/bar": 1}])
    assert [g for g, _ in groups] == ["knn", "ret", "other"]
    assert groups[0][1] == ["knn/top1@20", "knn/top1@200"]


def test_partial_and_malformed_runs_do_not_crash(tmp_path: Path) -> None:
    bad_details = {
        "reliability": {"bin_lower": [0, 0.5], "bin_upper": [0.5], "count": [1]},  # lengths differ
        "ood": {"svhn": {"score_in": [], "score_out": [1.0]}},  # nothing to draw
        "ranked_images": {"shape": [3, 2, 2], "most_certain": [[0] * 12], "uncertainty_most": []},
        "unknown_section": 42,
    }
    bad = _write_run(tmp_path / "bad_details", {"linear/top1": 0.25}, bad_details)
    broken = _write_run(tmp_path / "broken", None)
    (broken / "eval.json").write_text("{not json")
    lonely = _write_run(tmp_path / "lonely", {"linear/top1": 0.5, "seed": 3})
    with pytest.warns(UserWarning, match="could not read eval.json"):
        out = build_report([bad, broken, lonely], tmp_path / "r.html")
    page = out.read_text(encoding="utf-8")
    assert "reliability data malformed" in page
    assert "skipped" in page and "could not read eval.json" in page  # left out, and said why
    assert "lonely" in page and "0.5000" in page
    classes = re.findall(r'class="([^"]*)"', page)
    assert sum("best" in c.split() for c in classes) == 1  # 0.5 beats 0.25; the broken run has no row
    with pytest.raises(FileNotFoundError):
        build_report([tmp_path / "missing"], tmp_path / "x.html")
    with pytest.raises(ValueError):
        build_report([], tmp_path / "x.html")


def test_report_overwrites_atomically(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "r", {"linear/top1": 0.5})
    out = tmp_path / "report.html"
    out.write_text("old")
    build_report([run], out)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "report.html"]


def _chromium() -> str | None:
    for candidate in ("chromium", "chromium-browser", "/usr/bin/chromium"):
        found = shutil.which(candidate)
        if found:
            return found
    return None


def test_report_renders_in_headless_chromium(report: tuple[Path, str, list[Path]], tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed")
    path, _, _ = report
    shot = tmp_path / "report.png"
    profile = tempfile.mkdtemp(dir=tmp_path)
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,1600", path.as_uri(),
    ]  # fmt: skip
    subprocess.run(
        command, capture_output=True, timeout=120, check=False, env={**os.environ, "HOME": profile}
    )
    assert shot.is_file() and shot.stat().st_size > 10_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_figure_costs_only_that_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import probssl.eval.report.figures as report_module

    def broken_png(fig: object) -> str:
        raise RuntimeError("renderer exploded")

    monkeypatch.setattr(report_module, "_png", broken_png)
    run = _write_run(tmp_path / "run", _metrics("m", 0, 0.9, 0.02), _details(np.random.default_rng(1)))
    page = build_report([run], tmp_path / "r.html").read_text(encoding="utf-8")
    assert page.count("figure could not be drawn") == 5
    assert "renderer exploded" in page and "0.9000" in page


def test_ood_columns_name_their_score_and_absent_metrics_read_na(tmp_path: Path) -> None:
    """The table's AUROC for a score is the histogram's; what a run lacks is "n/a", never a number."""
    from probssl.eval.report.ood_histograms import _auroc, _ood_data
    from probssl.eval.report.runs import load_run

    details = _details(np.random.default_rng(2))
    details["ood"]["mnist"]["criterion"] = "entropy"
    entry = details["ood"]["mnist"]
    rng = np.random.default_rng(3)
    entry["by_criterion"] = {  # the reference detector's and the own score's histograms (suite.ood_suite)
        c: {"score_in": rng.normal(0, 1, 50).tolist(), "score_out": rng.normal(2, 1, 50).tolist()}
        for c in ("knn1", "emb")
    }
    entropy_auroc = _auroc(np.array(entry["score_in"]), np.array(entry["score_out"]))
    probabilistic = _metrics("vi_simsiam", 0, 0.9, 0.02) | {
        "ood/mnist/msp/auroc": 0.71,
        "ood/mnist/entropy/auroc": entropy_auroc,
        "ood/mnist/knn1/auroc": 0.97,
        "ood/mnist/mahalanobis/auroc": 0.99,
        "ood/mnist/best_feature/auroc": 0.97,  # the pre-declared knn1, not the best on the OOD set
        "ood/mnist/best_feature/detector": "knn1",
        "ood/mnist/emb/auroc": 0.8,
    }
    deterministic = _metrics("simclr", 1, 0.85, 0.05) | {"ood/mnist/msp/auroc": 0.6}
    runs = [_write_run(tmp_path / "p", probabilistic, details), _write_run(tmp_path / "d", deterministic)]
    page = build_report(runs, tmp_path / "r.html").read_text(encoding="utf-8")
    parser = _Cells()
    parser.feed(page)
    assert "ood/mnist/auroc" not in parser.headers  # the unnamed MSP alias is gone
    assert {"ood/mnist/entropy/auroc", "ood/mnist/emb/auroc", "ood/mnist/best_feature/auroc"} <= set(
        parser.headers
    )
    cells = {key: text for key, _, text in parser.rows["simclr · seed 1"]}
    assert cells["ood/mnist/emb/auroc"] == "n/a" and cells["ood/mnist/best_feature/auroc"] == "n/a"
    assert {key: text for key, _, text in parser.rows["vi_simsiam · seed 0"]}[
        "ood/mnist/best_feature/auroc"
    ] == ("0.9700")
    histograms = _ood_data(load_run(runs[0]))["mnist"]
    assert list(histograms) == ["entropy", "knn1", "emb"]  # a panel per headline score, each its table AUROC
    assert histograms["entropy"]["criterion"] == "entropy" and histograms["entropy"]["auroc"] == entropy_auroc
    assert (histograms["knn1"]["auroc"], histograms["emb"]["auroc"]) == (0.97, 0.8)
    # Each run's own uncertainty is explained in one line (from the method registry for old runs).
    from probssl.methods import METHODS

    assert html.escape(METHODS.get("vi_simsiam").uncertainty_doc) in page
    assert html.escape(METHODS.get("simclr").uncertainty_doc) in page


def test_ranked_images_show_label_and_prediction() -> None:
    from probssl.eval.report.ranked_images import _ranked_data
    from probssl.eval.report.runs import Run

    details = _details(np.random.default_rng(3))
    details["ranked_images"] |= {
        "label_most": [1, 2, 3],
        "prediction_most": [1, 2, 0],
        "criterion": "entropy",
    }
    rows = _ranked_data(Run("r", Path("r"), {}, details))
    assert [(label, prediction) for _, _, label, prediction in rows["most_certain"]] == [
        (1, 1),
        (2, 2),
        (3, 0),
    ]
    assert [(label, prediction) for _, _, label, prediction in rows["least_certain"]] == [(None, None)] * 2
    assert rows["criterion"] == "entropy"


# ------------------------------------------------------------- what a reader sees (issue 21's screenshots)


def _suite_runs(
    root: Path, arms: dict[str, str], seeds: int, ood_sets: tuple[str, ...] = ("mnist",)
) -> list[Path]:
    """Bench-style run directories ``<arm>-s<seed>`` for ``arms`` ({arm: method}), with plot data."""
    rng = np.random.default_rng(4)
    dirs = []
    for k, (arm, method) in enumerate(arms.items()):
        for seed in range(seeds):
            details = _details(rng)
            entry = details["ood"].pop("mnist")
            details["ood"] = {name: entry for name in ood_sets}
            metrics = _metrics(method, seed, 0.9 - 0.01 * k, 0.02 + 0.01 * seed)
            dirs.append(_write_run(root / f"{arm}-s{seed}", metrics, details))
    return dirs


def _capture_figures(monkeypatch: pytest.MonkeyPatch) -> list:
    """The matplotlib figures a report draws, laid out (in the order of the page), instead of their PNGs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    import probssl.eval.report.figures as figures

    drawn = []

    def keep(fig: matplotlib.figure.Figure) -> str:
        FigureCanvasAgg(fig).draw()  # inside the report's rc_context, as savefig would
        drawn.append(fig)
        return "data:image/png;base64,"

    monkeypatch.setattr(figures, "_png", keep)
    return drawn


def _overlaps(a: object, b: object, tolerance: float = 1.0) -> bool:
    return (
        a.x0 < b.x1 - tolerance
        and b.x0 < a.x1 - tolerance
        and a.y0 < b.y1 - tolerance
        and b.y0 < a.y1 - tolerance
    )


def _collisions(fig: matplotlib.figure.Figure) -> list[str]:
    """Titles that run into another panel, side-by-side panels whose labels touch, legends over a panel."""
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.get_visible()]
    tight = {ax: ax.get_tightbbox(renderer) for ax in axes}
    found = []
    for a in axes:
        titles = [t for t in (a.title, a._left_title, a._right_title) if t.get_text()]
        for b in axes:
            if b is a:
                continue
            found += [
                f"title {t.get_text()!r} runs into a neighbour"
                for t in titles
                if _overlaps(t.get_window_extent(renderer), tight[b])
            ]
            pa, pb = a.get_position(), b.get_position()
            if pa.x1 <= pb.x0 and pa.y0 < pb.y1 and pb.y0 < pa.y1 and tight[a].x1 > tight[b].x0 + 1:
                found.append(f"panels {a.get_title(loc='left') or a.get_title()!r} and the next one touch")
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        found += [f"legend covers {ax.get_title()!r}" for ax in axes if _overlaps(box, tight[ax])]
    return found


def _legend_gap_inches(fig: matplotlib.figure.Figure) -> float:
    """Blank height between the lowest panel (with its labels) and the figure legend below it."""
    renderer = fig.canvas.get_renderer()
    lowest = min(ax.get_tightbbox(renderer).y0 for ax in fig.axes if ax.get_visible())
    return (lowest - fig.legends[0].get_window_extent(renderer).y1) / fig.dpi


def test_figures_keep_long_names_inside_their_panels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long run names and OOD set names (``csghmc_snapshot · seed 0 vs tiny_imagenet_val``) used to run
    into the next panel, and a tall figure left a blank band above its legend."""
    arms = {"csghmc_snapshot_long_arm": "csghmc", "lam_deterministic_long": "lam", "lam_online_long": "lam"}
    dirs = _suite_runs(tmp_path, arms, seeds=3, ood_sets=("tiny_imagenet_val", "mnist", "gaussian_noise"))
    drawn = _capture_figures(monkeypatch)
    build_report(dirs, tmp_path / "r.html")
    reliability, ood, shift = drawn[:3]
    for fig in (reliability, ood, shift):
        assert _collisions(fig) == []
        assert _legend_gap_inches(fig) < 0.25


def test_ood_histograms_use_the_width_with_one_ood_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one OOD set, runs sit side by side (it was one panel per row: a 10,000 px column at 42 runs);
    a suite draws one run per arm (84 panels of a 14-arm, 3-seed suite said nothing 14 do not)."""
    arms = {f"arm{k}": method for k, method in enumerate(["simclr", "byol", "pixels"] * 3)}
    dirs = _suite_runs(tmp_path, arms, seeds=2)
    drawn = _capture_figures(monkeypatch)
    page = build_report(dirs, tmp_path / "r.html").read_text(encoding="utf-8")
    ood = drawn[1]
    panels = [ax for ax in ood.axes if ax.get_visible()]
    assert len(panels) == 9
    assert all(" · seed 0" in ax.get_title(loc="left") for ax in panels)
    section = page.split('id="ood"', 1)[1].split("</section>", 1)[0]
    assert "One run per bench arm" in section
    assert len({round(ax.get_position().x0, 3) for ax in panels}) == 4
    assert _collisions(ood) == []


def test_ood_histograms_show_the_reference_detector_and_the_own_score(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row per OOD set, a column per score: the probe's, ``knn1`` and the method's own, in that order
    whichever run comes first (a deterministic run has no own score and leaves its column empty)."""
    dirs = _suite_runs(tmp_path, {"simclr": "simclr", "vi_simsiam": "vi_simsiam"}, 1, ("mnist", "noise"))
    rng = np.random.default_rng(5)
    for run_dir, scores in ((dirs[0], ("knn1",)), (dirs[1], ("emb", "knn1"))):
        details = json.loads((run_dir / "eval_details.json").read_text(encoding="utf-8"))
        for entry in details["ood"].values():
            entry["by_criterion"] = {
                c: {"score_in": rng.normal(0, 1, 80).tolist(), "score_out": rng.normal(1, 1, 80).tolist()}
                for c in scores
            }
        (run_dir / "eval_details.json").write_text(json.dumps(details), encoding="utf-8")
    drawn = _capture_figures(monkeypatch)
    build_report(dirs, tmp_path / "r.html")
    ood = drawn[1]
    grid = ood.axes[0].get_subplotspec().get_gridspec()
    assert (grid.nrows, grid.ncols) == (4, 3)  # two runs x two sets, three scores
    titles = [ax.get_title(loc="left") if ax.get_visible() else None for ax in ood.axes]
    lines = [t.split("\n")[1:] if t else None for t in titles]
    shown = [f"{line[0]} | {line[1].split(' = ')[0]}" if line else None for line in lines]
    probe, reference, own = "probe · AUROC(msp)", "reference · AUROC(knn1)", "own · AUROC(emb)"
    assert shown == [
        f"vs mnist | {probe}", f"vs mnist | {reference}", None,
        f"vs noise | {probe}", f"vs noise | {reference}", None,
        f"vs mnist | {probe}", f"vs mnist | {reference}", f"vs mnist | {own}",
        f"vs noise | {probe}", f"vs noise | {reference}", f"vs noise | {own}",
    ]  # fmt: skip
    assert all(len(t.split("\n")) == 3 for t in titles if t)  # the same three lines in every panel
    assert _collisions(ood) == []


def test_seeds_of_an_arm_share_a_colour_and_arms_of_one_method_keep_their_names(tmp_path: Path) -> None:
    """Bench arms of one method (lam_online-s0, lam_posthoc-s0: both ``lam``) are named by their arm; the
    last of a clash used to keep the bare ``lam · seed 0``. Seeds of one arm share colour and legend entry."""
    from probssl.eval.report.runs import label_runs, load_run

    dirs = _suite_runs(
        tmp_path / "suite", {"lam_a": "lam", "lam_b": "lam", "lam_c": "lam", "pixels": "pixels"}, 2
    )
    dirs += [_write_run(tmp_path / name, _metrics("simclr", 0, 0.8, 0.03)) for name in ("x", "y")]
    runs = [load_run(d) for d in dirs]
    label_runs(runs)
    names = [run.name for run in runs]
    assert len(set(names)) == len(names)
    assert names[:3] == ["lam_a · seed 0", "lam_a · seed 1", "lam_b · seed 0"]
    assert names[6:] == ["pixels · seed 0", "pixels · seed 1", "simclr · seed 0 (x)", "simclr · seed 0 (y)"]
    assert runs[6].group == runs[7].group == "pixels · 2 seeds" and runs[8].group == "simclr · seed 0 (x)"
    colours = [run.colour for run in runs]
    assert colours[0] == colours[1] and colours[6] == colours[7]
    assert len({colours[0], colours[2], colours[4], colours[6], colours[8], colours[9]}) == 6


def test_sparsification_legend_gap_is_the_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The legend's gap to the oracle is ``ret/ausc_oracle − ret/ausc`` from the table (the legend used the
    un-normalised area: 0.2625 beside a table that reads 0.6478 − 0.3715), and the axis names what is
    measured: 1-NN retrieval, not the probe's accuracy."""
    metrics = _metrics("simclr", 0, 0.9, 0.02) | {"ret/ausc": 0.61, "ret/ausc_oracle": 0.82}
    run = _write_run(tmp_path / "simclr-s0", metrics, _details(np.random.default_rng(5)))
    drawn = _capture_figures(monkeypatch)
    build_report([run], tmp_path / "r.html")
    ax = drawn[3].axes[0]
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels[0] == "simclr · seed 0  (gap to oracle 0.2100)"
    assert "retrieval" in ax.get_ylabel()


def test_cells_read_as_their_numbers(tmp_path: Path) -> None:
    """A chosen 1e-5 reads 1e-05 (as `probssl table` writes it), not a measured 0.0000; cells that read the
    same are best together."""
    values = [(1e-5, 0.99996), (1e-3, 1.0), (1e-6, 0.9)]
    dirs = [
        _write_run(tmp_path / f"r{i}", {"linear/l2": l2, "ood/x/knn1/auroc": auroc, "config/method": f"m{i}"})
        for i, (l2, auroc) in enumerate(values)
    ]
    parser = _Cells()
    parser.feed(build_report(dirs, tmp_path / "r.html").read_text(encoding="utf-8"))
    cells = {name: {key: (classes, text) for key, classes, text in row} for name, row in parser.rows.items()}
    assert [cells[f"m{i}"]["linear/l2"][1] for i in range(3)] == ["1e-05", "0.001", "1e-06"]
    auroc = [cells[f"m{i}"]["ood/x/knn1/auroc"] for i in range(3)]
    assert [text for _, text in auroc] == ["1.0000", "1.0000", "0.9000"]
    assert ["best" in classes.split() for classes, _ in auroc] == [True, True, False]


class _Structure(HTMLParser):
    """Figcaptions outside a figure, and the CSS class of each runs-table cell."""

    def __init__(self) -> None:
        super().__init__()
        self.depth, self.stray_captions, self.cell_classes = 0, 0, set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.depth += tag == "figure"
        self.stray_captions += tag == "figcaption" and self.depth == 0
        if tag == "td":
            self.cell_classes.add(dict(attrs).get("class") or "")

    def handle_endtag(self, tag: str) -> None:
        self.depth -= tag == "figure"


def test_runs_table_wraps_its_long_cells_and_captions_sit_in_figures(
    report: tuple[Path, str, list[Path]],
) -> None:
    """The one-line uncertainty explanation was cut off under the plot-data chips (every cell was nowrap),
    and the ranked-images caption was a figcaption outside any figure."""
    _, page, _ = report
    parser = _Structure()
    parser.feed(page)
    assert parser.stray_captions == 0 and parser.depth == 0
    assert {"doc", "chips"} <= parser.cell_classes
    css = dict(re.findall(r"td\.(doc|chips) \{([^}]*)\}", page))
    assert "white-space:normal" in css["doc"] and "white-space:normal" in css["chips"]


def test_arms_with_several_seeds_read_as_mean_and_std(tmp_path: Path) -> None:
    """A suite's table has one row per arm (mean ± sample std over its seeds, n= when a seed lacks the
    metric) and the per-run rows folded below: 42 per-run rows were 38.6k px tall (digits suite)."""
    import statistics

    dirs = _suite_runs(tmp_path / "suite", {"simclr": "simclr", "byol": "byol"}, 3)
    lacking = json.loads((dirs[2] / "eval.json").read_text())
    del lacking["sel/err_auroc"]
    (dirs[2] / "eval.json").write_text(json.dumps(lacking))
    page = build_report(dirs, tmp_path / "r.html").read_text(encoding="utf-8")
    parser = _Cells()
    parser.feed(page)
    cells = {name: {key: (classes, text) for key, classes, text in row} for name, row in parser.rows.items()}
    assert set(cells) == {"simclr · 3 seeds", "byol · 3 seeds"} | {
        f"{arm} · seed {s}" for arm in ("simclr", "byol") for s in range(3)
    }
    runs = [json.loads((d / "eval.json").read_text()) for d in dirs]

    def number(x: float) -> str:  # 4 decimals, 4 significant digits below 0.01 (probssl.results.numbers)
        return f"{x:.4g}" if 0 < abs(x) < 0.01 else f"{x:.4f}"

    ece = [run["cal/ece15"] for run in runs[:3]]
    assert cells["simclr · 3 seeds"]["cal/ece15"][1] == (
        f"{number(statistics.mean(ece))} ± {number(statistics.stdev(ece))}"
    )
    err = [run["sel/err_auroc"] for run in runs[:2]]
    assert cells["simclr · 3 seeds"]["sel/err_auroc"][1] == (
        f"{number(statistics.mean(err))} ± {number(statistics.stdev(err))} (n=2)"
    )
    # The same cells as `probssl table --by-seed` writes them, from the same runs.
    from probssl.tables import aggregate_seeds

    rows = {str(d): run for d, run in zip(dirs[:3], runs[:3], strict=True)}
    by_seed = aggregate_seeds(rows, ["sel/err_auroc"])
    assert by_seed["simclr"]["sel/err_auroc"] == cells["simclr · 3 seeds"]["sel/err_auroc"][1]
    assert cells["simclr · seed 0"]["cal/ece15"][1] == f"{ece[0]:.4f}"  # the folded per-run rows
    top1 = {arm: cells[f"{arm} · 3 seeds"]["linear/top1"][0].split() for arm in ("simclr", "byol")}
    assert "best" in top1["simclr"] and "best" not in top1["byol"]  # best by mean (0.90 > 0.89)
    assert cells["simclr · 3 seeds"]["linear/top1"][1] == "0.9000 ± 0.0000"  # equal seeds: no ± 1.1e-16
    assert page.count('<details class="per-run">') == 3  # headline, all-metrics and corruption tables
    assert (
        page.index("simclr · 3 seeds")
        < page.index('<details class="per-run">')
        < page.index("simclr · seed 0</td>")
    )


def test_ranked_images_name_their_classes_without_overlap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With class names on record (eval_details ``ranked_images/classes``) the captions read
    ``y T-shirt/top / ŷ Shirt``, not class numbers; long names are cut, and captions stay apart."""
    from probssl.eval.report.ranked_images import _class_name

    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "An unusually long class name"]  # fmt: skip
    rng = np.random.default_rng(6)
    details = _details(rng)
    images = rng.integers(0, 256, size=(8, 64)).tolist()
    details["ranked_images"] = {
        "shape": [1, 8, 8],
        "most_certain": images,
        "least_certain": images,
        "uncertainty_most": [0.01] * 8,
        "uncertainty_least": [0.9] * 8,
        "label_most": list(range(8)),
        "prediction_most": [6, 1, 2, 3, 4, 5, 0, 7],
        "label_least": [9, 8, 9, 8, 9, 8, 9, 8],
        "prediction_least": [9] * 8,
        "criterion": "entropy",
        "classes": names,
    }
    run = _write_run(tmp_path / "simclr-s0", _metrics("simclr", 0, 0.9, 0.02), details)
    drawn = _capture_figures(monkeypatch)
    build_report([run], tmp_path / "r.html")
    (fig,) = [f for f in drawn if len(f.axes) == 16]
    captions = [ax.get_xlabel() for ax in fig.axes]
    assert captions[0].splitlines()[:2] == ["y T-shirt/top", "ŷ Shirt"]
    assert captions[8].splitlines()[:2] == ["y An unusual…", "ŷ An unusual…"]
    renderer = fig.canvas.get_renderer()
    boxes = [ax.xaxis.label.get_window_extent(renderer) for ax in fig.axes]
    frames = [ax.get_window_extent(renderer) for ax in fig.axes]
    for i, box in enumerate(boxes):
        assert not any(_overlaps(box, other) for j, other in enumerate(boxes) if j != i), captions[i]
        assert not any(_overlaps(box, frame) for frame in frames), captions[i]
    assert (_class_name(None, names), _class_name(3, names), _class_name(12, names), _class_name(2, [])) == (
        "?",
        "Dress",
        "12",
        "2",
    )


def test_seed_mean_cells_widen_their_columns_into_more_bands() -> None:
    """A seed-mean cell is three times as wide as a number: bands are cut by the widest cell too (the
    arm table of the Fashion-MNIST suite overflowed the page sideways in Chromium when only headers
    counted)."""
    from probssl.eval.report.tables import _bands, _column_px

    assert _column_px("top1", len("0.8459 ± 0.0012 (n=2)")) > 2 * _column_px("top1")
    groups = [("linear", [f"linear/m{i}" for i in range(8)])]
    assert len(_bands(groups)) == 1
    assert len(_bands(groups, {f"linear/m{i}": len("0.8459 ± 0.0012 (n=2)") for i in range(8)})) == 2


def test_bands_cut_long_headed_columns_into_parts_that_each_fit() -> None:
    """Seen in Chromium on the Fashion-MNIST suite: six Mahalanobis columns (headers that wrap only after
    each ``/``) were put in one band because a wide group was cut into parts of equal *count*, and the band
    overflowed the page by 87 px. Every part must fit; a header is as wide as its longest piece."""
    from probssl.eval.report.tables import _TABLE_BUDGET_PX, _bands, _column_label, _column_px, _cut

    assert _column_px("mahalanobis_unsup_bma/aurc") == _column_px("mahalanobis_unsup_bma/x")
    assert _column_px("mahalanobis_unsup_bma/aurc") > _column_px("knn1/aurc")
    names = ["aurc", "err_auroc", "spearman", "mahalanobis_raw/aurc", "mahalanobis_raw/err_auroc",
             "mahalanobis_raw_bma/aurc", "mahalanobis_raw_bma/err_auroc", "mahalanobis_unsup/aurc",
             "mahalanobis_unsup/err_auroc", "mahalanobis_unsup_bma/aurc", "msp/aurc", "mi/aurc"]  # fmt: skip
    groups = [("sel", [f"sel/{name}" for name in names])]
    seed_mean = {key: len("0.5870 ± 0.0035") for key in groups[0][1]}
    bands = _bands(groups, seed_mean)
    assert [key for band in bands for _, columns, _ in band for key in columns] == groups[0][1]
    for band in bands:
        keys = [key for _, cols, _ in band for key in cols]
        width = sum(_column_px(_column_label(key, "sel"), seed_mean[key]) for key in keys)
        assert width <= _TABLE_BUDGET_PX
    rng = np.random.default_rng(0)
    for _ in range(300):  # against brute force over every way to cut (fewest parts, then narrowest widest)
        widths = [int(w) for w in rng.integers(60, 500, size=int(rng.integers(1, 11)))]
        starts = [0, *_cut(widths, 940), len(widths)]
        parts = [widths[a:b] for a, b in itertools.pairwise(starts)]
        assert all(part and (sum(part) <= 940 or len(part) == 1) for part in parts)
        best = min(
            (len(cuts) + 1, max(sum(widths[a:b]) for a, b in itertools.pairwise([0, *cuts, len(widths)])))
            for k in range(len(widths))
            for cuts in itertools.combinations(range(1, len(widths)), k)
            if all(sum(widths[a:b]) <= 940 for a, b in itertools.pairwise([0, *cuts, len(widths)]))
        )
        assert (len(parts), max(sum(part) for part in parts)) == best


def test_methods_with_their_own_uncertainty_get_images_ranked_by_it(tmp_path: Path) -> None:
    """``ranked_images_own`` (κ, σ, posterior spread) gets its own section; a deterministic run, which
    has no own uncertainty by design, is not listed as missing it."""
    rng = np.random.default_rng(7)
    own = _details(rng)
    own["ranked_images_own"] = dict(own["ranked_images"], criterion="the embedding's own uncertainty")
    probabilistic = _write_run(
        tmp_path / "vi_simsiam-s0", _metrics("vi_simsiam", 0, 0.9, 0.02) | {"sel/emb/err_auroc": 0.6}, own
    )
    deterministic = _write_run(tmp_path / "simclr-s0", _metrics("simclr", 0, 0.9, 0.02), _details(rng))
    page = build_report([probabilistic, deterministic], tmp_path / "r.html").read_text(encoding="utf-8")
    section = page.split('id="ranked-own"', 1)[1].split("</section>", 1)[0]
    assert section.startswith("><h2>Test images ranked by the method&#x27;s own uncertainty</h2>")
    assert "vi_simsiam · seed 0" in section and "simclr" not in section
    assert "No own-uncertainty ranking data" not in page
    lonely = build_report([probabilistic], tmp_path / "p.html").read_text(encoding="utf-8")
    assert 'id="ranked-own"' in lonely
    missing = _write_run(
        tmp_path / "scl-s0", _metrics("scl", 0, 0.9, 0.02) | {"sel/emb/err_auroc": 0.5}, _details(rng)
    )
    both = build_report([probabilistic, missing], tmp_path / "m.html").read_text(encoding="utf-8")
    assert "No own-uncertainty ranking data for: scl · seed 0." in both  # evaluated before the key existed


def test_ranked_images_show_one_run_per_arm(tmp_path: Path) -> None:
    """Image grids are per run: a suite shows each arm's first seed that has them, not every seed."""
    dirs = _suite_runs(tmp_path / "suite", {"simclr": "simclr", "byol": "byol"}, 3)
    (dirs[0] / "eval_details.json").unlink()  # simclr seed 0 has no plot data: its seed 1 stands in
    details = json.loads((dirs[5] / "eval_details.json").read_text(encoding="utf-8"))
    details["ranked_images"]["shape"] = [7, 2]  # byol seed 2: never read, since its seed 0 is shown
    (dirs[5] / "eval_details.json").write_text(json.dumps(details), encoding="utf-8")
    page = build_report(dirs, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "ranked-image data malformed" not in page
    section = page.split('id="ranked"', 1)[1].split("</section>", 1)[0]
    grids = re.findall(r"</span>([^<]+)</h3>", section)
    assert grids == ["simclr · seed 1", "byol · seed 0"]
    assert "One run per bench arm" in section and "No ranked-image data" not in section
    single = build_report(dirs[3:4], tmp_path / "one.html").read_text(encoding="utf-8")
    assert "One run per bench arm" not in single


def test_headline_metrics_come_first_and_the_rest_is_folded(tmp_path: Path) -> None:
    """The 42-run Fashion-MNIST page had 61 metric bands (every detector x set x posterior draw) before
    its first figure: the headline columns come first, every column is still there in a fold."""
    metrics = _metrics("csghmc", 0, 0.9, 0.02) | {
        "ood/mnist/msp/auroc": 0.6,
        "ood/mnist/knn1/auroc": 0.98,
        "ood/mnist/best_feature/auroc": 0.98,
        "ood/mnist/best_feature/detector": "knn1",
        "ood/mnist/knn50/auroc": 0.95,
        "ood/mnist/emb/auroc": 0.61,
        "sel/knn50/aurc": 0.2,
    }
    run = _write_run(tmp_path / "r", metrics)
    page = build_report([run], tmp_path / "r.html").read_text(encoding="utf-8")
    metrics_section = page.split('id="metrics"', 1)[1].split("</section>", 1)[0]
    headline, folded = metrics_section.split('<details class="all-metrics">', 1)
    for key in ("linear/top1", "ood/mnist/msp/auroc", "ood/mnist/best_feature/auroc", "ood/mnist/emb/auroc"):
        assert f'title="{key}"' in headline and f'title="{key}"' in folded
    for key in ("ood/mnist/knn50/auroc", "sel/knn50/aurc", "ood/mnist/knn1/auroc"):
        assert f'title="{key}"' not in headline and f'title="{key}"' in folded
    plain = {key: metrics[key] for key in ("linear/top1", "knn/top1@20") if key in metrics}
    lean = build_report([_write_run(tmp_path / "h", plain | {"method": "simclr"})], tmp_path / "h.html")
    assert "all-metrics" not in lean.read_text(encoding="utf-8").split("<body>", 1)[1]


def test_runs_table_has_one_row_per_arm_in_a_suite(tmp_path: Path) -> None:
    """The Runs table of a 42-run suite repeated each method's description 3 times (5,000 px): one row per
    arm, listing its run directories and seeds, marking plot data that only some seeds brought."""
    dirs = _suite_runs(tmp_path / "suite", {"simclr": "simclr", "byol": "byol"}, 3)
    (dirs[1] / "eval_details.json").unlink()  # simclr seed 1: no plot data
    page = build_report(dirs, tmp_path / "r.html").read_text(encoding="utf-8")
    runs = page.split('id="runs"', 1)[1].split("</section>", 1)[0]
    rows = re.findall(r"<tr><td class=\"run\">(.*?)</tr>", runs)
    assert len(rows) == 2
    assert "simclr · 3 seeds" in rows[0] and all(f"simclr-s{k}</span>" in rows[0] for k in range(3))
    assert "<td>0, 1, 2</td>" in rows[0]
    assert "reliability 2/3" in rows[0]
    assert "reliability 2/3" not in rows[1] and "reliability</span>" in rows[1]
    single = build_report(dirs[3:4], tmp_path / "one.html").read_text(encoding="utf-8")
    assert "byol · seed 0" in single.split('id="runs"', 1)[1].split("</section>", 1)[0]


def test_ranked_values_get_the_digits_that_tell_them_apart() -> None:
    """VI-SimSiam's 1/κ read 0.00196 under every image at 3 digits; the ranking lives in the 5th."""
    from probssl.eval.report.figures import significant_digits

    close = [0.0019581, 0.0019602, 0.0019590]
    digits = significant_digits(close)
    assert len({f"{v:.{digits}g}" for v in close}) == 3 and len({f"{v:.3g}" for v in close}) == 1
    assert significant_digits([0.01, 1.9]) == 3 and significant_digits([None, 0.5]) == 3
    assert significant_digits([1.0, 1.0]) == 3 and significant_digits([1.0, 1.0 + 1e-12]) == 7  # capped


def test_pvalue_histograms_and_the_flagged_share_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 29: per run and OOD set the combined p-value's histogram (flat for in-distribution images,
    piled near 0 for OOD ones) and "flagged at α = 0.05: ID x%, <set> y%" from the eval.json keys."""
    dirs = _suite_runs(tmp_path, {"simclr": "simclr", "vi_simsiam": "vi_simsiam"}, 1, ("mnist", "noise"))
    rng = np.random.default_rng(6)
    noise_flagged = []
    for k, run_dir in enumerate(dirs):
        details = json.loads((run_dir / "eval_details.json").read_text(encoding="utf-8"))
        for entry in details["ood"].values():
            p_in, p_out = rng.uniform(0, 1, 300), rng.beta(0.3, 4, 300)
            entry["pvalues"] = {"combined": {"in": p_in.tolist(), "out": p_out.tolist()}}
        noise_flagged.append(f"{100 * np.mean(p_out < 0.05):.1f}%")  # noise is the last set written
        (run_dir / "eval_details.json").write_text(json.dumps(details), encoding="utf-8")
        metrics = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
        metrics |= {"ood/id/combined/fpr@0.05": 0.048 + k / 100, "ood/mnist/combined/tpr@0.05": 0.9}
        (run_dir / "eval.json").write_text(json.dumps(metrics), encoding="utf-8")
    drawn = _capture_figures(monkeypatch)
    page = build_report(dirs, tmp_path / "r.html").read_text(encoding="utf-8")
    section = page.split('id="pvalues"', 1)[1].split("</section>", 1)[0]
    assert "Flagged at α = 0.05" in section and "How to read" in section
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td></tr>", section)
    # mnist from its eval.json key; noise has none, so it is counted from the p-values themselves
    assert rows == [
        ("simclr · seed 0", "4.8%", "90.0%", noise_flagged[0]),
        ("vi_simsiam · seed 0", "5.8%", "90.0%", noise_flagged[1]),
    ]
    figure = next(fig for fig in drawn if any("combined p-value" in ax.get_xlabel() for ax in fig.axes))
    assert len([ax for ax in figure.axes if ax.get_visible()]) == 4  # two runs x two sets
    assert _collisions(figure) == []
