"""``probssl train | eval | embed | demo | table | report | bench | list`` — the CLI over the Python API.

Every user-facing failure (a wrong config key, an unknown method, a missing or corrupt data file,
a corrupt checkpoint, a NaN loss) is printed as one ``error:`` line that says what to do, with a
non-zero exit status; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from probssl.checkpoint import CheckpointError
from probssl.config import ConfigError, RunConfig, build_config, bundled_configs, config_from_dict, load_yaml
from probssl.data import DatasetError, dataset_names
from probssl.registry import UnknownNameError

USER_ERRORS = (ConfigError, UnknownNameError, DatasetError, CheckpointError, FileNotFoundError)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a method (works under torchrun for DDP)")
    p.add_argument("--method", help="registered method name (probssl list)")
    p.add_argument("--dataset", help="dataset name (probssl list), or a folder / .tar of images")
    p.add_argument("--data-dir", help="directory with the official dataset files")
    p.add_argument(
        "--image-size", type=int, help="resize images: shorter side to N, centre N x N (data.image_size)"
    )
    p.add_argument("--backbone", help="backbone name, or 'auto'")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--subset", type=int, help="train on a fixed random subset of N training images")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="run directory (default runs/<dataset>/<method>-s<seed>)")
    p.add_argument(
        "--config",
        help="YAML config file, or a bundled config's name (probssl list); flags and key=value overrides win",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its latest checkpoint (to the end, unless train.max_steps)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. optim.lr=0.1 method.temperature=0.5"
    )


def config_from_args(args: argparse.Namespace) -> RunConfig:
    mapping: dict[str, Any] = {}
    flags = {"method": args.method, "backbone": args.backbone}
    mapping.update({k: v for k, v in flags.items() if v is not None})
    data = {"dataset": args.dataset, "data_dir": args.data_dir, "subset": args.subset}
    data["image_size"] = args.image_size
    train = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed}
    if args.no_progress:
        train["progress"] = False
    for section, values in (("data", data), ("train", train)):
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            mapping[section] = values
    base = None
    if args.resume and args.out and args.config is None and (Path(args.out) / "config.yaml").is_file():
        # Resuming: the run's own config is the base; train() refuses changes beyond runtime keys.
        base = config_from_dict(load_yaml(Path(args.out) / "config.yaml"))
        base.train.max_steps = None  # an early stop applies to the invocation that asked for it
    return build_config(args.config, args.overrides, base=base, **mapping)


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from probssl.checkpoint import final_weights_intact, latest_checkpoint
    from probssl.train import check_resumable, train

    cfg = config_from_args(args)
    out = args.out or f"runs/{cfg.data.dataset}/{cfg.method}-s{cfg.train.seed}"
    main_rank = os.environ.get("RANK", "0") == "0"  # torchrun: one line per run, not per process
    if args.resume and (Path(out) / "config.yaml").is_file():
        check_resumable(
            config_from_dict(load_yaml(Path(out) / "config.yaml")), cfg
        )  # a changed config is refused
        if final_weights_intact(out):
            if main_rank:
                print(f"{out} is already finished; nothing to train (evaluate it: probssl eval {out})")
            return 0
        if latest_checkpoint(out) is None and main_rank:
            print(f"note: {out} has no checkpoint yet; training it from step 0", file=sys.stderr)
    try:
        train(cfg, out, resume=args.resume)
    except KeyboardInterrupt:
        if main_rank:
            latest = latest_checkpoint(out)
            where = f"its last checkpoint is {latest}" if latest else "it has no checkpoint yet"
            print(
                f"\ninterrupted: the run is in {out} ({where}); "
                f"continue it with: probssl train --resume --out {out}",
                file=sys.stderr,
            )
        return 130
    if main_rank and not final_weights_intact(out):  # train.max_steps stopped it early
        latest = latest_checkpoint(out)
        step = json.loads((latest / "meta.json").read_text()) if latest else {}
        print(
            f"stopped {cfg.method} on {cfg.data.dataset} at step {step.get('step', 0)} of "
            f"{step.get('total_steps', '?')} (train.max_steps): {out}; "
            f"continue with: probssl train --resume --out {out}"
        )
    elif main_rank:
        print(f"trained {cfg.method} on {cfg.data.dataset}: {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from probssl.eval.evaluate import evaluate_run
    from probssl.eval.summary import format_summary

    results = evaluate_run(
        args.run_dir,
        data_dir=args.data_dir,
        samples=args.samples,
        device=args.device,
        progress=not args.no_progress,
        step=args.step,
        suite_name=args.suite,
        download=args.download,
    )
    print(format_summary(results))
    name = "eval.json" if args.step is None else f"eval_step{args.step}.json"
    print(f"wrote {Path(args.run_dir) / name}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from probssl.apply_run import embed_images, write_embeddings
    from probssl.data.file_source import SKIP_HINT, CorruptImageError

    try:
        result = embed_images(
            args.run_dir,
            args.source,
            samples=args.samples,
            k=args.k,
            batch_size=args.batch_size,
            workers=args.workers,
            data_dir=args.data_dir,
            device=args.device,
            progress=not args.no_progress,
            skip_corrupt=args.skip_corrupt,
        )
    except CorruptImageError as error:  # the training hint names a config key; here it is a flag
        hint = "fix or remove this file, or pass --skip-corrupt to embed the readable images"
        raise DatasetError(str(error).replace(SKIP_HINT, hint)) from error
    npz, table = write_embeddings(result, args.out)
    n, d = result["embedding"].shape
    print(f"embedded {n} images ({d} dimensions): {npz}, ranked by uncertainty in {table}")
    if len(result.get("skipped", ())):
        print(f"skipped {len(result['skipped'])} unreadable image(s), named in {npz} under 'skipped'")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from probssl.tables import (
        DEFAULT_COLUMNS,
        aggregate_seeds,
        check_columns,
        format_table,
        read_eval,
        select_runs,
    )

    run_dirs, notes = select_runs(args.run_dirs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    rows = {str(d): read_eval(d) for d in run_dirs}
    columns = args.columns.split(",") if args.columns else list(DEFAULT_COLUMNS)
    if args.columns:
        check_columns(rows, columns)
    if args.by_seed:
        rows, columns = aggregate_seeds(rows, columns), ["n", *columns]
    table = format_table(rows, columns, markdown=args.markdown or bool(args.update))
    print(table)
    if args.update:
        from probssl.bench.provenance import git_commit
        from probssl.bench.sections import replace_section

        if not args.section:
            raise ConfigError("--update needs --section NAME (the generated section of that file to rewrite)")
        command = "probssl " + " ".join(args.argv)
        replace_section(args.update, args.section, f"Command: `{command}` (commit {git_commit()})\n\n{table}")
        print(f"updated section {args.section!r} of {args.update}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from probssl.eval.report import build_report
    from probssl.tables import select_runs

    run_dirs, notes = select_runs(args.run_dirs, need_eval=False)  # report notes a missing eval.json itself
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    path = build_report(run_dirs, args.out, title=args.title)
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from probssl.demo import run_demo

    run_demo(args.out, epochs=args.epochs, progress=not args.no_progress)
    return 0


def _publish_speed(result: dict, out: Path, update: str | None) -> None:
    """Write a speed result's JSON and table under ``out`` and, with ``update``, its section."""
    from probssl.bench.sections import replace_section
    from probssl.bench.speed import speed_markdown
    from probssl.io import atomic_write_json

    table = speed_markdown(result)
    device = "gpu" if result["machine"]["device"] != "cpu" else "cpu"
    shapes = f"{result['protocol']['dataset']}-{result['protocol']['backbone']}"
    atomic_write_json(out / f"speed-{device}-{shapes}.json", result)
    (out / f"speed-{device}-{shapes}.md").write_text(table + "\n")
    print(table)
    if update:
        replace_section(
            update,
            f"speed-{device}-{shapes}",
            f"Command: `{result['command']}` ({result['date']}, commit {result['commit']})\n\n{table}",
            heading=f"## Speed ({device.upper()}, {shapes}; generated by `probssl bench speed`)",
        )
        print(f"updated {update}")


def cmd_bench(args: argparse.Namespace) -> int:
    from probssl.bench.sections import replace_section
    from probssl.io import atomic_write_json

    out = Path(args.out)
    if args.status:  # reads the run directories only: safe beside running workers
        from probssl.bench.status import status_text, suite_status

        only = args.arms.split(",") if args.arms else None
        states = suite_status(args.suite, out, args.seeds, args.first_seed, only)
        print(status_text(args.suite, states, args.jobs))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    if args.suite == "speed":
        from probssl.bench.speed import DEFAULT_ARMS, run_speed_benchmark

        arms = DEFAULT_ARMS
        if args.arms:
            wanted = set(args.arms.split(","))
            unknown = wanted - {a.name for a in DEFAULT_ARMS}
            if unknown:
                raise ConfigError(
                    f"unknown speed arm(s) {sorted(unknown)}; choose from {[a.name for a in DEFAULT_ARMS]}"
                )
            keep = wanted | {a.base for a in DEFAULT_ARMS if a.name in wanted and a.base}
            arms = tuple(a for a in DEFAULT_ARMS if a.name in keep)
        if args.table_only:  # rebuild the tables (and sections) from the saved results
            saved = sorted(out.glob("speed-*.json"))
            if not saved:
                raise ConfigError(f"--table-only: no speed-*.json under {out}; run `probssl bench speed`")
            for path in saved:
                _publish_speed(json.loads(path.read_text()), out, args.update)
            return 0
        result = run_speed_benchmark(
            args.config,
            args.overrides,
            arms=arms,
            repeats=args.repeats,
            steps=args.steps,
            device=args.device,
            progress=None if args.no_progress else (lambda msg: print(msg, file=sys.stderr)),
        )
        result["command"] = args.command_line or "probssl " + " ".join(args.argv)
        _publish_speed(result, out, args.update)
        return 0
    if args.suite == "eval-memory":
        from probssl.bench.eval_memory import eval_memory_markdown, measure_eval_memory

        rows = [measure_eval_memory(n, min(args.test_items, n), s, probe=args.probe) for n, s in args.sizes]
        result = {"rows": rows, "command": args.command_line or "probssl " + " ".join(args.argv)}
        from probssl.bench.provenance import provenance

        result.update(provenance())
        atomic_write_json(out / "eval_memory.json", result)
        table = eval_memory_markdown(rows)
        print(table)
        if args.update:
            replace_section(
                args.update,
                "eval-memory",
                f"Command: `{result['command']}` ({result['date']}, commit {result['commit']})\n\n{table}",
                heading="## Evaluation memory (generated by `probssl bench eval-memory`)",
            )
        return 0
    if args.curve:
        from probssl.bench.curve import learning_curve

        arm = args.arms or "simclr"
        if "," in arm:
            raise ConfigError(f"--curve trains one arm; --arms names several ({arm})")
        learning_curve(
            args.suite,
            out,
            args.curve,
            arm_name=arm,
            seed=args.first_seed,
            data_dir=args.data_dir,
            progress=not args.no_progress,
            update=args.update,
            command=args.command_line or "probssl " + " ".join(args.argv),
        )
        return 0
    from probssl.bench.suites import run_quality_benchmark

    common = {
        "seeds": args.seeds,
        "first_seed": args.first_seed,
        "data_dir": args.data_dir,
        "only": args.arms.split(",") if args.arms else None,
        "update": args.update,
        "progress": not args.no_progress,
        "command": args.command_line or "probssl " + " ".join(args.argv),
    }
    if args.jobs > 1 and not args.table_only and not args.worker_report:
        from probssl.bench.parallel import run_parallel_benchmark

        run_parallel_benchmark(args.suite, out, args.jobs, **common)
        return 0
    run_quality_benchmark(
        args.suite, out, table_only=args.table_only, worker_report=args.worker_report, **common
    )
    return 0  # a worker's failures are in its report; the parent tabulates them


def cmd_list(args: argparse.Namespace) -> int:
    from probssl.methods import METHODS
    from probssl.nn import BACKBONES

    print("methods:  ", ", ".join(METHODS.names()))
    supervised = [
        f"{name} {option} ({what})"
        for name in METHODS.names()
        for option, what in METHODS.get(name).supervised_modes.items()
    ]
    if supervised:  # every method is self-supervised by default; these options train on class labels
        print("supervised modes (class labels; off by default):")
        for line in supervised:
            print(f"  {line}")
    print("datasets: ", ", ".join(dataset_names()))
    print("backbones:", ", ".join(BACKBONES.names()))
    print("configs:  ", ", ".join(bundled_configs()), "(--config NAME)")
    return 0


def _size_pair(text: str) -> tuple[int, int]:
    try:
        n, s = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N:S (e.g. 100000:32), got {text!r}") from None
    return n, s


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probssl", description="Probabilistic self-supervised learning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    p = sub.add_parser("eval", help="evaluate a run directory and write RUN_DIR/eval.json")
    p.add_argument("run_dir")
    p.add_argument("--data-dir")
    p.add_argument("--samples", type=int, help="embedding samples per image (probabilistic methods)")
    p.add_argument("--device")
    p.add_argument(
        "--suite",
        default="full",
        choices=("basic", "uncertainty", "full"),  # probssl.eval.evaluate.SUITES (imported lazily)
        help="basic: kNN + linear probe; uncertainty: + calibration, selective, OOD; "
        "full: + corruptions, low-shot, transfer, retrieval",
    )
    p.add_argument("--step", type=int, help="evaluate the kept checkpoint at this step (eval_step<N>.json)")
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch missing OOD / transfer sets (other datasets) over the network; off: skip them",
    )
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser(
        "embed", help="embeddings, uncertainties and OOD scores of your images under a trained run"
    )
    p.add_argument("run_dir")
    p.add_argument("source", help="an image folder (flat or with class folders), a .tar of one, or one image")
    p.add_argument("--out", required=True, help="FILE.npz; FILE.csv beside it ranks images by uncertainty")
    p.add_argument("--samples", type=int, help="posterior draws per image, stored as `samples` [S, N, D]")
    p.add_argument(
        "--k", type=int, default=1, help="OOD score: cosine distance to the k-th nearest training image"
    )
    p.add_argument("--batch-size", type=int, help="images per batch (default: the run's eval.batch_size)")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave unreadable images out (named in the .npz) instead of stopping",
    )
    p.add_argument("--data-dir", help="where the run's training data lives (for the OOD reference)")
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser("table", help="print a table of eval.json results")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--columns", help="comma-separated metric keys")
    p.add_argument("--markdown", action="store_true")
    p.add_argument(
        "--by-seed", action="store_true", help="one row per run name without its -s<seed> suffix: mean ± std"
    )
    p.add_argument("--update", help="write the table into this file's generated section --section")
    p.add_argument("--section", help="name of the generated section (<!-- bench:NAME ... -->)")
    p = sub.add_parser("report", help="one static HTML page comparing runs (tables and plots)")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default="report.html")
    p.add_argument("--title", default="probssl report")
    p = sub.add_parser("demo", help="train SimCLR and BYOL on digits, evaluate, print the table")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int)
    p.add_argument("--no-progress", action="store_true")
    sub.add_parser("list", help="registered methods, datasets, backbones")
    p = sub.add_parser(
        "bench",
        help="benchmark suites (digits, fashion_mnist, cifar10, cifar10_budget, cifar10_gpu, lam_fmnist), "
        "speed, eval-memory",
    )
    p.add_argument(
        "suite",
        help="digits | fashion_mnist | cifar10 | cifar10_budget | cifar10_gpu | lam_fmnist | speed "
        "| eval-memory",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (quality suites)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="quality suites: run seeds FIRST_SEED .. FIRST_SEED+SEEDS-1 (parallel invocations)",
    )
    p.add_argument("--out", default="runs/bench", help="results directory (runs go below it)")
    p.add_argument("--arms", help="comma-separated subset of the suite's arms")
    p.add_argument("--data-dir")
    p.add_argument("--config", help="speed: YAML config the arms are built from (backbone, batch, dataset)")
    p.add_argument("--repeats", type=int, default=5, help="speed: interleaved repeats")
    p.add_argument("--steps", type=int, default=10, help="speed: steps per repeat")
    p.add_argument("--device")
    p.add_argument("--update", help="regenerate this file's generated sections (e.g. BENCHMARKS.md)")
    p.add_argument(
        "--sizes",
        type=_size_pair,
        nargs="+",
        default=[(10_000, 32), (100_000, 1), (100_000, 32)],
        metavar="N:S",
        help="eval-memory: training embeddings N and samples S per measurement",
    )
    p.add_argument("--test-items", type=int, default=10_000, help="eval-memory: query embeddings")
    p.add_argument("--probe", action="store_true", help="eval-memory: also fit the per-sample linear probes")
    p.add_argument(
        "--table-only",
        action="store_true",
        help="train nothing: rebuild the results from the finished runs (speed: from OUT/speed-*.json)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="quality suites: worker processes sharing the suite, cores // JOBS threads each",
    )
    p.add_argument(
        "--curve",
        metavar="EPOCHS",
        help="quality suites: learning curve of one arm (--arms, default simclr; seed --first-seed) at "
        "these comma-separated epochs, e.g. 10,20,30: trained once, checkpoints evaluated (basic suite)",
    )
    p.add_argument(
        "--status",
        action="store_true",
        help="quality suites: train nothing, print which runs are done, in progress or waiting, and an "
        "estimate of the time left (for --jobs workers)",
    )
    p.add_argument("--worker-report", help=argparse.SUPPRESS)  # set by --jobs for its workers
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="speed: config overrides for every arm")
    return parser


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "embed": cmd_embed,
    "table": cmd_table,
    "demo": cmd_demo,
    "report": cmd_report,
    "list": cmd_list,
    "bench": cmd_bench,
}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """A warning as one ``warning: ...`` line: the user needs the message, not our source line."""
    text = " ".join(str(message).split())
    label = "warning" if issubclass(category, UserWarning) else f"warning ({category.__name__})"
    return f"{label}: {text}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    standard = warnings.formatwarning
    warnings.formatwarning = _one_line_warning  # the command line only; the library's warnings stay standard
    try:
        return _main(argv)
    finally:
        warnings.formatwarning = standard


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded beside generated tables
    if extra:  # key=value overrides may sit anywhere among the flags, not only in one run
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
        args.overrides = [*args.overrides, *extra]
    from probssl.train import TrainingError

    try:
        return COMMANDS[args.command](args)
    except (*USER_ERRORS, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback; 130 = 128 + SIGINT, as a shell reports it
        print(f"\ninterrupted: probssl {args.command} stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
