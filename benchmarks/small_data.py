"""Small tables: does the ensemble beat the member a user would have picked? Cross-fitted members
(`training.crossfit`) against members trained once on a validation split, on scikit-learn's wine
and breast-cancer data written as CSV files.

Each repetition is one half-split: the trainer's own split with half the rows as its test split
(stratified, a different seed each time), so the ensemble and the member chosen on validation
are chosen on one half and compared on the other, with the trainer's own honest comparison
(`report.json`'s `versus_selected_member`). Counted: the repetitions whose ensemble has a lower
test NLL than that member, and an ECE no worse; then, split by split, the cross-fitted
ensemble against the one trained once.

    .venv/bin/python benchmarks/small_data.py --repeats 10 --epochs 60 --out runs.jsonl
    .venv/bin/python benchmarks/small_data.py --sets wine --first-seed 10 --repeats 5 --out runs.jsonl
    .venv/bin/python benchmarks/small_data.py --summary runs.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_csv(name: str, folder: Path) -> Path:
    """A scikit-learn data set as a CSV with a header and a `label` column of class names."""
    from sklearn import datasets

    bunch = {"wine": datasets.load_wine, "cancer": datasets.load_breast_cancer}[name]()
    path = folder / f"{name}.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        columns = [c.replace(" ", "_").replace("/", "_").replace("(", "").replace(")", "") for c in bunch.feature_names]
        writer.writerow([*columns, "label"])
        for row, y in zip(bunch.data, bunch.target):
            writer.writerow([*(f"{v:.6g}" for v in row), str(bunch.target_names[y])])
    return path


def one_run(data: Path, seed: int, cross_fit: str, work: Path, epochs: int) -> dict:
    """Train on one half of `data` (seed `seed`), judge on the other; the run's figures."""
    from training.data import DataOptions
    from training.members import MemberOptions
    from training.pipeline import TrainConfig, train_ensemble
    from training.tune import SearchBudget

    repository = work / f"{data.stem}-{cross_fit}-{seed}"
    config = TrainConfig(data=str(data), name="small", repository=repository, data_options=DataOptions(task=None),
                         budget=SearchBudget(tuner="random", max_trials=3, max_epochs=10),
                         member_options=MemberOptions(epochs=epochs),
                         seed=seed, test_fraction=0.5, val_fraction=0.15, gate=False, cross_fit=cross_fit,
                         target_error=0.05)
    started = time.monotonic()
    result = train_ensemble(config, report=lambda line: None)
    head = next(iter(result.report["heads"].values()))
    versus = head["versus_selected_member"]
    return {"seed": seed, "cross_fit": cross_fit, "seconds": round(time.monotonic() - started, 1),
            "member": versus["member"],
            "ensemble": {m: head["calibration"]["test_after"][m] for m in ("accuracy", "nll", "ece")},
            "selected": {m: versus["differences"][m]["member"] for m in ("accuracy", "nll", "ece")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--sets", default="wine,cancer")
    p.add_argument("--epochs", type=int, default=60, help="tuned and seed members' epoch cap. Default: 60")
    p.add_argument("--first-seed", type=int, default=0, help="the first half-split's seed (to extend a study)")
    p.add_argument("--out", type=Path, default=None,
                   help="append every run's figures to this file, one JSON object a line, as each run ends")
    p.add_argument("--summary", type=Path, default=None,
                   help="only summarise the runs already in this file (one JSON object a line)")
    args = p.parse_args()
    if args.summary:
        runs = [json.loads(line) for line in args.summary.read_text().splitlines() if line.strip()]
        summarise(runs, sorted({r["set"] for r in runs}))
        return
    runs = []
    with tempfile.TemporaryDirectory(prefix="small-data-") as tmp:
        work = Path(tmp)
        for name in args.sets.split(","):
            data = write_csv(name, work)
            for seed in range(args.first_seed, args.first_seed + args.repeats):
                for mode in ("never", "always"):  # interleaved: the same split for both
                    run = {"set": name, **one_run(data, seed, mode, work, args.epochs)}
                    runs.append(run)
                    print(json.dumps(run), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(run) + "\n")
    summarise(runs, args.sets.split(","))


def summarise(runs: list[dict], sets: list[str]) -> None:
    """Per set and mode: wins against the member chosen on validation; then, split by split, the
    cross-fitted ensemble against the one trained once (the choice of the default)."""
    print("\nset      cross-fit  NLL wins  ECE no worse  both  ensemble NLL (median)  selected NLL (median)  s/run")
    for name in sets:
        for mode in ("never", "always"):
            mine = [r for r in runs if r["set"] == name and r["cross_fit"] == mode]
            if not mine:
                continue
            nll = sum(r["ensemble"]["nll"] < r["selected"]["nll"] for r in mine)
            ece = sum(r["ensemble"]["ece"] <= r["selected"]["ece"] for r in mine)
            both = sum(r["ensemble"]["nll"] < r["selected"]["nll"] and r["ensemble"]["ece"] <= r["selected"]["ece"]
                       for r in mine)
            print(f"{name:<8} {mode:<10} {nll:>3}/{len(mine):<5} {ece:>3}/{len(mine):<9} {both:>3}/{len(mine):<3}"
                  f" {statistics.median(r['ensemble']['nll'] for r in mine):>20.4f}"
                  f" {statistics.median(r['selected']['nll'] for r in mine):>21.4f}"
                  f" {statistics.median(r['seconds'] for r in mine):>7.0f}")
    print("\nset      splits  cross-fitted ensemble NLL lower  ECE lower  median NLL difference (cross-fitted - once)")
    for name in sets:
        by_seed: dict[int, dict[str, dict]] = {}
        for r in runs:
            if r["set"] == name:
                by_seed.setdefault(r["seed"], {})[r["cross_fit"]] = r
        pairs = [(s["always"], s["never"]) for s in by_seed.values() if {"always", "never"} <= s.keys()]
        if not pairs:
            continue
        lower = sum(a["ensemble"]["nll"] < b["ensemble"]["nll"] for a, b in pairs)
        ece = sum(a["ensemble"]["ece"] < b["ensemble"]["ece"] for a, b in pairs)
        diff = statistics.median(a["ensemble"]["nll"] - b["ensemble"]["nll"] for a, b in pairs)
        print(f"{name:<8} {len(pairs):>6}  {lower:>31}  {ece:>9}  {diff:>+.4f}")


if __name__ == "__main__":
    main()
