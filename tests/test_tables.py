"""Tables are computed from eval.json files: per-run rows and seed aggregation (mean ± std)."""

from __future__ import annotations

import json
import statistics

from probssl.cli import main
from probssl.tables import aggregate_seeds, format_table, seed_group


def test_seed_group_strips_only_a_trailing_seed():
    assert seed_group("runs/fm/byol-s2") == "byol"
    assert seed_group("runs/fm/csghmc-T0-s10") == "csghmc-T0"
    assert seed_group("runs/fm/s1-model") == "s1-model"


def test_aggregate_seeds_against_statistics():
    values = [0.81, 0.84, 0.80]
    rows = {f"r/byol-s{i}": {"linear/top1": v} for i, v in enumerate(values)}
    rows["r/simclr-s0"] = {"linear/top1": 0.9}
    rows["r/simclr-s1"] = {}
    table = aggregate_seeds(rows, ["linear/top1"])
    expected = f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
    assert table["byol"] == {"n": "3", "linear/top1": expected}
    assert table["simclr"]["linear/top1"] == "0.9000 ± 0.0000 (n=1)"  # the missing run is visible
    assert "0.8167 ± 0.0208" in format_table(table, ["n", "linear/top1"])


def test_cli_table_by_seed(tmp_path, capsys):
    for seed, acc in enumerate([0.5, 0.7]):
        run = tmp_path / f"m-s{seed}"
        run.mkdir()
        (run / "eval.json").write_text(json.dumps({"linear/top1": acc}))
    assert (
        main(
            ["table", *(str(tmp_path / f"m-s{s}") for s in range(2)), "--by-seed", "--columns", "linear/top1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "0.6000 ± 0.1414" in out and "| " not in out


def test_list_metrics_print_joined_and_average_element_wise():
    from probssl.tables import aggregate_seeds, format_table

    rows = {"a-s0": {"q": [0.5, 0.7], "x": 1.0}, "a-s1": {"q": [0.7, 0.9], "x": 3.0}}
    assert "0.500 / 0.700" in format_table({"a-s0": rows["a-s0"]}, ["q"])
    table = aggregate_seeds(rows, ["q", "x"])
    assert table["a"]["q"] == "0.600 / 0.800"
    assert table["a"]["x"].startswith("2.0000 ± 1.4142")


def test_table_cli_writes_a_generated_section(tmp_path):
    import json

    from probssl.bench.sections import read_section
    from probssl.cli import main

    run = tmp_path / "m-s0"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"linear/top1": 0.5}))
    target = tmp_path / "B.md"
    argv = ["table", str(run), "--columns", "linear/top1", "--update", str(target), "--section", "t"]
    assert main(argv) == 0
    section = read_section(target, "t")
    assert (
        section.startswith(f"Command: `probssl {' '.join(argv)}`")
        and "| linear/top1" in section
        and "0.5000" in section
    )
    assert main(["table", str(run), "--update", str(target)]) == 2  # no --section


def _run(root, name, result=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("method: simclr\n")
    if result is not None:
        (run / "eval.json").write_text(json.dumps(result))
    return run


def test_table_over_a_glob_skips_what_is_not_an_evaluated_run(tmp_path, capsys):
    _run(tmp_path, "simclr", {"linear/top1": 0.9})
    _run(tmp_path, "byol")  # trained, not evaluated yet
    (tmp_path / "report.html").write_text("<html>")  # what `make demo` leaves beside the runs
    (tmp_path / "notes").mkdir()
    glob = sorted(str(p) for p in tmp_path.iterdir())
    assert main(["table", *glob, "--markdown"]) == 0
    captured = capsys.readouterr()
    assert "simclr" in captured.out and "0.9000" in captured.out
    assert "byol" not in captured.out and "report.html" not in captured.out
    assert f"probssl eval {tmp_path / 'byol'}" in captured.err
    assert f"skipped {tmp_path / 'notes'}: not a run directory" in captured.err
    assert "report.html" not in captured.err  # a plain file beside the runs is skipped quietly


def test_table_and_report_fail_when_no_run_is_given(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _run(tmp_path, "byol")
    assert main(["table", str(tmp_path / "empty"), str(tmp_path / "byol")]) == 2
    assert "is an evaluated run directory" in capsys.readouterr().err
    out = tmp_path / "r.html"
    assert main(["report", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ") and not out.exists()
    assert main(["table", str(tmp_path / "missing")]) == 2


def test_an_unknown_column_lists_the_valid_keys(tmp_path, capsys):
    _run(tmp_path, "simclr", {"linear/top1": 0.9, "cal/ece15": 0.01, "config/optim.lr": 0.05})
    assert main(["table", str(tmp_path / "simclr"), "--columns", "ece"]) == 2
    err = capsys.readouterr().err
    assert (
        "no run has a metric 'ece'" in err
        and "cal/ece15" in err
        and "valid keys: linear/top1, cal/ece15" in err
    )
    assert "config/" not in err


def test_table_reads_where_a_run_trained(tmp_path, capsys):
    """The one reader of results adds train_summary.json's precision and processor (meta/train_*)."""
    run = _run(tmp_path, "simclr-s0", {"linear/top1": 0.9})
    (run / "train_summary.json").write_text(json.dumps({"precision": "bf16", "processor": "AMD EPYC"}))
    columns = "linear/top1,meta/train_precision,meta/train_processor"
    assert main(["table", str(run), "--columns", columns]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[1:] == ["0.9000", "bf16", "AMD", "EPYC"]
