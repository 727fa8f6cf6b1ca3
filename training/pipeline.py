"""The training pipeline: data, search, members, evaluation, gate, publish. Nothing is published
unless every step succeeded and the gate let the challenger through."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np

from contract.manifest import Abstention, Calibration, DataInfo, InputSpec, Manifest, OutputSpec
from training.assess import Assessment, Probabilities, assess
from training.data import DataOptions, Splits, fingerprint, hold_out, is_table, normalization_stats, open_source, split
from training.evaluate import METRICS, format_table
from training.gate import GateDecision, champion_on, decide
from training.members import STRATEGIES, MemberOptions, RunPlan
from training.lock import one_trainer
from training.publish import MemberArtifact, check_writable, publish_version
from training.repository import Repository
from training.selection import WEIGHTINGS, Weighting
from training.tune import SearchBudget, is_distributed_worker

DEFAULT_MEMBERS = {"tuned": 1, "seed": 2, "snapshot": 1, "swa": 1}


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; the CLI fills it from flags."""

    data: str
    name: str
    repository: Path  # a folder; for a store, the mirror training.repository made of it
    work_dir: Path | None = None
    store: str | None = None  # the object store published to (s3://, gs://, az://), if any
    data_options: DataOptions = field(default_factory=DataOptions)
    budget: SearchBudget = field(default_factory=SearchBudget)
    members: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MEMBERS))
    member_options: MemberOptions = field(default_factory=MemberOptions)
    weighting: Weighting = "pruned"
    calibration: Literal["temperature", "none"] = "temperature"
    target_error: float | None = None  # None: the task's default (0.02 for classification)
    ood_holdout: tuple[str, ...] = ()
    gate: bool = True
    gate_metric: str = ""  # "": accuracy for classification, nll for the other tasks
    gate_tolerance: float = 0.0
    objective_given: bool = False  # False: the search ranks by the task's own objective
    min_members: int = 2
    allow_fewer: bool = False
    cross_fit: Literal["auto", "always", "never"] = "auto"  # tables: training.crossfit
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.2
    verbose: int = 0
    progress: Literal["auto", "always", "never"] = "auto"  # a line rewritten in place: training.progress

    def __post_init__(self) -> None:
        if not self.members or any(k not in STRATEGIES or n < 1 for k, n in self.members.items()):
            raise ValueError(f"--members must name kinds of {', '.join(STRATEGIES)} with counts >= 1")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"--weights must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.calibration not in ("temperature", "none"):
            raise ValueError(f"--calibration must be 'temperature' or 'none', got {self.calibration!r}")
        if self.target_error is not None and not 0 < self.target_error < 1:
            raise ValueError(f"--target-error must be between 0 and 1, got {self.target_error}")
        if self.gate_metric and not is_table(self.data) and self.gate_metric not in METRICS:
            raise ValueError(f"--gate-metric must be one of {', '.join(METRICS)}, got {self.gate_metric!r}")
        if self.cross_fit not in ("auto", "always", "never"):
            raise ValueError(f"--cross-fit must be auto, always or never, got {self.cross_fit!r}")
        if self.min_members < 1:
            raise ValueError(f"--min-members must be at least 1, got {self.min_members}")
        planned = sum(self.members.values())
        if planned < self.min_members and not self.allow_fewer:
            raise ValueError(f"--members asks for {planned} member(s), fewer than --min-members {self.min_members}: "
                             "an ensemble of one is no ensemble; ask for more, or pass --allow-fewer")
        if self.gate_tolerance < 0:
            raise ValueError(f"--gate-tolerance must be >= 0, got {self.gate_tolerance}")

    @property
    def target(self) -> Repository:
        """Where the run reads the champion from and publishes to."""
        return Repository(self.repository, self.store)

    def resolved_work_dir(self) -> Path:
        """Tuner state and backups live in a hidden folder of the repository unless told otherwise."""
        return self.work_dir or (self.repository / ".work")


@dataclass(frozen=True)
class TrainResult:
    """What a run produced: the published manifest, or None when the gate refused it."""

    manifest: Manifest | None
    decision: GateDecision
    evaluation: Assessment
    report: dict


def best_member(member_metrics: dict[str, dict[str, float]]) -> str:
    """The member with the highest accuracy on the rows measured (ties: lower NLL)."""
    return min(member_metrics, key=lambda n: (-member_metrics[n]["accuracy"], member_metrics[n]["nll"]))


def describe(found: Assessment, kinds: dict[str, str], test_rows: int, weighting: str) -> list[str]:
    """What the trainer prints about the ensemble it made: members kept, calibration, the
    comparison with the member chosen on validation, abstention and uncertainty."""
    sel = found.selection
    weights = ", ".join(f"{n}={found.weight_of(n):.3f}" for n in found.kept)
    if weighting == "fitted":
        lines = [f"[weights] fitted on the validation split: {weights}"]
    else:
        lines = [f"[ensemble] kept {weights} ({weighting})"
                 + (f"; left out {', '.join(r.member for r in sel.removed)}" if sel.removed else "")]
    for r in sel.removed:
        lines.append(f"[ensemble] without {r.member}, validation NLL per row changes by {r.change:+.4f} "
                     f"[{r.low:+.4f}, {r.high:+.4f}]: left out")
    before, after = found.uncalibrated, found.ensemble
    lines.append(f"[calibration] temperature {sel.temperature:.3f} (fitted on validation); test NLL "
                 f"{before['nll']:.4f} -> {after['nll']:.4f}, ECE {before['ece']:.4f} -> {after['ece']:.4f}, "
                 f"Brier {before['brier']:.4f} -> {after['brier']:.4f}")
    lines.append(f"[evaluate] held-out test split, {test_rows} rows:\n" + format_table(
        {**{f"{n} ({kinds[n]}{'' if n in found.kept else ', left out'})": found.member_metrics[n]
            for n in found.names}, "ENSEMBLE": after}))
    lines.append(f"[evaluate] against {found.selected}, the member chosen on validation (lowest NLL), "
                 "on the test split, ensemble minus member with bootstrap 95% intervals:")
    lines += [f"[evaluate]   {d.sentence()}" for d in found.versus_selected.values()]
    t = found.threshold
    if t.coverage > 0:
        lines.append(f"[abstain] {t.score} above {t.threshold:.4f}: at most {t.target_error:.1%} errors among "
                     f"the answered rows on validation, answering {t.coverage:.1%}; on test it answers "
                     f"{found.test_abstention[0]:.1%} with {found.test_abstention[1]:.1%} errors")
    else:  # a threshold that abstains on everything would be useless: the version gets none
        lines.append(f"[abstain] WARNING: not even the most certain validation rows err at most "
                     f"{t.target_error:.1%}; no abstention threshold is published (raise --target-error)")
    lines.append("[uncertainty] AUROC for telling wrong answers from right ones on test: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in found.error_auroc.items()))
    if found.ood_auroc:
        lines.append(f"[ood] AUROC for telling the {len(found.ood_scores)} rows of held-out classes from "
                     "test rows of known ones: " + ", ".join(f"{k} {v:.3f}" for k, v in found.ood_auroc.items()))
    return lines


def run_key(run: RunPlan) -> str:
    """Short digest of a run's kind, configuration and seed: its backup folder must not be reused
    by a different run that happens to have the same member names."""
    raw = json.dumps([run.kind, run.hyperparameters, run.seed], sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:10]


@contextmanager
def member_exports(config: TrainConfig) -> Iterator[Path]:
    """A fresh folder under the work dir for the members' SavedModels until they are published
    (`publish_version` copies them), removed at the end whatever happens."""
    work = config.resolved_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    exports = Path(tempfile.mkdtemp(prefix="members-", dir=work))
    try:
        yield exports
    finally:
        shutil.rmtree(exports, ignore_errors=True)


def published(config: TrainConfig, manifest, started: float) -> str:
    """The line that closes a run that published."""
    return (f"[publish] {config.name} version {manifest.version} with {len(manifest.members)} members "
            f"in {config.target.where(config.name, manifest.version)} ({time.monotonic() - started:.0f} s in all)")


def progress_display(config: TrainConfig, report: Callable[[str], None]):
    """The run's progress display (`training.progress`): a line rewritten in place on a terminal
    (unless --progress says otherwise), plain lines elsewhere; its `line` replaces `report`."""
    import sys

    from training.progress import Display, is_interactive

    # Keras's own epoch lines (--verbose) and a line rewritten in place would garble each other.
    return Display(report, sys.stdout, is_interactive(config.progress, sys.stdout) and not config.verbose)


@dataclass(frozen=True)
class Searched:
    """A finished search: the member runs it planned, its record for the report, and the run's
    progress display (whose `line` is the run's report from here on)."""

    runs: list
    record: dict
    display: object

    def phase(self, options, repeats: int = 1):
        """The progress of the member phase: every run `repeats` times (once per fold)."""
        from training.members import planned_epochs
        from training.progress import MemberPhase

        return MemberPhase(self.display, [planned_epochs(run, options) for run in self.runs] * repeats)


def search_runs(config: TrainConfig, hypermodel, splits, budget: SearchBudget, project: str, started: float,
                report: Callable[[str], None]) -> Searched | None:
    """Run (or resume) the search and plan the member runs; None in a distributed-tuning worker,
    which only runs trials."""
    import keras

    from training.members import config_values, plan_runs
    from training.tune import search

    display = progress_display(config, report)
    report = display.line  # a permanent line takes the place of the one being rewritten
    report(f"[tune] {budget.describe()}")
    keras.utils.set_random_seed(config.seed)
    ranked = search(hypermodel, splits, budget, config.resolved_work_dir() / "tuning", project, config.seed, report,
                    config.verbose, display)
    if is_distributed_worker():
        report("[tune] worker: the chief has closed the search; this worker is done")
        return None
    seconds = time.monotonic() - started
    report(f"[tune] search done after {seconds:.0f} s; {len(ranked)} trials")
    runs = plan_runs([config_values(hp) for hp in ranked], config.members, config.seed)
    return Searched(runs, {**asdict(budget), "trials": len(ranked), "seconds": round(seconds, 1)}, display)


def search_and_train(config: TrainConfig, hypermodel, splits, budget: SearchBudget, project: str,
                     exports: Path, started: float, report: Callable[[str], None],
                     export: Callable | None = None) -> tuple[list, dict] | None:
    """Run (or resume) the search, then train every member of the plan into `exports`: (the
    trained members, the search's record for the report); None in a distributed-tuning worker,
    which only runs trials."""
    from training.members import MemberTrainer

    searched = search_runs(config, hypermodel, splits, budget, project, started, report)
    if searched is None:
        return None
    report, phase = searched.display.line, searched.phase(config.member_options)
    trainer = MemberTrainer(hypermodel, splits, config.member_options, exports,
                            config.resolved_work_dir() / "backup" / project, report, export, phase)
    trained = []
    for i, run in enumerate(searched.runs, 1):
        report(f"[member] run {i}{phase.begin(i)}: {run.kind} -> {', '.join(run.names)}; {run.hyperparameters}")
        trained.extend(trainer.train_run(run, run_key(run)))
    return trained, searched.record


def train_ensemble(config: TrainConfig, report: Callable[[str], None] = print) -> TrainResult | None:
    """Run the whole pipeline. Returns None in a distributed-tuning worker (it only runs trials).
    Raises, publishing nothing, on failure, and at once (TrainingBusy) while another run of the
    same ensemble holds its lock (a distributed-tuning worker takes none: it shares its chief's)."""
    if config.store is None:  # a store was checked by training.repository.open_repository
        check_writable(config.repository)
    if is_distributed_worker():
        return _train(config, report)
    with one_trainer(config.resolved_work_dir(), config.name):
        return _train(config, report)


def _train(config: TrainConfig, report: Callable[[str], None]) -> TrainResult | None:
    if is_table(config.data):
        from training.table_pipeline import train_table

        return train_table(config, report)
    # Heavy imports here so `--help` and argument errors are instant.
    from training.hypermodel import SEARCH_SPACE_VERSION, EnsembleHyperModel
    from training.members import predict_saved_model

    started = time.monotonic()
    data = open_source(config.data, config.data_options).load()
    ood_x = None
    if config.ood_holdout:
        data, ood_x = hold_out(data, config.ood_holdout)
        report(f"[data] held out {len(ood_x)} rows of {', '.join(config.ood_holdout)} for the "
               "out-of-distribution check")
    splits: Splits = split(data, config.seed, config.val_fraction, config.test_fraction)
    report(f"[data] {data.source}: {len(data.y)} rows of shape {list(data.input_shape)}, "
           f"{len(data.classes)} classes; {len(splits.train.y)} train / {len(splits.val.y)} validation / "
           f"{len(splits.test.y)} test")

    mean, variance = normalization_stats(splits.train.x)
    hypermodel = EnsembleHyperModel(data.input_shape, len(data.classes), mean, variance)
    digest = fingerprint(data)
    project = f"{config.name}-{digest[:12]}-s{SEARCH_SPACE_VERSION}"

    with member_exports(config) as exports:
        searched = search_and_train(config, hypermodel, splits, config.budget, project, exports, started, report)
        if searched is None:
            return None
        trained, search_record = searched

        names = [t.name for t in trained]
        probs = Probabilities(
            val=np.stack([predict_saved_model(t.export_dir, splits.val.x) for t in trained]),
            test=np.stack([predict_saved_model(t.export_dir, splits.test.x) for t in trained]),
            ood=(np.stack([predict_saved_model(t.export_dir, ood_x) for t in trained])
                 if ood_x is not None else None))
        found = assess(names, probs, splits.val.y, splits.test.y, config.weighting,
                       config.calibration == "temperature", config.target_error or 0.02, config.seed,
                       min_members=config.min_members)
        for line in describe(found, {t.name: t.kind for t in trained}, len(splits.test.y), config.weighting):
            report(line)
        ens = found.ensemble
        best = best_member(found.member_metrics)
        top = found.member_metrics[best]

        metric = config.gate_metric or "accuracy"
        if config.gate:
            champion = champion_on(config.repository, config.name, splits.test.x, splits.test.y,
                                   data.input_shape, data.classes)
            decision = decide(ens, champion, metric, config.gate_tolerance, found.versus_selected[metric],
                              found.selected)
        else:
            decision = GateDecision(True, metric, config.gate_tolerance, ens[metric], None, None,
                                    "gate disabled (--no-gate)")
        report(f"[gate] {decision.reason}")

        kept = [t for t in trained if t.name in found.kept]
        run_report = {
            "name": config.name,
            "data": {"source": data.source, "fingerprint": digest,
                     "rows": {"train": len(splits.train.y), "validation": len(splits.val.y),
                              "test": len(splits.test.y)},
                     **({"ood_holdout": list(config.ood_holdout)} if config.ood_holdout else {})},
            "search": search_record,
            "members": {n: {"kind": t.kind, "kept": n in found.kept, "weight": found.weight_of(n),
                            "metrics": found.member_metrics[n], "hyperparameters": t.hyperparameters}
                        for n, t in zip(names, trained)},
            "weighting": config.weighting,
            "ensemble": ens,
            "best_member": {"name": best, "chosen_on": "the test split itself (flattering)", **top},
            **found.summary(),
            "gate": asdict(decision),
            "seconds": round(time.monotonic() - started, 1),
        }
        if not decision.passed:
            return TrainResult(None, decision, found, run_report)

        from training.report import attachments

        selected = found.selected
        manifest = publish_version(
            config.target.destination(),
            config.name,
            [MemberArtifact(name=t.name, kind=t.kind, source=t.export_dir, weight=found.weight_of(t.name),
                            hyperparameters=t.hyperparameters, metrics=found.member_metrics[t.name])
             for t in kept],
            InputSpec(shape=data.input_shape, dtype="float32"),
            OutputSpec(classes=data.classes),
            {**ens, **{f"best_member_{k}": v for k, v in top.items()},
             **{f"selected_member_{k}": v for k, v in found.member_metrics[selected].items()}},
            DataInfo(source=data.source, fingerprint=digest, rows=run_report["data"]["rows"]),
            attachments(run_report, found, probs.test[names.index(selected)], splits.test.y),
            calibration=(Calibration(temperature=found.selection.temperature)
                         if config.calibration == "temperature" else None),
            abstention=(Abstention(score=found.threshold.score, threshold=found.threshold.threshold,
                                   target_error=found.threshold.target_error,
                                   coverage=found.threshold.coverage)
                        if found.threshold.coverage > 0 else None),  # unreachable: see describe()
            uncertainty_reference=found.validation_scores,
        )
    report(published(config, manifest, started))
    return TrainResult(manifest, decision, found, run_report)
