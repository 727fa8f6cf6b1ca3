"""The trainer on tables against scikit-learn baselines on the same split (issue 28's must-holds).

- regression: scikit-learn's diabetes data as a CSV with `sex` written as words and some `bmi`
  cells empty; the ensemble's R² against a ridge regression's (the same imputation and one-hot a
  data scientist would do in a pipeline), its test NLL against the member chosen on validation,
  and the share of test rows inside its 90% intervals;
- multi-label: a named-column table from `sklearn.datasets.make_multilabel_classification`
  (five labels); the ensemble's micro-F1 against one-vs-rest logistic regression's.

Each baseline is fitted on the trainer's own training and validation rows and scored on its test
rows (`training.tables.split_table` with the run's seed), read back from the published version's
report.

    .venv/bin/python benchmarks/table_baselines.py --out /tmp/table-baselines.json
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SEED = 0


def diabetes_csv(folder: Path) -> Path:
    """Diabetes as a user would have it: `sex` as words, 20 `bmi` cells empty, an `id` column."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes(scaled=False)
    empty = set(np.random.default_rng(SEED).choice(len(d.target), 20, replace=False).tolist())
    path = folder / "diabetes.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *d.feature_names, "progression"])
        for i, (row, y) in enumerate(zip(d.data, d.target)):
            cells = [f"{v:g}" for v in row]
            cells[1] = "female" if row[1] == 1 else "male"
            if i in empty:
                cells[2] = ""
            writer.writerow([i, *cells, f"{y:g}"])
    return path


def multilabel_csv(folder: Path) -> Path:
    """Twelve named numeric features and five 0/1 label columns."""
    from sklearn.datasets import make_multilabel_classification

    x, y = make_multilabel_classification(n_samples=1500, n_features=12, n_classes=5, n_labels=2,
                                          random_state=SEED)
    path = folder / "labels.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*(f"f{i}" for i in range(12)), *(f"label{j}" for j in range(5))])
        writer.writerows([[*(int(v) for v in row), *(int(v) for v in labels)] for row, labels in zip(x, y)])
    return path


def train(data: Path, labels: str, task: str, repository: Path, extra: list[str]) -> tuple[dict, float]:
    """Train through the CLI with its default budget; (the published report, seconds)."""
    from training.cli import main

    started = time.monotonic()
    code = main(["--data", str(data), "--label-column", labels, "--task", task, "--name", data.stem,
                 "--repository", str(repository), "--seed", str(SEED), "--no-gate", *extra])
    if code != 0:
        raise SystemExit(f"training {data} failed with exit code {code}")
    report = json.loads((repository / data.stem / "1" / "report.json").read_text())
    return report, time.monotonic() - started


def splits(data: Path, labels: str, task: str, ignore: tuple[str, ...] = ()):
    """The trainer's own (train + validation, test) rows of the table."""
    from training.tables import read_table, split_table

    table = read_table(data, labels.split(","), task, ignore=ignore)
    train, val, test = split_table(table, SEED)
    return table, train, val, test


def design(table, part, means=None):
    """A numeric matrix as a scikit-learn pipeline would make it: numbers imputed with the
    training mean plus a missing indicator, strings one-hot."""
    columns, fitted = [], means or {}
    for name, kind in table.kinds.items():
        values = part.columns[name]
        if kind == "string":
            for level in sorted(set(table.columns[name].tolist()) - {""}):
                columns.append((values == level).astype(float))
        else:
            if name not in fitted:
                fitted[name] = float(np.nanmean(values))
            missing = np.isnan(values)
            columns.append(np.where(missing, fitted[name], values))
            if np.isnan(table.columns[name]).any():
                columns.append(missing.astype(float))
    return np.stack(columns, axis=1), fitted


def regression(folder: Path, repository: Path) -> dict:
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.preprocessing import StandardScaler

    data = diabetes_csv(folder)
    report, seconds = train(data, "progression", "regression", repository, ["--ignore-columns", "id"])
    table, train_rows, val_rows, test_rows = splits(data, "progression", "regression", ("id",))
    dev_x, means = design(table, train_rows)
    val_x, _ = design(table, val_rows, means)
    test_x, _ = design(table, test_rows, means)
    scaler = StandardScaler().fit(np.concatenate([dev_x, val_x]))
    ridge = RidgeCV(alphas=np.logspace(-3, 3, 13)).fit(scaler.transform(np.concatenate([dev_x, val_x])),
                                                      np.concatenate([train_rows.target, val_rows.target]).ravel())
    head = report["heads"]["progression"]
    after = head["calibration"]["test_after"]
    versus = head["versus_selected_member"]["differences"]
    return {"seconds": round(seconds), "ensemble_r2": after["r2"],
            "ridge_r2": r2_score(test_rows.target.ravel(), ridge.predict(scaler.transform(test_x))),
            "ensemble_nll": after["nll"], "selected_member": head["versus_selected_member"]["member"],
            "selected_nll": versus["nll"]["member"], "nll_difference": [versus["nll"]["low"], versus["nll"]["high"]],
            "coverage_90": after["coverage_90"], "test_rows": test_rows.rows,
            "cross_fitted": report.get("cross_fitted")}


def multilabel(folder: Path, repository: Path) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    data = multilabel_csv(folder)
    names = ",".join(f"label{j}" for j in range(5))
    report, seconds = train(data, names, "multilabel", repository, [])
    table, train_rows, val_rows, test_rows = splits(data, names, "multilabel")
    dev_x = np.concatenate([design(table, train_rows)[0], design(table, val_rows)[0]])
    scaler = StandardScaler().fit(dev_x)
    model = OneVsRestClassifier(LogisticRegression(max_iter=2000)).fit(
        scaler.transform(dev_x), np.concatenate([train_rows.target, val_rows.target]))
    predicted = model.predict(scaler.transform(design(table, test_rows)[0]))
    after = report["heads"]["labels"]["calibration"]["test_after"]
    return {"seconds": round(seconds), "ensemble_micro_f1": after["micro_f1"],
            "logistic_micro_f1": f1_score(test_rows.target, predicted, average="micro"),
            "ensemble_macro_f1": after["macro_f1"],
            "logistic_macro_f1": f1_score(test_rows.target, predicted, average="macro"),
            "test_rows": test_rows.rows, "cross_fitted": report.get("cross_fitted")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["regression", "multilabel"], default=None)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="table-baselines-") as tmp:
        folder = Path(tmp)
        for name, run in (("regression", regression), ("multilabel", multilabel)):
            if args.only in (None, name):
                results[name] = run(folder, folder / "models")
                print(json.dumps({name: results[name]}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
