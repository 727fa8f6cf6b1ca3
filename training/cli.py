"""`ensemble-train`: train and publish an ensemble; `import` foreign members; `schedule` retraining.

    ensemble-train [train] [--data digits] [--name digits] [--repository models] [...]
    ensemble-train import --name NAME --repository models [--task ...] [--labels ...] PATH...
    ensemble-train schedule (--cron EXPR | --every 6h) [train flags...]

Exit codes: 0 published (or nothing to do), 1 failed (nothing published), 2 usage error,
3 refused by the gate (nothing published).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path

from contract.layout import is_valid_name, scan_model
from contract.store import location_of
from training.progress import PROGRESS_MODES

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


def _image_size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HEIGHTxWIDTH, e.g. 32x32") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError("image height and width must be positive")
    return h, w


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--data", default="digits",
                      help="'digits' (built in, no download), an .npz file (arrays x, y, optional classes), "
                           "a table (.csv/.tsv/.txt with a header, or .parquet: named columns of numbers, "
                           "categories, text and empty cells), or a folder with one sub-folder per class of "
                           "images or of .txt files (a text classifier). "
                           "Default: digits")
    data.add_argument("--label-column", default="label",
                      help="tables: the label column's name, or several separated by commas (multi-label, "
                           "several regression targets). Default: label")
    data.add_argument("--task", default=None, choices=["classification", "binary", "multilabel", "regression"],
                      help="tables: what to predict. Default: classification, binary for a label column of "
                           "two values, multilabel for several 0/1 label columns")
    data.add_argument("--delimiter", default=None, help="CSV: the field separator. Default: sniffed")
    data.add_argument("--categorical", default="", help="tables: comma-separated columns that are categories")
    data.add_argument("--numeric", default="", help="tables: comma-separated columns that must be numbers")
    data.add_argument("--ignore-columns", default="", help="tables: comma-separated columns to leave out (ids)")
    data.add_argument("--text-columns", default="",
                      help="tables: comma-separated columns of free text (tokenised inside the members). "
                           "Default: inferred, a column of long or mostly distinct phrases")
    data.add_argument("--skip-unreadable", action="store_true",
                      help="folders of texts or images: leave out files that cannot be read (a text that is "
                           "not UTF-8, an image that cannot be decoded; the trainer says how many) instead of "
                           "stopping at the first")
    data.add_argument("--image-size", type=_image_size, default=(32, 32),
                      help="image folders: resize to HEIGHTxWIDTH. Default: 32x32")
    data.add_argument("--color-mode", default="rgb", choices=["rgb", "grayscale", "rgba"],
                      help="image folders: channels. Default: rgb")
    p.add_argument("--name", default="digits", help="ensemble name in the repository. Default: digits")
    p.add_argument("--repository", type=location_of, default=Path("models"),
                   help="model repository: a folder, or an object store's s3://BUCKET/PREFIX, gs://... or az://... "
                        "(credentials and endpoint from the cloud's environment, e.g. AWS_ENDPOINT_URL). "
                        "Default: models")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="tuner state and training backups (resumable). Default: <repository>/.work")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, search and members. Default: 0")

    tune = p.add_argument_group("search")
    tune.add_argument("--tuner", default="hyperband", choices=["hyperband", "random", "bayesian"],
                      help="Default: hyperband")
    tune.add_argument("--objective", default=None, choices=["val_accuracy", "val_loss"],
                      help="Default: val_accuracy for classification, val_loss (the task's NLL) otherwise")
    tune.add_argument("--max-epochs", type=int, default=9,
                      help="Hyperband: the largest per-trial budget; random/bayesian: epochs per trial. Default: 9")
    tune.add_argument("--factor", type=int, default=3, help="Hyperband reduction factor. Default: 3")
    tune.add_argument("--max-trials", type=int, default=10, help="random/bayesian: number of trials. Default: 10")

    members = p.add_argument_group("members")
    members.add_argument("--members", default="tuned:1,seed:2,snapshot:1,swa:1",
                         help="the member mix, KIND:COUNT,... with kinds tuned, seed, snapshot, swa "
                              "(a plain number N means tuned:N). Default: tuned:1,seed:2,snapshot:1,swa:1")
    members.add_argument("--epochs", type=int, default=60,
                         help="tuned/seed members: epoch cap (early stopping on validation loss). Default: 60")
    members.add_argument("--patience", type=int, default=10, help="early-stopping patience. Default: 10")
    members.add_argument("--batch-size", type=int, default=32, help="training batch size. Default: 32")
    members.add_argument("--snapshot-epochs-per-cycle", type=int, default=15,
                         help="snapshot members: epochs per cosine cycle; one member per cycle. Default: 15")
    members.add_argument("--swa-epochs", type=int, default=30, help="swa members: epochs. Default: 30")
    members.add_argument("--swa-start-fraction", type=float, default=0.6,
                         help="swa members: average the weights from this share of the epochs on. Default: 0.6")
    members.add_argument("--min-members", type=int, default=2,
                         help="pruning keeps at least this many members, and a run left with fewer "
                              "publishes nothing unless --allow-fewer. Default: 2")
    members.add_argument("--allow-fewer", action="store_true",
                         help="publish even when fewer than --min-members members were trained")
    members.add_argument("--cross-fit", default="auto", choices=["auto", "always", "never"],
                         help="tables: train each member once per fold (5 folds) and choose and calibrate the "
                              "ensemble on every row's out-of-fold prediction. Default: auto (below 1,000 "
                              "training and validation rows)")
    members.add_argument("--weights", default="pruned", choices=["pruned", "fitted", "uniform"],
                         help="which members the ensemble keeps and how it weighs them, decided on the "
                              "validation split: pruned leaves out members the bootstrap shows make it worse "
                              "and weighs the rest equally; fitted fits convex weights; uniform keeps all "
                              "equally. Default: pruned")
    members.add_argument("--calibration", default="temperature", choices=["temperature", "none"],
                         help="one temperature fitted on the validation split after averaging (pool, then "
                              "calibrate), served by every engine. Default: temperature")
    members.add_argument("--target-error", type=float, default=None,
                         help="the abstention threshold keeps the error rate of the answered validation rows "
                              "at most this (regression: their RMSE as a share of the target's standard "
                              "deviation). Default: 0.02 for classification and binary, 0.05 for multilabel "
                              "(a row is wrong when any label is), 0.5 for regression")
    data.add_argument("--ood-holdout", default="",
                      help="comma-separated class labels to leave out of training; the report says how well "
                           "each uncertainty score tells their rows from unseen rows of the other classes")

    gate = p.add_argument_group("publish gate")
    gate.add_argument("--gate-metric", default=None,
                      help="compare the new ensemble with the newest published one by this metric: accuracy, "
                           "nll, brier or ece; for tables also the task's own (e.g. rmse, mae, micro_f1). "
                           "Default: accuracy for classification, nll otherwise")
    gate.add_argument("--gate-tolerance", type=float, default=0.0,
                      help="how much worse the challenger may be and still publish. Default: 0")
    gate.add_argument("--no-gate", action="store_true", help="publish whatever the comparison says")

    p.add_argument("--if-empty", action="store_true",
                   help="do nothing if the repository already holds a published version of --name")
    p.add_argument("--verbose", action="store_true", help="let Keras Tuner print every epoch")
    p.add_argument("--progress", default="auto", choices=PROGRESS_MODES,
                   help="how the search and the member runs show where they are and the time left: always "
                        "one line rewritten in place; never: plain lines instead (one per trial, one per 10 s "
                        "and 10%% of a member's epochs at most); auto: rewritten on a terminal only. "
                        "Default: auto")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ensemble-train",
        description="Tune Keras models with Keras Tuner, train ensemble members (tuned, seed, snapshot, "
        "swa), evaluate them on a held-out split and publish a new version atomically if it passes "
        "the gate. Subcommands: 'import' publishes members made elsewhere; 'schedule' retrains on a "
        "cron expression or interval (see 'ensemble-train import --help', 'ensemble-train schedule --help').",
    )
    add_train_arguments(p)
    return p


def _repository(location: str | Path, name: str, work_dir: Path | None, read_latest: bool = True):
    """The repository opened for a run (training.repository), or None after saying why."""
    from training.repository import RepositoryError, open_repository

    try:
        return open_repository(location, name, work_dir, read_latest)
    except RepositoryError as exc:
        _error(str(exc))
        return None


def _names(text: str) -> tuple[str, ...]:
    """A comma-separated list of column names."""
    return tuple(c.strip() for c in text.split(",") if c.strip())


def _error(message: str) -> None:
    print(f"ensemble-train: error: {message}", file=sys.stderr)


def train_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not is_valid_name(args.name):
        _error(f"--name {args.name!r} is not valid: use 1-64 characters of a-z, 0-9, '_' and '-', "
               "starting with a letter or digit")
        return EXIT_USAGE
    repository = _repository(args.repository, args.name, args.work_dir)
    if repository is None:
        return EXIT_FAILED
    if args.if_empty:
        published = [v.version for v in scan_model(repository.local, args.name) if v.committed]
        if published:
            print(f"[train] {repository.where(args.name)} already has version {max(published)}; "
                  "nothing to do (--if-empty)", flush=True)
            return EXIT_OK

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.data import DataError, DataOptions
    from training.members import MemberOptions, parse_member_mix
    from training.pipeline import TrainConfig, train_ensemble
    from training.publish import PublishError
    from training.tune import SearchBudget

    try:
        config = TrainConfig(
            data=args.data,
            name=args.name,
            repository=repository.local,
            store=repository.store,
            work_dir=args.work_dir,
            data_options=DataOptions(args.label_column, args.image_size, args.color_mode, args.task,
                                     args.delimiter, _names(args.categorical), _names(args.numeric),
                                     _names(args.ignore_columns), text=_names(args.text_columns),
                                     skip_unreadable=args.skip_unreadable),
            budget=SearchBudget(tuner=args.tuner, max_epochs=args.max_epochs, factor=args.factor,
                                max_trials=args.max_trials, objective=args.objective or "val_accuracy",
                                batch_size=args.batch_size),
            objective_given=args.objective is not None,
            min_members=args.min_members,
            allow_fewer=args.allow_fewer,
            cross_fit=args.cross_fit,
            members=parse_member_mix(args.members),
            member_options=MemberOptions(epochs=args.epochs, patience=args.patience,
                                         batch_size=args.batch_size,
                                         snapshot_epochs_per_cycle=args.snapshot_epochs_per_cycle,
                                         swa_epochs=args.swa_epochs,
                                         swa_start_fraction=args.swa_start_fraction),
            weighting=args.weights,
            calibration=args.calibration,
            target_error=args.target_error,
            ood_holdout=tuple(c.strip() for c in args.ood_holdout.split(",") if c.strip()),
            gate=not args.no_gate,
            gate_metric=args.gate_metric or "",
            gate_tolerance=args.gate_tolerance,
            seed=args.seed,
            verbose=1 if args.verbose else 0,
            progress=args.progress,
        )
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        result = train_ensemble(config, report=lambda line: print(line, flush=True))
    except (DataError, PublishError) as exc:
        _error(str(exc))
        print("ensemble-train: nothing was published", file=sys.stderr)
        return EXIT_FAILED
    if result is not None and result.manifest is None:
        print(f"ensemble-train: {result.decision.reason}; nothing was published", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


_HEAD_VALUE = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.\-]{0,63})=(.*)", re.DOTALL)


def _head_values(values: list[str], flag: str) -> dict[str | None, str]:
    """`HEAD=VALUE` (or one VALUE for the only head) from each use of a per-head flag."""
    by_head: dict[str | None, str] = {}
    for value in values:
        match = _HEAD_VALUE.fullmatch(value)
        head, value = (match.group(1), match.group(2)) if match else (None, value)
        if head in by_head:
            raise argparse.ArgumentTypeError(f"{flag} gives {'head ' + repr(head) if head else 'the only head'} twice")
        by_head[head] = value
    return by_head


def parse_tasks(values: list[str]) -> dict[str | None, str]:
    """`--task TASK` (the only head) or `--task HEAD=TASK,HEAD=TASK` (repeatable) -> {head: task}."""
    from contract.manifest import TASKS

    tasks = _head_values([item.strip() for value in values for item in value.split(",") if item.strip()], "--task")
    for head, task in tasks.items():
        if task not in TASKS:
            raise argparse.ArgumentTypeError(f"--task {head + '=' if head else ''}{task}: {task!r} is not a task; "
                                             f"the tasks are {', '.join(TASKS)}")
    return tasks


def parse_labels(values: list[str]) -> dict[str | None, list[str]]:
    """`--labels a,b,c` (the only head) or `--labels HEAD=a,b,c` (repeatable) -> {head: labels}."""
    return {head: [label.strip() for label in text.split(",")]
            for head, text in _head_values(values, "--labels").items()}


def import_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ensemble-train import",
        description="Publish existing members (SavedModel folders or .keras files) as a new version. "
        "Inputs and outputs are read from the members (named inputs, several heads, strings, variable "
        "lengths); each head's task from its final activation where it says so, else from --task. One "
        "fixed numeric input and one softmax head publish manifest format 1, anything else format 2.")
    p.add_argument("--name", required=True, help="ensemble name in the repository")
    p.add_argument("--repository", type=location_of, default=Path("models"),
                   help="a folder, or an object store's s3://, gs:// or az:// location. Default: models")
    p.add_argument("--task", action="append", default=[], metavar="[HEAD=]TASK",
                   help="a head's task where the model does not say it: classification, binary, multilabel or "
                        "regression; TASK alone for the only head, or HEAD=TASK[,HEAD=TASK]")
    p.add_argument("--labels", action="append", default=[], metavar="[HEAD=]A,B,...",
                   help="a head's labels in column order (repeat for several heads: --labels HEAD=a,b). "
                        "Default: 0,1,... (a regression head: its name)")
    p.add_argument("--classes", help="the only head's labels (as --labels A,B,...)")
    p.add_argument("--variance", action="append", default=[], metavar="HEAD[,HEAD]",
                   help="regression heads that give 2k columns: k means, then k variances (a Gaussian head)")
    p.add_argument("paths", nargs="+", type=Path, help="SavedModel folders or .keras files")
    args = p.parse_args(argv)
    if not is_valid_name(args.name):
        _error(f"--name {args.name!r} is not valid: use 1-64 characters of a-z, 0-9, '_' and '-'")
        return EXIT_USAGE
    try:
        tasks, labels = parse_tasks(args.task), parse_labels(args.labels)
    except argparse.ArgumentTypeError as exc:
        _error(str(exc))
        return EXIT_USAGE
    if args.classes and labels:
        _error("give the labels with --labels or --classes, not both")
        return EXIT_USAGE
    variances = {head.strip() for value in args.variance for head in value.split(",") if head.strip()}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.importer import import_members
    from training.publish import PublishError

    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    repository = _repository(args.repository, args.name, None, read_latest=False)
    if repository is None:
        return EXIT_FAILED
    try:
        import_members(repository.destination(), args.name, args.paths, classes,
                       report=lambda line: print(line, flush=True), tasks=tasks, labels=labels, variances=variances)
    except PublishError as exc:
        _error(str(exc))
        print("ensemble-train: nothing was published", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def schedule_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ensemble-train schedule",
        description="Run the training pipeline on a schedule, one run at a time. Every training flag "
        "is accepted and passed to each run. A failed run publishes nothing and is retried at the "
        "next tick.")
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help="cron expression, UTC, e.g. '0 3 * * *' (03:00 every day)")
    when.add_argument("--every", help="interval, e.g. 90s, 15m, 6h, 1d, 1h30m")
    p.add_argument("--initial-run", choices=["if-empty", "always", "never"], default="if-empty",
                   help="run once at start: when the repository holds no version of --name (default), "
                        "always, or never")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (default: never)")
    args, train_args = p.parse_known_args(argv)
    train_parser = build_parser()
    try:
        train = train_parser.parse_args(train_args)
    except SystemExit:
        return EXIT_USAGE

    from training.schedule import ScheduleError, parse_interval, run_schedule, single_scheduler, validate_cron

    try:
        every = parse_interval(args.every) if args.every else None
        if args.cron:
            validate_cron(args.cron)
    except ScheduleError as exc:
        _error(str(exc))
        return EXIT_USAGE
    repository = _repository(train.repository, train.name, train.work_dir)
    if repository is None:
        return EXIT_FAILED
    empty = not any(v.committed for v in scan_model(repository.local, train.name))
    run_first = args.initial_run == "always" or (args.initial_run == "if-empty" and empty)
    lock = (train.work_dir or repository.local / ".work") / f"schedule-{train.name}.lock"
    # SIGTERM (docker stop, Kubernetes) ends the scheduler like Ctrl-C: a running training child
    # is killed with it, which is safe, since an unfinished run has published nothing.
    previous_handler = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        with single_scheduler(lock):
            print(f"[schedule] {train.name}: {'cron ' + args.cron if args.cron else 'every ' + args.every}"
                  f"{'; first run now' if run_first else ''}", flush=True)
            failures = run_schedule([a for a in train_args if a != "--if-empty"], args.cron, every,
                                    run_first, args.max_runs, report=lambda line: print(line, flush=True))
    except ScheduleError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return EXIT_FAILED if failures and args.max_runs else EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "import":
        return import_main(argv[1:])
    if argv and argv[0] == "schedule":
        return schedule_main(argv[1:])
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
