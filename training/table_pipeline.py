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
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from contract.manifest import TENSOR_NAME, DataInfo, HeadSpec, TensorSpec
from training.data import DataError, Examples, FitSplits, is_text_folder
from training.gate import GateDecision
from training.publish import MemberArtifact, publish_named_version

if TYPE_CHECKING:
    from training.pipeline import TrainConfig, TrainResult

# Part of the tuner's project name: a changed table search space must not resume an old search.
TABLE_SPACE_VERSION = 1


def head_name(label_columns: tuple[str, ...], task: str) -> str:
    """The head's name in the manifest: the label column's, when there is one and it is a valid
    tensor name; `labels` (multi-label) or `targets` (several regression targets) otherwise."""
    if len(label_columns) == 1 and re.fullmatch(TENSOR_NAME, label_columns[0]):
        return label_columns[0]
    return "labels" if task == "multilabel" else "targets" if task == "regression" else "label"


# The abstention target of each task when --target-error is not given: the error rate of the
# answered rows (classes, labels: a row is wrong when any label is), or for regression their
# RMSE as a share of the target's standard deviation.
DEFAULT_TARGET_ERROR = {"classification": 0.02, "binary": 0.02, "multilabel": 0.05, "regression": 0.5}


def gate_metrics(task: str) -> tuple[str, ...]:
    """What the gate may compare for a task: its headline metrics, but not an interval's coverage
    or width, each meaningless without the other."""
    from training.task_metrics import HEADLINE

    return tuple(m for m in HEADLINE[task] if not m.startswith(("coverage_", "width_")))


def default_gate_metric(task: str) -> str:
    """What the gate compares when not told: accuracy for classes, the NLL of the other tasks."""
    return "accuracy" if task == "classification" else "nll"


def check_input_names(columns: list[str], path: str) -> None:
    """Every column must be a valid input name (the manifest's TENSOR_NAME): say which is not."""
    bad = [c for c in columns if not re.fullmatch(TENSOR_NAME, c)]
    if bad:
        raise DataError(f"{path}: column name(s) {', '.join(map(repr, bad))} cannot name a model input (1-64 "
                        "characters of letters, digits, '_', '.', '-', not starting with '.' or '-'); rename "
                        "them or leave them out with --ignore-columns")


def champion_of(repository: Path, name: str, inputs: tuple[TensorSpec, ...], head: HeadSpec,
                columns: dict[str, np.ndarray], target: np.ndarray, task_metrics: Callable):
    """(the newest published version of `name`, its metrics on these rows), or None when there is
    none. A version that takes other inputs or answers another head is not comparable and its
    clients would break: that is a DataError (publish under another --name, or --no-gate)."""
    from contract.manifest import read_manifest
    from contract.tasks import combine
    from training.members import predict_named_saved_model
    from training.publish import latest_committed

    version = latest_committed(repository, name)
    if version is None:
        return None
    vdir = repository / name / str(version)
    manifest = read_manifest(vdir)
    theirs = manifest.signature()
    ours_inputs = {(s.name, s.dtype, s.shape) for s in inputs}
    if {(s.name, s.dtype, s.shape) for s in theirs.inputs} != ours_inputs or len(theirs.heads) != 1 \
            or (theirs.heads[0].name, theirs.heads[0].task, theirs.heads[0].labels) != (head.name, head.task, head.labels):
        raise DataError(f"version {version} of {name!r} takes other inputs or answers another head than this run's; "
                        "its clients would break: publish under another --name, or pass --no-gate")
    champion = theirs.heads[0]
    outputs = np.stack([predict_named_saved_model(vdir / m.path, columns, champion.name) for m in manifest.members],
                       axis=1)
    k = champion.columns
    calibration = (champion.variance_scale if champion.task == "regression"
                   else champion.temperatures or (1.0,))
    answer = combine(champion.task, outputs[:, :, :k], manifest.weights, calibration,
                     outputs[:, :, k:2 * k] if champion.variance else None)
    return manifest, task_metrics(answer, target)


def train_table(config: "TrainConfig", report: Callable[[str], None]) -> "TrainResult | None":
    """Train, judge and (if the gate lets it through) publish an ensemble for a table (or a folder
    of texts: a table of one text column)."""
    from training.features import as_inputs, column_stats
    from training.gate import decide
    from training.head_assess import assess_head, measure_answer
    from training.heads import Head, objective_of
    from training.hypermodel import TableHyperModel
    from training.members import export_named_member, predict_named_saved_model
    from training.pipeline import TrainResult, member_exports, published, search_and_train
    from training.report import report_json
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
    check_input_names(list(table.columns), table.source)
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
    fit = FitSplits(Examples(as_inputs(train.columns, stats), head.fit_target(train.target)),
                    Examples(as_inputs(val.columns, stats), head.fit_target(val.target)))
    inputs = tuple(s.spec() for s in stats)
    digest = fingerprint_table(table)
    project = f"{config.name}-{digest[:12]}-t{TABLE_SPACE_VERSION}"

    with member_exports(config) as exports:
        searched = search_and_train(config, hypermodel, fit, budget, project, exports, started, report,
                                    export=lambda model, path: export_named_member(model, path, inputs, name))
        if searched is None:
            return None
        trained, search_record = searched
        names = [t.name for t in trained]
        val_in, test_in = as_inputs(val.columns, stats), as_inputs(test.columns, stats)
        val_out = np.stack([predict_named_saved_model(t.export_dir, val_in, name) for t in trained])
        test_out = np.stack([predict_named_saved_model(t.export_dir, test_in, name) for t in trained])
        found = assess_head(task, names, val_out, test_out, val.target, test.target,
                            variance=task == "regression", weighting=config.weighting,
                            calibrate=config.calibration == "temperature",
                            target_error=config.target_error or DEFAULT_TARGET_ERROR[task],
                            seed=config.seed, min_members=config.min_members)
        for line in found.describe(kinds={t.name: t.kind for t in trained}):
            report(line)
        spec = found.head_spec(name, table.labels)
        ens = found.ensemble

        if config.gate:
            champion = champion_of(config.repository, config.name, inputs, spec, test_in, test.target,
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
            "search": search_record,
            "members": {t.name: {"kind": t.kind, "kept": t.name in found.kept, "weight": found.weight_of(t.name),
                                 "hyperparameters": t.hyperparameters} for t in trained},
            "weighting": config.weighting,
            "heads": {name: found.summary()},
            "gate": asdict(decision),
            "seconds": round(time.monotonic() - started, 1),
        }
        if not decision.passed:
            return TrainResult(None, decision, found, run_report)
        kept = [t for t in trained if t.name in found.kept]
        selected = found.member_metrics[found.selected]
        finite = lambda metrics: {k: v for k, v in metrics.items() if np.isfinite(v)}  # noqa: E731
        manifest = publish_named_version(
            config.repository, config.name,
            [MemberArtifact(name=t.name, kind=t.kind, source=t.export_dir, weight=found.weight_of(t.name),
                            hyperparameters=t.hyperparameters, metrics=finite(found.member_metrics[t.name]))
             for t in kept],
            inputs, (spec,),
            {**finite(ens), **{f"selected_member_{k}": v for k, v in finite(selected).items()}},
            DataInfo(source=table.source, fingerprint=digest, rows=run_report["data"]["rows"]),
            {"report.json": report_json(run_report)},
        )
    report(published(config, manifest, started))
    return TrainResult(manifest, decision, found, run_report)
