"""The training pipeline for a table (CSV or Parquet): its named columns in, the head of its task
out, published in manifest format 2.

The same steps as `training.pipeline` for arrays (search, members of four kinds, pool then
calibrate on validation, the honest comparison on test, abstention, the gate, publish), with
the table's own parts: every column an input of the members, preprocessed inside them
(`training.features`; a text column is tokenised there too); the task's head and loss
(`training.heads`); the task's selection, calibration and metrics (`training.head_assess`), in
the terms the server combines them with (`contract.tasks`). A folder of texts is a table of one
text column (`training.text_folder`).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from contract.manifest import DataInfo, HeadSpec, TensorSpec
from training.data import DataError, Examples, FitSplits, is_text_folder
from training.gate import GateDecision
from training.publish import MemberArtifact, publish_named_version

if TYPE_CHECKING:
    from training.pipeline import TrainConfig, TrainResult

# Part of the tuner's project name: a changed table search space must not resume an old search.
TABLE_SPACE_VERSION = 2


def head_name(label_columns: tuple[str, ...], task: str) -> str:
    """The head's name in the manifest: the label column's when there is one (as `safe_name`
    makes it); `labels` (multi-label) or `targets` (several regression targets) otherwise."""
    if len(label_columns) == 1:
        return safe_name(label_columns[0])
    return "labels" if task == "multilabel" else "targets"


# The abstention target of each task when --target-error is not given: the error rate of the
# answered rows (classes, labels: a row is wrong when any label is), or for regression their
# RMSE as a share of the target's standard deviation.
DEFAULT_TARGET_ERROR = {"classification": 0.02, "binary": 0.02, "multilabel": 0.05, "regression": 0.5}


def gate_metrics(task: str) -> tuple[str, ...]:
    """What the gate may compare for a task: its headline metrics, but not an interval's coverage
    or width, each meaningless without the other."""
    from training.task_metrics import HEADLINE

    return tuple(m for m in HEADLINE[task] if not m.startswith(("coverage_", "width_")))


def cross_fitting(mode: str, rows: int) -> bool:
    """Whether a table's members are cross-fitted (`training.crossfit`): `auto` below SMALL_ROWS
    development rows, `always`, or `never`."""
    from training.crossfit import SMALL_ROWS

    return mode == "always" or (mode == "auto" and rows < SMALL_ROWS)


def served_reference(task: str, outputs: np.ndarray, weights: list[float], head: HeadSpec) -> dict[str, float]:
    """The mean of each uncertainty score (reduced per row as the server reduces it) of the
    served answer to these models' outputs (models, rows, c): the drift alert's reference."""
    from contract.tasks import combine_head
    from training.head_assess import row_scores

    answer = combine_head(head, np.moveaxis(outputs, 0, 1), weights)
    return {score: float(values.mean()) for score, values in row_scores(task, answer).items()}


def default_gate_metric(task: str) -> str:
    """What the gate compares when not told: accuracy for classes, the NLL of the other tasks."""
    return "accuracy" if task == "classification" else "nll"


def safe_name(text: str) -> str:
    """`text` as a name every part takes unchanged: letters, digits and `_`, a letter first."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", text)
    return (name if name[:1].isascii() and name[:1].isalpha() else f"c_{name}")[:64]


def input_names(columns: list[str]) -> dict[str, str]:
    """Each column's input name: letters, digits and `_`, starting with a letter (a SavedModel's
    signature renames anything else, `ok-1` to `ok_1`, `_x` not at all): the column's own name
    where it is one, else with every other character made `_` (`mean radius` -> `mean_radius`)
    and `c_` before a first character that is not a letter (`1st` -> `c_1st`); a made name that
    is taken gets a number (`_2`, `_3`). Columns whose names are valid keep them."""
    names = {c: c for c in columns if safe_name(c) == c}
    taken = set(names.values())
    for column in columns:
        if column in names:
            continue
        name, n = safe_name(column), 1
        while name in taken:  # `年齢` and `性別` are both `c___`
            n += 1
            name = f"{safe_name(column)[:60]}_{n}"
        names[column] = name
        taken.add(name)
    return {c: names[c] for c in columns}


def renamed(table, names: dict[str, str]):
    """The table with its feature columns under their input names."""
    return replace(table, columns={names[c]: v for c, v in table.columns.items()},
                   kinds={names[c]: k for c, k in table.kinds.items()},
                   notes=(*table.notes, *(f"column {c!r} is input {n!r}" for c, n in names.items() if c != n)))


def comparable_champion(repository: Path, name: str, inputs: tuple[TensorSpec, ...], head: str, task: str,
                        labels: tuple[str, ...]):
    """The newest published version of `name` (its manifest and folder), or None when there is
    none. One that takes other inputs or answers another head is not comparable, and its clients
    would break: a DataError (publish under another --name, or --no-gate). Checked before any
    training, so a run does not learn this at its end."""
    from contract.manifest import read_manifest
    from training.publish import latest_committed

    version = latest_committed(repository, name)
    if version is None:
        return None
    vdir = repository / name / str(version)
    manifest = read_manifest(vdir)
    theirs = manifest.signature()
    if {(s.name, s.dtype, s.shape) for s in theirs.inputs} != {(s.name, s.dtype, s.shape) for s in inputs} \
            or [(h.name, h.task, h.labels) for h in theirs.heads] != [(head, task, tuple(labels))]:
        raise DataError(f"version {version} of {name!r} takes other inputs or answers another head than this run's; "
                        "its clients would break: publish under another --name, or pass --no-gate")
    return manifest, vdir


def champion_metrics(champion, columns: dict[str, np.ndarray], target: np.ndarray, task_metrics: Callable):
    """(the champion's manifest, its metrics on these rows as it serves them), or None for none."""
    from contract.tasks import combine_head
    from training.members import predict_named_saved_model

    if champion is None:
        return None
    manifest, vdir = champion
    head = manifest.signature().heads[0]
    outputs = np.stack([predict_named_saved_model(vdir / m.path, columns, head.name) for m in manifest.members],
                       axis=1)
    return manifest, task_metrics(combine_head(head, outputs, manifest.weights), target)


@dataclass(frozen=True)
class MemberJob:
    """What either way of training a table's members needs: the run's settings, the search space
    and head, the columns, the search's budget and project, and how a member is exported."""

    config: "TrainConfig"
    hypermodel: object
    head: object
    name: str
    stats: list
    budget: object
    project: str
    started: float
    export: Callable


@dataclass(frozen=True)
class Members:
    """What the member phase made: every member by name (kind, hyperparameters), their outputs
    on the rows the ensemble is chosen on (`val`: the validation split, or every development row
    out of fold, with `val_target`) and on the test rows, the search's record, the models to
    publish for the kept members (`published(weights)`: (model, its weight) pairs), and for
    cross-fitted members every fold model's test outputs (`served_test`)."""

    names: list[str]
    kinds: dict[str, str]
    hyperparameters: dict[str, dict]
    val: np.ndarray
    val_target: np.ndarray
    test: np.ndarray
    search_record: dict
    published: Callable[[dict[str, float]], list]
    served_test: Callable | None = None


def members_once(job: MemberJob, fit, val, test_in: dict, exports: Path, report) -> Members | None:
    """Members trained once each on the training split, chosen on the validation split; None in a
    distributed-tuning worker."""
    from training.crossfit import MemberModel
    from training.members import predict_named_sets
    from training.pipeline import search_and_train

    searched = search_and_train(job.config, job.hypermodel, fit, job.budget, job.project, exports, job.started, report,
                                export=job.export)
    if searched is None:
        return None
    trained, record = searched
    val_in = fit.val.x  # the validation columns as the members take them, built for their fit
    models = [MemberModel(t.name, 0, t.name, t.kind, t.export_dir, t.hyperparameters) for t in trained]
    outputs = [predict_named_sets(t.export_dir, job.name, [val_in, test_in]) for t in trained]
    return Members(
        names=[t.name for t in trained], kinds={t.name: t.kind for t in trained},
        hyperparameters={t.name: t.hyperparameters for t in trained},
        val=np.stack([on_val for on_val, _ in outputs]),
        val_target=val.target,
        test=np.stack([on_test for _, on_test in outputs]),
        search_record=record,
        published=lambda weights: [(m, weights[m.member]) for m in models if m.member in weights])


def members_cross_fitted(job: MemberJob, fit, dev, test_in: dict, exports: Path, report) -> Members | None:
    """Members cross-fitted on the development rows (`training.crossfit`); None in a
    distributed-tuning worker."""
    from training.crossfit import FOLDS, folds_of, train_cross_fitted
    from training.features import as_inputs
    from training.members import MemberTrainer, predict_named_sets
    from training.pipeline import search_runs

    config, head = job.config, job.head
    searched = search_runs(config, job.hypermodel, fit, job.budget, job.project, job.started, report)
    if searched is None:
        return None
    report, phase = searched.display.line, searched.phase(config.member_options, FOLDS)
    folds = folds_of(dev.target, head.task, FOLDS, config.seed)
    dev_in = as_inputs(dev.columns, job.stats)

    def rows(which: np.ndarray) -> dict:
        return {c: v[which] for c, v in dev_in.items()}

    def make_trainer(k: int):
        rest = np.setdiff1d(np.arange(dev.rows), folds[k])
        splits = FitSplits(Examples(rows(rest), head.fit_target(dev.target[rest])),
                           Examples(rows(folds[k]), head.fit_target(dev.target[folds[k]])))
        return MemberTrainer(job.hypermodel, splits, config.member_options, exports / f"fold{k}",
                             config.resolved_work_dir() / "backup" / job.project, report, job.export, phase)

    def predict(export_dir, k: int):
        return tuple(predict_named_sets(export_dir, job.name, [rows(folds[k]), test_in]))

    fitted = train_cross_fitted(searched.runs, make_trainer, folds, predict, head.task, head.task == "regression",
                                report, phase.begin)
    return Members(fitted.names, fitted.kinds, fitted.hyperparameters, fitted.val, dev.target, fitted.test,
                   searched.record, fitted.published, fitted.served_test)


def train_table(config: "TrainConfig", report: Callable[[str], None]) -> "TrainResult | None":
    """Train, judge and (if the gate lets it through) publish an ensemble for a table (or a folder
    of texts: a table of one text column)."""
    from training.features import as_inputs, column_stats
    from training.gate import decide
    from training.head_assess import assess_head, measure_answer
    from training.heads import Head, objective_of
    from training.hypermodel import TableHyperModel
    from training.crossfit import FOLDS, SMALL_ROWS, concat_tables
    from training.members import export_named_member
    from training.pipeline import TrainResult, member_exports, published
    from training.report import head_attachments
    from training.tables import fingerprint_table, read_table, split_table
    from training.task_metrics import higher_is_better
    from training.text_folder import read_text_folder

    started = time.monotonic()
    o = config.data_options
    if is_text_folder(config.data):
        table = read_text_folder(config.data, o.task, skip_unreadable=o.skip_unreadable)
    else:
        table = read_table(config.data, o.label_columns, o.task, delimiter=o.delimiter, categorical=o.categorical,
                           numeric=o.numeric, ignore=o.ignore, text=o.text)
    table = renamed(table, input_names(list(table.columns)))
    task = table.task
    metric = config.gate_metric or default_gate_metric(task)
    if metric not in gate_metrics(task):
        raise DataError(f"--gate-metric {metric!r} is not a metric of a {task} head; choose one of "
                        f"{', '.join(gate_metrics(task))}")
    for note in table.notes:
        report(f"[data] {note}")
    train, val, test = split_table(table, config.seed, config.val_fraction, config.test_fraction)
    report(f"[data] {table.source}: {table.describe()}; {train.rows} train / {val.rows} validation / "
           f"{test.rows} test")

    stats = [column_stats(n, table.kinds[n], train.columns[n]) for n in table.columns]
    name = head_name(table.label_columns, task)
    head = Head(task, len(table.labels), name, train.target if task == "regression" else None)
    hypermodel = TableHyperModel(stats, head)
    budget = config.budget if config.objective_given else replace(config.budget, objective=objective_of(task))
    if budget.objective != objective_of(task) and task != "classification":
        raise DataError(f"--objective {budget.objective} is not measured for a {task} head (Keras reports its "
                        f"loss, not an accuracy): use --objective {objective_of(task)}")
    fit = FitSplits(Examples(as_inputs(train.columns, stats), head.fit_target(train.target)),
                    Examples(as_inputs(val.columns, stats), head.fit_target(val.target)))
    inputs = tuple(s.spec() for s in stats)
    champion = (comparable_champion(config.repository, config.name, inputs, name, task, table.labels)
                if config.gate else None)
    digest = fingerprint_table(table)
    project = f"{config.name}-{digest[:12]}-t{TABLE_SPACE_VERSION}"

    job = MemberJob(config, hypermodel, head, name, stats, budget, project, started,
                    lambda model, path: export_named_member(model, path, inputs, name))
    test_in = as_inputs(test.columns, stats)
    development_rows = train.rows + val.rows
    cross = cross_fitting(config.cross_fit, development_rows)
    with member_exports(config) as exports:
        if cross:
            report(f"[crossfit] {development_rows} development rows (fewer than {SMALL_ROWS}): every member is "
                   f"trained {FOLDS} times, each fold held out once; the ensemble is chosen and calibrated on all "
                   f"{development_rows} out-of-fold predictions")
            # Only here are the training and validation rows needed as one table (a copy of both).
            made = members_cross_fitted(job, fit, concat_tables(train, val), test_in, exports, report)
        else:
            made = members_once(job, fit, val, test_in, exports, report)
        if made is None:
            return None
        names, kinds, val_out, test_out = made.names, made.kinds, made.val, made.test
        found = assess_head(task, names, val_out, test_out, made.val_target, test.target,
                            variance=task == "regression", weighting=config.weighting,
                            calibrate=config.calibration == "temperature",
                            target_error=config.target_error or DEFAULT_TARGET_ERROR[task],
                            seed=config.seed, min_members=config.min_members, total_only=cross)
        for line in found.describe(kinds=kinds):
            report(line)
        spec = found.head_spec(name, table.labels)
        if made.served_test is not None:  # the drift reference as the server will score: every model, test rows
            served, weights = made.served_test({n: found.weight_of(n) for n in found.kept})
            spec = spec.model_copy(update={"uncertainty_reference": served_reference(task, served, weights, spec)})
        ens = found.ensemble

        if config.gate:
            champion = champion_metrics(champion, test_in, test.target,
                                        lambda answer, target: measure_answer(task, answer, target, found.floor))
            decision = decide(ens, champion, metric, config.gate_tolerance, found.versus_selected.get(metric),
                              found.selected, higher_is_better)
        else:
            decision = GateDecision(True, metric, config.gate_tolerance, ens[metric], None, None,
                                    "gate disabled (--no-gate)")
        report(f"[gate] {decision.reason}")
        run_report = {
            "name": config.name,
            "data": {"source": table.source, "fingerprint": digest, "task": task, "labels": list(table.labels),
                     "columns": dict(table.kinds), "notes": list(table.notes),
                     "rows": {"train": train.rows, "validation": val.rows, "test": test.rows}},
            "search": made.search_record,
            "members": {n: {"kind": kinds[n], "kept": n in found.kept, "weight": found.weight_of(n),
                            "hyperparameters": made.hyperparameters[n]} for n in names},
            "cross_fitted": {"folds": FOLDS, "rows": development_rows} if cross else None,
            "weighting": config.weighting,
            "heads": {name: found.summary()},
            "gate": asdict(decision),
            "seconds": round(time.monotonic() - started, 1),
        }
        if not decision.passed:
            return TrainResult(None, decision, found, run_report)
        selected = found.member_metrics[found.selected]
        finite = lambda metrics: {k: v for k, v in metrics.items() if np.isfinite(v)}  # noqa: E731
        artifacts = [MemberArtifact(name=f.name, kind=f.kind, source=f.export_dir, weight=weight,
                                    hyperparameters=f.hyperparameters, metrics=finite(found.member_metrics[f.member]))
                     for f, weight in made.published({n: found.weight_of(n) for n in found.kept})]
        manifest = publish_named_version(
            config.target.destination(), config.name,
            artifacts,
            inputs, (spec,),
            {**finite(ens), **{f"selected_member_{k}": v for k, v in finite(selected).items()}},
            DataInfo(source=table.source, fingerprint=digest, rows=run_report["data"]["rows"]),
            head_attachments(run_report, found, test.target, test_out[names.index(found.selected)], table.labels),
        )
    report(published(config, manifest, started))
    return TrainResult(manifest, decision, found, run_report)
