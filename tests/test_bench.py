"""The benchmark harness: suite budgets, generated BENCHMARKS.md sections, quality and speed runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from probssl import run_lock
from probssl.bench import catalogue, suites, tables
from probssl.bench.sections import SectionError, check_markers, read_section, replace_section
from probssl.bench.speed import Arm, run_speed_benchmark, speed_markdown
from probssl.cli import main
from probssl.config import ConfigError, method_config
from probssl.methods import METHODS

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("name", "config", "changed"),
    [
        ("fashion_mnist", "fashion_mnist", {}),
        ("cifar10", "cifar10_cpu", {}),
        # the GPU budget on the JPEG copy: the official files are not in the shared data
        ("cifar10_gpu", "cifar10", {"data": {"dataset": "cifar10_jpeg"}}),
        ("lam_fmnist", "lam_fmnist", {}),
        ("cifar10_budget", "cifar10_budget", {}),
    ],
)
def test_suite_budgets_match_the_documented_configs(name, config, changed):
    """The bundled YAML (src/probssl/configs/) documents each budget; the harness must train exactly that."""
    documented = yaml.safe_load((REPO / "src" / "probssl" / "configs" / f"{config}.yaml").read_text())
    documented["train"].pop("keep_checkpoints", None)  # where checkpoints go, not what is computed
    documented.pop("method", None), documented.pop("method_args", None)  # the arms set the method
    assert catalogue.SUITES[name].budget == {**documented, **changed}


def test_cifar10_suite_tables_carry_the_issue19_columns_and_the_jpeg_note():
    suite = catalogue.SUITES["cifar10"]
    titles = [title for title, _ in suite.tables()]
    assert titles[:3] == ["Accuracy", "Uncertainty", "OOD detection (AUROC)"]
    assert titles[3].startswith("The combined detector")
    assert titles[4].startswith("Own uncertainty against the deterministic references")
    assert titles[5].startswith("Trends of the uncertainty")
    assert titles[6].startswith("Cost")
    columns = suite.columns()
    assert len(columns) == len(set(columns))
    for name in ("tiny_imagenet_val", "mnist", "noise"):
        assert {f"ood/{name}/{s}/auroc" for s in ("msp", "best_feature", "emb")} <= set(columns)
    # MNIST and noise are both far OOD for CIFAR-10: their mean is a column; near holds one set only
    assert suite.ood_groups() == ["far"] and "ood/far/best_feature/auroc" in columns
    assert not any(c.startswith("ood/near/") for c in columns)
    for key in (
        "sel/err_auroc",
        "sel/emb/err_auroc",
        "ret/r_auroc",
        "sel/crop_up",
        "transfer/eurosat_test/top1",
        "vs/ood/tiny_imagenet_val/own-knn1",
        "vs/ood/mnist/bma-knn1",
        "vs/ood/mnist/mi-knn1",
        "vs/sel/own-knn1",
    ):
        assert key in columns
    assert "JPEG" in suite.note and "not comparable digit for digit" in suite.note
    # the ensemble runs seed 0 only; every other arm every seed
    assert suite.runs("lam_ensemble", 0) and not suite.runs("lam_ensemble", 1) and suite.runs("simclr", 2)


def test_max_seeds_caps_an_arm_and_the_tables_are_split(tmp_path, monkeypatch):
    """A capped arm is not run beyond its seeds; the markdown has one table per group, seeds shown."""
    suite = catalogue.Suite(
        "capped", {"data": {"dataset": "digits"}}, ("noise",), "n", ("mnist",), max_seeds={"byol": 1}
    )
    monkeypatch.setitem(catalogue.SUITES, "capped", suite)
    calls = []

    def fake(suite, arm, seed, out, data_dir, progress):
        calls.append((arm.name, seed))
        run = catalogue.run_dir_for(out, suite.name, arm.name, seed)
        run.mkdir(parents=True)
        metrics = {"linear/top1": 0.5 + seed / 10, "ood/noise/best_feature/auroc": 0.9, "sel/crop_up": 0.25}
        (run / "eval.json").write_text(json.dumps(metrics))
        return metrics

    monkeypatch.setattr(suites, "train_and_evaluate", fake)
    from probssl.eval import report

    monkeypatch.setattr(report, "build_report", lambda *a, **k: None)
    results = suites.run_quality_benchmark(
        "capped", tmp_path, seeds=2, only=["simclr", "byol"], progress=False
    )
    assert sorted(calls) == [("byol", 0), ("simclr", 0), ("simclr", 1)]
    text = tables.results_markdown(results)
    titles = [line for line in text.splitlines() if line.startswith("**")]
    assert titles == ["**Accuracy**", "**Uncertainty**", "**OOD detection (AUROC)**"]
    assert text.count("| arm | seeds |") == 3
    assert "| simclr | 2 | 0.5500 ± 0.0707 |" in text and "| byol | 1 | 0.5000 |" in text
    assert "transfer/mnist/top1" not in text  # no arm has it: the column is left out


def test_sections_are_appended_then_replaced_in_place(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# Benchmarks\n\nprose before\n")
    replace_section(path, "speed-cpu", "table v1", heading="## Speed")
    replace_section(path, "quality-digits", "digits v1")
    replace_section(path, "speed-cpu", "table v2\nsecond line")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nprose before\n")
    assert text.count("## Speed") == 1 and "table v1" not in text
    assert read_section(path, "speed-cpu") == "table v2\nsecond line"
    assert read_section(path, "quality-digits") == "digits v1"
    assert text.index("table v2") < text.index("digits v1")  # replaced where it was
    assert read_section(path, "missing") is None


def test_a_section_without_its_end_marker_is_refused(tmp_path):
    path = tmp_path / "B.md"
    replace_section(path, "x", "body")
    path.write_text(path.read_text().replace("<!-- bench:x end -->", ""))
    with pytest.raises(ValueError, match="no end marker"):
        replace_section(path, "x", "new")
    with pytest.raises(ValueError, match="section name"):
        replace_section(path, "bad name", "body")


@pytest.mark.parametrize(
    "damage,message",
    [
        # the BENCHMARKS.md accident: the end marker of one section swallowed the prose after it
        (lambda t: t.replace("<!-- bench:a end -->\n\n", "<!-- bench:"), "malformed"),
        (lambda t: t.replace("<!-- bench:a end -->", ""), "'a' has no end marker before line"),
        (lambda t: t.replace("<!-- bench:b end -->", ""), "'b' has no end marker"),
        (lambda t: t.replace("<!-- bench:b start (generated; do not edit) -->", ""), "without its start"),
    ],
)
def test_unbalanced_markers_anywhere_refuse_every_update(tmp_path, damage, message):
    path = tmp_path / "B.md"
    replace_section(path, "a", "table a")
    path.write_text(path.read_text() + "\nReading of a.\n")
    replace_section(path, "b", "table b")
    damaged = damage(path.read_text())
    path.write_text(damaged)
    for name in ("a", "b", "c"):  # whichever section is updated, the file is left as it was
        with pytest.raises(SectionError, match=message):
            replace_section(path, name, "new")
        assert path.read_text() == damaged


def test_the_repository_benchmarks_file_has_balanced_markers():
    from pathlib import Path

    check_markers((Path(__file__).parents[1] / "BENCHMARKS.md").read_text(), "BENCHMARKS.md")


@pytest.fixture
def tiny_suite(monkeypatch):
    budget = {
        "backbone": "convnet",
        "backbone_args": {"width": 8},
        "data": {"dataset": "digits", "subset": 128},
        "train": {"epochs": 1, "batch_size": 32, "deterministic": True, "tensorboard": False},
        "optim": {"name": "sgd", "lr": 0.05, "warmup_epochs": 0},
    }
    tiny = catalogue.Suite("tiny", budget, ("noise",), "a test suite")
    monkeypatch.setitem(catalogue.SUITES, "tiny", tiny)
    # The full evaluation is the expensive part: the basic one exercises the same harness.
    from probssl.eval import evaluate

    real = evaluate.evaluate_run
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: real(*a, **{**k, "suite_name": "basic"}))
    return tiny


def test_quality_benchmark_runs_arms_over_seeds_and_summarises(tiny_suite, tmp_path):
    out = tmp_path / "bench"
    bench_md = tmp_path / "BENCHMARKS.md"
    results = suites.run_quality_benchmark(
        "tiny", out, seeds=2, only=["simclr", "lam_online"], update=bench_md, progress=False, command="cmd"
    )
    assert set(results["runs"]) == {"simclr", "lam_online"} and not results["failures"]
    for arm in ("simclr", "lam_online"):
        values = [results["runs"][arm][s]["linear/top1"] for s in ("0", "1")]
        cell = results["summary"][arm]["linear/top1"]
        assert cell["n"] == 2 and cell["mean"] == pytest.approx(sum(values) / 2)
        assert cell["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert results["runs"]["lam_online"]["0"]["meta/method"] == "lam"
    saved = json.loads((out / "tiny" / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(results["summary"]))
    assert (out / "tiny" / "report.html").is_file()
    section = read_section(bench_md, "quality-tiny")
    assert "Command: `cmd`" in section and "| lam_online | 2 |" in section

    # A second invocation trains nothing (finished runs are kept) and reproduces the table.
    model = out / "tiny" / "simclr-s0" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    again = suites.run_quality_benchmark("tiny", out, seeds=2, only=["simclr", "lam_online"], progress=False)
    assert model.stat().st_mtime_ns == stamp
    assert again["summary"] == results["summary"]
    # An invocation for one arm still tabulates every finished run of the suite.
    one = suites.run_quality_benchmark("tiny", out, seeds=1, only=["simclr"], progress=False)
    assert one["summary"] == results["summary"] and set(one["runs"]["lam_online"]) == {"0", "1"}
    rebuilt = suites.run_quality_benchmark("tiny", out, table_only=True, progress=False)
    assert rebuilt["summary"] == results["summary"] and not rebuilt["wall_seconds_this_invocation"]

    # Where the runs trained is under the tables; a run from another machine / precision is named.
    from probssl.machine import cpu_name

    assert f"Trained: all 4 runs at fp32 on {cpu_name()}." in section
    summary_path = out / "tiny" / "simclr-s1" / "train_summary.json"
    moved = json.loads(summary_path.read_text()) | {"precision": "bf16", "processor": "Other CPU"}
    summary_path.write_text(json.dumps(moved))
    mixed = tables.results_markdown(
        suites.run_quality_benchmark("tiny", out, table_only=True, progress=False)
    )
    assert "**Trained on mixed machines or precisions**" in mixed
    assert f"3 runs at fp32 on {cpu_name()}; 1 at bf16 on Other CPU (simclr-s1)." in mixed


def test_table_only_without_finished_runs_is_refused_and_writes_nothing(tiny_suite, tmp_path):
    # before: an empty results.md / results.json, exit 0, and --update published an empty section
    bench_md = tmp_path / "BENCHMARKS.md"
    bench_md.write_text("# Benchmarks\n")
    refused = r"--table-only: no evaluated run of suite tiny under .*check --out"
    with pytest.raises(ConfigError, match=refused):
        suites.run_quality_benchmark("tiny", tmp_path / "bench", table_only=True, update=bench_md)
    assert not (tmp_path / "bench").exists() and bench_md.read_text() == "# Benchmarks\n"


def test_a_failing_arm_is_recorded_and_the_others_still_run(tiny_suite, tmp_path, monkeypatch):
    real = suites.train_and_evaluate

    def flaky(suite, arm, seed, out, data_dir, progress):
        if arm.name == "simclr":
            raise RuntimeError("boom")
        return real(suite, arm, seed, out, data_dir, progress)

    monkeypatch.setattr(suites, "train_and_evaluate", flaky)
    results = suites.run_quality_benchmark("tiny", tmp_path, seeds=1, only=["simclr", "byol"], progress=False)
    assert results["failures"] == {"simclr-s0": "RuntimeError: boom"}
    assert set(results["runs"]) == {"byol"} and "simclr-s0 failed" in tables.results_markdown(results)


def test_unknown_suite_arm_or_seed_count_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown benchmark suite"):
        suites.run_quality_benchmark("imagenet", tmp_path)
    with pytest.raises(ConfigError, match="unknown arm"):
        suites.run_quality_benchmark("digits", tmp_path, only=["resnet"])
    with pytest.raises(ConfigError, match="seeds"):
        suites.run_quality_benchmark("digits", tmp_path, seeds=0)
    assert main(["bench", "imagenet", "--out", str(tmp_path)]) == 2


def test_speed_benchmark_compares_each_arm_with_its_base(tmp_path):
    arms = (Arm("simclr", "simclr"), Arm("scl", "scl", (), "simclr", 1.1))
    overrides = ["data.dataset=digits", "backbone=convnet", "backbone.width=8", "train.batch_size=16"]
    result = run_speed_benchmark(None, overrides, arms=arms, repeats=2, steps=1, warmup=1, samples=(1, 4))
    rows = {r["arm"]: r for r in result["rows"]}
    assert rows["simclr"]["ratio_to_base"] is None
    scl = rows["scl"]
    assert scl["ratio_to_base"] == pytest.approx(scl["step_ms"] / rows["simclr"]["step_ms"])
    assert scl["meets_goal"] == (scl["ratio_to_base"] <= 1.1)
    assert len(scl["step_ms_all"]) == 2 and scl["memory_mib"] > 0
    assert set(scl["embed_ms"]) == {"1", "4"} and result["floor_step_ms"] > 0
    table = speed_markdown(result)
    assert "| scl |" in table and "vs simclr" in table and "Backbone floor" in table
    aug = result["augment"]  # the issue-21 entry: the SimCLR step against the backbone's own work
    assert aug["arm"] == "simclr" and aug["step_ms"] == rows["simclr"]["step_ms"]
    assert aug["ratio"] == pytest.approx(aug["step_ms"] / aug["backbone_ms"])
    assert aug["meets_goal"] == (aug["ratio"] <= aug["goal"])
    assert aug["augment_ms"] > 0 and aug["augment_kornia_ms"] > 0
    assert f"| simclr | {aug['augment_ms']:.1f} (kornia ops" in table
    assert result["protocol"]["precision_resolved"] == "fp32"  # auto on the CPU, PROBSSL_CPU_BF16=0


def test_bench_speed_cli_writes_json_and_updates_the_file(tmp_path):
    bench_md = tmp_path / "B.md"
    code = main(
        [
            "bench", "speed", "--out", str(tmp_path), "--arms", "scl", "--repeats", "1", "--steps", "1",
            "--update", str(bench_md), "--no-progress", "--command-line", "probssl bench speed (test)",
            "data.dataset=digits", "backbone=convnet", "backbone.width=8", "train.batch_size=16",
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads((tmp_path / "speed-cpu-digits-convnet.json").read_text())
    assert [r["arm"] for r in result["rows"]] == ["simclr", "scl"]  # the base comes along
    section = read_section(bench_md, "speed-cpu-digits-convnet")
    assert "probssl bench speed (test)" in section
    assert main(["bench", "speed", "--out", str(tmp_path), "--arms", "nope"]) == 2

    # --table-only republishes the saved result (same command line, same table), timing nothing.
    bench_md.write_text("# other\n")
    assert main(["bench", "speed", "--out", str(tmp_path), "--table-only", "--update", str(bench_md)]) == 0
    assert read_section(bench_md, "speed-cpu-digits-convnet") == section
    assert main(["bench", "speed", "--out", str(tmp_path / "empty"), "--table-only"]) == 2


def test_eval_memory_benchmark_reports_bank_and_overhead(tmp_path):
    from probssl.bench.eval_memory import eval_memory_markdown, measure_eval_memory

    row = measure_eval_memory(items=600, test_items=200, samples=3, dim=16)
    assert row["bank_mib"] == pytest.approx(3 * 800 * 16 * 4 / 2**20)
    assert row["peak_rss_mib"] >= row["baseline_rss_mib"] > 0
    assert "| 600 | 200 | 3 | 16 | no |" in eval_memory_markdown([row])


def test_sweep_arms_are_valid_configs():
    """Every arm (default and sweep) builds a valid config for every suite: no typo in an override."""
    for suite in catalogue.SUITES.values():
        for arm in catalogue.all_shared_arms():
            cfg = suites._arm_config(suite, arm, seed=1, data_dir=None)
            assert cfg.method == arm.method and cfg.train.seed == 1
            method_config(METHODS.get(arm.method).config_class, cfg.method_args, arm.method)  # keys, types
    names = [a.name for a in catalogue.all_shared_arms()]
    assert len(names) == len(set(names))
    assert {"scl_beta1e-3", "scl_bits1024", "lam_online_full_arccos"} <= set(names)


@pytest.mark.parametrize(
    ("alias", "overrides"),
    [
        ("scl_beta1e-4", ("method.kl_weight=1e-4",)),
        (
            "lam_online_pos_euclidean",
            ("method.posterior=online", "method.variant=pos", "method.output_space=euclidean"),
        ),
    ],
)
def test_a_sweep_alias_is_exactly_its_default_arm(alias, overrides):
    """The sweep point the alias stands for builds the same method config as the arm it names."""
    arm = next(a for a in catalogue.all_shared_arms() if a.name == catalogue.SWEEP_ALIASES[alias])
    spelled_out = catalogue.QualityArm(alias, arm.method, overrides)
    suite = catalogue.SUITES["fashion_mnist"]

    def resolved(a):
        cfg = suites._arm_config(suite, a, seed=0, data_dir=None)
        return method_config(METHODS.get(a.method).config_class, cfg.method_args, a.method)

    assert resolved(arm) == resolved(spelled_out)
    assert alias not in {a.name for a in catalogue.all_shared_arms()}


def test_the_same_command_and_seed_reproduce_the_table(tiny_suite, tmp_path):
    """Two fresh output directories, same suite, arm and seed: identical metrics (CPU, deterministic)."""
    a = suites.run_quality_benchmark("tiny", tmp_path / "a", seeds=1, only=["lam_online"], progress=False)
    b = suites.run_quality_benchmark("tiny", tmp_path / "b", seeds=1, only=["lam_online"], progress=False)
    from probssl.eval.evaluate import TIMING_KEYS

    # timings (with the CPU ratio the tables derive, absent when training took < 1 s), paths
    timings = (*TIMING_KEYS, "meta/eval_cpu_to_train")
    drop = (*timings, "config/data.data_dir")
    ra = {k: v for k, v in a["runs"]["lam_online"]["0"].items() if not k.startswith(drop)}
    rb = {k: v for k, v in b["runs"]["lam_online"]["0"].items() if not k.startswith(drop)}
    assert ra == rb

    def measured(summary):
        return {
            arm: {k: v for k, v in cells.items() if not k.startswith(timings)}
            for arm, cells in summary.items()
        }

    assert measured(a["summary"]) == measured(b["summary"])


def _hold_lock(run_dir):
    """A live process holding the run's lock (as a training worker does), ready when it says so."""
    import subprocess
    import sys

    code = (
        "import sys, time; from pathlib import Path; from probssl import run_lock\n"
        "with run_lock.run_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(60)"
    )
    owner = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert owner.stdout.readline().strip() == "held"
    return owner


def test_run_lock_refuses_a_live_owner_and_takes_over_a_dead_one(tmp_path):
    import os

    run_dir = tmp_path / "simclr-s0"
    with run_lock.run_lock(run_dir):
        assert (run_dir / ".bench.lock").read_text() == str(os.getpid())
    assert not (run_dir / ".bench.lock").exists()  # released

    owner = _hold_lock(run_dir)
    try:
        with pytest.raises(run_lock.RunBusy, match=str(owner.pid)), run_lock.run_lock(run_dir):
            pass
        assert (run_dir / ".bench.lock").read_text() == str(owner.pid)  # a live owner's lock is kept
    finally:
        owner.kill()  # SIGKILL: no cleanup runs, the file stays behind
        owner.wait()
    assert (run_dir / ".bench.lock").is_file()
    with run_lock.run_lock(run_dir):  # its owner died: the kernel dropped the lock, the run is taken over
        assert (run_dir / ".bench.lock").read_text() == str(os.getpid())

    # a leftover file naming a live process that does not hold the lock (a recycled pid) blocks nothing
    (run_dir / ".bench.lock").write_text(str(os.getppid()))
    with run_lock.run_lock(run_dir):
        assert (run_dir / ".bench.lock").read_text() == str(os.getpid())
    assert not (run_dir / ".bench.lock").exists()


def test_parallel_invocations_split_seeds_and_skip_held_runs(tiny_suite, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    second = suites.run_quality_benchmark("tiny", out, seeds=1, first_seed=1, only=["simclr"], progress=False)
    assert set(second["runs"]["simclr"]) == {"1"} and second["seeds_this_invocation"] == [1]
    assert not (out / "tiny" / "simclr-s0").exists()

    # seed 0 is held by another live process: skipped, neither trained nor a failure.
    held = out / "tiny" / "simclr-s0"
    owner = _hold_lock(held)
    try:
        both = suites.run_quality_benchmark("tiny", out, seeds=2, only=["simclr"], progress=False)
    finally:
        owner.kill()
        owner.wait()
    assert both["busy_this_invocation"] == ["simclr-s0"] and not both["failures"]
    assert set(both["runs"]["simclr"]) == {"1"} and not (held / "config.yaml").exists()
    with pytest.raises(ConfigError, match="first-seed"):
        suites.run_quality_benchmark("tiny", out, first_seed=-1)


def test_jobs_share_a_suite_between_worker_processes(tmp_path):
    """`--jobs 2`: two worker processes split the runs (locks), the parent writes one table."""
    bench_md = tmp_path / "B.md"
    out = tmp_path / "bench"
    code = main(
        [
            "bench", "digits", "--out", str(out), "--arms", "pixels", "--seeds", "2", "--jobs", "2",
            "--no-progress", "--update", str(bench_md), "--command-line", "probssl bench digits --jobs 2",
        ]
    )  # fmt: skip
    assert code == 0
    for seed in (0, 1):
        run = out / "digits" / f"pixels-s{seed}"
        assert (run / "eval.json").is_file() and not (run / ".bench.lock").exists()
    results = json.loads((out / "digits" / "results.json").read_text())
    assert results["summary"]["pixels"]["linear/top1"]["n"] == 2 and not results["failures"]
    reports = [json.loads((out / "digits" / ".workers" / f"{k}.json").read_text()) for k in (0, 1)]
    assert all(not r["failures"] for r in reports)
    assert "| pixels | 2 |" in read_section(bench_md, "quality-digits")
    with pytest.raises(ConfigError, match="jobs"):
        from probssl.bench.parallel import run_parallel_benchmark

        run_parallel_benchmark("digits", out, jobs=1)


def test_learning_curve_trains_once_and_evaluates_the_kept_checkpoints(tiny_suite, tmp_path, monkeypatch):
    """`probssl bench SUITE --curve`: one run, checkpoints at the asked epochs evaluated, pixels as floor."""
    from probssl.bench import curve

    monkeypatch.setitem(tiny_suite.budget, "train", {**tiny_suite.budget["train"], "epochs": 3})
    out, bench_md = tmp_path / "bench", tmp_path / "B.md"
    code = main(
        [
            "bench", "tiny", "--curve", "3,1", "--out", str(out), "--no-progress", "--update", str(bench_md),
            "--command-line", "probssl bench tiny --curve 1,3",
        ]
    )  # fmt: skip
    assert code == 0
    result = json.loads((out / "tiny" / "curve" / "curve.json").read_text())
    run = out / "tiny" / "curve" / "simclr-s0"
    summary = json.loads((run / "train_summary.json").read_text())
    steps_per_epoch = 128 // 32  # subset 128, batch 32, last incomplete batch dropped
    assert [p["epochs"] for p in result["points"]] == [1, 3]
    for point in result["points"]:
        saved = json.loads((run / f"eval_step{point['step']}.json").read_text())
        assert point["step"] == point["epochs"] * steps_per_epoch and saved["meta/step"] == point["step"]
        assert point["knn/top1"] == saved["knn/top1"] and point["linear/top1"] == saved["linear/top1"]
        assert point["train_minutes"] == pytest.approx(summary["seconds_per_epoch"] * point["epochs"] / 60)
    pixels = json.loads((out / "tiny" / "curve" / "pixels-s0" / "eval.json").read_text())
    assert result["pixels"]["linear/top1"] == pixels["linear/top1"]
    section = read_section(bench_md, "curve-tiny")
    assert "| raw pixels | 0 |" in section and "probssl bench tiny --curve 1,3" in section

    model = run / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    again = curve.learning_curve("tiny", out, [1, 3], progress=False)  # nothing retrained or re-evaluated
    assert model.stat().st_mtime_ns == stamp and again["points"] == result["points"]
    for bad in ("0,1", "4", "a,b"):
        with pytest.raises(ConfigError, match="--curve"):
            curve.parse_epochs(bad, tiny_suite)
    with pytest.raises(ConfigError, match="raw pixels"):
        curve.learning_curve("tiny", out, [1], arm_name="pixels")
    assert main(["bench", "tiny", "--curve", "1", "--arms", "simclr,byol", "--out", str(out)]) == 2


def test_curve_reading_compares_the_last_point_with_the_field_and_pixels():
    result = {
        "arm": "simclr",
        "seed": 0,
        "points": [
            {"epochs": 10, "train_minutes": 4.0, "knn/top1": 0.61, "linear/top1": 0.64},
            {"epochs": 30, "train_minutes": 12.0, "knn/top1": 0.70, "linear/top1": None},
        ],
        "pixels": {"knn/top1": 0.35, "linear/top1": 0.40},
        "field": [{"key": "knn/top1", "what": "SimCLR kNN", "value": 0.85}],
    }
    from probssl.bench.curve import curve_markdown

    text = curve_markdown(result, 30)
    assert "| 10 | 4.0 | 0.6100 | 0.6400 |" in text and "| 30 | 12.0 | 0.7000 | – |" in text
    assert "| raw pixels | 0 | 0.3500 | 0.4000 |" in text
    assert (
        f"{0.70 - 0.85:+.4f} against the field's 0.85" in text and f"{0.70 - 0.35:+.4f} against raw" in text
    )
    assert "linear/top1 at" not in text  # no field figure given for it here


def test_own_uncertainty_is_compared_with_the_references_paired_within_each_run():
    """``vs/...`` keys are differences inside one run (own − kNN distance, BMA − point estimate, own −
    probe entropy); seeds average the differences, so their ± std is the paired one; arms without an
    own uncertainty have no row in that table; a difference needs both of its scores."""
    import statistics

    runs = [
        {
            "ood/mnist/emb/auroc": own,
            "ood/mnist/knn1/auroc": knn,
            "ood/mnist/knn1_bma/auroc": knn + 0.01,
            "ood/mnist/mi/auroc": knn - 0.02,
            "ood/noise/emb/auroc": 0.7,  # no knn1 score for noise: no difference
            "sel/emb/err_auroc": 0.70,
            "sel/knn1/err_auroc": 0.65,
            "sel/err_auroc": 0.80,
        }
        for own, knn in ((0.60, 0.90), (0.75, 0.95), (0.62, 0.80))
    ]
    differences = [tables.paired_comparisons(run) for run in runs]
    assert set(differences[0]) == {
        "vs/ood/mnist/own-knn1",
        "vs/ood/mnist/bma-knn1",
        "vs/ood/mnist/mi-knn1",
        "vs/sel/own-knn1",
        "vs/sel/own-entropy",
    }
    assert differences[0]["vs/ood/mnist/own-knn1"] == pytest.approx(-0.30)
    assert differences[0]["vs/ood/mnist/mi-knn1"] == pytest.approx(-0.02)
    assert differences[0]["vs/ood/mnist/bma-knn1"] == pytest.approx(0.01)
    assert differences[0]["vs/sel/own-knn1"] == pytest.approx(0.05)
    assert differences[0]["vs/sel/own-entropy"] == pytest.approx(-0.10)

    suite = catalogue.SUITES["fashion_mnist"]
    by_arm = {
        "csghmc": {s: run | d for s, (run, d) in enumerate(zip(runs, differences, strict=True))},
        "simclr": {0: {}},
    }
    summary = tables.summarise(by_arm, suite.columns())
    paired = [own - knn for own, knn in ((0.60, 0.90), (0.75, 0.95), (0.62, 0.80))]
    cell = summary["csghmc"]["vs/ood/mnist/own-knn1"]
    assert cell["mean"] == pytest.approx(statistics.fmean(paired))
    assert cell["std"] == pytest.approx(statistics.stdev(paired))
    text = tables.results_markdown(
        {
            "tables": suite.tables(),
            "summary": summary,
            "runs": {"csghmc": by_arm["csghmc"], "simclr": {0: {}}},
        }
    )
    versus = text.split("**Own uncertainty")[1].split("\n\n**")[0]
    row = f"| csghmc | 3 | {statistics.fmean(paired):.4f} ± {statistics.stdev(paired):.4f} |"
    assert row in versus and "| simclr |" not in versus


def test_each_probabilistic_arm_is_set_against_its_deterministic_base():
    """arm − base per column: the difference of seed means and Welch's standard error
    √(s²ₐ/nₐ + s²_b/n_b), None with one seed on either side; a base itself has no row."""
    import statistics

    seeds = {"byol": [0.80, 0.82, 0.81], "csghmc": [0.83, 0.86, 0.84], "prosmin": [0.79]}
    runs = {arm: {s: {"linear/top1": v} for s, v in enumerate(values)} for arm, values in seeds.items()}
    runs["simclr"] = {0: {"linear/top1": 0.9}, 1: {"linear/top1": 0.91}}
    columns = ("linear/top1", "cal/ece15")
    comparisons = [tables.BaseComparison.same(key) for key in columns]
    table = tables.against_base(tables.summarise(runs, columns), catalogue.all_shared_arms(), comparisons)
    assert set(table) == {"csghmc", "prosmin"}  # scl's base (simclr) is here, scl is not; bases have no row
    a, b = seeds["csghmc"], seeds["byol"]
    cell = table["csghmc"]["linear/top1"]
    assert cell["diff"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    assert cell["se"] == pytest.approx((statistics.variance(a) / 3 + statistics.variance(b) / 3) ** 0.5)
    assert table["prosmin"]["linear/top1"]["se"] is None and "cal/ece15" not in table["csghmc"]
    for suite in catalogue.SUITES.values():  # the runner summarises the tables' columns once and reuses them
        compared = tables.AGAINST_BASE + tables.base_ood_columns(suite)
        assert {key for c in compared for key in (c.arm_key, c.base_key)} <= set(suite.columns())
    text = tables.against_base_markdown(table, {"csghmc": "byol", "prosmin": "byol"})
    assert f"| csghmc | byol | {cell['diff']:+.4f} ± {cell['se']:.4f} |" in text
    assert f"| prosmin | byol | {0.79 - statistics.fmean(b):+.4f} |" in text


def test_own_uncertainty_is_set_against_the_base_reference_detector():
    """The cross column: the arm's own score (``emb``) minus the *base's* ``best_feature`` AUROC, seed
    means and Welch's standard error — "train the posterior, or the base and a kNN detector?"."""
    import statistics

    own, reference = [0.60, 0.66, 0.63], [0.97, 0.98, 0.975]
    runs = {
        "csghmc": {
            s: {"ood/mnist/emb/auroc": v, "ood/mnist/best_feature/auroc": 0.9} for s, v in enumerate(own)
        },
        "byol": {s: {"ood/mnist/best_feature/auroc": v} for s, v in enumerate(reference)},
    }
    suite = catalogue.SUITES["fashion_mnist"]
    comparisons = tables.base_ood_columns(suite)
    keys = {key for c in comparisons for key in (c.arm_key, c.base_key)}
    summary = tables.summarise(runs, sorted(keys))
    table = tables.against_base(summary, catalogue.all_shared_arms(), comparisons)
    cell = table["csghmc"]["ood/mnist/own-base_best_feature"]
    assert cell["diff"] == pytest.approx(statistics.fmean(own) - statistics.fmean(reference))
    se = (statistics.variance(own) / 3 + statistics.variance(reference) / 3) ** 0.5
    assert cell["se"] == pytest.approx(se)
    same = table["csghmc"]["ood/mnist/best_feature/auroc"]  # each side's features as a detector
    assert same["diff"] == pytest.approx(0.9 - statistics.fmean(reference))


def test_evaluation_cpu_sums_the_stages_and_divides_by_the_training_wall():
    run = {
        "meta/eval_cpu_seconds/features": 2.0,
        "meta/eval_cpu_seconds/probes": 3.5,
        "meta/train_seconds": 50.0,
    }
    assert tables.evaluation_cpu(run) == {"meta/eval_cpu_seconds": 5.5, "meta/eval_cpu_to_train": 0.11}
    assert tables.evaluation_cpu(run | {"meta/train_seconds": 0.2}) == {
        "meta/eval_cpu_seconds": 5.5
    }  # pixels
    assert tables.evaluation_cpu({"meta/train_seconds": 50.0}) == {}  # evaluated before stages were timed
    assert "meta/eval_cpu_to_train" in catalogue.SUITES["fashion_mnist"].columns()


def test_uncertainty_trends_are_rank_correlations_over_bins_and_severities():
    """Spearman over five points, checked against the closed form 1 − 6Σd²/(n(n² − 1)) for untied
    ranks; the rise is severity 5 over severity 1; a constant or missing sequence gives no key."""

    from probssl.eval.suite import SEVERITIES

    def closed_form(values: list[float]) -> float:
        order = sorted(range(len(values)), key=values.__getitem__)
        ranks = [0] * len(values)
        for rank, index in enumerate(order):
            ranks[index] = rank
        n = len(values)
        return 1 - 6 * sum((i - r) ** 2 for i, r in enumerate(ranks)) / (n * (n * n - 1))

    own_bins = [0.59, 0.50, 0.52, 0.51, 0.47]  # falls, not monotonically
    severities = [0.0019, 0.0021, 0.0020, 0.0024, 0.0030]
    run = {
        "sel/emb/acc_by_quantile": own_bins,
        "sel/acc_by_quantile": [0.88, 0.68, 0.56, 0.45, 0.36],
        **{f"shift/severity{s}/emb_uncertainty": u for s, u in zip(SEVERITIES, severities, strict=True)},
    }
    trends = tables.uncertainty_trends(run)
    assert trends["trend/acc_by_own_unc"] == pytest.approx(closed_form(own_bins)) == pytest.approx(-0.7)
    assert trends["trend/acc_by_entropy"] == pytest.approx(-1.0)
    assert trends["trend/own_unc_by_severity"] == pytest.approx(closed_form(severities)) == pytest.approx(0.9)
    assert trends["trend/own_unc_rise"] == pytest.approx(0.0030 / 0.0019 - 1)

    deterministic = {"sel/acc_by_quantile": [0.5] * 5, "sel/emb/acc_by_quantile": [0.9, None, 0.5, 0.4, 0.3]}
    assert tables.uncertainty_trends(deterministic) == {}

    suite = catalogue.SUITES["cifar10"]
    assert "trend/own_unc_by_severity" in suite.columns()


@pytest.mark.parametrize("n", [10_000, 9_999, 12_345])
def test_a_constant_uncertainty_has_no_trend(n):
    """Issue 28's reproducer: a constant uncertainty's five bins differed in the 16th digit and the
    Spearman read −0.359 (±0.264 at other sizes) into float rounding; exact bins give no key."""
    import torch

    from probssl.eval.selective import accuracy_by_quantile

    correct = torch.arange(n) < round(0.9123 * n)
    bins = accuracy_by_quantile(torch.full((n,), 0.3), correct)
    assert tables.uncertainty_trends({"sel/emb/acc_by_quantile": bins}) == {}


def test_a_two_valued_uncertainty_has_the_exact_tie_aware_trend():
    """5,000 samples at uncertainty 0 (all correct), 5,000 at 1 (4,123 correct): exact bins 1, 1, 0.9123,
    0.8246, 0.8246, whose tie-aware Spearman is −0.949 (−0.872 when the tied bins differed by ulps).
    Reference: scipy on the exact bins scaled to integers (10,000 · bin), so no float ever enters it."""
    import torch
    from scipy.stats import spearmanr

    from probssl.eval.selective import accuracy_by_quantile

    uncertainty = torch.cat([torch.zeros(5000), torch.ones(5000)])
    bins = accuracy_by_quantile(uncertainty, torch.arange(10_000) < 9123)
    exact = spearmanr(range(5), [10_000, 10_000, 9_123, 8_246, 8_246]).statistic
    trend = tables.uncertainty_trends({"sel/emb/acc_by_quantile": bins})["trend/acc_by_own_unc"]
    assert trend == pytest.approx(exact, abs=1e-12)
    assert round(exact, 3) == -0.949


def test_a_suite_with_arms_of_its_own_runs_them_supervised_and_reads_them_against_the_paper(
    tiny_suite, tmp_path, monkeypatch
):
    """lam_fmnist's shape: its own (label-trained LAM) arms replace the shared ones, every row is
    marked supervised, and the authors' figures come first with ours beside them."""
    labelled = catalogue.QualityArm(
        "lam_deterministic",
        "lam",
        ("method.pairs=labels", "method.images_per_class=4", "method.posterior=none"),
    )
    online = catalogue.QualityArm(
        "lam_online",
        "lam",
        ("method.pairs=labels", "method.images_per_class=4", "method.max_pairs=200"),
        base="lam_deterministic",
    )
    paper = (("knn/top1@20", "lam_online", 0.81),)  # the test's evaluation is the basic one
    budget = {**tiny_suite.budget, "train": {**tiny_suite.budget["train"], "batch_size": 40}}
    own = catalogue.Suite("own", budget, ("noise",), "n", arms=(labelled, online), paper=paper)
    monkeypatch.setitem(catalogue.SUITES, "own", own)
    assert catalogue.resolve_arms(None, own) == (labelled, online)
    with pytest.raises(ConfigError, match=r"choose from \['lam_deterministic', 'lam_online'\]"):
        catalogue.resolve_arms(["simclr"], own)
    shared = catalogue.resolve_arms(None, catalogue.SUITES["cifar10"])
    assert shared == catalogue.shared_arms() == catalogue.ARMS  # the shared ones elsewhere
    assert [a.name for a in catalogue.resolve_arms(None, catalogue.SUITES["lam_fmnist"])] == [
        "lam_deterministic", "lam_online", "lam_posthoc", "lam_mc_dropout", "lam_ensemble"
    ]  # fmt: skip
    for arm in catalogue.SUITES["lam_fmnist"].arms:  # every arm of the paper's regime trains on labels
        cfg = suites._arm_config(catalogue.SUITES["lam_fmnist"], arm, 0, None)
        member = cfg.method_args.get("member_args", cfg.method_args)
        assert member["pairs"] == "labels" and member["embed_dim"] == 3, arm.name

    out = tmp_path / "bench"
    results = suites.run_quality_benchmark("own", out, seeds=1, progress=False)
    assert set(results["runs"]) == {"lam_deterministic", "lam_online"} and not results["failures"]
    text = (out / "own" / "results.md").read_text()
    assert text.startswith("**Against the authors' figures**")
    cell = results["summary"]["lam_online"]["knn/top1@20"]
    assert f"| knn/top1@20 | lam_online [supervised: class labels] | 0.81 | {cell['mean']:.4f}" in text
    assert f"{cell['mean'] - 0.81:+.4f}" in text
    assert "| lam_deterministic [supervised: class labels] | 1 |" in text  # the suite's own tables too
    titles = [title for title, _ in own.tables()]
    assert titles[0].startswith("The paper's evaluation") and "ret/ece" in own.tables()[0][1]
    assert len(own.columns()) == len(set(own.columns()))


def test_a_suite_that_keeps_every_epoch_gives_its_own_run_to_the_curve(tiny_suite, tmp_path, monkeypatch):
    """cifar10_budget's shape: a budget too long to train twice keeps one checkpoint per epoch, and
    --curve evaluates the suite's run instead of training one apart."""
    from probssl.bench import curve

    kept = catalogue.Suite(
        "kept", {**tiny_suite.budget, "train": {**tiny_suite.budget["train"], "epochs": 3}}, ("noise",), "n",
        keep_every_epoch=True,
    )  # fmt: skip
    monkeypatch.setitem(catalogue.SUITES, "kept", kept)
    assert suites._arm_config(kept, catalogue.ARMS[1], 0, None).train.keep_checkpoints == 3
    suites_ = catalogue.SUITES
    assert suites_["cifar10_budget"].keep_every_epoch and not suites_["cifar10"].keep_every_epoch
    out = tmp_path / "bench"
    suites.run_quality_benchmark("kept", out, seeds=1, only=["simclr"], progress=False)
    run = out / "kept" / "simclr-s0"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == [
        f"step_{s:08d}" for s in (4, 8, 12)
    ]
    model = run / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    result = curve.learning_curve("kept", out, [1, 2], progress=False)
    assert model.stat().st_mtime_ns == stamp and not (out / "kept" / "curve" / "simclr-s0").exists()
    assert [p["step"] for p in result["points"]] == [4, 8]
    assert (run / "eval_step4.json").is_file() and (out / "kept" / "curve" / "curve.json").is_file()


def test_the_combined_detector_is_compared_with_its_members_and_an_oracle_choice_paired_within_a_run():
    """``own_in_combined`` = combined − the same rule without the own p-value (runs with an own
    uncertainty only); ``combined-best_single`` = combined − the largest single detector's AUROC of the
    run (the combinations and the ``best_feature`` alias are not single detectors)."""
    run = {
        "ood/mnist/combined/auroc": 0.95,
        "ood/mnist/combined_features/auroc": 0.93,
        "ood/mnist/best_feature/auroc": 0.99,  # an alias of knn1: never the oracle's pick
        "ood/mnist/knn1/auroc": 0.90,
        "ood/mnist/mahalanobis_raw/auroc": 0.97,
        "ood/mnist/emb/auroc": 0.60,
        "ood/noise/combined/auroc": 0.99,
        "ood/noise/combined_features/auroc": 0.99,
        "ood/noise/knn1/auroc": 1.0,
        "ood/id/combined/fpr@0.05": 0.05,  # not an OOD set's AUROC
    }
    differences = tables.paired_comparisons(run)
    assert differences["vs/ood/mnist/own_in_combined"] == pytest.approx(0.02)
    assert differences["vs/ood/mnist/combined-best_single"] == pytest.approx(0.95 - 0.97)
    assert differences["vs/ood/noise/combined-best_single"] == pytest.approx(-0.01)
    assert "vs/ood/noise/own_in_combined" not in differences  # no own score against noise in this run
    deterministic = {k: v for k, v in run.items() if "/emb/" not in k}
    assert not any(k.endswith("own_in_combined") for k in tables.paired_comparisons(deterministic))
    columns = catalogue.SUITES["cifar10"].columns()
    assert "vs/ood/mnist/own_in_combined" in columns and "ood/id/combined/fpr@0.01" in columns
