"""`ensemble-train`: tune, train, evaluate and publish an ensemble from the command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from service.repository import is_valid_name, scan_model

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ensemble-train",
        description="Tune Keras models with Keras Tuner, train the top configurations as ensemble "
        "members, evaluate them on a held-out split and publish a new version atomically.",
    )
    p.add_argument("--data", default="digits",
                   help="'digits' (built in, no download) or a path to an .npz file with arrays x and y "
                        "(and optionally classes). Default: digits")
    p.add_argument("--name", default="digits", help="ensemble name in the repository. Default: digits")
    p.add_argument("--repository", type=Path, default=Path("models"),
                   help="model repository folder. Default: models")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where tuner state is kept (resumable). Default: <repository>/.work")
    p.add_argument("--members", type=int, default=5, help="number of ensemble members. Default: 5")
    p.add_argument("--max-epochs", type=int, default=9,
                   help="Hyperband's largest per-trial epoch budget; the search cost grows with it. Default: 9")
    p.add_argument("--factor", type=int, default=3, help="Hyperband reduction factor. Default: 3")
    p.add_argument("--epochs", type=int, default=60,
                   help="maximum epochs for each member (early stopping on validation loss). Default: 60")
    p.add_argument("--patience", type=int, default=10, help="early-stopping patience in epochs. Default: 10")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size. Default: 32")
    p.add_argument("--seed", type=int, default=0, help="seed for splits, search and members. Default: 0")
    p.add_argument("--if-empty", action="store_true",
                   help="do nothing if the repository already holds a published version of --name")
    p.add_argument("--verbose", action="store_true", help="let Keras Tuner print every epoch")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not is_valid_name(args.name):
        print(f"ensemble-train: error: --name {args.name!r} is not valid: use 1-64 characters of "
              "a-z, 0-9, '_' and '-', starting with a letter or digit", file=sys.stderr)
        return EXIT_USAGE
    if args.if_empty:
        published = [v.version for v in scan_model(args.repository, args.name) if v.committed]
        if published:
            print(f"[train] {args.repository / args.name} already has version {max(published)}; "
                  "nothing to do (--if-empty)", flush=True)
            return EXIT_OK

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from training.data import DataError
    from training.pipeline import TrainConfig, train_ensemble
    from training.publish import PublishError
    from training.tune import SearchBudget

    try:
        config = TrainConfig(
            data=args.data,
            name=args.name,
            repository=args.repository,
            work_dir=args.work_dir,
            budget=SearchBudget(max_epochs=args.max_epochs, factor=args.factor, batch_size=args.batch_size),
            members=args.members,
            epochs=args.epochs,
            patience=args.patience,
            seed=args.seed,
            verbose=1 if args.verbose else 0,
        )
    except ValueError as exc:
        print(f"ensemble-train: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        train_ensemble(config, report=lambda line: print(line, flush=True))
    except (DataError, PublishError) as exc:
        print(f"ensemble-train: error: {exc}", file=sys.stderr)
        print("ensemble-train: nothing was published", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
