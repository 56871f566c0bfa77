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

from probssl.bench.command import add_bench_parser, cmd_bench
from probssl.checkpoint import CheckpointError
from probssl.config import ConfigError, RunConfig, build_config, bundled_configs, config_from_dict, load_yaml
from probssl.data import DatasetError, dataset_names
from probssl.registry import UnknownNameError

USER_ERRORS = (ConfigError, UnknownNameError, DatasetError, CheckpointError, FileNotFoundError)


def _positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (a batch of 0 images would loop forever or divide by zero)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a method (works under torchrun for DDP)")
    p.add_argument("--method", help="registered method name (probssl list)")
    p.add_argument("--dataset", help="dataset name (probssl list), or a folder / .tar of images")
    p.add_argument("--data-dir", help="directory with the official dataset files")
    p.add_argument(
        "--image-size", type=int, help="resize images: shorter side to N, centre N x N (data.image_size)"
    )
    p.add_argument("--backbone", help="backbone name, or 'auto'")
    p.add_argument(
        "--init",
        metavar="RUN",
        help="start the backbone from another run's (e.g. SimCLR -> VI-SimSiam); backbone.weights=RUN",
    )
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
    if getattr(args, "init", None):  # --init RUN is backbone.weights=RUN, an absolute path (runs move)
        args.overrides = [*args.overrides, f"backbone.weights={Path(args.init).expanduser().absolute()}"]
    base = None
    if args.resume and args.out and args.config is None and (Path(args.out) / "config.yaml").is_file():
        # Resuming: the run's own config is the base; train() refuses changes beyond runtime keys.
        base = config_from_dict(load_yaml(Path(args.out) / "config.yaml"))
        base.train.max_steps = None  # an early stop applies to the invocation that asked for it
    return build_config(args.config, args.overrides, base=base, **mapping)


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from probssl.checkpoint import final_weights_intact, latest_checkpoint
    from probssl.train import train

    cfg = config_from_args(args)
    out = args.out or f"runs/{cfg.data.dataset}/{cfg.method}-s{cfg.train.seed}"
    main_rank = os.environ.get("RANK", "0") == "0"  # torchrun: one line per run, not per process
    if args.resume and _already_finished(out, cfg, main_rank):
        return 0
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
        if latest is None:  # train.max_steps=0: set up, nothing trained, no checkpoint to resume from
            print(
                f"stopped {cfg.method} on {cfg.data.dataset} before its first step (train.max_steps=0): "
                f"{out} holds the run's settings, no checkpoint; train it from step 0 with: "
                f"probssl train --resume --out {out}"
            )
        else:
            step = json.loads((latest / "meta.json").read_text())
            print(
                f"stopped {cfg.method} on {cfg.data.dataset} at step {step['step']:,} of "
                f"{step['total_steps']:,} (train.max_steps): {out}; "
                f"continue with: probssl train --resume --out {out}"
            )
    elif main_rank:
        print(f"trained {cfg.method} on {cfg.data.dataset}: {out}")
    return 0


def _already_finished(out: str, cfg: RunConfig, main_rank: bool) -> bool:
    """Before ``--resume``: whether the run in ``out`` is finished (nothing to train; said once).

    Under torchrun only rank 0's machine needs the run directory, so rank 0 decides for every rank
    (refusing a changed config on every rank, not on rank 0 alone while the others wait for it).
    """
    import socket

    from probssl.distributed import broadcast_object, gather_objects, init_distributed, teardown_distributed

    init_distributed()
    holders = gather_objects((socket.gethostname(), (Path(out) / "config.yaml").is_file()))
    finished = broadcast_object(_finished_before_resume(out, cfg, holders or []) if main_rank else None)
    if isinstance(finished, Exception):
        teardown_distributed()  # every rank has the verdict: leave the group cleanly, then say why
        raise finished
    if finished:
        if main_rank:
            print(f"{out} is already finished; nothing to train (evaluate it: probssl eval {out})")
        teardown_distributed()
    return bool(finished)


def _finished_before_resume(out: str, cfg: RunConfig, holders: list[tuple[str, bool]]) -> bool | Exception:
    """Rank 0's verdict on ``--resume --out OUT``: the refusal of a changed config, or whether the run
    is finished already (nothing to train); a run without a checkpoint yet gets a note.

    ``holders``: (host, whether it has ``OUT/config.yaml``) of every rank. A run directory on another
    machine than rank 0's is refused: rank 0 would start the run afresh beside it.
    """
    from probssl.checkpoint import final_weights_intact, latest_checkpoint
    from probssl.train import TrainingError, check_resumable_run

    if not (Path(out) / "config.yaml").is_file():
        elsewhere = [(rank, host) for rank, (host, has_run) in enumerate(holders) if has_run]
        if not elsewhere:
            return False
        rank, host = elsewhere[0]
        return TrainingError(
            f"--resume: the run directory {out} is on {host} (rank {rank} of this job), but rank 0 "
            f"runs on {holders[0][0]}, which has none; rank 0 must run where the run directory is "
            "(torchrun --node-rank 0 --master-addr on that machine: the static rendezvous), or put "
            "--out on a filesystem every machine mounts"
        )
    try:
        check_resumable_run(out, cfg)  # both sides resolved (probssl.runs.resolved_config)
    except Exception as err:  # raised by every rank, not by rank 0 alone
        return err
    if final_weights_intact(out):
        return True
    if latest_checkpoint(out) is None:
        print(f"note: {out} has no checkpoint yet; training it from step 0", file=sys.stderr)
    return False


def cmd_eval(args: argparse.Namespace) -> int:
    from probssl.apply_run import check_samples
    from probssl.eval.evaluate import evaluate_run
    from probssl.eval.summary import format_summary

    check_samples(args.samples)
    results = evaluate_run(
        args.run_dir,
        data_dir=args.data_dir,
        dataset=args.dataset,
        samples=args.samples,
        device=args.device,
        progress=not args.no_progress,
        step=args.step,
        suite_name=args.suite,
        download=args.download,
        batch_size=args.batch_size,
    )
    print(format_summary(results))
    name = "eval.json" if args.step is None else f"eval_step{args.step}.json"
    print(f"wrote {Path(args.run_dir) / name}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from probssl.apply_run import check_samples, embed_images, embedding_paths, write_embeddings
    from probssl.data.file_source import SKIP_HINT, CorruptImageError
    from probssl.output_files import is_embedding_file, refuse_foreign_output

    for path in embedding_paths(args.out):  # before any work: a refusal must cost nothing
        refuse_foreign_output(path, "--out", "embed", is_embedding_file)
    check_samples(args.samples)
    if not 0.0 < args.alpha < 1.0:  # before loading anything
        raise ConfigError(
            f"--alpha must lie strictly between 0 and 1 (the share of in-distribution images you accept "
            f"to flag wrongly, e.g. 0.05), got {args.alpha:g}"
        )
    try:
        result = embed_images(
            args.run_dir,
            args.source,
            samples=args.samples,
            k=args.k,
            alpha=args.alpha,
            batch_size=args.batch_size,
            workers=args.workers,
            data_dir=args.data_dir,
            device=args.device,
            progress=not args.no_progress,
            skip_corrupt=args.skip_corrupt,
            dataset=args.dataset,
        )
    except CorruptImageError as error:  # the training hint names a config key; here it is a flag
        hint = "fix or remove this file, or pass --skip-corrupt to embed the readable images"
        raise DatasetError(str(error).replace(SKIP_HINT, hint)) from error
    npz, table = write_embeddings(result, args.out)
    n, d = result["embedding"].shape
    images = "1 image" if n == 1 else f"{n} images"
    print(f"embedded {images} ({d} dimensions): {npz}, ranked by OOD p-value in {table}")
    flagged = int(result["ood_flag"].sum())
    print(
        f"{flagged} of {n} flagged as unlike the training data (ood_pvalue < {args.alpha:g}: at most a "
        f"fraction {args.alpha:g} of images like the training data is flagged)"
    )
    if len(result.get("skipped", ())):
        print(f"skipped {len(result['skipped'])} unreadable image(s), named in {npz} under 'skipped'")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from probssl.export import export_run

    path, meta = export_run(args.run_dir, args.out, args.format)
    outputs = ", ".join(meta["outputs"])
    print(f"exported {meta['method']} ({outputs}; input {meta['input'].split(' in ')[0]}) to {path}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from probssl.results import read_eval, select_runs
    from probssl.tables import DEFAULT_COLUMNS, aggregate_seeds, check_columns, format_table

    if args.update:
        from probssl.output_files import is_text_for_tables, refuse_foreign_output

        refuse_foreign_output(args.update, "--update", "table", is_text_for_tables)
    run_dirs, notes = select_runs(args.run_dirs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    rows = {str(d): read_eval(d, with_training=True) for d in run_dirs}  # + meta/train_precision, _processor
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
    from probssl.output_files import is_report, refuse_foreign_output
    from probssl.results import select_runs
    from probssl.runs import warn_partial_results

    refuse_foreign_output(args.out, "--out", "report", is_report)
    run_dirs, notes = select_runs(args.run_dirs, need_eval=False)  # report notes a missing eval.json itself
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    for run_dir in run_dirs:
        warn_partial_results(run_dir)
    path = build_report(run_dirs, args.out, title=args.title)
    print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from probssl.demo import run_demo

    run_demo(args.out, epochs=args.epochs, progress=not args.no_progress)
    return 0


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
    if args.update:  # README.md's "What each method's uncertainty means", from each uncertainty_doc
        from probssl.bench.sections import replace_section
        from probssl.methods.uncertainty_table import README_SECTION, uncertainty_table
        from probssl.output_files import is_text_for_tables, refuse_foreign_output

        refuse_foreign_output(args.update, "--update", "list", is_text_for_tables)
        replace_section(args.update, README_SECTION, uncertainty_table())
        print(f"updated section {README_SECTION!r} of {args.update}")
    return 0


_MOVED_DATASET_HELP = "where the run's own training images (folder or .tar) are now, if they moved"


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
    p.add_argument("--dataset", help=_MOVED_DATASET_HELP)
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch missing OOD / transfer sets (other datasets) over the network; off: skip them",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        help="images per encoder pass (default: the run's eval.batch_size); lower it if evaluation runs "
        "out of memory — the numbers do not depend on it",
    )
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser(
        "embed", help="embeddings, uncertainties and OOD p-values of your images under a trained run"
    )
    p.add_argument("run_dir")
    p.add_argument("source", help="an image folder (flat or with class folders), a .tar of one, or one image")
    p.add_argument("--out", required=True, help="FILE.npz; FILE.csv beside it ranks images by OOD p-value")
    p.add_argument("--samples", type=int, help="posterior draws per image, stored as `samples` [S, N, D]")
    p.add_argument(
        "--k", type=int, default=1, help="ood_score: cosine distance to the k-th nearest training image"
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=0.05,  # probssl.eval.conformal.DEFAULT_ALPHA (imported lazily)
        help="flag an image (ood_flag) when its OOD p-value is below ALPHA: at most a fraction ALPHA "
        "of images like the training data is flagged (default 0.05)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, help="images per batch (default: the run's eval.batch_size)"
    )
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes")
    p.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave unreadable images out (named in the .npz) instead of stopping",
    )
    p.add_argument("--data-dir", help="where the run's training data lives (for the OOD reference)")
    p.add_argument("--dataset", help=_MOVED_DATASET_HELP)
    p.add_argument("--device")
    p.add_argument("--no-progress", action="store_true")
    p = sub.add_parser(
        "export", help="a run's encoder as one ONNX or TorchScript file (embedding, uncertainty)"
    )
    p.add_argument("run_dir")
    p.add_argument("--out", required=True, help="FILE.onnx or FILE.pt")
    p.add_argument("--format", choices=("onnx", "torchscript"), help="default: from --out's suffix")
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
    p = sub.add_parser("list", help="registered methods, datasets, backbones")
    p.add_argument(
        "--update", metavar="FILE", help="also rewrite FILE's generated table of each method's uncertainty"
    )
    add_bench_parser(sub)
    return parser


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "embed": cmd_embed,
    "export": cmd_export,
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
