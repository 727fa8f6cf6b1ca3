"""The ensemble on text against TF-IDF + logistic regression (issue 28's must-hold: accuracy within
2 points of it), on the same rows split the same way.

The data: a folder of short documents made from docstrings that ship with installed packages,
each package a class (`PACKAGES`): the first paragraph of each function's or class's docstring,
its spaces normalised, four words or more, texts found in two packages dropped, `--per-class`
drawn from each with a fixed seed. A summary line such as "Compute the arithmetic mean along
the specified axis." could come from numpy, scipy or keras: the task is not trivial.

The ensemble is trained through `ensemble-train` on the folder (the default budget, or the
trainer flags given after `--`) and measured as it is served: the published members' outputs
combined with the published weights and temperature (`contract.tasks.combine`) on the test rows.
The baseline is read from the same folder and split by `training.tables.split_table` with the
same seed (checked against the published data fingerprint and row counts); its settings
(n-grams, minimum document frequency, C) are chosen on the validation split, it is fitted on the
training split as the members are, and measured on the test split. Both accuracies are printed
with a paired bootstrap interval of their difference.

    taskset -c 1 .venv/bin/python benchmarks/text_baseline.py [--work DIR] [--per-class 600] [-- TRAIN FLAGS]
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PACKAGES = ("numpy", "scipy", "sklearn", "matplotlib", "keras", "textual")
DISTRIBUTIONS = {"sklearn": "scikit-learn"}
MIN_WORDS = 4


def first_paragraphs(package: str) -> set[str]:
    """The first paragraph of every function's and class's docstring in an installed package
    (its tests left out), spaces normalised, of MIN_WORDS words or more."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed")
    found = set()
    for path in sorted(Path(spec.submodule_search_locations[0]).rglob("*.py")):
        if {"tests", "test"} & set(path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                doc = ast.get_docstring(node)
                paragraph = " ".join(doc.split("\n\n")[0].split()) if doc else ""
                if len(paragraph.split()) >= MIN_WORDS:
                    found.add(paragraph)
    return found


def build_corpus(folder: Path, per_class: int, seed: int) -> dict[str, int]:
    """Write `per_class` documents of each package into folder/<package>/NNNN.txt; {package: count}."""
    texts = {p: first_paragraphs(p) for p in PACKAGES}
    shared = {t for p in PACKAGES for t in texts[p] if any(t in texts[q] for q in PACKAGES if q != p)}
    rng = np.random.default_rng(seed)
    counts = {}
    for package in PACKAGES:
        own = sorted(texts[package] - shared)
        chosen = rng.choice(len(own), size=min(per_class, len(own)), replace=False)
        (folder / package).mkdir(parents=True, exist_ok=True)
        for i, index in enumerate(sorted(chosen)):
            (folder / package / f"{i:04d}.txt").write_text(own[index], encoding="utf-8")
        counts[package] = len(chosen)
    return counts


def ensemble_accuracy(version_dir: Path, texts: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Whether the published ensemble, combined as served, is right on each row."""
    from contract.manifest import read_manifest
    from contract.tasks import combine_head
    from training.members import predict_named_saved_model

    manifest = read_manifest(version_dir)
    head = manifest.heads[0]
    outputs = np.stack([predict_named_saved_model(version_dir / m.path, {"text": texts}, head.name)
                        for m in manifest.members], axis=1)
    answer = combine_head(head, outputs, manifest.weights)
    return np.argmax(answer.value, axis=1) == target


def baseline_accuracy(train, val, test) -> tuple[np.ndarray, dict]:
    """TF-IDF + logistic regression: settings chosen on validation, fitted on train; right on each test row."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    best = None
    for ngrams in ((1, 1), (1, 2)):
        for min_df in (1, 2):
            vectorizer = TfidfVectorizer(ngram_range=ngrams, min_df=min_df, sublinear_tf=True)
            x_train = vectorizer.fit_transform(train.columns["text"])
            x_val = vectorizer.transform(val.columns["text"])
            for c in (0.3, 1.0, 3.0, 10.0, 30.0, 100.0):
                model = LogisticRegression(C=c, max_iter=5000).fit(x_train, train.target)
                accuracy = float(np.mean(model.predict(x_val) == val.target))
                if best is None or accuracy > best[0]:
                    best = (accuracy, {"ngram_range": ngrams, "min_df": min_df, "C": c}, vectorizer, model)
    _, settings, vectorizer, model = best
    return model.predict(vectorizer.transform(test.columns["text"])) == test.target, settings


def paired_interval(a: np.ndarray, b: np.ndarray, seed: int, rounds: int = 2000) -> tuple[float, float]:
    """A 95% bootstrap interval of mean(a) - mean(b) over the same resampled rows."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(a), size=(rounds, len(a)))
    differences = a[rows].mean(axis=1) - b[rows].mean(axis=1)
    return float(np.percentile(differences, 2.5)), float(np.percentile(differences, 97.5))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=None, help="folder for the data and the repository (default: a temporary one)")
    p.add_argument("--per-class", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("train_flags", nargs="*", help="flags for ensemble-train after --")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="text-baseline-"))
    folder, repository = work / "docstrings", work / "models"
    if folder.exists():
        raise SystemExit(f"{folder} exists: give another --work")
    counts = build_corpus(folder, args.per_class, args.seed)
    print("packages: " + ", ".join(f"{p} {version(DISTRIBUTIONS.get(p, p))} ({counts[p]})" for p in PACKAGES))

    from training.cli import main as train_main
    from training.tables import fingerprint_table, split_table
    from training.text_folder import read_text_folder

    flags = ["--data", str(folder), "--repository", str(repository), "--name", "docstrings", "--seed",
             str(args.seed), "--no-gate", *args.train_flags]
    started = time.monotonic()
    code = train_main(flags)
    seconds = time.monotonic() - started
    if code != 0:
        raise SystemExit(f"ensemble-train exited with {code}")

    from contract.manifest import read_manifest

    version_dir = repository / "docstrings" / "1"
    manifest = read_manifest(version_dir)
    table = read_text_folder(folder)
    train, val, test = split_table(table, args.seed)
    rows = {"train": train.rows, "validation": val.rows, "test": test.rows}
    if manifest.data.fingerprint != fingerprint_table(table) or manifest.data.rows != rows:
        raise SystemExit("the baseline's rows are not the trainer's: the fingerprint or the split differs")

    ours = ensemble_accuracy(version_dir, test.columns["text"], test.target)
    theirs, settings = baseline_accuracy(train, val, test)
    low, high = paired_interval(ours.astype(float), theirs.astype(float), args.seed)
    print(f"rows: {rows['train']} train / {rows['validation']} validation / {rows['test']} test, "
          f"{len(table.labels)} classes; ensemble of {len(manifest.members)} members trained in {seconds:.0f} s "
          f"with: ensemble-train {' '.join(flags)}")
    print(f"ensemble (as served):                 test accuracy {ours.mean():.4f}")
    print(f"TF-IDF + logistic regression {settings}: test accuracy {theirs.mean():.4f}")
    difference = ours.mean() - theirs.mean()
    print(f"difference {100 * difference:+.2f} points (95% paired bootstrap [{100 * low:+.2f}, {100 * high:+.2f}]); "
          f"within 2 points: {'yes' if difference >= -0.02 else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
